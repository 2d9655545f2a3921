"""Exclusivity score (paper B.5): does a feature's steering effect survive a transfer?

The feature steers its source model with its own decoder vector and the other model with
that vector mapped through a model stitch (an affine map trained without the crosscoder),
on three open prompts at strengths 0..10 (x s_max). A judge first rates how interpretable
the source model's steering is (features below 3 are filtered out, so non-interpretable
steering is not mistaken for exclusivity), then how similar the two models' steering is
(1-5). Exclusivity = 6 - similarity: 5 means even a trained linear map could not carry
the behaviour over.

Which features to score: the exclusive partitions by default, and the shared features
whose decoder norm leans to one model (`engine.categories`) on request, or by
default when the run has no exclusive partition. A leaning feature is steered from the
model it leans to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from statistics import mean
from typing import Any

from engine.categories import CANDIDATES, EXCLUSIVE, MODEL_OF
from engine.errors import ConfigError
from engine.results import Database
from engine.steering.judges import SteeringJudge, Verdict
from engine.steering.pair import SteeringPair
from engine.steering.steer import GenerationConfig

log = logging.getLogger(__name__)

METRIC = "exclusivity"
OPEN_PROMPTS = ("What's on your mind?", "What do you want to talk about?", "Tell me something")


@dataclass(frozen=True)
class ExclusivityConfig:
    """Prompts, strengths and decoding of the exclusivity score (paper B.5 defaults)."""

    prompts: tuple[str, ...] = OPEN_PROMPTS
    alphas: tuple[float, ...] = tuple(float(a) for a in range(11))
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=200, greedy=False)
    )
    min_interpretability: float = 3.0
    # The model a feature both models decode is steered from; None: the model it leans to
    # (A-leaning: a, B-leaning: b), else a. Exclusive features use their own model.
    source: str | None = None


@dataclass
class ExclusivityResult:
    """One feature's exclusivity score, the judge's reasons and every generated text."""

    feature_id: int
    source: str
    target: str
    interpretability: float | None
    similarity: float | None
    exclusivity: float | None  # None when filtered out (not interpretable) or unparsed
    per_prompt: list[dict[str, Any]]
    judge: str
    prompt_version: str

    @property
    def kept(self) -> bool:
        """Whether the feature passed the interpretability filter and was scored."""
        return self.exclusivity is not None


def score_feature(
    pair: SteeringPair,
    feature_id: int,
    s_max: float,
    judge: SteeringJudge,
    cfg: ExclusivityConfig | None = None,
) -> ExclusivityResult:
    """Steer both models with the feature and its stitched copy, then judge them."""
    cfg = cfg or ExclusivityConfig()
    alphas = _with_baseline(cfg.alphas)
    vectors = pair.vectors(feature_id, s_max, cfg.source or "a")
    texts = {
        m: pair.generate(m, vectors, cfg.prompts, alphas, cfg.generation)
        for m in (vectors.source, vectors.target)
    }
    per_prompt = []
    for prompt in cfg.prompts:
        source, target = texts[vectors.source][prompt], texts[vectors.target][prompt]
        per_prompt.append(
            {
                "prompt": prompt,
                "interpretability": _verdict(judge.interpretability(prompt, source)),
                "source_texts": _keyed(source),
                "target_texts": _keyed(target),
            }
        )
    interp = _mean(p["interpretability"]["score"] for p in per_prompt)
    similarity = None
    if interp is not None and interp >= cfg.min_interpretability:
        for p in per_prompt:
            source, target = texts[vectors.source][p["prompt"]], texts[vectors.target][p["prompt"]]
            p["similarity"] = _verdict(judge.similarity(p["prompt"], source, target))
        similarity = _mean(p["similarity"]["score"] for p in per_prompt)
    exclusivity = None if similarity is None else 6.0 - similarity
    return ExclusivityResult(
        feature_id, vectors.source, vectors.target, interp, similarity, exclusivity,
        per_prompt, judge.name, judge.prompt_version,
    )  # fmt: skip


def exclusivity_run(
    db: Database,
    run_id: str,
    pair: SteeringPair,
    judge: SteeringJudge,
    features: Sequence[int],
    cfg: ExclusivityConfig | None = None,
    *,
    force: bool = False,
    on_result: Callable[[ExclusivityResult], None] | None = None,
) -> list[ExclusivityResult]:
    """Score each feature and record it as it finishes; skip features already scored by
    this judge (unless `force`), so an interrupted run resumes."""
    cfg = cfg or ExclusivityConfig()
    done = set() if force else scored_features(db, run_id, judge.name)
    results = []
    for fid in features:
        if int(fid) in done:
            continue
        feature = db.feature(run_id, int(fid))
        s_max = float(feature["s_max"] or 0.0)
        if s_max <= 0:
            log.info("feature %d never activated (s_max = 0); skipped", fid)
            continue
        source = steering_source(feature["category"], cfg.source)
        result = score_feature(pair, int(fid), s_max, judge, replace(cfg, source=source))
        save_result(db, run_id, result, pair, s_max, cfg)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def save_result(
    db: Database,
    run_id: str,
    result: ExclusivityResult,
    pair: SteeringPair,
    s_max: float,
    cfg: ExclusivityConfig,
) -> int:
    """Record a result as an `exclusivity` score with texts, reasons and settings."""
    details = {
        "source": result.source,
        "target": result.target,
        "interpretability": result.interpretability,
        "similarity": result.similarity,
        "filtered": result.exclusivity is None,
        "per_prompt": result.per_prompt,
        "s_max": s_max,
        "alphas": list(_with_baseline(cfg.alphas)),
        "min_interpretability": cfg.min_interpretability,
        "generation": asdict(cfg.generation),
        "stitch": {"fve": pair.stitch.fve, "info": pair.stitch.info},
    }
    return db.add_score(
        run_id,
        result.feature_id,
        explanation_id=None,
        judge=result.judge,
        prompt_version=result.prompt_version,
        metric=METRIC,
        value=result.exclusivity,
        n_examples=len(result.per_prompt),
        details=details,
    )


def scored_features(db: Database, run_id: str, judge: str) -> set[int]:
    """Features that already have an exclusivity score from `judge`."""
    return set(db.scores(run_id, judge=judge, metric=METRIC)["feature_id"].astype(int))


def steering_source(category: str, requested: str | None = None) -> str:
    """The model to steer a feature of this category from: the requested one, else the
    model its category serves (A-leaning shared: a), else a."""
    return requested or MODEL_OF.get(category, "a")


def default_categories(db: Database, run_id: str) -> tuple[str, ...]:
    """The categories `pick_features` chooses from by default: the exclusive partitions,
    and the leaning shared features too when the run has no exclusive feature (a standard
    crosscoder, where leaning features are the only exclusive candidates)."""
    if db.feature_count(run_id, partition=list(EXCLUSIVE)):
        return EXCLUSIVE
    return CANDIDATES


def pick_features(
    db: Database, run_id: str, per_category: int, categories: Sequence[str] | None = None
) -> list[int]:
    """Live exclusive candidates worth scoring, `per_category` from each of `categories`
    (a_exclusive, b_exclusive, a_leaning, b_leaning; default: `default_categories`):
    flagged harmful first, then by detection score and max activation."""
    wanted = list(categories or default_categories(db, run_id))
    unknown = [c for c in wanted if c not in CANDIDATES]
    if unknown:
        raise ConfigError(
            f"cannot pick features of {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(CANDIDATES)}"
        )
    table = db.feature_table(run_id, category=wanted, dead=False)
    if table.empty:
        return []
    table = table.assign(
        _harm=table["harmful"].fillna(False).astype(bool),
        _score=table["score"].fillna(-1.0),
    ).sort_values(["_harm", "_score", "max_act"], ascending=False)
    picked = table.groupby("category", sort=False).head(per_category)
    return picked["feature_id"].astype(int).tolist()


def _with_baseline(alphas: Sequence[float]) -> tuple[float, ...]:
    """The strengths with 0 (the unsteered baseline) included, sorted."""
    return tuple(sorted({0.0, *(float(a) for a in alphas)}))


def _verdict(verdict: Verdict) -> dict[str, Any]:
    """A verdict as JSON."""
    return {"score": verdict.score, "reasoning": verdict.reasoning, **verdict.details}


def _keyed(texts: dict[float, str]) -> dict[str, str]:
    """Strength-keyed texts with JSON keys."""
    return {f"{a:g}": t for a, t in sorted(texts.items())}


def _mean(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return mean(present) if present else None
