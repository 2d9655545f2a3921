"""Crosscoders in the format of the paper's code (dictionary_learning's DFC fork): import,
export and the round trip, checked against the paper's equations written out here.

The paper's tensors: encoder.weight [2, d, F], encoder.bias [F], decoder.weight [2, F, d],
decoder.bias [2, d] (index 0 = model A), one threshold, features ordered
[A-exclusive | B-exclusive | shared] with int(F x pct) features per exclusive block and
zeros where a block is forbidden, and an optional input normaliser x' = (x - mean) x scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.crosscoder.checkpoint import load_crosscoder, save_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.crosscoder.paper_format import (
    PaperFormatError,
    export_paper,
    import_paper,
    read_paper,
)
from engine.errors import UserError
from engine.partition import Partition

D, F = 16, 40


def paper_features(state: dict, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
    """The paper's encode on raw inputs x [n, 2, d]: normalise (when a normaliser is set),
    sum both models' encoder outputs, add the bias, relu, then keep the values whose
    relu x (sum of the feature's decoder norms) exceeds the one threshold."""
    mean, std = state["activation_mean"], state["activation_std"]
    if not (torch.isnan(mean).any() or torch.isnan(std).any()):
        x = (x - mean) * state["activation_global_scale"].view(1, 2, 1)
    post = torch.relu(
        torch.einsum("bld,ldf->blf", x, state["encoder.weight"]).sum(1) + state["encoder.bias"]
    )
    weights = state["decoder.weight"].norm(dim=2).sum(0, keepdim=True)
    if not use_threshold:
        return post
    return post * (post * weights > state["threshold"])


def paper_decode(state: dict, f: torch.Tensor) -> torch.Tensor:
    """The paper's decode into raw units: [n, 2, d]."""
    x = torch.einsum("bf,lfd->bld", f, state["decoder.weight"]) + state["decoder.bias"]
    mean, std = state["activation_mean"], state["activation_std"]
    if not (torch.isnan(mean).any() or torch.isnan(std).any()):
        x = x / (state["activation_global_scale"].view(1, 2, 1) + 1e-8) + mean
    return x


def paper_state(n_a: int, n_b: int, *, normaliser: bool, seed: int = 0) -> dict:
    """A state dict as the paper's DedicatedFeatureBatchTopKCrossCoder saves one (weights
    random, forbidden ones zero)."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(2, D, F, generator=g) / math.sqrt(D)
    dec = torch.randn(2, F, D, generator=g) / math.sqrt(D)
    enc[1][:, :n_a] = 0  # A-exclusive: no B encoder or decoder
    dec[1][:n_a] = 0
    enc[0][:, n_a : n_a + n_b] = 0  # B-exclusive: no A
    dec[0][n_a : n_a + n_b] = 0
    if normaliser:
        mean = torch.randn(2, D, generator=g)
        std = torch.rand(2, D, generator=g) + 0.5
        scale = 1.0 / torch.sqrt((std**2).sum(-1) + 1e-8)
    else:
        mean, std = torch.full((2, D), math.nan), torch.full((2, D), math.nan)
        scale = torch.ones(2)
    return {
        "encoder.weight": enc,
        "encoder.bias": 0.1 * torch.randn(F, generator=g),
        "decoder.weight": dec,
        "decoder.bias": torch.randn(2, D, generator=g),
        "threshold": torch.tensor(0.3),
        "k": torch.tensor(4, dtype=torch.int32),
        "code_normalization_id": torch.tensor(1),
        "target_rms": torch.tensor(1.0),
        "activation_mean": mean,
        "activation_std": std,
        "activation_global_scale": scale,
    }


def save_paper_run(folder: Path, state: dict, pct: tuple[float, float]) -> Path:
    """The files the paper's trainSAE leaves: model_final.pt (the state dict with its
    `_partition_config`) and config.json ({"trainer": ...}, kwargs as strings)."""
    folder.mkdir(parents=True)
    saved = dict(state)
    saved["_partition_config"] = {
        "dict_size": F,
        "model_a_exclusive_pct": pct[0],
        "model_b_exclusive_pct": pct[1],
    }
    torch.save(saved, folder / "model_final.pt")
    config = {
        "trainer": {
            "trainer_class": "BatchTopKCrossCoderTrainer",
            "dict_class": "BatchTopKCrossCoder",
            "k": 4,
            "code_normalization": "CROSSCODER",
            "layer": 13,
            "lm_name": "chat-model-base-model",
            "dict_class_kwargs": {
                "model_a_exclusive_pct": str(pct[0]),
                "model_b_exclusive_pct": str(pct[1]),
            },
        }
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def inputs(n: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 2, D, generator=g) + 0.5


def our_features(run: Path, x: torch.Tensor) -> torch.Tensor:
    cc, normalizer, _ = load_crosscoder(run)
    with torch.no_grad():
        return cc.encode(*normalizer.apply(x[:, 0], x[:, 1]))


# -- import ------------------------------------------------------------------------------


@pytest.mark.parametrize("normaliser", [False, True], ids=["no-normaliser", "normaliser"])
def test_imported_checkpoint_gives_the_papers_features_and_reconstructions(
    tmp_path, capsys, normaliser
):
    # int(40 x 0.1) = 4 A-exclusive, int(40 x 0.25) = 10 B-exclusive, 26 shared.
    state = paper_state(4, 10, normaliser=normaliser)
    src = save_paper_run(tmp_path / "paper", state, (0.1, 0.25))
    assert main(["import-paper", str(src), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "4 A-exclusive, 10 B-exclusive, 26 shared" in printed
    assert ("normaliser" in printed) == normaliser

    cc, normalizer, header = load_crosscoder(tmp_path / "run")
    assert cc.partition == Partition(4, 10, 26)
    assert (cc.d_a, cc.d_b, cc.score_weighting) == (D, D, "sum")
    # Absent parameters, not masked zeros: A-exclusive features have no B rows.
    assert cc.w_enc_b.shape == cc.w_dec_b.shape == (36, D)
    assert header["imported"]["format"] == "dfc_learning"
    assert header["imported"]["k"] == 4
    if not normaliser:
        assert normalizer == Normalizer.identity()

    x = inputs()
    expected = paper_features(state, x)
    got = our_features(tmp_path / "run", x)
    assert 0 < (expected > 0).sum() < expected.numel()  # the threshold does select
    assert torch.equal(got > 0, expected > 0)
    assert (got - expected).abs().max().item() <= (1e-5 if normaliser else 0.0)

    with torch.no_grad():
        x_a, x_b = cc.decode(got)
    raw = paper_decode(state, expected)
    assert torch.allclose(normalizer.to_raw(x_a, "a"), raw[:, 0], atol=1e-4)
    assert torch.allclose(normalizer.to_raw(x_b, "b"), raw[:, 1], atol=1e-4)


def test_a_threshold_never_learned_is_kept_and_reported(tmp_path, capsys):
    state = paper_state(4, 4, normaliser=False)
    state["threshold"] = torch.tensor(-1.0)  # the paper's value before threshold_start_step
    src = save_paper_run(tmp_path / "early", state, (0.1, 0.1))
    assert main(["import-paper", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "threshold was never learned" in capsys.readouterr().out
    x = inputs()
    assert torch.equal(our_features(tmp_path / "run", x), paper_features(state, x))


def test_partition_is_read_from_a_hub_style_folder_or_inferred_from_the_zero_blocks(tmp_path):
    state = paper_state(6, 2, normaliser=False)
    folder = tmp_path / "hub-style"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"activation_dim": D, "dict_size": F, "num_layers": 2, "k": 4,
                    "model_a_exclusive_pct": 0.15, "model_b_exclusive_pct": 0.05})
    )  # fmt: skip
    assert read_paper(folder).partition == Partition(6, 2, 32)
    # Without any config the zero pattern of the weights gives the blocks.
    (folder / "config.json").unlink()
    assert read_paper(folder).partition == Partition(6, 2, 32)
    # A plain BatchTopKCrossCoder (no zero blocks) is a standard crosscoder.
    save_file(paper_state(0, 0, normaliser=False), str(folder / "model.safetensors"))
    assert read_paper(folder).partition == Partition(n_shared=F)


def test_imports_that_would_change_the_features_are_refused(tmp_path):
    state = paper_state(4, 4, normaliser=False)
    state["decoder.weight"][1][0, 0] = 0.5  # a B decoder weight of an A-exclusive feature
    src = save_paper_run(tmp_path / "leaky", state, (0.1, 0.1))
    with pytest.raises(PaperFormatError, match="forbids are not zero"):
        import_paper(src, tmp_path / "run")

    state = paper_state(4, 4, normaliser=False)
    state["code_normalization_id"] = torch.tensor(2)  # SAE: norm of the concatenation
    src = save_paper_run(tmp_path / "sae", state, (0.1, 0.1))
    with pytest.raises(PaperFormatError, match="code normalisation SAE"):
        import_paper(src, tmp_path / "run")

    # A store of models of another width is not the pair it was trained on.
    src = save_paper_run(tmp_path / "ok", paper_state(4, 4, normaliser=False), (0.1, 0.1))
    models = {"a": {"name": "m", "d_model": D}, "b": {"name": "n", "d_model": D + 1}}
    with pytest.raises(PaperFormatError, match="model B of the given store has 17"):
        import_paper(src, tmp_path / "run", models=models)

    with pytest.raises(PaperFormatError, match="does not exist"):
        import_paper(tmp_path / "nothing", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PaperFormatError, match="no crosscoder of the paper's code"):
        import_paper(tmp_path / "empty", tmp_path / "run")
    assert main(["import-paper", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2


# -- export and the round trip -------------------------------------------------------------


def trained_run(tmp_path: Path, **crosscoder) -> Path:
    """A DFC trained for a few steps on random pairs of one width (d_A = d_B = D)."""
    from engine.config import CrosscoderConfig, TrainConfig
    from engine.crosscoder.training import train

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, D, generator=g)
    z = torch.randn(2048, 8, generator=g).relu()
    x_a = z @ mix + 0.1 * torch.randn(2048, D, generator=g)
    x_b = z @ mix.roll(1, 1) + 0.1 * torch.randn(2048, D, generator=g)
    settings = dict(d_a=D, d_b=D, n_features=F, architecture="dfc", a_exclusive=4,
                    b_exclusive=6, score_weighting="sum")  # fmt: skip
    settings.update(crosscoder)
    train(
        CrosscoderConfig(**settings),
        TrainConfig(steps=25, batch_size=128, k=4, k_initial=None, warmup_steps=2,
                    log_every=10, checkpoint_every=100, reassign_every=0, device="cpu"),
        (x_a, x_b), out_dir=tmp_path / "run", progress=False,
    )  # fmt: skip
    return tmp_path / "run"


def test_export_writes_the_papers_layout_and_import_gives_identical_activations(tmp_path, capsys):
    run = trained_run(tmp_path)
    cc, normalizer, _ = load_crosscoder(run)
    assert normalizer.scale_a != 1.0  # our median-norm scaling travels as the normaliser
    assert main(["export-paper", str(run), "--out", str(tmp_path / "paper")]) == 0
    assert "4 A-exclusive, 6 B-exclusive, 30 shared" in capsys.readouterr().out

    state = load_file(str(tmp_path / "paper" / "model.safetensors"))
    assert state["encoder.weight"].shape == (2, D, F)
    assert state["decoder.weight"].shape == (2, F, D)
    assert state["decoder.bias"].shape == (2, D) and state["encoder.bias"].shape == (F,)
    assert state["threshold"].shape == () and int(state["k"]) == 4
    # Forbidden weights are exact zeros, allowed ones are not.
    assert state["encoder.weight"][1][:, :4].abs().max() == 0
    assert state["decoder.weight"][0][4:10].abs().max() == 0
    assert state["decoder.weight"][0][:4].abs().min() > 0
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    # The paper's FeaturePartition.from_percentages sizes blocks as int(F x pct).
    assert int(F * config["model_a_exclusive_pct"]) == 4
    assert int(F * config["model_b_exclusive_pct"]) == 6
    assert config["activation_dim"] == D and config["dict_size"] == F and config["k"] == 4
    assert config["code_normalization"] == "CROSSCODER"

    # The paper's equations on the exported tensors give our features ...
    x = inputs()
    ours = our_features(run, x)
    assert 0 < (ours > 0).sum() < ours.numel()
    theirs = paper_features(state, x)
    assert torch.equal(ours > 0, theirs > 0)
    assert (ours - theirs).abs().max().item() < 1e-5

    # ... and importing the export gives back the same crosscoder and activations.
    assert main(["import-paper", str(tmp_path / "paper"), "--out", str(tmp_path / "back")]) == 0
    back, back_norm, header = load_crosscoder(tmp_path / "back")
    assert header["imported"]["source"] == str((tmp_path / "paper").resolve())
    assert back_norm == normalizer
    assert back.partition == cc.partition
    for name, tensor in cc.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (our_features(tmp_path / "back", x) - ours).abs().max().item() == 0.0


def test_runs_the_papers_code_cannot_hold_are_refused(tmp_path):
    cc = Crosscoder(D, D + 8, Partition(4, 4, 32))
    save_crosscoder(tmp_path / "wide", cc, Normalizer.identity(), train_config={"k": 4})
    with pytest.raises(PaperFormatError, match="d_A == d_B"):
        export_paper(tmp_path / "wide", tmp_path / "out1")
    cc = Crosscoder(D, D, Partition(n_shared=30, n_designated=10))
    save_crosscoder(tmp_path / "dsf", cc, Normalizer.identity(), train_config={"k": 4})
    with pytest.raises(PaperFormatError, match="DSF"):
        export_paper(tmp_path / "dsf", tmp_path / "out2")
    cc = Crosscoder(D, D, Partition(4, 4, 32), score_weighting="mean")
    save_crosscoder(tmp_path / "mean", cc, Normalizer.identity(), train_config={"k": 4})
    with pytest.raises(PaperFormatError, match="mean decoder norm"):
        export_paper(tmp_path / "mean", tmp_path / "out3")
    # A modeldiff run directory is never overwritten by an export.
    cc = Crosscoder(D, D, Partition(4, 4, 32))
    save_crosscoder(tmp_path / "ok", cc, Normalizer.identity(), train_config={"k": 4})
    with pytest.raises(UserError, match="choose a new folder"):
        export_paper(tmp_path / "ok", tmp_path / "mean")
