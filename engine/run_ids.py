"""Run ids: the name of an analysed run, used in database rows, file names and URLs."""

from __future__ import annotations

import re

RUN_ID_RULE = "letters, digits, '.', '_' and '-' only, and not '.' or '..'"
_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def run_id_problem(run_id: object) -> str | None:
    """Why `run_id` is not a valid run id, or None when it is."""
    # A run id becomes part of file names (the batch ledger beside the database), so a
    # separator or a dot-name could write outside the database's folder.
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        return f"invalid run id {run_id!r}"
    return None


def check_run_id(run_id: object, error: type[Exception] = ValueError) -> str:
    """`run_id` if it is valid, else raise `error` saying what a run id may contain."""
    problem = run_id_problem(run_id)
    if problem:
        raise error(f"{problem}: a run id has {RUN_ID_RULE}")
    return run_id  # type: ignore[return-value]
