"""Sparse building blocks of crosscoder training.

After BatchTopK only k of n_features latents per token are non-zero (0.4% at the demo
configuration), so everything after the dense encoder matmul works on the list of active
(token, feature, value) entries:

* `batch_topk` selects the global top entries of a score matrix exactly, but looks only at
  candidates above a sampled threshold (a full `topk` over n x F scores costs more than
  the encoder matmul on CPU);
* `weighted_gather_sum` is the one kernel behind the sparse decoder and the encoder's
  weight gradient: out[g] = sum_e weight[e] * table[index[e]] over entries of group g,
  computed by `embedding_bag`, so the dense [n, F] gradient is never built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Sample size for the threshold estimate in `batch_topk`, and the margin by which the
# candidate set overshoots k: enough that a fallback to the full topk is rare.
_THRESHOLD_SAMPLE = 65_536
_CANDIDATE_MARGIN = 1.25


@dataclass
class Entries:
    """Active entries of a sparse [n_rows, n_features] matrix, sorted by row."""

    rows: torch.Tensor  # int64 [nnz]
    features: torch.Tensor  # int64 [nnz] global feature ids
    n_rows: int

    @property
    def nnz(self) -> int:
        return self.rows.numel()


def batch_topk(scores: torch.Tensor, k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k_total largest entries of a 2-D score matrix, row-major order.

    Exact: a threshold estimated from a strided sample picks candidates; if fewer than
    k_total candidates pass, the full matrix is searched instead.
    """
    n, m = scores.shape
    total = n * m
    k_total = min(k_total, total)
    if k_total <= 0:
        empty = torch.empty(0, dtype=torch.long, device=scores.device)
        return empty, empty
    cand_rows, cand_cols, cand_vals = _candidates(scores, k_total)
    if cand_vals.numel() >= k_total:
        top = cand_vals.topk(k_total, sorted=False).indices
        rows, cols = cand_rows[top], cand_cols[top]
    else:
        flat = scores.reshape(-1).topk(k_total, sorted=False).indices
        rows, cols = flat // m, flat % m
    order = (rows * m + cols).argsort()
    return rows[order], cols[order]


def _candidates(
    scores: torch.Tensor, k_total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries at or above a threshold expected to pass slightly more than k_total."""
    n, m = scores.shape
    total = n * m
    if total <= 4 * _THRESHOLD_SAMPLE or k_total * _CANDIDATE_MARGIN >= total:
        empty = scores.new_empty(0)
        return empty.long(), empty.long(), empty  # small: the plain topk is cheapest
    row_stride = max(1, int((n * m / _THRESHOLD_SAMPLE) ** 0.5 * n / (n + m) * 2))
    col_stride = max(1, total // (_THRESHOLD_SAMPLE * row_stride))
    sample = scores[::row_stride, ::col_stride].reshape(-1).float()
    keep_frac = min(1.0, _CANDIDATE_MARGIN * k_total / total)
    rank = max(1, min(sample.numel(), int(sample.numel() * (1.0 - keep_frac))))
    threshold = sample.kthvalue(rank).values.to(scores.dtype)
    pos = torch.nonzero(scores >= threshold)
    rows, cols = pos[:, 0], pos[:, 1]
    return rows, cols, scores[rows, cols]


def group_offsets(sorted_groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Start offset of each group in a group-sorted entry list (empty groups allowed)."""
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    offsets = torch.zeros(n_groups, dtype=torch.long, device=sorted_groups.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    return offsets


def weighted_gather_sum(
    table: torch.Tensor,
    index: torch.Tensor,
    groups: torch.Tensor,
    weights: torch.Tensor,
    n_groups: int,
    groups_sorted: bool = False,
) -> torch.Tensor:
    """out[g] = sum over entries e with groups[e] == g of weights[e] * table[index[e]]."""
    if not groups_sorted:
        order = groups.argsort(stable=True)
        index, groups, weights = index[order], groups[order], weights[order]
    offsets = group_offsets(groups, n_groups)
    return F.embedding_bag(
        index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype)
    )


class SelectedEncoding(torch.autograd.Function):
    """Pre-activations at selected entries, with a backward that stays sparse.

    The forward receives values already read from the dense (no-grad) pre-activation
    matrix; the backward computes encoder weight and bias gradients from the selected
    entries only, one `embedding_bag` per model, never the dense [n, F] gradient.
    """

    @staticmethod
    def forward(
        ctx, values, w_enc_a, w_enc_b, b_enc, x_a, x_b, features, rows, rows_in_a, rows_in_b
    ):
        # rows_in_m: each entry's parameter row in model m, or -1 where the feature has
        # no parameters in that model.
        ctx.save_for_backward(x_a, x_b, features, rows, rows_in_a, rows_in_b)
        ctx.n_params = (w_enc_a.shape[0], w_enc_b.shape[0], b_enc.shape[0])
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_a, x_b, features, rows, rows_in_a, rows_in_b = ctx.saved_tensors
        n_a, n_b, n_features = ctx.n_params
        grad = grad.float()
        grad_bias = torch.zeros(n_features, dtype=grad.dtype, device=grad.device)
        grad_bias.index_add_(0, features, grad)
        grad_w = []
        for x, param_rows, n in ((x_a, rows_in_a, n_a), (x_b, rows_in_b, n_b)):
            keep = param_rows >= 0
            grad_w.append(
                weighted_gather_sum(x.float(), rows[keep], param_rows[keep], grad[keep], n)
            )
        return None, grad_w[0], grad_w[1], grad_bias, None, None, None, None, None, None


class BlockEncoding(torch.autograd.Function):
    """Pre-activations of a block of features for every row, with a GEMM backward.

    Used for AuxK, where each row activates k_aux of the (few) dead features: dense over
    the dead block is cheaper than a gather per entry.
    """

    @staticmethod
    def forward(ctx, block, w_enc_a, w_enc_b, b_enc, x_a, x_b, features, rows_in_a, rows_in_b):
        ctx.save_for_backward(x_a, x_b, features, rows_in_a, rows_in_b)
        ctx.shapes = (w_enc_a.shape, w_enc_b.shape, b_enc.shape[0])
        return block.clone()

    @staticmethod
    def backward(ctx, grad):
        x_a, x_b, features, rows_in_a, rows_in_b = ctx.saved_tensors
        shape_a, shape_b, n_features = ctx.shapes
        grad = grad.float()
        grad_bias = torch.zeros(n_features, dtype=grad.dtype, device=grad.device)
        grad_bias.index_add_(0, features, grad.sum(0))
        grad_w = []
        for x, param_rows, shape in ((x_a, rows_in_a, shape_a), (x_b, rows_in_b, shape_b)):
            keep = param_rows >= 0
            g = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
            g.index_add_(0, param_rows[keep], grad[:, keep].T @ x.float())
            grad_w.append(g)
        return None, grad_w[0], grad_w[1], grad_bias, None, None, None, None, None
