"""The typed model records (engine.specs) read and write the JSON shapes runs always had, and
a run directory written before they existed still loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from engine.analysis.geometry import match_runs
from engine.config import ConfigError
from engine.crosscoder import checkpoint as ckpt
from engine.crosscoder.checkpoint import CheckpointError, check_models, load_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.partition import Partition
from engine.specs import ModelSpec, PairSpec
from engine.steering.stitching import Stitch, fitted_models

# A store manifest's "models" entry as a harvest wrote it before engine.specs existed (the
# same entry is copied into crosscoder.json and, per model, into the runs table).
MANIFEST_MODELS = {
    "a": {
        "name": "smollm2",
        "source": {
            "kind": "demo",
            "id": "smollm2",
            "file": "smollm2.gguf",
            "sha256": "0123abcd" * 8,
        },
        "class": "LlamaForCausalLM",
        "layer": 15,
        "n_layers": 30,
        "d_model": 576,
        "chat_template": True,
    },
    "b": {
        "name": "google/gemma-3-270m",
        "source": {"kind": "hub", "id": "google/gemma-3-270m", "revision": None},
        "class": "Gemma3ForCausalLM",
        "layer": 9,
        "n_layers": 18,
        "d_model": 640,
        "chat_template": False,
    },
}

# Shapes other writers and older files use: a stitch's brief record, hand-written rows with a
# string source, a local directory, an empty record, a key of a newer version, a null.
OTHER_RECORDS = [
    {"name": "smollm2", "layer": 15, "d_model": 576},
    {"name": "smollm2", "source": "demo", "layer": 15, "d_model": 576},
    {"name": "/m/a", "source": {"kind": "dir", "path": "/m/a"}, "layer": 1, "n_layers": 2},
    {},
    {"name": "x", "layer": 3, "d_model": 8, "dtype": "bfloat16"},
    {"name": "x", "layer": None, "d_model": 8},
]


@pytest.mark.parametrize("record", [*MANIFEST_MODELS.values(), *OTHER_RECORDS])
def test_a_model_record_round_trips_unchanged(record):
    spec = ModelSpec.from_dict(record)
    assert spec.to_dict() == record
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_pair_round_trips_in_the_same_json_text():
    text = json.dumps(MANIFEST_MODELS, indent=2)
    pair = PairSpec.from_dict(json.loads(text))
    assert json.dumps(pair.to_dict(), indent=2) == text  # same keys, same order
    assert pair["a"].model_class == "LlamaForCausalLM" and pair["b"].layer == 9
    assert PairSpec.from_dict({"a": {"name": "x"}}).to_dict() == {"a": {"name": "x"}}
    assert PairSpec.from_dict(None).to_dict() == {} and not PairSpec.from_dict({}).known


def test_a_runs_row_round_trips():
    row = {"run_id": "r", "model_a": MANIFEST_MODELS["a"], "model_b": OTHER_RECORDS[1]}
    pair = PairSpec.from_run(row)
    assert pair.run_columns() == {"model_a": row["model_a"], "model_b": row["model_b"]}
    # A row whose model columns are NULL reads as two empty records.
    empty = PairSpec.from_run({"model_a": None})
    assert empty.run_columns() == {"model_a": {}, "model_b": {}}
    assert empty.missing("b") == "the run does not record which model B and layer it was trained on"
    with pytest.raises(ConfigError, match="does not record model A's layer"):
        empty.layer("a", ConfigError)
    assert pair.layer("b") == 15 and pair.require("a").name == "smollm2"


def test_a_spec_built_from_loaded_models_is_the_harvest_record():
    class LlamaForCausalLM(torch.nn.Module):
        pass

    loaded = SimpleNamespace(
        name="smollm2",
        source=MANIFEST_MODELS["a"]["source"],
        model=LlamaForCausalLM(),
        tokenizer=SimpleNamespace(chat_template="{{ messages }}"),
        n_layers=30,
        d_model=576,
    )
    spec = ModelSpec.from_loaded(loaded, 15)
    assert json.dumps(spec.to_dict()) == json.dumps(MANIFEST_MODELS["a"])


def test_identity_and_conflicts():
    a = ModelSpec.from_dict(MANIFEST_MODELS["a"])
    assert a.identity == (MANIFEST_MODELS["a"]["source"]["sha256"], 15, 576)
    b = ModelSpec.from_dict(MANIFEST_MODELS["b"])
    assert b.weights == "google/gemma-3-270m@None"
    assert ModelSpec.from_dict(OTHER_RECORDS[2]).weights == "/m/a"
    assert ModelSpec.from_dict({"name": "n"}).weights == "n"
    brief = ModelSpec.from_dict(OTHER_RECORDS[0])
    assert not brief.conflicts_with(a) and not ModelSpec().conflicts_with(a)
    assert ModelSpec.from_dict({"layer": 3}).conflicts_with(a)
    assert a.label == "'smollm2' (layer 15, d 576)"
    assert a.where == "'smollm2' layer 15 (width 576)"
    assert fitted_models(SimpleNamespace(manifest={"models": MANIFEST_MODELS})) == {
        m: {k: v for k, v in r.items() if k in ("name", "layer", "d_model")}
        for m, r in MANIFEST_MODELS.items()
    }
    assert fitted_models(SimpleNamespace(manifest={})) == {} == fitted_models(object())


def _old_run(path, models=None):
    """A run directory as modeldiff wrote it before engine.specs: the JSON written by hand."""
    p = Partition(2, 2, 4)
    cc = Crosscoder(6, 5, p)
    path.mkdir()
    save_file(cc.state_dict(), str(path / "crosscoder.safetensors"))
    header = {
        "format": "modeldiff.crosscoder",
        "format_version": 1,
        "architecture": p.architecture.value,
        "d_a": 6,
        "d_b": 5,
        "partition": p.to_dict(),
        "score_weighting": "sum",
        "normalizer": Normalizer.identity().to_dict(),
        **({"models": models} if models is not None else {}),
    }
    (path / "crosscoder.json").write_text(json.dumps(header, indent=2))
    return path


def test_a_run_written_before_the_specs_loads_and_checks_its_models(tmp_path):
    run = _old_run(tmp_path / "old", MANIFEST_MODELS)
    cc, _, header = load_crosscoder(run)
    assert header["models"] == MANIFEST_MODELS
    assert ckpt.trained_on(cc) == PairSpec.from_dict(MANIFEST_MODELS)
    assert ckpt.trained_on(cc).to_dict() == MANIFEST_MODELS
    # Matching refuses a run that records another layer of model B ...
    other = json.loads(json.dumps(MANIFEST_MODELS))
    other["b"]["layer"] = 8
    relayered, _, _ = load_crosscoder(_old_run(tmp_path / "relayered", other))
    with pytest.raises(CheckpointError, match=r"model B 'google/gemma-3-270m' \(layer 9"):
        match_runs(cc, relayered)
    # ... but not one that records none, nor a crosscoder that was not loaded from a run.
    unknown, _, _ = load_crosscoder(_old_run(tmp_path / "unknown"))
    assert (
        ckpt.trained_on(unknown) is None and ckpt.trained_on(Crosscoder(6, 5, cc.partition)) is None
    )
    assert len(match_runs(cc, unknown)) == cc.partition.n_features
    assert len(match_runs(cc, cc)) == cc.partition.n_features
    check_models(None, PairSpec.from_dict(other), "x", "y")
    check_models(PairSpec.from_dict(MANIFEST_MODELS), PairSpec.from_dict({}), "x", "y")


def test_checkpoint_file_names_are_the_ones_on_disk(tmp_path):
    names = (ckpt.HEADER_FILE, ckpt.WEIGHTS_FILE, ckpt.STATS_FILE, ckpt.CHECKPOINTS_DIR)
    assert names == (
        "crosscoder.json",
        "crosscoder.safetensors",
        "feature_stats.safetensors",
        "checkpoints",
    )
    assert ckpt.step_name(1000) == "step-00001000" and ckpt.LATEST_FILE == "latest"
    cc = Crosscoder(6, 5, Partition(2, 2, 4))
    ckpt.save_crosscoder(tmp_path, cc, Normalizer.identity(), models=MANIFEST_MODELS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[:3])
    assert ckpt.has_crosscoder(tmp_path) and not ckpt.has_crosscoder(tmp_path / "x")
    assert json.loads((tmp_path / "crosscoder.json").read_text())["models"] == MANIFEST_MODELS
    optimizer = torch.optim.Adam(cc.parameters())
    ckpt.save_training_checkpoint(tmp_path, 7, cc, Normalizer.identity(), optimizer, {}, {}, 2)
    step = tmp_path / "checkpoints" / "step-00000007"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000007\n"
    assert sorted(p.name for p in step.iterdir()) == [
        "checkpoint.json", "model.safetensors", "optimizer.safetensors", "state.safetensors"
    ]  # fmt: skip
    assert ckpt.latest_checkpoint(tmp_path) == step
    ckpt.clear_run(tmp_path)
    assert not ckpt.has_crosscoder(tmp_path) and not any((tmp_path / "checkpoints").iterdir())


def test_a_stitch_checks_a_run_row_by_the_fields_both_record():
    stitch = Stitch(
        torch.zeros(5, 6), torch.zeros(5), torch.zeros(6, 5), torch.zeros(6), 1.0, 1.0,
        models={"a": {"name": "smollm2", "layer": 15}, "b": {"name": "other", "d_model": 640}},
    )  # fmt: skip
    row = PairSpec.from_dict(MANIFEST_MODELS).run_columns()
    with pytest.raises(ConfigError, match=r"model B 'other' layer None \(width 640\).*'google"):
        stitch.check_run(row, "r")
    stitch.models["b"]["name"] = "google/gemma-3-270m"
    stitch.check_run(row, "r")
    stitch.check_run({"model_a": None, "model_b": None}, "r")  # a row that records none
