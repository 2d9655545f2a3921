"""The neighbors and matches tables: each feature's nearest features by decoder cosine, and
its matches in another run."""

from __future__ import annotations

import pandas as pd

from engine.results import schema
from engine.results.clauses import _count, _equals
from engine.results.tables import Tables
from engine.results.values import _choices, _int


class NeighborsMixin(Tables):
    """Write and read feature-to-feature neighbours and cross-run matches."""

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
