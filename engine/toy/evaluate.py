"""Concept-recovery evaluation of a crosscoder against the toy model's ground truth (B.2.4).

A feature recovers a concept in a model when its decoder vector there has cosine similarity
above a threshold with the concept's vector in that model (eq. 10). Features are labelled
exclusive by their partition (DFC) or by relative decoder norm (standard and DSF, eq. 12).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.partition import Role
from engine.toy.model import ToyModel


@dataclass
class RecoveryReport:
    """Recall of ground-truth concepts and false positives among exclusive-labelled features."""

    labelling: str  # "partition" (DFC roles) or "relative_norm"
    threshold: float
    n_features: int
    n_shared_concepts: int
    n_a_exclusive_concepts: int
    n_b_exclusive_concepts: int
    recovery_rate: float  # concepts recovered in some model that sees them (eq. 11)
    shared_recall_a: float
    shared_recall_b: float
    shared_recall: float
    a_exclusive_recall: float  # recovered in A by an A-exclusive-labelled feature
    b_exclusive_recall: float
    exclusive_recall: float  # pooled over both models' exclusive concepts
    # Same, labelling every non-designated feature by relative decoder norm: for a DFC this
    # also credits shared-partition features that became exclusive in all but name.
    exclusive_recall_relnorm: float
    a_exclusive_recovered_any: float  # recovered in A by any feature, whatever its label
    b_exclusive_recovered_any: float
    n_labelled_a: int
    n_labelled_b: int
    n_labelled_exclusive: int
    n_true_exclusive: int  # labelled features recovering an exclusive concept of their model
    n_fp_shared: int
    n_fp_none: int
    fp_shared: float  # fraction of labelled features that recover only shared concepts
    fp_none: float  # fraction of labelled features that recover no concept
    fp_rate: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return asdict(self)


def label_features(
    decoder_a: Tensor, decoder_b: Tensor, roles: Sequence[str], low: float = 0.2, high: float = 0.8
) -> tuple[Tensor, Tensor, str]:
    """Boolean masks of features labelled A-exclusive and B-exclusive, and the rule used."""
    role_ids = [Role(r) for r in roles]
    if Role.A_EXCLUSIVE in role_ids or Role.B_EXCLUSIVE in role_ids:
        is_a = torch.tensor([r is Role.A_EXCLUSIVE for r in role_ids], dtype=torch.bool)
        is_b = torch.tensor([r is Role.B_EXCLUSIVE for r in role_ids], dtype=torch.bool)
        return is_a, is_b, "partition"
    norm_a, norm_b = decoder_a.norm(dim=1), decoder_b.norm(dim=1)
    total = norm_a + norm_b
    # A feature with no decoder in either model is dead, not exclusive: R = 0.5 keeps it shared.
    ratio = torch.where(total > 0, norm_a / total.clamp(min=1e-30), torch.full_like(total, 0.5))
    designated = torch.tensor([r is Role.DESIGNATED for r in role_ids], dtype=torch.bool)
    return (ratio > high) & ~designated, (ratio < low) & ~designated, "relative_norm"


def recovery_matrix(concepts: Tensor, decoder: Tensor, threshold: float) -> Tensor:
    """Boolean [n_concepts, n_features]: feature j recovers concept i (cosine > threshold)."""
    cos = F.normalize(concepts.float(), dim=1) @ F.normalize(decoder.float(), dim=1).T
    # Zero rows mean the feature has no parameters in this model, so it recovers nothing
    # even for thresholds <= 0.
    exists = decoder.norm(dim=1) > 0
    return (cos > threshold) & exists[None, :]


def evaluate_recovery(
    toy: ToyModel,
    decoder_a: Tensor,
    decoder_b: Tensor,
    roles: Sequence[str],
    threshold: float = 0.8,
    low: float = 0.2,
    high: float = 0.8,
) -> RecoveryReport:
    """Score a crosscoder's decoders [F, d] against the toy model's concepts."""
    _check_shapes(toy, decoder_a, decoder_b, roles)
    label_a, label_b, rule = label_features(decoder_a, decoder_b, roles, low, high)
    rec_a = recovery_matrix(toy.concepts_a, decoder_a.detach().cpu(), threshold)
    rec_b = recovery_matrix(toy.concepts_b, decoder_b.detach().cpu(), threshold)
    shared, a_ex, b_ex = toy.shared_idx, toy.a_exclusive_idx, toy.b_exclusive_idx

    found_a, found_b = rec_a.any(dim=1), rec_b.any(dim=1)
    hit_a, hit_b = _exclusive_hits(rec_a, rec_b, label_a, label_b, a_ex, b_ex)
    recovered = (found_a & toy.visible_a) | (found_b & toy.visible_b)
    fp = _false_positives(rec_a, rec_b, label_a, label_b, shared, a_ex, b_ex)
    # Relabel by relative norm alone (designated features stay excluded) for comparison.
    plain = [r if r == Role.DESIGNATED else Role.SHARED for r in roles]
    rel_a, rel_b, _ = label_features(decoder_a, decoder_b, plain, low, high)
    rel_hit_a, rel_hit_b = _exclusive_hits(rec_a, rec_b, rel_a, rel_b, a_ex, b_ex)

    n_exclusive = a_ex.numel() + b_ex.numel()
    return RecoveryReport(
        labelling=rule,
        threshold=threshold,
        n_features=len(roles),
        n_shared_concepts=shared.numel(),
        n_a_exclusive_concepts=a_ex.numel(),
        n_b_exclusive_concepts=b_ex.numel(),
        recovery_rate=_mean(recovered),
        shared_recall_a=_mean(found_a[shared]),
        shared_recall_b=_mean(found_b[shared]),
        shared_recall=(_mean(found_a[shared]) + _mean(found_b[shared])) / 2,
        a_exclusive_recall=_mean(hit_a),
        b_exclusive_recall=_mean(hit_b),
        exclusive_recall=(int(hit_a.sum()) + int(hit_b.sum())) / n_exclusive,
        exclusive_recall_relnorm=(int(rel_hit_a.sum()) + int(rel_hit_b.sum())) / n_exclusive,
        a_exclusive_recovered_any=_mean(found_a[a_ex]),
        b_exclusive_recovered_any=_mean(found_b[b_ex]),
        n_labelled_a=int(label_a.sum()),
        n_labelled_b=int(label_b.sum()),
        **fp,
    )


def _exclusive_hits(
    rec_a: Tensor, rec_b: Tensor, label_a: Tensor, label_b: Tensor, a_ex: Tensor, b_ex: Tensor
) -> tuple[Tensor, Tensor]:
    """Per exclusive concept: recovered in its model by a feature labelled exclusive to it."""
    hit_a = (rec_a[a_ex] & label_a[None, :]).any(dim=1)
    hit_b = (rec_b[b_ex] & label_b[None, :]).any(dim=1)
    return hit_a, hit_b


def _false_positives(
    rec_a: Tensor,
    rec_b: Tensor,
    label_a: Tensor,
    label_b: Tensor,
    shared: Tensor,
    a_ex: Tensor,
    b_ex: Tensor,
) -> dict[str, Any]:
    """Classify exclusive-labelled features by what their decoder recovers in their own model."""
    # Each labelled feature is judged against the concepts of the model it is exclusive to.
    own_excl = torch.cat([rec_a[a_ex][:, label_a].any(0), rec_b[b_ex][:, label_b].any(0)])
    own_shared = torch.cat([rec_a[shared][:, label_a].any(0), rec_b[shared][:, label_b].any(0)])
    n_labelled = own_excl.numel()
    n_true = int(own_excl.sum())
    n_shared = int((own_shared & ~own_excl).sum())
    n_none = int((~own_shared & ~own_excl).sum())
    # With no exclusive-labelled features no false positive was made: report 0, not NaN,
    # so means over seeds stay defined; the counts tell the two cases apart.
    denom = max(n_labelled, 1)
    return {
        "n_labelled_exclusive": n_labelled,
        "n_true_exclusive": n_true,
        "n_fp_shared": n_shared,
        "n_fp_none": n_none,
        "fp_shared": n_shared / denom,
        "fp_none": n_none / denom,
        "fp_rate": (n_shared + n_none) / denom,
    }


def _check_shapes(
    toy: ToyModel, decoder_a: Tensor, decoder_b: Tensor, roles: Sequence[str]
) -> None:
    """Raise a clear error when decoders, roles and the toy model disagree."""
    n, d = len(roles), toy.config.d
    for name, dec in (("decoder_a", decoder_a), ("decoder_b", decoder_b)):
        if dec.ndim != 2 or tuple(dec.shape) != (n, d):
            raise ValueError(
                f"{name} must have shape [n_features={n}, d={d}] (one row per role), "
                f"got {list(dec.shape)}"
            )


def _mean(mask: Tensor) -> float:
    """Fraction of True entries (0 for an empty mask)."""
    return float(mask.float().mean()) if mask.numel() else 0.0
