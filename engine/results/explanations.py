"""The explanations and scores tables: what explainers said of features, and judges' scores
of those explanations (or of features themselves, such as exclusivity)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.results.clauses import _equals
from engine.results.tables import Tables
from engine.results.values import _dumps, _int, _now

# The score metrics the database itself knows: the detection score of an explanation (the
# default) and a feature's exclusivity score, both shown in the feature table.
DETECTION = "detection"
EXCLUSIVITY = "exclusivity"


class ExplanationsMixin(Tables):
    """Record explanations and scores, read them, and list what is already done (resuming)."""

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
