"""Held-out validation during training: FVE per model and per partition on pairs the
crosscoder never trains on.

`split` asks the training source to hold out `validation_pairs` pairs: an activation store
holds out whole windows (`engine.activations.split`), drawn in a fixed order, so a resumed
run and every rank of a `torchrun` job hold out the same ones. Other sources (in-memory
pairs, synthetic toy data) offer no `hold_out` and are trained on whole, unvalidated.
`Validation.measure` then encodes the held-out pairs exactly as a training step encodes a
batch: in chunks of `batch_size` rows, normalised, BatchTopK at the step's k. Definitions
(docs/training.md):

* FVE of model m: 1 - sum ||x_m - x̂_m||^2 / sum ||x_m - mean(x_m)||^2 over the held-out
  pairs (normalised units), x̂_m the reconstruction from every selected feature;
* FVE of model m by partition P: the same with x̂_m from P's selected features plus m's
  decoder bias only (the other partitions' features left out). A partition without decoder
  vectors in m (B-exclusive for A) has none. The partitions' FVEs do not add up to the
  model's: their reconstructions overlap and the bias counts in each.

Pairs with a non-finite value are left out, and so are outliers (a norm above
`outlier_factor` x the held-out set's median in either model), as training leaves them
out of its batches.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.crosscoder.data import finite_rows
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer, outlier_mask
from engine.crosscoder.sparse import Entries, batch_topk
from engine.partition import Role

PREFIX = "val_"


def split(source, n_pairs: int) -> tuple[Any, Any]:
    """(the source to train on, its held-out part or None): `source.hold_out(n_pairs)`
    where the source offers it and `n_pairs` > 0, else (source, None)."""
    hold_out = getattr(source, "hold_out", None)
    if n_pairs <= 0 or hold_out is None:
        return source, None
    held = hold_out(n_pairs)
    return (source, None) if held is None else (held.train, held)


class Validation:
    """Held-out pairs (finite, outliers masked) and the record of what was held out."""

    def __init__(
        self, x_a: torch.Tensor, x_b: torch.Tensor, info: dict[str, Any], outlier_factor
    ) -> None:
        finite = finite_rows(x_a, x_b)
        x_a, x_b = x_a[finite].float(), x_b[finite].float()
        keep = outlier_mask(x_a, x_b, outlier_factor)
        self.x_a, self.x_b = x_a[keep], x_b[keep]
        self.info = {**info, "masked": int((~finite).sum() + (~keep).sum())}

    def __len__(self) -> int:
        return self.x_a.shape[0]

    @torch.no_grad()
    def measure(
        self,
        model: Crosscoder,
        normalizer: Normalizer,
        k: int,
        batch_size: int,
        groups: list[tuple[slice, float]] | None = None,
        weighting: str | None = None,
    ) -> dict[str, float]:
        """FVE per model (overall and by partition) and L0 on the held-out pairs, encoded
        as training encodes a batch (BatchTopK at `k` per row within each chunk of
        `batch_size` rows; `groups`: the trainer's selection groups, DSF's two budgets)."""
        device = model.b_enc.device
        p = model.partition
        groups = groups or [(slice(0, p.n_features), 1.0)]
        x_a, x_b = normalizer.apply(self.x_a.to(device), self.x_b.to(device))
        roles = [r for r in Role if p.block(r).stop > p.block(r).start]
        keys = ["all", *roles]
        sse = {(m, r): 0.0 for m in "ab" for r in keys}
        var = {"a": _centred_ss(x_a), "b": _centred_ss(x_b)}
        nnz = 0
        for lo in range(0, len(self), batch_size):
            xa, xb = x_a[lo : lo + batch_size], x_b[lo : lo + batch_size]
            entries, values = _select(model, xa, xb, k, groups, weighting)
            nnz += entries.nnz
            for m, x in (("a", xa), ("b", xb)):
                sse[m, "all"] += _sse(x, model.decode_entries(m, entries, values))
                for role in roles:
                    if not _owns(p, role, m):
                        continue
                    block = p.block(role)
                    mask = (entries.features >= block.start) & (entries.features < block.stop)
                    part = Entries(entries.rows[mask], entries.features[mask], entries.n_rows)
                    sse[m, role] += _sse(x, model.decode_entries(m, part, values[mask]))
        out = {
            f"{PREFIX}fve_a": 1 - sse["a", "all"] / var["a"],
            f"{PREFIX}fve_b": 1 - sse["b", "all"] / var["b"],
            f"{PREFIX}fve": 1 - (sse["a", "all"] + sse["b", "all"]) / (var["a"] + var["b"]),
            f"{PREFIX}l0": nnz / max(len(self), 1),
        }
        for role in roles:
            for m in "ab":
                if _owns(p, role, m):
                    out[f"{PREFIX}fve_{m}_{role.value}"] = 1 - sse[m, role] / var[m]
        return out


def _owns(p, role: Role, model: str) -> bool:
    """Whether features of `role` have decoder vectors in `model`."""
    other = Role.B_EXCLUSIVE if model == "a" else Role.A_EXCLUSIVE
    return role != other


def _select(model, x_a, x_b, k, groups, weighting) -> tuple[Entries, torch.Tensor]:
    """BatchTopK entries (row-sorted) of one chunk and their activations."""
    pre = model.pre_activations(x_a, x_b)
    scores = model.selection_scores(pre, weighting)
    n = x_a.shape[0]
    rows, feats = [], []
    for block, share in groups:
        sub = scores[:, block]
        r, c = batch_topk(sub, min(round(k * share) * n, sub.numel()))
        positive = sub[r, c] > 0  # a zero score is not an activation
        rows.append(r[positive])
        feats.append(c[positive] + block.start)
    r, f = torch.cat(rows), torch.cat(feats)
    order = (r * scores.shape[1] + f).argsort()
    r, f = r[order], f[order]
    return Entries(r, f, n), pre[r, f].float()


def _sse(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((x - recon).double().pow(2).sum())


def _centred_ss(x: torch.Tensor) -> float:
    """Total squared deviation from the mean (clamped away from 0)."""
    x = x.double()
    return max(float((x - x.mean(0)).pow(2).sum()), 1e-12)
