"""Streaming training: the tiny Llama and Gemma 3 of tests/conftest.py (real demo
tokenizers) on a few short local text files; a few hundred pairs, batches of 32."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from engine.activations import ActivationStore
from engine.config import (
    ConfigError,
    CrosscoderConfig,
    HarvestConfig,
    StreamConfig,
    TrainConfig,
)
from engine.crosscoder.checkpoint import HEADER_FILE, WEIGHTS_FILE
from engine.crosscoder.trainer import Trainer, TrainingError
from engine.harvest.pipeline import harvest
from engine.streaming.run import STORE_DIR, STREAM_FILE, StreamError, StreamRun
from engine.streaming.source import StreamSource

BATCH = 32
BUFFER = 96  # 3 steps a block
WORDS = ["river", "stone", "bird", "light", "house", "window", "garden", "cloud", "music",
         "paper", "table", "forest", "ocean", "mountain", "letter", "friend"]  # fmt: skip


@pytest.fixture
def texts(tmp_path) -> Path:
    """Twelve short .txt documents (one per file, read in name order), none alike."""
    folder = tmp_path / "texts"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(12):
        words = [rng.choice(WORDS) + (f" {i}{j}" if j % 5 == 0 else "") for j in range(50)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words) + ".")
    return folder


def harvest_config(texts: Path, **kw) -> HarvestConfig:
    kw = {"context_length": 24, "store_dtype": "float32", "shard_pairs": 64, **kw}
    return HarvestConfig(sources=[str(texts)], batch_tokens=256, **kw)


def open_source(texts, out, pair, fresh=False, **stream) -> StreamSource:
    """A stream into the run directory `out` (its analysis store harvested or resumed)."""
    cfg = StreamConfig(**{"analysis_pairs": 60, "buffer_pairs": BUFFER, **stream})
    run = StreamRun(harvest_config(texts), cfg, out, fresh=fresh, progress=False, models=pair)
    return run.open(BATCH)


def equal(batches, others) -> bool:
    return len(batches) == len(others) and all(
        torch.equal(x_a, y_a) and torch.equal(x_b, y_b)
        for (x_a, x_b), (y_a, y_b) in zip(batches, others, strict=True)
    )


def rows(batches) -> torch.Tensor:
    """Every pair of the batches as one row [a | b]."""
    return torch.cat([torch.cat([x_a, x_b], dim=1) for x_a, x_b in batches])


def matching(x: torch.Tensor, y: torch.Tensor, atol: float = 1e-4) -> list[int] | None:
    """For x and y holding the same rows in some order, the row of y each row of x is (to
    float tolerance: the harvest batches windows differently); else None. Rows may repeat
    (a window's first pair after the BOS is the same wherever its token starts a window)."""
    if x.shape != y.shape:
        return None
    close = torch.cdist(x.double(), y.double()) < atol
    order: list[int] = []
    for row in close:
        free = [j for j in row.nonzero().flatten().tolist() if j not in order]
        if not free:
            return None
        order.append(free[0])
    return order


def test_batch_s_is_the_same_whether_iteration_starts_at_0_or_at_s(tmp_path, texts, tiny_pair):
    source = open_source(texts, tmp_path / "run", tiny_pair)
    everything = list(source.batches(BATCH, 0, seed=3))
    planned = list(source.training_windows())
    assert len(everything) == planned[-1].end // BATCH > 3 * (BUFFER // BATCH)
    # Some block boundary falls inside a window, which both blocks share.
    assert any(p.first % BUFFER and p.first // BUFFER < (p.end - 1) // BUFFER for p in planned)
    for start in (1, 3, 4, 8):  # mid-block, block starts, and a block's last step
        fresh = open_source(texts, tmp_path / "run", tiny_pair)  # nothing in memory
        assert equal(list(fresh.batches(BATCH, start, seed=3)), everything[start:]), start
    assert not equal(list(source.batches(BATCH, 0, seed=4))[:3], everything[:3])  # the seed


def test_blocks_are_shuffled_stored_pairs_of_the_training_documents(tmp_path, texts, tiny_pair):
    source = open_source(texts, tmp_path / "run", tiny_pair)
    batches = list(source.batches(BATCH, 0, seed=0))
    # The same text harvested whole: the rows of the training windows, in stream order.
    harvest(harvest_config(texts), tmp_path / "all", models=tiny_pair, progress=False)
    store = ActivationStore(tmp_path / "all")
    by_window: dict[int, torch.Tensor] = {}
    for i in range(len(store.shards)):
        shard = store.load_shard(i)
        for w in store.windows(i):
            by_window[w["index"]] = torch.cat([shard["a"], shard["b"]], dim=1)[w["rows"]]
    stored = torch.cat([by_window[p.window.index] for p in source.training_windows()])
    per_block = BUFFER // BATCH
    blocks = len(batches) // per_block
    assert blocks >= 3
    for i in range(blocks):  # each block: a permutation of its stretch of the stream
        streamed = rows(batches[i * per_block : (i + 1) * per_block])
        order = matching(streamed, stored[i * BUFFER : (i + 1) * BUFFER])
        assert order is not None, i  # the same pairs [a | b], whole
        assert order != list(range(BUFFER))  # shuffled


def test_the_analysis_store_holds_the_first_documents_and_training_none(tmp_path, texts, tiny_pair):
    source = open_source(texts, tmp_path / "run", tiny_pair)
    store = ActivationStore(tmp_path / "run" / STORE_DIR)
    assert len(store) >= 60
    stored = [w for i in range(len(store.shards)) for w in store.windows(i)]
    trained = list(source.training_windows())
    stored_docs, trained_docs = {w["doc_id"] for w in stored}, {p.window.doc_id for p in trained}
    assert stored_docs == {f"texts/doc{i:02d}.txt" for i in range(len(stored_docs))}  # first
    assert not stored_docs & trained_docs and len(stored_docs | trained_docs) == 12
    # Training starts after the store's last window (and the rest of its document).
    assert max(w["index"] for w in stored) < min(p.window.index for p in trained)
    assert len(stored_docs) * 3 < len(store) < 200  # (a few windows a document)
    # Validation measures the store; the store's windows are what the run records.
    split = source.hold_out(1024)
    assert split.train is source and split.x_a.shape[0] == len(store)
    assert split.info()["streamed"] and split.info()["store"]["path"] == str(store.path.resolve())


def small_crosscoder(source) -> tuple[CrosscoderConfig, TrainConfig]:
    cc = CrosscoderConfig(
        d_a=source.d_a, d_b=source.d_b, n_features=64, a_exclusive=8, b_exclusive=8
    )
    train = TrainConfig(
        steps=12, batch_size=BATCH, k=4, k_initial=8, anneal_steps=6, warmup_steps=2,
        log_every=4, checkpoint_every=100, reassign_every=4,
    )  # fmt: skip
    return cc, train


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, texts, tiny_pair, monkeypatch):
    from engine.crosscoder.training import train

    source = open_source(texts, tmp_path / "whole", tiny_pair)
    cc, cfg = small_crosscoder(source)
    train(cc, cfg, source, out_dir=tmp_path / "whole", progress=False)

    step = Trainer.step

    def interrupted(self, x_a, x_b):  # Ctrl-C after step 4, the middle of block 1
        stats = step(self, x_a, x_b)
        if self.counters.step == 4:
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cc, cfg, open_source(texts, tmp_path / "cut", tiny_pair), tmp_path / "cut",
              progress=False)  # fmt: skip
    steps: list[int] = []

    def counted(self, x_a, x_b):
        steps.append(self.counters.step)
        return step(self, x_a, x_b)

    monkeypatch.setattr(Trainer, "step", counted)
    # Rerun: the store is complete, the checkpoint of step 4 resumes on a fresh stream.
    result = train(cc, cfg, open_source(texts, tmp_path / "cut", tiny_pair), tmp_path / "cut",
                   progress=False)  # fmt: skip
    assert steps == list(range(4, 12)) and result.final["steps"] == 12
    from safetensors.torch import load_file

    whole, cut = (load_file(tmp_path / d / WEIGHTS_FILE) for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)  # bit for bit, on the CPU
    header = json.loads((tmp_path / "cut" / HEADER_FILE).read_text())
    assert header["stream"]["store"] == STORE_DIR and header["validation"]["streamed"]
    assert header["models"]["a"]["name"] == "tiny-llama"


def test_ranks_stream_disjoint_documents(tmp_path, texts, tiny_pair):
    source = open_source(texts, tmp_path / "run", tiny_pair)
    every = [p.window.index for p in source.training_windows()]
    shares = [list(source.training_windows(rank, 2)) for rank in (0, 1)]
    docs = [{p.document for p in share} for share in shares]
    assert all(d % 2 == rank for rank in (0, 1) for d in docs[rank]) and not docs[0] & docs[1]
    assert sorted(p.window.index for share in shares for p in share) == every
    for rank in (0, 1):
        x_a, x_b = next(source.rank_batches(BATCH, 0, 0, rank, 2))
        assert x_a.shape == (BATCH // 2, source.d_a) and x_b.shape == (BATCH // 2, source.d_b)
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        source.rank_batches(BATCH, 0, 0, 0, 3)


def test_running_out_of_text_says_how_many_steps_it_allowed(tmp_path, texts, tiny_pair):
    from engine.crosscoder.training import train

    source = open_source(texts, tmp_path / "run", tiny_pair)
    pairs = list(source.training_windows())[-1].end
    cc, cfg = small_crosscoder(source)
    cfg.steps = 1000
    with pytest.raises(TrainingError) as err:
        train(cc, cfg, source, out_dir=tmp_path / "run", progress=False)
    message = str(err.value)
    assert f"ran out after {pairs:,} training pairs" in message
    assert f"enough for {pairs // BATCH:,} steps of batch {BATCH}" in message
    assert "--steps" in message


def test_a_resume_with_other_stream_settings_is_refused(tmp_path, texts, tiny_pair):
    open_source(texts, tmp_path / "run", tiny_pair)
    assert json.loads((tmp_path / "run" / STREAM_FILE).read_text())["settings"]["buffer_pairs"]
    with pytest.raises(StreamError, match=r"buffer_pairs 96 -> 128"):
        open_source(texts, tmp_path / "run", tiny_pair, buffer_pairs=128)
    with pytest.raises(StreamError, match="analysis_pairs"):
        open_source(texts, tmp_path / "run", tiny_pair, analysis_pairs=30)
    with pytest.raises(StreamError, match="context_length"):
        cfg = StreamConfig(analysis_pairs=60, buffer_pairs=BUFFER)
        StreamRun(harvest_config(texts, context_length=32), cfg, tmp_path / "run",
                  models=tiny_pair, progress=False)  # fmt: skip
    # --fresh starts over with the new settings.
    fresh = open_source(texts, tmp_path / "run", tiny_pair, fresh=True, analysis_pairs=30)
    assert len(ActivationStore(fresh.store)) < 60
    with pytest.raises(ConfigError, match="multiple of batch_size"):
        open_source(texts, tmp_path / "other", tiny_pair, buffer_pairs=100)


def write_cli_configs(tmp_path: Path, texts: Path, train: str) -> None:
    """stream.toml (the tiny pair saved in tmp_path, on `texts`) and run.toml (a small DFC,
    with `train` lines added to its [train] table) for the CLI tests."""
    from tests.conftest import save_tiny_pair

    dirs = save_tiny_pair(tmp_path)
    (tmp_path / "stream.toml").write_text(
        f"[harvest]\nmodel_a = '{dirs['a']}'\nmodel_b = '{dirs['b']}'\n"
        f"sources = ['{texts}']\ncontext_length = 24\nstore_dtype = 'float32'\n"
        f"[stream]\nanalysis_pairs = 60\nbuffer_pairs = {BUFFER}\n"
    )
    (tmp_path / "run.toml").write_text(
        "[crosscoder]\nn_features = 64\na_exclusive = 8\nb_exclusive = 8\n"
        f"[train]\nbatch_size = {BATCH}\nk = 4\nk_initial = 8\nanneal_steps = 3\n"
        f"warmup_steps = 2\n{train}"
    )


def test_train_stream_and_analyze_from_the_command_line(tmp_path, texts):
    from engine.cli import main
    from engine.results import Database

    write_cli_configs(tmp_path, texts, "steps = 6\nlog_every = 3\n")
    run = tmp_path / "run"
    args = ["train", "--stream", str(tmp_path / "stream.toml"), "--config",
            str(tmp_path / "run.toml"), "--out", str(run), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert main([*args, "--fresh", "--steps", "9"]) == 0  # clears the run, keeps its store
    assert json.loads((run / HEADER_FILE).read_text())["metrics"]["steps"] == 9
    assert main([*args, "--buffer-pairs", "64"]) == 2  # another stream: refused
    db = tmp_path / "r.duckdb"
    assert main(["analyze", "--run", str(run), "--db", str(db), "--quiet"]) == 0
    with Database(db, create=False) as d:
        assert d.run("run")["store_path"] == str((run / STORE_DIR).resolve())


# Trains through the CLI, and after the first checkpoint at step 4 or later writes a flag
# file and waits, so that the SIGKILL lands between two known steps.
PAUSED_TRAIN = """
import sys, time
from pathlib import Path
from engine.crosscoder.trainer import Trainer

flag, args = Path(sys.argv[1]), sys.argv[2:]
save = Trainer.save_checkpoint

def paused(self, run_dir):
    path = save(self, run_dir)
    if self.counters.step >= 4:
        flag.write_text(str(self.counters.step))
        time.sleep(600)
    return path

Trainer.save_checkpoint = paused
from engine.cli import main
sys.exit(main(args))
"""


def test_a_killed_streaming_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, texts):
    import os
    import signal
    import subprocess
    import sys
    import time

    from engine.cli import main
    from engine.crosscoder.checkpoint import load_crosscoder

    write_cli_configs(tmp_path, texts, "steps = 8\nlog_every = 2\ncheckpoint_every = 2\n")

    def args(out: str) -> list[str]:
        return ["train", "--stream", str(tmp_path / "stream.toml"), "--config",
                str(tmp_path / "run.toml"), "--out", str(tmp_path / out), "--quiet"]  # fmt: skip

    flag = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut = subprocess.Popen(
        [sys.executable, "-c", PAUSED_TRAIN, str(flag), *args("cut")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert cut.poll() is None, cut.stderr.read()
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.2)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    assert int(flag.read_text()) < 8 and not (tmp_path / "cut" / WEIGHTS_FILE).exists()
    assert main(args("cut")) == 0  # resumes: replays the text up to its block, then trains
    assert main(args("full")) == 0
    got, want = load_crosscoder(tmp_path / "cut")[0], load_crosscoder(tmp_path / "full")[0]
    for name, tensor in want.state_dict().items():
        assert torch.equal(tensor, got.state_dict()[name]), name
