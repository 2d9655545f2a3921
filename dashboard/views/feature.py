"""Feature: one feature's explanation, statistics, activation histogram, logit effects in
each model, highlighted contexts (top, by quantile, random), either model's tokenization,
live probe and steering, stored exclusivity score and steering evaluations, neighbours and
matches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data
from dashboard.markdown import md, md_code
from dashboard.models import model_name
from dashboard.views.common import (
    TOKEN_VIEWS,
    activation_histogram,
    badge,
    context_html,
    esc,
    fmt,
    percent,
    tokens_html,
    triage_note_html,
    yes_no,
)
from dashboard.views.effects import feature_effect_line
from dashboard.views.probe import probe_panel
from dashboard.views.steering import steering_panel
from dashboard.views.verification import exclusivity_summary, verification_panel
from engine.analysis.logit_effects import histogram_edges, visible_token
from engine.steering.exclusivity import is_proxy

path, run_id = data.session()
info = data.run(path, run_id)
n_features = int(info["n_features"] or 0)
fid = data.current_feature(path, run_id)
if fid is None:
    st.warning(f"Run {md_code(run_id)} has no features.")
    st.stop()


def _jump() -> None:
    data.set_feature(int(st.session_state["feature_input"]))


# The URL (or a click elsewhere) decides which feature is shown; the input follows it.
st.session_state["feature_input"] = fid
st.sidebar.number_input(
    "Feature id", 0, max(n_features - 1, 0), step=1, key="feature_input", on_change=_jump
)
data.set_feature(fid)

stats = data.feature(path, run_id, fid)
row = data.feature_row(path, run_id, fid) or {}
max_act = float(stats.get("max_act") or 0.0)

st.html(
    f'<h2 style="margin-bottom:0">Feature {fid} &nbsp;{badge(stats["category"])}'
    + (
        ' &nbsp;<span style="background:#b00020; color:white; padding:2px 8px; '
        'border-radius:10px; font-size:0.8rem">flagged harmful</span>'
        if row.get("harmful") is True
        else ""
    )
    + (
        ' &nbsp;<span style="background:#555; color:white; padding:2px 8px; '
        'border-radius:10px; font-size:0.8rem">dead</span>'
        if stats.get("dead")
        else ""
    )
    + "</h2>"
)

explanation = row.get("explanation")
if explanation is None or pd.isna(explanation):
    st.info(
        "No explanation yet. Create them with "
        f"{md_code(f'modeldiff explain --db {path} --run-id {run_id}')}, then "
        "`modeldiff score ...`."
    )
else:
    flag = yes_no(row.get("harmful"))
    reason = row.get("harmful_reason")
    st.html(
        f'<div style="font-size:1.15rem; margin:6px 0">{esc(explanation)}</div>'
        f'<div style="color:#555">explained by <code>{esc(row.get("explainer"))}</code>'
        f" · harmful: <b>{esc(flag)}</b>"
        + (f" — {esc(reason)}" if reason is not None and not pd.isna(reason) else "")
        + f" · detection score <b>{esc(fmt(row.get('score'), '.2f'))}</b>"
        + (
            f" (judge <code>{esc(row.get('judge'))}</code>, {esc(row.get('n_examples'))} examples)"
            if row.get("judge") is not None and not pd.isna(row.get("judge"))
            else ""
        )
        + "</div>"
    )
st.html(
    triage_note_html(
        row.get("status"), row.get("notes"), row.get("reviewer"), row.get("updated_at")
    )
)

m = st.columns(8)
m[0].metric("density", percent(stats.get("density")), help="share of aligned tokens")
m[1].metric("active pairs", f"{int(stats.get('n_active') or 0):,}")
m[2].metric("max activation", fmt(stats.get("max_act")))
m[3].metric("s_max", fmt(stats.get("s_max")))
m[4].metric("decoder norm A", fmt(stats.get("dec_norm_a")))
m[5].metric("decoder norm B", fmt(stats.get("dec_norm_b")))
m[6].metric("relative norm", fmt(stats.get("rel_norm"), ".3f"), help="‖d_A‖ / (‖d_A‖ + ‖d_B‖)")
m[7].metric(
    "exclusivity",
    fmt(row.get("exclusivity"), ".1f")
    + (" (proxy)" if is_proxy(row.get("exclusivity_judge")) and row.get("exclusivity") else ""),
    help="Steering exclusivity score, 1-5 (5: the behaviour does not transfer to the other "
    "model); see Exclusivity and steering evaluations below. (proxy): from the offline "
    "judge, a stand-in for the paper's LLM judge.",
)
excl_line = exclusivity_summary(path, run_id, row)
if excl_line:
    st.caption(excl_line)
# Beside the judge's score, the judge-free measure read against random directions.
st.caption(feature_effect_line(path, run_id, fid))

fig = activation_histogram(stats["hist_counts"], stats["hist_edges"], "Activation histogram")
if fig is not None:
    st.plotly_chart(fig, width="stretch")

# -- logit effects ----------------------------------------------------------------------


def logit_effects_section(path: str, run_id: str, feature_id: int, run: dict) -> None:
    """The tokens the feature's vector promotes and suppresses most in each model, and a
    histogram of all its logit effects (stored by `modeldiff analyze`)."""
    st.subheader("Logit effects")
    effects = data.logit_effects(path, run_id, feature_id)
    if effects.empty:
        if data.has_logit_effects(path, run_id):
            st.caption("This feature has no vector to read out in either model.")
        else:
            st.caption(
                "Not computed for this run: `modeldiff analyze` reads them through both "
                "models' unembeddings, so re-run it where the run's models load."
            )
        return
    st.caption(
        "The feature's vector d in each model's raw units through that model's final-norm "
        "scale γ and unembedding: W_U·(γ ⊙ d), where γ is the norm's weight (1 + weight for "
        "Gemma's RMSNorm), without the norm's division by the residual's RMS. Per unit of "
        "activation: comparable between features of one model, not between models."
    )
    columns = st.columns(len(effects))
    for column, row in zip(columns, effects.itertuples(), strict=True):
        side = str(row.model)
        other = "B" if side == "a" else "A"
        name = model_name(run, side)
        with column:
            moved = row.vector == "transfer"
            how = "**transferred vector**" if moved else "its own decoder"
            st.markdown(f"**Model {side.upper()}** ({md(name)}) · {how}")
            tables = st.columns(2)
            for table, kind in zip(tables, ("promoted", "suppressed"), strict=True):
                frame = pd.DataFrame(
                    {
                        "token": [visible_token(t) for t in getattr(row, f"{kind}_tokens")],
                        "effect": list(getattr(row, f"{kind}_values")),
                    }
                )
                table.dataframe(
                    frame,
                    hide_index=True,
                    width="stretch",
                    key=f"logits_{kind}_{side}_{feature_id}",
                    column_config={
                        "token": st.column_config.TextColumn(kind, help="␣ a space, ↵ a newline"),
                        "effect": st.column_config.NumberColumn("logit effect", format="%.3f"),
                    },
                )
            figure = logit_histogram(row.hist_counts, row.hist_min, row.hist_max)
            if figure is not None:
                st.plotly_chart(figure, width="stretch", key=f"logits_hist_{side}_{feature_id}")
            if moved:
                st.caption(
                    f"This {other}-exclusive feature has no model {side.upper()} decoder: "
                    "these are the effects of its shared-partition transfer (the "
                    "cosine-weighted decoders of the shared features nearest to it, paper "
                    f"B.4.5), the vector that steering model {side.upper()} with it adds."
                )


def logit_histogram(counts, lo: float, hi: float) -> go.Figure | None:
    """Bars of the logit-effect histogram, suppressing bins red and promoting ones blue."""
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts) or counts.sum() == 0:
        return None
    edges = np.asarray(histogram_edges(float(lo), float(hi), len(counts)))
    centres = (edges[:-1] + edges[1:]) / 2
    figure = go.Figure(
        go.Bar(
            x=centres,
            y=counts,
            width=np.diff(edges),
            marker_color=np.where(centres < 0, "#d62728", "#1f77b4"),
            hovertemplate="%{x:.3g}: %{y:,} tokens<extra></extra>",
        )
    )
    figure.update_layout(
        xaxis_title=f"logit effect ({int(counts.sum()):,} tokens)",
        yaxis_title="tokens",
        height=240,
        margin=dict(l=10, r=10, t=10, b=10),
        bargap=0,
    )
    return figure


logit_effects_section(path, run_id, fid, info)

# -- contexts ---------------------------------------------------------------------------

st.subheader("Contexts")
opts = st.columns([2, 3])
whole = opts[0].toggle("Show the whole window", key="ctx_whole")
view = opts[1].radio("Show", list(TOKEN_VIEWS), horizontal=True, key="ctx_tokens")
model = TOKEN_VIEWS[view]


everything = data.contexts(path, run_id, fid)
# A token view needs each context's window with token ids and offsets: all in one query.
windows = (
    data.windows(path, run_id, tuple(sorted({c.window_id for c in everything})))
    if model is not None
    else {}
)


def show(contexts: list) -> None:
    """Render contexts as highlighted HTML in the chosen view."""
    if not contexts:
        st.caption("none")
        return
    parts = []
    for context in contexts:
        if model is None:
            parts.append(context_html(context, max_act, whole))
        else:
            window = windows[context.window_id]
            parts.append(tokens_html(context, window, model, max_act, whole))
    st.html("".join(parts))


top = [c for c in everything if c.kind == "top"]
quantile = [c for c in everything if c.kind == "quantile"]
random = [c for c in everything if c.kind == "random"]
if not everything:
    st.info("This feature has no stored contexts (it never fired on the analysed text).")
st.markdown(f"**Top activations** ({len(top)}), colour scaled to the max {fmt(max_act)}")
show(top)

bins = sorted({int(c.quantile) for c in quantile if c.quantile is not None}, reverse=True)
if bins:
    st.markdown("**By activation quantile** (bin 0 = the weakest fifth of activating contexts)")
    for q in bins:
        group = [c for c in quantile if c.quantile == q]
        peak = max(c.max_act for c in group)
        with st.expander(f"Quantile bin {q} · {len(group)} contexts · up to {fmt(peak)}"):
            show(group)
with st.expander(f"Random non-activating examples ({len(random)})", expanded=False):
    show(random)

probe_panel(run_id, fid, info, max_act)
steering_panel(path, run_id, fid, info, stats)
verification_panel(path, run_id, fid)

# -- neighbours and matches ------------------------------------------------------------

st.subheader("Nearest features (decoder cosine)")
near = data.neighbors(path, run_id, fid)
if near.empty:
    st.caption("No neighbours stored.")
else:
    ids = tuple(sorted({int(n) for n in near["neighbor_id"]}))
    lookup = data.feature_table(path, run_id, feature_ids=ids).set_index("feature_id")
    near = near.assign(
        model=near["space"].map({"a": "A", "b": "B"}),
        partition=near["neighbor_id"].map(lookup["partition"]).map(data.label),
        explanation=near["neighbor_id"].map(lookup["explanation"]).fillna(""),
        rank=near["rank"] + 1,  # stored from 0; people count the nearest as 1
        link=[data.feature_link(run_id, n) for n in near["neighbor_id"]],
    )
    shown = near[["model", "rank", "neighbor_id", "partition", "cosine", "explanation", "link"]]
    event = st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        on_select="rerun",
        selection_mode="single-row",
        key=f"near_{fid}",
        column_config={
            "model": st.column_config.TextColumn(
                "decoders of", help="the model whose decoder vectors are compared"
            ),
            "rank": st.column_config.NumberColumn("rank", help="1 = nearest"),
            "neighbor_id": st.column_config.NumberColumn("feature", format="%d"),
            "cosine": st.column_config.NumberColumn("cosine", format="%.3f"),
            "explanation": st.column_config.TextColumn("explanation", width="large"),
            "link": st.column_config.LinkColumn("link", display_text="open"),
        },
    )
    st.caption("Select a row to open that feature here; the link opens it in a new tab.")
    rows = event.selection.rows if event is not None else []
    if rows:
        data.set_feature(int(shown.iloc[rows[0]]["neighbor_id"]))
        st.rerun()

others = [r for r in data.run_ids(path) if r != run_id]
found = []
for other in others:
    hit = data.matches(path, run_id, other, feature_id=fid)
    if not hit.empty:
        found.append(hit.head(1))
if found:
    st.subheader("Matches in other runs")
    best = pd.concat(found)
    st.dataframe(
        pd.DataFrame(
            {
                "run": best["other_run_id"],
                "feature": best["other_feature_id"],
                "partition": best["other_partition"].map(data.label),
                "cosine": best["cosine"],
                "recurs": best["cosine"] >= data.RECUR,
                "link": [
                    data.feature_link(r, f)
                    for r, f in zip(best["other_run_id"], best["other_feature_id"], strict=True)
                ],
            }
        ),
        hide_index=True,
        width="stretch",
        column_config={
            "feature": st.column_config.NumberColumn("feature", format="%d"),
            "cosine": st.column_config.NumberColumn("decoder cosine", format="%.3f"),
            "recurs": st.column_config.CheckboxColumn(
                "recurs", help=f"decoder cosine ≥ {data.RECUR}"
            ),
            "link": st.column_config.LinkColumn("link", display_text="open"),
        },
    )

history = data.explanations(path, run_id, fid)
if len(history) > 1:
    with st.expander(f"All explanations ({len(history)})"):
        st.dataframe(
            history[["explainer", "prompt_version", "explanation", "harmful", "created_at"]],
            hide_index=True,
            width="stretch",
        )
