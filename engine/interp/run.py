"""`explain` and `score` over a run in the results database, resumable and in safety order.

Features are visited exclusive partitions first (A-exclusive, B-exclusive, designated,
then shared), strongest first within a partition, so an interrupted or budget-limited run
has covered what an analyst looks at first. Each result is written as soon as it arrives;
a rerun skips what is already recorded for the same explainer/judge and prompt version.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from engine.interp.base import Explainer, ExplainRun, FeatureExamples, Judge
from engine.interp.detection import detection_score
from engine.interp.parse import ParseError
from engine.partition import Role
from engine.progress import ProgressBar
from engine.results import Database

PARTITION_ORDER = tuple(
    role.value for role in (Role.A_EXCLUSIVE, Role.B_EXCLUSIVE, Role.DESIGNATED, Role.SHARED)
)


def ordered_features(
    db: Database, run_id: str, partitions: list[str] | None = None, limit: int | None = None
) -> list[int]:
    """Live features in safety order: exclusive partitions first, then by max activation."""
    table = db.features(run_id, partition=partitions, dead=False)
    rank = {p: i for i, p in enumerate(PARTITION_ORDER)}
    table = table.assign(_p=table["partition"].map(rank)).sort_values(
        ["_p", "max_act", "feature_id"], ascending=[True, False, True]
    )
    ids = table["feature_id"].astype(int).tolist()
    return ids[:limit] if limit is not None else ids


def examples_of(
    db: Database, run_id: str, feature_ids: list[int], block: int = 256
) -> Iterator[FeatureExamples]:
    """Each feature's top and random contexts, cut to the spans they cover, in order;
    fetched from the database a block of features at a time."""
    for lo in range(0, len(feature_ids), block):
        ids = feature_ids[lo : lo + block]
        found = db.contexts_of(run_id, ids, ["top", "random"])
        for f in ids:
            contexts = found.get(f, [])
            yield FeatureExamples(
                f,
                top=[c.segment() for c in contexts if c.kind == "top"],
                random=[c.segment() for c in contexts if c.kind == "random"],
            )


def explain_run(
    db: Database,
    run_id: str,
    explainer: Explainer,
    *,
    partitions: list[str] | None = None,
    limit: int | None = None,
    ledger: Path | None = None,
    progress: bool = True,
) -> ExplainRun:
    """Explain the run's features with `explainer`, writing each explanation as it arrives."""
    ids = ordered_features(db, run_id, partitions, limit)
    done = db.explained_features(run_id, explainer.name, explainer.prompt_version)
    todo = [f for f in ids if f not in done]
    with ProgressBar(f"explain ({explainer.name})", len(todo), progress) as bar:

        def record(feature_id: int, result) -> None:
            db.add_explanation(
                run_id,
                feature_id,
                explainer=result.explainer,
                prompt_version=result.prompt_version,
                explanation=result.explanation,
                harmful=result.harmful,
                harmful_reason=result.harmful_reason,
                raw=result.raw,
                parsed=result.parsed,
            )
            bar.update(advance=1)

        items = examples_of(db, run_id, ids)
        kwargs = {"ledger": ledger} if ledger is not None else {}
        run = explainer.explain_many(items, done=done, on_result=record, **kwargs)
    return run


@dataclass
class ScoreRun:
    """What a scoring pass did."""

    scored: dict[int, float] = field(default_factory=dict)  # feature -> accuracy
    skipped_done: int = 0
    skipped_empty: list[int] = field(default_factory=list)  # nothing to score
    failed: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the CLI."""
        good = sum(a >= 0.8 for a in self.scored.values())
        return (
            f"{len(self.scored)} scored ({good} interpretable, detection >= 0.8), "
            f"{self.skipped_done} already scored, {len(self.skipped_empty)} skipped (no "
            f"example or empty explanation), {len(self.failed)} failed"
        )


def score_run(
    db: Database,
    run_id: str,
    judge: Judge,
    *,
    explainer: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ScoreRun:
    """Detection-score the latest explanation of each feature (paper B.4.4)."""
    done = db.scored_explanations(run_id, judge.name, judge.prompt_version)
    todo = to_score(db, run_id, judge, explainer, limit)
    out = ScoreRun(skipped_done=len(done))
    all_examples = examples_of(db, run_id, [int(r.feature_id) for r in todo])
    with ProgressBar(f"score ({judge.name})", len(todo), progress) as bar:
        for row, ex in zip(todo, all_examples, strict=True):
            fid = int(row.feature_id)
            try:
                result = detection_score(judge, row.explanation or "", ex.top, ex.random, seed=seed)
            except ParseError as err:
                out.failed[fid] = str(err)
                continue
            if result is None:
                out.skipped_empty.append(fid)
                continue
            db.add_score(
                run_id,
                fid,
                explanation_id=int(row.explanation_id),
                judge=result.judge,
                prompt_version=result.prompt_version,
                metric="detection",
                value=result.accuracy,
                n_examples=result.n_examples,
                details={"predictions": result.predictions, "labels": result.labels},
            )
            out.scored[fid] = result.accuracy
            bar.update(advance=1)
    return out


def to_score(
    db: Database, run_id: str, judge: Judge, explainer: str | None, limit: int | None
) -> list:
    """The explanations `score_run` would send to `judge` (its cost estimate counts them)."""
    done = db.scored_explanations(run_id, judge.name, judge.prompt_version)
    return list(_to_score(db, run_id, explainer, done, limit))


def _to_score(db, run_id, explainer, done, limit) -> Iterator:
    """Latest parsed explanations not yet scored, in safety order."""
    table: pd.DataFrame = db.explanations(run_id, explainer=explainer, latest=True)
    if table.empty:
        return
    table = table[table["parsed"].astype(bool) & ~table["explanation_id"].isin(done)]
    order = {f: i for i, f in enumerate(ordered_features(db, run_id))}
    table = table.assign(_o=table["feature_id"].map(order)).sort_values("_o")
    for n, row in enumerate(table.itertuples()):
        if limit is not None and n >= limit:
            return
        yield row
