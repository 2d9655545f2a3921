"""The runs table: one row per analysed crosscoder, with its configuration, metrics and
training history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from engine.results import schema
from engine.results.clauses import _ident
from engine.results.errors import ResultsDBError
from engine.results.tables import Tables
from engine.results.values import _arrow, _decode, _dumps, _loads, _now, _pandas, _records
from engine.run_ids import check_run_id


class RunsMixin(Tables):
    """Record runs and read them back."""

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
        weights: str | None = None,
    ) -> None:
        """Record a run, or update it (keeping its creation time) if the id exists. `history`
        is the training metrics of each logged step (`run_history` reads them back); left
        out (None), an update keeps the history already recorded. `weights` is the
        fingerprint of the crosscoder weights analysed; an update from other weights is
        refused while analyst work of the old ones exists (`check_weights`)."""
        check_run_id(run_id, ResultsDBError)
        if weights is not None:
            self.check_weights(run_id, weights)
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
        if weights is not None:
            row["weights"] = weights
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

    def check_weights(self, run_id: str, weights: str) -> None:
        """Raise ResultsDBError if the run exists, was analysed from other crosscoder weights
        (or before their fingerprint was recorded), and has analyst work (explanations,
        scores, triage, steering samples, evaluations): replacing its features would move
        that work onto different features."""
        with self._cursor() as cur:
            row = cur.execute("SELECT weights FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if row is None or row[0] == weights:
                return
            counts = {}
            for table in schema.ANALYST_TABLES:
                sql = f"SELECT count(*) FROM {_ident(table)} WHERE run_id = ?"
                (n,) = cur.execute(sql, [run_id]).fetchone()
                if n:
                    counts[table.replace("_", " ")] = n
        if not counts:
            return
        old = f"weights {row[0]}" if row[0] else "weights whose fingerprint was not recorded"
        work = ", ".join(f"{n} {table}" for table, n in counts.items())
        raise ResultsDBError(
            f"run {run_id!r} in this database was analysed from other crosscoder {old} (now "
            f"{weights}), and its {work} describe those features; analyse these weights "
            "under a new --run-id (or into another --db) so the analyst work stays with "
            "the features it was made on"
        )

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
