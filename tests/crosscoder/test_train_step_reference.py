"""A fixed-seed run of the training step gives the losses and weights it gave before the
step was optimised for speed (issue 26, item 3), to float tolerance.

The reference numbers were recorded with the step as it was before that work (two
linears for the pre-activations, the materialised score matrix for BatchTopK,
`embedding_bag` gradients returned to autograd, `clip_grad_norm_`). Every change since
reorders floating-point sums only, so the runs agree to ~1e-7 relative on 1 and 2
threads; RTOL leaves room for another BLAS, not for a different selection or update.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from engine.config import CrosscoderConfig, TrainConfig
from engine.crosscoder.trainer import Trainer

RTOL = 1e-5
STEPS = 12


class Reference(NamedTuple):
    steps: list[tuple[float, float, float, float, int]]  # loss, recon_a, aux, grad_norm, l0
    weights: dict[str, tuple[float, float]]  # sum and sum of |.| of each parameter
    threshold_sum: float
    since_fired_sum: int
    recycled: int  # dead exclusive features recycled into the shared block (adapt)


REFERENCE = {
    "dfc": Reference(
        steps=[
            (126.31512, 52.356789, 0, 19.03982, 16),
            (129.07912, 54.024242, 0, 18.960238, 15),
            (136.63416, 56.192707, 0, 17.71007, 13),
            (141.59839, 58.957504, 1.4105797, 17.565275, 12),
            (123.75498, 50.748428, 1.3678668, 17.780756, 11),
            (136.85747, 57.486671, 1.3569732, 17.516159, 9),
            (145.6026, 59.66713, 1.4350538, 17.319679, 8),
            (146.58328, 61.96875, 1.3062429, 17.39591, 8),
            (128.71966, 54.387203, 1.2703078, 17.917097, 8),
            (124.54904, 52.786392, 1.2781618, 17.262369, 8),
            (124.29473, 50.745327, 1.3382672, 16.943014, 8),
            (126.12711, 53.102226, 1.3150846, 16.979216, 8),
        ],
        weights={
            "w_dec_a": (11.065383, 3905.7876),
            "w_dec_b": (17.733765, 4473.3359),
            "w_enc_a": (-17.90851, 4120.207),
            "w_enc_b": (32.516541, 4645.5312),
            "b_enc": (36.056091, 38.255653),
            "b_dec_a": (0.20087309, 0.38066748),
            "b_dec_b": (0.089660443, 0.50559807),
        },
        threshold_sum=4511.390625,
        since_fired_sum=549120,
        recycled=202,
    ),
    "dsf": Reference(
        steps=[
            (106.92492, 53.461567, 0, 20.760075, 17),
            (109.62622, 55.76775, 0, 19.338434, 16),
            (112.51451, 55.335358, 0, 18.448147, 15),
            (120.25502, 60.057037, 1.984287, 18.313492, 13),
            (98.395157, 48.940022, 1.9107978, 15.460522, 12),
            (111.53789, 56.538662, 1.7781284, 15.389151, 10),
            (117.89637, 58.19244, 1.56827, 15.487755, 9),
            (119.37319, 60.011375, 1.3785689, 15.235525, 9),
            (106.90058, 53.042961, 1.285404, 15.948898, 9),
            (104.16969, 53.08305, 1.2814226, 15.210663, 9),
            (103.01742, 50.790653, 1.3708005, 15.024623, 9),
            (104.36115, 52.561359, 1.3654546, 14.861869, 9),
        ],
        weights={
            "w_dec_a": (-2.2191644, 3872.4131),
            "w_dec_b": (-2.662117, 3480.4399),
            "w_enc_a": (-10.791277, 3973.55),
            "w_enc_b": (8.125104, 3962.948),
            "b_enc": (17.780743, 24.680902),
            "b_dec_a": (0.08879678, 0.43117091),
            "b_dec_b": (0.024715178, 0.41506523),
        },
        threshold_sum=4541.4072265625,
        since_fired_sum=483328,
        recycled=0,
    ),
    "standard": Reference(
        steps=[
            (123.74067, 51.246376, 0, 18.914625, 16),
            (131.17319, 55.453468, 0, 19.884706, 15),
            (137.35397, 56.688942, 0, 18.077198, 13),
            (143.18201, 59.035877, 1.9181093, 17.843672, 12),
            (121.41454, 50.077709, 1.9081178, 17.722147, 11),
            (137.86234, 57.631638, 1.7785321, 17.45845, 9),
            (144.98305, 60.208698, 1.5649103, 17.453291, 8),
            (146.37719, 61.045185, 1.40458, 17.286808, 8),
            (126.85339, 53.838036, 1.2935002, 17.788506, 8),
            (125.87815, 53.265713, 1.2889245, 17.191999, 8),
            (123.60947, 51.424034, 1.3437166, 17.047514, 8),
            (126.03223, 52.47514, 1.3350565, 16.890165, 8),
        ],
        weights={
            "w_dec_a": (0.31833434, 3905.5713),
            "w_dec_b": (7.7237573, 4472.6743),
            "w_enc_a": (-12.696389, 4111.2827),
            "w_enc_b": (31.861156, 4641.1006),
            "b_enc": (34.969692, 37.465096),
            "b_dec_a": (0.13197351, 0.3903082),
            "b_dec_b": (0.11615761, 0.44500667),
        },
        threshold_sum=4576.55126953125,
        since_fired_sum=471296,
        recycled=0,
    ),
}


def _run(arch: str) -> tuple[Trainer, list[dict[str, torch.Tensor]]]:
    """12 steps on 4 Gaussian batches of 256 rows, 2,048 features: large enough for the
    sampled-threshold BatchTopK, with k annealing, AuxK (dead after 3 steps) and, for
    DFC, partition moves (recycling) every 4 steps."""
    d_b = 32 if arch == "dsf" else 40  # DSF ties decoders: one width
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(256, 32, generator=g) * 2, torch.randn(256, 40, generator=g)[:, :d_b] * 2)
        for _ in range(4)
    ]
    trainer = Trainer(
        CrosscoderConfig(d_a=32, d_b=d_b, n_features=2048, architecture=arch),
        TrainConfig(
            steps=STEPS,
            batch_size=256,
            k=8,
            k_initial=16,
            anneal_steps=6,
            lr=3e-3,
            warmup_steps=3,
            k_aux=32,
            dead_window_tokens=256 * 3,
            reassign_every=4,
            device="cpu",
            seed=5,
        ),
    )
    stats = [trainer.step(*batches[i % len(batches)]) for i in range(STEPS)]
    return trainer, stats


@pytest.mark.parametrize("arch", sorted(REFERENCE))
def test_fixed_seed_run_matches_the_step_before_optimisation(arch):
    ref = REFERENCE[arch]
    trainer, stats = _run(arch)
    for step, (s, expected) in enumerate(zip(stats, ref.steps, strict=True)):
        got = [float(s[k]) for k in ("loss", "recon_a", "aux", "grad_norm")]
        assert got == pytest.approx(expected[:4], rel=RTOL, abs=1e-6), f"step {step}"
        assert float(s["l0"]) == expected[4], f"step {step}"
    for name, param in trainer.model.named_parameters():
        total, magnitude = ref.weights[name]
        p = param.detach().double()
        # A sum cancels: its tolerance scales with the magnitude, not with the sum.
        assert float(p.sum()) == pytest.approx(total, abs=RTOL * magnitude), name
        assert float(p.abs().sum()) == pytest.approx(magnitude, rel=RTOL), name
    assert float(trainer.model.threshold.sum()) == pytest.approx(ref.threshold_sum, rel=RTOL)
    assert int(trainer.since_fired.sum()) == ref.since_fired_sum
    assert trainer.moves().get("recycled_to_shared", 0) == ref.recycled
