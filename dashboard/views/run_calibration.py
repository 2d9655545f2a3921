"""The Runs page's exclusivity calibration panel (paper Figure 5): the distributions of
exclusivity scores per category (A-exclusive, B-exclusive, shared, random directions) that
`modeldiff exclusivity --protocol figure5` stored, with each category's mean and 95%
interval, so a single feature's score can be read against them.

Also the feature page's one line on where a feature's score stands among them.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.markdown import md_code
from dashboard.views.common import fmt
from dashboard.views.effects import effects_panel
from engine.steering.calibration import (
    PROTOCOL,
    calibration_figure,
    discrimination_warning,
    standing_text,
    summary,
)
from engine.steering.exclusivity import is_proxy


@data.cached
def calibration(path: str, run_id: str) -> pd.DataFrame:
    """The run's stored calibration items (every protocol and judge), oldest first."""
    return data.database(path).calibration(run_id)


def _judges(frame: pd.DataFrame) -> list[str]:
    """Judges with calibration rows, the newest first."""
    return list(dict.fromkeys(frame["judge"].iloc[::-1]))


def calibration_panel(path: str, run_id: str) -> None:
    """The "Exclusivity calibration" section: the judge's Figure-5 plot and per-category
    table, and beside it the judge-free effect measure against random directions."""
    st.subheader("Exclusivity calibration")
    judge_side, effects_side = st.columns(2)
    with judge_side:
        _judge_panel(path, run_id)
    with effects_side:
        effects_panel(path, run_id)


def _judge_panel(path: str, run_id: str) -> None:
    """The judge's Figure-5 plot and per-category table."""
    frame = calibration(path, run_id)
    if frame.empty:
        st.caption(
            "No calibration yet: what do exclusive, shared and random steering vectors "
            "score? Run "
            + md_code(
                f"modeldiff exclusivity --db {path} --run-id {run_id} --stitch STITCH "
                f"--protocol {PROTOCOL}"
            )
            + " (paper Figure 5)."
        )
        return
    judges = _judges(frame)
    judge = judges[0]
    if len(judges) > 1:
        judge = st.selectbox("Judge", judges, key="calibration_judge")
    rows = frame[frame["judge"] == judge]
    if is_proxy(judge):
        st.warning(
            f"Offline judge ({judge}): these scores are proxies from sentence embeddings, "
            "not the paper's LLM judge.",
            icon="⚠️",
        )
    warning = discrimination_warning(rows)
    if warning:
        st.warning(f"Exclusive features do not stand out: {warning}.", icon="⚠️")
    fig = calibration_figure(rows, f"run {run_id}: exclusivity by category")
    fig.update_layout(height=460, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    st.plotly_chart(fig, width="stretch", key="calibration_figure")
    table = summary(rows)
    shown = pd.DataFrame(
        {
            "category": table["label"],
            "items": table["items"],
            "interpretable": table["kept"],
            "mean exclusivity": [_interval(r) for r in table.to_dict("records")],
            "unfiltered (all items)": [
                _interval(r, "unfiltered_") for r in table.to_dict("records")
            ],
        }
    )
    st.dataframe(shown, hide_index=True, width="stretch")
    st.caption(
        "Left halves: scores of the items whose steering passed the interpretability filter "
        "(interpretability ≥ 3); right halves: 6 − similarity of every item. Means with 95% "
        "Student-t intervals over items. A-/B-exclusive: random exclusive features, or for a "
        "standard crosscoder the most extreme relative decoder norms; shared: random shared "
        "features; random directions: Gaussian vectors of the features' median decoder norm."
    )


def _interval(row: dict, prefix: str = "") -> str:
    """ "4.21 [3.80, 4.62]" or "–"."""
    mean = row.get(f"{prefix}mean")
    if mean is None or mean != mean:
        return "–"
    return (
        f"{fmt(mean, '.2f')} [{fmt(row.get(f'{prefix}ci_low'), '.2f')}, "
        f"{fmt(row.get(f'{prefix}ci_high'), '.2f')}]"
    )


def feature_standing(path: str, run_id: str, value, judge: str | None) -> str:
    """Where a feature's exclusivity score stands among the run's calibration by the same
    judge ("above 90% of shared features (n = 10), ..."); empty if there is none."""
    frame = calibration(path, run_id)
    if frame.empty or value is None or value != value:
        return ""
    rows = frame[frame["judge"] == judge]
    text = standing_text(rows, float(value))
    if text and discrimination_warning(rows):
        text += "; on this run random directions score as high as exclusive features"
    return text
