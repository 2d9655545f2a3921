"""The feature page's verification section: the stored exclusivity score (paper B.5) with
the judge's reasons and every steered text, and the stored steering evaluations drawn as
the paper's Figure 6.

Both are written by the engine (`modeldiff exclusivity`, `modeldiff steer-eval`); this
section only reads them.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.markdown import md, md_code
from dashboard.views.common import exclusivity_html, fmt, steered_texts_html, timestamp
from engine.errors import ConfigError
from engine.steering.evaluate import KIND, evaluation_figure, summary_of
from engine.steering.exclusivity import METRIC, is_proxy, score_text
from engine.steering.rubrics import rubric


def verification_panel(path: str, run_id: str, feature_id: int) -> None:
    """The "Exclusivity and steering evaluations" section of a feature page."""
    st.subheader("Exclusivity and steering evaluations")
    scores = data.scores(path, run_id, feature_id, METRIC)
    evaluations = data.evaluations(path, run_id, feature_id)
    if not evaluations.empty:
        evaluations = evaluations[evaluations["kind"].str.startswith(f"{KIND}:")]
    if scores.empty:
        st.caption(
            "No exclusivity score yet. Score it with "
            + md_code(
                f"modeldiff exclusivity --db {path} --run-id {run_id} --stitch STITCH "
                f"--features {feature_id}"
            )
            + "."
        )
    else:
        _exclusivity(scores)
    if evaluations.empty:
        st.caption(
            "No steering evaluation yet. Run one with "
            + md_code(
                f"modeldiff steer-eval --db {path} --run-id {run_id} --stitch STITCH "
                f"--feature {feature_id} --rubric RUBRIC"
            )
            + "."
        )
        return
    latest = evaluations.drop_duplicates("kind", keep="last")
    for row in latest.to_dict("records"):
        _evaluation(row, feature_id, int((evaluations["kind"] == row["kind"]).sum()))


def exclusivity_summary(path: str, run_id: str, row: dict[str, Any]) -> str:
    """A feature-table row's exclusivity in one line: mean, 95% interval, proxy mark and
    where it stands among the run's calibration ("" when the feature has no score)."""
    from dashboard.views.run_calibration import feature_standing

    value, judge = row.get("exclusivity"), row.get("exclusivity_judge")
    if value is None or value != value:
        return ""
    text = (
        f"Exclusivity {score_text(value, row.get('exclusivity_low'), row.get('exclusivity_high'))}"
    )
    if row.get("exclusivity_low") is not None and row.get("exclusivity_low") == row.get(
        "exclusivity_low"
    ):
        text += " (mean, 95% interval over prompts × samples)"
    if is_proxy(judge):
        text += " — **offline proxy**: a sentence-embedding stand-in for the paper's LLM judge"
    standing = feature_standing(path, run_id, value, judge)
    text += f". {standing[0].upper()}{standing[1:]} in this run's calibration." if standing else "."
    return text


def _exclusivity(scores: pd.DataFrame) -> None:
    """The latest exclusivity score and, in an expander, every prompt's texts and verdicts."""
    latest = scores.iloc[-1].to_dict()
    st.html(exclusivity_html(latest))
    if len(scores) > 1:
        judges = ", ".join(md_code(j) for j in scores["judge"].unique())
        st.caption(f"Latest of {len(scores)} exclusivity scores (judges: {judges}).")
    details = latest.get("details") or {}
    prompts = details.get("per_prompt") or []
    if not prompts:
        return
    source, target = str(details.get("source", "?")), str(details.get("target", "?"))
    with st.expander(f"Steered texts and the judge's reasons ({len(prompts)} prompts)"):
        st.caption(
            f"Strength α in units of s_max = {fmt(details.get('s_max'))}; decoding "
            f"{_decoding(details.get('generation') or {})}."
        )
        st.html("".join(steered_texts_html(p, source, target) for p in prompts))


def _decoding(generation: dict[str, Any]) -> str:
    """Decoding settings in words ("greedy", or temperature, top-p and seed)."""
    if not generation or generation.get("greedy"):
        return "greedy"
    return (
        f"sampled at temperature {fmt(generation.get('temperature'), 'g')}, top-p "
        f"{fmt(generation.get('top_p'), 'g')}, seed {generation.get('seed', '–')}"
    )


def _evaluation(row: dict[str, Any], feature_id: int, n_runs: int) -> None:
    """One stored steering evaluation: the Figure-6 plot, its settings, its rated responses."""
    name = row["kind"].split(":", 1)[1]
    try:
        rub = rubric(name)
    except ConfigError:
        st.caption(f"Steering evaluation {md_code(name)}: unknown rubric, not drawn.")
        return
    fig = evaluation_figure(summary_of(row), rub.metric, f"{rub.title}: feature {feature_id}")
    # The shaded intervals are lines only (Plotly would mark their corners with dots).
    fig.update_traces(mode="lines", selector={"showlegend": False})
    fig.update_layout(height=420, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    st.plotly_chart(fig, width="stretch", key=f"eval_{row['eval_id']}")
    config = row.get("config") or {}
    st.caption(
        f"{md_code(row['kind'])}: {md(config.get('n_prompts', '–'))} prompts, judge "
        f"{md_code(config.get('judge', '–'))}, s_max {fmt(config.get('s_max'))}, "
        f"{timestamp(row.get('created_at'))}. Solid: {rub.metric.lower().replace('_', ' ')}; "
        "dotted: coherence; shaded: 95% confidence interval."
        + (f" Latest of {n_runs} runs of this evaluation." if n_runs > 1 else "")
    )
    rated = pd.DataFrame((row.get("result") or {}).get("rows") or [])
    if rated.empty:
        return
    scores = [m.lower() for m in rub.metrics if m.lower() in rated.columns]
    columns = ["model", "alpha", "prompt", "response", *scores, "reasoning"]
    shown = rated[[c for c in columns if c in rated.columns]]
    with st.expander(f"Rated responses ({len(rated)})"):
        st.dataframe(
            shown,
            hide_index=True,
            width="stretch",
            column_config={"response": st.column_config.TextColumn(width="large")},
        )
