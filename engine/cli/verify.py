"""`modeldiff steer | stitch | exclusivity | steer-eval`: the "verify" half of
screen-and-verify.

`steer` generates with a feature added to one model; `stitch` fits the crosscoder-free
affine maps between the two models; `exclusivity` scores features by whether their steering
effect transfers through that stitch (paper B.5); `effects` measures the same without a
judge, against random directions; `steer-eval` measures a feature's effect
on a behaviour rubric per strength (B.5.2-B.5.6).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine import stages
from engine.categories import CANDIDATES
from engine.cli.interp import add_consent
from engine.cli.types import (
    any_int,
    finite_float,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    run_id,
)


def _decoding(args: argparse.Namespace) -> dict:
    """--max-new-tokens / --temperature / --seed (/ --max-batch), for `stages.generation`."""
    batch = stages.given(max_batch=getattr(args, "max_batch", None))  # not a flag of steer
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed, **batch}  # fmt: skip


def cmd_steer(args: argparse.Namespace) -> None:
    """Generate with a feature added to a model: the baseline and each steering strength."""
    from engine.results import Database
    from engine.steering.run import steer_feature
    from engine.steering.steer import GenerationConfig

    cfg = stages.generation(GenerationConfig(), **_decoding(args))
    options = stages.given(
        model=args.model, alphas=args.alphas, positions=args.positions, author=args.author
    )
    with Database(args.db, create=False, hold=False) as db:
        result = steer_feature(
            db, args.run_id, args.feature, args.prompt, cfg=cfg, save=args.save, **options
        )
    note = ""
    if result.transfer:
        note = (
            f" (no decoder in model {result.model.upper()}: translated through the shared "
            "partition)"
        )
    print(
        f"feature {result.feature_id} steering model {result.model.upper()}{note}, "
        f"s_max {result.s_max:.3g}\n"
    )
    print(f"baseline: {result.baseline.strip()}\n")
    for alpha, text in zip(result.alphas, result.steered, strict=True):
        print(f"alpha {alpha:g}: {text.strip()}\n")
    if result.sample_ids:
        print(f"saved {len(result.sample_ids)} samples to {args.db}")


def cmd_stitch(args: argparse.Namespace) -> None:
    """Fit affine maps A->B and B->A on a store's paired activations (model stitching)."""
    import math

    from engine.steering.stitching import fve_lines, stitch_warning

    stitch, path = stages.fit_stitch(
        args.store, args.out, announce=print, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, holdout=args.holdout, seed=args.seed, device=args.device,
        samples=args.samples, ridge=args.ridge, translation=args.translation,
        outlier_norm=math.inf if args.keep_outliers else args.outlier_norm,
    )  # fmt: skip
    print("\n".join(fve_lines(stitch)))
    warning = stitch_warning(stitch)
    if warning:  # part of the report, so on stdout with it
        print(f"warning: {warning}")
    print(f"saved {path}")


def cmd_exclusivity(args: argparse.Namespace) -> None:
    """Score exclusive (and leaning shared) features by whether their steering transfers
    through a stitch."""
    from engine.results import Database
    from engine.steering.exclusivity import pick_features, scored_features
    from engine.steering.stitching import Stitch, stitch_warning

    judge = stages.steering_judge(args.judge, args.model)
    cfg = stages.exclusivity_config(
        alphas=args.alphas, source=args.source, samples=args.samples, **_decoding(args)
    )
    # A missing or damaged stitch is an error even when there is nothing to score.
    stitch = Stitch.load(args.stitch)
    warning = stitch_warning(stitch)
    if warning:  # a weak translation inflates every score below
        print(f"warning: {warning}")
    if args.protocol:
        _calibrate(args, judge, cfg, stitch)
        return
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        features = args.features or pick_features(db, args.run_id, args.top, args.categories)
        if not features:
            print("no live exclusive or leaning shared features to score")
            return
        if stages.paid(judge):
            done = set() if args.force else scored_features(db, args.run_id, judge.name)
            todo = [f for f in features if int(f) not in done]
            if not _consent(args, judge, stages.exclusivity_cost(judge, len(todo), cfg)):
                return
        results = stages.exclusivity(
            db, args.run_id, stitch, judge, features, cfg, device=args.device,
            force=args.force, progress=not args.quiet,
        )  # fmt: skip
    for r in results:
        print(stages.exclusivity_line(r))
    skipped = len(features) - len(results)
    done = f", {skipped} skipped (already scored or never active)" if skipped else ""
    print(f"{judge.name}: scored {len(results)} features{done}")
    if not stages.paid(judge):
        _effects_beside(args, features)


def _effects_beside(args: argparse.Namespace, features) -> None:
    """Without an LLM judge, the judge-free measure of the same features where stored, or
    the command that measures it."""
    from engine.results import Database

    with Database(args.db, create=False, hold=False) as db:
        lines = stages.stored_effect_lines(db, args.run_id, features)
    if lines:
        print("judge-free effect measure (modeldiff effects), against random directions:")
        print("\n".join(f"  {line}" for line in lines))
    missing = len(features) - len(lines)
    if missing:
        print(
            f"{missing} of these features have no judge-free effect measure: `modeldiff effects "
            f"--db {args.db} --run-id {args.run_id} --stitch {args.stitch} --features "
            f"{' '.join(str(f) for f in features)}` reads them against random directions"
        )


def _calibrate(args: argparse.Namespace, judge, cfg, stitch) -> None:
    """`exclusivity --protocol figure5`: score the calibration categories, print each
    category's mean and 95% interval, and write the Figure-5 plot."""
    from engine.results import Database
    from engine.steering.calibration import CalibrationConfig, pending

    options = stages.given(per_category=args.per_category, seed=args.seed)
    calibration = CalibrationConfig(exclusivity=cfg, protocol=args.protocol, **options)
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        if stages.paid(judge):
            todo = pending(db, args.run_id, judge.name, calibration, stitch, force=args.force)
            if not _consent(args, judge, stages.exclusivity_cost(judge, len(todo), cfg)):
                return
        frame = stages.calibrate(
            db, args.run_id, stitch, judge, calibration, device=args.device,
            force=args.force, progress=not args.quiet,
        )  # fmt: skip
    for line in stages.calibration_lines(frame):
        print(line)
    figure = args.figure or args.db.with_name(f"exclusivity-{args.protocol}-{args.run_id}.html")
    stages.calibration_figure(frame, figure, f"run {args.run_id}: exclusivity by category")
    print(f"{judge.name}: {len(frame)} items stored in {args.db}; figure: {figure}")


def cmd_effects(args: argparse.Namespace) -> None:
    """Judge-free verification: measure features' steering effects at a matched KL in both
    models and read how alike they are against random directions (z-score, percentile)."""
    from engine.results import Database
    from engine.steering.exclusivity import pick_features
    from engine.steering.stitching import Stitch, stitch_warning

    cfg = stages.effects_config(
        budget=args.budget, nulls=args.nulls, seed=args.seed, panel=args.panel
    )
    stitch = Stitch.load(args.stitch)
    warning = stitch_warning(stitch)
    if warning:
        print(f"warning: {warning}")
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        features = args.features or pick_features(db, args.run_id, args.top, args.categories)
        if not features:
            print("no live exclusive or leaning shared features to measure")
            return
        results = stages.effects(
            db, args.run_id, stitch, features, cfg, store=args.store, targets=args.target or (),
            device=args.device, force=args.force, progress=not args.quiet,
        )  # fmt: skip
    for fid, effect in results:
        print(stages.effects_line(fid, effect))
    skipped = len(features) - len(results)
    done = f", {skipped} already measured with these settings" if skipped else ""
    print(f"effects: measured {len(results)} features{done}; stored in {args.db}")


def cmd_steer_eval(args: argparse.Namespace) -> None:
    """Rate a feature's steered answers on a behaviour rubric per strength (paper B.5.2-6)."""
    from engine.results import Database
    from engine.steering.rubrics import rubric

    rub = rubric(args.rubric)
    judge = stages.steering_judge(args.judge, args.model)
    cfg = stages.eval_config(
        rub.name, alphas=args.alphas, prompts=args.prompts, limit=args.limit,
        source=args.source, models=args.models, **_decoding(args),
    )  # fmt: skip
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        if stages.paid(judge) and not _consent(args, judge, stages.steer_eval_cost(judge, cfg)):
            return
        result = stages.steer_eval(
            db, args.run_id, args.stitch, args.feature, judge, cfg, device=args.device,
            progress=not args.quiet,
        )  # fmt: skip
    table = result.summary.pivot_table(
        index="alpha", columns=["steered_with", "metric"], values="mean"
    )
    print(table.round(2).to_string())
    print(f"{judge.name}: stored as evaluation {result.eval_id} in {args.db}")
    if args.figure:
        stages.eval_figure(result, args.feature, args.figure)
        print(f"figure: {args.figure}")


def _consent(args: argparse.Namespace, judge, cost: str) -> bool:
    """The cost line shown and the user's consent to it (--yes, --max-cost or asked)."""
    return stages.consent(judge, cost, yes=args.yes, max_cost=args.max_cost)


# -- parsers: a flag left out is None, so the stage's (or its config's) default applies ---------


def add_steer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help=cmd_steer.__doc__, description=cmd_steer.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument("--feature", required=True, type=non_negative_int)
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", choices=("a", "b"), help="the model to steer")
    p.add_argument(
        "--alphas", nargs="+", type=finite_float, help="strengths in units of the feature's s_max"
    )
    p.add_argument(
        "--positions",
        choices=("all", "prompt", "generated", "last"),
        help="where to add the vector (last: only the prompt's last token, the answer header)",
    )
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument("--temperature", type=non_negative_float, help="0: greedy (default)")
    p.add_argument("--seed", type=any_int)
    p.add_argument("--save", action="store_true", help="record the samples in the database")
    p.add_argument("--author", help="who made the samples (saved with them)")
    p.set_defaults(func=cmd_steer)


def add_stitch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stitch", help=cmd_stitch.__doc__, description=cmd_stitch.__doc__)
    p.add_argument("--store", required=True, type=Path, help="activation store to fit on")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument(
        "--steps", type=non_negative_int,
        help="Adam steps on MSE + inversion penalty after least squares (the paper's joint "
        "objective; default 0: it lowers held-out FVE)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--holdout", type=open_fraction, help="fraction of pairs held out")
    p.add_argument("--samples", type=positive_int, help="pairs drawn for fit + hold-out")
    p.add_argument(
        "--ridge", type=non_negative_float,
        help="ridge x the standardised inputs' mean variance (default: chosen on a validation "
        "tenth of the pairs; 0 = plain least squares)",
    )  # fmt: skip
    p.add_argument(
        "--outlier-norm", type=positive_float,
        help="leave out pairs whose norm exceeds this x the median in either model (default 3)",
    )  # fmt: skip
    p.add_argument("--keep-outliers", action="store_true", help="fit and score every pair")
    p.add_argument(
        "--translation", choices=("linear", "affine"),
        help="how steering vectors are translated: linear (default, W v) or affine (the "
        "paper's eq. 18, W v + b; see docs/verification.md)",
    )  # fmt: skip
    p.add_argument("--seed", type=any_int)
    p.add_argument("--device")
    p.set_defaults(func=cmd_stitch)


def _add_steering(sub: argparse._SubParsersAction, name: str, func, source_help: str):
    """The options exclusivity and steer-eval share."""
    from engine.defaults import SAMPLED_TEMPERATURE, SAMPLED_TOP_P

    p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument("--stitch", required=True, type=Path, help="from `modeldiff stitch`")
    p.add_argument(
        "--judge",
        choices=stages.BACKENDS,
        default=stages.DEFAULT_BACKEND,
        help="offline (MiniLM embeddings, no key) or anthropic (needs ANTHROPIC_API_KEY)",
    )
    p.add_argument("--model", help="Claude model for the judge")
    p.add_argument("--source", choices=("a", "b"), help=source_help)
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        help=f"0 = greedy (default: {SAMPLED_TEMPERATURE:g} with top-p {SAMPLED_TOP_P:g} for "
        "exclusivity, greedy for steer-eval)",
    )
    p.add_argument("--seed", type=any_int)
    p.add_argument(
        "--max-batch",
        type=positive_int,
        help="rows (prompt x sample x strength) per batched generation (default: as many "
        "as fit memory)",
    )
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_consent(p)
    p.set_defaults(func=func)
    return p


def add_exclusivity(sub: argparse._SubParsersAction) -> None:
    p = _add_steering(
        sub,
        "exclusivity",
        cmd_exclusivity,
        "the model to steer shared features from (default: the model a feature leans to, else a)",
    )
    p.add_argument("--features", nargs="+", type=non_negative_int, help="feature ids to score")
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
    p.add_argument("--alphas", nargs="+", type=finite_float)
    p.add_argument(
        "--samples",
        type=positive_int,
        help="sampled generations per prompt, each a unit of the score's 95%% interval "
        "(default 3; 1 when greedy)",
    )
    p.add_argument("--force", action="store_true", help="rescore features already done")
    p.add_argument(
        "--protocol",
        choices=("figure5",),
        help="calibrate instead (paper Figure 5): score --per-category features of each "
        "category (A-, B-exclusive, shared) and as many random directions of matched norm, "
        "and plot the distributions",
    )
    p.add_argument(
        "--per-category", type=positive_int, help="with --protocol: items per category (10)"
    )
    p.add_argument(
        "--figure",
        type=Path,
        help="with --protocol: the plot's HTML file (default: beside the database)",
    )


def add_effects(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("effects", help=cmd_effects.__doc__, description=cmd_effects.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument("--stitch", required=True, type=Path, help="from `modeldiff stitch`")
    p.add_argument("--features", nargs="+", type=non_negative_int, help="feature ids")
    p.add_argument(
        "--top", type=positive_int, default=5, help="without --features: this many per category"
    )
    p.add_argument(
        "--categories",
        nargs="+",
        choices=CANDIDATES,
        metavar="CATEGORY",
        help=f"without --features: pick from these ({', '.join(CANDIDATES)})",
    )
    p.add_argument(
        "--store", type=Path, help="activation store the null is drawn from (default: the run's)"
    )
    p.add_argument(
        "--target",
        action="append",
        help="a known string (e.g. a marker sentence) added to the string panel; repeatable",
    )
    p.add_argument("--budget", type=positive_float, help="KL budget per model in nats (0.5)")
    p.add_argument("--nulls", type=positive_int, help="random directions per model (32)")
    p.add_argument("--panel", type=positive_int, help="strings per model and sign (8)")
    p.add_argument("--seed", type=any_int)
    p.add_argument("--force", action="store_true", help="measure features already done")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_effects)


def add_steer_eval(sub: argparse._SubParsersAction) -> None:
    p = _add_steering(sub, "steer-eval", cmd_steer_eval, "the model to steer shared features from")
    p.add_argument("--feature", required=True, type=non_negative_int)
    p.add_argument("--rubric", required=True, help="e.g. china_alignment (see docs)")
    p.add_argument("--prompts", help="prompt-set name or file (default: the rubric's)")
    p.add_argument("--limit", type=positive_int, help="only the first N prompts")
    p.add_argument("--alphas", nargs="+", type=finite_float, help="default: the paper's grid")
    p.add_argument(
        "--models",
        nargs="+",
        choices=("source", "target"),
        help="steer the feature's own model, the other one (stitched), or both",
    )
    p.add_argument("--figure", type=Path, help="write the Figure-6 plot (HTML)")
