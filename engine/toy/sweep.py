"""Toy-model sweep: dictionary sizes x architectures x seeds (paper Figure 4).

Every (architecture, n_features, seed) run trains a crosscoder on the toy model built with
that seed and scores it with `evaluate_recovery`. Results go to ``results.csv`` and
``results.json`` (one row per run), ``summary.csv`` (mean and standard error over seeds)
and ``figure.html``. Rows already in ``results.csv`` are skipped, so an interrupted sweep
resumes where it stopped.

This module is the command line (`modeldiff toy`); the settings live in `sweep_config`, the
run loop in `sweep_run`, and the summary, table and figure in `sweep_report`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from engine.cli.types import Parser
from engine.toy.model import ToyConfig
from engine.toy.sweep_config import SweepConfig, SweepError
from engine.toy.sweep_report import format_table, summarize
from engine.toy.sweep_run import run_sweep


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
    p.add_argument(
        "--swap-margin",
        type=float,
        metavar="MARGIN",
        help="adaptive partitions: a full partition swaps a member for a candidate leaning "
        "more by this margin",
    )
    p.add_argument(
        "--reassign-stop",
        type=float,
        metavar="SHARE",
        help="share of the run after which the partitions settle (only near-exclusive "
        "features move)",
    )
    p.add_argument(
        "--late-lean",
        type=float,
        metavar="LEAN",
        help="while settling, the lean (max(rel, 1 - rel)) a feature needs to move",
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
        "swap_margin": args.swap_margin,
        "reassign_stop": args.reassign_stop,
        "late_lean": args.late_lean,
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
