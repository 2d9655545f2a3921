"""Features: the run's feature table, filtered, sorted and paged by the database (one count
and one page of rows per view); selecting a row opens the feature page."""

from __future__ import annotations

import math

import streamlit as st

from dashboard import data
from dashboard.views.common import exclusivity_note
from dashboard.views.effects import effect_columns
from engine.results.schema import FEATURE_TABLE_ORDER

EXCLUSIVITY_RANGE = (1.0, 5.0)  # the exclusivity score's scale (paper B.5)
SORT_LABELS = {
    "feature_id": "feature id",
    "max_act": "max activation",
    "density": "density",
    "rel_norm": "relative decoder norm",
    "n_active": "active pairs",
    "s_max": "s_max",
    "dec_cos": "decoder cosine",
    "score": "detection score",
    "exclusivity": "exclusivity score",
    "updated_at": "last triaged",
}
COLUMNS = [
    "feature_id", "partition", "explanation", "harmful", "score", "exclusivity", "rel_norm",
    "density", "max_act", "status", "dead",
]  # fmt: skip
DEFAULTS = {
    # Every exclusive candidate: the exclusive partitions and the leaning shared features.
    "f_partitions": [data.label(c) for c in data.CANDIDATES],
    "f_status": [],
    "f_min_score": 0.0,
    "f_excl": EXCLUSIVITY_RANGE,
    "f_search": "",
    "f_harmful": False,
    "f_dead": False,
    "f_order": "max_act",
    "f_desc": True,
    "f_page": 1,
}

# Defaults live in session state, not in the widgets: the app writes kept widget values
# back on every run (`data.keep_widget_state`), which a widget default would conflict with.
for key, default in DEFAULTS.items():
    st.session_state.setdefault(key, default)

path, run_id = data.session()
st.title("Features")

labels = [data.label(c) for c in data.CATEGORY_ORDER]
with st.container(border=True):
    c1, c2, c3 = st.columns([6.2, 1.9, 1.9])  # room for the four default partitions' chips
    chosen = c1.multiselect("Partition", labels, key="f_partitions", help=data.CATEGORY_HELP)
    statuses = c2.multiselect("Triage status", list(data.STATUSES), key="f_status")
    search = c3.text_input("Search explanations", key="f_search", placeholder="e.g. weapon")
    c4, c5, c6, c7, c8 = st.columns([2.2, 2.3, 2.3, 2.4, 1.6], vertical_alignment="center")
    harmful_only = c4.checkbox("Flagged harmful only", key="f_harmful")
    include_dead = c4.checkbox("Include dead features", key="f_dead")
    min_score = c5.slider("Min detection score", 0.0, 1.0, step=0.05, key="f_min_score")
    excl_lo, excl_hi = c6.slider(
        "Exclusivity score",
        *EXCLUSIVITY_RANGE,
        step=0.5,
        key="f_excl",
        help="The steering exclusivity score (`modeldiff exclusivity`): 5 = the feature's "
        "behaviour does not carry over to the other model. Narrowing the range hides "
        "features without a score.",
    )
    order = c7.selectbox(
        "Sort by",
        list(FEATURE_TABLE_ORDER),
        format_func=lambda c: SORT_LABELS.get(c, c),
        key="f_order",
    )
    descending = c8.toggle("Descending", key="f_desc")

filters = {
    "category": [data.LABEL_CATEGORIES[c] for c in chosen] or None,
    "harmful": True if harmful_only else None,
    "status": statuses or None,
    "min_score": min_score if min_score > 0 else None,
    # Only a narrowed range filters: the full range keeps features that have no score.
    "min_exclusivity": excl_lo if excl_lo > EXCLUSIVITY_RANGE[0] else None,
    "max_exclusivity": excl_hi if excl_hi < EXCLUSIVITY_RANGE[1] else None,
    "search": search.strip() or None,
    "dead": None if include_dead else False,
}
filters = {k: v for k, v in filters.items() if v is not None}
n_rows = data.feature_count(path, run_id, **filters)

size = data.PAGE_SIZE
n_pages = max(1, math.ceil(n_rows / size))
top = st.columns([3, 1])
if not 1 <= st.session_state["f_page"] <= n_pages:
    st.session_state["f_page"] = 1
page_no = top[1].number_input("Page", 1, n_pages, key="f_page") if n_pages > 1 else 1
first = (page_no - 1) * size
shown_range = f" Rows {first + 1:,}–{min(first + size, n_rows):,}." if n_pages > 1 else ""
matched = "features match" if n_rows != 1 else "feature matches"
top[0].markdown(f"**{n_rows:,}** {matched}.{shown_range}")
page = data.feature_table(
    path, run_id, **filters, order_by=order, descending=descending, limit=size, offset=first
)
shown = page[[c for c in COLUMNS if c in page.columns]].copy()
shown["partition"] = page["category"].map(data.label)  # leaning shared features named so
if "exclusivity" in shown:
    # The interval and the judge's kind beside the number: offline scores are proxies.
    shown.insert(
        shown.columns.get_loc("exclusivity") + 1,
        "exclusivity_note",
        [exclusivity_note(r) for r in page.to_dict("records")],
    )

# The judge-free effect measure beside the judge's score, where the run has one.
for column, values in effect_columns(path, run_id, page["feature_id"].astype(int).tolist()).items():
    shown[column] = values

event = st.dataframe(
    shown,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key="f_grid",
    column_config={
        "feature_id": st.column_config.NumberColumn("feature", format="%d"),
        "explanation": st.column_config.TextColumn("explanation", width="medium"),
        "score": st.column_config.NumberColumn("detection", format="%.2f"),
        "exclusivity": st.column_config.NumberColumn(
            "exclusivity", format="%.1f", help="steering exclusivity score, 1-5"
        ),
        "exclusivity_note": st.column_config.TextColumn(
            "95% interval · judge",
            help="the exclusivity score's 95% interval over prompts × samples; "
            "'offline proxy': scored by the offline sentence-embedding judge, a stand-in for "
            "the paper's LLM judge",
        ),
        "effect_z": st.column_config.NumberColumn(
            "effect z",
            format="%+.1f",
            help="judge-free effect measure (`modeldiff effects`): z-score of the feature's "
            "effect exclusivity against random directions; above 0: the other model reacts "
            "to the translated vector less than random directions' copies do",
        ),
        "effect_note": st.column_config.TextColumn("effect measure, in words"),
        "rel_norm": st.column_config.NumberColumn("rel. norm", format="%.3f"),
        "density": st.column_config.NumberColumn("density", format="percent"),
        "max_act": st.column_config.NumberColumn("max act", format="%.3g"),
    },
)
st.caption("Select a row to open the feature page.")

rows = event.selection.rows if event is not None else []
if rows:
    # Selection gives row positions in the shown page: map them to the stable feature id.
    fid = int(page.iloc[rows[0]]["feature_id"])
    data.set_feature(fid)
    st.switch_page("views/feature.py", query_params={"run": run_id, "feature": str(fid)})
