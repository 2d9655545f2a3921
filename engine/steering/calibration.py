"""Calibrating the exclusivity score (paper Figure 5): what do exclusive, shared and random
steering vectors score?

A score of 4.5 means little alone: the protocol scores a sample of features per category
and a null category, so each score can be read against them ("above 90% of shared
features"):

- A-exclusive and B-exclusive: `per_category` features drawn at random from each exclusive
  partition (a DFC), or, for a standard crosscoder (no exclusive partition), the
  `per_category` features with the most extreme relative decoder norm each way (the paper's
  approximation of a standard crosscoder's exclusive features);
- shared: `per_category` features drawn at random from the shared partition;
- random: `per_category` random directions (the null): Gaussian directions scaled to the
  median decoder norm, and steered at the median s_max, of the features drawn above, half
  from each model. A direction steers with no feature behind it, so its score says what
  noise and the stitch's errors alone earn.

Every item is scored like `modeldiff exclusivity` (same prompts, strengths, samples and
seeds), and the similarity is judged even when the interpretability filter fails, so the
table keeps both the filtered score and the unfiltered 6 - similarity. Features are also
recorded as ordinary exclusivity scores. Draws are seeded: the same settings pick the same
items. Items already in the table for this protocol and judge, scored with the same
settings and stitch, are skipped (resumable). Only items scored alike are comparable: the
distributions hold each judge's items of its newest settings (`settings_key`), so a rerun
with other strengths, prompts, decoding or stitch replaces the panel instead of mixing
into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine.categories import A_EXCLUSIVE, B_EXCLUSIVE, LABELS, SHARED
from engine.errors import ConfigError
from engine.results import Database
from engine.steering.exclusivity import (
    ExclusivityConfig,
    ExclusivityResult,
    is_proxy,
    result_details,
    score_interval,
    score_vectors,
)
from engine.steering.judges import SteeringJudge
from engine.steering.pair import FeatureVectors, SteeringPair
from engine.steering.steer import feature_vector
from engine.steering.stitching import Stitch
from engine.steering.transfer import other_model

log = logging.getLogger(__name__)

PROTOCOL = "figure5"
RANDOM = "random"
CATEGORIES = (A_EXCLUSIVE, B_EXCLUSIVE, SHARED, RANDOM)
CATEGORY_LABELS = {**LABELS, RANDOM: "random direction (null)"}
COLOURS = {A_EXCLUSIVE: "#d62728", B_EXCLUSIVE: "#1f77b4", SHARED: "#7f7f7f", RANDOM: "#2ca02c"}


@dataclass(frozen=True)
class CalibrationConfig:
    """How many items per category, the draw's seed, and the exclusivity settings."""

    per_category: int = 10
    seed: int = 0
    exclusivity: ExclusivityConfig = field(default_factory=ExclusivityConfig)
    protocol: str = PROTOCOL

    def __post_init__(self) -> None:
        if self.per_category < 1:
            raise ConfigError(f"per_category must be at least 1, got {self.per_category}")


@dataclass(frozen=True)
class Item:
    """One thing to score: a feature of a category, or a random direction (feature None)."""

    category: str
    item: int  # the feature id, or the random direction's number
    feature_id: int | None
    selection: str  # how it was chosen, in words
    source: str = "a"  # the model steered with the vector itself


def pick_items(db: Database, run_id: str, per_category: int, seed: int = 0) -> list[Item]:
    """The protocol's features (A-, B-exclusive, shared) and random directions, seeded."""
    table = db.features(run_id, dead=False)
    table = table[table["s_max"].fillna(0) > 0]
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    exclusive = table[table["partition"].isin([A_EXCLUSIVE, B_EXCLUSIVE])]
    if not exclusive.empty:
        for category, model in ((A_EXCLUSIVE, "a"), (B_EXCLUSIVE, "b")):
            ids = _draw(table[table["partition"] == category], per_category, rng)
            items += [Item(category, i, i, f"random {LABELS[category]}", model) for i in ids]
    else:
        shared = table[table["partition"] == SHARED].dropna(subset=["rel_norm"])
        ranked = shared.sort_values(["rel_norm", "feature_id"])
        a_ids = ranked["feature_id"].iloc[::-1].head(per_category).astype(int).tolist()
        b_ids = ranked["feature_id"].head(per_category).astype(int).tolist()
        note = "most extreme relative decoder norm (standard crosscoder)"
        items += [Item(A_EXCLUSIVE, i, i, f"{note}, toward A", "a") for i in a_ids]
        items += [Item(B_EXCLUSIVE, i, i, f"{note}, toward B", "b") for i in b_ids]
    taken = {it.item for it in items}
    pool = table[(table["partition"] == SHARED) & ~table["feature_id"].isin(taken)]
    shared_ids = _draw(pool, per_category, rng)
    items += [Item(SHARED, i, i, "random shared", "ab"[n % 2]) for n, i in enumerate(shared_ids)]
    items += [
        Item(RANDOM, n, None, "random direction of matched norm", "ab"[n % 2])
        for n in range(per_category)
    ]
    return items


def _interleaved(items: Sequence[Item]) -> list[Item]:
    """The items by rank within their category, then by category: A0, B0, S0, R0, A1, ..."""
    rank: dict[str, int] = {}
    keyed = []
    for it in items:
        keyed.append((rank.setdefault(it.category, 0), CATEGORIES.index(it.category), it))
        rank[it.category] += 1
    return [it for *_, it in sorted(keyed, key=lambda k: k[:2])]


def _draw(table: pd.DataFrame, n: int, rng: np.random.Generator) -> list[int]:
    """Up to n feature ids drawn without replacement, in id order."""
    ids = np.sort(table["feature_id"].astype(int).to_numpy())
    if len(ids) > n:
        ids = np.sort(rng.choice(ids, size=n, replace=False))
    return [int(i) for i in ids]


def null_vectors(
    pair: SteeringPair, db: Database, run_id: str, items: Sequence[Item], seed: int = 0
) -> dict[int, FeatureVectors]:
    """The random directions of `items`: per source model, Gaussian directions scaled to
    the median raw decoder norm of the protocol's features in that model, steered at their
    median s_max; the target gets the stitched copy."""
    features = [it for it in items if it.feature_id is not None]
    if not features:
        raise ConfigError("the null needs features to match norms to; the run has none live")
    s_maxes, norms = [], {"a": [], "b": []}
    for it in features:
        s_maxes.append(float(db.feature(run_id, it.feature_id)["s_max"] or 0.0))
        for model in ("a", "b"):
            if pair.crosscoder.decodes(it.feature_id, model):
                vector = feature_vector(pair.crosscoder, pair.normalizer, it.feature_id, model)
                norms[model].append(float(vector.norm()))
    s_max = float(np.median(s_maxes))
    out = {}
    for it in items:
        if it.feature_id is not None:
            continue
        width = pair.crosscoder.d_a if it.source == "a" else pair.crosscoder.d_b
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (it.item + 1))
        direction = torch.randn(width, generator=gen)
        norm = float(np.median(norms[it.source])) if norms[it.source] else 1.0
        own = direction / direction.norm() * norm
        moved = pair.stitch.map(own, it.source)
        target = other_model(it.source)
        out[it.item] = FeatureVectors(-1 - it.item, it.source, target, s_max, own, moved)
    return out


def pending(
    db: Database,
    run_id: str,
    judge: str,
    cfg: CalibrationConfig,
    stitch: Stitch,
    *,
    force: bool = False,
) -> list[Item]:
    """The protocol's items `judge` has not yet scored with these settings and stitch
    (all with `force`), round-robin over the categories so an interrupted calibration has
    some of each."""
    return _plan(db, run_id, judge, cfg, stitch, force)[1]


def _plan(
    db: Database, run_id: str, judge: str, cfg: CalibrationConfig, stitch: Stitch, force: bool
) -> tuple[list[Item], list[Item], str]:
    """All the protocol's items, those still to score (`pending`), and the settings key."""
    items = pick_items(db, run_id, cfg.per_category, cfg.seed)
    key = settings_key(replace(cfg.exclusivity, judge_filtered=True), cfg.seed, stitch)
    done = set()
    if not force:
        stored = db.calibration(run_id, protocol=cfg.protocol, judge=judge)
        stored = stored[_settings(stored) == key]
        done = set(zip(stored["category"], stored["item"].astype(int), strict=True))
    todo = [it for it in _interleaved(items) if (it.category, it.item) not in done]
    return items, todo, key


def run_calibration(
    db: Database,
    run_id: str,
    pair: SteeringPair,
    judge: SteeringJudge,
    cfg: CalibrationConfig | None = None,
    *,
    force: bool = False,
    on_item: Callable[[Item, ExclusivityResult], None] | None = None,
) -> pd.DataFrame:
    """Score the protocol's items not yet in the calibration table (all with `force`),
    record each as it finishes, and return the run's calibration rows of this judge."""
    cfg = cfg or CalibrationConfig()
    ex_cfg = replace(cfg.exclusivity, judge_filtered=True)
    items, todo, key = _plan(db, run_id, judge.name, cfg, pair.stitch, force)
    nulls = null_vectors(pair, db, run_id, items, cfg.seed) if todo else {}
    for it in todo:
        if it.feature_id is None:
            vectors = nulls[it.item]
        else:
            s_max = float(db.feature(run_id, it.feature_id)["s_max"] or 0.0)
            vectors = pair.vectors(it.feature_id, s_max, it.source)
        result = score_vectors(pair, vectors, judge, ex_cfg)
        details = result_details(result, pair, vectors.s_max, ex_cfg)
        details.update(selection=it.selection, protocol=cfg.protocol, seed=cfg.seed, settings=key)
        if it.feature_id is None:
            details["vector_norm"] = float(vectors.source_vector.norm())
        # The score and its calibration row land together: an interrupt between two
        # transactions would leave a score whose item is scored (and paid for) again.
        with db.transaction():
            if it.feature_id is not None:
                db.add_exclusivity_score(
                    run_id, it.feature_id, judge=result.judge,
                    prompt_version=result.prompt_version, value=result.exclusivity,
                    ci_low=result.ci_low, ci_high=result.ci_high,
                    n_examples=len(result.per_prompt), details=details,
                )  # fmt: skip
            db.add_calibration(
                run_id, protocol=cfg.protocol, judge=result.judge, category=it.category,
                item=it.item, feature_id=it.feature_id, value=result.exclusivity,
                ci_low=result.ci_low, ci_high=result.ci_high, unfiltered=result.unfiltered,
                interpretability=result.interpretability, details=details,
            )  # fmt: skip
        if on_item is not None:
            on_item(it, result)
    return db.calibration(run_id, protocol=cfg.protocol, judge=judge.name)


# -- reading the distributions ----------------------------------------------------------------


def settings_key(cfg: ExclusivityConfig, seed: int, stitch: Stitch) -> str:
    """What makes two items' scores comparable, as a short digest: prompts, strengths,
    decoding, samples per prompt, the interpretability filter, the draw's seed (which also
    seeds the random directions) and the stitch. Batch size is left out: it changes no
    text."""
    generation = asdict(cfg.generation)
    generation.pop("max_batch", None)
    payload = {
        "prompts": list(cfg.prompts),
        "alphas": [float(a) for a in cfg.alphas],
        "generation": generation,
        "samples": cfg.samples,
        "min_interpretability": cfg.min_interpretability,
        "seed": int(seed),
        "stitch": stitch.fingerprint,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(frame: pd.DataFrame) -> pd.Series:
    """Each row's settings key ("" for rows stored without one)."""
    if "details" not in frame:
        return pd.Series("", index=frame.index)
    return frame["details"].map(lambda d: d.get("settings", "") if isinstance(d, dict) else "")


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a distribution is drawn from: per judge, the items scored with its newest
    settings, the newest row of each (category, item)."""
    if frame.empty:
        return frame
    keys = _settings(frame)
    newest = keys.groupby(frame["judge"]).transform("last")
    frame = frame[keys == newest]
    return frame.drop_duplicates(["judge", "category", "item"], keep="last")


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per category: items, how many passed the interpretability filter, the mean score of
    those with its 95% t-interval, and the mean unfiltered 6 - similarity of all."""
    rows = []
    frame = latest(frame)
    for category in CATEGORIES:
        group = frame[frame["category"] == category] if not frame.empty else frame
        if group.empty:
            continue
        kept = group["value"].dropna().astype(float).tolist()
        raw = group["unfiltered"].dropna().astype(float).tolist()
        low, mid, high = score_interval(kept) if kept else (None, None, None)
        raw_low, raw_mid, raw_high = score_interval(raw) if raw else (None, None, None)
        rows.append(
            {
                "category": category,
                "label": CATEGORY_LABELS[category],
                "items": len(group),
                "kept": len(kept),
                "mean": mid,
                "ci_low": low,
                "ci_high": high,
                "unfiltered_mean": raw_mid,
                "unfiltered_low": raw_low,
                "unfiltered_high": raw_high,
            }
        )
    columns = [
        "category", "label", "items", "kept", "mean", "ci_low", "ci_high", "unfiltered_mean",
        "unfiltered_low", "unfiltered_high",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def standing(frame: pd.DataFrame, value: float | None) -> dict[str, dict[str, Any]]:
    """Where a score stands in each category: the share of that category's scored items
    below it and at or below it, and how many were scored."""
    if value is None or value != value:
        return {}
    frame = latest(frame)
    out = {}
    for category in CATEGORIES:
        if frame.empty:
            break
        scores = frame.loc[frame["category"] == category, "value"].dropna().astype(float)
        if scores.empty:
            continue
        out[category] = {
            "below": float((scores < value).mean()),
            "at_or_below": float((scores <= value).mean()),
            "n": len(scores),
        }
    return out


def standing_text(frame: pd.DataFrame, value: float | None) -> str:
    """A score against the calibration in words, shared features and the null first:
    "above 90% of shared features (n = 10), 80% of random directions (n = 5), ...";
    empty when there is nothing to compare."""
    stands = standing(frame, value)
    nouns = {RANDOM: "random directions"}
    parts = [
        f"{stands[c]['below']:.0%} of {nouns.get(c, LABELS.get(c, c) + ' features')} "
        f"(n = {stands[c]['n']})"
        for c in (SHARED, RANDOM, A_EXCLUSIVE, B_EXCLUSIVE)
        if c in stands
    ]
    return f"above {', '.join(parts)}" if parts else ""


def discrimination_warning(frame: pd.DataFrame) -> str:
    """A warning when the calibration does not set exclusive features apart from the
    null: the random directions' mean unfiltered score reaches the lower end of the
    exclusive features' 95% interval (at least two of each). Empty otherwise."""
    frame = latest(frame)
    if frame.empty:
        return ""
    scores = frame.dropna(subset=["unfiltered"])
    exclusive = scores.loc[scores["category"].isin([A_EXCLUSIVE, B_EXCLUSIVE]), "unfiltered"]
    null = scores.loc[scores["category"] == RANDOM, "unfiltered"]
    if len(exclusive) < 2 or len(null) < 2:
        return ""
    low, mid, high = score_interval(exclusive.astype(float).tolist())
    noise = float(null.astype(float).mean())
    if noise < low:
        return ""
    return (
        f"random directions score {noise:.2f} (unfiltered, n = {len(null)}), as high as the "
        f"exclusive features' {mid:.2f} [{low:.2f}, {high:.2f}] (n = {len(exclusive)}): with "
        "this judge and stitch, an exclusivity score on this run does not tell an exclusive "
        "feature from a steering vector with no feature behind it"
    )


def calibration_figure(frame: pd.DataFrame, title: str = ""):
    """Figure 5 style: each category's exclusivity scores (interpretable items) as a
    violin with every point, the mean marked; the unfiltered 6 - similarity of all items
    as a second, hollow strip beside it."""
    import plotly.graph_objects as go

    frame = latest(frame)
    fig = go.Figure()
    proxy = not frame.empty and bool(frame["judge"].map(is_proxy).any())
    for category in CATEGORIES:
        group = frame[frame["category"] == category] if not frame.empty else frame
        if group.empty:
            continue
        name = CATEGORY_LABELS[category]
        kept = group.dropna(subset=["value"])
        fig.add_trace(
            go.Violin(
                x=[name] * len(kept),
                y=kept["value"].astype(float),
                name=f"{name}: scored ({len(kept)} of {len(group)} interpretable)",
                line_color=COLOURS[category],
                points="all",
                meanline_visible=True,
                spanmode="hard",
                side="negative",
                legendgroup=category,
                hovertext=[_hover(r) for r in kept.to_dict("records")],
            )
        )
        raw = group.dropna(subset=["unfiltered"])
        fig.add_trace(
            go.Violin(
                x=[name] * len(raw),
                y=raw["unfiltered"].astype(float),
                name=f"{name}: unfiltered (all {len(raw)})",
                line_color=COLOURS[category],
                fillcolor="rgba(0,0,0,0)",
                points="all",
                marker_symbol="circle-open",
                meanline_visible=True,
                spanmode="hard",
                side="positive",
                legendgroup=category,
                opacity=0.6,
                hovertext=[_hover(r) for r in raw.to_dict("records")],
            )
        )
    fig.update_layout(
        title=title
        or "Exclusivity by category (paper Figure 5 protocol)"
        + (" — offline judge: proxy scores" if proxy else ""),
        yaxis_title="exclusivity (1: transfers, 5: does not)",
        yaxis_range=[0.8, 5.2],
        violinmode="overlay",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def _hover(row: dict[str, Any]) -> str:
    """What a point is: feature or direction, its score and interval."""
    fid = row.get("feature_id")
    what = f"random direction {row['item']}" if pd.isna(fid) else f"feature {int(fid)}"
    value, low, high = row.get("value"), row.get("ci_low"), row.get("ci_high")
    interval = "" if pd.isna(low) or pd.isna(high) else f" [{low:.1f}–{high:.1f}]"
    score = "filtered" if pd.isna(value) else f"{value:.2f}{interval}"
    raw = row.get("unfiltered")
    return f"{what}: {score}; unfiltered {'–' if pd.isna(raw) else f'{raw:.2f}'}"
