"""SQL fragments shared by the tables: allow-listed names, WHERE, ORDER BY and LIMIT
clauses, and the expression of a feature's category. Names reach SQL only from
`engine.results.schema`'s allow-list; values only as `?` parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine import categories
from engine.results import schema
from engine.results.errors import ResultsDBError


def _equals(table: str, run_id: str, **columns: Any) -> tuple[str, list[Any]]:
    """A WHERE clause (and its parameters) for the run's rows whose allow-listed columns
    equal the given values; columns given as None are not filtered on."""
    where, params = ["run_id = ?"], [run_id]
    for column, value in columns.items():
        if value is not None:
            where.append(f"{_ident(table, column)} = ?")
            params.append(value)
    return " AND ".join(where), params


def _ident(table: str, column: str | None = None) -> str:
    """A quoted table or column name, refused unless it is in the schema's allow-list."""
    if table not in schema.COLUMNS or (column is not None and column not in schema.COLUMNS[table]):
        raise ResultsDBError(f"no column {column!r} in table {table!r}" if column else table)
    return f'"{column or table}"'


def _order(column: str, valid: Sequence[str], descending: bool) -> str:
    """An ORDER BY clause for an allow-listed column, ties broken by feature id."""
    if column not in valid:
        raise ResultsDBError(f"cannot order by {column!r}; choose one of: {', '.join(valid)}")
    direction = "DESC" if descending else "ASC"
    return f'"{column}" {direction} NULLS LAST, "feature_id"'


def _count(limit: Any) -> int:
    """A row limit, checked."""
    if not isinstance(limit, int | np.integer) or isinstance(limit, bool) or limit < 0:
        raise ResultsDBError(f"limit must be a non-negative integer or None, got {limit!r}")
    return int(limit)


def _limit(limit: int | None, params: list[Any]) -> str:
    """A LIMIT clause (empty for None), its value added to the parameters."""
    if limit is None:
        return ""
    params.append(_count(limit))
    return " LIMIT ?"


def _category() -> tuple[str, list[Any]]:
    """SQL: the category of the features row `f` (its partition, or a_leaning / b_leaning
    for a shared feature past the relative-norm bounds); and its parameters."""
    sql = (
        'CASE WHEN f."partition" = ? AND f.rel_norm > ?::DOUBLE THEN ? '
        'WHEN f."partition" = ? AND f.rel_norm < ?::DOUBLE THEN ? ELSE f."partition" END'
    )
    params = [
        categories.SHARED, categories.A_LEANING_ABOVE, categories.A_LEANING,
        categories.SHARED, categories.B_LEANING_BELOW, categories.B_LEANING,
    ]  # fmt: skip
    return sql, params
