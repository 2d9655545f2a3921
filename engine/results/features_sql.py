"""The feature table's SQL: its filters, the joins they need, and the paged query that adds
each feature's newest explanation, scores and triage (`Database.feature_table`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.results import schema
from engine.results.clauses import _category, _count, _ident, _limit
from engine.results.errors import ResultsDBError
from engine.results.explanations import DETECTION, EXCLUSIVITY
from engine.results.values import _choices, _partitions

FEATURE_FILTERS = (
    "partition", "category", "harmful", "status", "min_score", "min_exclusivity",
    "max_exclusivity", "min_density", "max_density", "search", "explainer", "dead",
    "feature_ids",
)  # fmt: skip
FEATURE_TABLE_FILTERS = (*FEATURE_FILTERS, "order_by", "descending", "limit", "offset")

# Feature-table sort keys that are not columns of `features`, as expressions of the query.
TABLE_SORT_KEYS = {"score": "sc.value", "exclusivity": "xs.value", "updated_at": "t.updated_at"}


def _check_filters(filters: dict[str, Any], valid: Sequence[str]) -> None:
    """Raise unless every filter name is a valid one."""
    unknown = sorted(set(filters) - set(valid))
    if unknown:
        raise ResultsDBError(
            f"unknown feature_table filter(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )


def _latest_explanations(restrict: str = "") -> str:
    """SQL: each feature's newest explanation id (of explainer ?, when not NULL)."""
    # A grouped max of ids, not a window over whole rows: only ids travel through the joins.
    return (
        "SELECT feature_id, max(explanation_id) AS explanation_id FROM explanations "
        f"WHERE run_id = ? AND (?::VARCHAR IS NULL OR explainer = ?){restrict} GROUP BY feature_id"
    )


def _latest_scores(key: str, restrict: str = "") -> str:
    """SQL: the newest score id of metric ? per `key` (explanation_id or feature_id)."""
    return (
        f"SELECT {key}, max(score_id) AS score_id FROM scores "
        f"WHERE run_id = ? AND metric = ? AND {key} IS NOT NULL{restrict} GROUP BY {key}"
    )


def _feature_filter(
    run_id: str, explainer: str | None = None, sort: str = "feature_id", **filters: Any
) -> tuple[str, list[Any]]:
    """SQL from `features f` to its WHERE clause that keeps the filtered features, joining
    only what the filters and the sort key need; and its parameters. `filters` are those of
    `Database.feature_table` (FEATURE_FILTERS); `explainer` picks whose explanations count."""
    where, params, need = _feature_where(run_id, filters)
    if sort in TABLE_SORT_KEYS:  # "sc.value" needs the alias sc
        need.add(TABLE_SORT_KEYS[sort].split(".")[0])
    joins: list[str] = []
    join_params: list[Any] = []
    if need & {"ex", "sc"}:
        joins.append(
            f"LEFT JOIN ({_latest_explanations()}) e ON e.feature_id = f.feature_id "
            "LEFT JOIN explanations ex ON ex.explanation_id = e.explanation_id"
        )
        join_params += [run_id, explainer, explainer]
    if "sc" in need:
        joins.append(
            f"LEFT JOIN ({_latest_scores('explanation_id')}) s "
            "ON s.explanation_id = e.explanation_id "
            "LEFT JOIN scores sc ON sc.score_id = s.score_id"
        )
        join_params += [run_id, DETECTION]
    if "xs" in need:
        joins.append(
            f"LEFT JOIN ({_latest_scores('feature_id')}) x ON x.feature_id = f.feature_id "
            "LEFT JOIN scores xs ON xs.score_id = x.score_id"
        )
        join_params += [run_id, EXCLUSIVITY]
    if "t" in need:
        joins.append("LEFT JOIN triage t ON t.run_id = f.run_id AND t.feature_id = f.feature_id")
    sql = f"FROM features f {' '.join(joins)} WHERE {' AND '.join(where)}"
    return sql, [*join_params, *params]


def _feature_where(run_id: str, filters: dict[str, Any]) -> tuple[list[str], list[Any], set[str]]:
    """The feature table's WHERE conditions, their parameters, and the aliases they use
    (ex: latest explanation, sc: its detection score, xs: exclusivity score, t: triage).
    `filters` maps FEATURE_FILTERS names (but `explainer`) to values; absent means None."""
    where, params, need = ["f.run_id = ?"], [run_id], set()
    if (partition := filters.get("partition")) is not None:
        where.append('list_contains(?::VARCHAR[], f."partition")')
        params.append(_partitions(partition))
    if (category := filters.get("category")) is not None:
        category_sql, category_params = _category()
        where.append(f"list_contains(?::VARCHAR[], {category_sql})")
        params += [_choices(category, schema.CATEGORIES, "category"), *category_params]
    if (dead := filters.get("dead")) is not None:
        where.append("f.dead = ?")
        params.append(bool(dead))
    if (feature_ids := filters.get("feature_ids")) is not None:
        where.append("f.feature_id IN (SELECT unnest(?::INTEGER[]))")
        params.append([int(i) for i in feature_ids])
    if (harmful := filters.get("harmful")) is not None:
        where.append("ex.harmful IS NOT DISTINCT FROM ?")
        params.append(bool(harmful))
        need.add("ex")
    if (status := filters.get("status")) is not None:
        where.append("list_contains(?::VARCHAR[], COALESCE(t.status, 'unreviewed'))")
        params.append(_choices(status, schema.TRIAGE_STATUSES, "triage status"))
        need.add("t")
    bounds = (
        ("sc.value >= ?", filters.get("min_score")),
        ("xs.value >= ?", filters.get("min_exclusivity")),
        ("xs.value <= ?", filters.get("max_exclusivity")),
        ("f.density >= ?", filters.get("min_density")),
        ("f.density <= ?", filters.get("max_density")),
    )
    for condition, value in bounds:
        if value is not None:
            where.append(condition)
            params.append(float(value))
            need.add(condition.split(".")[0])
    if search := filters.get("search"):
        # Escape LIKE wildcards so the search is a plain substring.
        pattern = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("ex.explanation ILIKE ? ESCAPE '\\'")
        params.append(f"%{pattern}%")
        need.add("ex")
    return where, params, need


def _feature_table_query(
    run_id: str,
    order_by: str = "feature_id",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
    **filters: Any,
) -> tuple[str, list[Any]]:
    """The feature table's query and parameters (see `Database.feature_table`)."""
    if order_by not in schema.FEATURE_TABLE_ORDER:
        valid = ", ".join(schema.FEATURE_TABLE_ORDER)
        raise ResultsDBError(f"cannot order by {order_by!r}; choose one of: {valid}")
    sort = TABLE_SORT_KEYS.get(order_by) or f"f.{_ident('features', order_by)}"
    direction = "DESC" if descending else "ASC"
    category_sql, category_params = _category()
    body, params = _feature_filter(run_id, sort=order_by, **filters)
    params = [*category_params, *params]
    page = ""
    if limit is not None or offset:
        page = f"ORDER BY sort_key {direction} NULLS LAST, feature_id"
        page += _limit(limit, params) + " OFFSET ?"
        params.append(_count(offset))
    explainer = filters.get("explainer")
    params += [run_id, explainer, explainer, run_id, DETECTION, run_id, EXCLUSIVITY, run_id]
    # First the filtered (and paged) features, with only what filters and sort need joined;
    # then the newest explanation and scores of those features, wide columns and all. For a
    # page (or chosen features) only theirs are looked up; for a whole table, looking up all
    # at once is cheaper than restricting to a large `k` (which then has to be materialized).
    few = bool(page) or filters.get("feature_ids") is not None
    in_k = " AND feature_id IN (SELECT feature_id FROM k)" if few else ""
    in_e = " AND explanation_id IN (SELECT explanation_id FROM e)" if few else ""
    sql = f"""
        WITH k AS {"MATERIALIZED " if few else ""}(
            SELECT f.* EXCLUDE (run_id, hist_counts, hist_edges), {category_sql} AS category,
                   {sort} AS sort_key
            {body} {page}
        ),
        e AS ({_latest_explanations(in_k)}),
        s AS ({_latest_scores("explanation_id", in_e)}),
        x AS ({_latest_scores("feature_id", in_k)})
        SELECT k.* EXCLUDE (sort_key),
               ex.explanation_id, ex.explainer, ex.prompt_version, ex.explanation, ex.harmful,
               ex.harmful_reason, ex.parsed, ex.created_at AS explained_at,
               sc.value AS score, sc.judge, sc.n_examples, xs.value AS exclusivity,
               xs.ci_low AS exclusivity_low, xs.ci_high AS exclusivity_high,
               xs.judge AS exclusivity_judge,
               COALESCE(t.status, 'unreviewed') AS status, t.notes, t.reviewer, t.updated_at
        FROM k
        LEFT JOIN e ON e.feature_id = k.feature_id
        LEFT JOIN explanations ex ON ex.explanation_id = e.explanation_id
        LEFT JOIN s ON s.explanation_id = e.explanation_id
        LEFT JOIN scores sc ON sc.score_id = s.score_id
        LEFT JOIN x ON x.feature_id = k.feature_id
        LEFT JOIN scores xs ON xs.score_id = x.score_id
        LEFT JOIN triage t ON t.run_id = ? AND t.feature_id = k.feature_id
        ORDER BY k.sort_key {direction} NULLS LAST, k.feature_id"""
    return sql, params
