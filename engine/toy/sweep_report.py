"""Outputs of the toy-model sweep: summary over seeds, plain-text table and figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from engine.sweep_results import write_sweep_outputs
from engine.toy.sweep_config import ARCH_COLOURS, ARCH_LIGHT, METRICS, SweepConfig


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over seeds of every metric, per architecture and size."""
    metrics = [m for m in METRICS if m in results.columns]
    grouped = results.groupby(["architecture", "n_features"], sort=True)[metrics]
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.count()
    se = (std / count.pow(0.5)).fillna(0.0)  # a single seed has no spread to report
    summary = pd.concat([mean.add_suffix("_mean"), se.add_suffix("_se")], axis=1)
    summary["n_seeds"] = grouped.size()
    ordered = [c for m in metrics for c in (f"{m}_mean", f"{m}_se")] + ["n_seeds"]
    return summary[ordered].reset_index()


def write_outputs(results: pd.DataFrame, cfg: SweepConfig, out: Path) -> None:
    """Write results.csv/json, summary.csv and figure.html for the selected runs."""
    if not len(results):
        return
    summary = summarize(results)
    write_sweep_outputs(out, cfg.to_dict(), results, summary, lambda: figure(summary, cfg))


def figure(summary: pd.DataFrame, cfg: SweepConfig):
    """Plotly figure: exclusive recall (left) and false-positive make-up (right) vs size."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Exclusive concept recall", "False positives among exclusive features"),
    )
    archs = [a for a in ARCH_COLOURS if a in set(summary["architecture"])]
    for arch in archs:
        part = summary[summary["architecture"] == arch].sort_values("n_features")
        _add_recall(fig, part, arch)
        _add_false_positives(fig, part, arch)
    n_seeds = int(summary["n_seeds"].max())
    fig.update_layout(
        barmode="group",
        title=(
            f"Toy model: {cfg.toy.n_concepts} concepts, d={cfg.toy.d}, "
            f"{2 * cfg.toy.n_exclusive_per_model} exclusive; mean ± s.e. over {n_seeds} seed(s)"
        ),
        legend={"groupclick": "toggleitem"},
        template="plotly_white",
    )
    for col in (1, 2):
        fig.update_xaxes(title_text="dictionary size (features)", type="category", row=1, col=col)
    fig.update_yaxes(title_text="recall", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="fraction of exclusive-labelled features", row=1, col=2)
    return fig


def _add_recall(fig: Any, part: pd.DataFrame, arch: str) -> None:
    """Recall line with a shaded standard-error band."""
    import plotly.graph_objects as go

    x = part["n_features"].astype(str).tolist()
    mean, se = part["exclusive_recall_mean"], part["exclusive_recall_se"]
    colour = ARCH_COLOURS[arch]
    band_x = x + x[::-1]
    band_y = (mean + se).clip(upper=1).tolist() + (mean - se).clip(lower=0).tolist()[::-1]
    fig.add_trace(
        go.Scatter(
            x=band_x,
            y=band_y,
            fill="toself",
            fillcolor=_rgba(colour, 0.2),
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=arch,
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=mean,
            mode="lines+markers",
            name=arch,
            legendgroup=arch,
            line={"color": colour},
            error_y={"type": "data", "array": se, "visible": True},
        ),
        row=1,
        col=1,
    )


def _add_false_positives(fig: Any, part: pd.DataFrame, arch: str) -> None:
    """Stacked bars per architecture: shared-labelled-exclusive (dark) under no-concept (light)."""
    import plotly.graph_objects as go

    x = part["n_features"].astype(str).tolist()
    shared, none = part["fp_shared_mean"], part["fp_none_mean"]
    common = {"x": x, "offsetgroup": arch, "legendgroup": arch}
    fig.add_trace(
        go.Bar(
            y=shared,
            name=f"{arch}: shared concept",
            marker_color=ARCH_COLOURS[arch],
            error_y={"type": "data", "array": part["fp_shared_se"]},
            **common,
        ),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Bar(
            y=none,
            base=shared,
            name=f"{arch}: no concept",
            marker_color=ARCH_LIGHT[arch],
            error_y={"type": "data", "array": part["fp_none_se"]},
            **common,
        ),
        row=1,
        col=2,
    )


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def format_table(summary: pd.DataFrame) -> str:
    """Compact plain-text table of mean ± s.e. recall and false positives."""
    header = f"{'arch':<9}{'F':>6}  {'excl recall':>14}  {'(by rel. norm)':>14}  "
    header += f"{'shared recall':>14}  "
    header += f"{'fp rate':>14}  {'fp shared':>12}  {'fp none':>12}  seeds"
    lines = [header, "-" * len(header)]
    for r in summary.to_dict(orient="records"):
        lines.append(
            f"{r['architecture']:<9}{r['n_features']:>6}  {_cell(r, 'exclusive_recall', 14)}  "
            f"{_cell(r, 'exclusive_recall_relnorm', 14)}  "
            f"{_cell(r, 'shared_recall', 14)}  {_cell(r, 'fp_rate', 14)}  "
            f"{_cell(r, 'fp_shared', 12)}  {_cell(r, 'fp_none', 12)}  {r['n_seeds']:>5}"
        )
    return "\n".join(lines)


def _cell(row: dict[str, Any], metric: str, width: int) -> str:
    """'mean±se' of one metric, right-aligned."""
    return f"{row[f'{metric}_mean']:.3f}±{row[f'{metric}_se']:.3f}".rjust(width)
