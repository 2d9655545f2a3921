"""Behaviour of the crosscoder model and trainer on small synthetic paired data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import ConfigError, CrosscoderConfig, TrainConfig
from engine.crosscoder import checkpoint as ckpt
from engine.crosscoder.checkpoint import CheckpointError, load_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.sparse import Entries, batch_topk
from engine.crosscoder.trainer import Trainer, TrainingError
from engine.crosscoder.training import train
from engine.partition import Partition, Role

D_A, D_B = 24, 20  # deliberately different widths


def paired_data(n=2048, n_concepts=96, seed=0, d_a=D_A, d_b=D_B):
    """Sparse ground-truth mixture with shared and model-exclusive concepts."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(n, n_concepts, generator=g) < 0.05).float() * torch.rand(
        n, n_concepts, generator=g
    )
    c_a = torch.randn(n_concepts, d_a, generator=g)
    c_b = torch.randn(n_concepts, d_b, generator=g)
    c_a[-10:-5] = 0  # B-exclusive concepts
    c_b[-5:] = 0  # A-exclusive concepts
    return z @ c_a, z @ c_b


def model_cfg(arch="dfc", n_features=64, d_a=D_A, d_b=D_B, **kw):
    return CrosscoderConfig(d_a=d_a, d_b=d_b, n_features=n_features, architecture=arch, **kw)


def train_cfg(**kw):
    base = dict(
        steps=30,
        batch_size=128,
        k=4,
        k_initial=12,
        anneal_steps=10,
        lr=3e-3,
        warmup_steps=5,
        k_aux=16,
        dead_window_tokens=128 * 5,
        log_every=10,
        checkpoint_every=10,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


# -- partitions ---------------------------------------------------------------------------


def test_partition_sizes_from_fractions_and_counts():
    p = Partition.build("dfc", 1000, 0.05, 0.05)
    assert (p.n_a_exclusive, p.n_b_exclusive, p.n_shared) == (50, 50, 900)
    p = Partition.build("dfc", 1000, 10, 30)
    assert (p.n_a_exclusive, p.n_b_exclusive, p.n_shared) == (10, 30, 960)
    assert Partition.build("dsf", 1000, designated=0.1).n_designated == 100
    assert Partition.build("dfc", 64, 0, 0) == Partition.build("standard", 64)
    roles = Partition.build("dfc", 20, 2, 3).roles()
    assert roles[:2] == ["a_exclusive"] * 2 and roles[2:5] == ["b_exclusive"] * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a_exclusive=0.6, b_exclusive=0.5), "no shared"),
        (dict(a_exclusive=-1), "non-negative"),
        (dict(a_exclusive=1.5), "fraction"),
        (dict(arch="dsf"), "equal hidden sizes"),
        (dict(arch="cosmic"), "unknown architecture"),
    ],
)
def test_bad_partitions_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        model_cfg(**kwargs)


def test_exclusive_features_have_no_parameters_in_the_other_model():
    p = Partition.build("dfc", 64, 6, 10)
    cc = Crosscoder(D_A, D_B, p)
    assert cc.w_enc_a.shape == (6 + 48, D_A) and cc.w_dec_a.shape == (6 + 48, D_A)
    assert cc.w_enc_b.shape == (10 + 48, D_B) and cc.w_dec_b.shape == (10 + 48, D_B)
    dec_a, dec_b = cc.decoder_matrix("a"), cc.decoder_matrix("b")
    assert torch.all(dec_b[p.block(Role.A_EXCLUSIVE)] == 0)
    assert torch.all(dec_a[p.block(Role.B_EXCLUSIVE)] == 0)
    rel = cc.relative_decoder_norm()
    assert torch.all(rel[p.block(Role.A_EXCLUSIVE)] == 1)
    assert torch.all(rel[p.block(Role.B_EXCLUSIVE)] == 0)


def test_decoder_init_norm_and_encoder_transpose():
    cc = Crosscoder(D_A, D_B, Partition.build("dfc", 64, 6, 10), decoder_init_norm=0.4)
    assert torch.allclose(cc.w_dec_a.norm(dim=1), torch.full((54,), 0.4))
    assert torch.equal(cc.w_enc_a, cc.w_dec_a)


# -- sparse kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("shape, k", [((64, 3000), 4 * 64), ((512, 2048), 16 * 512), ((7, 5), 9)])
def test_batch_topk_is_exact(shape, k):
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    rows, cols = batch_topk(scores, k)
    expected = scores.reshape(-1).topk(k).indices.sort().values
    assert torch.equal(rows * shape[1] + cols, expected)


def sparse_reconstruction_loss(cc: Crosscoder, x_a, x_b, k: int):
    """Squared error of the training path (BatchTopK, sparse encode/decode) and its entries."""
    n = x_a.shape[0]
    with torch.no_grad():
        pre = cc.pre_activations(x_a, x_b)
        rows, feats = batch_topk(cc.selection_scores(pre), k * n)
    entries = Entries(rows, feats, n)
    values = cc.entry_values(pre[rows, feats], entries, x_a, x_b)
    loss = (x_a - cc.decode_entries("a", entries, values)).pow(2).sum()
    loss = loss + (x_b - cc.decode_entries("b", entries, values)).pow(2).sum()
    return loss, entries


def test_sparse_path_matches_dense_autograd():
    """Selected-entry forward and the custom sparse backward equal a dense reference."""
    torch.manual_seed(0)
    cc = Crosscoder(D_A, D_B, Partition.build("dfc", 64, 6, 10))
    with torch.no_grad():
        for p in cc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_a, x_b = torch.randn(32, D_A), torch.randn(32, D_B)
    sparse_loss, entries = sparse_reconstruction_loss(cc, x_a, x_b, k=5)
    rows, feats = entries.rows, entries.features
    sparse_grads = torch.autograd.grad(sparse_loss, list(cc.parameters()))

    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[rows, feats] = True
    loss = _dense_reference_loss(cc, x_a, x_b, mask)
    dense_grads = torch.autograd.grad(loss, list(cc.parameters()))
    assert torch.allclose(sparse_loss, loss, rtol=1e-5)
    for (name, _), gs, gd in zip(cc.named_parameters(), sparse_grads, dense_grads, strict=True):
        assert torch.allclose(gs, gd, rtol=1e-4, atol=1e-5), name


def _dense_reference_loss(cc: Crosscoder, x_a, x_b, mask):
    """The paper's formulation with full matrices: zero rows where a feature is absent."""
    p = cc.partition
    enc_a = torch.zeros(p.n_features, D_A).index_copy(0, p.model_rows("a"), cc.w_enc_a)
    enc_b = torch.zeros(p.n_features, D_B).index_copy(0, p.model_rows("b"), cc.w_enc_b)
    dec_a = torch.zeros(p.n_features, D_A).index_copy(0, p.model_rows("a"), cc.w_dec_a)
    dec_b = torch.zeros(p.n_features, D_B).index_copy(0, p.model_rows("b"), cc.w_dec_b)
    f = (x_a @ enc_a.T + x_b @ enc_b.T + cc.b_enc).relu() * mask
    return (x_a - f @ dec_a - cc.b_dec_a).pow(2).sum() + (x_b - f @ dec_b - cc.b_dec_b).pow(2).sum()


# -- training behaviour -------------------------------------------------------------------


def test_no_gradient_from_model_b_reaches_a_exclusive_features_auxk_included():
    x_a, x_b = paired_data()
    # dead_window 0: every feature counts as dead, so AuxK is active in this step.
    trainer = Trainer(model_cfg(), train_cfg(dead_window_tokens=0))
    xa, xb = trainer.prepare(x_a[:256], x_b[:256])
    out = trainer.losses(xa, xb)
    assert out["aux_b"] > 0
    (out["recon_b"] + out["aux_b"]).backward()
    p = trainer.model.partition
    a_only = p.block(Role.A_EXCLUSIVE)
    cc = trainer.model
    assert torch.all(cc.w_enc_a.grad[: p.n_a_exclusive] == 0)  # A-exclusive encoder rows
    assert torch.any(cc.w_enc_a.grad[p.n_a_exclusive :] != 0)  # shared features read A too
    assert cc.w_dec_a.grad is None or torch.all(cc.w_dec_a.grad == 0)
    assert torch.all(cc.b_enc.grad[a_only] == 0)
    assert torch.any(trainer.model.b_enc.grad[p.block(Role.SHARED)] != 0)

    trainer.model.zero_grad(set_to_none=True)
    out = trainer.losses(xa, xb)
    (out["recon_a"] + out["aux_a"]).backward()
    assert torch.all(cc.w_enc_b.grad[: p.n_b_exclusive] == 0)
    assert cc.w_dec_b.grad is None or torch.all(cc.w_dec_b.grad == 0)
    assert torch.all(cc.b_enc.grad[p.block(Role.B_EXCLUSIVE)] == 0)


def test_exactly_k_per_token_are_active_during_training_with_annealing():
    x_a, x_b = paired_data()
    cfg = train_cfg(k=4, k_initial=20, anneal_steps=8, outlier_factor=None)
    trainer = Trainer(model_cfg(), cfg, Normalizer.fit(x_a, x_b))
    for step in range(12):
        stats = trainer.step(x_a[:128], x_b[:128])
        assert stats["rows"] == 128
        assert stats["l0"].item() == cfg.k_at(step)
    assert cfg.k_at(0) == 20 and cfg.k_at(4) == 12 and cfg.k_at(8) == 4


def test_trained_crosscoder_encodes_single_tokens_with_its_threshold():
    x_a, x_b = paired_data(n=4096)
    result = train(model_cfg(), train_cfg(steps=200, k=4), (x_a, x_b), progress=False)
    cc, norm = result.crosscoder, result.normalizer
    assert result.final["fve"] > 0.5
    assert torch.all(cc.threshold > 0)
    xa, xb = norm.apply(x_a[:512], x_b[:512])
    with torch.no_grad():
        one_at_a_time = torch.cat([cc.encode(xa[i : i + 1], xb[i : i + 1]) for i in range(512)])
        batched = cc.encode(xa, xb)
    # No batch dependence beyond float rounding (a value exactly at the threshold may flip).
    assert ((one_at_a_time > 0) != (batched > 0)).float().mean() < 1e-3
    assert (
        torch.allclose(one_at_a_time, batched, atol=1e-4)
        or (one_at_a_time - batched).abs().gt(1e-4).sum() <= 2
    )
    l0 = (one_at_a_time > 0).sum(1).float().mean().item()
    assert 2 <= l0 <= 8, l0  # close to k=4 without a batch


def test_dsf_ties_designated_decoders_and_gives_them_a_larger_budget():
    x_a, x_b = paired_data(d_b=D_A)
    cfg = model_cfg("dsf", d_b=D_A, designated=0.25)
    trainer = Trainer(cfg, train_cfg(k=8, k_initial=None, designated_k_multiplier=2.0))
    for _ in range(3):
        trainer.step(x_a[:128], x_b[:128])
    cc, p = trainer.model, trainer.model.partition
    des = p.block(Role.DESIGNATED)
    assert torch.equal(cc.decoder_matrix("a")[des], cc.decoder_matrix("b")[des])
    xa, xb = trainer.prepare(x_a[:128], x_b[:128])
    entries = trainer.losses(xa, xb)["entries"]
    in_designated = (entries.features >= des.start).sum().item()
    n = xa.shape[0]
    assert in_designated == round(8 * 0.25 * 2.0) * n  # 2x its proportional share
    assert entries.nnz - in_designated == round(8 * 0.75) * n


def test_nonfinite_rows_are_skipped_and_counted_and_outliers_masked():
    x_a, x_b = paired_data(n=256)
    x_a[3, 0] = float("nan")
    x_b[7, 1] = float("inf")
    x_a[11] *= 100  # an outlier row
    trainer = Trainer(model_cfg(), train_cfg(), Normalizer.fit(x_a[20:], x_b[20:]))
    stats = trainer.step(x_a, x_b)
    assert trainer.counters.nonfinite_rows == 2
    assert trainer.counters.masked_outliers >= 1
    assert stats["rows"] == 256 - 2 - trainer.counters.masked_outliers
    assert math.isfinite(stats["loss"].item())


def test_nan_aux_loss_is_zeroed_and_counted():
    x_a, x_b = paired_data(n=256)

    class NanAux(Trainer):
        def _aux_term(self, *args):
            return torch.tensor(float("nan"))

    trainer = NanAux(model_cfg(), train_cfg(dead_window_tokens=0))
    stats = trainer.step(x_a[:128], x_b[:128])
    assert trainer.counters.aux_nan_steps == 1
    assert stats["aux"] == 0 and math.isfinite(stats["loss"].item())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_dead_features_and_metrics_are_reported_per_partition():
    x_a, x_b = paired_data()
    cfg = train_cfg(steps=20, log_every=5, warmup_steps=10)
    result = train(model_cfg(), cfg, (x_a, x_b), progress=False)
    assert [r["step"] for r in result.history] == [5, 10, 15, 20]
    keys = {
        "loss",
        "recon_a",
        "recon_b",
        "aux",
        "fve_a",
        "fve_b",
        "fve",
        "l0",
        "dead_frac",
        "dead_frac_a_exclusive",
        "dead_frac_b_exclusive",
        "dead_frac_shared",
        "masked_outliers",
        "tokens_per_s",
        "lr",
        "k",
    }
    assert keys <= set(result.history[-1])
    assert result.history[0]["lr"] < result.history[-1]["lr"]  # warm-up


# -- bad input ------------------------------------------------------------------------


def test_bad_batches_get_clear_errors():
    trainer = Trainer(model_cfg(), train_cfg())
    with pytest.raises(ValueError, match="same number of rows"):
        trainer.step(torch.randn(8, D_A), torch.randn(9, D_B))
    with pytest.raises(ValueError, match="width 21, expected 20"):
        trainer.step(torch.randn(8, D_A), torch.randn(8, 21))
    with pytest.raises(TrainingError, match="no finite rows"):
        trainer.step(torch.full((4, D_A), float("nan")), torch.randn(4, D_B))


def test_k_larger_than_dictionary_is_refused():
    with pytest.raises(TrainingError, match="exceeds the dictionary size"):
        Trainer(model_cfg(n_features=64), train_cfg(k=65, k_initial=None))
    with pytest.raises(ConfigError, match="k_initial"):
        train_cfg(k=10, k_initial=5)


def test_source_running_out_is_reported():
    x_a, x_b = paired_data(n=256)
    batches = [(x_a[:128], x_b[:128])] * 3
    with pytest.raises(TrainingError, match="ran out after 3 of 30 steps"):
        train(model_cfg(), train_cfg(), batches, progress=False)


# -- checkpoints ------------------------------------------------------------------------


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    x_a, x_b = paired_data()
    result = train(model_cfg(), train_cfg(steps=12), (x_a, x_b), out_dir=tmp_path, progress=False)
    cc, norm, header = load_crosscoder(tmp_path)
    for name, tensor in result.crosscoder.state_dict().items():
        assert torch.equal(tensor, cc.state_dict()[name]), name
    assert norm == result.normalizer
    assert header["metrics"]["steps"] == 12
    xa, xb = norm.apply(x_a[:64], x_b[:64])
    assert torch.equal(cc.encode(xa, xb), result.crosscoder.encode(xa, xb))
    raw = norm.to_raw(cc.decoder_matrix("a")[0], "a")
    assert torch.allclose(raw * norm.scale_a, cc.decoder_matrix("a")[0])


def test_normalizer_brings_median_norm_to_target():
    x_a, x_b = paired_data()
    x_a, x_b = x_a * 37.0, x_b * 0.01
    norm = Normalizer.fit(x_a, x_b)
    xa, xb = norm.apply(x_a, x_b)
    target = math.sqrt(D_A + D_B) / 2
    assert xa.norm(dim=1).median().item() == pytest.approx(target, rel=1e-5)
    assert xb.norm(dim=1).median().item() == pytest.approx(target, rel=1e-5)


class _Interrupting:
    """A source whose training pass fails at batch `after`, like a crash or Ctrl-C.

    The trainer's first pass over a source fits normalisation; only the second is armed.
    """

    def __init__(self, data, after, exc):
        self.data, self.after, self.exc, self.passes = data, after, exc, 0

    def batches(self, batch_size, start_step=0, seed=0):
        from engine.crosscoder.data import TensorPairs

        self.passes += 1
        armed = self.passes == 2
        for i, batch in enumerate(TensorPairs(*self.data).batches(batch_size, start_step, seed)):
            if armed and start_step + i == self.after:
                raise self.exc
            yield batch


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("worker died")])
def test_resume_equals_uninterrupted(tmp_path, exc):
    data = paired_data()
    cfg = train_cfg(steps=40, checkpoint_every=10)
    full = train(model_cfg(), cfg, data, out_dir=tmp_path / "full", progress=False)

    with pytest.raises(type(exc)):
        train(model_cfg(), cfg, _Interrupting(data, 25, exc), tmp_path / "cut", progress=False)
    # Ctrl-C saves where it stopped; a crash leaves the last periodic checkpoint.
    expected = 25 if isinstance(exc, KeyboardInterrupt) else 20
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == f"step-{expected:08d}"
    resumed = train(model_cfg(), cfg, data, out_dir=tmp_path / "cut", progress=False)
    for name, tensor in full.crosscoder.state_dict().items():
        assert torch.equal(tensor, resumed.crosscoder.state_dict()[name]), name
    assert full.history == [
        {**r, "tokens_per_s": h["tokens_per_s"]}
        for r, h in zip(resumed.history, full.history, strict=True)
    ]


def test_finished_run_is_reused_and_can_be_extended(tmp_path):
    data = paired_data()
    first = train(model_cfg(), train_cfg(steps=10), data, out_dir=tmp_path, progress=False)
    again = train(model_cfg(), train_cfg(steps=10), data, out_dir=tmp_path, progress=False)
    assert torch.equal(first.crosscoder.w_dec_a, again.crosscoder.w_dec_a)
    longer = train(model_cfg(), train_cfg(steps=20), data, out_dir=tmp_path, progress=False)
    assert longer.final["steps"] == 20


def test_resuming_with_other_settings_is_refused(tmp_path):
    data = paired_data()
    train(model_cfg(), train_cfg(steps=10), data, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"different settings .*architecture"):
        train(model_cfg("standard"), train_cfg(steps=10), data, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"different settings .*lr"):
        train(model_cfg(), train_cfg(steps=10, lr=1e-2), data, out_dir=tmp_path, progress=False)


def test_a_checkpoint_from_before_a_setting_existed_resumes_only_with_its_old_behaviour():
    from engine.config import to_dict
    from engine.crosscoder.trainer import _check_same_run

    old = {k: v for k, v in to_dict(train_cfg()).items() if k != "swap_margin"}
    header = {"crosscoder_config": to_dict(model_cfg()), "train_config": old}
    _check_same_run(header, model_cfg(), train_cfg(swap_margin=0.5), "ckpt")  # no swaps then
    with pytest.raises(CheckpointError, match=r"different settings \(swap_margin\)"):
        _check_same_run(header, model_cfg(), train_cfg(swap_margin=0.05), "ckpt")


def test_corrupt_and_foreign_checkpoints_are_named(tmp_path):
    data = paired_data()
    train(model_cfg(), train_cfg(steps=10), data, out_dir=tmp_path, progress=False)
    weights = tmp_path / "crosscoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"crosscoder\.safetensors is corrupt"):
        load_crosscoder(tmp_path)

    header = json.loads((tmp_path / "crosscoder.json").read_text())
    header["format_version"] = 99
    (tmp_path / "crosscoder.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="newer modeldiff"):
        load_crosscoder(tmp_path)
    with pytest.raises(CheckpointError, match="no trained crosscoder"):
        load_crosscoder(tmp_path / "nowhere")


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_training_result():
    data = paired_data()
    plain = train(model_cfg(), train_cfg(steps=10), data, progress=False)
    compiled = train(model_cfg(), train_cfg(steps=10, compile=True), data, progress=False)
    assert compiled.final["fve"] == pytest.approx(plain.final["fve"], rel=1e-5)


def test_mean_score_weighting_ranks_exclusive_features_like_shared_ones(tmp_path):
    p = Partition.build("dfc", 64, 6, 10)
    summed = Crosscoder(D_A, D_B, p)
    averaged = Crosscoder(D_A, D_B, p, score_weighting="mean")
    # At initialisation every decoder row has norm 0.4 in each model it exists in.
    assert torch.allclose(summed.score_weights()[:6], torch.full((6,), 0.4))
    assert torch.allclose(summed.score_weights()[16:], torch.full((48,), 0.8))
    assert torch.allclose(averaged.score_weights(), torch.full((64,), 0.4))
    data = paired_data()
    cfg = model_cfg(score_weighting="mean")
    train(cfg, train_cfg(steps=5), data, out_dir=tmp_path, progress=False)
    assert load_crosscoder(tmp_path)[0].score_weighting == "mean"
    with pytest.raises(ConfigError, match="unknown score_weighting"):
        model_cfg(score_weighting="median")
