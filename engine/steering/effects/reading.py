"""Reading stored effect measurements: what a number means in words, per-category
summaries beside the Figure-5 calibration, and the figure's panel of the measure."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from engine.categories import A_EXCLUSIVE, B_EXCLUSIVE, LABELS, SHARED

NULL_LABEL = "random direction (null)"
COLOURS = {A_EXCLUSIVE: "#d62728", B_EXCLUSIVE: "#1f77b4", SHARED: "#7f7f7f", "null": "#2ca02c"}
ORDER = (A_EXCLUSIVE, B_EXCLUSIVE, SHARED, "null")


def meaning(source: str, percentile: float | None, n: int) -> str:
    """One line saying what an effect measurement means: how the other model's reaction to
    the translated vector compares with random directions'."""
    if percentile is None or n == 0:
        return ""
    target = "B" if source == "a" else "A"
    share = percentile / 100.0
    if share >= 0.5:
        return (
            f"{target} reacts to the translated vector less than {share:.0%} of random "
            f"directions do (n = {n})"
        )
    return (
        f"{target} reacts to the translated vector more than {1 - share:.0%} of random "
        f"directions do (n = {n})"
    )


def effect_line(feature_id: int | None, row: dict[str, Any]) -> str:
    """One measured item as a line: exclusivity, z against the null, and its meaning."""
    what = f"feature {feature_id}" if feature_id is not None else "direction"
    source = row["source"]
    arrow = f"{source.upper()}->{'B' if source == 'a' else 'A'}"
    z = row.get("z")
    z_text = "" if z is None or (isinstance(z, float) and math.isnan(z)) else f", z {z:+.1f}"
    details = row.get("details") or {}
    n = int(details.get("null_n", 0)) if isinstance(details, dict) else 0
    text = meaning(source, row.get("percentile"), n)
    return (
        f"{what} ({arrow}): effect exclusivity {row['exclusivity']:.2f} (rank correlation "
        f"{row['similarity']:+.2f}){z_text}" + (f"; {text}" if text else "")
    )


def categorised(frame: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """The newest settings' rows with a `category`: the feature's partition (A-, B-exclusive,
    shared), or "null" for random directions."""
    if frame.empty:
        return frame.assign(category=pd.Series(dtype=str))
    frame = frame[frame["settings"] == frame["settings"].iloc[-1]]
    frame = frame.drop_duplicates(["kind", "item", "source"], keep="last")
    partition = features.set_index("feature_id")["partition"] if not features.empty else {}
    cats = []
    for row in frame.to_dict("records"):
        if row["kind"] == "null":
            cats.append("null")
        else:
            fid = row.get("feature_id")
            part = partition.get(int(fid)) if fid is not None and fid == fid else None
            cats.append(part if part in (A_EXCLUSIVE, B_EXCLUSIVE) else SHARED)
    return frame.assign(category=cats)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per category of a `categorised` frame: items, mean and spread of exclusivity."""
    rows = []
    for category in ORDER:
        group = frame[frame["category"] == category] if not frame.empty else frame
        if group.empty:
            continue
        values = group["exclusivity"].astype(float)
        rows.append(
            {
                "category": category,
                "label": NULL_LABEL if category == "null" else LABELS[category],
                "items": len(group),
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "median_z": float(np.nanmedian(group["z"].astype(float)))
                if category != "null" and group["z"].notna().any()
                else None,
            }
        )
    return pd.DataFrame(rows)


def summary_lines(frame: pd.DataFrame) -> list[str]:
    """Per category of a `categorised` frame, one line: items, mean exclusivity, median z."""
    lines = []
    for row in summary(frame).to_dict("records"):
        z = row["median_z"]
        z_text = "" if z is None or z != z else f", median z {z:+.1f}"
        lines.append(
            f"{row['label']}: {row['items']} items, effect exclusivity {row['mean']:.2f} "
            f"(sd {row['sd']:.2f}){z_text}"
        )
    return lines


def effects_figure(frame: pd.DataFrame, title: str = ""):
    """Each category's effect exclusivity (1 - rank correlation of the two models' effects)
    as a violin with every point, random directions (the null) beside the features."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for category in ORDER:
        group = frame[frame["category"] == category] if not frame.empty else frame
        if group.empty:
            continue
        name = NULL_LABEL if category == "null" else LABELS[category]
        fig.add_trace(
            go.Violin(
                x=[name] * len(group),
                y=group["exclusivity"].astype(float),
                name=f"{name} ({len(group)})",
                line_color=COLOURS[category],
                points="all",
                meanline_visible=True,
                spanmode="hard",
                hovertext=[_hover(r) for r in group.to_dict("records")],
            )
        )
    fig.update_layout(
        title=title or "Effect exclusivity by category (judge-free, iso-KL, against the null)",
        yaxis_title="effect exclusivity (0: transfers, 1: unrelated, 2: opposite)",
        yaxis_range=[-0.1, 2.1],
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def _hover(row: dict[str, Any]) -> str:
    fid = row.get("feature_id")
    what = (
        f"random direction {row['source'].upper()}{row['item']}"
        if fid is None or fid != fid
        else f"feature {int(fid)}"
    )
    z = row.get("z")
    z_text = "" if z is None or z != z else f", z {z:+.1f}"
    return f"{what}: {row['exclusivity']:.2f}{z_text}"
