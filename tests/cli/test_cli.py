"""The `modeldiff` command line: training from files, resuming, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.crosscoder.checkpoint import load_crosscoder
from engine.crosscoder.pairs import save_pairs
from tests.crosscoder.test_crosscoder import D_A, D_B, paired_data

CONFIG = f"""
[crosscoder]
d_a = {D_A}
d_b = {D_B}
n_features = 64
architecture = "dfc"

[train]
steps = 20
batch_size = 128
k = 4
k_initial = 8
anneal_steps = 5
lr = 3e-3
warmup_steps = 5
k_aux = 16
dead_window_tokens = 640
log_every = 10
checkpoint_every = 10
device = "cpu"
"""


def modeldiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300
    )


def train_args(files, out: str) -> list[str]:
    """`modeldiff train` arguments for the fixture's config and pairs, into files/out."""
    return [
        "train",
        "--config",
        str(files / "run.toml"),
        "--pairs",
        str(files / "pairs.safetensors"),
        "--out",
        str(files / out),
        "--quiet",
    ]


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    save_pairs(tmp_path / "pairs.safetensors", *paired_data())
    return tmp_path


def test_train_writes_a_loadable_crosscoder_and_reruns_are_cached(files):
    args = train_args(files, "run")
    first = modeldiff(*args)
    assert first.returncode == 0, first.stderr
    assert "trained dfc crosscoder: 20 steps" in first.stdout
    assert "reassigned 0 lopsided shared features to A-exclusive" in first.stdout
    cc, _, header = load_crosscoder(files / "run")
    assert header["metrics"]["steps"] == 20 and cc.partition.n_a_exclusive == 3
    again = modeldiff(*args, "--steps", "30")
    assert again.returncode == 0 and "30 steps" in again.stdout


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda f: (f / "run.toml").write_text(CONFIG.replace("k = 4", "k = 4\nkk = 1")),
            "unknown setting(s) kk in [train]",
        ),
        (
            lambda f: (f / "run.toml").write_text(CONFIG.replace("d_b = 20", "d_b = 21")),
            "d_b = 21 in",
        ),
        (
            lambda f: (f / "pairs.safetensors").write_bytes(b"garbage"),
            "is not a readable safetensors file",
        ),
        (
            lambda f: (f / "run.toml").write_text(CONFIG.replace('"dfc"', '"dsf"')),
            "needs equal hidden sizes",
        ),
        (lambda f: (f / "run.toml").write_text(CONFIG.replace("k = 4", "k = 400")), "must be >= k"),
    ],
)
def test_user_errors_are_one_line_with_nonzero_exit(files, mutate, message):
    mutate(files)
    result = modeldiff(*train_args(files, "run"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_every_user_error_is_reported_on_one_line(monkeypatch, capsys):
    """The CLI catches the one base class: a domain error of any package (and ConfigError,
    still importable from engine.config) is printed as one line and exits 2."""
    from engine import cli, config, errors
    from engine.activations import StoreError
    from engine.crosscoder.checkpoint import CheckpointError
    from engine.crosscoder.data import DataError
    from engine.crosscoder.trainer import TrainingError
    from engine.harvest.align import AlignmentError
    from engine.harvest.chat import RenderError
    from engine.planted import PlantedError
    from engine.results import ResultsDBError
    from engine.toy.sweep import SweepError

    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    assert config.ConfigError is errors.ConfigError
    domain = (CheckpointError, DataError, TrainingError, AlignmentError, RenderError)
    domain += (StoreError, PlantedError, ResultsDBError, SweepError, config.ConfigError)
    for error in domain:
        assert issubclass(error, errors.UserError), error

        def fail(args, error=error):
            raise error(f"bad {error.__name__}")

        monkeypatch.setattr(cli.tools, "cmd_export", fail)
        assert cli.main(["export", "--db", "x.duckdb", "--what", "runs", "--out", "x.csv"]) == 2
        assert capsys.readouterr().err == f"error: bad {error.__name__}\n"


def test_missing_files_are_named(files):
    result = modeldiff("train", "--config", str(files / "nope.toml"), "--pairs", "x", "--out", "y")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_flags_left_out_keep_the_library_defaults():
    """A flag left out is None, so the config's own default applies; a flag given replaces
    its field, and the config dataclass validates it."""
    from engine import stages
    from engine.cli import build_parser
    from engine.cli.verify import _decoding
    from engine.config import ConfigError, HarvestConfig
    from engine.steering.exclusivity import ExclusivityConfig
    from engine.steering.steer import GenerationConfig

    parser = build_parser()
    args = parser.parse_args(["harvest", "--out", "s", "--context-length", "64", "--device", "cpu"])
    assert stages.with_options(HarvestConfig(), vars(args)) == HarvestConfig(
        context_length=64, device="cpu"
    )
    args.context_length = 4
    with pytest.raises(ConfigError, match="context_length must be >= 8 tokens, got 4"):
        stages.with_options(HarvestConfig(), vars(args))

    steer = ["steer", "--db", "x", "--run-id", "r", "--feature", "1", "--prompt", "p"]
    decoding = [_decoding(parser.parse_args([*steer, *extra])) for extra in
                ([], ["--temperature", "0"], ["--temperature", "0.5", "--seed", "3"])]  # fmt: skip
    configs = [stages.generation(GenerationConfig(), **options) for options in decoding]
    assert configs[0] == GenerationConfig() == configs[1]  # greedy by default
    assert configs[2] == GenerationConfig(greedy=False, temperature=0.5, seed=3)

    args = parser.parse_args(["exclusivity", "--db", "x", "--run-id", "r", "--stitch", "s"])
    cfg = stages.exclusivity_config(alphas=args.alphas, source=args.source, **_decoding(args))
    assert cfg == ExclusivityConfig()  # sampled at 0.7, 200 tokens, strengths 0..10


def test_toy_sweep_runs_from_the_command_line(tmp_path):
    out = tmp_path / "toy"
    args = [
        "toy",
        "--out",
        str(out),
        "--sizes",
        "32",
        "--seeds",
        "0",
        "--architectures",
        "standard,dfc",
        "--steps",
        "20",
        "--batch-size",
        "128",
        "--n-concepts",
        "64",
        "--d",
        "16",
        "--no-progress",
    ]
    result = modeldiff(*args)
    assert result.returncode == 0, result.stderr
    assert "dfc" in result.stdout and "standard" in result.stdout
    assert {"results.csv", "summary.csv", "results.json", "figure.html"} <= {
        p.name for p in out.iterdir()
    }
    changed = modeldiff(*[a if a != "20" else "30" for a in args])
    assert changed.returncode == 2 and "different settings (steps)" in changed.stderr
    assert modeldiff("toy", "--help").returncode == 0
    assert modeldiff("train", "--bogus").returncode == 2


@pytest.mark.slow
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sigterm_saves_a_checkpoint_and_rerun_matches_an_uninterrupted_run(files):
    import signal
    import time

    import torch

    steps = 3000
    config = CONFIG.replace("steps = 20", f"steps = {steps}")
    config = config.replace("checkpoint_every = 10", "checkpoint_every = 100000")
    (files / "run.toml").write_text(config)
    cmd = [sys.executable, "-m", "engine.cli", *train_args(files, "cut")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Imports and normalisation take ~3 s of CPU time, then it trains: wait for CPU time,
    # not wall time, so a busy machine does not send the signal before training starts.
    while cpu_seconds(proc.pid) < 6 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    # No periodic checkpoint is due, so this one was written on the way out.
    step = int((files / "cut" / "checkpoints" / "latest").read_text().split("-")[1])
    assert 0 < step < steps

    assert modeldiff(*train_args(files, "cut")).returncode == 0
    assert modeldiff(*train_args(files, "full")).returncode == 0
    resumed, full = load_crosscoder(files / "cut")[0], load_crosscoder(files / "full")[0]
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_building_the_parser_imports_no_heavy_library():
    """`modeldiff --help` and every argument error come back at once: building the parser
    must not import torch, scipy or transformers (seconds each)."""
    import subprocess
    import sys

    code = (
        "import sys; from engine.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'scipy', 'transformers', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
