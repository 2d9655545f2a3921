"""Planted-concept benchmark on the demo store: where does each crosscoder put a concept only
one model has?

Plants a concept into SmolLM2 (A) and into Gemma-3 (B), sweeps its strength, trains the
standard crosscoder, the paper's DFC and the default DFC (with reassignment) at the demo
preset's budget (2,000 steps of 256 pairs) and prints a table; the figure and per-run rows
go to --out (see docs/planted.md).

    modeldiff harvest --config demo --out runs/demo/store  # the clean store (or: modeldiff demo)
    python benchmarks/planted.py                          # residual planting, 3 seeds
    python benchmarks/planted.py --kind token             # trigger tokens the other model sees
    python benchmarks/planted.py --kind embedding         # re-harvests once per planting
    python benchmarks/planted.py --quick                  # one seed, two strengths, 500 steps
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.activations import StoreError
from engine.config import ConfigError
from engine.planted import KINDS
from engine.planted.sweep import PlantedConfig, format_table, run_planted, summarize
from engine.planted.variants import DEFAULT_VARIANTS, parse_variant


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print its table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="runs/demo/store", help="clean store (the demo's)")
    p.add_argument("--out", default=None, help="output directory (default runs/planted-KIND)")
    p.add_argument("--kind", choices=KINDS, default="residual")
    # The paper's DFC beside the default one (with reassignment) and the standard baseline.
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--strengths", nargs="+", type=float, help="default: the kind's sweep")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 strengths, 500 steps")
    args = p.parse_args(argv)
    settings = {
        "store": args.store,
        "out_dir": args.out or f"runs/planted-{args.kind}",
        "kind": args.kind,
        "variants": dict(parse_variant(v) for v in args.variants),
        "seeds": args.seeds,
        "strengths": args.strengths,
    }
    if args.quick:
        strengths = {"residual": [0.1, 0.4], "token": [0.1, 0.4], "embedding": [0.5, 2.0]}
        strengths = strengths[args.kind]
        settings.update(seeds=[0], strengths=args.strengths or strengths, steps=500)
    start = time.perf_counter()
    try:
        results = run_planted(PlantedConfig(**settings))
    except (ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summarize(results)))
    print(f"\n{len(results)} runs ({time.perf_counter() - start:.0f} s); {settings['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
