"""The Runs page's training section: the curves the trainer logged (loss and its AuxK
term, FVE per model on the training batch and on the held-out pairs, L0), the held-out
FVE of each partition's features alone, and the CE loss recovered that `modeldiff
evaluate` measured (the run directory's evaluation.json)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard import data
from dashboard.markdown import md_code
from dashboard.views.common import PARTITION_COLOURS, fmt
from engine import categories
from engine.analysis.evaluate import read_evaluation
from engine.analysis.run_metrics import (
    HELD_OUT,
    TRAINING,
    fve_history,
    l0_history,
    loss_history,
    partition_fve_history,
    validation_fves,
)

MODEL_COLOURS = {
    "A": PARTITION_COLOURS[categories.A_EXCLUSIVE],
    "B": PARTITION_COLOURS[categories.B_EXCLUSIVE],
}
DASHES = {TRAINING: "solid", HELD_OUT: "dot"}


def training_panel(path: str, run_id: str) -> None:
    """The "Training" section of the Runs page."""
    info = data.run(path, run_id)
    history = data.run_history(path, run_id)
    st.subheader("Training")
    metrics = info.get("metrics") or {}
    held_out = validation_fves(metrics)
    evaluation = read_evaluation(info.get("checkpoint_path"))
    _headline(held_out, evaluation)
    if history.empty or "step" not in history.columns:
        st.caption("The run records no training history.")
    else:
        _curves(history)
    _evaluation(evaluation, info.get("checkpoint_path"))


def _headline(held_out: dict[str, float], evaluation: dict[str, Any] | None) -> None:
    """Held-out FVE and CE loss recovered per model, as metrics."""
    items = [(f"held-out FVE {m}", fmt(v, ".3f")) for m, v in held_out.items()]
    for side, m in ((evaluation or {}).get("models") or {}).items():
        items.append((f"CE loss recovered {side.upper()}", fmt(m.get("ce_loss_recovered"), ".3f")))
    if not items:
        return
    for col, (label, value) in zip(st.columns(max(4, len(items))), items, strict=False):
        col.metric(label, value)


def _curves(history: pd.DataFrame) -> None:
    left, right = st.columns(2)
    loss = loss_history(history)
    if not loss.empty:
        fig = px.line(
            loss,
            x="step",
            y="value",
            facet_row="term",
            labels={"value": "", "step": "training step", "term": ""},
            title="Loss and its AuxK term (training batch)",
        )
        fig.update_yaxes(matches=None)
        fig.update_layout(height=360, showlegend=False)
        left.plotly_chart(fig, width="stretch")
    fve = fve_history(history)
    if not fve.empty:
        fig = px.line(
            fve,
            x="step",
            y="fve",
            color="model",
            line_dash="data",
            color_discrete_map=MODEL_COLOURS,
            line_dash_map=DASHES,
            labels={"fve": "FVE", "step": "training step", "data": ""},
            title="Fraction of variance explained",
        )
        fig.update_layout(height=360, yaxis_range=[max(-0.1, float(fve["fve"].min())), 1])
        right.plotly_chart(fig, width="stretch")
    left, right = st.columns(2)
    l0 = l0_history(history)
    if not l0.empty:
        fig = px.line(
            l0,
            x="step",
            y="l0",
            line_dash="data",
            line_dash_map=DASHES,
            labels={"l0": "active features per token (L0)", "step": "training step", "data": ""},
            title="L0",
        )
        fig.update_layout(height=320)
        left.plotly_chart(fig, width="stretch")
    parts = partition_fve_history(history)
    if not parts.empty:
        fig = px.line(
            parts.assign(partition=parts["partition"].map(data.label)),
            x="step",
            y="fve",
            color="partition",
            line_dash="model",
            color_discrete_map={data.label(k): v for k, v in PARTITION_COLOURS.items()},
            labels={"fve": "held-out FVE", "step": "training step"},
            title="Held-out FVE from one partition's features alone",
        )
        fig.update_layout(height=320)
        right.plotly_chart(fig, width="stretch")
        right.caption(
            "Each model's reconstruction from one partition's selected features plus its "
            "decoder bias; the partitions' values overlap, so they do not add up."
        )


def _evaluation(evaluation: dict[str, Any] | None, run_dir: str | None) -> None:
    """CE loss recovered per model, or how to measure it."""
    if evaluation is None:
        command = f"modeldiff evaluate --run {run_dir or 'RUN_DIR'} --store STORE"
        st.caption("CE loss recovered not measured yet: run " + md_code(command) + ".")
        return
    rows = [
        {
            "model": side.upper(),
            "CE clean": m.get("ce_clean"),
            "CE spliced": m.get("ce_spliced"),
            "CE zero-ablated": m.get("ce_ablated"),
            "CE loss recovered": m.get("ce_loss_recovered"),
            "FVE": m.get("fve"),
            "tokens": m.get("tokens"),
        }
        for side, m in (evaluation.get("models") or {}).items()
    ]
    where = "held-out" if evaluation.get("held_out") else "training (not held-out)"
    st.markdown(
        f"**CE loss recovered** on {len(evaluation.get('windows') or [])} {where} windows: "
        "(CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean); 1 = splicing the "
        "reconstruction in costs nothing."
    )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        width="stretch",
        column_config={
            name: st.column_config.NumberColumn(format="%.3f")
            for name in ("CE clean", "CE spliced", "CE zero-ablated", "CE loss recovered", "FVE")
        },
    )
