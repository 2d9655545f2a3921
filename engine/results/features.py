"""The features table: each feature's statistics and category, and the dashboard's feature
table (latest explanation, scores and triage joined; its SQL is in
`engine.results.features_sql`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.results import schema
from engine.results.clauses import _category, _limit, _order
from engine.results.features_sql import (
    FEATURE_FILTERS,
    _check_filters,
    _feature_filter,
    _feature_table_query,
)
from engine.results.tables import Tables
from engine.results.values import _array, _choices, _partitions, _records


class FeaturesMixin(Tables):
    """Write a run's features and read them, alone or as the feature table."""

    def write_features(self, run_id: str, df: pd.DataFrame) -> int:
        """Replace the run's feature statistics with the frame's rows; return the count."""
        return self._replace("features", {"run_id": run_id}, df, '"feature_id"')

    def features(
        self,
        run_id: str,
        partition: str | Sequence[str] | None = None,
        dead: bool | None = None,
        order_by: str = "feature_id",
        descending: bool = False,
        limit: int | None = None,
        feature_ids: Iterable[int] | None = None,
        category: str | Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The run's features with their category, filtered and ordered (list columns hold
        numpy arrays). `partition` and `category` each keep the features in any of theirs."""
        category_sql, category_params = _category()
        where, params = ["run_id = ?"], [run_id]
        if partition is not None:
            where.append('list_contains(?::VARCHAR[], "partition")')
            params.append(_partitions(partition))
        if category is not None:
            where.append(f"list_contains(?::VARCHAR[], {category_sql})")
            params += [_choices(category, schema.CATEGORIES, "category"), *category_params]
        if dead is not None:
            where.append("dead = ?")
            params.append(bool(dead))
        if feature_ids is not None:
            where.append("list_contains(?::INTEGER[], feature_id)")
            params.append([int(i) for i in feature_ids])
        order = _order(order_by, schema.FEATURE_ORDER, descending)
        sql = (
            f"SELECT *, {category_sql} AS category FROM features f "
            f"WHERE {' AND '.join(where)} ORDER BY {order}"
        )
        params = [*category_params, *params]
        sql += _limit(limit, params)
        return self._frame(sql, params, run_id, "features")

    def feature(self, run_id: str, feature_id: int) -> dict[str, Any]:
        """One feature's statistics and category as a dict (histogram as numpy arrays)."""
        category_sql, params = _category()
        sql = (
            f"SELECT *, {category_sql} AS category FROM features f "
            "WHERE run_id = ? AND feature_id = ?"
        )
        with self._cursor() as cur:
            self._require_feature(cur, run_id, feature_id)
            (row,) = _records(cur.execute(sql, [*params, run_id, int(feature_id)]))
        row["hist_counts"] = _array(row["hist_counts"], np.int64)
        row["hist_edges"] = _array(row["hist_edges"], np.float64)
        return row

    def feature_table(
        self,
        run_id: str,
        partition: str | Sequence[str] | None = None,
        category: str | Sequence[str] | None = None,
        harmful: bool | None = None,
        status: str | Sequence[str] | None = None,
        min_score: float | None = None,
        min_exclusivity: float | None = None,
        max_exclusivity: float | None = None,
        min_density: float | None = None,
        max_density: float | None = None,
        search: str | None = None,
        explainer: str | None = None,
        dead: bool | None = None,
        feature_ids: Iterable[int] | None = None,
        order_by: str = "feature_id",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> pd.DataFrame:
        """One row per feature: statistics, category, latest explanation, its detection score,
        the feature's exclusivity score, triage.

        The explanation is the newest (of `explainer`, if given); the score is the newest
        detection score of that explanation; the exclusivity is the newest exclusivity score of
        the feature (NULL when the judge gave none); a feature never triaged is 'unreviewed'.
        Score, exclusivity and density bounds are inclusive and drop rows without a value.
        `partition` and `category` keep the features in any of the given partitions or
        categories (`engine.categories`: a shared feature past the relative-norm
        bounds is a_leaning or b_leaning, not shared).
        `search` matches explanation text, case-insensitively, as a plain substring. `limit`
        and `offset` give one page of the sorted rows (`feature_count` counts them all).
        """
        sql, params = _feature_table_query(
            run_id, partition=partition, category=category, harmful=harmful, status=status,
            min_score=min_score, min_exclusivity=min_exclusivity, max_exclusivity=max_exclusivity,
            min_density=min_density, max_density=max_density, search=search,
            explainer=explainer, dead=dead, feature_ids=feature_ids, order_by=order_by,
            descending=descending, limit=limit, offset=offset,
        )  # fmt: skip
        return self._frame(sql, params, run_id, "features")

    def feature_count(self, run_id: str, **filters: Any) -> int:
        """How many features `feature_table` returns with these filters (no order or page)."""
        _check_filters(filters, FEATURE_FILTERS)
        body, params = _feature_filter(run_id, **filters)
        with self._cursor() as cur:
            (count,) = cur.execute(f"SELECT count(*) {body}", params).fetchone()
            if not count:
                self._require_run(cur, run_id)
        return int(count)
