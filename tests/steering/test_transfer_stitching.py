"""Steering-vector transfer through shared crosscoder features, and model stitching."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import ConfigError
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.partition import Partition
from engine.steering.stitching import Stitch, train_stitch
from engine.steering.transfer import load_vector, shared_features, transfer

D_A, D_B = 16, 24
N_A_EXCL, N_B_EXCL, N_SHARED = 3, 4, 12


def isometry(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """[d_out, d_in] matrix with orthonormal columns (preserves norms and cosines)."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_out, d_in, generator=g)).Q


def linked_crosscoder(seed: int = 0) -> tuple[Crosscoder, torch.Tensor]:
    """DFC whose shared B decoders are an isometry Q of the shared A decoders."""
    partition = Partition(n_a_exclusive=N_A_EXCL, n_b_exclusive=N_B_EXCL, n_shared=N_SHARED)
    cc = Crosscoder(D_A, D_B, partition, generator=torch.Generator().manual_seed(seed))
    q = isometry(D_B, D_A, seed)
    with torch.no_grad():
        shared_a = cc.w_dec_a[N_A_EXCL:]
        cc.w_dec_b[N_B_EXCL:] = shared_a @ q.T
    return cc, q


def shared_decoder(cc: Crosscoder, model: str, i: int) -> torch.Tensor:
    return cc.decoder_matrix(model)[cc.partition.shared_start + i]


# -- transfer ----------------------------------------------------------------------------


def test_single_feature_vector_maps_to_its_target_decoder_rescaled():
    cc, q = linked_crosscoder()
    v = 3.0 * shared_decoder(cc, "a", 5)
    out = transfer(cc, v, "a", n=1)
    assert out.features == [cc.partition.shared_start + 5]
    assert out.weights == pytest.approx([1.0], abs=1e-5)
    expected = shared_decoder(cc, "b", 5)
    expected = expected * v.norm() / expected.norm()
    torch.testing.assert_close(out.vector, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.vector, q @ v, atol=1e-5, rtol=1e-5)


def test_top_n_is_the_cosine_weighted_average_of_target_decoders():
    cc, q = linked_crosscoder()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(D_A, generator=g)
    out = transfer(cc, v, "a", n=4)
    ids = shared_features(cc)
    dec_a = cc.decoder_matrix("a")[ids]
    cos = (dec_a @ v) / (dec_a.norm(dim=1) * v.norm())
    order = cos.argsort(descending=True)[:4]
    keep = order[cos[order] > 0]
    assert out.features == (ids[keep]).tolist()
    assert out.weights == pytest.approx(cos[keep].tolist(), abs=1e-5)
    mixed = cos[keep] @ cc.decoder_matrix("b")[ids[keep]]
    torch.testing.assert_close(out.vector, mixed * v.norm() / mixed.norm(), atol=1e-5, rtol=1e-4)
    # B decoders are Q x A decoders, so the result is Q applied to the A-side average.
    mixed_a = cos[keep] @ dec_a[keep]
    torch.testing.assert_close(
        out.vector, q @ mixed_a * v.norm() / mixed_a.norm(), atol=1e-5, rtol=1e-4
    )


def test_exclusive_features_are_never_used_even_when_perfectly_aligned():
    cc, _ = linked_crosscoder()
    v_a = cc.decoder_matrix("a")[0].clone()  # an A-exclusive decoder: cosine 1
    out = transfer(cc, v_a, "a", n=N_SHARED)
    v_b = cc.decoder_matrix("b")[N_A_EXCL].clone()  # a B-exclusive decoder
    back = transfer(cc, v_b, "b", n=N_SHARED)
    shared = set(shared_features(cc).tolist())
    assert set(out.features) <= shared and set(back.features) <= shared


def test_transfer_b_to_a_inverts_the_link():
    cc, _q = linked_crosscoder()
    v_b = 2.0 * shared_decoder(cc, "b", 7)
    out = transfer(cc, v_b, "b", n=1)
    expected = shared_decoder(cc, "a", 7)
    torch.testing.assert_close(
        out.vector, expected * v_b.norm() / expected.norm(), atol=1e-5, rtol=1e-5
    )


def test_designated_shared_features_are_candidates():
    partition = Partition(n_shared=4, n_designated=4)
    cc = Crosscoder(8, 8, partition, generator=torch.Generator().manual_seed(0))
    v = cc.decoder_matrix("a")[6]
    out = transfer(cc, v, "a", n=1)
    assert out.features == [6]
    torch.testing.assert_close(out.vector, v, atol=1e-6, rtol=1e-6)  # tied decoders


def test_normalizer_round_trip_in_raw_units():
    cc, _ = linked_crosscoder()
    norm = Normalizer(scale_a=2.0, scale_b=0.25)
    raw_a = norm.to_raw(shared_decoder(cc, "a", 3), "a")
    raw_b = transfer(cc, raw_a, "a", n=1, normalizer=norm).vector
    # Norms match in the normalised space, so the raw B vector is B's decoder in raw units.
    torch.testing.assert_close(
        raw_b, norm.to_raw(shared_decoder(cc, "b", 3), "b"), atol=1e-5, rtol=1e-5
    )
    back = transfer(cc, raw_b, "b", n=1, normalizer=norm).vector
    torch.testing.assert_close(back, raw_a, atol=1e-5, rtol=1e-5)


def test_no_positive_cosine_is_a_clear_error():
    cc, _ = linked_crosscoder()
    with torch.no_grad():
        cc.w_dec_a[N_A_EXCL:, -1] = 0.0  # shared A decoders orthogonal to the last axis
    v = torch.zeros(D_A)
    v[-1] = 1.0
    with pytest.raises(ValueError, match="cannot be transferred"):
        transfer(cc, v, "a")


def test_transfer_rejects_bad_inputs():
    cc, _ = linked_crosscoder()
    with pytest.raises(ConfigError, match=f"shape \\({D_A},\\)"):
        transfer(cc, torch.ones(D_B), "a")
    with pytest.raises(ConfigError, match="'a' or 'b'"):
        transfer(cc, torch.ones(D_A), "c")
    with pytest.raises(ConfigError, match="positive int"):
        transfer(cc, torch.ones(D_A), "a", n=0)
    with pytest.raises(ValueError, match="zero"):
        transfer(cc, torch.zeros(D_A), "a")


def test_load_vector_formats(tmp_path):
    v = torch.arange(D_A, dtype=torch.float32)
    save_file({"vector": v, "other": torch.zeros(3)}, str(tmp_path / "keyed.safetensors"))
    save_file({"x": v[None]}, str(tmp_path / "single.safetensors"))
    torch.save(v, tmp_path / "v.pt")
    torch.save({"vector": v}, tmp_path / "d.pt")
    np.save(tmp_path / "v.npy", v.numpy().astype(np.float64))
    for name in ("keyed.safetensors", "single.safetensors", "v.pt", "d.pt", "v.npy"):
        torch.testing.assert_close(load_vector(tmp_path / name, D_A), v)


def test_load_vector_errors(tmp_path):
    v = torch.ones(D_A)
    np.save(tmp_path / "v.npy", v.numpy())
    with pytest.raises(ConfigError, match=f"\\({D_B},\\)"):
        load_vector(tmp_path / "v.npy", D_B, "b")
    with pytest.raises(ConfigError, match="does not exist"):
        load_vector(tmp_path / "missing.pt", D_A)
    (tmp_path / "v.txt").write_text("1 2 3")
    with pytest.raises(ConfigError, match=re.escape(".safetensors, .pt, .npy")):
        load_vector(tmp_path / "v.txt", D_A)
    save_file({"x": v, "y": v.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match="key 'vector'"):
        load_vector(tmp_path / "two.safetensors", D_A)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="not a readable"):
        load_vector(tmp_path / "bad.safetensors", D_A)


# -- stitching ---------------------------------------------------------------------------

S_A, S_B = 6, 9


def affine_pairs(n: int, noise: float, seed: int = 0):
    """x_b = x_a W^T + b + noise, with model scales far apart (raw units differ ~100x)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(S_B, S_A, generator=g)
    b = torch.randn(S_B, generator=g)
    x_a = 50.0 * (torch.randn(n, S_A, generator=g) * torch.linspace(0.5, 2.0, S_A) + 1.0)
    x_b = 0.01 * (x_a @ w.T + b)
    x_b = x_b + noise * x_b.std() * torch.randn(n, S_B, generator=g)
    return x_a, x_b, 0.01 * w, 0.01 * b


def test_stitch_recovers_a_known_affine_map():
    x_a, x_b, w, b = affine_pairs(3000, noise=0.01)
    stitch = train_stitch((x_a, x_b), S_A, S_B, steps=50, batch_size=256, lr=1e-4)
    # map() is linear: the images of the unit vectors are W's columns.
    torch.testing.assert_close(stitch.map(torch.eye(S_A), "a"), w.T, atol=2e-4, rtol=0.01)
    torch.testing.assert_close(stitch.a_to_b(torch.zeros(S_A)), b, atol=3e-3, rtol=0)
    fresh_a, _, _, _ = affine_pairs(200, noise=0.0, seed=5)
    torch.testing.assert_close(stitch.a_to_b(fresh_a), fresh_a @ w.T + b, atol=5e-3, rtol=0.01)
    assert stitch.fve["a_to_b"] > 0.99 and stitch.fve["b_to_a"] > 0.99
    assert stitch.info["heldout_pairs"] == 300


class StoreLike:
    """Stand-in for an ActivationStore: bf16 batches, some rows non-finite."""

    def __init__(self, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        self.x_a, self.x_b = x_a.clone(), x_b.clone()
        self.x_a[::50] = float("nan")

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(len(self.x_a), (batch_size,), generator=g)
            yield self.x_a[idx].bfloat16(), self.x_b[idx].bfloat16()


def test_stitch_from_a_store_like_source():
    x_a, x_b, _, _ = affine_pairs(2000, noise=0.01)
    stitch = train_stitch(StoreLike(x_a, x_b), S_A, S_B, steps=20, batch_size=128, samples=1000)
    assert stitch.info["heldout_pairs"] == 100
    # bf16 rounding (~0.4%) is the noise floor here.
    assert min(stitch.fve["a_to_b"], stitch.fve["b_to_a"]) > 0.98


def test_stitch_with_a_separate_holdout_source():
    x_a, x_b, _, _ = affine_pairs(2000, noise=0.01)
    h_a, h_b, _, _ = affine_pairs(500, noise=0.01)  # same map, fresh points
    stitch = train_stitch((x_a, x_b), S_A, S_B, steps=20, holdout=(h_a, h_b), samples=1000)
    assert stitch.info["heldout_pairs"] == 500
    assert min(stitch.fve["a_to_b"], stitch.fve["b_to_a"]) > 0.99


def test_inversion_penalty_keeps_round_trips_close_to_identity():
    # Heavy noise: the MSE-optimal B->A shrinks towards the mean, so the plain least-squares
    # maps are not inverses; the penalty trades a little MSE for invertibility.
    x_a, x_b, _, _ = affine_pairs(3000, noise=1.0, seed=2)
    kw = {"steps": 300, "batch_size": 256, "lr": 3e-3}
    free = train_stitch((x_a, x_b), S_A, S_B, inversion_weight=0.0, **kw)
    tied = train_stitch((x_a, x_b), S_A, S_B, inversion_weight=10.0, **kw)
    assert tied.fve["a_to_b_to_a"] > 0.95
    assert tied.fve["a_to_b_to_a"] > free.fve["a_to_b_to_a"] + 0.1


def test_stitch_save_load_round_trip(tmp_path):
    x_a, x_b, _, _ = affine_pairs(500, noise=0.01)
    stitch = train_stitch((x_a, x_b), S_A, S_B, steps=5, batch_size=64)
    path = stitch.save(tmp_path / "stitch.safetensors")
    loaded = Stitch.load(path)
    assert loaded.fve == stitch.fve and loaded.info == stitch.info
    assert (loaded.scale_a, loaded.scale_b) == (stitch.scale_a, stitch.scale_b)
    torch.testing.assert_close(loaded.a_to_b(x_a[:10]), stitch.a_to_b(x_a[:10]))
    torch.testing.assert_close(loaded.b_to_a(x_b[:10]), stitch.b_to_a(x_b[:10]))


def test_stitch_bad_paths_and_inputs(tmp_path):
    x_a, x_b, _, _ = affine_pairs(200, noise=0.01)
    stitch = train_stitch((x_a, x_b), S_A, S_B, steps=3, batch_size=1000)  # clamped to 180
    with pytest.raises(ConfigError, match="no stitch file"):
        Stitch.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        Stitch.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not a stitch"):
        Stitch.load(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        stitch.save(tmp_path / "stitch.pt")
    with pytest.raises(ConfigError, match="must be 6"):
        stitch.map(torch.ones(S_B), "a")
    with pytest.raises(ConfigError, match="'a' or 'b'"):
        stitch.map(torch.ones(S_A), "x")
    with pytest.raises(ConfigError, match="holdout"):
        train_stitch((x_a, x_b), S_A, S_B, holdout=1.5)
    with pytest.raises(ValueError, match="width"):
        train_stitch((x_a, x_b), S_B, S_A)


# -- a stitch records its models and is checked against the run -------------------------


def one_line_error(capsys, *args) -> str:
    """`modeldiff ARGS` run here: its one-line error."""
    from engine.cli import main

    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_stitch_of_another_model_pair_or_layer_is_refused_before_models_load(tmp_path, capsys):
    from engine.analysis.analyze import analyze
    from engine.analysis.scan import ScanConfig
    from engine.cli import main
    from engine.crosscoder.checkpoint import save_crosscoder
    from tests.analysis import test_analysis as planted

    # Model names that do not exist: loading them fails with another error than the
    # stitch's, so a stitch error proves the check ran before any model loaded.
    missing_x, missing_y = str(tmp_path / "no-model-x"), str(tmp_path / "no-model-y")

    def models(layer_b: int, name_a: str = missing_x) -> dict:
        return {
            "a": {"name": name_a, "layer": 1, "n_layers": 2, "d_model": planted.D_A},
            "b": {"name": missing_y, "layer": layer_b, "n_layers": 2, "d_model": planted.D_B},
        }

    for name, spec in (("run", models(1)), ("layer", models(0)), ("pair", models(1, "z"))):
        planted.make_store(tmp_path / f"store-{name}", n_windows=10, models=spec, noise=0.1)
    save_crosscoder(
        tmp_path / "cc", planted.planted_crosscoder(), Normalizer.identity(),
        crosscoder_config={}, train_config={},
    )  # fmt: skip
    db = tmp_path / "results.duckdb"
    scan = ScanConfig(top_k=5, segment_pairs=8)
    analyze(tmp_path / "cc", tmp_path / "store-run", db, run_id="r", scan_cfg=scan, progress=False)
    for name in ("run", "layer", "pair"):
        status = main([
            "stitch", "--store", str(tmp_path / f"store-{name}"), "--out",
            str(tmp_path / f"{name}.safetensors"), "--steps", "3", "--samples", "300",
        ])  # fmt: skip
        assert status == 0, capsys.readouterr().err
    assert Stitch.load(tmp_path / "run.safetensors").models == {
        m: {k: v for k, v in spec.items() if k != "n_layers"} for m, spec in models(1).items()
    }

    verify = ["--db", db, "--run-id", "r", "--features", "1"]
    err = one_line_error(capsys, "exclusivity", *verify, "--stitch", tmp_path / "layer.safetensors")
    assert f"fitted for model B {missing_y!r} layer 0" in err and "layer 1" in err
    err = one_line_error(
        capsys, "steer-eval", "--db", db, "--run-id", "r", "--feature", "1",
        "--rubric", "china_alignment", "--stitch", tmp_path / "pair.safetensors",
    )  # fmt: skip
    assert "fitted for model A 'z'" in err and repr(missing_x) in err
    # The stitch fitted on the run's own store passes, and the command goes on to load the
    # (missing) models.
    err = one_line_error(capsys, "exclusivity", *verify, "--stitch", tmp_path / "run.safetensors")
    assert f"{missing_x}: no such file" in err and "fitted for" not in err
