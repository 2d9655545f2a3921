"""Held-out validation: the store split (whole windows, never trained on, the same on
resume and on every rank), validation FVE in the history, and TensorBoard tracking."""

from __future__ import annotations

import json
import sys
from itertools import islice

import pytest
import torch

from engine.activations import ActivationStore
from engine.config import ConfigError, CrosscoderConfig, TrainConfig
from engine.crosscoder.checkpoint import latest_checkpoint
from engine.crosscoder.data import RankSlice
from engine.crosscoder.training import train
from tests.activations.test_activations import D_A, D_B, fill, row_ids


def make_store(path, n_windows: int = 80):
    fill(path, range(n_windows), k=5, shard_pairs=40).close(complete=True)
    return ActivationStore(path)


def model_cfg(architecture: str = "dfc") -> CrosscoderConfig:
    return CrosscoderConfig(d_a=D_A, d_b=D_B, n_features=24, architecture=architecture)


def train_cfg(**kw) -> TrainConfig:
    base = dict(
        steps=30, batch_size=32, k=3, k_initial=None, warmup_steps=2, log_every=10,
        checkpoint_every=10, dead_window_tokens=200, device="cpu", validation_pairs=30,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def windows_of(x: torch.Tensor) -> set[int]:
    return set(x[:, 0].long().tolist())  # `acts` writes the window index into column 0


def test_store_split_holds_out_whole_windows_that_training_never_sees(tmp_path):
    store = make_store(tmp_path)
    split = store.hold_out(30)
    held = set(split.windows)
    assert split.x_a.shape[0] >= 30 and windows_of(split.x_a) == held
    # Whole windows: every pair of a held-out window is held out.
    assert split.x_a.shape[0] == 5 * len(held)
    assert len(split.train) == len(store) - split.x_a.shape[0]
    # Three epochs of training batches: every other pair, never a held-out one.
    seen = torch.cat([a for a, _ in islice(split.train.batches(32, 0, seed=3), 3 * 32)])
    assert not windows_of(seen) & held
    assert set(row_ids(seen).tolist()) == set(row_ids(torch.cat(
        [split.train.load_shard(i, ("a",))["a"] for i in range(len(split.train.shards))]
    )).tolist())  # fmt: skip
    # The same windows again (any seed; the split's order is fixed), and resuming at step
    # s gives batch s.
    assert store.hold_out(30).windows == split.windows
    late = next(split.train.batches(32, 7, seed=3))[0]
    assert torch.equal(late, list(islice(split.train.batches(32, 0, seed=3), 8))[7][0])
    # Ranks' slices make up the global batch.
    whole = next(split.train.batches(32, 2, 5))[0]
    parts = [next(RankSlice(split.train, r, 3).batches(32, 2, 5))[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    # At most a tenth of the store is held out.
    assert store.hold_out(10_000).x_a.shape[0] <= len(store) // 10 + 5


def test_training_reports_validation_fve_and_records_the_held_out_windows(tmp_path):
    store = make_store(tmp_path / "store")
    result = train(model_cfg(), train_cfg(), store, tmp_path / "run", progress=False)
    header = json.loads((tmp_path / "run" / "crosscoder.json").read_text())
    assert header["validation"]["windows"] == store.hold_out(30).windows
    assert header["validation"]["store"]["created"] == store.manifest["created"]
    for record in result.history:  # every log step
        for key in ("val_fve_a", "val_fve_b", "val_fve", "val_l0"):
            assert isinstance(record[key], float), key
        # One FVE per partition with decoder vectors in the model: no B-exclusive for A.
        assert "val_fve_a_a_exclusive" in record and "val_fve_a_b_exclusive" not in record
        assert "val_fve_b_b_exclusive" in record and "val_fve_b_shared" in record
        # A partition alone explains less than every feature together.
        assert record["val_fve_a_shared"] <= record["val_fve_a"] + 1e-9
    assert result.history[-1]["val_fve_a"] > result.history[0]["val_fve_a"]
    assert result.final["val_fve_a"] == result.history[-1]["val_fve_a"]


def test_validation_changes_nothing_but_the_rows_held_out(tmp_path):
    store = make_store(tmp_path / "store")
    validated = train(model_cfg(), train_cfg(), store, progress=False)
    # Training on the store without those windows, unvalidated, is the same run.
    plain = train(
        model_cfg(), train_cfg(validation_pairs=0), store.hold_out(30).train, progress=False
    )
    for name, tensor in validated.crosscoder.state_dict().items():
        assert torch.equal(tensor, plain.crosscoder.state_dict()[name]), name
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if not k.startswith("val_") and k not in drop}
            for r in validated.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in plain.history
    ]  # fmt: skip


def test_resumed_validated_run_equals_uninterrupted(tmp_path):
    store = make_store(tmp_path / "store")
    full = train(model_cfg(), train_cfg(), store, tmp_path / "full", progress=False)
    train(model_cfg(), train_cfg(steps=20), store, tmp_path / "cut", progress=False)
    assert latest_checkpoint(tmp_path / "cut") is not None
    resumed = train(model_cfg(), train_cfg(), store, tmp_path / "cut", progress=False)
    for name, tensor in full.crosscoder.state_dict().items():
        assert torch.equal(tensor, resumed.crosscoder.state_dict()[name]), name
    assert [r["val_fve_a"] for r in resumed.history] == [r["val_fve_a"] for r in full.history]


def test_standard_crosscoder_shared_partition_explains_what_all_features_do(tmp_path):
    store = make_store(tmp_path / "store")
    result = train(model_cfg("standard"), train_cfg(steps=10), store, progress=False)
    last = result.history[-1]
    assert last["val_fve_a_shared"] == pytest.approx(last["val_fve_a"], abs=1e-9)
    assert last["val_fve_b_shared"] == pytest.approx(last["val_fve_b"], abs=1e-9)


def test_tensorboard_tracking_writes_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = make_store(tmp_path / "store")
    cfg = train_cfg(steps=20, tracking="tensorboard")
    train(model_cfg(), cfg, store, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "fve_a", "val_fve_a", "val_fve_b_shared", "dead_frac", "l0"} <= tags
    assert [e.step for e in events.Scalars("val_fve_a")] == [10, 20]


def test_tracking_names_the_fix_when_tensorboard_is_missing(tmp_path, monkeypatch):
    from engine.crosscoder.tracking import TrackingError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    store = make_store(tmp_path / "store", 30)
    with pytest.raises(TrackingError, match="pip install"):
        train(model_cfg(), train_cfg(tracking="tensorboard"), store, tmp_path / "run",
              progress=False)  # fmt: skip


TORCHRUN_CONFIG = f"""
[crosscoder]
d_a = {D_A}
d_b = {D_B}
n_features = 24
[train]
steps = 20
batch_size = 32
k = 3
k_initial = 6
anneal_steps = 10
warmup_steps = 2
log_every = 10
checkpoint_every = 10
dead_window_tokens = 200
device = "cpu"
validation_pairs = 30
"""


def test_torchrun_holds_out_the_same_windows_and_trains_like_one_process(tmp_path):
    import subprocess

    from engine import stages
    from engine.config import load_run_config
    from engine.crosscoder.checkpoint import load_crosscoder

    make_store(tmp_path / "store")
    (tmp_path / "run.toml").write_text(TORCHRUN_CONFIG)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "engine.cli", "train", "--config", str(tmp_path / "run.toml"),
        "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--quiet",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cfg = load_run_config(tmp_path / "run.toml")
    data = stages.training_data(store=tmp_path / "store")
    single = stages.train(cfg, data, tmp_path / "single", progress=False)
    ours, _, header = load_crosscoder(tmp_path / "run")
    for key, expected in single.crosscoder.state_dict().items():
        assert torch.allclose(ours.state_dict()[key], expected, atol=1e-5, rtol=1e-4), key
    assert (
        header["validation"]["windows"] == ActivationStore(tmp_path / "store").hold_out(30).windows
    )
    for ranked, alone in zip(header["history"], single.history, strict=True):
        assert ranked["val_fve_a"] == pytest.approx(alone["val_fve_a"], abs=1e-5)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="validation_pairs"):
        TrainConfig(validation_pairs=-1)
    with pytest.raises(ConfigError, match="tracking"):
        TrainConfig(tracking="wandb")
