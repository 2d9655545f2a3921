"""Outputs of the planted-concept sweep: summary, plain-text table, run lines and figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from engine.planted.sweep_config import PlantedConfig
from engine.sweep_results import write_sweep_outputs

OUTCOME_COLOURS = {
    "right partition": "#2ca02c",
    "wrong partition": "#ff7f0e",
    "not learned": "#999999",
}
GROUP = ["variant", "into", "strength", "rate"]
_MEANS = ["best_f1", "right_f1", "best_rel_norm", "best_cosine", "fve_a", "fve_b"]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per variant, model, strength and rate: runs, how many learned / right, mean scores."""
    frame = results.copy()
    for name in ("learned", "correct"):
        frame[name] = frame[name].astype(str).str.lower() == "true"
    grouped = frame.groupby(GROUP, sort=True)
    summary = grouped[_MEANS].mean()
    summary["runs"] = grouped.size()
    summary["learned"] = grouped["learned"].sum()
    summary["correct"] = grouped["correct"].sum()
    summary["best_label"] = grouped["best_label"].agg(lambda s: s.mode().iloc[0])
    dead = [c for c in ("dead_frac_a_exclusive", "dead_frac_b_exclusive") if c in frame]
    for column in dead:
        summary[column] = grouped[column].mean()
    return summary.reset_index()


def format_table(summary: pd.DataFrame) -> str:
    """Compact plain-text table of the summary."""
    header = (
        f"{'variant':<12}{'into':<5}{'strength':>9}{'rate':>7}{'runs':>5}  {'best F1':>7}  "
        f"{'label':<6}{'rel':>5}{'cos':>6}  {'F1 right':>8}  {'right':>5}  {'FVE A':>6}"
        f"{'FVE B':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in summary.to_dict(orient="records"):
        lines.append(
            f"{r['variant']:<12}{r['into'].upper():<5}{r['strength']:>9g}{r['rate']:>7g}"
            f"{r['runs']:>5}  {_num(r['best_f1'], 7)}  {r['best_label']:<6}"
            f"{_num(r['best_rel_norm'], 5, 2)}{_num(r['best_cosine'], 6, 2)}  "
            f"{_num(r['right_f1'], 8)}  {int(r['correct']):>2}/{int(r['runs']):<2}  "
            f"{_num(r['fve_a'], 6)}{_num(r['fve_b'], 7)}"
        )
    return "\n".join(lines)


def _num(value: Any, width: int, digits: int = 3) -> str:
    if value is None or _isnan(value):
        return "–".rjust(width)
    return f"{value:.{digits}f}".rjust(width)


def write_outputs(results: pd.DataFrame, cfg: PlantedConfig, out: Path) -> None:
    """Write results.json, summary.csv and figure.html for the selected runs."""
    if not len(results):
        return
    summary = summarize(results)
    write_sweep_outputs(out, cfg.to_dict(), results, summary, lambda: figure(results, cfg))


def outcome(row: dict[str, Any]) -> str:
    """'right partition', 'wrong partition' (learned elsewhere) or 'not learned'."""
    if str(row["correct"]).lower() == "true":
        return "right partition"
    return "wrong partition" if str(row["learned"]).lower() == "true" else "not learned"


def figure(results: pd.DataFrame, cfg: PlantedConfig):
    """Plotly grid (planted model x variant): best F1 against strength, coloured by where
    the concept landed; a dashed line is the best F1 among features labelled right."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    variants = [v for v in cfg.variants if v in set(results["variant"])]
    intos = [m for m in cfg.into if m in set(results["into"])]
    fig = make_subplots(
        rows=len(intos),
        cols=len(variants),
        subplot_titles=[f"{v}: planted into {m.upper()}" for m in intos for v in variants],
        shared_yaxes=True,
    )
    shown: set[str] = set()
    for r, into in enumerate(intos, start=1):
        for c, variant in enumerate(variants, start=1):
            part = results[(results["into"] == into) & (results["variant"] == variant)]
            _add_runs(fig, part, r, c, shown, go)
            _add_right_line(fig, part, r, c, shown, go)
    fig.update_xaxes(type="log", title_text="strength")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_yaxes(title_text="best feature F1", col=1)
    fig.update_layout(
        title=f"Planted concept ({cfg.kind}): where each crosscoder puts it",
        template="plotly_white",
    )
    return fig


def _add_runs(fig: Any, part: pd.DataFrame, row: int, col: int, shown: set[str], go) -> None:
    """One marker per run, coloured by outcome, with the details on hover."""
    rows = part.to_dict(orient="records")
    for name, colour in OUTCOME_COLOURS.items():
        mine = [r for r in rows if outcome(r) == name]
        if not mine:
            continue
        fig.add_trace(
            go.Scatter(
                x=[r["strength"] for r in mine],
                y=[r["best_f1"] for r in mine],
                mode="markers",
                marker={"color": colour, "size": 10, "line": {"width": 1, "color": "#333"}},
                name=name,
                legendgroup=name,
                showlegend=name not in shown,
                text=[_hover(r) for r in mine],
                hoverinfo="text",
            ),
            row=row,
            col=col,
        )
        shown.add(name)


def _add_right_line(fig: Any, part: pd.DataFrame, row: int, col: int, shown: set[str], go):
    """Mean best F1 among features labelled with the planted model, per strength."""
    if part["right_f1"].isna().all():
        return
    mean = part.groupby("strength")["right_f1"].mean().sort_index()
    name = "best F1 labelled with the planted model (mean)"
    fig.add_trace(
        go.Scatter(
            x=mean.index.tolist(),
            y=mean.tolist(),
            mode="lines",
            line={"dash": "dash", "color": "#2ca02c"},
            name=name,
            legendgroup=name,
            showlegend=name not in shown,
        ),
        row=row,
        col=col,
    )
    shown.add(name)


def _hover(r: dict[str, Any]) -> str:
    """Hover text of one run."""
    f = {k: _num(r.get(k), 0).strip() for k in ("best_f1", "best_cosine", "fve_a", "fve_b")}
    return (
        f"seed {r['seed']}, rate {r['rate']:g}<br>best F1 {f['best_f1']} "
        f"(P {r['best_precision']:.2f}, R {r['best_recall']:.2f})<br>{r['best_role']}, "
        f"rel. norm {r['best_rel_norm']:.2f}, cos {f['best_cosine']}<br>"
        f"FVE A {f['fve_a']}, B {f['fve_b']}"
    )


def describe(row: dict[str, Any]) -> str:
    """One line about a finished run."""
    right = row.get("right_f1")
    right_text = "n/a" if right is None or _isnan(right) else f"{right:.2f}"
    verdict = "right partition" if row["correct"] else (
        "wrong partition" if row["learned"] else "not learned"
    )  # fmt: skip
    return (
        f"{row['variant']} into {row['into'].upper()} strength {row['strength']:g} rate "
        f"{row['rate']:g} seed {row['seed']}: best F1 {row['best_f1']:.2f} "
        f"({row['best_role']}, rel. norm {row['best_rel_norm']:.2f}), best F1 labelled "
        f"{row['into'].upper()} {right_text} -> {verdict} ({row['seconds']:.0f} s)"
    )


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
