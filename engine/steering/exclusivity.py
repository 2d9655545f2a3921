"""Exclusivity score (paper B.5): does a feature's steering effect survive a transfer?

The feature steers its source model with its own decoder vector and the other model with
that vector mapped through a model stitch (an affine map trained without the crosscoder),
on three open prompts at strengths 0..10 (x s_max). A judge first rates how interpretable
the source model's steering is (features below 3 are filtered out, so non-interpretable
steering is not mistaken for exclusivity), then how similar the two models' steering is
(1-5). Exclusivity = 6 - similarity: 5 means even a trained linear map could not carry
the behaviour over.

Repeatable and with its spread: decoding is sampled (temperature 0.7, top-p 0.9, as in the
paper), `samples` times per prompt, each generated text from a random stream seeded by
(`seed`, sample), so the same command on the same inputs gives the same texts and score.
Every (prompt, sample) is one unit judged on its own; the score is the mean of the units'
6 - similarity with a 95% Student-t interval over the units, clipped to the 1-5 scale
(`score_interval`: why t and not a bootstrap). A score from the offline judge is a proxy
for the paper's LLM judge (`is_proxy`), and is labelled so wherever it is shown.

Which features to score: the exclusive partitions by default, and the shared features
whose decoder norm leans to one model (`engine.categories`) on request, or by
default when the run has no exclusive partition. A leaning feature is steered from the
model it leans to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from statistics import mean
from typing import Any

from engine.categories import CANDIDATES, EXCLUSIVE, MODEL_OF
from engine.errors import ConfigError
from engine.results import Database
from engine.steering.judges import SteeringJudge, Verdict
from engine.steering.pair import FeatureVectors, SteeringPair
from engine.steering.steer import GenerationConfig

log = logging.getLogger(__name__)

METRIC = "exclusivity"
SCALE = (1.0, 5.0)
CONFIDENCE = 0.95
INTERVAL = "95% Student-t interval over prompts x samples, clipped to 1-5"
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
    # Sampled generations per prompt (seeds generation.seed x 1000003 + 0, 1, ...); every
    # (prompt, sample) is one judged unit of the score's interval. Greedy decoding: 1.
    samples: int = 3
    # Judge the similarity of features that fail the interpretability filter too (their
    # score stays None; `unfiltered` keeps 6 - similarity), as the calibration does.
    judge_filtered: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be at least 1, got {self.samples}")
        if not self.prompts:
            raise ConfigError("the exclusivity score needs at least one prompt")

    @property
    def units(self) -> int:
        """Judged units per feature: prompts x samples (one sample when greedy)."""
        return len(self.prompts) * (1 if self.generation.greedy else self.samples)


@dataclass
class ExclusivityResult:
    """One feature's exclusivity score, the judge's reasons and every generated text."""

    feature_id: int
    source: str
    target: str
    interpretability: float | None
    similarity: float | None
    exclusivity: float | None  # None when filtered out (not interpretable) or unparsed
    per_prompt: list[dict[str, Any]]  # one entry per (prompt, sample) unit
    judge: str
    prompt_version: str
    ci_low: float | None = None  # 95% interval of the exclusivity over the units
    ci_high: float | None = None
    unfiltered: float | None = None  # 6 - similarity, also when filtered (if judged)

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
    return score_vectors(pair, pair.vectors(feature_id, s_max, cfg.source or "a"), judge, cfg)


def score_vectors(
    pair: SteeringPair,
    vectors: FeatureVectors,
    judge: SteeringJudge,
    cfg: ExclusivityConfig | None = None,
) -> ExclusivityResult:
    """Steer the source model with `vectors`' own vector and the target with its stitched
    copy, every prompt x sample x strength batched per model, then judge each unit."""
    cfg = cfg or ExclusivityConfig()
    alphas = _with_baseline(cfg.alphas)
    texts = {m: _grid(pair, vectors, m, alphas, cfg) for m in (vectors.source, vectors.target)}
    units = list(texts[vectors.source])  # (prompt, sample), prompts first
    per_prompt = []
    for prompt, sample in units:
        source = texts[vectors.source][(prompt, sample)]
        per_prompt.append(
            {
                "prompt": prompt,
                "sample": sample,
                "interpretability": _verdict(judge.interpretability(prompt, source)),
                "source_texts": _keyed(source),
                "target_texts": _keyed(texts[vectors.target][(prompt, sample)]),
            }
        )
    interp = _mean(p["interpretability"]["score"] for p in per_prompt)
    kept = interp is not None and interp >= cfg.min_interpretability
    similarity = unfiltered = None
    low = high = exclusivity = None
    if kept or cfg.judge_filtered:
        for p, unit in zip(per_prompt, units, strict=True):
            source, target = texts[vectors.source][unit], texts[vectors.target][unit]
            p["similarity"] = _verdict(judge.similarity(p["prompt"], source, target))
        # Units whose verdict could not be read (score None) are left out.
        scores = [p["similarity"]["score"] for p in per_prompt]
        values = [6.0 - v for v in scores if v is not None and not math.isnan(v)]
        similarity = _mean(p["similarity"]["score"] for p in per_prompt)
        if values:
            low, unfiltered, high = score_interval(values)
        if kept and values:
            exclusivity = unfiltered
        else:
            low = high = None
    return ExclusivityResult(
        vectors.feature_id, vectors.source, vectors.target, interp, similarity, exclusivity,
        per_prompt, judge.name, judge.prompt_version, low, high, unfiltered,
    )  # fmt: skip


def _grid(pair: SteeringPair, vectors: FeatureVectors, model: str, alphas, cfg):
    """`model`'s texts of every prompt x sample x strength, batched."""
    return pair.generate(model, vectors, cfg.prompts, alphas, cfg.generation, cfg.samples)


def score_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, mean, high): the units' mean exclusivity and its 95% Student-t interval,
    clipped to the 1-5 scale.

    Why t and not a bootstrap: a score has few units (3 prompts x 3 samples = 9), each a
    coarse 1-5 judgement. A percentile bootstrap over so few values under-covers (its
    spread is the plug-in one, short by sqrt((n - 1) / n), and it cannot reach beyond the
    values seen), while the t-interval widens with few units as it should; clipping keeps
    it on the scale. Units that all agree give a zero-width interval: the spread seen,
    not a guarantee (the judge's own error is not in it)."""
    from engine.steering.evaluate import mean_ci

    low, mid, high = mean_ci([float(v) for v in values], CONFIDENCE)
    return (max(low, SCALE[0]), mid, min(high, SCALE[1]))


def is_proxy(judge: str | None) -> bool:
    """Whether a judge's scores stand in for the paper's LLM judge (the offline judge)."""
    return str(judge or "").startswith("offline")


def score_text(
    value: float | None, low: float | None = None, high: float | None = None, judge=None
) -> str:
    """A score with its interval and, for an offline judge, the proxy mark:
    "4.7 [4.1–5.0] (offline proxy)"; "–" for no score."""
    if _missing(value):
        return "–"
    text = f"{float(value):.1f}"
    if not _missing(low) and not _missing(high):
        text += f" [{float(low):.1f}–{float(high):.1f}]"
    if is_proxy(judge):
        text += " (offline proxy)"
    return text


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
    """Record a result as an `exclusivity` score (mean, 95% interval) with texts, reasons
    and settings."""
    return db.add_exclusivity_score(
        run_id,
        result.feature_id,
        judge=result.judge,
        prompt_version=result.prompt_version,
        value=result.exclusivity,
        ci_low=result.ci_low,
        ci_high=result.ci_high,
        n_examples=len(result.per_prompt),
        details=result_details(result, pair, s_max, cfg),
    )


def result_details(
    result: ExclusivityResult, pair: SteeringPair, s_max: float, cfg: ExclusivityConfig
) -> dict[str, Any]:
    """A result's stored details: models, judgements, texts, interval and settings."""
    return {
        "source": result.source,
        "target": result.target,
        "interpretability": result.interpretability,
        "similarity": result.similarity,
        "unfiltered": result.unfiltered,
        "filtered": result.exclusivity is None,
        "interval": INTERVAL,
        "units": len(result.per_prompt),
        "samples": 1 if cfg.generation.greedy else cfg.samples,
        "proxy": is_proxy(result.judge),
        "per_prompt": result.per_prompt,
        "s_max": s_max,
        "alphas": list(_with_baseline(cfg.alphas)),
        "min_interpretability": cfg.min_interpretability,
        "generation": asdict(cfg.generation),
        "stitch": {"fve": pair.stitch.fve, "info": pair.stitch.info},
    }


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


def _missing(value) -> bool:
    """None or NaN."""
    return value is None or value != value
