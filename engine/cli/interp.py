"""`modeldiff explain | score`: explanations of the features and their detection scores."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine import stages
from engine.cli.types import positive_float, positive_int, run_id


def cmd_explain(args: argparse.Namespace) -> None:
    """Explain features (exclusive partitions first) and flag potentially harmful ones."""
    from engine.interp.run import ordered_features
    from engine.results import Database

    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)  # a clear error for an unknown run
        explainer = stages.explainer(
            args.explainer, db, args.run_id, model=args.model, batch=args.batch
        )
        if stages.paid(explainer):
            n = len(ordered_features(db, args.run_id, args.partitions, args.limit))
            cost = stages.explain_cost(explainer, n)
            if not stages.consent(explainer, cost, yes=args.yes, max_cost=args.max_cost):
                return
        ledger = Path(f"{args.db}.{args.run_id}.batches.json") if args.batch else None
        run = stages.explain(
            db, args.run_id, explainer, partitions=args.partitions, limit=args.limit,
            ledger=ledger, progress=not args.quiet,
        )  # fmt: skip
    print(f"{explainer.name}: {run.summary()}")


def cmd_score(args: argparse.Namespace) -> None:
    """Detection-score the latest explanations (10 top vs 10 random examples per feature)."""
    from engine.interp.run import to_score
    from engine.results import Database

    judge = stages.detection_judge(args.judge, args.model)
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        if stages.paid(judge):
            n = len(to_score(db, args.run_id, judge, args.explainer, args.limit))
            cost = stages.score_cost(judge, n)
            if not stages.consent(judge, cost, yes=args.yes, max_cost=args.max_cost):
                return
        run = stages.score(
            db, args.run_id, judge, explainer=args.explainer, limit=args.limit,
            progress=not args.quiet,
        )  # fmt: skip
    print(f"{judge.name}: {run.summary()}")


def _add_common(sub: argparse._SubParsersAction, name: str, func, who: str):
    """The options explain and score share; `who` is the explainer or the judge."""
    p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument(
        f"--{who}",
        choices=stages.BACKENDS,
        default=stages.DEFAULT_BACKEND,
        help="offline (no key, deterministic) or anthropic (needs ANTHROPIC_API_KEY)",
    )
    p.add_argument("--model", help="Claude model")  # None: the explainer's (judge's) default
    p.add_argument("--limit", type=positive_int, help="at most this many features")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_consent(p)
    p.set_defaults(func=func)
    return p


def add_consent(p: argparse.ArgumentParser) -> None:
    """--yes and --max-cost: consent to paid Claude requests without being asked."""
    p.add_argument(
        "--yes", action="store_true", help="with Claude: do not ask before paid requests"
    )
    p.add_argument(
        "--max-cost", type=positive_float, metavar="USD",
        help="with Claude: do not ask, and stop sending requests once about this many USD "
        "are spent (what was done is kept)",
    )  # fmt: skip


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = _add_common(sub, "explain", cmd_explain, "explainer")
    p.add_argument("--partitions", nargs="+", help="only these partitions")
    p.add_argument("--batch", action="store_true", help="Message Batches API (50%% off)")


def add_score(sub: argparse._SubParsersAction) -> None:
    p = _add_common(sub, "score", cmd_score, "judge")
    p.add_argument(
        "--explainer",
        dest="explainer",
        default=None,
        help="score explanations of this explainer (default: the latest)",
    )
