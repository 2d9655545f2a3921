"""The windows and contexts tables: the text windows a run read, and each feature's top,
quantile and random contexts within them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.contexts import Context
from engine.results import schema
from engine.results.connection import Cursor
from engine.results.errors import ResultsDBError
from engine.results.tables import Tables
from engine.results.values import _array, _arrow, _cells, _choices


class ContextsMixin(Tables):
    """Write a run's windows and contexts and read them back as `Context`s."""

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
            raise ResultsDBError(f"run {run_id!r} has no window {window_id}")
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
        raise ResultsDBError(
            f"{orphan} contexts of run {run_id!r} name windows that are not in the database; "
            "write the windows (write_windows) before the contexts"
        )
    if mismatch:
        raise ResultsDBError(
            f"{mismatch} contexts of run {run_id!r} have a span range outside their window or a "
            "number of activations different from the spans they cover; give one activation "
            "per span in [span_start, span_end)"
        )
