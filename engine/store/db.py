"""The results database: every read and write of the DuckDB file, in parameterised SQL.

A `Database` is safe to share between threads: each call runs on its own cursor, and writes
take a lock and run in one transaction, so a reader never sees half of a replacement.

DuckDB lets one process hold a file open for writing, or several processes for reading. A
`Database(..., hold=False)` therefore holds no connection between calls: each call opens
the file (read-only for a read), runs and closes it, so the dashboard and the `modeldiff`
commands can take turns on one file. Opening waits, with back-off, while another process
holds the lock.

Values reach SQL only as `?` parameters; table and column names only from the allow-list in
`engine.store.schema`.
"""

from __future__ import annotations

import csv
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from engine.analysis import categories
from engine.analysis.context import Context
from engine.run_ids import check_run_id
from engine.store import schema

Cursor = duckdb.DuckDBPyConnection

# Auto-numbered key of each table written one row at a time.
ROW_IDS = {
    "explanations": "explanation_id",
    "scores": "score_id",
    "steering_samples": "sample_id",
    "evaluations": "eval_id",
    "triage_history": "history_id",
}
EXPORT_FORMATS = {".parquet": "FORMAT parquet", ".csv": "FORMAT csv, HEADER true"}
FEATURE_FILTERS = (
    "partition", "category", "harmful", "status", "min_score", "min_exclusivity",
    "max_exclusivity", "min_density", "max_density", "search", "explainer", "dead",
    "feature_ids",
)  # fmt: skip
FEATURE_TABLE_FILTERS = (*FEATURE_FILTERS, "order_by", "descending", "limit", "offset")
# The value type of each feature-table filter, for filters given as text ("list": a
# comma-separated list of names, "ints": of integers).
FEATURE_TABLE_FILTER_TYPES = {
    "partition": "list", "category": "list", "harmful": "bool", "status": "list",
    "min_score": "float", "min_exclusivity": "float", "max_exclusivity": "float",
    "min_density": "float", "max_density": "float", "search": "str", "explainer": "str",
    "dead": "bool", "feature_ids": "ints", "order_by": "str", "descending": "bool",
    "limit": "int", "offset": "int",
}  # fmt: skip
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
# Parquet key-value metadata naming the table an exported file holds.
EXPORT_MARK = "modeldiff_export"
DETECTION = "detection"
EXCLUSIVITY = "exclusivity"
# Feature-table sort keys that are not columns of `features`, as expressions of the query.
TABLE_SORT_KEYS = {"score": "sc.value", "exclusivity": "xs.value", "updated_at": "t.updated_at"}
# Seconds to wait for another process (the dashboard, a `modeldiff` command) to release the
# file before giving up: its writes are short, so this is only exceeded by a stuck process.
LOCK_WAIT_S = 60.0


class StoreDBError(ValueError):
    """The results database is missing, incompatible, or was asked for what it lacks."""


# -- values ------------------------------------------------------------------------------


def _now() -> datetime:
    """The current time as a naive UTC timestamp (the database's convention)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _json_default(value: Any) -> Any:
    """JSON for the non-standard values configs and metrics carry (numpy, paths, times)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path | datetime):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any, what: str) -> str | None:
    """JSON text of a value for a JSON column (None stays NULL)."""
    if value is None:
        return None
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as err:
        raise StoreDBError(f"{what} cannot be stored as JSON: {err}") from None


def _loads(text: Any) -> Any:
    """A decoded JSON column value; NULL (None or pandas' NaN) becomes None."""
    return json.loads(text) if isinstance(text, str) else None


def _missing(value: Any) -> bool:
    """Whether a cell of a frame is missing (None, NaN or pd.NA)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _choices(value: str | Iterable[str], valid: Sequence[str], what: str) -> list[str]:
    """A value or list of values, each checked against the valid ones."""
    values = [value] if isinstance(value, str) else list(value)
    bad = [v for v in values if v not in valid]
    if bad:
        raise StoreDBError(f"unknown {what} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return values


def _equals(table: str, run_id: str, **columns: Any) -> tuple[str, list[Any]]:
    """A WHERE clause (and its parameters) for the run's rows whose allow-listed columns
    equal the given values; columns given as None are not filtered on."""
    where, params = ["run_id = ?"], [run_id]
    for column, value in columns.items():
        if value is not None:
            where.append(f"{_ident(table, column)} = ?")
            params.append(value)
    return " AND ".join(where), params


def _int(value: Any) -> int | None:
    """An optional id as a plain int."""
    return None if value is None else int(value)


def _ident(table: str, column: str | None = None) -> str:
    """A quoted table or column name, refused unless it is in the schema's allow-list."""
    if table not in schema.COLUMNS or (column is not None and column not in schema.COLUMNS[table]):
        raise StoreDBError(f"no column {column!r} in table {table!r}" if column else table)
    return f'"{column or table}"'


def _order(column: str, valid: Sequence[str], descending: bool) -> str:
    """An ORDER BY clause for an allow-listed column, ties broken by feature id."""
    if column not in valid:
        raise StoreDBError(f"cannot order by {column!r}; choose one of: {', '.join(valid)}")
    direction = "DESC" if descending else "ASC"
    return f'"{column}" {direction} NULLS LAST, "feature_id"'


def _count(limit: Any) -> int:
    """A row limit, checked."""
    if not isinstance(limit, int | np.integer) or isinstance(limit, bool) or limit < 0:
        raise StoreDBError(f"limit must be a non-negative integer or None, got {limit!r}")
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


def _partitions(partition: str | Iterable[str]) -> list[str]:
    """Partition names, checked; a category name gets a hint to filter by category."""
    values = [partition] if isinstance(partition, str) else list(partition)
    leaning = [v for v in values if v in categories.LEANING]
    if leaning:
        raise StoreDBError(
            f"{', '.join(map(repr, leaning))} is a category, not a partition: filter with "
            f"category=... (valid partitions: {', '.join(schema.PARTITIONS)})"
        )
    return _choices(values, schema.PARTITIONS, "partition")


def _array(value: Any, dtype: type, width: int | None = None) -> np.ndarray:
    """A list column value as a numpy array ([n] or [n, width]); NULL becomes empty."""
    out = np.asarray([] if value is None else value, dtype=dtype)
    return out.reshape(-1, width) if width else out


def _decode(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """The frame with its JSON columns decoded to Python values."""
    for column in columns:
        if column in df.columns:
            df[column] = pd.Series([_loads(v) for v in df[column]], index=df.index, dtype=object)
    return df


def _records(cur: Cursor) -> list[dict[str, Any]]:
    """The rows of the last query as dicts."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# -- results to numpy and pandas ---------------------------------------------------------
# Reads go through Arrow: DuckDB's own conversion builds a Python object per string and per
# list element, which at 100k rows costs more than the query (a window's nested spans alone
# take ~20 ms that way, against ~1 ms through Arrow).

_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def _arrow(cur: Cursor, sql: str, params: list[Any]) -> pa.Table:
    """A query's result as an Arrow table."""
    return cur.sql(sql, params=params).to_arrow_table()


def _cells(column: pa.ChunkedArray, width: int | None = None) -> list[np.ndarray | None]:
    """Each row of a list column as a numpy array ([n], or [n, width] for a list of pairs),
    cut from one flat buffer; NULL rows as None."""
    arr = column.combine_chunks()
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]  # a sliced array's offsets start past zero
    values = arr.flatten()
    if width is not None:  # a list of lists: map row offsets through the inner offsets
        inner = np.asarray(values.offsets, dtype=np.int64)
        offsets = inner[offsets] - inner[0]
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if width is not None:
        flat = flat.reshape(-1, width)
        offsets = offsets // width
    bounds = offsets.tolist()
    valid = arr.is_valid().to_numpy(zero_copy_only=False).tolist()
    return [
        flat[a:b] if ok else None for a, b, ok in zip(bounds[:-1], bounds[1:], valid, strict=True)
    ]


def _pandas(table: pa.Table) -> pd.DataFrame:
    """An Arrow result as the frame DuckDB's `.df()` gives: nullable integers and booleans
    where a column has NULLs (Arrow alone would make them floats and objects)."""
    columns: dict[str, Any] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if column.null_count and column.type in _NULLABLE:
            columns[name] = column.to_pandas(types_mapper=_NULLABLE.get)
        else:
            columns[name] = column.to_pandas()
    return pd.DataFrame(columns, index=pd.RangeIndex(table.num_rows))


# -- frames to Arrow ---------------------------------------------------------------------


def _list_array(values: list[Any], depth: int, column: str) -> pa.Array:
    """An Arrow list column nested `depth` deep from per-row arrays, lists or missing cells.

    Built from one flat buffer: DuckDB scans nested numpy cells of a pandas frame about ten
    times slower, and cannot read a 2-D array in a cell at all.
    """
    rows, valid = [], []
    for value in values:
        row = np.asarray([] if _missing(value) else value)
        if row.size == 0 and row.ndim != depth:
            row = row.reshape((0,) * depth)
        if row.ndim != depth:
            shape = "a 1-D array" if depth == 1 else f"a {depth}-D array such as [n, 2]"
            raise StoreDBError(f"column {column!r} needs {shape} per row, got shape {row.shape}")
        rows.append(row)
        valid.append(not _missing(value))
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.empty(0)
    items: pa.Array = pa.array(flat)
    if depth == 2:
        widths = np.concatenate([np.full(len(r), r.shape[1]) for r in rows]) if rows else []
        items = pa.LargeListArray.from_arrays(_offsets(widths), items)
    mask = None if all(valid) else pa.array(~np.asarray(valid))
    return pa.LargeListArray.from_arrays(_offsets([len(r) for r in rows]), items, mask=mask)


def _offsets(lengths: Sequence[int] | np.ndarray) -> pa.Array:
    """Arrow list offsets for rows of the given lengths."""
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))


def _to_arrow(df: pd.DataFrame, columns: list[str], lists: dict[str, int]) -> pa.Table:
    """The frame's columns as an Arrow table, list columns built flat, NaN as NULL."""
    arrays = {}
    for column in columns:
        depth = lists.get(column)
        if depth:
            arrays[column] = _list_array(df[column].tolist(), depth, column)
        else:
            arrays[column] = pa.array(df[column], from_pandas=True)
    return pa.table(arrays)


def _frame_columns(table: str, keys: dict[str, Any], df: pd.DataFrame) -> list[str]:
    """The frame's columns to insert into `table`, checked against the schema."""
    if not isinstance(df, pd.DataFrame):
        raise StoreDBError(f"{table} must be written from a pandas DataFrame, got {type(df)}")
    valid = schema.COLUMNS[table]
    unknown = [str(c) for c in df.columns if c not in valid]
    if unknown:
        raise StoreDBError(
            f"unknown column(s) {', '.join(unknown)} for table {table}; valid: {', '.join(valid)}"
        )
    missing = [c for c in schema.BULK_REQUIRED[table] if c not in df.columns]
    if missing:
        raise StoreDBError(f"the {table} frame lacks column(s) {', '.join(missing)}")
    for key, value in keys.items():
        if key in df.columns and not (df[key] == value).all():
            raise StoreDBError(f"the {table} frame has rows whose {key} is not {value!r}")
    for column, allowed in schema.BULK_CHOICES.get(table, {}).items():
        if column in df.columns:
            _choices([v for v in df[column].unique() if not _missing(v)], allowed, column)
    return [c for c in valid if c in df.columns and c not in keys]


# -- the database ------------------------------------------------------------------------


class Database:
    """The results database in one DuckDB file; safe to share between threads."""

    def __init__(
        self,
        path: str | Path,
        read_only: bool = False,
        create: bool = True,
        hold: bool = True,
        wait: float = LOCK_WAIT_S,
    ) -> None:
        """Open (with `create`, also create) the database file at `path`; with `hold=False`,
        check it and close it again until a call needs it."""
        self.path = Path(path)
        self.read_only = read_only
        self.wait = wait
        self._lock = threading.RLock()  # serialises writes (DuckDB allows one writer at a time)
        self._tx: Cursor | None = None  # the open `transaction()`'s cursor, if any
        self._local = threading.local()  # hold=False: this thread's open connection, if any
        self._closed = False
        self._conn: duckdb.DuckDBPyConnection | None = _connect(
            str(path), read_only, create, wait=wait
        )
        try:
            self._version = self._prepare()
        except BaseException:
            self.close()
            raise
        if not hold and str(path) != ":memory:":  # an in-memory database lives in its connection
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"Database({str(self.path)!r}{mode})"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def schema_version(self) -> int:
        """The file's schema version (always the current one once opened)."""
        return self._version

    # connection plumbing ----------------------------------------------------------------

    @contextmanager
    def _connection(self, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """The held connection; with hold=False, this thread's open one, or one opened for
        this call (read-only unless it writes) and closed after it, releasing the file."""
        if self._closed:
            raise StoreDBError(f"the database {self.path} is closed; open a new Database")
        if self._conn is not None:
            yield self._conn
            return
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            # A read inside a write (or a write inside a transaction) uses the open
            # connection: opening the file again with other settings would wait on itself.
            if write and not self._local.writes:
                raise StoreDBError("cannot write to the database from inside a read")
            yield pinned
            return
        read_only = self.read_only or not write
        conn = _connect(str(self.path), read_only, create=False, wait=self.wait, check=False)
        self._local.conn, self._local.writes = conn, not read_only
        try:
            yield conn
        finally:
            self._local.conn = None
            conn.close()

    @contextmanager
    def _cursor(self, write: bool = False) -> Iterator[Cursor]:
        """A fresh cursor of the connection, closed afterwards."""
        with self._connection(write) as conn:
            cur = conn.cursor()
            try:
                yield cur
            except duckdb.Error as err:
                # Damage in a block only shows when a query reads it.
                if _is_damage(err):
                    raise StoreDBError(_damaged(self.path, err)) from None
                raise
            finally:
                cur.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes: everything written inside lands together or not at all (an
        interrupted analysis leaves no partial run behind)."""
        with self._write() as cur:
            self._tx = cur
            try:
                yield
            finally:
                self._tx = None

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        """A cursor in one transaction under the write lock, rolled back on any error;
        inside `transaction()`, that transaction's cursor."""
        if self.read_only:
            raise StoreDBError(
                f"{self.path} was opened read-only; open Database(path, read_only=False) to write"
            )
        with self._lock:
            if self._tx is not None:  # the lock is held by this thread's transaction
                yield self._tx
                return
        with self._lock, self._cursor(write=True) as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _prepare(self) -> int:
        """Check the file's schema version, upgrading an older file; return the version."""
        target = len(schema.MIGRATIONS)
        with self._cursor() as cur:
            version = _file_version(cur, self.path)
        if version > target:
            raise StoreDBError(
                f"{self.path} was written by a newer modeldiff (schema {version}, this reads "
                f"{target}); upgrade modeldiff"
            )
        if version < target:
            if self.read_only:
                raise StoreDBError(
                    f"{self.path} has schema {version} and this modeldiff reads {target}; open "
                    "it once with read_only=False to upgrade it"
                )
            self._migrate(version, target)
        return target

    def _migrate(self, version: int, target: int) -> None:
        """Apply the migrations from `version` to `target` in one transaction."""
        try:
            with self._write() as cur:
                for script in schema.MIGRATIONS[version:target]:
                    cur.execute(script)
                cur.execute(
                    "INSERT INTO meta VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    ["schema_version", str(target)],
                )
        except duckdb.Error as err:
            raise StoreDBError(
                f"upgrading {self.path} from schema {version} to {target} failed, and the file "
                f"was left unchanged: {_first_line(err)}"
            ) from err

    def _require_run(self, cur: Cursor, run_id: str) -> None:
        """Raise, listing the known runs, unless `run_id` is one."""
        if cur.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
            return
        rows = cur.execute("SELECT run_id FROM runs ORDER BY created_at").fetchall()
        known = [r[0] for r in rows]
        listing = ", ".join(map(repr, known[:20])) + (", ..." if len(known) > 20 else "")
        raise StoreDBError(
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
        raise StoreDBError(f"run {run_id!r} has no feature {feature_id} ({row[0]} features)")

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
            return int(cur.execute(sql, list(row.values())).fetchone()[0])

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
                raise StoreDBError(f"cannot write {table}: {_first_line(err)}") from err
            if check is not None:
                check(cur)
        return len(df)

    def _append(self, table: str, run_id: str, df: pd.DataFrame) -> list[int]:
        """Append the frame's rows to an auto-numbered table in one transaction, numbered in
        the frame's order; return their ids."""
        key = ROW_IDS[table]
        assigned = [c for c in (key, "created_at") if c in df.columns]
        if assigned:
            raise StoreDBError(
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
                raise StoreDBError(f"cannot write {table}: {_first_line(err)}") from err
        return ids

    # runs -------------------------------------------------------------------------------

    def add_run(
        self,
        run_id: str,
        *,
        name: str = "",
        model_a: dict[str, Any],
        model_b: dict[str, Any],
        architecture: str,
        n_features: int,
        partition: dict[str, Any],
        config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        checkpoint_path: str | Path | None = None,
        store_path: str | Path | None = None,
        provenance: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        """Record a run, or update it (keeping its creation time) if the id exists. `history`
        is the training metrics of each logged step (`run_history` reads them back); left
        out (None), an update keeps the history already recorded."""
        check_run_id(run_id, StoreDBError)
        row = {
            "run_id": run_id,
            "name": name or run_id,
            "created_at": _now(),
            "model_a": _dumps(model_a, "model_a"),
            "model_b": _dumps(model_b, "model_b"),
            "architecture": architecture,
            "n_features": int(n_features),
            "partition": _dumps(partition, "partition"),
            "config": _dumps(config or {}, "config"),
            "metrics": _dumps(metrics or {}, "metrics"),
            "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
            "store_path": None if store_path is None else str(store_path),
            "provenance": _dumps(provenance or {}, "provenance"),
        }
        if history is not None:
            row["history"] = _dumps(list(history), "history")
        update = ", ".join(
            f"{_ident('runs', c)} = excluded.{_ident('runs', c)}"
            for c in row
            if c not in ("run_id", "created_at")
        )
        sql = (
            f"INSERT INTO runs ({', '.join(_ident('runs', c) for c in row)}) "
            f"VALUES ({', '.join('?' for _ in row)}) ON CONFLICT (run_id) DO UPDATE SET {update}"
        )
        with self._write() as cur:
            cur.execute(sql, list(row.values()))

    def runs(self) -> pd.DataFrame:
        """All runs, oldest first, JSON columns decoded (without their history)."""
        sql = "SELECT * EXCLUDE (history) FROM runs ORDER BY created_at, run_id"
        with self._cursor() as cur:
            df = _pandas(_arrow(cur, sql, []))
        return _decode(df, schema.JSON_COLUMNS["runs"])

    def run(self, run_id: str) -> dict[str, Any]:
        """One run as a dict, JSON columns decoded (without its history: `run_history`)."""
        sql = "SELECT * EXCLUDE (history) FROM runs WHERE run_id = ?"
        with self._cursor() as cur:
            self._require_run(cur, run_id)
            (row,) = _records(cur.execute(sql, [run_id]))
        for column in schema.JSON_COLUMNS["runs"]:
            if column in row:
                row[column] = _loads(row[column])
        return row

    def run_history(self, run_id: str) -> pd.DataFrame:
        """The run's training metrics, one row per logged step (columns as the trainer logs
        them: step, loss, fve_a, dead_frac_a_exclusive, ...); empty when none was recorded."""
        with self._cursor() as cur:
            self._require_run(cur, run_id)
            (text,) = cur.execute("SELECT history FROM runs WHERE run_id = ?", [run_id]).fetchone()
        records = _loads(text) or []
        return pd.DataFrame.from_records(records) if records else pd.DataFrame()

    # features ---------------------------------------------------------------------------

    def write_features(self, run_id: str, df: pd.DataFrame) -> int:
        """Replace the run's feature statistics with the frame's rows; return the count."""
        return self._replace("features", {"run_id": run_id}, df, '"feature_id"')

    def features(
        self,
        run_id: str,
        partition: str | Sequence[str] | None = None,
        dead: bool | None = None,
        order_by: str = "feature_id",
        descending: bool = False,
        limit: int | None = None,
        feature_ids: Iterable[int] | None = None,
        category: str | Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The run's features with their category, filtered and ordered (list columns hold
        numpy arrays). `partition` and `category` each keep the features in any of theirs."""
        category_sql, category_params = _category()
        where, params = ["run_id = ?"], [run_id]
        if partition is not None:
            where.append('list_contains(?::VARCHAR[], "partition")')
            params.append(_partitions(partition))
        if category is not None:
            where.append(f"list_contains(?::VARCHAR[], {category_sql})")
            params += [_choices(category, schema.CATEGORIES, "category"), *category_params]
        if dead is not None:
            where.append("dead = ?")
            params.append(bool(dead))
        if feature_ids is not None:
            where.append("list_contains(?::INTEGER[], feature_id)")
            params.append([int(i) for i in feature_ids])
        order = _order(order_by, schema.FEATURE_ORDER, descending)
        sql = (
            f"SELECT *, {category_sql} AS category FROM features f "
            f"WHERE {' AND '.join(where)} ORDER BY {order}"
        )
        params = [*category_params, *params]
        sql += _limit(limit, params)
        return self._frame(sql, params, run_id, "features")

    def feature(self, run_id: str, feature_id: int) -> dict[str, Any]:
        """One feature's statistics and category as a dict (histogram as numpy arrays)."""
        category_sql, params = _category()
        sql = (
            f"SELECT *, {category_sql} AS category FROM features f "
            "WHERE run_id = ? AND feature_id = ?"
        )
        with self._cursor() as cur:
            self._require_feature(cur, run_id, feature_id)
            (row,) = _records(cur.execute(sql, [*params, run_id, int(feature_id)]))
        row["hist_counts"] = _array(row["hist_counts"], np.int64)
        row["hist_edges"] = _array(row["hist_edges"], np.float64)
        return row

    # windows and contexts ---------------------------------------------------------------

    def write_windows(self, run_id: str, df: pd.DataFrame) -> int:
        """Replace the run's context windows with the frame's rows; return the count."""
        return self._replace("windows", {"run_id": run_id}, df, '"window_id"')

    def write_contexts(self, run_id: str, df: pd.DataFrame) -> int:
        """Replace the run's feature contexts with the frame's rows; return the count.

        Write the windows first: every context must name a window of the run with one
        activation per aligned span. A missing `max_act` is filled with the largest one.
        """

        def check(cur: Cursor) -> None:
            cur.execute(
                "UPDATE contexts SET max_act = list_max(acts) WHERE run_id = ? AND max_act IS NULL",
                [run_id],
            )
            _check_contexts(cur, run_id)

        return self._replace("contexts", {"run_id": run_id}, df, '"feature_id"', check)

    def contexts(
        self, run_id: str, feature_id: int, kind: str | Sequence[str] | None = None
    ) -> list[Context]:
        """A feature's contexts with their window texts, by kind (top, quantile, random),
        then quantile bin, then rank."""
        return self.contexts_of(run_id, [feature_id], kind).get(int(feature_id), [])

    def contexts_of(
        self, run_id: str, feature_ids: Sequence[int], kind: str | Sequence[str] | None = None
    ) -> dict[int, list[Context]]:
        """`contexts` for many features at once: {feature_id: contexts}."""
        ids = [int(f) for f in feature_ids]
        # `IN (SELECT unnest(?))` (not list_contains) lets DuckDB skip the row groups of other
        # features: contexts are stored sorted by feature.
        where = ["run_id = ?", "feature_id IN (SELECT unnest(?::INTEGER[]))"]
        params: list[Any] = [run_id, ids]
        if kind is not None:
            where.append("list_contains(?::VARCHAR[], kind)")
            params.append(_choices(kind, schema.CONTEXT_KINDS, "context kind"))
        sql = (
            "SELECT feature_id, kind, rank, quantile, window_id, span_start, span_end, acts "
            f"FROM contexts WHERE {' AND '.join(where)} "
            "ORDER BY feature_id, list_position(?::VARCHAR[], kind), quantile NULLS FIRST, rank"
        )
        out: dict[int, list[Context]] = {f: [] for f in ids}
        with self._cursor() as cur:
            rows = _arrow(cur, sql, [*params, list(schema.CONTEXT_KINDS)])
            if not rows.num_rows:
                self._require_run(cur, run_id)
                return out
            # The windows in a second query: a join would scan every window of the run, while
            # a list of ids is answered from the window_id index.
            wanted = sorted(set(rows.column("window_id").to_pylist()))
            windows = _arrow(
                cur,
                "SELECT window_id, text, spans, doc_id FROM windows "
                "WHERE run_id = ? AND window_id IN (SELECT unnest(?::BIGINT[]))",
                [run_id, wanted],
            )
        found = {
            w["window_id"]: (w["text"], spans, w["doc_id"] or "")
            for w, spans in zip(
                windows.drop_columns("spans").to_pylist(), _cells(windows["spans"], 2), strict=True
            )
        }
        acts = _cells(rows["acts"])
        for r, act in zip(rows.drop_columns("acts").to_pylist(), acts, strict=True):
            text, spans, doc_id = found[r["window_id"]]
            out[r["feature_id"]].append(
                Context(
                    text=text,
                    spans=_array(spans, np.int64, 2)[_span_range(r)],
                    acts=_array(act, np.float32),
                    window_id=int(r["window_id"]),
                    doc_id=doc_id,
                    kind=r["kind"],
                    rank=int(r["rank"]),
                    quantile=r["quantile"],
                )
            )
        return out

    def window_texts(self, run_id: str, limit: int | None = None) -> list[str]:
        """Texts of the run's windows in id order (background text for explainers)."""
        sql = "SELECT text FROM windows WHERE run_id = ? ORDER BY window_id"
        params: list[Any] = [run_id]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._cursor() as cur:
            return [r[0] for r in cur.execute(sql, params).fetchall()]

    def window(self, run_id: str, window_id: int) -> dict[str, Any]:
        """One window: text, aligned spans [k, 2], and each model's token ids and offsets."""
        found = self.windows(run_id, [window_id])
        if int(window_id) not in found:
            raise StoreDBError(f"run {run_id!r} has no window {window_id}")
        return found[int(window_id)]

    def windows(self, run_id: str, window_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Several windows in one query, {window_id: window as `window` gives it}; ids the run
        does not have are left out."""
        ids = sorted({int(w) for w in window_ids})
        sql = (
            "SELECT * FROM windows WHERE run_id = ? "
            "AND window_id IN (SELECT unnest(?::BIGINT[])) ORDER BY window_id"
        )
        with self._cursor() as cur:
            table = _arrow(cur, sql, [run_id, ids])
            if not table.num_rows:
                self._require_run(cur, run_id)
        lists = schema.LIST_COLUMNS["windows"]
        rows = table.drop_columns(list(lists)).to_pylist()
        for column, depth in lists.items():
            width = 2 if depth == 2 else None
            for row, cell in zip(rows, _cells(table[column], width), strict=True):
                row[column] = _array(cell, np.int64, width)
        return {row["window_id"]: row for row in rows}

    # neighbours and matches -------------------------------------------------------------

    def write_neighbors(self, run_id: str, df: pd.DataFrame) -> int:
        """Replace the run's decoder-cosine neighbours with the frame's rows."""
        return self._replace("neighbors", {"run_id": run_id}, df, '"feature_id", "space", "rank"')

    def neighbors(
        self, run_id: str, feature_id: int, space: str | None = None, limit: int | None = 10
    ) -> pd.DataFrame:
        """A feature's nearest features by decoder cosine: up to `limit` per decoder space."""
        where, params = ["run_id = ?", "feature_id = ?"], [run_id, int(feature_id)]
        if space is not None:
            where.append("space = ?")
            params.append(_choices(space, schema.SPACES, "space")[0])
        sql = f"SELECT * FROM neighbors WHERE {' AND '.join(where)}"
        if limit is not None:
            params.append(_count(limit))
            sql += " QUALIFY row_number() OVER (PARTITION BY space ORDER BY rank) <= ?"
        return self._frame(sql + " ORDER BY space, rank", params, run_id, "neighbors")

    def write_matches(self, run_id: str, other_run_id: str, df: pd.DataFrame) -> int:
        """Replace the feature matches from one run to another with the frame's rows."""
        keys = {"run_id": run_id, "other_run_id": other_run_id}
        return self._replace("matches", keys, df, '"feature_id", "cosine" DESC')

    def matches(
        self, run_id: str, other_run_id: str, feature_id: int | None = None
    ) -> pd.DataFrame:
        """Feature matches from one run to another (or of one feature), best first for each
        feature."""
        where, params = _equals(
            "matches", run_id, other_run_id=other_run_id, feature_id=_int(feature_id)
        )
        sql = f"SELECT * FROM matches WHERE {where} ORDER BY feature_id, cosine DESC"
        return self._frame(sql, params, run_id, "matches")

    # explanations and scores ------------------------------------------------------------

    def add_explanation(
        self,
        run_id: str,
        feature_id: int,
        *,
        explainer: str,
        prompt_version: str,
        explanation: str,
        harmful: bool | None = None,
        harmful_reason: str | None = None,
        raw: str | None = None,
        parsed: bool = True,
    ) -> int:
        """Record an explanation of a feature; return its id."""
        return self._insert_row(
            "explanations",
            {
                "run_id": run_id,
                "feature_id": int(feature_id),
                "explainer": explainer,
                "prompt_version": prompt_version,
                "explanation": explanation,
                "harmful": None if harmful is None else bool(harmful),
                "harmful_reason": harmful_reason,
                "raw": raw,
                "parsed": bool(parsed),
                "created_at": _now(),
            },
        )

    def add_explanations(self, run_id: str, df: pd.DataFrame) -> list[int]:
        """Record many explanations at once (columns as `add_explanation`'s arguments, one row
        each); return their ids in the frame's order."""
        if "parsed" not in df.columns:
            df = df.assign(parsed=True)
        return self._append("explanations", run_id, df)

    def explanations(
        self,
        run_id: str,
        feature_id: int | None = None,
        explainer: str | None = None,
        latest: bool = True,
    ) -> pd.DataFrame:
        """Explanations of the run's features; with `latest`, only the newest per feature
        and explainer."""
        where, params = _equals(
            "explanations", run_id, feature_id=_int(feature_id), explainer=explainer
        )
        sql = f"SELECT * FROM explanations WHERE {where}"
        if latest:
            sql += (
                " QUALIFY row_number() OVER "
                "(PARTITION BY feature_id, explainer ORDER BY explanation_id DESC) = 1"
            )
        sql += " ORDER BY feature_id, explanation_id"
        return self._frame(sql, params, run_id, "explanations")

    def explained_features(
        self, run_id: str, explainer: str, prompt_version: str, parsed_only: bool = False
    ) -> set[int]:
        """Features that already have an explanation from this explainer and prompt."""
        sql = (
            "SELECT DISTINCT feature_id FROM explanations WHERE run_id = ? AND explainer = ? "
            "AND prompt_version IS NOT DISTINCT FROM ? AND (parsed OR NOT ?)"
        )
        with self._cursor() as cur:
            rows = cur.execute(sql, [run_id, explainer, prompt_version, parsed_only]).fetchall()
        return {int(r[0]) for r in rows}

    def add_score(
        self,
        run_id: str,
        feature_id: int,
        *,
        explanation_id: int | None = None,
        judge: str,
        prompt_version: str,
        metric: str = DETECTION,
        value: float | None,
        n_examples: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Record a judge's score of an explanation (or, with no explanation id, of the feature
        itself, such as its exclusivity); return its id. A value of None: the judge gave none."""
        return self._insert_row(
            "scores",
            {
                "run_id": run_id,
                "feature_id": int(feature_id),
                "explanation_id": None if explanation_id is None else int(explanation_id),
                "judge": judge,
                "prompt_version": prompt_version,
                "metric": metric,
                "value": None if value is None else float(value),
                "n_examples": _int(n_examples),
                "details": _dumps(details, "details"),
                "created_at": _now(),
            },
        )

    def add_scores(self, run_id: str, df: pd.DataFrame) -> list[int]:
        """Record many scores at once (columns as `add_score`'s arguments, `details` as dicts);
        return their ids in the frame's order."""
        return self._append("scores", run_id, df)

    def scores(
        self,
        run_id: str,
        feature_id: int | None = None,
        judge: str | None = None,
        metric: str | None = None,
    ) -> pd.DataFrame:
        """Scores of the run's explanations, oldest first, details decoded."""
        where, params = _equals(
            "scores", run_id, feature_id=_int(feature_id), judge=judge, metric=metric
        )
        sql = f"SELECT * FROM scores WHERE {where} ORDER BY feature_id, score_id"
        return self._frame(sql, params, run_id, "scores")

    def scored_explanations(
        self, run_id: str, judge: str, prompt_version: str, metric: str = DETECTION
    ) -> set[int]:
        """Explanations already scored by this judge and prompt (for resumable scoring)."""
        sql = (
            "SELECT DISTINCT explanation_id FROM scores WHERE run_id = ? AND judge = ? "
            "AND prompt_version IS NOT DISTINCT FROM ? AND metric = ? "
            "AND explanation_id IS NOT NULL"
        )
        with self._cursor() as cur:
            rows = cur.execute(sql, [run_id, judge, prompt_version, metric]).fetchall()
        return {int(r[0]) for r in rows}

    # steering and evaluations -----------------------------------------------------------

    def add_steering_sample(
        self,
        run_id: str,
        feature_id: int,
        *,
        model: str,
        prompt: str,
        alpha: float,
        s_max: float | None,
        seed: int | None,
        temperature: float,
        max_new_tokens: int,
        baseline: str,
        steered: str,
        transfer: dict[str, Any] | None = None,
        author: str = "",
    ) -> int:
        """Record one baseline-versus-steered generation; return its id."""
        return self._insert_row(
            "steering_samples",
            {
                "run_id": run_id,
                "feature_id": int(feature_id),
                "model": _choices(model, schema.MODELS, "model")[0],
                "prompt": prompt,
                "alpha": float(alpha),
                "s_max": None if s_max is None else float(s_max),
                "seed": None if seed is None else int(seed),
                "temperature": float(temperature),
                "max_new_tokens": int(max_new_tokens),
                "baseline": baseline,
                "steered": steered,
                "transfer": _dumps(transfer, "transfer"),
                "created_at": _now(),
                "author": author,
            },
        )

    def steering_samples(self, run_id: str, feature_id: int | None = None) -> pd.DataFrame:
        """Saved steering samples, oldest first, transfer decoded."""
        where, params = _equals("steering_samples", run_id, feature_id=_int(feature_id))
        sql = f"SELECT * FROM steering_samples WHERE {where} ORDER BY sample_id"
        return self._frame(sql, params, run_id, "steering_samples")

    def add_evaluation(
        self,
        run_id: str,
        *,
        kind: str,
        config: dict[str, Any],
        result: dict[str, Any],
        feature_id: int | None = None,
    ) -> int:
        """Record an evaluation (of the run, or of one feature); return its id."""
        return self._insert_row(
            "evaluations",
            {
                "run_id": run_id,
                "feature_id": None if feature_id is None else int(feature_id),
                "kind": kind,
                "config": _dumps(config, "config"),
                "result": _dumps(result, "result"),
                "created_at": _now(),
            },
        )

    def evaluations(
        self, run_id: str, kind: str | None = None, feature_id: int | None = None
    ) -> pd.DataFrame:
        """Evaluations of the run, oldest first, config and result decoded."""
        where, params = _equals("evaluations", run_id, kind=kind, feature_id=_int(feature_id))
        sql = f"SELECT * FROM evaluations WHERE {where} ORDER BY eval_id"
        return self._frame(sql, params, run_id, "evaluations")

    # triage -----------------------------------------------------------------------------

    def set_triage(
        self, run_id: str, feature_id: int, status: str, notes: str = "", reviewer: str = ""
    ) -> None:
        """Set a feature's triage status, keeping every change in the history."""
        _choices(status, schema.TRIAGE_STATUSES, "triage status")
        values = [run_id, int(feature_id), status, notes or "", reviewer or "", _now()]
        with self._write() as cur:
            self._require_feature(cur, run_id, feature_id)
            cur.execute(
                "INSERT INTO triage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, feature_id) "
                "DO UPDATE SET status = excluded.status, notes = excluded.notes, "
                "reviewer = excluded.reviewer, updated_at = excluded.updated_at",
                values,
            )
            cur.execute(
                "INSERT INTO triage_history (run_id, feature_id, status, notes, reviewer, "
                "changed_at) VALUES (?, ?, ?, ?, ?, ?)",
                values,
            )

    def triage(self, run_id: str) -> pd.DataFrame:
        """The current triage status of the run's reviewed features."""
        sql = "SELECT * FROM triage WHERE run_id = ? ORDER BY feature_id"
        return self._frame(sql, [run_id], run_id, "triage")

    def triage_history(self, run_id: str, feature_id: int | None = None) -> pd.DataFrame:
        """Every triage change of the run (or one feature), oldest first."""
        where, params = _equals("triage_history", run_id, feature_id=_int(feature_id))
        sql = f"SELECT * FROM triage_history WHERE {where} ORDER BY history_id"
        return self._frame(sql, params, run_id, "triage_history")

    # the dashboard's table and exports --------------------------------------------------

    def feature_table(
        self,
        run_id: str,
        partition: str | Sequence[str] | None = None,
        category: str | Sequence[str] | None = None,
        harmful: bool | None = None,
        status: str | Sequence[str] | None = None,
        min_score: float | None = None,
        min_exclusivity: float | None = None,
        max_exclusivity: float | None = None,
        min_density: float | None = None,
        max_density: float | None = None,
        search: str | None = None,
        explainer: str | None = None,
        dead: bool | None = None,
        feature_ids: Iterable[int] | None = None,
        order_by: str = "feature_id",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> pd.DataFrame:
        """One row per feature: statistics, category, latest explanation, its detection score,
        the feature's exclusivity score, triage.

        The explanation is the newest (of `explainer`, if given); the score is the newest
        detection score of that explanation; the exclusivity is the newest exclusivity score of
        the feature (NULL when the judge gave none); a feature never triaged is 'unreviewed'.
        Score, exclusivity and density bounds are inclusive and drop rows without a value.
        `partition` and `category` keep the features in any of the given partitions or
        categories (`engine.analysis.categories`: a shared feature past the relative-norm
        bounds is a_leaning or b_leaning, not shared).
        `search` matches explanation text, case-insensitively, as a plain substring. `limit`
        and `offset` give one page of the sorted rows (`feature_count` counts them all).
        """
        sql, params = _feature_table_query(
            run_id, partition=partition, category=category, harmful=harmful, status=status,
            min_score=min_score, min_exclusivity=min_exclusivity, max_exclusivity=max_exclusivity,
            min_density=min_density, max_density=max_density, search=search,
            explainer=explainer, dead=dead, feature_ids=feature_ids, order_by=order_by,
            descending=descending, limit=limit, offset=offset,
        )  # fmt: skip
        return self._frame(sql, params, run_id, "features")

    def feature_count(self, run_id: str, **filters: Any) -> int:
        """How many features `feature_table` returns with these filters (no order or page)."""
        _check_filters(filters, FEATURE_FILTERS)
        body, params = _feature_filter(run_id, **filters)
        with self._cursor() as cur:
            (count,) = cur.execute(f"SELECT count(*) {body}", params).fetchone()
            if not count:
                self._require_run(cur, run_id)
        return int(count)

    def export(
        self, what: str, path: str | Path, *, run_id: str | None = None, **filters: Any
    ) -> Path:
        """Write a table (rows of `run_id`, equal to `filters`) or the feature table (with
        `feature_table`'s filters) to a .parquet or .csv file; return its path."""
        path = Path(path)
        options = EXPORT_FORMATS.get(path.suffix.lower())
        if options is None:
            raise StoreDBError(
                f"cannot export to {path}: name a file ending in {' or '.join(EXPORT_FORMATS)}"
            )
        if what == "feature_table":
            if run_id is None:
                raise StoreDBError("exporting the feature table needs run_id=...")
            _check_filters(filters, FEATURE_TABLE_FILTERS)
            sql, params = _feature_table_query(run_id, **filters)
        else:
            if run_id is not None:
                filters = {"run_id": run_id, **filters}
            sql, params = _table_query(what, filters)
        if path.suffix.lower() == ".parquet":
            # Marks the file as an export of `what`, so a later export may replace it.
            options += f", KV_METADATA {{{EXPORT_MARK}: '{what}'}}"
        with self._cursor() as cur:
            if run_id is not None:
                self._require_run(cur, run_id)  # not a header-only file for a typo
            columns = [
                d[0] for d in cur.execute(f"SELECT * FROM ({sql}) LIMIT 0", params).description
            ]
            _check_replaceable(cur, path, what, columns)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written beside the target and renamed: a failed export leaves the old file.
            tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
            try:
                cur.execute(f"COPY ({sql}) TO ? ({options})", [*params, str(tmp)])
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def parse_filters(self, what: str, texts: dict[str, str]) -> dict[str, Any]:
        """Filters given as text (`modeldiff export --where column=value`) converted to the
        type of their column or feature-table filter; a value that does not parse is refused."""
        if what == "feature_table":
            types = FEATURE_TABLE_FILTER_TYPES
        else:
            with self._cursor() as cur:
                rows = cur.execute(
                    "SELECT column_name, data_type FROM duckdb_columns() "
                    "WHERE database_name = current_database() AND schema_name = 'main' "
                    "AND table_name = ?",
                    [what],
                ).fetchall()
            types = {name: _column_kind(kind) for name, kind in rows}
        # Unknown names pass through unchanged: the export names the valid ones.
        return {
            name: _parse_value(name, text, types[name]) if name in types else text
            for name, text in texts.items()
        }


# -- helpers that need no instance -------------------------------------------------------


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# DuckDB installs and loads extensions on demand: opening a SQLite file as a database
# would download the sqlite extension from the network. A results file needs none.
_NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _connect(
    path: str, read_only: bool, create: bool = True, wait: float = 0.0, check: bool = True
) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, with clear errors for the usual mistakes; wait up to `wait`
    seconds while another connection holds the file; `check` reads the catalog."""
    if path == ":memory:":
        if read_only:
            raise StoreDBError("an in-memory database cannot be read-only")
        return duckdb.connect(path, config=_NO_EXTENSIONS)
    file = Path(path)
    _check_file(file, read_only or not create)
    if not read_only:
        file.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(wait, 0.0)
    delay = 0.02
    while True:
        try:
            conn = duckdb.connect(path, read_only=read_only, config=_NO_EXTENSIONS)
            break
        except (duckdb.IOException, duckdb.ConnectionException) as err:
            if not _is_lock_conflict(err) or time.monotonic() + delay > deadline:
                raise StoreDBError(_open_error(file, err, wait)) from None
            # Jitter, so that two waiting processes do not retry in step.
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.5)
        except duckdb.Error as err:
            raise StoreDBError(_unreadable(file, err)) from None
    if check:
        try:
            # Reading the catalog reads its blocks: a damaged file fails here, not half-way
            # through a command.
            conn.execute("SELECT count(*) FROM duckdb_columns()").fetchall()
        except duckdb.Error as err:
            conn.close()
            raise StoreDBError(_unreadable(file, err)) from None
    return conn


# How DuckDB reports a file held by another process (a file lock), or by this process with
# other settings (a read-only connection while this one writes, or the reverse).
_LOCK_CONFLICT = ("Could not set lock", "Conflicting lock", "different configuration")


def _is_lock_conflict(err: BaseException) -> bool:
    return any(sign in str(err) for sign in _LOCK_CONFLICT)


def _open_error(file: Path, err: BaseException, wait: float) -> str:
    """The message for a file DuckDB could not open."""
    if _is_damage(err):
        return _damaged(file, err)
    if isinstance(err, duckdb.ConnectionException):
        return (
            f"cannot open {file}: {_first_line(err)}. This process still had it open with "
            f"read_only set differently after {wait:g} s; share one Database per file"
        )
    waited = f" after waiting {wait:g} s" if wait > 0 and _is_lock_conflict(err) else ""
    return (
        f"cannot open {file}{waited}: {_first_line(err)}. DuckDB lets one process write a "
        "file, or several only read it: stop the other process (an analysis or a stuck "
        "command) or open both read-only"
    )


def _check_file(file: Path, must_exist: bool) -> None:
    """Refuse, saying what it is, a path that is not a DuckDB file (a directory, a SQLite
    file), and a missing one unless it may be created."""
    if file.is_dir():
        raise StoreDBError(
            f"{file} is a directory, not a results database; give the path of a .duckdb file "
            "(`modeldiff analyze --db FILE` creates one)"
        )
    if not file.exists():
        if must_exist:
            raise StoreDBError(
                f"no results database at {file}; run `modeldiff analyze` to create one, "
                "or check the path"
            )
        return
    try:
        with file.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as err:
        raise StoreDBError(f"cannot open {file}: {err.strerror or err}") from None
    if head == _SQLITE_MAGIC:
        raise StoreDBError(
            f"{file} is a SQLite database, not a DuckDB results database; give the .duckdb "
            "file `modeldiff analyze` wrote"
        )


# How DuckDB reports a damaged file (a truncated one, a block failing its checksum).
_DAMAGE = ("Could not read enough bytes", "Corrupt database file", "not a valid DuckDB database")


def _is_damage(err: BaseException) -> bool:
    return any(sign in str(err) for sign in _DAMAGE)


def _unreadable(file: Path, err: BaseException) -> str:
    """The message for a file DuckDB opened but could not read."""
    return _damaged(file, err) if _is_damage(err) else f"cannot open {file}: {_first_line(err)}"


def _damaged(file: Path, err: BaseException) -> str:
    """The message for a results file DuckDB cannot read."""
    return (
        f"cannot open {file}: {_first_line(err)}. The file is damaged or not a DuckDB "
        "database: restore it from a backup, or move it aside and run `modeldiff analyze` "
        "again to rebuild the results (explanations, scores and triage saved in it are lost)"
    )


def _file_version(cur: Cursor, path: Path) -> int:
    """The schema version a file records; 0 for an empty file."""
    tables = {
        r[0]
        for r in cur.execute(
            "SELECT table_name FROM duckdb_tables() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall()
    }
    if "meta" not in tables:
        if tables:
            raise StoreDBError(
                f"{path} is a DuckDB file but not a modeldiff results database (it has tables "
                f"{', '.join(sorted(tables)[:5])} and no meta table); choose another path"
            )
        return 0
    row = cur.execute("SELECT value FROM meta WHERE key = ?", ["schema_version"]).fetchone()
    if row is None:
        raise StoreDBError(f"{path} has no schema version in its meta table; it is damaged")
    return int(row[0])


def _span_range(row: dict[str, Any]) -> slice:
    """The window spans a context row covers."""
    end = row["span_end"]
    return slice(int(row["span_start"]), None if end is None or end != end else int(end))


def _check_contexts(cur: Cursor, run_id: str) -> None:
    """Raise unless every context of the run names a window of it and has one activation per
    aligned span of that window."""
    orphan, mismatch = cur.execute(
        "SELECT count(*) FILTER (WHERE w.window_id IS NULL), "
        "count(*) FILTER (WHERE c.span_start < 0 OR coalesce(c.span_end, len(w.spans)) > "
        "len(w.spans) OR len(c.acts) != coalesce(c.span_end, len(w.spans)) - c.span_start) "
        "FROM contexts c LEFT JOIN windows w ON w.run_id = c.run_id AND w.window_id = c.window_id "
        "WHERE c.run_id = ?",
        [run_id],
    ).fetchone()
    if orphan:
        raise StoreDBError(
            f"{orphan} contexts of run {run_id!r} name windows that are not in the database; "
            "write the windows (write_windows) before the contexts"
        )
    if mismatch:
        raise StoreDBError(
            f"{mismatch} contexts of run {run_id!r} have a span range outside their window or a "
            "number of activations different from the spans they cover; give one activation "
            "per span in [span_start, span_end)"
        )


def _table_query(table: str, filters: dict[str, Any]) -> tuple[str, list[Any]]:
    """A SELECT of a whole table with equality filters on allow-listed columns."""
    if table not in schema.COLUMNS:
        valid = ", ".join(["feature_table", *schema.COLUMNS])
        raise StoreDBError(f"cannot export {table!r}; choose one of: {valid}")
    unknown = sorted(set(filters) - set(schema.COLUMNS[table]))
    if unknown:
        raise StoreDBError(
            f"table {table} has no column(s) {', '.join(unknown)} to filter on; "
            f"valid: {', '.join(schema.COLUMNS[table])}"
        )
    where = [f"{_ident(table, c)} = ?" for c in filters]
    sql = f"SELECT * FROM {_ident(table)}" + (f" WHERE {' AND '.join(where)}" if where else "")
    return sql, list(filters.values())


def _column_kind(data_type: str) -> str:
    """How a filter value for a column of this DuckDB type is parsed."""
    if data_type == "BOOLEAN":
        return "bool"
    if data_type in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UBIGINT", "UINTEGER"):
        return "int"
    if data_type in ("FLOAT", "DOUBLE", "REAL") or data_type.startswith("DECIMAL"):
        return "float"
    if data_type == "VARCHAR" or data_type.startswith(("TIMESTAMP", "DATE")):
        return "str"  # DuckDB casts text to a timestamp in the comparison
    return f"unfilterable {data_type}"


def _parse_value(name: str, text: str, kind: str) -> Any:
    """A filter's text as a value of `kind`, or a StoreDBError that says what was expected."""
    value = text.strip()
    try:
        if kind == "bool":
            if value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if kind == "int":
            return int(value)
        if kind == "float":
            number = float(value)
            if math.isnan(number):
                raise ValueError
            return number
        if kind == "ints":
            return [int(v) for v in value.split(",")]
        if kind == "list":
            names = [v.strip() for v in value.split(",") if v.strip()]
            if not names:
                raise ValueError
            return names
    except ValueError:
        wanted = {
            "bool": "true or false", "int": "an integer", "float": "a number",
            "ints": "integers separated by commas", "list": "names separated by commas",
        }[kind]  # fmt: skip
        raise StoreDBError(f"filter {name}={text!r}: expected {wanted}") from None
    if kind.startswith("unfilterable"):
        raise StoreDBError(f"cannot filter on {name}: its values are {kind.split()[1]}")
    return text


def _check_replaceable(cur: Cursor, path: Path, what: str, columns: list[str]) -> None:
    """Refuse to replace an existing file unless it is an earlier export of the same table
    (a Parquet file marked as one, a CSV file whose header is these columns)."""
    if path.is_dir():
        raise StoreDBError(f"cannot export to {path}: it is a directory; name a file")
    if not path.exists():
        return
    ours = False
    if path.suffix.lower() == ".parquet":
        try:
            rows = cur.execute(
                "SELECT key::VARCHAR, value::VARCHAR FROM parquet_kv_metadata(?)", [str(path)]
            ).fetchall()
            ours = (EXPORT_MARK, what) in rows
        except duckdb.Error:
            ours = False  # not a Parquet file
    else:
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                ours = next(csv.reader(fh), None) == columns
        except (OSError, UnicodeDecodeError, csv.Error):
            ours = False
    if not ours:
        raise StoreDBError(
            f"refusing to replace {path}: it is not an earlier `{what}` export; remove it "
            "yourself or choose another --out"
        )


def _check_filters(filters: dict[str, Any], valid: Sequence[str]) -> None:
    """Raise unless every filter name is a valid one."""
    unknown = sorted(set(filters) - set(valid))
    if unknown:
        raise StoreDBError(
            f"unknown feature_table filter(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )


def _latest_explanations(restrict: str = "") -> str:
    """SQL: each feature's newest explanation id (of explainer ?, when not NULL)."""
    # A grouped max of ids, not a window over whole rows: only ids travel through the joins.
    return (
        "SELECT feature_id, max(explanation_id) AS explanation_id FROM explanations "
        f"WHERE run_id = ? AND (?::VARCHAR IS NULL OR explainer = ?){restrict} GROUP BY feature_id"
    )


def _latest_scores(key: str, restrict: str = "") -> str:
    """SQL: the newest score id of metric ? per `key` (explanation_id or feature_id)."""
    return (
        f"SELECT {key}, max(score_id) AS score_id FROM scores "
        f"WHERE run_id = ? AND metric = ? AND {key} IS NOT NULL{restrict} GROUP BY {key}"
    )


def _feature_filter(
    run_id: str,
    partition: str | Sequence[str] | None = None,
    category: str | Sequence[str] | None = None,
    harmful: bool | None = None,
    status: str | Sequence[str] | None = None,
    min_score: float | None = None,
    min_exclusivity: float | None = None,
    max_exclusivity: float | None = None,
    min_density: float | None = None,
    max_density: float | None = None,
    search: str | None = None,
    explainer: str | None = None,
    dead: bool | None = None,
    feature_ids: Iterable[int] | None = None,
    sort: str = "feature_id",
) -> tuple[str, list[Any]]:
    """SQL from `features f` to its WHERE clause that keeps the filtered features, joining
    only what the filters and the sort key need; and its parameters."""
    where, params, need = _feature_where(
        run_id, partition, category, harmful, status, min_score, min_exclusivity,
        max_exclusivity, min_density, max_density, search, dead, feature_ids,
    )  # fmt: skip
    if sort in TABLE_SORT_KEYS:  # "sc.value" needs the alias sc
        need.add(TABLE_SORT_KEYS[sort].split(".")[0])
    joins: list[str] = []
    join_params: list[Any] = []
    if need & {"ex", "sc"}:
        joins.append(
            f"LEFT JOIN ({_latest_explanations()}) e ON e.feature_id = f.feature_id "
            "LEFT JOIN explanations ex ON ex.explanation_id = e.explanation_id"
        )
        join_params += [run_id, explainer, explainer]
    if "sc" in need:
        joins.append(
            f"LEFT JOIN ({_latest_scores('explanation_id')}) s "
            "ON s.explanation_id = e.explanation_id "
            "LEFT JOIN scores sc ON sc.score_id = s.score_id"
        )
        join_params += [run_id, DETECTION]
    if "xs" in need:
        joins.append(
            f"LEFT JOIN ({_latest_scores('feature_id')}) x ON x.feature_id = f.feature_id "
            "LEFT JOIN scores xs ON xs.score_id = x.score_id"
        )
        join_params += [run_id, EXCLUSIVITY]
    if "t" in need:
        joins.append("LEFT JOIN triage t ON t.run_id = f.run_id AND t.feature_id = f.feature_id")
    sql = f"FROM features f {' '.join(joins)} WHERE {' AND '.join(where)}"
    return sql, [*join_params, *params]


def _feature_where(
    run_id: str,
    partition: str | Sequence[str] | None,
    category: str | Sequence[str] | None,
    harmful: bool | None,
    status: str | Sequence[str] | None,
    min_score: float | None,
    min_exclusivity: float | None,
    max_exclusivity: float | None,
    min_density: float | None,
    max_density: float | None,
    search: str | None,
    dead: bool | None,
    feature_ids: Iterable[int] | None,
) -> tuple[list[str], list[Any], set[str]]:
    """The feature table's WHERE conditions, their parameters, and the aliases they use
    (ex: latest explanation, sc: its detection score, xs: exclusivity score, t: triage)."""
    where, params, need = ["f.run_id = ?"], [run_id], set()
    if partition is not None:
        where.append('list_contains(?::VARCHAR[], f."partition")')
        params.append(_partitions(partition))
    if category is not None:
        category_sql, category_params = _category()
        where.append(f"list_contains(?::VARCHAR[], {category_sql})")
        params += [_choices(category, schema.CATEGORIES, "category"), *category_params]
    if dead is not None:
        where.append("f.dead = ?")
        params.append(bool(dead))
    if feature_ids is not None:
        where.append("f.feature_id IN (SELECT unnest(?::INTEGER[]))")
        params.append([int(i) for i in feature_ids])
    if harmful is not None:
        where.append("ex.harmful IS NOT DISTINCT FROM ?")
        params.append(bool(harmful))
        need.add("ex")
    if status is not None:
        where.append("list_contains(?::VARCHAR[], COALESCE(t.status, 'unreviewed'))")
        params.append(_choices(status, schema.TRIAGE_STATUSES, "triage status"))
        need.add("t")
    bounds = (
        ("sc.value >= ?", min_score),
        ("xs.value >= ?", min_exclusivity),
        ("xs.value <= ?", max_exclusivity),
        ("f.density >= ?", min_density),
        ("f.density <= ?", max_density),
    )
    for condition, value in bounds:
        if value is not None:
            where.append(condition)
            params.append(float(value))
            need.add(condition.split(".")[0])
    if search:
        # Escape LIKE wildcards so the search is a plain substring.
        pattern = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("ex.explanation ILIKE ? ESCAPE '\\'")
        params.append(f"%{pattern}%")
        need.add("ex")
    return where, params, need


def _feature_table_query(
    run_id: str,
    order_by: str = "feature_id",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
    **filters: Any,
) -> tuple[str, list[Any]]:
    """The feature table's query and parameters (see `Database.feature_table`)."""
    if order_by not in schema.FEATURE_TABLE_ORDER:
        valid = ", ".join(schema.FEATURE_TABLE_ORDER)
        raise StoreDBError(f"cannot order by {order_by!r}; choose one of: {valid}")
    sort = TABLE_SORT_KEYS.get(order_by) or f"f.{_ident('features', order_by)}"
    direction = "DESC" if descending else "ASC"
    category_sql, category_params = _category()
    body, params = _feature_filter(run_id, sort=order_by, **filters)
    params = [*category_params, *params]
    page = ""
    if limit is not None or offset:
        page = f"ORDER BY sort_key {direction} NULLS LAST, feature_id"
        page += _limit(limit, params) + " OFFSET ?"
        params.append(_count(offset))
    explainer = filters.get("explainer")
    params += [run_id, explainer, explainer, run_id, DETECTION, run_id, EXCLUSIVITY, run_id]
    # First the filtered (and paged) features, with only what filters and sort need joined;
    # then the newest explanation and scores of those features, wide columns and all. For a
    # page (or chosen features) only theirs are looked up; for a whole table, looking up all
    # at once is cheaper than restricting to a large `k` (which then has to be materialized).
    few = bool(page) or filters.get("feature_ids") is not None
    in_k = " AND feature_id IN (SELECT feature_id FROM k)" if few else ""
    in_e = " AND explanation_id IN (SELECT explanation_id FROM e)" if few else ""
    sql = f"""
        WITH k AS {"MATERIALIZED " if few else ""}(
            SELECT f.* EXCLUDE (run_id, hist_counts, hist_edges), {category_sql} AS category,
                   {sort} AS sort_key
            {body} {page}
        ),
        e AS ({_latest_explanations(in_k)}),
        s AS ({_latest_scores("explanation_id", in_e)}),
        x AS ({_latest_scores("feature_id", in_k)})
        SELECT k.* EXCLUDE (sort_key),
               ex.explanation_id, ex.explainer, ex.prompt_version, ex.explanation, ex.harmful,
               ex.harmful_reason, ex.parsed, ex.created_at AS explained_at,
               sc.value AS score, sc.judge, sc.n_examples, xs.value AS exclusivity,
               COALESCE(t.status, 'unreviewed') AS status, t.notes, t.reviewer, t.updated_at
        FROM k
        LEFT JOIN e ON e.feature_id = k.feature_id
        LEFT JOIN explanations ex ON ex.explanation_id = e.explanation_id
        LEFT JOIN s ON s.explanation_id = e.explanation_id
        LEFT JOIN scores sc ON sc.score_id = s.score_id
        LEFT JOIN x ON x.feature_id = k.feature_id
        LEFT JOIN scores xs ON xs.score_id = x.score_id
        LEFT JOIN triage t ON t.run_id = ? AND t.feature_id = k.feature_id
        ORDER BY k.sort_key {direction} NULLS LAST, k.feature_id"""
    return sql, params
