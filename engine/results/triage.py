"""The triage and triage_history tables: each feature's current review status, and every
change to it."""

from __future__ import annotations

import pandas as pd

from engine.results import schema
from engine.results.clauses import _equals
from engine.results.tables import Tables
from engine.results.values import _choices, _int, _now


class TriageMixin(Tables):
    """Set a feature's triage status and read the statuses and their history."""

    def set_triage(
        self, run_id: str, feature_id: int, status: str, notes: str = "", reviewer: str = ""
    ) -> None:
        """Set a feature's triage status, keeping every change in the history."""
        _choices(status, schema.TRIAGE_STATUSES, "triage status")
        values = [run_id, int(feature_id), status, notes or "", reviewer or "", _now()]
        with self._write() as cur:
            self._require_feature(cur, run_id, feature_id)
            # Each mark names the weights the run was analysed from (schema.WEIGHTS).
            weights = "(SELECT weights FROM runs WHERE run_id = ?)"
            cur.execute(
                "INSERT INTO triage (run_id, feature_id, status, notes, reviewer, updated_at, "
                f"weights) VALUES (?, ?, ?, ?, ?, ?, {weights}) ON CONFLICT (run_id, feature_id) "
                "DO UPDATE SET status = excluded.status, notes = excluded.notes, "
                "reviewer = excluded.reviewer, updated_at = excluded.updated_at, "
                "weights = excluded.weights",
                [*values, run_id],
            )
            cur.execute(
                "INSERT INTO triage_history (run_id, feature_id, status, notes, reviewer, "
                f"changed_at, weights) VALUES (?, ?, ?, ?, ?, ?, {weights})",
                [*values, run_id],
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
