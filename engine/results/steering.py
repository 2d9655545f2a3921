"""The steering_samples, evaluations and calibration tables: saved baseline-versus-steered
generations, evaluations of a run or of one feature, exclusivity scores with their interval,
and the exclusivity calibration (paper Figure 5) of a run."""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.results import schema
from engine.results.clauses import _equals, _ident
from engine.results.tables import Tables
from engine.results.values import _choices, _dumps, _int, _now

EXCLUSIVITY = "exclusivity"


class SteeringMixin(Tables):
    """Record steering samples and evaluations and read them back."""

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

    def add_exclusivity_score(
        self,
        run_id: str,
        feature_id: int,
        *,
        judge: str,
        prompt_version: str,
        value: float | None,
        ci_low: float | None,
        ci_high: float | None,
        n_examples: int | None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Record a feature's exclusivity score (the mean over prompts x samples) with its
        95% interval; return its id. A value of None: filtered out or not judged."""
        return self._insert_row(
            "scores",
            {
                "run_id": run_id,
                "feature_id": int(feature_id),
                "explanation_id": None,
                "judge": judge,
                "prompt_version": prompt_version,
                "metric": EXCLUSIVITY,
                "value": _float(value),
                "ci_low": _float(ci_low),
                "ci_high": _float(ci_high),
                "n_examples": _int(n_examples),
                "details": _dumps(details, "details"),
                "created_at": _now(),
            },
        )

    def add_calibration(
        self,
        run_id: str,
        *,
        protocol: str,
        judge: str,
        category: str,
        item: int,
        feature_id: int | None,
        value: float | None,
        ci_low: float | None,
        ci_high: float | None,
        unfiltered: float | None,
        interpretability: float | None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Record one scored item (a feature, or a random direction) of a calibration
        protocol; return its id."""
        row = {
            "run_id": run_id,
            "protocol": protocol,
            "judge": judge,
            "category": category,
            "item": int(item),
            "feature_id": _int(feature_id),
            "value": _float(value),
            "ci_low": _float(ci_low),
            "ci_high": _float(ci_high),
            "unfiltered": _float(unfiltered),
            "interpretability": _float(interpretability),
            "details": _dumps(details, "details"),
            "created_at": _now(),
        }
        names = ", ".join(_ident("calibration", c) for c in row)
        marks = ", ".join("?" for _ in row)
        sql = (
            f"INSERT INTO {_ident('calibration')} ({names}) VALUES ({marks}) "
            "RETURNING calibration_id"
        )
        with self._write() as cur:
            self._require_run(cur, run_id)
            return int(cur.execute(sql, list(row.values())).fetchone()[0])

    def calibration(
        self, run_id: str, protocol: str | None = None, judge: str | None = None
    ) -> pd.DataFrame:
        """A run's calibration items, oldest first, details decoded."""
        where, params = _equals("calibration", run_id, protocol=protocol, judge=judge)
        sql = f"SELECT * FROM calibration WHERE {where} ORDER BY calibration_id"
        return self._frame(sql, params, run_id, "calibration")


def _float(value: Any) -> float | None:
    """A number, or None for None and NaN."""
    if value is None:
        return None
    value = float(value)
    return None if value != value else value
