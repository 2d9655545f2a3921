"""`modeldiff stitch | exclusivity | steer-eval`: the "verify" half of screen-and-verify.

`stitch` fits the crosscoder-free affine maps between the two models; `exclusivity` scores
features by whether their steering effect transfers through that stitch (paper B.5);
`steer-eval` measures a feature's effect on a behaviour rubric per strength (B.5.2-B.5.6).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.analysis.categories import CANDIDATES
from engine.cli_types import (
    any_int,
    finite_float,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    run_id,
)
from engine.interp.anthropic.client import DEFAULT_MODEL as DEFAULT_CLAUDE


def cmd_stitch(args: argparse.Namespace) -> None:
    """Fit affine maps A->B and B->A on a store's paired activations (model stitching)."""
    from engine.harvest.store import ActivationStore
    from engine.steering.stitching import check_stitch_target, train_stitch

    check_stitch_target(args.out)  # before the fit, not after it
    store = ActivationStore(args.store)
    d_a, d_b = store.d_a, store.d_b
    batch_size = min(args.batch_size, len(store))  # a small store is still usable
    print(f"fitting a {d_a} <-> {d_b} stitch on {args.store} ({args.steps} steps)")
    stitch = train_stitch(
        store, d_a, d_b, steps=args.steps, batch_size=batch_size, lr=args.lr,
        holdout=args.holdout, seed=args.seed, device=args.device, samples=args.samples,
    )  # fmt: skip
    stitch.info["store"] = str(Path(args.store).resolve())
    path = stitch.save(args.out)
    fve = ", ".join(f"{k} {v:.3f}" for k, v in stitch.fve.items())
    print(f"held-out fraction of variance explained: {fve}\nsaved {path}")


def generation_settings(args: argparse.Namespace, greedy_default: bool):
    """Decoding settings from --max-new-tokens / --temperature / --seed."""
    from engine.steering.steer import GenerationConfig

    temperature = args.temperature
    if temperature is None:
        temperature = 0.0 if greedy_default else 0.7
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        greedy=temperature == 0,
        temperature=temperature or 0.7,
        seed=args.seed,
    )


def cmd_exclusivity(args: argparse.Namespace) -> None:
    """Score exclusive (and leaning shared) features by whether their steering transfers
    through a stitch."""
    from engine.progress import ProgressBar
    from engine.steering.exclusivity import ExclusivityConfig, exclusivity_run, pick_features
    from engine.steering.judges import steering_judge
    from engine.steering.pair import SteeringPair
    from engine.steering.stitching import Stitch
    from engine.store import Database

    judge = steering_judge(args.judge, args.model)
    cfg = ExclusivityConfig(
        alphas=tuple(args.alphas),
        generation=generation_settings(args, greedy_default=False),
        source=args.source,
    )
    # A missing or damaged stitch is an error even when there is nothing to score.
    stitch = Stitch.load(args.stitch)
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        features = args.features or pick_features(db, args.run_id, args.top, args.categories)
        if not features:
            print("no live exclusive or leaning shared features to score")
            return
        pair = SteeringPair.open(db, args.run_id, stitch, device=args.device)
        with ProgressBar("exclusivity", len(features), enabled=not args.quiet) as bar:
            results = exclusivity_run(
                db, args.run_id, pair, judge, features, cfg, force=args.force,
                on_result=lambda r: bar.update(advance=1, status=_line(r)),
            )  # fmt: skip
    for r in results:
        print(_line(r))
    skipped = len(features) - len(results)
    done = f", {skipped} skipped (already scored or never active)" if skipped else ""
    print(f"{judge.name}: scored {len(results)} features{done}")


def _line(result) -> str:
    """One feature's result as a line."""
    if result.exclusivity is None:
        return (
            f"feature {result.feature_id} ({result.source.upper()}): steering not interpretable "
            f"({_fmt(result.interpretability)} < 3), no score"
        )
    return (
        f"feature {result.feature_id} ({result.source.upper()} -> {result.target.upper()}): "
        f"exclusivity {result.exclusivity:.2f} (similarity {result.similarity:.2f}, "
        f"interpretability {_fmt(result.interpretability)})"
    )


def _fmt(value) -> str:
    """A score or 'n/a'."""
    return "n/a" if value is None else f"{value:.2f}"


def cmd_steer_eval(args: argparse.Namespace) -> None:
    """Rate a feature's steered answers on a behaviour rubric per strength (paper B.5.2-6)."""
    from engine.progress import ProgressBar
    from engine.steering.evaluate import EvalConfig, evaluation_figure, steer_eval
    from engine.steering.judges import steering_judge
    from engine.steering.pair import SteeringPair
    from engine.steering.rubrics import load_prompts, rubric
    from engine.store import Database

    rub = rubric(args.rubric)
    judge = steering_judge(args.judge, args.model)
    cfg = EvalConfig(
        rubric=rub.name,
        alphas=tuple(args.alphas) if args.alphas else None,
        prompts=args.prompts,
        limit=args.limit,
        generation=generation_settings(args, greedy_default=True),
        source=args.source,
        models=tuple(args.models),
    )
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        pair = SteeringPair.open(db, args.run_id, args.stitch, device=args.device)
        total = len(cfg.models) * len(load_prompts(cfg.prompts or rub.prompt_set)[: cfg.limit])
        with ProgressBar(f"steer-eval {rub.name}", total, enabled=not args.quiet) as bar:
            result = steer_eval(
                db, args.run_id, pair, args.feature, judge, cfg,
                on_progress=lambda done, _total: bar.update(completed=done),
            )  # fmt: skip
    table = result.summary.pivot_table(
        index="alpha", columns=["steered_with", "metric"], values="mean"
    )
    print(table.round(2).to_string())
    print(f"{judge.name}: stored as evaluation {result.eval_id} in {args.db}")
    if args.figure:
        title = f"feature {args.feature}: {rub.title}"
        evaluation_figure(result.summary, rub.metric, title).write_html(args.figure)
        print(f"figure: {args.figure}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register stitch, exclusivity and steer-eval."""
    p = sub.add_parser("stitch", help=cmd_stitch.__doc__, description=cmd_stitch.__doc__)
    p.add_argument("--store", required=True, type=Path, help="activation store to fit on")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--steps", type=positive_int, default=500)
    p.add_argument("--batch-size", type=positive_int, default=1024)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--holdout", type=open_fraction, default=0.1, help="fraction of pairs held out")
    p.add_argument(
        "--samples", type=positive_int, default=32768, help="pairs drawn for fit + hold-out"
    )
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_stitch)

    for name, func in (("exclusivity", cmd_exclusivity), ("steer-eval", cmd_steer_eval)):
        p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.add_argument("--db", required=True, type=Path)
        p.add_argument("--run-id", required=True, type=run_id)
        p.add_argument("--stitch", required=True, type=Path, help="from `modeldiff stitch`")
        p.add_argument(
            "--judge",
            choices=("offline", "anthropic"),
            default="offline",
            help="offline (MiniLM embeddings, no key) or anthropic (needs ANTHROPIC_API_KEY)",
        )
        p.add_argument("--model", default=DEFAULT_CLAUDE, help="Claude model for the judge")
        p.add_argument(
            "--source",
            choices=("a", "b"),
            default=None if name == "exclusivity" else "a",
            help="the model to steer shared features from"
            + (" (default: the model a feature leans to, else a)" if name == "exclusivity" else ""),
        )
        p.add_argument("--max-new-tokens", type=positive_int, default=200)
        p.add_argument(
            "--temperature",
            type=non_negative_float,
            default=None,
            help="0 = greedy (default: 0.7 with top-p 0.9 for exclusivity, greedy for steer-eval)",
        )
        p.add_argument("--seed", type=any_int, default=0)
        p.add_argument("--device", default="auto")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=func)
        if name == "exclusivity":
            p.add_argument(
                "--features", nargs="+", type=non_negative_int, help="feature ids to score"
            )
            p.add_argument(
                "--top",
                type=positive_int,
                default=5,
                help="without --features: this many per category (flagged first)",
            )
            p.add_argument(
                "--categories",
                nargs="+",
                choices=CANDIDATES,
                metavar="CATEGORY",
                help=f"without --features: pick from these ({', '.join(CANDIDATES)}; default: "
                "the exclusive partitions, all four when the run has none)",
            )
            p.add_argument(
                "--alphas", nargs="+", type=finite_float, default=[float(a) for a in range(11)]
            )
            p.add_argument("--force", action="store_true", help="rescore features already done")
        else:
            p.add_argument("--feature", required=True, type=non_negative_int)
            p.add_argument("--rubric", required=True, help="e.g. china_alignment (see docs)")
            p.add_argument("--prompts", help="prompt-set name or file (default: the rubric's)")
            p.add_argument("--limit", type=positive_int, help="only the first N prompts")
            p.add_argument(
                "--alphas", nargs="+", type=finite_float, help="default: the paper's grid"
            )
            p.add_argument(
                "--models",
                nargs="+",
                choices=("source", "target"),
                default=["source", "target"],
                help="steer the feature's own model, the other one (stitched), or both",
            )
            p.add_argument("--figure", type=Path, help="write the Figure-6 plot (HTML)")
