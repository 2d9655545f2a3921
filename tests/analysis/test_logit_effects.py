"""Logit effects (engine.analysis.logit_effects) against a hand computation on the tiny
Llama and Gemma 3: the final norm's scale (weight for Llama, 1 + weight for Gemma), the
unembedding, raw units, the shared-partition transfer for exclusive features, the
histogram, chunking, and the database round trip through `analyze`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.logit_effects import (
    COLUMNS,
    Readout,
    final_norm,
    logit_effects,
    run_logit_effects,
)
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.partition import Partition
from engine.specs import PairSpec
from engine.steering.steer import feature_vector
from engine.steering.transfer import transfer

NORM = Normalizer(scale_a=0.5, scale_b=2.0)
A_EXCL, B_EXCL, SHARED = 0, 4, 9  # one feature of each partition


@pytest.fixture(scope="module")
def models(tiny_pair):
    """The tiny pair with random final-norm weights, so weight and 1 + weight differ."""
    gen = torch.Generator().manual_seed(3)
    for loaded in tiny_pair:
        norm = final_norm(loaded.model)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen) * 0.5)
    return tiny_pair


@pytest.fixture(scope="module")
def crosscoder() -> Crosscoder:
    torch.manual_seed(0)
    return Crosscoder(32, 24, Partition(n_a_exclusive=4, n_b_exclusive=4, n_shared=8))


@pytest.fixture(scope="module")
def readouts(models) -> dict[str, Readout]:
    return {"a": Readout.of(models[0]), "b": Readout.of(models[1])}


@pytest.fixture(scope="module")
def effects(readouts, crosscoder):
    return readouts, logit_effects(crosscoder, NORM, readouts)


def by_hand(loaded, vector: torch.Tensor) -> np.ndarray:
    """W_U (gamma * d), gamma as each family's norm code applies it."""
    norm = final_norm(loaded.model)
    gamma = norm.weight.detach().float()
    if type(norm).__name__.startswith("Gemma"):
        gamma = 1.0 + gamma
    unembedding = loaded.model.lm_head.weight.detach().float()
    return (unembedding @ (gamma * vector)).numpy()


def row(frame, feature: int, model: str) -> dict:
    found = frame[(frame["feature_id"] == feature) & (frame["model"] == model)]
    assert len(found) == 1, (feature, model)
    return found.iloc[0].to_dict()


def test_final_norm_scale_is_weight_for_llama_and_one_plus_weight_for_gemma(models, readouts):
    llama, gemma = readouts["a"], readouts["b"]
    w_a = final_norm(models[0].model).weight.detach()
    w_b = final_norm(models[1].model).weight.detach()
    torch.testing.assert_close(llama.scale, w_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gemma.scale, 1.0 + w_b, rtol=1e-5, atol=1e-6)
    assert llama.vocab == len(models[0].tokenizer) and gemma.width == 24
    assert llama.tokens[models[0].tokenizer.convert_tokens_to_ids("Ġthe")] == " the"


@pytest.mark.parametrize(
    ("feature", "model", "kind"),
    [(SHARED, "a", "decoder"), (SHARED, "b", "decoder"), (A_EXCL, "a", "decoder"),
     (B_EXCL, "b", "decoder")],
)  # fmt: skip
def test_own_decoder_effects_match_a_hand_computation(
    models, crosscoder, effects, feature, model, kind
):
    _, frame = effects
    loaded = models[0] if model == "a" else models[1]
    scale = NORM.scale_a if model == "a" else NORM.scale_b
    decoder = crosscoder.decoder_matrix(model)[feature].detach().float()
    expected = by_hand(loaded, decoder / scale)  # raw model units
    got = row(frame, feature, model)
    assert got["vector"] == kind
    order = np.argsort(-expected)
    assert list(got["promoted_ids"]) == order[:10].tolist()
    np.testing.assert_allclose(got["promoted_values"], expected[order[:10]], rtol=1e-4)
    low = np.argsort(expected)
    assert list(got["suppressed_ids"]) == low[:10].tolist()
    np.testing.assert_allclose(got["suppressed_values"], expected[low[:10]], rtol=1e-4)
    assert got["hist_min"] == pytest.approx(expected.min(), rel=1e-4)
    assert got["hist_max"] == pytest.approx(expected.max(), rel=1e-4)
    counts = np.asarray(got["hist_counts"])
    reference, _ = np.histogram(expected, bins=40, range=(expected.min(), expected.max()))
    assert counts.sum() == len(expected)
    # Values within float32 rounding of a bin edge may fall either side of it.
    assert np.abs(counts - reference).sum() <= 1e-3 * len(expected)


@pytest.mark.parametrize(("feature", "source", "model"), [(A_EXCL, "a", "b"), (B_EXCL, "b", "a")])
def test_exclusive_features_use_the_transfer_in_the_other_model(
    models, crosscoder, effects, feature, source, model
):
    _, frame = effects
    own = feature_vector(crosscoder, NORM, feature, source)
    moved = transfer(crosscoder, own, source, normalizer=NORM).vector  # target raw units
    expected = by_hand(models[0] if model == "a" else models[1], moved)
    got = row(frame, feature, model)
    assert got["vector"] == "transfer"
    order = np.argsort(-expected)[:10]
    assert list(got["promoted_ids"]) == order.tolist()
    np.testing.assert_allclose(got["promoted_values"], expected[order], rtol=1e-4)


def test_every_feature_has_a_row_per_model_and_chunking_changes_nothing(crosscoder, effects):
    readouts, frame = effects
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) == 2 * crosscoder.partition.n_features
    assert frame["feature_id"].is_monotonic_increasing
    one_row_chunks = logit_effects(crosscoder, NORM, readouts, chunk_bytes=1)
    for column in ("promoted_ids", "suppressed_ids"):
        assert [list(x) for x in one_row_chunks[column]] == [list(x) for x in frame[column]]
    # A product of another shape rounds differently: a value on a bin edge may move.
    moved = np.abs(np.stack(one_row_chunks["hist_counts"]) - np.stack(frame["hist_counts"]))
    assert moved.sum(1).max() <= 1e-3 * readouts["b"].vocab
    np.testing.assert_allclose(
        np.stack(one_row_chunks["promoted_values"]), np.stack(frame["promoted_values"]), rtol=1e-5
    )


def test_a_model_of_another_width_is_refused(readouts):
    wrong = Crosscoder(24, 24, Partition(n_shared=4))
    with pytest.raises(ConfigError, match="width 32"):
        logit_effects(wrong, NORM, {"a": readouts["a"]})


def test_unrecorded_models_skip_logit_effects_with_the_reason(crosscoder):
    result = run_logit_effects(crosscoder, NORM, PairSpec())
    assert result.frame.empty and result.vocab == {}
    assert "does not record which model A" in result.skipped


@pytest.mark.slow
def test_analyze_stores_logit_effects_and_token_texts(tmp_path):
    from engine.analysis.analyze import analyze
    from engine.crosscoder.checkpoint import save_crosscoder
    from engine.models.loading import load_model
    from engine.results import Database
    from tests.analysis.test_analysis import D_A, D_B, make_store
    from tests.dashboard.dashboard_fixture import TEA, fixture_crosscoder, tiny_models

    # The planted store and crosscoder (its A-exclusive tea feature leans towards a shared
    # one, so it transfers), the store naming tiny saved models of its widths.
    dirs = tiny_models(tmp_path)
    make_store(
        tmp_path / "store",
        n_windows=10,
        models={
            k: {"name": str(d), "layer": 1, "d_model": w}
            for (k, d), w in zip(dirs.items(), (D_A, D_B), strict=True)
        },
    )
    cc = fixture_crosscoder()
    save_crosscoder(tmp_path / "run", cc, NORM, crosscoder_config={}, train_config={})
    db_path = tmp_path / "r.duckdb"
    result = analyze(tmp_path / "run", tmp_path / "store", db_path, run_id="r", progress=False)
    assert result.notes == () and "logit effects" in result.seconds
    loaded = [load_model(str(d)) for d in dirs.values()]
    with Database(db_path, read_only=True) as db:
        assert db.has_logit_effects("r")
        stored = db.logit_effects("r", TEA)
        assert db.logit_effects("r", 3)["vector"].tolist() == ["decoder", "decoder"]  # shared
    assert list(stored["model"]) == ["a", "b"]
    assert list(stored["vector"]) == ["decoder", "transfer"]
    expected = by_hand(loaded[0], feature_vector(cc, NORM, TEA, "a"))
    a, b = stored.iloc[0], stored.iloc[1]
    np.testing.assert_allclose(a["promoted_values"], np.sort(expected)[::-1][:10], rtol=1e-4)
    assert list(a["promoted_tokens"]) == [
        loaded[0].tokenizer.decode([int(i)]) for i in a["promoted_ids"]
    ]
    assert list(b["suppressed_tokens"]) == [
        loaded[1].tokenizer.decode([int(i)]) for i in b["suppressed_ids"]
    ]
    # A re-analysis where the models are gone clears the effects instead of keeping stale
    # ones, and says why.
    dirs["a"].rename(tmp_path / "elsewhere")
    result = analyze(tmp_path / "run", tmp_path / "store", db_path, run_id="r", progress=False)
    assert any("logit effects: model A could not be loaded" in n for n in result.notes)
    assert "logit effects" in result.summary()
    with Database(db_path, read_only=True) as db:
        assert not db.has_logit_effects("r")
        assert db.logit_effects("r", TEA).empty


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_token_texts_are_what_the_tokenizer_decodes_for_each_id(name):
    from engine.analysis.logit_effects import token_texts
    from engine.models.tokenizers import load_tokenizer

    tok = load_tokenizer(name)
    texts = token_texts(tok, len(tok) + 2)
    sample = [*range(0, len(tok), 997), len(tok) - 1]
    assert [texts[i] for i in sample] == tok.batch_decode([[i] for i in sample])
    assert texts[-2:] == [f"<id {len(tok)}>", f"<id {len(tok) + 1}>"]
