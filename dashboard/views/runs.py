"""Runs: the model pair, architecture, partition sizes, training metrics (dead fraction per
partition, and its history) and the distribution of the run's features over relative
decoder norm, density and category (leaning shared features set apart)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from dashboard import data
from dashboard.markdown import md, md_code
from dashboard.views.common import PARTITION_COLOURS, fmt, percent
from dashboard.views.run_calibration import calibration_panel
from dashboard.views.run_training import training_panel
from engine.analysis.run_metrics import ALL, dead_fractions, dead_history, partition_size_history
from engine.categories import A_LEANING_ABOVE, B_LEANING_BELOW
from engine.specs import SIDES, ModelSpec, PairSpec


def _or_dash(value, missing: str = "–"):
    """A recorded value, or what to show where the run does not record it."""
    return missing if value is None else value


path, run_id = data.session()
info = data.run(path, run_id)

st.title("Runs")
overview = data.runs(path)
if len(overview) > 1:
    table = pd.DataFrame(
        {
            "run": overview["run_id"],
            "model A": [_or_dash(ModelSpec.from_dict(m).name) for m in overview["model_a"]],
            "model B": [_or_dash(ModelSpec.from_dict(m).name) for m in overview["model_b"]],
            "architecture": overview["architecture"],
            "features": overview["n_features"],
            "created": overview["created_at"],
        }
    )
    st.dataframe(table, hide_index=True, width="stretch")

st.header(f"Run {md_code(run_id)}")
recorded = PairSpec.from_run(info)
cols = st.columns(2)
for col, key in zip(cols, SIDES, strict=True):
    model = recorded[key]
    with col:
        st.subheader(f"Model {key.upper()}")
        st.markdown(
            f"**{md(_or_dash(model.name, 'unnamed'))}** · layer {md(_or_dash(model.layer))}"
            f" of {md(_or_dash(model.n_layers))} · d_model {md(_or_dash(model.d_model))}"
        )

partition = info.get("partition") or {}
st.markdown(
    f"**Architecture:** {md(info.get('architecture', '–'))} · **features:** "
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
m[2].metric("dead (training)", percent(metrics.get("dead_frac")))
m[3].metric("L0", fmt(metrics.get("l0"), ".1f"))

# Dead fraction per partition at the end of training (features that did not fire in the
# trainer's dead window): a starved exclusive partition cannot catch exclusive concepts.
dead_by_partition = dead_fractions(metrics)
if dead_by_partition:
    cols = st.columns(max(4, len(dead_by_partition)))
    for col, (partition, fraction) in zip(cols, dead_by_partition.items(), strict=False):
        col.metric(
            f"dead {data.label(partition)}",
            percent(fraction),
            help="share of the partition that had not fired in the trainer's dead window "
            "when training ended",
        )
run_history = data.run_history(path, run_id)
history = dead_history(run_history)
if not history.empty:
    names = {ALL: "all features"}
    fig = px.line(
        history.assign(partition=history["partition"].map(lambda p: names.get(p, data.label(p)))),
        x="step",
        y="dead_frac",
        color="partition",
        color_discrete_map={
            names[ALL]: "#000000",
            **{data.label(k): v for k, v in PARTITION_COLOURS.items()},
        },
        labels={"dead_frac": "dead fraction", "step": "training step"},
        title="Dead features during training, by partition",
    )
    fig.update_layout(height=320, yaxis_tickformat=".0%", yaxis_range=[0, 1])
    st.plotly_chart(fig, width="stretch")
# Adaptive partitions: dead exclusive features went back to the shared block, lopsided
# shared features came in.
sizes = partition_size_history(run_history)
if not sizes.empty:
    fig = px.line(
        sizes.assign(partition=sizes["partition"].map(data.label)),
        x="step",
        y="features",
        color="partition",
        color_discrete_map={data.label(k): v for k, v in PARTITION_COLOURS.items()},
        labels={"features": "features", "step": "training step"},
        title="Exclusive partition sizes during training (adaptive partitions)",
    )
    fig.update_layout(height=280)
    st.plotly_chart(fig, width="stretch")

training_panel(path, run_id)

# The feature table already holds category, relative norm and density: one read serves
# the histograms and the per-category counts.
table = data.feature_table(path, run_id)
colours = {data.label(k): v for k, v in PARTITION_COLOURS.items()}


def category_histogram(frame: pd.DataFrame, x: str, axis: str, title: str) -> go.Figure:
    """An overlaid histogram of `x`, one colour per category (partition, or leaning)."""
    fig = px.histogram(
        frame.assign(partition_label=frame["category"].map(data.label)),
        x=x,
        color="partition_label",
        nbins=50,
        barmode="overlay",
        color_discrete_map=colours,
        category_orders={"partition_label": [data.label(c) for c in data.CATEGORY_ORDER]},
        labels={x: axis},
        title=title,
    )
    fig.update_layout(legend_title_text="partition", height=340)
    return fig


left, right = st.columns(2)
with left:
    fig = category_histogram(
        table,
        "rel_norm",
        "relative decoder norm ‖d_A‖ / (‖d_A‖ + ‖d_B‖)",
        "Relative decoder norm (1 = only in A, 0 = only in B)",
    )
    # The bounds past which a shared feature counts as leaning to one model.
    for bound in (B_LEANING_BELOW, A_LEANING_ABOVE):
        fig.add_vline(x=bound, line_dash="dot", line_color="#555")
    st.plotly_chart(fig, width="stretch")
with right:
    live = table[table["density"].fillna(0) > 0]
    fig = category_histogram(
        live.assign(log_density=np.log10(live["density"])),
        "log_density",
        "log10 density",
        f"Feature density ({len(table) - len(live):,} features never fire)",
    )
    st.plotly_chart(fig, width="stretch")

st.subheader("By partition")
st.caption(data.CATEGORY_HELP)
partitions = table["category"].map(data.label)
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
# From "only in A" to "only in B"; categories the run has no feature in are left out.
order = [data.label(c) for c in data.CATEGORY_ORDER]
counts = counts.reindex([label for label in order if label in counts.index])
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

calibration_panel(path, run_id)

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
