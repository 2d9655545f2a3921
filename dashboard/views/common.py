"""Rendering shared by the views: highlighted contexts, token views, badges and the audit
report. Plain functions of their inputs (no Streamlit state), so they are easy to test.

Every piece of text that reaches HTML (contexts, explanations, notes) goes through
`html.escape`; only the markup built here is raw.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.data import label
from dashboard.markdown import md, md_code, spreadsheet_safe
from engine import categories
from engine.contexts import Context
from engine.steering.exclusivity import is_proxy, score_text
from engine.steering.stitching import FVE_WARN_BELOW

# Partitions and categories: leaning shared features in a lighter shade of their model's.
PARTITION_COLOURS = {
    categories.A_EXCLUSIVE: "#d62728",
    categories.A_LEANING: "#f08080",
    categories.SHARED: "#7f7f7f",
    categories.DESIGNATED: "#9467bd",
    categories.B_LEANING: "#6fa8dc",
    categories.B_EXCLUSIVE: "#1f77b4",
}
# How a text is shown: aligned spans (tokenizer-independent) or one model's own tokens.
TOKEN_VIEWS = {"aligned spans": None, "model A tokens": "a", "model B tokens": "b"}
HIGHLIGHT = (255, 140, 0)  # orange; opacity scales with activation / feature max
TEXT_STYLE = (
    "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; "
    "white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.7; padding: 6px 8px; "
    "border: 1px solid #ddd; "
    "border-radius: 6px; margin-bottom: 6px"
)


def esc(value: Any) -> str:
    """HTML-escaped text of any value (None becomes empty)."""
    return "" if value is None or _missing(value) else html.escape(str(value), quote=True)


def _missing(value: Any) -> bool:
    """Whether a cell is missing (None, NaN, pd.NA, NaT)."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number for display; missing values show as an en dash."""
    if value is None or _missing(value):
        return "–"
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return str(value)


def yes_no(value: Any) -> str:
    """A flag for display: "yes", "no", or an en dash when unknown."""
    if value is None or _missing(value):
        return "–"
    return "yes" if bool(value) else "no"


def timestamp(value: Any) -> str:
    """A time to the minute ("2026-11-21 10:34"); empty when missing."""
    if value is None or _missing(value):
        return ""
    try:
        return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(value)


def percent(value: Any) -> str:
    """A share as a percentage with three significant digits ("19.4%", "0.0123%")."""
    if value is None or _missing(value):
        return "–"
    return f"{float(value) * 100:.3g}%"


def badge(category: str) -> str:
    """A coloured HTML badge with the label of a partition or category."""
    colour = PARTITION_COLOURS.get(category, "#7f7f7f")
    return (
        f'<span style="background:{colour}; color:white; padding:2px 8px; border-radius:10px; '
        f'font-size:0.8rem; font-weight:600">{esc(label(category))}</span>'
    )


def _background(act: float, max_act: float) -> str:
    """The highlight colour of an activation, its opacity relative to the feature's max."""
    alpha = 0.0 if max_act <= 0 else min(1.0, max(0.0, act / max_act))
    alpha = 0.12 + 0.88 * alpha  # faint but visible for the weakest active span
    r, g, b = HIGHLIGHT
    return f"rgba({r},{g},{b},{alpha:.2f})"


def _span(text: str, act: float, max_act: float, extra: str = "", title: str = "") -> str:
    """One piece of text, highlighted when active, its activation in the hover title."""
    body = esc(text)
    if act > 0:
        if not text.strip():
            # An active span of only whitespace (a line break, a tab) would be invisible.
            body = esc(text.replace("\n", "↵\n").replace("\t", "→\t").replace(" ", "·"))
        tip = esc(f"{title}activation {act:.3f}")
        return (
            f'<span style="background:{_background(act, max_act)}; border-radius:2px;{extra}" '
            f'title="{tip}">{body}</span>'
        )
    if extra or title:
        return f'<span style="{extra}" title="{esc(title)}">{body}</span>'
    return body


def context_html(context: Context, max_act: float, whole: bool = False) -> str:
    """A context as HTML: its segment (or the whole window) with active spans highlighted."""
    shown = context if whole else context.segment()
    inner = "".join(_span(text, act, max_act) for text, act in shown.pieces())
    return f'<div style="{TEXT_STYLE}">{inner}</div>'


def contexts_html(contexts: Iterable[Context], max_act: float, whole: bool = False) -> str:
    """Several contexts as one HTML block (one box each)."""
    return "".join(context_html(c, max_act, whole) for c in contexts) or "<em>none</em>"


def token_pieces(
    context: Context, window: Mapping[str, Any], model: str, whole: bool = False
) -> list[tuple[str, float, int | None]]:
    """The context's text cut at one model's token boundaries: (text, activation, token id)
    with token id None for text between tokens. A token is active when its end falls in an
    active aligned span."""
    text = window["text"]
    offsets = np.asarray(window.get(f"offsets_{model}"), dtype=np.int64).reshape(-1, 2)
    ids = np.asarray(window.get(f"ids_{model}"), dtype=np.int64).reshape(-1)
    spans = np.asarray(context.spans, dtype=np.int64).reshape(-1, 2)
    acts = np.asarray(context.acts, dtype=np.float64).reshape(-1)
    if whole or not len(spans):
        lo, hi = 0, len(text)
    else:
        lo, hi = int(spans[0, 0]), int(spans[-1, 1])
    out: list[tuple[str, float, int | None]] = []
    pos = lo
    for i, (start, end) in enumerate(offsets.tolist()):
        if end <= start or end <= pos or start >= hi:
            continue  # special tokens (empty) and tokens already covered or out of view
        start = max(start, pos)
        end = min(end, hi)
        if start > pos:
            out.append((text[pos:start], 0.0, None))
        act = 0.0
        j = int(np.searchsorted(spans[:, 1], end, side="left")) if len(spans) else 0
        if j < len(spans) and spans[j, 0] < end:
            act = float(acts[j])
        out.append((text[start:end], act, int(ids[i]) if i < len(ids) else None))
        pos = end
    if pos < hi:
        out.append((text[pos:hi], 0.0, None))
    return out


def tokens_html(
    context: Context, window: Mapping[str, Any], model: str, max_act: float, whole: bool = False
) -> str:
    """The context in one model's own tokens (boxed), tokens ending in an active span
    highlighted."""
    box = " outline:1px solid #bbb; outline-offset:-1px; border-radius:2px; margin:0 1px;"
    parts = []
    for text, act, token in token_pieces(context, window, model, whole):
        if token is None:
            parts.append(esc(text))
        else:
            parts.append(_span(text, act, max_act, extra=box, title=f"token {token} · "))
    return f'<div style="{TEXT_STYLE}">{"".join(parts)}</div>'


def marked_text(context: Context) -> str:
    """The context's segment as plain text with «» around active spans (for reports)."""
    out = []
    for text, act in context.segment().pieces():
        core = text.strip()
        if act > 0 and core:
            # Keep the spaces a token carries outside the marks: " tea" -> " «tea»".
            lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
            out.append(f"{lead}«{core}»{trail}")
        else:
            out.append(text)
    return "".join(out).replace("»«", "")


def activation_histogram(counts: Any, edges: Any, title: str = "") -> go.Figure | None:
    """A bar chart of the activation histogram over its non-empty bins, or None if empty."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    if not len(counts) or counts.sum() == 0 or len(edges) != len(counts) + 1:
        return None
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    names = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(lo, hi)]
    fig = go.Figure(go.Bar(x=names, y=counts[lo:hi], marker_color="#ff8c00"))
    fig.update_layout(
        title=title,
        xaxis_title="activation (log-spaced bins)",
        yaxis_title="pairs",
        height=280,
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
    )
    return fig


def triage_note_html(status: Any, notes: Any, reviewer: Any, updated: Any) -> str:
    """The current triage decision as an HTML callout (every value escaped)."""
    if status is None or _missing(status):
        status = "unreviewed"
    who = f" by {esc(reviewer)}" if reviewer and not _missing(reviewer) else ""
    when = f" at {esc(timestamp(updated))}" if timestamp(updated) else ""
    body = f"<br><span style='white-space:pre-wrap'>{esc(notes)}</span>" if esc(notes) else ""
    return (
        '<div style="border-left:4px solid #ff8c00; padding:4px 10px; margin:4px 0">'
        f"<b>Triage:</b> {esc(status)}{who}{when}{body}</div>"
    )


# -- exclusivity scores -----------------------------------------------------------------


def exclusivity_html(score: Mapping[str, Any]) -> str:
    """An exclusivity score row (`Database.scores`) as an HTML callout: the score, or why
    there is none, with interpretability, similarity, the models steered and the judge."""
    details = score.get("details") or {}
    value = score.get("value")
    low, high = score.get("ci_low"), score.get("ci_high")
    proxy = (
        " <span style='background:#fff3cd; color:#664d03; padding:1px 6px; "
        "border-radius:8px; font-size:0.85em'>offline proxy</span>"
        if is_proxy(score.get("judge"))
        else ""
    )
    if value is not None and not _missing(value):
        interval = ""
        if low is not None and not _missing(low) and high is not None and not _missing(high):
            units = details.get("units")
            over = f" over {esc(units)} prompt × sample units" if units else ""
            interval = f", 95% interval [{esc(fmt(low, '.1f'))}, {esc(fmt(high, '.1f'))}]{over}"
        head = (
            f"<b>Exclusivity {esc(fmt(value, '.1f'))}</b> / 5{proxy}{interval} "
            "<span style='color:#555'>(5: the steering effect does not carry over to the "
            "other model; 1: it does)</span>"
        )
    elif details.get("filtered"):
        head = "<b>Exclusivity: filtered: steering not interpretable</b>"
    else:
        head = "<b>Exclusivity: no score</b> (the judge's answers could not be read)"
    need = details.get("min_interpretability")
    facts = [
        f"interpretability {esc(fmt(details.get('interpretability'), '.2f'))}"
        + (f" (needs ≥ {esc(fmt(need, 'g'))})" if need is not None else ""),
        f"similarity {esc(fmt(details.get('similarity'), '.2f'))}",
        _stitch_text(details),
        f"judge <code style='font-size:0.85em'>{esc(score.get('judge'))}</code>",
    ]
    when = timestamp(score.get("created_at"))
    if when:
        facts.append(esc(when))
    return (
        '<div style="border-left:4px solid #6a3d9a; padding:4px 10px; margin:4px 0">'
        f"{head}<br><span style='color:#555'>{' · '.join(facts)}</span></div>"
    )


def exclusivity_note(row: Mapping[str, Any]) -> str:
    """What goes beside a feature-table row's exclusivity number: its 95% interval and
    "offline proxy" for the offline judge ("" without a score)."""
    value = row.get("exclusivity")
    if value is None or _missing(value):
        return ""
    low, high = row.get("exclusivity_low"), row.get("exclusivity_high")
    parts = []
    if low is not None and not _missing(low) and high is not None and not _missing(high):
        parts.append(f"[{fmt(low, '.1f')}–{fmt(high, '.1f')}]")
    if is_proxy(row.get("exclusivity_judge")):
        parts.append("offline proxy")
    return " ".join(parts)


def _stitch_text(details: Mapping[str, Any]) -> str:
    """Which model was steered how, and the stitch's held-out quality, as escaped text."""
    source, target = str(details.get("source", "?")), str(details.get("target", "?"))
    fve = ((details.get("stitch") or {}).get("fve") or {}).get(f"{source}_to_{target}")
    quality = f" (held-out FVE {fmt(fve, '.2f')})" if fve is not None else ""
    if fve is not None and fve < FVE_WARN_BELOW:
        quality += (
            f"; below {FVE_WARN_BELOW:g}, a target that does not react is weak evidence of "
            "exclusivity"
        )
    return esc(
        f"model {source.upper()} steered with its decoder, model {target.upper()} through "
        f"the stitch{quality}"
    )


def steered_texts_html(entry: Mapping[str, Any], source: str, target: str) -> str:
    """One prompt of an exclusivity score: the judge's verdicts and reasons, then both
    models' texts side by side by strength (every text escaped)."""
    verdicts = []
    for name in ("interpretability", "similarity"):
        verdict = entry.get(name)
        if verdict:
            verdicts.append(
                f"<li><b>{name} {esc(fmt(verdict.get('score'), 'g'))}</b>: "
                f"{esc(verdict.get('reasoning'))}</li>"
            )
        else:
            verdicts.append(f"<li><b>{name}</b>: not rated</li>")
    texts_s, texts_t = entry.get("source_texts") or {}, entry.get("target_texts") or {}
    alphas = sorted(set(texts_s) | set(texts_t), key=_alpha_key)
    cell = "padding:4px 8px; border-top:1px solid #ddd; vertical-align:top"
    rows = "".join(
        f'<tr><td style="{cell}; white-space:nowrap">α = {esc(a)}'
        + (" (baseline)" if _alpha_key(a) == 0 else "")
        + f'</td><td style="{cell}; white-space:pre-wrap">{esc(texts_s.get(a))}</td>'
        f'<td style="{cell}; white-space:pre-wrap">{esc(texts_t.get(a))}</td></tr>'
        for a in alphas
    )
    th = f"{cell}; text-align:left"
    head = (
        f'<tr><th style="{th}">strength</th>'
        f'<th style="{th}">model {esc(source.upper())} (own decoder)</th>'
        f'<th style="{th}">model {esc(target.upper())} (stitched)</th></tr>'
    )
    return (
        f'<div style="margin:8px 0 16px 0"><div><b>Prompt:</b> {esc(entry.get("prompt"))}</div>'
        f'<ul style="margin:4px 0">{"".join(verdicts)}</ul>'
        '<table style="border-collapse:collapse; width:100%; font-size:0.85rem; '
        f'table-layout:fixed"><colgroup><col style="width:9em"><col><col></colgroup>{head}{rows}'
        "</table></div>"
    )


def _alpha_key(alpha: Any) -> float:
    """A strength key of stored texts ("2.5") as a number for sorting."""
    try:
        return float(alpha)
    except (TypeError, ValueError):
        return math.inf


# -- the audit report --------------------------------------------------------------------


def report_markdown(
    run_id: str, rows: pd.DataFrame, contexts: Mapping[int, list[Context]], n_contexts: int = 3
) -> str:
    """A Markdown audit report of reviewed features: partition, explanation, harmful reason,
    detection score, exclusivity score (if any), top contexts with «» around active text,
    and the reviewer's notes."""
    lines = [f"# modeldiff audit report: run {md_code(run_id)}", ""]
    lines.append(f"{len(rows)} feature(s).")
    lines.append("")
    for row in rows.to_dict("records"):
        fid = int(row["feature_id"])
        lines += [f"## Feature {fid} ({label(row.get('category', row.get('partition')))})", ""]
        lines.append(f"- **Explanation:** {_plain(row.get('explanation'))}")
        lines.append(f"- **Explainer:** {_plain(row.get('explainer'))}")
        lines.append(f"- **Harmful:** {yes_no(row.get('harmful'))}")
        lines.append(f"- **Harmful reason:** {_plain(row.get('harmful_reason'))}")
        lines.append(f"- **Detection score:** {fmt(row.get('score'), '.2f')}")
        if not _missing(row.get("exclusivity")) and row.get("exclusivity") is not None:
            score = score_text(
                row["exclusivity"], row.get("exclusivity_low"), row.get("exclusivity_high"),
                row.get("exclusivity_judge"),
            )  # fmt: skip
            lines.append(
                f"- **Exclusivity score:** {score} / 5"  # numbers and fixed words only
                + (" (mean, 95% interval)" if "[" in score else "")
            )
        lines.append(f"- **Relative decoder norm:** {fmt(row.get('rel_norm'), '.3f')}")
        lines.append(f"- **Status:** {_plain(row.get('status'))}")
        lines.append(f"- **Reviewer:** {_plain(row.get('reviewer'))}")
        lines.append(f"- **Notes:** {_plain(row.get('notes'))}")
        lines += ["", "Top contexts:", ""]
        top = [c for c in contexts.get(fid, []) if c.kind == "top"][:n_contexts]
        for i, context in enumerate(top, 1):
            text = marked_text(context).replace("\n", " ").replace("`", "'")
            lines.append(f"{i}. `{text}` (max activation {context.max_act:.3f})")
        if not top:
            lines.append("(no contexts)")
        lines.append("")
    return "\n".join(lines)


def _plain(value: Any) -> str:
    """A cell as one line of literal report text (Markdown in it is escaped: a note or an
    explanation must not turn into a link or an image where the report is rendered)."""
    if value is None or _missing(value) or value == "":
        return "–"
    return md(value)


def report_csv(rows: pd.DataFrame) -> str:
    """The reviewed features' rows as CSV text."""
    columns = [
        "feature_id", "partition", "explanation", "explainer", "harmful", "harmful_reason",
        "score", "judge", "exclusivity", "exclusivity_low", "exclusivity_high",
        "exclusivity_judge", "rel_norm", "density", "max_act", "status", "notes", "reviewer",
        "updated_at",
    ]  # fmt: skip
    out = rows[[c for c in columns if c in rows.columns]].copy()
    if "partition" in out:
        out["partition"] = rows.get("category", rows["partition"]).map(label)
    # Text cells only (a negative number stays a number): no cell runs as a formula.
    for column in out.columns:
        out[column] = out[column].map(spreadsheet_safe)
    return out.to_csv(index=False)


def norm_lean(rel_norm: Any) -> float:
    """How far a feature's relative decoder norm is from 0.5 (0 to 0.5; NaN as 0): the
    decoder-norm notion of exclusivity, not the steering exclusivity score."""
    try:
        value = float(rel_norm)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(value) else abs(value - 0.5)
