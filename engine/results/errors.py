"""The results database's one exception, and the short form of a DuckDB error it quotes."""

from __future__ import annotations

from engine.errors import UserError


class ResultsDBError(UserError, ValueError):
    """The results database is missing, incompatible, or was asked for what it lacks."""


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
