"""The judge-free effect measure (`modeldiff effects`) where exclusivity is shown: the
feature page's line, the features list's column, and its panel beside the Figure-5
calibration. Reads only; the numbers come from `engine.steering.effects`."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.markdown import md_code
from engine.steering.effects.reading import (
    categorised,
    effect_line,
    effects_figure,
    meaning,
    summary,
)


def _features(path: str, run_id: str) -> pd.DataFrame:
    """The run's newest measured features (one row each)."""
    frame = data.effects(path, run_id)
    if frame.empty:
        return frame
    frame = frame[frame["settings"] == frame["settings"].iloc[-1]]
    frame = frame[frame["kind"] == "feature"]
    return frame.drop_duplicates("item", keep="last").set_index("item")


def feature_effect(path: str, run_id: str, feature_id: int) -> dict[str, Any] | None:
    """A feature's newest effect measurement, or None."""
    frame = _features(path, run_id)
    if frame.empty or feature_id not in frame.index:
        return None
    return frame.loc[feature_id].to_dict()


def feature_effect_line(path: str, run_id: str, feature_id: int) -> str:
    """The feature page's line: the measure, its z and what it means in words."""
    row = feature_effect(path, run_id, feature_id)
    if row is None:
        return (
            "Judge-free effect measure: not measured; "
            + md_code(
                f"modeldiff effects --db {path} --run-id {run_id} --stitch STITCH "
                f"--features {feature_id}"
            )
            + " reads the feature against random directions without an LLM judge."
        )
    return f"Judge-free effect measure: {effect_line(feature_id, row)}."


def effect_columns(path: str, run_id: str, feature_ids: list[int]) -> dict[str, list]:
    """The features list's columns: effect z and its meaning, per feature id (None where
    not measured); empty when the run has no measurement."""
    frame = _features(path, run_id)
    if frame.empty:
        return {}
    z, note = [], []
    for fid in feature_ids:
        if fid in frame.index:
            row = frame.loc[fid]
            details = row["details"] if isinstance(row["details"], dict) else {}
            z.append(None if pd.isna(row["z"]) else float(row["z"]))
            note.append(meaning(row["source"], row["percentile"], int(details.get("null_n", 0))))
        else:
            z.append(None)
            note.append("")
    return {"effect_z": z, "effect_note": note}


def effects_panel(path: str, run_id: str) -> None:
    """The measure's distributions per category beside the null, with a summary table."""
    frame = data.effects(path, run_id)
    if frame.empty:
        st.caption(
            "No judge-free effect measure yet: "
            + md_code(f"modeldiff effects --db {path} --run-id {run_id} --stitch STITCH")
            + " measures features against random directions without an LLM judge."
        )
        return
    rows = categorised(frame, data.features(path, run_id))
    fig = effects_figure(rows, f"run {run_id}: judge-free effect exclusivity")
    fig.update_layout(height=460, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    st.plotly_chart(fig, width="stretch", key="effects_figure")
    table = summary(rows)
    st.dataframe(
        pd.DataFrame(
            {
                "category": table["label"],
                "items": table["items"],
                "mean exclusivity": table["mean"].round(2),
                "sd": table["sd"].round(2),
                "median z": table["median_z"].round(1),
            }
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "Judge-free: each vector steers its model at a matched KL of the next token (iso-KL), "
        "and the other model gets the stitched copy at its own matched KL; exclusivity is "
        "1 − the rank correlation of the two models' changes in log-probability over a panel "
        "of strings. Random directions are drawn from each model's activation covariance "
        "and steered the same way; z is against them."
    )
