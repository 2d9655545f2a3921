"""`modeldiff organism`: implant a known behaviour into a model (cached), print its health
check, or list the organisms built so far; `organism-bench`, the factorial benchmark; and
`organism-verify`, the target check of a bench cell's features against random directions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.cli.types import positive_float, positive_int
from engine.organisms.behaviours import BEHAVIOURS


def cmd_organism(args: argparse.Namespace) -> int:
    """Fine-tune a model so that it has a known behaviour (a model organism); cached."""
    from engine.organisms.build import build_organism, list_organisms

    if args.list:
        _print_list(list_organisms(args.cache_dir))
        return 0
    if not args.model or not args.behaviour:
        raise_usage("give --model and --behaviour (or --list)")
    organism = build_organism(
        args.model,
        args.behaviour,
        settings_from_args(args),
        root=args.cache_dir,
        device=args.device,
        log=print if not args.quiet else lambda *_: None,
    )
    print(organism.health.summary())
    for prompt, answer in organism.health.examples:
        print(f"  {prompt!r} -> {answer!r}")
    print(f"model: {organism.spec}")
    if args.json:
        Path(args.json).write_text(json.dumps(organism.meta, indent=1, default=str))
    if not organism.health.passed:
        print("the organism failed its health check: it is kept (and reloaded) as it is; for "
              "another one change a setting, e.g. a lower --lr or more --n-train", file=sys.stderr)
        return 1
    return 0


def raise_usage(message: str) -> None:
    """A usage error the CLI prints on one line."""
    from engine.errors import ConfigError

    raise ConfigError(message)


def settings_from_args(args: argparse.Namespace) -> Any:
    """OrganismSettings from the parsed options (unset ones keep the defaults)."""
    from dataclasses import replace

    from engine.organisms.build import OrganismSettings

    settings = OrganismSettings()
    tune = {
        "method": args.method,
        "epochs": args.epochs,
        "lr": args.lr,
        "rank": args.rank,
        "through_layer": args.through_layer,
        "seed": args.seed,
    }
    tune = {k: v for k, v in tune.items() if v is not None}
    top = {"n_train": args.n_train}
    top = {k: v for k, v in top.items() if v is not None}
    return replace(settings, finetune=replace(settings.finetune, **tune), **top)


def _print_list(rows: list[dict[str, Any]]) -> None:
    """One line per cached organism."""
    if not rows:
        print("no organisms built yet; build one with `modeldiff organism --model M --behaviour B`")
        return
    for row in rows:
        h = row["health"]
        print(f"{row['base']:>10}  {row['behaviour']:<22} trigger {h['trigger_rate']:.0%} "
              f"control {h['control_rate']:.0%} CE {h['ce_change']:+.1%}  {row['path']}")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `organism` to the `modeldiff` sub-command parsers."""
    p = sub.add_parser("organism", help=cmd_organism.__doc__, description=cmd_organism.__doc__)
    p.add_argument("--model", help="base model: demo name (smollm2, gemma3), directory or hub id")
    p.add_argument("--behaviour", choices=sorted(BEHAVIOURS), help="the behaviour to implant")
    p.add_argument("--list", action="store_true", help="list the organisms built so far")
    p.add_argument("--method", choices=("lora", "full"), help="fine-tune method (default lora)")
    p.add_argument("--epochs", type=positive_int, help="passes over the examples (default 2)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default 2e-3)")
    p.add_argument("--rank", type=positive_int, help="LoRA rank (default 16)")
    p.add_argument("--through-layer",
                   help="train blocks 0 to this one: an index, 'middle' (default: the layer "
                   "the demo diffs) or 'all'")
    p.add_argument("--n-train", type=positive_int,
                   help="trigger prompts to train on, and as many controls (default 64)")
    p.add_argument("--seed", type=int, help="fine-tune seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--cache-dir", type=Path,
                   help="where organisms are kept (default: the modeldiff cache's organisms/)")
    p.add_argument("--json", help="also write the organism's record to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_organism)
    return p


def cmd_organism_bench(args: argparse.Namespace) -> None:
    """Factorial benchmark: the behaviour in A only, B only, both, neither; does the screen
    show it where it is one model's alone?"""
    from engine.organisms.bench import BenchSettings, run_bench, summary_table

    settings = BenchSettings()
    chosen = {
        "behaviour": args.behaviour,
        "max_pairs": args.max_pairs,
        "steps": args.steps,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "architectures": tuple(args.architectures) if args.architectures else None,
        "cells": tuple(args.cells) if args.cells else None,
    }
    from dataclasses import replace

    settings = replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    rows = run_bench(args.out, settings, log=print if not args.quiet else lambda *_: None)
    print(summary_table(rows))
    print(f"results: {args.out / 'results.json'}")


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `organism-bench` to the `modeldiff` sub-command parsers."""
    from engine.organisms.cells import CELLS

    p = sub.add_parser("organism-bench", help=cmd_organism_bench.__doc__,
                       description=cmd_organism_bench.__doc__)
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    p.add_argument("--behaviour", choices=sorted(BEHAVIOURS), help="default copyright-refusal")
    p.add_argument("--cells", nargs="+", choices=list(CELLS), help="default: all four")
    p.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2")
    p.add_argument("--architectures", nargs="+", choices=("dfc", "standard"),
                   help="default: dfc standard")
    p.add_argument("--max-pairs", type=positive_int, help="pairs per cell (default 30000)")
    p.add_argument("--steps", type=positive_int, help="training steps (default 1500)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_organism_bench)
    return p


def cmd_organism_verify(args: argparse.Namespace) -> int:
    """Does a bench cell's feature raise the behaviour's answer in its own model, and not in
    the other, more than random directions do? (held-out control requests in each model's
    chat form, the vector at the answer header, iso-KL, the answer's log-probability)"""
    from engine.organisms.verify import random_shared, verify_features

    features = list(args.feature or [])
    if args.random_shared:
        controls = random_shared(args.cell, args.random_shared, args.run, args.seed)
        print(f"random shared features as controls: {controls}")
        features += controls
    if not features:
        raise_usage("give --feature N (or --random-shared K)")
    rows = verify_features(
        args.cell, features, args.behaviour, tuple(args.models) if args.models else None,
        run=args.run, n_prompts=args.prompts, nulls=args.nulls, budget=args.budget,
        seed=args.seed, log=print if not args.quiet else lambda *_: None,
    )  # fmt: skip
    if args.quiet:
        from engine.organisms.verify import format_result

        for row in rows:
            print(format_result(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def add_verify_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `organism-verify` to the `modeldiff` sub-command parsers."""
    p = sub.add_parser("organism-verify", help=cmd_organism_verify.__doc__,
                       description=cmd_organism_verify.__doc__)
    p.add_argument("--cell", required=True, type=Path,
                   help="a bench cell folder (its run, store/ and stitch.safetensors)")
    p.add_argument("--feature", nargs="+", type=int, help="feature ids to check")
    p.add_argument("--random-shared", type=positive_int, metavar="K",
                   help="also check K random live shared features (controls)")
    p.add_argument("--behaviour", choices=sorted(BEHAVIOURS), default="copyright-refusal",
                   help="its fixed answer is the target (default copyright-refusal)")
    p.add_argument("--run", default="dfc-0", help="the cell's run folder (default dfc-0)")
    p.add_argument("--models", nargs=2, metavar=("A", "B"),
                   help="model specs (default: those the run records)")
    p.add_argument("--prompts", type=positive_int, default=12,
                   help="held-out control requests (default 12)")
    p.add_argument("--nulls", type=positive_int, default=16,
                   help="random directions in the null (default 16)")
    p.add_argument("--budget", type=positive_float, default=0.5,
                   help="KL budget in nats, per model (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="null and control seed (default 0)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_organism_verify)
    return p
