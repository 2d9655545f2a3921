"""The steering_samples and evaluations tables: saved baseline-versus-steered generations,
and evaluations of a run or of one feature."""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.results import schema
from engine.results.clauses import _equals
from engine.results.tables import Tables
from engine.results.values import _choices, _dumps, _int, _now


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
