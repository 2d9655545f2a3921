"""Compare runs: which features of this run recur in another run of the same model pair
(decoder-cosine matches written by `modeldiff match`)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.markdown import md_code

path, run_id = data.session()
st.title("Compare runs")

others = [r for r in data.run_ids(path) if r != run_id]
if not others:
    st.info(
        f"The database holds only run {md_code(run_id)}. Analyse another run of the same "
        "model pair (another seed or partition size) into the same file, then match them:"
    )
    st.code(
        f"modeldiff analyze --run runs/OTHER --store STORE --db {path} --run-id OTHER\n"
        f"modeldiff match --db {path} --run-id {run_id} --other OTHER",
        language="bash",
    )
    st.stop()

other = st.selectbox("Compare with", others, key="cmp_other")
table = data.matches(path, run_id, other)
if table.empty:
    st.info(f"No matches from {md_code(run_id)} to {md_code(other)} yet. Create them with:")
    st.code(f"modeldiff match --db {path} --run-id {run_id} --other {other}", language="bash")
    st.stop()

threshold = st.slider("Recurs at decoder cosine ≥", 0.0, 1.0, data.RECUR, 0.05, key="cmp_t")
best = table.sort_values("cosine", ascending=False).drop_duplicates("feature_id")
best = best.assign(recurs=best["cosine"] >= threshold)

summary = (
    pd.DataFrame(
        {
            "partition": best["partition"].map(data.label),
            "features": 1,
            "recur": best["recurs"],
            "median best cosine": best["cosine"],
        }
    )
    .groupby("partition", sort=False)
    .agg({"features": "sum", "recur": "sum", "median best cosine": "median"})
    .reset_index()
)
summary["share recurring"] = summary["recur"] / summary["features"]
st.subheader("Per partition")
st.dataframe(
    summary,
    hide_index=True,
    width="stretch",
    column_config={
        "share recurring": st.column_config.ProgressColumn(format="percent", min_value=0.0),
        "median best cosine": st.column_config.NumberColumn(format="%.3f"),
    },
)

st.subheader("Exclusive features and their best match")
features = data.feature_table(path, run_id)
explained = features.set_index("feature_id")["explanation"]
excl = best[best["partition"].isin(data.EXCLUSIVE)].sort_values("cosine", ascending=False)
only_recurring = st.toggle("Only recurring", value=True, key="cmp_only")
if only_recurring:
    excl = excl[excl["recurs"]]
shown = pd.DataFrame(
    {
        "feature": excl["feature_id"],
        "partition": excl["partition"].map(data.label),
        "explanation": excl["feature_id"].map(explained).fillna(""),
        f"feature in {other}": excl["other_feature_id"],
        "its partition": excl["other_partition"].map(data.label),
        "cosine": excl["cosine"],
        "recurs": excl["recurs"],
        "link": [data.feature_link(run_id, f) for f in excl["feature_id"]],
    }
)
st.dataframe(
    shown,
    hide_index=True,
    width="stretch",
    column_config={
        "explanation": st.column_config.TextColumn(width="medium"),
        "cosine": st.column_config.NumberColumn(format="%.3f"),
        "link": st.column_config.LinkColumn("link", display_text="open"),
    },
)
