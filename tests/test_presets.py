"""Shipped presets: they load and validate, carry the paper's numbers, and are accepted by
name wherever a config file is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.config import (
    ConfigError,
    HarvestConfig,
    load_preset,
    load_run_config,
    preset_names,
)
from engine.crosscoder.checkpoint import load_crosscoder
from engine.crosscoder.pairs import save_pairs
from tests.crosscoder.test_crosscoder import paired_data

PAPER = ("paper-llama-qwen", "paper-gptoss-deepseek")


def test_the_three_presets_ship_and_validate():
    assert {"demo", *PAPER} <= set(preset_names())
    for name in preset_names():
        cfg = load_preset(name)
        assert cfg.crosscoder is not None, name
        p = cfg.crosscoder.partition()
        assert p.n_a_exclusive + p.n_b_exclusive + p.n_shared == cfg.crosscoder.n_features
        assert cfg.train.k < cfg.crosscoder.n_features


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_use_the_appendix_b1_hyperparameters(name):
    cfg = load_preset(name)
    cc, tr, hv = cfg.crosscoder, cfg.train, cfg.harvest
    assert cc.architecture == "dfc" and cc.n_features == 131_072
    p = cc.partition()  # 5% exclusive per model: 6,554 / 6,554 / 117,964 shared
    assert (p.n_a_exclusive, p.n_b_exclusive, p.n_shared) == (6_554, 6_554, 117_964)
    assert cc.decoder_init_norm == 0.4
    assert (tr.k, tr.k_initial, tr.anneal_steps) == (200, 1000, 5000)
    assert (tr.lr, tr.steps, tr.warmup_steps, tr.batch_size) == (1e-4, 100_000, 1000, 2048)
    assert tr.aux_alpha == 0.03 and tr.dead_window_tokens == 10_000_000
    assert tr.outlier_factor == 2.0 and tr.autocast_bf16
    assert hv.max_pairs == 100_000_000
    assert hv.sources == ["fineweb", "lmsys"] and hv.weights == [0.5, 0.5]
    assert hv.model_dtype == "bfloat16" and hv.store_dtype == "bfloat16"


def test_llama_qwen_preset_models_and_widths():
    cfg = load_preset("paper-llama-qwen")
    assert cfg.harvest.model_a == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.harvest.model_b == "Qwen/Qwen3-8B"
    assert (cfg.harvest.layer_a, cfg.harvest.layer_b) == ("middle", "middle")
    assert (cfg.crosscoder.d_a, cfg.crosscoder.d_b) == (4096, 4096)
    assert cfg.train.k_aux == 512  # B.1.5


def test_gptoss_deepseek_preset_follows_table_3():
    cfg = load_preset("paper-gptoss-deepseek")
    assert cfg.harvest.model_a == "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B"
    assert cfg.harvest.model_b == "openai/gpt-oss-20b"
    assert (cfg.harvest.layer_a, cfg.harvest.layer_b) == (16, 12)
    assert (cfg.crosscoder.d_a, cfg.crosscoder.d_b) == (4096, 2880)
    assert cfg.train.k_aux == 1744


def test_demo_preset_is_the_default_model_pair_at_cpu_scale():
    cfg, defaults = load_preset("demo"), HarvestConfig()
    assert (cfg.harvest.model_a, cfg.harvest.model_b) == (defaults.model_a, defaults.model_b)
    assert cfg.harvest.sources == defaults.sources
    assert (cfg.crosscoder.d_a, cfg.crosscoder.d_b) == (576, 640)
    assert 4_096 <= cfg.crosscoder.n_features <= 16_384
    assert cfg.harvest.max_pairs <= 100_000
    # The demo must not wait the paper's 10M tokens before calling a feature dead.
    assert cfg.train.dead_window_tokens < cfg.train.steps * cfg.train.batch_size


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'llama'") as err:
        load_preset("llama")
    for name in preset_names():
        assert name in str(err.value)
    with pytest.raises(ConfigError, match=r"config file not found: nope\.toml.*demo"):
        load_run_config("nope.toml")


def test_a_config_path_may_name_a_preset_but_an_existing_file_wins(tmp_path, monkeypatch):
    assert load_run_config("paper-llama-qwen") == load_preset("paper-llama-qwen")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("[train]\nsteps = 7\n")
    assert load_run_config("demo").train.steps == 7


def test_preset_widths_must_match_the_activations():
    assert load_preset("demo", (576, 640)).crosscoder.d_b == 640
    with pytest.raises(ConfigError, match=r"d_a = 4096 in preset 'paper-llama-qwen'.*width 576"):
        load_preset("paper-llama-qwen", (576, 640))


def test_train_command_takes_a_preset(tmp_path):
    save_pairs(tmp_path / "pairs.safetensors", *paired_data(n=600, d_a=576, d_b=640))
    common = ["--pairs", str(tmp_path / "pairs.safetensors"), "--quiet", "--device", "cpu"]
    run = [sys.executable, "-m", "engine.cli", "train", "--out", str(tmp_path / "run")]
    result = subprocess.run(
        [*run, "--preset", "demo", *common, "--steps", "2", "--batch-size", "256"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    header = load_crosscoder(tmp_path / "run")[2]
    assert header["train_config"]["k"] == load_preset("demo").train.k
    assert header["crosscoder_config"]["n_features"] == load_preset("demo").crosscoder.n_features

    from engine.cli import build_parser

    args = build_parser().parse_args(["train", "--preset", "nope", "--out", "x", *common])
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available presets: demo"):
        args.func(args)
