"""A feature's activations on typed text (engine.analysis.probe), checked against a direct
computation: full forward passes, hand-made alignment, manual normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.probe import feature_activations_on_text
from engine.config import ConfigError
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.partition import Partition

TEXT = "The river runs past the old stone bridge, and the birds sing of tea at noon."
LAYERS = {"a": 1, "b": 1}
RUN = {"model_a": {"name": "tiny-llama", "layer": 1}, "model_b": {"name": "tiny-gemma", "layer": 1}}


@pytest.fixture(scope="module")
def crosscoder() -> Crosscoder:
    torch.manual_seed(0)
    cc = Crosscoder(32, 24, Partition(n_a_exclusive=4, n_b_exclusive=4, n_shared=8))
    with torch.no_grad():
        cc.threshold.fill_(0.05)  # most positive pre-activations fire
    return cc


NORM = Normalizer(scale_a=0.5, scale_b=2.0)


def reference(models, crosscoder, text: str) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Spans and activations [pairs, features] from full forwards and a hand alignment."""
    hidden, last_at = {}, {}
    for key, loaded in zip("ab", models, strict=True):
        enc = loaded.tokenizer(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.inference_mode():
            states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
        hidden[key] = states[LAYERS[key] + 1][0]  # the output of block LAYERS[key]
        # ASCII text: tokens do not overlap, so a token ending at c is the last one to end there.
        last_at[key] = {e: i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and i > 0}
    ends = sorted(set(last_at["a"]) & set(last_at["b"]))
    x_a = hidden["a"][[last_at["a"][e] for e in ends]] * NORM.scale_a
    x_b = hidden["b"][[last_at["b"][e] for e in ends]] * NORM.scale_b
    with torch.no_grad():
        acts = crosscoder.encode(x_a, x_b).numpy()
    return list(zip([0, *ends[:-1]], ends, strict=True)), acts


def test_activations_match_a_direct_computation(tiny_pair, crosscoder):
    spans, acts = reference(tiny_pair, crosscoder, TEXT)
    assert len(spans) > 10
    fired = []
    for feature in (0, 1, 5, 6, 9, 12, 15):  # A-exclusive, B-exclusive and shared ones
        probe = feature_activations_on_text(
            RUN, feature, TEXT, models=tiny_pair, crosscoder=crosscoder, normalizer=NORM
        )
        assert [tuple(s) for s in probe.context.spans.tolist()] == spans
        np.testing.assert_allclose(probe.context.acts, acts[:, feature], rtol=1e-4, atol=1e-5)
        fired.append(probe.max_act > 0)
    # The comparison means something: most of these features fire somewhere.
    assert sum(fired) >= 4 and probe.context.text == TEXT


def test_tokens_of_both_models_cover_the_text(tiny_pair, crosscoder):
    probe = feature_activations_on_text(
        RUN, 5, TEXT, models=tiny_pair, crosscoder=crosscoder, normalizer=NORM
    )
    for key, loaded in zip("ab", tiny_pair, strict=True):
        ids = probe.window[f"ids_{key}"].tolist()
        assert ids == loaded.tokenizer(TEXT)["input_ids"]
        offsets = probe.window[f"offsets_{key}"]
        pieces = [TEXT[s:e] for s, e in offsets.tolist() if e > s]
        assert "".join(pieces) == TEXT


def test_long_text_is_cut_into_windows_in_order(tiny_pair, crosscoder):
    text = " ".join([TEXT] * 6)
    probe = feature_activations_on_text(
        RUN, 3, text, models=tiny_pair, crosscoder=crosscoder, normalizer=NORM, context_length=24
    )
    spans = probe.context.spans
    # Spans run in order over the whole text, across window boundaries (a window of model A,
    # which has no BOS to start it, loses the pair at its position 0).
    assert spans[0, 0] == 0 and spans[-1, 1] == len(text)
    assert (spans[1:, 0] >= spans[:-1, 1]).all() and (spans[:, 1] > spans[:, 0]).all()
    assert (spans[1:, 0] > spans[:-1, 1]).sum() >= 2  # several windows
    assert len(probe.window["ids_a"]) > 24  # several windows' tokens, joined
    assert np.isfinite(probe.context.acts).all()


def test_bad_inputs_raise_clear_errors(tiny_pair, crosscoder):
    kw = {"models": tiny_pair, "crosscoder": crosscoder, "normalizer": NORM}
    with pytest.raises(ConfigError, match="type some text"):
        feature_activations_on_text(RUN, 0, "   ", **kw)
    with pytest.raises(ConfigError, match="does not exist"):
        feature_activations_on_text(RUN, 99, TEXT, **kw)
    with pytest.raises(ConfigError, match="width"):
        feature_activations_on_text(RUN, 0, TEXT, **{**kw, "models": tiny_pair[::-1]})
    with pytest.raises(ConfigError, match="layer"):
        feature_activations_on_text({"model_a": {}, "model_b": {}}, 0, TEXT, **kw)
