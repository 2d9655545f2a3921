"""The effects table: the judge-free effect measure (engine.steering.effects) of features and
of the random directions of its null, per run and settings key."""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.results import schema
from engine.results.clauses import _equals, _ident
from engine.results.tables import Tables
from engine.results.values import _choices, _dumps, _int, _now

EFFECT_KINDS = ("feature", "null", "direction")


class EffectsMixin(Tables):
    """Record effect measurements and read them back."""

    def add_effect(
        self,
        run_id: str,
        *,
        settings: str,
        kind: str,
        item: int,
        feature_id: int | None,
        source: str,
        similarity: float | None,
        exclusivity: float | None,
        z: float | None,
        percentile: float | None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Record one measured feature or direction; return its id."""
        row = {
            "run_id": run_id,
            "settings": str(settings),
            "kind": _choices(kind, EFFECT_KINDS, "kind")[0],
            "item": int(item),
            "feature_id": _int(feature_id),
            "source": _choices(source, schema.MODELS, "source")[0],
            "similarity": _float(similarity),
            "exclusivity": _float(exclusivity),
            "z": _float(z),
            "percentile": _float(percentile),
            "details": _dumps(details, "details"),
            "created_at": _now(),
        }
        names = ", ".join(_ident("effects", c) for c in row)
        marks = ", ".join("?" for _ in row)
        sql = f"INSERT INTO {_ident('effects')} ({names}) VALUES ({marks}) RETURNING effect_id"
        with self._write() as cur:
            self._require_run(cur, run_id)
            return int(cur.execute(sql, list(row.values())).fetchone()[0])

    def effects(
        self,
        run_id: str,
        settings: str | None = None,
        kind: str | None = None,
        feature_id: int | None = None,
    ) -> pd.DataFrame:
        """A run's effect measurements, oldest first, details decoded."""
        where, params = _equals(
            "effects", run_id, settings=settings, kind=kind, feature_id=_int(feature_id)
        )
        sql = f"SELECT * FROM effects WHERE {where} ORDER BY effect_id"
        return self._frame(sql, params, run_id, "effects")


def _float(value: Any) -> float | None:
    """A number, or None for None and NaN."""
    if value is None:
        return None
    value = float(value)
    return None if value != value else value
