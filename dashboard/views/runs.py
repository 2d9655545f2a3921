"""Runs: the model pair, architecture, partition sizes, training metrics and the
distribution of the run's features over exclusivity and density."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard import data
from dashboard.views.common import PARTITION_COLOURS, fmt

path, run_id = data.session()
info = data.run(path, run_id)

st.title("Runs")
overview = data.runs(path)
if len(overview) > 1:
    table = pd.DataFrame(
        {
            "run": overview["run_id"],
            "model A": [(m or {}).get("name", "–") for m in overview["model_a"]],
            "model B": [(m or {}).get("name", "–") for m in overview["model_b"]],
            "architecture": overview["architecture"],
            "features": overview["n_features"],
            "created": overview["created_at"],
        }
    )
    st.dataframe(table, hide_index=True, width="stretch")

st.header(f"Run `{run_id}`")
model_a, model_b = info.get("model_a") or {}, info.get("model_b") or {}
cols = st.columns(2)
for col, name, model in ((cols[0], "A", model_a), (cols[1], "B", model_b)):
    with col:
        st.subheader(f"Model {name}")
        st.markdown(
            f"**{model.get('name', 'unnamed')}** · layer {model.get('layer', '–')}"
            f" of {model.get('n_layers', '–')} · d_model {model.get('d_model', '–')}"
        )

partition = info.get("partition") or {}
st.markdown(
    f"**Architecture:** {info.get('architecture', '–')} · **features:** "
    f"{int(info.get('n_features') or 0):,} · A-exclusive {partition.get('n_a_exclusive', 0):,} · "
    f"B-exclusive {partition.get('n_b_exclusive', 0):,} · shared {partition.get('n_shared', 0):,}"
    + (
        f" · designated shared {partition['n_designated']:,}"
        if partition.get("n_designated")
        else ""
    )
)

metrics = info.get("metrics") or {}
m = st.columns(4)
m[0].metric("FVE A", fmt(metrics.get("fve_a"), ".3f"))
m[1].metric("FVE B", fmt(metrics.get("fve_b"), ".3f"))
dead = metrics.get("dead_frac")
m[2].metric("dead (training)", "–" if dead is None else f"{float(dead):.1%}")
m[3].metric("L0", fmt(metrics.get("l0"), ".1f"))

# The feature table already holds partition, relative norm and density: one read serves
# the histograms and the per-partition counts.
table = data.feature_table(path, run_id)
colours = {data.label(k): v for k, v in PARTITION_COLOURS.items()}


def partition_histogram(frame: pd.DataFrame, x: str, axis: str, title: str) -> None:
    """An overlaid histogram of `x`, one colour per partition."""
    fig = px.histogram(
        frame.assign(partition_label=frame["partition"].map(data.label)),
        x=x,
        color="partition_label",
        nbins=50,
        barmode="overlay",
        color_discrete_map=colours,
        labels={x: axis},
        title=title,
    )
    fig.update_layout(legend_title_text="partition", height=340)
    st.plotly_chart(fig, width="stretch")


left, right = st.columns(2)
with left:
    partition_histogram(
        table,
        "rel_norm",
        "relative decoder norm ‖d_A‖ / (‖d_A‖ + ‖d_B‖)",
        "Relative decoder norm (1 = only in A, 0 = only in B)",
    )
with right:
    live = table[table["density"].fillna(0) > 0]
    partition_histogram(
        live.assign(log_density=np.log10(live["density"])),
        "log_density",
        "log10 density",
        f"Feature density ({len(table) - len(live):,} features never fire)",
    )

st.subheader("By partition")
partitions = table["partition"].map(data.label)
exclusivity = table["exclusivity"].astype(float)
counts = (
    pd.DataFrame(
        {
            "partition": partitions,
            "features": 1,
            "dead": table["dead"].fillna(False).astype(bool),
            "explained": table["explanation"].notna(),
            "flagged harmful": table["harmful"].fillna(False).astype(bool),
            f"interpretable (score ≥ {data.INTERPRETABLE})": (
                table["score"].fillna(0) >= data.INTERPRETABLE
            ),
            "exclusivity scored": exclusivity.notna(),
            "triaged": table["status"] != "unreviewed",
        }
    )
    .groupby("partition", sort=False)
    .sum()
)
if exclusivity.notna().any():
    means = exclusivity.groupby(partitions, sort=False).mean()
    at = counts.columns.get_loc("exclusivity scored") + 1
    counts.insert(at, "mean exclusivity", means.reindex(counts.index).map(lambda v: fmt(v, ".2f")))
summary = counts.reset_index()
if summary.empty:
    st.caption("The database holds no features for this run.")
else:
    st.dataframe(
        summary,
        hide_index=True,
        width="stretch",
        column_config={
            "exclusivity scored": st.column_config.NumberColumn(
                help="features with a steering exclusivity score (`modeldiff exclusivity`); "
                "those filtered as not interpretable have none"
            ),
            "mean exclusivity": st.column_config.TextColumn(
                help="mean exclusivity score (1-5) of the scored features"
            ),
        },
    )

with st.expander("Run configuration and provenance"):
    st.json(
        {
            "config": info.get("config"),
            "checkpoint": info.get("checkpoint_path"),
            "store": info.get("store_path"),
            "provenance": info.get("provenance"),
        },
        expanded=False,
    )
