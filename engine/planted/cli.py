"""`modeldiff planted`: plant a concept into one model of a store's pair, train crosscoder
variants on it and report which partition catches it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.planted import KINDS
from engine.planted.variants import DEFAULT_VARIANTS, KNOWN_VARIANTS, parse_settings, parse_variant

if TYPE_CHECKING:
    from engine.planted.sweep import PlantedConfig


def cmd_planted(args: argparse.Namespace) -> None:
    """Plant a concept only one model has; train crosscoders; report where it lands."""
    from engine.models.loading import quiet_transformers
    from engine.planted.sweep import format_table, run_planted, summarize

    cfg = config_from_args(args)
    quiet_transformers()
    start = time.perf_counter()
    results = run_planted(cfg, progress=not args.quiet)
    if not len(results):
        print("no runs selected")
        return
    print(format_table(summarize(results)))
    out = Path(cfg.out_dir)
    print(
        f"\n{len(results)} runs in {out} ({time.perf_counter() - start:.0f} s this call); "
        f"figure: {out / 'figure.html'}"
    )


def config_from_args(args: argparse.Namespace) -> PlantedConfig:
    """PlantedConfig from parsed arguments (unset options keep the defaults)."""
    from engine.planted.sweep import PlantedConfig

    variants = dict(parse_variant(spec) for spec in args.variants or DEFAULT_VARIANTS)
    settings: dict[str, Any] = {
        "store": str(args.store),
        "out_dir": str(args.out),
        "kind": args.kind,
        "variants": variants,
        "overrides": parse_settings(args.set or []),
        "keep_models": args.keep_models,
        "keep_runs": args.keep_runs,
    }
    optional = {
        "into": args.into,
        "strengths": args.strengths,
        "rates": args.rates,
        "seeds": args.seeds,
        "preset": args.preset,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "device": args.device,
        "max_pairs": args.max_pairs,
        "holdout": args.holdout,
    }
    settings.update({k: v for k, v in optional.items() if v is not None})
    return PlantedConfig(**settings)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `planted` to the `modeldiff` sub-command parsers."""
    p = sub.add_parser("planted", help=cmd_planted.__doc__, description=cmd_planted.__doc__)
    p.add_argument("--store", required=True, type=Path, help="clean activation store of the pair")
    p.add_argument("--out", required=True, type=Path, help="output directory (resumable)")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="residual",
        help="residual: add to stored activations on random pairs (no model change, the "
        "other model is blind to it; default); token: add to stored activations where the "
        "planted model reads one of the trigger tokens (the other model sees the same "
        "tokens); embedding: plant into the input embeddings of trigger tokens and harvest "
        "again",
    )
    p.add_argument("--into", nargs="+", choices=("a", "b"), help="planted model(s), default a b")
    p.add_argument(
        "--strengths",
        nargs="+",
        type=float,
        help="x the median activation norm (residual) or embedding-row norm (embedding)",
    )
    p.add_argument("--rates", nargs="+", type=float, help="share of pairs planted (default 0.03)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (direction, triggers, training)")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME[:KEY=VALUE,...]",
        help=f"crosscoders to train (default {' '.join(DEFAULT_VARIANTS)}; known: "
        f"{', '.join(KNOWN_VARIANTS)}); e.g. dfc-mean or mine:score_weighting=mean",
    )
    p.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=VALUE",
        help="crosscoder/train settings for every variant, e.g. n_features=8192 lr=1e-3",
    )
    p.add_argument("--preset", help="settings the runs start from (default demo)")
    p.add_argument("--steps", type=int, help="training steps (the schedule scales with them)")
    p.add_argument("--batch-size", type=int, help="pairs per training step")
    p.add_argument("--device", help="training device: auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--max-pairs", type=int, help="pairs used (residual) or harvested per planting (embedding)"
    )
    p.add_argument("--holdout", type=float, help="share of pairs held out for evaluation")
    p.add_argument("--keep-models", action="store_true", help="keep the planted model dirs")
    p.add_argument("--keep-runs", action="store_true", help="keep each crosscoder's run dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_planted)
    return p
