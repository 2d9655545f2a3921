"""Exports: a table, or the feature table, written to a Parquet or CSV file, with filters
given as values or as text (`modeldiff export --where column=value`)."""

from __future__ import annotations

import csv
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from engine.results import schema
from engine.results.clauses import _ident
from engine.results.connection import Cursor
from engine.results.errors import ResultsDBError
from engine.results.features_sql import FEATURE_TABLE_FILTERS, _check_filters, _feature_table_query
from engine.results.tables import Tables

EXPORT_FORMATS = {".parquet": "FORMAT parquet", ".csv": "FORMAT csv, HEADER true"}

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


class ExportMixin(Tables):
    """Export tables to files, and parse filters given as text."""

    def export(
        self, what: str, path: str | Path, *, run_id: str | None = None, **filters: Any
    ) -> Path:
        """Write a table (rows of `run_id`, equal to `filters`) or the feature table (with
        `feature_table`'s filters) to a .parquet or .csv file; return its path."""
        path = Path(path)
        options = EXPORT_FORMATS.get(path.suffix.lower())
        if options is None:
            raise ResultsDBError(
                f"cannot export to {path}: name a file ending in {' or '.join(EXPORT_FORMATS)}"
            )
        if what == "feature_table":
            if run_id is None:
                raise ResultsDBError("exporting the feature table needs run_id=...")
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
            if path.suffix.lower() == ".csv":
                sql = _spreadsheet_safe(cur, sql, params)
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


def _table_query(table: str, filters: dict[str, Any]) -> tuple[str, list[Any]]:
    """A SELECT of a whole table with equality filters on allow-listed columns."""
    if table not in schema.COLUMNS:
        valid = ", ".join(["feature_table", *schema.COLUMNS])
        raise ResultsDBError(f"cannot export {table!r}; choose one of: {valid}")
    unknown = sorted(set(filters) - set(schema.COLUMNS[table]))
    if unknown:
        raise ResultsDBError(
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
    if data_type.startswith(("TIMESTAMP", "DATE")):
        return "time"
    if data_type == "VARCHAR":
        return "str"
    return f"unfilterable {data_type}"


def _parse_value(name: str, text: str, kind: str) -> Any:
    """A filter's text as a value of `kind`, or a ResultsDBError that says what was expected."""
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
        if kind == "time":
            return datetime.fromisoformat(value)
        if kind == "list":
            names = [v.strip() for v in value.split(",") if v.strip()]
            if not names:
                raise ValueError
            return names
    except ValueError:
        wanted = {
            "bool": "true or false", "int": "an integer", "float": "a number",
            "ints": "integers separated by commas", "list": "names separated by commas",
            "time": "a date or time such as 2026-12-07 or 2026-12-07T14:30:00",
        }[kind]  # fmt: skip
        raise ResultsDBError(f"filter {name}={text!r}: expected {wanted}") from None
    if kind.startswith("unfilterable"):
        raise ResultsDBError(f"cannot filter on {name}: its values are {kind.split()[1]}")
    return text


# A text cell starting with one of these is a formula to a spreadsheet (corpus text can be
# "=HYPERLINK(...)"); a CSV export writes it after a quote, as text.
FORMULA_PATTERN = r"^[=+\-@\t\r]"


def _spreadsheet_safe(cur: Cursor, sql: str, params: list[Any]) -> str:
    """`sql` with every text column's formula-like values prefixed by a quote."""
    described = cur.execute(f"DESCRIBE SELECT * FROM ({sql})", params).fetchall()
    quote = "''''"  # the SQL literal of one quote character
    parts = []
    for name, kind, *_ in described:
        column = '"' + str(name).replace('"', '""') + '"'
        if kind == "VARCHAR":
            parts.append(
                f"CASE WHEN regexp_matches({column}, '{FORMULA_PATTERN}') "
                f"THEN {quote} || {column} ELSE {column} END AS {column}"
            )
        else:
            parts.append(column)
    return f"SELECT {', '.join(parts)} FROM ({sql})"


def _check_replaceable(cur: Cursor, path: Path, what: str, columns: list[str]) -> None:
    """Refuse to replace an existing file unless it is an earlier export of the same table
    (a Parquet file marked as one, a CSV file whose header is these columns)."""
    if path.is_dir():
        raise ResultsDBError(f"cannot export to {path}: it is a directory; name a file")
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
        raise ResultsDBError(
            f"refusing to replace {path}: it is not an earlier `{what}` export; remove it "
            "yourself or choose another --out"
        )
