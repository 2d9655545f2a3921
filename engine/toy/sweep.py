"""Toy-model sweep: dictionary sizes x architectures x seeds (paper Figure 4).

Every (architecture, n_features, seed) run trains a crosscoder on the toy model built with
that seed and scores it with `evaluate_recovery`. Results go to ``results.csv`` and
``results.json`` (one row per run), ``summary.csv`` (mean and standard error over seeds)
and ``figure.html``. Rows already in ``results.csv`` are skipped, so an interrupted sweep
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine.cli.types import Parser
from engine.config import CrosscoderConfig, TrainConfig
from engine.errors import ConfigError, UserError
from engine.files import atomic_write_text
from engine.progress import ProgressBar
from engine.sweep_results import append_row, json_records, load_results, write_csv
from engine.toy.evaluate import evaluate_recovery
from engine.toy.model import ToyConfig, ToyModel

KEYS = ["architecture", "n_features", "seed"]
METRICS = [
    "exclusive_recall",
    "exclusive_recall_relnorm",
    "a_exclusive_recall",
    "b_exclusive_recall",
    "shared_recall",
    "recovery_rate",
    "fp_rate",
    "fp_shared",
    "fp_none",
    "n_labelled_exclusive",
    "fve",
]
ARCH_COLOURS = {"dfc": "#1f77b4", "standard": "#ff7f0e", "dsf": "#d62728"}
# Lighter shades of the same hues for the "recovers no concept" share of false positives.
ARCH_LIGHT = {"dfc": "#9ecae1", "standard": "#fdd0a2", "dsf": "#fcbba1"}
# Settings that may differ between a sweep and its resumption: they only select runs.
_SELECTION_FIELDS = {"sizes", "architectures", "seeds", "out_dir", "device"}


@dataclass
class SweepConfig:
    """What to sweep and how to train each crosscoder."""

    toy: ToyConfig = field(default_factory=lambda: ToyConfig(n_concepts=512, d=64))
    sizes: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    architectures: list[str] = field(default_factory=lambda: ["standard", "dfc", "dsf"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 50
    k: int | None = None  # None: the toy model's target sparsity, rounded
    k_initial: int | None = None  # None: 4 x k
    anneal_steps: int | None = None  # None: a fifth of the steps
    designated_k_multiplier: float = 2.0
    exclusive_fraction: float = 0.05  # DFC: share of features exclusive to each model
    designated_fraction: float = 0.10  # DSF: share of designated-shared features
    score_weighting: str = "sum"  # BatchTopK decoder-norm weight: "sum" (paper) or "mean"
    # Steps between moves of lopsided shared features into the exclusive partitions
    # (TrainConfig.reassign_every); None: the trainer's default, 0: never (the paper).
    reassign_every: int | None = None
    reassign_low: float | None = None  # None: the trainer's defaults
    reassign_high: float | None = None
    adapt_partitions: bool | None = None  # None: the trainer's default (adaptive)
    recycle_after_windows: float | None = None  # None: the trainer's default
    exclusive_start: float | None = None  # None: the trainer's default
    # None: 5% of the training tokens, scaled to these short runs as 10M is to 800M pairs
    # in the paper (but coarser, so AuxK gets a chance to act).
    dead_window_tokens: int | None = None
    # The toy data has no outliers by construction; masking would only drop dense samples.
    outlier_factor: float | None = None
    threshold: float = 0.8
    low: float = 0.2
    high: float = 0.8
    device: str = "cpu"  # the toy crosscoders are small; "auto" uses CUDA when present
    out_dir: str = "toy_sweep"

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive dictionary sizes, got {self.sizes}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds}")
        unknown = sorted(set(self.architectures) - set(ARCH_COLOURS))
        if unknown or not self.architectures:
            raise ValueError(
                f"unknown architecture(s) {unknown or self.architectures}; "
                f"choose from {', '.join(ARCH_COLOURS)}"
            )
        if self.resolved_k > min(self.sizes):
            raise ValueError(
                f"k={self.resolved_k} exceeds the smallest dictionary size {min(self.sizes)}"
            )

    @property
    def resolved_k(self) -> int:
        """Active features per token at the end of annealing."""
        return self.k if self.k is not None else max(1, round(self.toy.sparsity))

    @property
    def resolved_dead_window(self) -> int:
        """Tokens without firing after which a feature counts as dead."""
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        return max(self.batch_size, self.steps * self.batch_size // 20)

    def train_config(self, seed: int, n_features: int) -> TrainConfig:
        """Trainer settings of one run."""
        k = self.resolved_k
        k_initial = self.k_initial if self.k_initial is not None else 4 * k
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            k=k,
            k_initial=min(k_initial, n_features),
            anneal_steps=self.anneal_steps if self.anneal_steps is not None else self.steps // 5,
            designated_k_multiplier=self.designated_k_multiplier,
            dead_window_tokens=self.resolved_dead_window,
            outlier_factor=self.outlier_factor,
            seed=seed,
            log_every=max(1, self.steps // 10),
            checkpoint_every=self.steps,
            device=self.device,
            **self._reassignment(),
        )

    def _reassignment(self) -> dict[str, Any]:
        """The reassignment settings this sweep sets (the rest keep TrainConfig's defaults)."""
        names = ("reassign_every", "reassign_low", "reassign_high", "adapt_partitions")
        names += ("recycle_after_windows", "exclusive_start")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def crosscoder_config(self, architecture: str, n_features: int) -> CrosscoderConfig:
        """Crosscoder shape of one run."""
        return CrosscoderConfig(
            d_a=self.toy.d,
            d_b=self.toy.d,
            n_features=n_features,
            architecture=architecture,
            a_exclusive=self.exclusive_fraction,
            b_exclusive=self.exclusive_fraction,
            designated=self.designated_fraction,
            score_weighting=self.score_weighting,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting."""
        return dataclasses.asdict(self)


class SweepError(UserError, ValueError):
    """An output directory holds results that cannot be combined with this sweep."""


# -- running ----------------------------------------------------------------------------

RunFn = Callable[[SweepConfig, ToyModel, str, int, int], dict[str, Any]]


def train_and_evaluate(
    cfg: SweepConfig, toy: ToyModel, architecture: str, n_features: int, seed: int
) -> dict[str, Any]:
    """Train one crosscoder on the toy model and return its recovery report and fit."""
    from engine.crosscoder.training import train

    result = train(
        cfg.crosscoder_config(architecture, n_features),
        cfg.train_config(seed, n_features),
        source=toy,
        out_dir=None,
        progress=False,
    )
    cc, norm = result.crosscoder, result.normalizer
    # The trainer works on scaled activations; map decoders back to the toy's own units.
    decoder_a = norm.to_raw(cc.decoder_matrix("a").cpu(), "a")
    decoder_b = norm.to_raw(cc.decoder_matrix("b").cpu(), "b")
    report = evaluate_recovery(
        toy, decoder_a, decoder_b, cc.partition.roles(), cfg.threshold, cfg.low, cfg.high
    )
    fit = {k: result.final.get(k) for k in ("fve", "fve_a", "fve_b", "l0", "dead_frac")}
    return {**report.to_dict(), **fit}


def run_sweep(
    cfg: SweepConfig, progress: bool = True, run_fn: RunFn = train_and_evaluate
) -> pd.DataFrame:
    """Run every missing (architecture, size, seed) combination and write all outputs."""
    _check_configs(cfg)  # a bad setting fails before anything is written
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, cfg)
    results = load_results(out, KEYS)
    done = {tuple(r) for r in results[KEYS].itertuples(index=False)} if len(results) else set()
    todo = [
        (arch, size, seed)
        for seed in cfg.seeds
        for size in cfg.sizes
        for arch in cfg.architectures
        if (arch, size, seed) not in done
    ]
    with ProgressBar("toy sweep", len(todo), progress) as bar:
        toys: dict[int, ToyModel] = {}
        for arch, size, seed in todo:
            bar.update(status=f"{arch} F={size} seed={seed}")
            if seed not in toys:  # each seed is its own toy model; toy.seed is not used
                toys[seed] = ToyModel(dataclasses.replace(cfg.toy, seed=seed))
            toy = toys[seed]
            start = time.perf_counter()
            row = {"architecture": arch, "n_features": size, "seed": seed}
            row.update(run_fn(cfg, toy, arch, size, seed))
            row["seconds"] = time.perf_counter() - start
            results = append_row(results, row)
            # Written after every run so an interruption loses at most the current one.
            write_csv(results, out / "results.csv")
            bar.update(advance=1)
    selected = _select(results, cfg)
    write_outputs(selected, cfg, out)
    return selected


def _select(results: pd.DataFrame, cfg: SweepConfig) -> pd.DataFrame:
    """Rows of the runs this configuration asks for, in a stable order."""
    if not len(results):
        return results
    mask = (
        results["architecture"].isin(cfg.architectures)
        & results["n_features"].isin(cfg.sizes)
        & results["seed"].isin(cfg.seeds)
    )
    return results[mask].sort_values(KEYS).reset_index(drop=True)


def _check_configs(cfg: SweepConfig) -> None:
    """Build every run's crosscoder and training config once, as a SweepError if one is bad."""
    try:
        for size in cfg.sizes:
            cfg.train_config(cfg.seeds[0] if cfg.seeds else 0, size)
            for arch in cfg.architectures:
                cfg.crosscoder_config(arch, size)
    except ConfigError as err:
        raise SweepError(str(err)) from None


def _check_same_sweep(out: Path, cfg: SweepConfig) -> None:
    """Refuse to mix results made with different toy or training settings."""
    path = out / "sweep_config.json"
    current = {k: v for k, v in cfg.to_dict().items() if k not in _SELECTION_FIELDS}
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diffs:
            raise SweepError(
                f"{out} holds a sweep made with different settings ({', '.join(diffs)}); "
                f"use another --out directory or delete it to start over"
            )
    else:
        atomic_write_text(path, json.dumps(current, indent=2))


# -- outputs ----------------------------------------------------------------------------


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
    write_csv(summary, out / "summary.csv")
    payload = {
        "config": cfg.to_dict(),
        "results": json_records(results),
        "summary": json_records(summary),
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    figure(summary, cfg).write_html(out / "figure.html", include_plotlyjs=True)


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


# -- command line -----------------------------------------------------------------------


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


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of `modeldiff toy`."""
    p = Parser(
        prog="modeldiff toy",
        description="Sweep crosscoder architectures on the synthetic toy model (paper Fig. 4).",
    )
    p.add_argument("--out", default="toy_sweep", help="output directory (resumable)")
    p.add_argument("--sizes", type=_int_list, help="dictionary sizes, e.g. 128,256,512")
    p.add_argument("--seeds", type=_int_list, help="seeds, e.g. 0,1,2")
    p.add_argument("--architectures", type=_str_list, help="e.g. standard,dfc,dsf")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--batch-size", type=int, help="pairs per training step")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--n-concepts", type=int, help="ground-truth concepts in the toy model")
    p.add_argument("--d", type=int, help="activation width of both toy models")
    p.add_argument("--device", help="cpu (default), auto, cuda or cuda:N")
    p.add_argument(
        "--score-weighting",
        choices=["sum", "mean"],
        help="BatchTopK decoder-norm weight: sum (the paper, default) or mean over models",
    )
    p.add_argument(
        "--reassign-every",
        type=int,
        help="steps between moves of lopsided shared features into exclusive partitions "
        "(0: never, the paper's method)",
    )
    p.add_argument(
        "--reassign-bounds",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="relative decoder norms beyond which a shared feature moves to B / to A",
    )
    p.add_argument(
        "--fixed-partitions",
        action="store_true",
        help="keep the partition sizes fixed during reassignment (moves need a dead "
        "exclusive slot; dead exclusive features stay where they are)",
    )
    p.add_argument(
        "--recycle-after",
        type=float,
        metavar="WINDOWS",
        help="adaptive partitions: dead windows before an exclusive feature returns to shared",
    )
    p.add_argument(
        "--exclusive-start",
        type=float,
        metavar="SHARE",
        help="adaptive partitions: share of each exclusive partition's size it starts with",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sweep (about a minute)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """SweepConfig from parsed arguments (--quick first, explicit options override it)."""
    toy = {"n_concepts": 256, "d": 32} if args.quick else {"n_concepts": 512, "d": 64}
    if args.n_concepts is not None:
        toy["n_concepts"] = args.n_concepts
    if args.d is not None:
        toy["d"] = args.d
    settings: dict[str, Any] = {"toy": ToyConfig(**toy), "out_dir": args.out}
    if args.quick:
        settings.update(sizes=[64, 128, 256, 512], seeds=[0], steps=600, batch_size=512, lr=5e-3)
    overrides = {
        "sizes": args.sizes,
        "seeds": args.seeds,
        "architectures": args.architectures,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": args.device,
        "score_weighting": args.score_weighting,
        "reassign_every": args.reassign_every,
        "reassign_low": args.reassign_bounds[0] if args.reassign_bounds else None,
        "reassign_high": args.reassign_bounds[1] if args.reassign_bounds else None,
        "adapt_partitions": False if args.fixed_partitions else None,
        "recycle_after_windows": args.recycle_after,
        "exclusive_start": args.exclusive_start,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return SweepConfig(**settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of the toy sweep; prints the summary table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        results = run_sweep(cfg, progress=not args.no_progress)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summarize(results)))
    print(f"\n{len(results)} runs in {cfg.out_dir} ({time.perf_counter() - start:.0f} s this call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
