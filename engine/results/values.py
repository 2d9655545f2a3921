"""Values in and out of the database: JSON columns, timestamps, checked names, and query
results and frames converted through Arrow.

One concept: how a Python value becomes a column value and back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from engine import categories
from engine.results import schema
from engine.results.connection import Cursor
from engine.results.errors import ResultsDBError


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
        raise ResultsDBError(f"{what} cannot be stored as JSON: {err}") from None


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
        raise ResultsDBError(
            f"unknown {what} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}"
        )
    return values


def _int(value: Any) -> int | None:
    """An optional id as a plain int."""
    return None if value is None else int(value)


def _partitions(partition: str | Iterable[str]) -> list[str]:
    """Partition names, checked; a category name gets a hint to filter by category."""
    values = [partition] if isinstance(partition, str) else list(partition)
    leaning = [v for v in values if v in categories.LEANING]
    if leaning:
        raise ResultsDBError(
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
            raise ResultsDBError(f"column {column!r} needs {shape} per row, got shape {row.shape}")
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
