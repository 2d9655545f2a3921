"""`modeldiff evaluate`: CE loss recovered of a trained crosscoder, both models."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine import stages
from engine.cli.types import positive_int


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Splice the crosscoder's reconstruction into each model at the captured layer, on
    windows the run held out of training, and report the next-token loss against the
    clean model and the layer zero-ablated (CE loss recovered); writes evaluation.json."""
    result = stages.evaluate(
        args.run, args.store, max_windows=args.windows, out=args.out, device=args.device,
        allow_trained=args.allow_trained, progress=None if args.quiet else print,
    )  # fmt: skip
    from engine.analysis.evaluate import EVALUATION_FILE, summary

    print(summary(result))
    print(f"wrote {args.out or Path(args.run) / EVALUATION_FILE}")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    from engine.defaults import EVALUATION_WINDOWS as DEFAULT_WINDOWS

    p = sub.add_parser(
        "evaluate",
        help="CE loss recovered with the reconstruction spliced in (evaluation.json)",
        description=cmd_evaluate.__doc__,
    )
    p.add_argument("--run", required=True, type=Path, help="run directory of modeldiff train")
    p.add_argument(
        "--store",
        type=Path,
        help="the activation store it used (default for a --stream run: its RUN/store)",
    )
    p.add_argument(
        "--windows",
        type=positive_int,
        help=f"held-out windows to evaluate on (default {DEFAULT_WINDOWS})",
    )
    p.add_argument(
        "--out", type=Path, help="where to write the results (default RUN/evaluation.json)"
    )
    p.add_argument("--device", help="where the models run: auto (default), cpu, cuda")
    p.add_argument(
        "--allow-trained",
        action="store_true",
        help="a run that held nothing out: measure on its first windows (training text)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_evaluate)
