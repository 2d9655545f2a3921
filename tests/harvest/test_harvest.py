"""End-to-end harvests: tiny random models built in code with the real demo tokenizers
(tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.activations import ActivationStore, StoreError
from engine.activations.reader import read_manifest
from engine.config import HarvestConfig, load_run_config
from engine.harvest.pipeline import harvest, summary
from engine.harvest.windows import side
from engine.models.capture import capture_residual
from engine.models.loading import load_model

CHATS = [
    {
        "messages": [
            {"role": "user", "content": "Hi! How’s the “new” café? ☕"},
            {"role": "assistant", "content": "Great — they serve 1989 kinds of tea 🍵."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "안녕하세요? Что нового?"},
            {"role": "assistant", "content": "┌─┐ nothing much, 中文 too."},
        ]
    },
    {"text": "def f(x):\n    return x ** 2  # square\n\nprint(f(12345))"},
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = CHATS + CHATS[:1]  # one duplicate document
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return path


def config(sources, **kw) -> HarvestConfig:
    kw = {
        "max_pairs": 10**6,
        "context_length": 24,
        "store_dtype": "float32",
        "shard_pairs": 40,
        **kw,
    }
    return HarvestConfig(sources=[str(s) for s in sources], **kw)


def test_harvest_stores_the_activations_of_aligned_tokens(tmp_path, tiny_pair, corpus):
    result = harvest(
        config([corpus], layer_a=1, layer_b=-1),
        tmp_path / "store",
        models=tiny_pair,
        progress=False,
    )
    store = ActivationStore(tmp_path / "store")
    manifest = read_manifest(tmp_path / "store")
    assert len(store) == result.pairs > 20 and len(store.shards) >= 2
    al = manifest["alignment"]
    assert al["documents"] == 4 and al["duplicate_windows"] >= 1 and al["failed_documents"] == 0
    assert manifest["models"]["a"]["layer"] == 1 and manifest["models"]["b"]["layer"] == 2
    assert manifest["models"]["a"]["chat_template"] is True
    a, b = tiny_pair
    n_windows = 0
    for i in range(len(store.shards)):
        shard = store.load_shard(i)
        for w in store.windows(i):
            n_windows += 1
            assert len(w["ids_a"]) <= 24 and len(w["ids_b"]) <= 24
            rows = w["rows"]
            pos = shard["pair_pos"][rows]
            assert (pos > 0).all()  # never position 0
            # The stored vectors are the models' residual stream on the window's tokens.
            ref_a = capture_residual(a.model, 1, w["ids_a"][None].long())[0]
            ref_b = capture_residual(b.model, 2, w["ids_b"][None].long())[0]
            assert torch.allclose(shard["a"][rows], ref_a[pos[:, 0].long()], atol=1e-4)
            assert torch.allclose(shard["b"][rows], ref_b[pos[:, 1].long()], atol=1e-4)
            # Each pair's tokens end where its span ends, in both tokenizations.
            spans = shard["pair_span"][rows]
            for key, col in (("a", 0), ("b", 1)):
                ends = w[f"offsets_{key}"][pos[:, col].long(), 1]
                assert torch.equal(ends, spans[:, 1])
            # Template tokens are never paired: each span covers message text only.
            for s, e in spans.tolist():
                assert w["text"][s:e].strip() or e > s
    assert n_windows == al["windows"] - al["duplicate_windows"]
    # Per document: tokens of each model, pairs kept, and why tokens were dropped.
    docs = sorted(store.documents(), key=lambda d: d["first_window"])
    assert [d["doc_id"] for d in docs] == [f"corpus.jsonl:{i}" for i in range(1, 5)]
    assert sum(d["pairs_kept"] for d in docs) == len(store)
    assert docs[3]["pairs_kept"] == 0 and docs[3]["duplicate_windows"] == 1
    assert docs[0]["tokens_a"] > 0 and docs[0]["dropped_a"]["special/template token"] > 0
    assert "aligned pairs" in summary(result)


def test_windows_split_long_documents_and_cover_the_text(tmp_path, tiny_pair):
    text = tmp_path / "long.txt"
    body = " ".join(f"word{i} “quoted” — 1989;" for i in range(120))
    text.write_text(body)
    harvest(config([text], context_length=16), tmp_path / "store", models=tiny_pair, progress=False)
    store = ActivationStore(tmp_path / "store")
    windows = [w for i in range(len(store.shards)) for w in store.windows(i)]
    assert len(windows) > 10
    # Consecutive windows tile the document: each starts where the previous one ended.
    windows.sort(key=lambda w: w["index"])
    joined = "".join(w["text"] for w in windows)
    assert body.startswith(joined) and len(joined) > 0.9 * len(body)
    # Later windows start with the BOS where the tokenizer adds one (Gemma), and a model
    # without one (SmolLM2) gets no pair at position 0.
    prefix_a, prefix_b = (side(m.tokenizer).prefix for m in tiny_pair)
    assert prefix_a == () and prefix_b == (tiny_pair[1].tokenizer.bos_token_id,)
    for w in windows[1:]:
        assert w["ids_b"][0] == prefix_b[0]


def test_rerun_of_a_complete_harvest_does_nothing_and_more_pairs_extend_it(
    tmp_path, tiny_pair, corpus
):
    out = tmp_path / "store"
    first = harvest(config([corpus], max_pairs=30), out, models=tiny_pair, progress=False)
    assert first.pairs >= 30
    again = harvest(config([corpus], max_pairs=30), out, models=tiny_pair, progress=False)
    assert again.new_pairs == 0 and again.pairs == first.pairs
    more = harvest(config([corpus]), out, models=tiny_pair, progress=False)
    assert more.pairs > first.pairs and more.manifest["progress"]["exhausted"]
    full = harvest(config([corpus]), tmp_path / "full", models=tiny_pair, progress=False)
    assert full.pairs == more.pairs


def test_alignment_reference_method_also_harvests(tmp_path, tiny_pair, corpus):
    result = harvest(
        config([corpus], alignment="windows"), tmp_path / "s", models=tiny_pair, progress=False
    )
    assert result.pairs > 0
    assert read_manifest(tmp_path / "s")["data"]["alignment"] == "windows"


# -- the command line, killed and resumed --------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for m, name in zip(tiny_pair, ("llama", "gemma"), strict=True):
        m.model.save_pretrained(root / name)
        m.tokenizer.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs


def harvest_cmd(model_dirs, out: Path, toml: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "harvest",
        "--config",
        str(toml),
        "--out",
        str(out),
        "--model-a",
        str(model_dirs[0]),
        "--model-b",
        str(model_dirs[1]),
        "--quiet",
    ]


def pairs_of(path: Path) -> dict[tuple[int, int, int], torch.Tensor]:
    store = ActivationStore(path)
    out = {}
    for i in range(len(store.shards)):
        t = store.load_shard(i)
        for w, (p_a, p_b), x in zip(
            t["pair_window"].tolist(), t["pair_pos"].tolist(), t["a"], strict=True
        ):
            assert (w, p_a, p_b) not in out  # no duplicate pair
            out[(w, p_a, p_b)] = x
    return out


def test_killed_harvest_resumes_without_duplicates_or_losses(tmp_path, model_dirs):
    toml = tmp_path / "run.toml"
    toml.write_text(
        # Small forward batches: shards are written one by one through the run, so the kill
        # lands in the middle of it.
        '[harvest]\nsources = ["demo:pydoc"]\nmax_pairs = 4000\nbatch_tokens = 64\n'
        'shard_pairs = 250\ncontext_length = 64\nstore_dtype = "float32"\n'
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        harvest_cmd(model_dirs, out, toml), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_manifest(out)
    assert not partial["progress"]["complete"] and partial["stats"]["count"] < 4000
    resumed = subprocess.run(
        harvest_cmd(model_dirs, out, toml), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(
        harvest_cmd(model_dirs, tmp_path / "whole", toml),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr
    got, want = pairs_of(out), pairs_of(tmp_path / "whole")
    # Both stop at the first window reaching max_pairs, so they hold the same pairs.
    assert got.keys() == want.keys()
    for key in list(want)[::97]:
        assert torch.allclose(got[key], want[key], atol=1e-4)


# -- a harvest split across processes ------------------------------------------------------


@pytest.fixture
def many_docs(tmp_path) -> Path:
    """Short documents, two of them repeats that land on different ranks (dedupe)."""
    path = tmp_path / "many.jsonl"
    texts = [
        {"text": f"Note {i}: the river {i * 7} runs past “stone” {i} — ok."} for i in range(14)
    ]
    rows = CHATS + texts[:5] + [CHATS[2]] + texts[5:] + [texts[0]]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return path


def same_pairs(got: Path, want: Path) -> None:
    """The two stores hold the same (window, positions) pairs with the same vectors."""
    a, b = pairs_of(got), pairs_of(want)
    assert a.keys() == b.keys() and len(a) > 0
    for key in b:
        assert torch.allclose(a[key], b[key], atol=1e-4)


def test_processes_split_a_harvest_by_document_and_store_what_one_process_would(
    tmp_path, tiny_pair, model_dirs, many_docs
):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[harvest]\nsources = ["{many_docs}"]\nmax_pairs = 150\nshard_pairs = 20\n'
        'context_length = 16\nstore_dtype = "float32"\n'
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "split"
    # Rank 0 as torchrun starts it (RANK/WORLD_SIZE), rank 1 with the flags.
    ranks = [
        subprocess.Popen(
            harvest_cmd(model_dirs, out, toml),
            env={**env, "RANK": "0", "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            [*harvest_cmd(model_dirs, out, toml), "--rank", "1", "--world-size", "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    # The same models in this process (model_dirs holds them) give the one-process store.
    harvest(load_run_config(toml).harvest, tmp_path / "one", models=tiny_pair, progress=False)
    for proc in ranks:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    assert "rank 1 of 2" in stdout
    # Each rank wrote only its own files.
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert {name[:8] for name in shards} == {"rank-000", "rank-001"}
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "ranks").iterdir()) == [
        "manifest-000-of-002.json",
        "manifest-001-of-002.json",
    ]
    # max_pairs counts both ranks: together they stop where one process stops.
    same_pairs(out, tmp_path / "one")
    merged, single = read_manifest(out), read_manifest(tmp_path / "one")
    assert merged["progress"]["complete"] and merged["ranks"]["complete"] == [0, 1]
    assert merged["alignment"] == single["alignment"]
    assert merged["alignment"]["duplicate_windows"] >= 2
    assert merged["stats"]["count"] == single["stats"]["count"] >= 150
    assert np.allclose(merged["stats"]["mean_a"], single["stats"]["mean_a"], atol=1e-5)
    docs = sorted(d["doc_id"] for d in ActivationStore(out).documents())
    assert docs == sorted(d["doc_id"] for d in ActivationStore(tmp_path / "one").documents())


class _Interrupt:
    """A capture function that raises KeyboardInterrupt on its n-th call (Ctrl-C)."""

    def __init__(self, n: int) -> None:
        self.calls, self.n = 0, n

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return capture_residual(*args, **kw)


def test_each_rank_resumes_its_own_share(tmp_path, tiny_pair, many_docs):
    out, cfg = tmp_path / "split", config([many_docs], max_pairs=60, context_length=16)
    for rank in (0, 1):
        harvest(cfg, out, models=tiny_pair, progress=False, rank=rank, world_size=2)
    # A larger max_pairs extends both ranks; rank 1 is interrupted first and resumed.
    bigger = config([many_docs], context_length=16, shard_pairs=10, batch_tokens=32)
    with pytest.raises(KeyboardInterrupt):
        harvest(bigger, out, models=tiny_pair, progress=False, rank=1, world_size=2,
                capture=_Interrupt(5))  # fmt: skip
    partial = read_manifest(out)
    assert not partial["progress"]["complete"] and partial["ranks"]["complete"] == [0]
    for rank in (1, 0):
        harvest(bigger, out, models=tiny_pair, progress=False, rank=rank, world_size=2)
    harvest(bigger, tmp_path / "one", models=tiny_pair, progress=False)
    same_pairs(out, tmp_path / "one")
    merged, single = read_manifest(out)["progress"], read_manifest(tmp_path / "one")["progress"]
    assert merged["complete"] and merged["exhausted"]
    assert merged["done_windows"] == single["done_windows"]
    again = harvest(bigger, out, models=tiny_pair, progress=False, rank=0, world_size=2)
    assert again.new_pairs == 0


def test_a_split_store_is_continued_only_by_as_many_processes(tmp_path, tiny_pair, many_docs):
    out, cfg = tmp_path / "split", config([many_docs], max_pairs=40, context_length=16)
    harvest(cfg, out, models=tiny_pair, progress=False, rank=1, world_size=2)
    # Rank 0 has not run: the store reads, but is not complete.
    merged = read_manifest(out)
    assert merged["ranks"]["found"] == [1] and not merged["progress"]["complete"]
    with pytest.raises(StoreError, match="--world-size 2"):
        harvest(cfg, out, models=tiny_pair, progress=False)
    with pytest.raises(StoreError, match="world size"):
        harvest(cfg, out, models=tiny_pair, progress=False, rank=0, world_size=3)
    with pytest.raises(StoreError, match="impossible"):
        harvest(cfg, out, models=tiny_pair, progress=False, rank=2, world_size=2)
    # --fresh with one process replaces every rank's files.
    harvest(cfg, out, models=tiny_pair, progress=False, fresh=True)
    assert not (out / "ranks").exists() or not list((out / "ranks").iterdir())
    assert all(p.name.startswith("shard-") for p in (out / "shards").iterdir())
    harvest(cfg, tmp_path / "one", models=tiny_pair, progress=False)
    same_pairs(out, tmp_path / "one")


def test_cli_errors_are_one_line(tmp_path, model_dirs):
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "harvest",
            "--out",
            str(tmp_path / "s"),
            "--model-a",
            str(model_dirs[0]),
            "--model-b",
            str(model_dirs[1]),
            "--layer-a",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("error: ")
    assert "out of range" in bad.stderr and "Traceback" not in bad.stderr


# -- the real demo models ---------------------------------------------------------------------


@pytest.mark.slow
def test_demo_models_harvest_a_few_thousand_pairs(tmp_path):
    a, b = load_model("smollm2"), load_model("gemma3")
    cfg = HarvestConfig(max_pairs=3000, context_length=128)
    result = harvest(cfg, tmp_path / "demo", models=(a, b), progress=False)
    manifest = result.manifest
    assert result.pairs >= 3000
    assert manifest["models"]["a"]["d_model"] == 576 and manifest["models"]["b"]["d_model"] == 640
    assert manifest["models"]["a"]["layer"] == 15 and manifest["models"]["b"]["layer"] == 9
    assert manifest["alignment"]["failed_documents"] == 0
    store = ActivationStore(tmp_path / "demo")
    norm_a, norm_b = store.median_norms()
    assert np.isfinite(norm_a) and np.isfinite(norm_b) and norm_a > 0 and norm_b > 0
    x_a, x_b = next(store.batches(512, 0, 0))
    assert x_a.shape == (512, 576) and x_b.shape == (512, 640)
    assert torch.isfinite(x_a.float()).all() and torch.isfinite(x_b.float()).all()
    # No attention-sink outliers slipped in: the largest norm is within 20x the median.
    assert x_a.float().norm(dim=1).max() < 20 * norm_a


def test_train_reads_a_store_with_widths_and_norms_from_it(tmp_path, tiny_pair, corpus):
    harvest(config([corpus]), tmp_path / "store", models=tiny_pair, progress=False)
    toml = tmp_path / "run.toml"
    toml.write_text(
        "[crosscoder]\nn_features = 64\n\n[train]\nsteps = 6\nbatch_size = 16\n"
        "k = 4\nk_initial = 8\nanneal_steps = 3\nwarmup_steps = 2\nlog_every = 2\n"
        "checkpoint_every = 3\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "train",
            "--config",
            str(toml),
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "6 steps" in run.stdout
    from engine.crosscoder.checkpoint import load_crosscoder

    cc, normalizer, _ = load_crosscoder(tmp_path / "run")
    assert (cc.d_a, cc.d_b) == (32, 24)
    norm_a, norm_b = ActivationStore(tmp_path / "store").median_norms()
    target = (32 + 24) ** 0.5 / 2
    assert normalizer.scale_a == pytest.approx(target / norm_a)
    assert normalizer.scale_b == pytest.approx(target / norm_b)


# -- checks before the models load ---------------------------------------------------------


def harvest_error(capsys, *args: str) -> str:
    """`modeldiff harvest ARGS` run here: its one-line error."""
    from engine.cli import main

    started = time.perf_counter()
    status = main(["harvest", *map(str, args)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - started < 30  # no model was loaded
    return err


def test_harvest_checks_sources_and_output_before_loading_models(tmp_path, capsys):
    # The models do not exist: loading them would fail with another error than the one
    # expected, so each error below was found before any model loaded.
    models = ["--model-a", tmp_path / "no-model-a", "--model-b", tmp_path / "no-model-b"]
    text = tmp_path / "text.txt"
    text.write_text("Some text to harvest.\n")
    err = harvest_error(capsys, "--out", tmp_path / "s", *models, "--sources", tmp_path / "x.txt")
    assert "text source" in err and "x.txt" in err and "no-model" not in err
    assert not (tmp_path / "s").exists()
    # An --out that is a file, or under one.
    err = harvest_error(capsys, "--out", text, *models, "--sources", text)
    assert "is a file" in err and "no-model" not in err
    err = harvest_error(capsys, "--out", text / "s", *models, "--sources", text)
    assert "is a file" in err and "no-model" not in err
    # --fresh on a folder that is not a store.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    err = harvest_error(capsys, "--out", tmp_path / "mine", *models, "--sources", text, "--fresh")
    assert "refuses to clear" in err and (tmp_path / "mine" / "notes.md").exists()


def test_harvest_checks_a_store_to_resume_before_loading_models(tmp_path, capsys):
    from engine.activations import StoreWriter
    from engine.harvest.pipeline import _data_settings

    text = tmp_path / "text.txt"
    text.write_text("Some text to harvest.\n")
    names = {"a": str(tmp_path / "no-model-a"), "b": str(tmp_path / "no-model-b")}
    cfg = HarvestConfig(model_a=names["a"], model_b=names["b"], sources=[str(text)])
    header = {
        "models": {
            k: {"name": n, "layer": 1, "n_layers": 2, "d_model": 8} for k, n in names.items()
        },
        "data": _data_settings(cfg)[0],
        "provenance": {},
    }
    StoreWriter(tmp_path / "s", header, cfg.store_dtype).close(complete=False)
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    models = ["--model-a", names["a"], "--model-b", names["b"]]
    common = ["--out", tmp_path / "s", "--sources", text]
    err = harvest_error(capsys, *common, *models, "--context-length", "64")
    assert "different 'data'" in err and "--fresh" in err
    err = harvest_error(capsys, *common, "--model-a", tmp_path / "other", "--model-b", names["b"])
    assert "model A name" in err and "other" in err
    err = harvest_error(capsys, *common, *models, "--layer-b", "0")
    assert "model B layer 1, not 0" in err
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    # The same settings pass every check and fail only at loading the (missing) models.
    err = harvest_error(capsys, *common, *models, "--layer-a", "1", "--layer-b", "-1")
    assert "no-model-a" in err
