"""The organism target check (`modeldiff organism-verify`) on a tiny bench cell: a run, its
store and stitch on the tiny saved models with the real demo tokenizers; the verdict rule;
and the command line."""

from __future__ import annotations

import json

import pytest

from engine.organisms.verify import verdict


@pytest.fixture(scope="module")
def tiny_cell(tmp_path_factory):
    """A bench cell folder: dfc-0 (a DFC trained a few steps), store/ and stitch."""
    from engine import stages
    from engine.activations import ActivationStore
    from engine.config import CrosscoderConfig, HarvestConfig, TrainConfig
    from engine.crosscoder.training import train
    from engine.harvest.pipeline import harvest
    from engine.models.loading import load_model
    from tests.conftest import save_tiny_pair

    cell = tmp_path_factory.mktemp("cell")
    dirs = [str(d) for d in save_tiny_pair(cell / "models").values()]
    text = cell / "text.txt"
    text.write_text(" ".join(f"Write a poem about the river {i}." for i in range(40)))
    models = (load_model(dirs[0]), load_model(dirs[1]))
    harvest(HarvestConfig(sources=[str(text)], max_pairs=600, context_length=64,
                          store_dtype="float32"), cell / "store", models=models, progress=False)
    train(
        CrosscoderConfig(d_a=32, d_b=24, n_features=32, a_exclusive=8, b_exclusive=4),
        TrainConfig(steps=10, batch_size=64, k=4, k_initial=None, warmup_steps=2,
                    checkpoint_every=100, log_every=10),
        ActivationStore(cell / "store"), out_dir=cell / "dfc-0", progress=False,
    )  # fmt: skip
    stages.fit_stitch(cell / "store", cell / "stitch.safetensors", steps=0, seed=0)
    return cell, {"a": models[0], "b": models[1]}


def test_verify_feature_reads_the_refusal_against_the_null_and_caches_it(tiny_cell):
    from engine.organisms.verify import format_result, verify_features
    from engine.steering.effects import session as effects_session

    cell, loaded = tiny_cell
    settings = {"n_prompts": 2, "nulls": 4, "budget": 0.01, "loaded": loaded, "log": print}
    first = verify_features(cell, [0, 20], **settings)
    assert [r["feature"] for r in first] == [0, 20] and first[0]["source"] == "a"
    for row in first:
        assert set(row["target_z"]) == {"a", "b"} and row["null_n"] == 4
        assert row["target"].startswith("I'm sorry") and len(row["null_target_effects"]["a"]) == 4
        assert row["verdict"] in ("confirmed A-exclusive", "shared", "not separated")
        assert "feature" in format_result(row) and json.dumps(row)
    assert len(list(cell.glob("effects-null-*.json"))) == 1
    # A second check reads the null (with its target changes) from the cell: nothing but
    # the feature is measured, and the numbers are the same.
    calls = []
    real = effects_session.measure_vectors

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    effects_session.measure_vectors = counted
    try:
        again = verify_features(cell, [0], **settings)
    finally:
        effects_session.measure_vectors = real
    assert len(calls) == 1 and again[0]["target_z"] == first[0]["target_z"]


def test_verdict_needs_the_own_model_above_and_the_other_within_the_null():
    assert verdict({"a": 4.0, "b": 0.5}, "a") == "confirmed A-exclusive"
    assert verdict({"a": 4.0, "b": 3.5}, "a") == "shared"
    assert verdict({"a": 2.0, "b": 0.0}, "a") == "not separated"
    assert verdict({"a": 4.0, "b": -2.5}, "a") == "not separated"
    assert verdict({"a": 0.1, "b": 3.2}, "b") == "confirmed B-exclusive"
    assert verdict({"a": None, "b": 0.0}, "a") == "not separated"


def test_the_command_line_parses_the_check():
    from engine.cli import build_parser

    args = build_parser().parse_args(
        ["organism-verify", "--cell", "runs/bench/A-only", "--feature", "3803", "--nulls", "8"]
    )
    assert args.feature == [3803] and args.nulls == 8 and args.prompts == 12
    assert args.func.__name__ == "cmd_organism_verify" and args.random_shared is None
