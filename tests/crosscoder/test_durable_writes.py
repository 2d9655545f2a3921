"""Writes survive a crash or a power loss whole: tensors and checkpoints are fsynced
before they are renamed into place, `train --fresh` leaves no TensorBoard curves of the
old run, and a resumed run's curves hold each step once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.crosscoder.checkpoint import clear_run, save_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.training import train
from engine.files import atomic_save_tensors
from engine.partition import Partition
from tests.crosscoder.test_validation import make_store, model_cfg, train_cfg


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on (by file descriptor)."""
    names: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        names.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else "?")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return names


def test_tensor_files_are_fsynced_before_the_rename(tmp_path, synced):
    atomic_save_tensors(tmp_path / "w.safetensors", {"x": torch.ones(3)})
    assert any(n.endswith(".w.safetensors.tmp") for n in synced)  # the data, then the rename
    assert str(tmp_path) in synced


def test_training_checkpoints_are_fsynced(tmp_path, synced):
    train(model_cfg(), train_cfg(steps=10), make_store(tmp_path / "store"), tmp_path / "run",
          progress=False)  # fmt: skip
    assert any(n.endswith("model.safetensors") and ".step-" in n for n in synced)
    assert any(n.endswith("checkpoint.json") for n in synced)


def test_fresh_removes_the_old_runs_tensorboard_curves(tmp_path):
    run = tmp_path / "run"
    save_crosscoder(run, Crosscoder(8, 8, Partition(1, 1, 6)), Normalizer.identity())
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"old curves")
    clear_run(run)
    assert not (run / "tensorboard").exists()


def test_a_resumed_run_logs_each_step_once(tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = make_store(tmp_path / "store")
    cfg = train_cfg(steps=20, tracking="tensorboard", validation_pairs=0)
    run = tmp_path / "run"
    train(model_cfg(), cfg, store, run, progress=False)
    # As if killed after step 20 was logged but before its checkpoint was written.
    shutil.rmtree(run / "checkpoints" / "step-00000020")
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    train(model_cfg(), cfg, store, run, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [10, 20]
