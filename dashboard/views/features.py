"""Features: the run's feature table, filtered, sorted and paged; selecting a row opens the
feature page."""

from __future__ import annotations

import math

import streamlit as st

from dashboard import data
from engine.store.schema import FEATURE_TABLE_ORDER

PAGE_SIZE = 50
SORT_LABELS = {
    "feature_id": "feature id",
    "max_act": "max activation",
    "density": "density",
    "rel_norm": "relative decoder norm",
    "n_active": "active pairs",
    "s_max": "s_max",
    "dec_cos": "decoder cosine",
    "score": "detection score",
    "updated_at": "last triaged",
}
COLUMNS = [
    "feature_id", "partition", "explanation", "harmful", "score", "rel_norm", "density",
    "max_act", "status", "dead",
]  # fmt: skip
DEFAULTS = {
    "f_partitions": ["A-exclusive", "B-exclusive"],
    "f_status": [],
    "f_min_score": 0.0,
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

labels = [data.label(p) for p in data.PARTITION_ORDER]
with st.container(border=True):
    c1, c2, c3, c4 = st.columns([3, 2, 2, 3])
    chosen = c1.multiselect("Partition", labels, key="f_partitions")
    statuses = c2.multiselect("Triage status", list(data.STATUSES), key="f_status")
    min_score = c3.slider("Min detection score", 0.0, 1.0, step=0.05, key="f_min_score")
    search = c4.text_input("Search explanations", key="f_search", placeholder="e.g. weapon")
    c5, c6, c7, c8 = st.columns([2, 2, 3, 2])
    harmful_only = c5.checkbox("Flagged harmful only", key="f_harmful")
    include_dead = c6.checkbox("Include dead features", key="f_dead")
    order = c7.selectbox(
        "Sort by",
        list(FEATURE_TABLE_ORDER),
        format_func=lambda c: SORT_LABELS.get(c, c),
        key="f_order",
    )
    descending = c8.toggle("Descending", key="f_desc")

filters = {
    "partition": [data.LABEL_PARTITIONS[c] for c in chosen] or None,
    "harmful": True if harmful_only else None,
    "status": statuses or None,
    "min_score": min_score if min_score > 0 else None,
    "search": search.strip() or None,
    "dead": None if include_dead else False,
    "order_by": order,
    "descending": descending,
}
table = data.feature_table(path, run_id, **filters)

n_pages = max(1, math.ceil(len(table) / PAGE_SIZE))
top = st.columns([3, 1])
top[0].markdown(f"**{len(table):,}** features match.")
if not 1 <= st.session_state["f_page"] <= n_pages:
    st.session_state["f_page"] = 1
page_no = top[1].number_input("Page", 1, n_pages, key="f_page") if n_pages > 1 else 1
page = table.iloc[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE]
shown = page[[c for c in COLUMNS if c in page.columns]].copy()
shown["partition"] = shown["partition"].map(data.label)

event = st.dataframe(
    shown,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key="f_grid",
    column_config={
        "feature_id": st.column_config.NumberColumn("feature", format="%d"),
        "explanation": st.column_config.TextColumn("explanation", width="large"),
        "score": st.column_config.NumberColumn("detection", format="%.2f"),
        "rel_norm": st.column_config.NumberColumn("rel. norm", format="%.3f"),
        "density": st.column_config.NumberColumn("density", format="%.2e"),
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
