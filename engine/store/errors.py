"""The store's one exception, and the short form of a DuckDB error its messages quote."""

from __future__ import annotations

from engine.errors import UserError


class StoreDBError(UserError, ValueError):
    """The results database is missing, incompatible, or was asked for what it lacks."""


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
