"""Which feature of a trained crosscoder detects the planted concept, and in which partition.

A feature *detects* the trigger with the precision, recall and F1 of "it fires (> 0)" as a
predictor of "this pair is a trigger pair". Features are labelled with a model the way the
toy benchmark does: by partition in a crosscoder with exclusive partitions (DFC), otherwise
(standard, DSF) by relative decoder norm (> high: A, < low: B). The concept is *in the
right partition* when the best detector is labelled with the planted model and its F1
reaches the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.partition import Partition, Role
from engine.planted import PlantedError
from engine.planted.pairs import PlantedPairs

FINAL_KEYS = ("fve", "fve_a", "fve_b", "l0", "dead_frac")
# Reassignment counts (DFC): features moved into each exclusive partition, and dead
# exclusive features given back to the shared block (adaptive partitions).
MOVE_KEYS = ("moved_to_a", "moved_to_b", "recycled_to_shared", "swapped_to_shared")


@dataclass
class FeatureScores:
    """Per-feature detection counts and scores against the trigger labels."""

    true_pos: torch.Tensor  # int64 [F]: fired on a trigger pair
    fired: torch.Tensor  # int64 [F]: fired at all
    positives: int  # trigger pairs evaluated
    n: int  # pairs evaluated
    fve: dict[str, float] | None = None  # per model, over the pairs evaluated

    @property
    def precision(self) -> torch.Tensor:
        return self.true_pos / self.fired.clamp_min(1)

    @property
    def recall(self) -> torch.Tensor:
        return self.true_pos / max(self.positives, 1)

    @property
    def f1(self) -> torch.Tensor:
        # 2 TP / (2 TP + FP + FN), where FP + FN = fired + positives - 2 TP.
        return 2 * self.true_pos / (self.fired + self.positives).clamp_min(1)


def feature_scores(
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    pairs: PlantedPairs,
    rows: torch.Tensor,
    chunk_rows: int = 2048,
) -> FeatureScores:
    """Encode the pairs `rows` (global indices) and count each feature's firing on triggers."""
    device = crosscoder.b_enc.device
    n_features = crosscoder.partition.n_features
    true_pos = torch.zeros(n_features, dtype=torch.int64, device=device)
    fired = torch.zeros_like(true_pos)
    fit = {m: _FitSums() for m in ("a", "b")}
    crosscoder = crosscoder.eval()
    with torch.inference_mode():
        for lo in range(0, len(rows), chunk_rows):
            idx = rows[lo : lo + chunk_rows]
            x_a, x_b = normalizer.apply(*pairs.rows(idx))
            x_a, x_b = x_a.to(device), x_b.to(device)
            f = crosscoder.encode(x_a, x_b)
            fires = f > 0
            labels = pairs.labels[idx].to(device)
            true_pos += fires[labels].sum(0)
            fired += fires.sum(0)
            for name, x, x_hat in zip("ab", (x_a, x_b), crosscoder.decode(f), strict=True):
                fit[name].add(x, x_hat)
    positives = int(pairs.labels[rows].sum())
    fve = {name: sums.fve() for name, sums in fit.items()}
    return FeatureScores(true_pos.cpu(), fired.cpu(), positives, len(rows), fve)


class _FitSums:
    """Running sums for one model's fraction of variance explained over chunks."""

    def __init__(self) -> None:
        self.sse = self.sum_sq = 0.0
        self.total: torch.Tensor | float = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = x.double()
        self.sse += float((x - x_hat.double()).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.total = self.total + x.sum(0)
        self.n += x.shape[0]

    def fve(self) -> float:
        """1 - SSE / total variance around the mean (NaN with no rows)."""
        if self.n == 0:
            return math.nan
        variance = self.sum_sq - float((self.total * self.total).sum()) / self.n
        return 1 - self.sse / max(variance, 1e-12)


def feature_labels(crosscoder: Crosscoder, low: float = 0.2, high: float = 0.8) -> list[str]:
    """'a', 'b' or 'shared' per feature: by partition for a DFC, else by relative norm."""
    roles = [Role(r) for r in crosscoder.partition.roles()]
    if Role.A_EXCLUSIVE in roles or Role.B_EXCLUSIVE in roles:
        by_role = {Role.A_EXCLUSIVE: "a", Role.B_EXCLUSIVE: "b"}
        return [by_role.get(r, "shared") for r in roles]
    rel = crosscoder.relative_decoder_norm().cpu().tolist()
    # Designated features have tied decoders: their relative norm says nothing.
    return [
        "shared" if role is Role.DESIGNATED else leaning(r, low, high)
        for r, role in zip(rel, roles, strict=True)
    ]


def leaning(rel_norm: float, low: float = 0.2, high: float = 0.8) -> str:
    """'a' above `high`, 'b' below `low`, else 'shared'."""
    return "a" if rel_norm > high else "b" if rel_norm < low else "shared"


def decoder_cosine(crosscoder: Crosscoder, feature: int, model: str, shift: torch.Tensor) -> float:
    """Cosine of a feature's decoder vector in `model` with `shift` (NaN without a decoder).

    The decoder lives in normalised units; a scalar per model maps it to raw units, so the
    cosine with a raw-unit shift needs no conversion.
    """
    if not crosscoder.decodes(feature, model):
        return math.nan
    vector = crosscoder.decoder_matrix(model)[feature].float().cpu()
    return float(F.cosine_similarity(vector, shift.float().cpu(), dim=0))


def evaluate_planted(
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    pairs: PlantedPairs,
    rows: torch.Tensor,
    model: str,
    shift: torch.Tensor,
    final: dict[str, Any] | None = None,
    threshold: float = 0.8,
    low: float = 0.2,
    high: float = 0.8,
) -> dict[str, Any]:
    """The benchmark's report for one crosscoder trained on a concept planted into `model`."""
    width = crosscoder.d_a if model == "a" else crosscoder.d_b
    if shift.shape != (width,):
        raise PlantedError(
            f"the planted shift has width {shift.shape[-1]}, model {model.upper()} has {width}"
        )
    scores = feature_scores(crosscoder, normalizer, pairs, rows)
    labels = feature_labels(crosscoder, low, high)
    roles = crosscoder.partition.roles()
    rel = crosscoder.relative_decoder_norm().cpu()
    f1 = scores.f1
    best = int(f1.argmax())
    report: dict[str, Any] = {
        "n_eval": scores.n,
        "n_triggers": scores.positives,
        "trigger_rate": scores.positives / max(scores.n, 1),
        **_feature("best", best, scores),
        "best_role": roles[best],
        "best_label": labels[best],
        "best_rel_norm": float(rel[best]),
        "best_cosine": decoder_cosine(crosscoder, best, model, shift),
    }
    right = torch.tensor([label == model for label in labels])
    if right.any():
        pick = int(torch.where(right, f1, -1.0).argmax())
        report.update(_feature("right", pick, scores))
        report["right_cosine"] = decoder_cosine(crosscoder, pick, model, shift)
    else:
        report.update({f"right_{k}": None for k in ("feature", "f1", "precision", "recall")})
        report["right_cosine"] = None
    # FVE over the evaluated pairs: the training figures below are one batch's.
    report["eval_fve_a"], report["eval_fve_b"] = scores.fve["a"], scores.fve["b"]
    report["learned"] = report["best_f1"] >= threshold
    report["correct"] = report["learned"] and labels[best] == model
    report.update(_training_figures(final or {}, crosscoder.partition))
    return report


def _feature(prefix: str, feature: int, scores: FeatureScores) -> dict[str, Any]:
    """Id, F1, precision and recall of one feature under `prefix`_."""
    return {
        f"{prefix}_feature": feature,
        f"{prefix}_f1": float(scores.f1[feature]),
        f"{prefix}_precision": float(scores.precision[feature]),
        f"{prefix}_recall": float(scores.recall[feature]),
    }


def _training_figures(final: dict[str, Any], partition: Partition) -> dict[str, Any]:
    """FVE, L0, dead fractions (overall and per partition), reassignment counts and the
    final exclusive partition sizes of a training result."""
    keys = [*FINAL_KEYS, *(f"dead_frac_{role.value}" for role in Role), *MOVE_KEYS]
    out = {k: final.get(k) for k in keys}
    out.update(n_a_exclusive=partition.n_a_exclusive, n_b_exclusive=partition.n_b_exclusive)
    return out
