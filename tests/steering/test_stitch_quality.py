"""Stitch quality: a well-conditioned fit despite massive dimensions and outlier rows,
deterministic refits, the chosen ridge, the translation modes, and the low-FVE warning."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.activations import ActivationStore, StoreWriter
from engine.activations.shards import WindowRecord
from engine.config import ConfigError
from engine.steering.stitching import (
    FVE_WARN_BELOW,
    RIDGE_GRID,
    TENSORS,
    Stitch,
    fve_for,
    fve_lines,
    stitch_warning,
    train_stitch,
)

D_A, D_B = 12, 16
MASSIVE = 3  # model B's massive dimension


def gemma_like(n: int, seed: int = 0, outliers: int = 0, noise: float = 0.2):
    """Pairs with Gemma's shape: B's directions span 100x in spread, and one dimension sits
    at ~5800 (its mean, not its spread); both models read the same latent `z`.
    `outliers` rows put 10x the median norm on the massive dimension, unrelated to A
    (massive-activation tokens)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D_A, generator=g)
    x_a = 20.0 * z @ torch.linalg.qr(torch.randn(D_A, D_A, generator=g)).Q + 5.0
    m = torch.linalg.qr(torch.randn(D_B, D_A, generator=g)).Q.T  # [D_A, D_B], orthonormal rows
    spread = torch.logspace(-0.5, 1.5, D_B)  # 0.3 .. 30
    x_b = (z @ m + noise * torch.randn(n, D_B, generator=g)) * spread
    x_b[:, MASSIVE] += 5800.0
    rows = torch.randperm(n, generator=g)[:outliers]
    x_b[rows, MASSIVE] = 60000.0 + 5000.0 * torch.rand(outliers, generator=g)
    return x_a, x_b


def write_store(
    path, x_a: torch.Tensor, x_b: torch.Tensor, per_window: int = 50
) -> ActivationStore:
    """A real activation store holding these pairs (one word per pair)."""
    header = {"models": {"a": {"d_model": x_a.shape[1]}, "b": {"d_model": x_b.shape[1]}}}
    writer = StoreWriter(path, {**header, "data": {}}, dtype="float32", shard_pairs=400)
    for w, lo in enumerate(range(0, x_a.shape[0], per_window)):
        k = min(per_window, x_a.shape[0] - lo)
        text = " ".join(["word"] * k)
        spans = np.stack([np.arange(k) * 5, np.arange(k) * 5 + 4], 1)
        ids = np.arange(k + 1)
        offsets = np.concatenate([[[0, 0]], spans])
        pos = np.arange(1, k + 1)
        rec = WindowRecord(
            w, f"doc{w}", "unit", 0, text, ids, offsets, ids, offsets, pos, pos, spans
        )
        writer.add(rec, x_a[lo : lo + k], x_b[lo : lo + k])
    writer.close(complete=True)
    return ActivationStore(path)


def test_massive_dimensions_do_not_break_the_fit():
    # Fitted on raw rows, B's small directions fall under the solver's rank cutoff next to
    # the 5800 mean (B->A FVE was 0.53 here); centred, standardised float64 keeps them.
    x_a, x_b = gemma_like(4500)
    stitch = train_stitch((x_a[:4000], x_b[:4000]), D_A, D_B)
    assert stitch.fve["a_to_b"] > 0.9 and stitch.fve["b_to_a"] > 0.9
    # The massive dimension's movement is predicted too, not just its mean.
    fresh_a, fresh_b = x_a[4000:], x_b[4000:]
    err = stitch.a_to_b(fresh_a)[:, MASSIVE] - fresh_b[:, MASSIVE]
    spread = fresh_b[:, MASSIVE] - fresh_b[:, MASSIVE].mean()
    assert err.pow(2).mean() < 0.2 * spread.pow(2).mean()
    assert stitch.info["steps"] == 0 and stitch.info["fit"] == "least squares"


def test_outlier_rows_are_left_out_of_fit_and_score():
    x_a, x_b = gemma_like(4000, outliers=40)
    kept = train_stitch((x_a, x_b), D_A, D_B)
    assert kept.info["outlier_rows"] == 40
    assert kept.info["train_pairs"] + kept.info["heldout_pairs"] == 4000 - 40
    assert kept.fve["a_to_b"] > 0.9
    everything = train_stitch((x_a, x_b), D_A, D_B, outlier_norm=None)
    assert everything.info["outlier_rows"] == 0
    # A handful of held-out outliers carries most of B's variance and decides the score.
    assert everything.fve["a_to_b"] < kept.fve["a_to_b"] - 0.3
    with pytest.raises(ConfigError, match="outlier_norm"):
        train_stitch((x_a, x_b), D_A, D_B, outlier_norm=0.5)


def test_two_fits_on_the_same_store_are_identical(tmp_path):
    x_a, x_b = gemma_like(1200, outliers=6)
    store = write_store(tmp_path / "store", x_a, x_b)
    fits = [
        train_stitch(store, D_A, D_B, steps=15, batch_size=128, samples=900, seed=3)
        for _ in range(2)
    ]
    for name in TENSORS:
        assert torch.equal(getattr(fits[0], name), getattr(fits[1], name)), name
    assert fits[0].fve == fits[1].fve and fits[0].info == fits[1].info
    assert (fits[0].scale_a, fits[0].scale_b) == (fits[1].scale_a, fits[1].scale_b)
    other = train_stitch(store, D_A, D_B, steps=15, batch_size=128, samples=900, seed=4)
    assert not torch.equal(other.w_ab, fits[0].w_ab)
    # The fingerprint that keys stored scores to their stitch: same fit, same print, also
    # after a save and load; another fit or translation, another print.
    fits[0].save(tmp_path / "s.safetensors")
    loaded = Stitch.load(tmp_path / "s.safetensors")
    assert fits[0].fingerprint == fits[1].fingerprint == loaded.fingerprint
    assert other.fingerprint != fits[0].fingerprint
    assert replace(loaded, translation="affine").fingerprint != loaded.fingerprint


def test_a_draw_never_repeats_a_pair(tmp_path):
    x_a, x_b = gemma_like(500)
    store = write_store(tmp_path / "store", x_a, x_b)
    stitch = train_stitch(store, D_A, D_B, samples=10**6, batch_size=64)
    # One pass over the store at most: 7 batches of 64, the partial one dropped.
    assert stitch.info["train_pairs"] + stitch.info["heldout_pairs"] == 7 * 64


def test_the_chosen_ridge_beats_none_when_pairs_are_few():
    d, n = 40, 90  # about two pairs per parameter of each output
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, d, generator=g) / d**0.5
    x_a = torch.randn(n, d, generator=g)
    x_b = x_a @ w.T + 0.7 * torch.randn(n, d, generator=g)
    plain = train_stitch((x_a, x_b), d, d, ridge=0.0)
    chosen = train_stitch((x_a, x_b), d, d)
    assert plain.info["ridge"] == {"a_to_b": 0.0, "b_to_a": 0.0}
    assert set(chosen.info["ridge"].values()) <= set(RIDGE_GRID)
    assert min(chosen.info["ridge"].values()) > RIDGE_GRID[0]
    # Judged on many fresh inputs against the true map (9 held-out pairs are too few).
    fresh = torch.randn(2000, d, generator=g)
    plain_error, chosen_error = (
        (s.a_to_b(fresh) - fresh @ w.T).pow(2).mean().item() for s in (plain, chosen)
    )
    assert chosen_error < 0.7 * plain_error


def test_translation_linear_by_default_affine_is_eq_18(tmp_path):
    x_a, x_b = gemma_like(2000)
    stitch = train_stitch((x_a, x_b), D_A, D_B)
    v = torch.randn(3, D_A, generator=torch.Generator().manual_seed(0))
    zero_image = stitch.a_to_b(torch.zeros(D_A))  # the bias, in raw units
    linear = stitch.map(v, "a")
    torch.testing.assert_close(linear, stitch.a_to_b(v) - zero_image, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(stitch.map(v, "a", translation="affine"), stitch.a_to_b(v))
    # A displacement's translation does not depend on where it starts: the bias cancels.
    x = x_a[:3]
    torch.testing.assert_close(
        stitch.a_to_b(x + v) - stitch.a_to_b(x), linear, rtol=1e-4, atol=5e-2
    )
    affine = train_stitch((x_a, x_b), D_A, D_B, translation="affine")
    assert affine.translation == "affine"
    torch.testing.assert_close(affine.map(v, "a"), affine.a_to_b(v))
    loaded = Stitch.load(affine.save(tmp_path / "affine.safetensors"))
    assert loaded.translation == "affine"
    torch.testing.assert_close(loaded.map(v, "a"), affine.a_to_b(v))
    assert Stitch.load(stitch.save(tmp_path / "linear.safetensors")).translation == "linear"
    with pytest.raises(ConfigError, match="translation must be one of linear, affine"):
        stitch.map(v, "a", translation="bias")
    with pytest.raises(ConfigError, match="translation"):
        train_stitch((x_a, x_b), D_A, D_B, translation="point")


def test_stitch_warning_names_the_poor_direction():
    x_a, x_b = gemma_like(2000)
    good = train_stitch((x_a, x_b), D_A, D_B)
    assert stitch_warning(good) is None
    assert fve_for(good, "a") == good.fve["a_to_b"] and fve_for(good, "b") == good.fve["b_to_a"]
    # B unrelated to A in one direction only: B carries A plus its own noise.
    g = torch.Generator().manual_seed(5)
    y = torch.cat([x_a, 60.0 * torch.randn(2000, D_B - D_A, generator=g)], dim=1)
    one_sided = train_stitch((x_a, y), D_A, D_B)
    assert one_sided.fve["b_to_a"] > 0.99 and one_sided.fve["a_to_b"] < FVE_WARN_BELOW
    message = stitch_warning(one_sided)
    assert message is not None and "\n" not in message
    assert f"A->B {one_sided.fve['a_to_b']:.2f}" in message and "B->A" not in message
    assert stitch_warning(one_sided, source="b") is None
    assert stitch_warning(one_sided, source="a") == message
    assert stitch_warning(good, threshold=1.01) is not None
    bare = Stitch(good.w_ab, good.b_ab, good.w_ba, good.b_ba, 1.0, 1.0)
    assert "no held-out FVE recorded for A->B, B->A" in stitch_warning(bare)
    assert fve_for(bare, "a") is None and fve_lines(bare) == [
        "held-out fraction of variance explained (FVE): not recorded"
    ]


def test_cli_prints_fve_per_direction_and_warns_when_low(tmp_path, capsys):
    from engine.cli import main

    x_a, x_b = gemma_like(1000, outliers=5)
    write_store(tmp_path / "good", x_a, x_b)
    g = torch.Generator().manual_seed(9)
    write_store(
        tmp_path / "noise", torch.randn(1000, D_A, generator=g), torch.randn(1000, D_B, generator=g)
    )

    status = main(
        ["stitch", "--store", str(tmp_path / "good"), "--out", str(tmp_path / "g.safetensors")]
    )
    out, err = capsys.readouterr()
    assert status == 0, err
    stitch = Stitch.load(tmp_path / "g.safetensors")
    assert f"A->B {stitch.fve['a_to_b']:.3f}, B->A {stitch.fve['b_to_a']:.3f}" in out
    assert "5 outlier pairs left out" in out and "round trips: A->B->A" in out
    assert "warning" not in out + err

    status = main([
        "stitch", "--store", str(tmp_path / "noise"), "--out", str(tmp_path / "n.safetensors"),
        "--translation", "affine", "--ridge", "0.01", "--keep-outliers",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0, err
    noise = Stitch.load(tmp_path / "n.safetensors")
    assert noise.translation == "affine" and noise.info["ridge"] == {"a_to_b": 0.01, "b_to_a": 0.01}
    assert noise.info["outlier_norm"] is None
    warning = next(line for line in out.splitlines() if line.startswith("warning: "))
    assert "stitch quality" in warning and "A->B" in warning and "B->A" in warning
