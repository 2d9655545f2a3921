"""CUDA / bf16 paths of the crosscoder; skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.training import train
from engine.partition import Partition
from tests.crosscoder.test_crosscoder import (
    D_A,
    D_B,
    model_cfg,
    paired_data,
    sparse_reconstruction_loss,
    train_cfg,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sparse_gradients_on_cuda_match_cpu():
    torch.manual_seed(0)
    cpu = Crosscoder(D_A, D_B, Partition.build("dfc", 256, 12, 20))
    gpu = Crosscoder(D_A, D_B, Partition.build("dfc", 256, 12, 20)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x_a, x_b = torch.randn(64, D_A), torch.randn(64, D_B)
    grads = []
    for cc, dev in ((cpu, "cpu"), (gpu, "cuda")):
        loss, _ = sparse_reconstruction_loss(cc, x_a.to(dev), x_b.to(dev), k=6)
        grads.append([g.cpu() for g in torch.autograd.grad(loss, list(cc.parameters()))])
    for g_cpu, g_gpu in zip(*grads, strict=True):
        assert torch.allclose(g_cpu, g_gpu, rtol=1e-3, atol=1e-4)


def test_bf16_training_on_cuda_learns_with_exact_k():
    x_a, x_b = paired_data(n=4096)
    cfg = train_cfg(steps=150, k=4, device="cuda", autocast_bf16=True, log_every=50)
    result = train(model_cfg(), cfg, (x_a, x_b), progress=False)
    assert result.history[-1]["l0"] == 4
    assert result.history[-1]["fve"] > 0.5
    assert next(result.crosscoder.parameters()).dtype == torch.float32  # fp32 master weights
