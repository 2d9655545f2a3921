"""The sparse training-step kernels against plain dense references: BatchTopK on the
never-built score matrix, gradients accumulated in place, the AuxK block products."""

from __future__ import annotations

import pytest
import torch

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.sparse import (
    Entries,
    Workspace,
    batch_topk,
    gather,
    weighted_batch_topk,
)
from engine.partition import Partition

D_A, D_B = 24, 20


@pytest.mark.parametrize(
    "shape, k, positive",
    [
        ((512, 2048), 16 * 512, 0.5),
        ((64, 3000), 4 * 64, 0.5),
        ((512, 2048), 900, 0.001),
        ((7, 5), 9, 0.5),
    ],
)
def test_weighted_batch_topk_equals_batch_topk_on_the_built_scores(shape, k, positive):
    g = torch.Generator().manual_seed(2)
    # `positive`: share of positive pre-activations; 0.1%: fewer than k, so zero scores
    # are selected (the threshold is 0 and the candidate search needs no bound).
    pre = torch.randn(*shape, generator=g) - torch.distributions.Normal(0, 1).icdf(
        torch.tensor(1 - positive)
    )
    weights = torch.rand(shape[1], generator=g)
    weights[::7] = 0  # a feature whose decoders vanished scores 0
    scores = pre.relu() * weights
    rows, cols = batch_topk(scores, k)
    w_rows, w_cols, w_scores = weighted_batch_topk(pre, weights, k)
    assert torch.equal(w_rows, rows) and torch.equal(w_cols, cols)
    assert torch.equal(w_scores, scores[rows, cols])


def test_gather_reads_contiguous_and_strided_matrices():
    m = torch.randn(30, 40)
    rows, cols = torch.randint(0, 30, (50,)), torch.randint(0, 20, (50,))
    assert torch.equal(gather(m, rows, cols), m[rows, cols])
    assert torch.equal(gather(m[:, 20:], rows, cols), m[:, 20:][rows, cols])


def test_workspace_reuses_a_tensor_until_its_shape_or_key_changes():
    ws, like = Workspace(), torch.zeros(1)
    a = ws.get("x", (3, 4), like)
    assert torch.equal(a, torch.zeros(3, 4))
    a.fill_(1)
    assert ws.get("x", (3, 4), like) is a
    assert torch.equal(ws.get("x", (3, 4), like, key="other"), torch.zeros(3, 4))
    assert ws.get("x", (2, 4), like, key="other").shape == (2, 4)


def _crosscoder(arch: str = "dfc") -> Crosscoder:
    torch.manual_seed(0)
    d_b = D_A if arch == "dsf" else D_B
    n_designated = 8 if arch == "dsf" else 0
    cc = Crosscoder(D_A, d_b, Partition.build(arch, 64, 6, 10, n_designated))
    with torch.no_grad():
        for p in cc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cc


def _training_loss(cc: Crosscoder, x_a, x_b, k: int, dead: torch.Tensor) -> torch.Tensor:
    """Reconstruction + AuxK loss through the training path's sparse kernels."""
    n = x_a.shape[0]
    with torch.no_grad():
        pre = cc.pre_activations(x_a, x_b, Workspace())
        rows, feats, _ = weighted_batch_topk(pre, cc.score_weights(), k * n)
        dead_ids = cc.block_order(dead)
        pre_dead = pre[:, dead_ids]
        keep = pre_dead > pre_dead.median()
    entries = Entries(rows, feats, n)
    values = cc.entry_values(gather(pre, rows, feats), entries, x_a, x_b)
    err_a = x_a - cc.decode_entries("a", entries, values)
    err_b = x_b - cc.decode_entries("b", entries, values)
    z = cc.block_values(pre_dead, keep, dead_ids, x_a, x_b)
    approx_a, approx_b = cc.decode_block(z, dead_ids)
    aux = (err_a.detach() - approx_a).pow(2).sum() + (err_b.detach() - approx_b).pow(2).sum()
    return err_a.pow(2).sum() + err_b.pow(2).sum() + 0.5 * aux


@pytest.mark.parametrize("arch", ["dfc", "dsf", "standard"])
def test_gradients_accumulated_in_place_equal_autograd(arch):
    """The trainer's mode (weight gradients added into param.grad by the sparse
    backward, twice here: gradients accumulate) against returned gradients."""
    cc = _crosscoder(arch)
    x_a, x_b = torch.randn(32, D_A), torch.randn(32, cc.d_b)
    dead = torch.tensor([1, 3, 7, 12, 20, 40, 41, 63])  # every partition has one
    expected = torch.autograd.grad(_training_loss(cc, x_a, x_b, 5, dead), list(cc.parameters()))
    cc.grads_in_place = True
    for _ in range(2):
        _training_loss(cc, x_a, x_b, 5, dead).backward()
    for (name, p), g in zip(cc.named_parameters(), expected, strict=True):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-4, atol=1e-5), name


def test_auxk_block_products_match_dense_autograd():
    """block_values + decode_block against the full-matrix formulation of AuxK."""
    cc = _crosscoder()
    p = cc.partition
    x_a, x_b = torch.randn(16, D_A), torch.randn(16, D_B)
    dead = cc.block_order(torch.tensor([0, 2, 5, 6, 9, 30, 50]))
    g_a, g_b = torch.randn(16, D_A), torch.randn(16, D_B)
    with torch.no_grad():
        pre = cc.pre_activations(x_a, x_b)[:, dead]
    keep = pre > 0
    z = cc.block_values(pre, keep, dead, x_a, x_b)
    approx_a, approx_b = cc.decode_block(z, dead)
    sparse = torch.autograd.grad(
        (approx_a * g_a).sum() + (approx_b * g_b).sum(), list(cc.parameters()), allow_unused=True
    )

    def full(w, model):
        return torch.zeros(p.n_features, w.shape[1]).index_copy(0, p.model_rows(model), w)

    enc = x_a @ full(cc.w_enc_a, "a").T + x_b @ full(cc.w_enc_b, "b").T + cc.b_enc
    z_ref = enc[:, dead] * keep
    loss = (z_ref @ full(cc.w_dec_a, "a")[dead] * g_a).sum()
    loss = loss + (z_ref @ full(cc.w_dec_b, "b")[dead] * g_b).sum()
    dense = torch.autograd.grad(loss, list(cc.parameters()), allow_unused=True)
    for (name, param), gs, gd in zip(cc.named_parameters(), sparse, dense, strict=True):
        gs = torch.zeros_like(param) if gs is None else gs
        gd = torch.zeros_like(param) if gd is None else gd
        assert torch.allclose(gs, gd, rtol=1e-4, atol=1e-5), name
