"""Data-parallel training: two CPU processes (gloo) train exactly what one process trains on
the same global batches, through the Python API (resume included) and through torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from itertools import islice

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from engine.crosscoder.checkpoint import load_crosscoder
from engine.crosscoder.data import IterableSource, RankSlice, TensorPairs
from engine.crosscoder.pairs import save_pairs
from engine.crosscoder.trainer import Trainer
from engine.crosscoder.training import train
from tests.cli.test_cli import CONFIG
from tests.crosscoder.test_crosscoder import D_A, model_cfg, paired_data, train_cfg

WORLD = 2
# Float sums are split differently across ranks (gradients, norms, variances), so weights
# agree to rounding, not bit for bit.
ATOL, RTOL = 1e-6, 1e-5


def dirty_data(n: int = 2048, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired data with non-finite rows and outliers, which the global batch statistics
    (outlier medians, counts) must handle exactly as one process does."""
    x_a, x_b = paired_data(n=n, **kw)
    x_a[3, 0] = float("nan")
    x_b[700, 1] = float("inf")
    x_a[11] *= 100
    x_b[1500] *= 50
    return x_a, x_b


def dfc_run(steps: int):
    # Reassignment every 3 steps with bounds so tight that features do move in 12 steps, so
    # its decisions (and their resumption) are checked across ranks too.
    cfg = train_cfg(
        steps=steps,
        log_every=2,
        checkpoint_every=4,
        reassign_every=3,
        reassign_low=0.49,
        reassign_high=0.51,
    )
    return model_cfg(), cfg


def dsf_run():
    cfg = model_cfg("dsf", d_b=D_A, designated=0.25)
    return cfg, train_cfg(steps=5, log_every=1, k=8, k_initial=None, dead_window_tokens=129)


def uneven_batches() -> IterableSource:
    """129-row batches: the ranks get 64 and 65 rows."""
    x_a, x_b = paired_data(n=129 * 5, d_b=D_A, seed=3)
    return IterableSource([(x_a[i : i + 129], x_b[i : i + 129]) for i in range(0, 645, 129)])


def _worker(rank: int, tmp: str) -> None:
    """One rank: a DFC run interrupted at 8 steps and resumed to 12, then a DSF run; records
    the rows each step of this rank received."""
    torch.set_num_threads(1)
    rows: list[int] = []
    step = Trainer.step
    Trainer.step = lambda self, x_a, x_b: rows.append(x_a.shape[0]) or step(self, x_a, x_b)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        model, cfg = dfc_run(8)
        train(model, cfg, dirty_data(), out_dir=f"{tmp}/dfc", progress=False)
        model, cfg = dfc_run(12)
        dfc = train(model, cfg, dirty_data(), out_dir=f"{tmp}/dfc", progress=False)
        dfc_rows, rows[:] = rows[:], []
        dsf = train(*dsf_run(), uneven_batches(), progress=False)
        for name, result, seen in (("dfc", dfc, dfc_rows), ("dsf", dsf, rows)):
            save_file(result.crosscoder.state_dict(), f"{tmp}/{name}-rank{rank}.safetensors")
            with open(f"{tmp}/{name}-rank{rank}.json", "w") as fh:
                json.dump({"history": result.history, "final": result.final, "rows": seen}, fh)
    finally:
        dist.destroy_process_group()


def assert_same_training(single, tmp, name: str) -> list[list[int]]:
    """Every rank holds the same weights, equal to the single process's; same history.
    Returns the rows each rank received per step."""
    weights = [load_file(str(tmp / f"{name}-rank{r}.safetensors")) for r in range(WORLD)]
    for key, expected in single.crosscoder.state_dict().items():
        assert torch.equal(weights[0][key], weights[1][key]), f"replicas differ in {key}"
        assert torch.allclose(weights[0][key], expected, atol=ATOL, rtol=RTOL), key
    record = json.loads((tmp / f"{name}-rank0.json").read_text())
    assert [r["step"] for r in record["history"]] == [r["step"] for r in single.history]
    for ours, theirs in zip(record["history"], single.history, strict=True):
        for key in ("loss", "aux", "fve", "l0", "dead_frac"):
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL), (key, ours)
        for key in ("k", "masked_outliers", "nonfinite_rows"):
            assert ours[key] == theirs[key], key
    for key in ("steps", "tokens", "masked_outliers", "nonfinite_rows", "aux_nan_steps"):
        assert record["final"][key] == single.final[key], key
    return [json.loads((tmp / f"{name}-rank{r}.json").read_text())["rows"] for r in range(WORLD)]


def test_two_processes_train_what_one_process_trains_and_resume(tmp_path, monkeypatch):
    # Spawned children re-run the parent's __main__ script; after the dashboard's AppTest
    # tests that can be dashboard/app.py. A bare __main__ makes them import only _worker.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)

    single_dfc = train(*dfc_run(12), dirty_data(), progress=False)
    assert single_dfc.final["nonfinite_rows"] > 0 and single_dfc.final["masked_outliers"] > 0
    assert single_dfc.final["dead_frac"] > 0  # AuxK was active
    assert single_dfc.final["moved_to_a"] + single_dfc.final["moved_to_b"] > 0
    rows = assert_same_training(single_dfc, tmp_path, "dfc")
    # Half of each 128-row batch per rank, for 8 steps and then the 4 left after resuming.
    assert rows == [[64] * 12, [64] * 12]
    # Only rank 0 wrote the run: a checkpoint from the first launch, then the resumed end.
    saved = sorted(p.name for p in (tmp_path / "dfc" / "checkpoints").iterdir())
    assert saved == ["latest", "step-00000008", "step-00000012"]
    assert load_crosscoder(tmp_path / "dfc")[2]["metrics"]["steps"] == 12

    single_dsf = train(*dsf_run(), uneven_batches(), progress=False)
    assert assert_same_training(single_dsf, tmp_path, "dsf") == [[64] * 5, [65] * 5]


def test_torchrun_cli_trains_like_one_process(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG.replace("steps = 20", "steps = 6"))
    data = dirty_data()
    save_pairs(tmp_path / "pairs.safetensors", *data)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        "-m",
        "engine.cli",
        "train",
        "--config",
        str(tmp_path / "run.toml"),
        "--pairs",
        str(tmp_path / "pairs.safetensors"),
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("trained dfc crosscoder: 6 steps") == 1  # rank 0 only

    from engine.config import load_run_config

    cfg = load_run_config(tmp_path / "run.toml")
    single = train(cfg.crosscoder, cfg.train, data, progress=False)
    ours, _, header = load_crosscoder(tmp_path / "run")
    for key, expected in single.crosscoder.state_dict().items():
        assert torch.allclose(ours.state_dict()[key], expected, atol=ATOL, rtol=RTOL), key
    assert header["metrics"]["loss"] == pytest.approx(single.final["loss"], rel=RTOL)


def test_rank_slices_of_a_batch_make_up_the_global_batch():
    x_a, x_b = paired_data(n=1000)
    # In-memory pairs gather only their own rows; other sources are sliced.
    for source, size in ((TensorPairs(x_a, x_b), 100), (uneven_batches(), 129)):
        whole = list(islice(source.batches(size, 2, seed=5), 3))
        parts = [list(islice(RankSlice(source, r, 3).batches(size, 2, 5), 3)) for r in range(3)]
        for i, (a, b) in enumerate(whole):
            assert torch.equal(torch.cat([part[i][0] for part in parts]), a)
            assert torch.equal(torch.cat([part[i][1] for part in parts]), b)
            sizes = [part[i][0].shape[0] for part in parts]
            assert max(sizes) - min(sizes) <= 1
