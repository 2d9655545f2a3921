"""Straightforward dense DFC training step, the way the paper's published code does it.

Full-size encoder and decoder matrices for both models (exclusive partitions masked to
zero, not absent), BatchTopK by a flat `topk` over the whole [batch, features] score
matrix, a dense decoder matmul and dense autograd. Used only as the baseline of
`benchmarks/train_step.py`; it computes the same loss as the engine.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseDFC(nn.Module):
    """Dense crosscoder with partition masks."""

    def __init__(self, d_a: int, d_b: int, n_features: int, n_a: int, n_b: int) -> None:
        super().__init__()
        self.w_enc_a = nn.Parameter(torch.randn(d_a, n_features) * 0.02)
        self.w_enc_b = nn.Parameter(torch.randn(d_b, n_features) * 0.02)
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.w_dec_a = nn.Parameter(torch.randn(n_features, d_a) * 0.02)
        self.w_dec_b = nn.Parameter(torch.randn(n_features, d_b) * 0.02)
        self.b_dec_a = nn.Parameter(torch.zeros(d_a))
        self.b_dec_b = nn.Parameter(torch.zeros(d_b))
        mask_a = torch.ones(n_features)
        mask_a[n_a : n_a + n_b] = 0  # B-exclusive features do not exist in A
        mask_b = torch.ones(n_features)
        mask_b[:n_a] = 0
        self.register_buffer("mask_a", mask_a)
        self.register_buffer("mask_b", mask_b)

    def loss(
        self, x_a: torch.Tensor, x_b: torch.Tensor, k: int, dead: torch.Tensor, k_aux: int
    ) -> torch.Tensor:
        """Reconstruction + 0.03 x AuxK loss for one batch."""
        dec_a = self.w_dec_a * self.mask_a[:, None]
        dec_b = self.w_dec_b * self.mask_b[:, None]
        pre = x_a @ (self.w_enc_a * self.mask_a) + x_b @ (self.w_enc_b * self.mask_b) + self.b_enc
        acts = pre.relu()
        norms = dec_a.norm(dim=1) + dec_b.norm(dim=1)
        scores = (acts * norms).flatten()
        top = scores.topk(k * x_a.shape[0], sorted=False).indices
        mask = torch.zeros_like(scores).scatter_(0, top, 1.0).view_as(acts)
        f = acts * mask
        err_a = x_a - (f @ dec_a + self.b_dec_a)
        err_b = x_b - (f @ dec_b + self.b_dec_b)
        loss = (err_a.pow(2).sum() + err_b.pow(2).sum()) / x_a.shape[0]
        if dead.any():
            dead_acts = acts * dead
            k_eff = min(k_aux, int(dead.sum()))
            vals, idx = dead_acts.topk(k_eff, dim=1)
            z = torch.zeros_like(acts).scatter_(1, idx, vals)
            aux = 0.0
            for err, dec in ((err_a.detach(), dec_a), (err_b.detach(), dec_b)):
                var = (err - err.mean(0)).pow(2).sum()
                aux = aux + (err - z @ dec).pow(2).sum() / var
            loss = loss + 0.03 * aux
        return loss
