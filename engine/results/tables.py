"""Reads and writes every table family shares: checks that a run or feature exists, a query
as a frame, one auto-numbered row, and a whole frame replacing or appending rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from engine.results import schema
from engine.results.base import StoreBase
from engine.results.clauses import _ident
from engine.results.connection import Cursor
from engine.results.errors import ResultsDBError, _first_line
from engine.results.values import (
    _arrow,
    _choices,
    _decode,
    _dumps,
    _missing,
    _now,
    _pandas,
    _to_arrow,
)

# Auto-numbered key of each table written one row at a time.
ROW_IDS = {
    "explanations": "explanation_id",
    "scores": "score_id",
    "steering_samples": "sample_id",
    "evaluations": "eval_id",
    "triage_history": "history_id",
}


def _frame_columns(table: str, keys: dict[str, Any], df: pd.DataFrame) -> list[str]:
    """The frame's columns to insert into `table`, checked against the schema."""
    if not isinstance(df, pd.DataFrame):
        raise ResultsDBError(f"{table} must be written from a pandas DataFrame, got {type(df)}")
    valid = schema.COLUMNS[table]
    unknown = [str(c) for c in df.columns if c not in valid]
    if unknown:
        raise ResultsDBError(
            f"unknown column(s) {', '.join(unknown)} for table {table}; valid: {', '.join(valid)}"
        )
    missing = [c for c in schema.BULK_REQUIRED[table] if c not in df.columns]
    if missing:
        raise ResultsDBError(f"the {table} frame lacks column(s) {', '.join(missing)}")
    for key, value in keys.items():
        if key in df.columns and not (df[key] == value).all():
            raise ResultsDBError(f"the {table} frame has rows whose {key} is not {value!r}")
    for column, allowed in schema.BULK_CHOICES.get(table, {}).items():
        if column in df.columns:
            _choices([v for v in df[column].unique() if not _missing(v)], allowed, column)
    return [c for c in valid if c in df.columns and c not in keys]


class Tables(StoreBase):
    """The generic row reads and writes behind each table family's methods."""

    def _require_run(self, cur: Cursor, run_id: str) -> None:
        """Raise, listing the known runs, unless `run_id` is one."""
        if cur.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
            return
        rows = cur.execute("SELECT run_id FROM runs ORDER BY created_at").fetchall()
        known = [r[0] for r in rows]
        listing = ", ".join(map(repr, known[:20])) + (", ..." if len(known) > 20 else "")
        raise ResultsDBError(
            f"unknown run {run_id!r}; known runs: "
            + (listing or "none yet (run `modeldiff analyze` first)")
        )

    def _require_feature(self, cur: Cursor, run_id: str, feature_id: int) -> None:
        """Raise unless the run has the feature."""
        sql = "SELECT 1 FROM features WHERE run_id = ? AND feature_id = ?"
        if cur.execute(sql, [run_id, int(feature_id)]).fetchone():
            return
        self._require_run(cur, run_id)
        row = cur.execute("SELECT count(*) FROM features WHERE run_id = ?", [run_id]).fetchone()
        raise ResultsDBError(f"run {run_id!r} has no feature {feature_id} ({row[0]} features)")

    def _frame(self, sql: str, params: list[Any], run_id: str, table: str) -> pd.DataFrame:
        """A query's rows as a frame with JSON decoded; an unknown run raises."""
        with self._cursor() as cur:
            df = _pandas(_arrow(cur, sql, params))
            if df.empty:
                self._require_run(cur, run_id)
        return _decode(df, schema.JSON_COLUMNS.get(table, ()))

    def _insert_row(self, table: str, row: dict[str, Any]) -> int:
        """Insert one row of an auto-numbered table (its run must exist); return its id."""
        names = ", ".join(_ident(table, c) for c in row)
        marks = ", ".join("?" for _ in row)
        sql = f"INSERT INTO {_ident(table)} ({names}) VALUES ({marks}) RETURNING {ROW_IDS[table]}"
        with self._write() as cur:
            self._require_run(cur, row["run_id"])
            row_id = int(cur.execute(sql, list(row.values())).fetchone()[0])
            _stamp(cur, table, row["run_id"])
            return row_id

    def _replace(
        self,
        table: str,
        keys: dict[str, Any],
        df: pd.DataFrame,
        order: str,
        check: Callable[[Cursor], None] | None = None,
    ) -> int:
        """Replace the rows of `table` matching `keys` with the frame's, in one transaction."""
        columns = _frame_columns(table, keys, df)
        data = _to_arrow(df, columns, schema.LIST_COLUMNS.get(table, {}))
        where = " AND ".join(f"{_ident(table, k)} = ?" for k in keys)
        names = ", ".join(_ident(table, c) for c in [*keys, *columns])
        select = ", ".join(["?"] * len(keys) + [_ident(table, c) for c in columns])
        with self._write() as cur:
            for key in keys:
                if key.endswith("run_id"):
                    self._require_run(cur, keys[key])
            cur.execute(f"DELETE FROM {_ident(table)} WHERE {where}", list(keys.values()))
            # A view private to this cursor (its own connection); closing the cursor drops it.
            cur.register("_frame", data)
            try:
                cur.execute(
                    f"INSERT INTO {_ident(table)} ({names}) SELECT {select} FROM _frame "
                    f"ORDER BY {order}",
                    list(keys.values()),
                )
            except (duckdb.ConstraintException, duckdb.ConversionException) as err:
                raise ResultsDBError(f"cannot write {table}: {_first_line(err)}") from err
            if check is not None:
                check(cur)
        return len(df)

    def _append(self, table: str, run_id: str, df: pd.DataFrame) -> list[int]:
        """Append the frame's rows to an auto-numbered table in one transaction, numbered in
        the frame's order; return their ids."""
        key = ROW_IDS[table]
        assigned = [c for c in (key, "created_at") if c in df.columns]
        if assigned:
            raise ResultsDBError(
                f"the {table} frame sets {', '.join(assigned)}; leave it out, the store assigns it"
            )
        columns = _frame_columns(table, {"run_id": run_id}, df)
        frame = df[columns].copy()
        for column in schema.JSON_COLUMNS.get(table, ()):
            if column in frame.columns:
                frame[column] = [None if _missing(v) else _dumps(v, column) for v in frame[column]]
        data = _to_arrow(frame, columns, schema.LIST_COLUMNS.get(table, {}))
        names = ", ".join(_ident(table, c) for c in ["run_id", key, "created_at", *columns])
        select = ", ".join(["?", key, "created_at", *(_ident(table, c) for c in columns)])
        sequence = schema.SEQUENCES[table]
        with self._write() as cur:
            self._require_run(cur, run_id)
            rows = cur.execute(f"SELECT nextval('{sequence}') FROM range(?)", [len(frame)])
            ids = sorted(int(r[0]) for r in rows.fetchall())
            data = data.append_column(key, pa.array(ids, pa.int64()))
            data = data.append_column(
                "created_at", pa.array([_now()] * len(ids), pa.timestamp("us"))
            )
            cur.register("_frame", data)
            try:
                cur.execute(
                    f"INSERT INTO {_ident(table)} ({names}) SELECT {select} FROM _frame "
                    f"ORDER BY {key}",
                    [run_id],
                )
            except (duckdb.ConstraintException, duckdb.ConversionException) as err:
                raise ResultsDBError(f"cannot write {table}: {_first_line(err)}") from err
            _stamp(cur, table, run_id)
        return ids


def _stamp(cur: Cursor, table: str, run_id: str) -> None:
    """Tie the run's new analyst rows in `table` to the weights the run was analysed from."""
    # (a file still at an older schema version, as a test writes one, has no such column)
    has = "SELECT 1 FROM duckdb_columns() WHERE table_name = ? AND column_name = 'weights'"
    if table in schema.STAMPED and cur.execute(has, [table]).fetchone():
        cur.execute(
            f"UPDATE {_ident(table)} SET weights = (SELECT weights FROM runs WHERE run_id = ?) "
            "WHERE run_id = ? AND weights IS NULL",
            [run_id, run_id],
        )
