"""Search by text (engine.analysis.search) against the direct computation of the probe tests:
full forward passes, a hand alignment and manual normalisation, every feature at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import categories
from engine.analysis.probe import feature_activations_on_text
from engine.analysis.search import FEATURE_COLUMNS, feature_categories, features_on_text
from engine.config import ConfigError
from engine.crosscoder.model import Crosscoder
from engine.partition import Partition
from tests.analysis.test_probe import NORM, RUN, TEXT, reference


@pytest.fixture(scope="module")
def crosscoder() -> Crosscoder:
    torch.manual_seed(0)
    cc = Crosscoder(32, 24, Partition(n_a_exclusive=4, n_b_exclusive=4, n_shared=8))
    with torch.no_grad():
        cc.threshold.fill_(0.05)
        cc.w_dec_b[4] *= 0.05  # B row 4 is shared feature 8: its B decoder is small (A-leaning)
    return cc


@pytest.fixture(scope="module")
def found(tiny_pair, crosscoder):
    return features_on_text(RUN, TEXT, models=tiny_pair, crosscoder=crosscoder, normalizer=NORM)


def test_entries_are_every_positive_activation_of_a_direct_computation(
    tiny_pair, crosscoder, found
):
    spans, acts = reference(tiny_pair, crosscoder, TEXT)
    assert [tuple(s) for s in found.spans.tolist()] == spans
    dense = np.zeros_like(acts)
    dense[found.token, found.feature] = found.activation
    np.testing.assert_allclose(dense, acts, rtol=1e-4, atol=1e-5)
    assert (found.activation > 0).all() and len(found.activation) == int((acts > 0).sum())
    assert found.tokens()[1] == TEXT[spans[1][0] : spans[1][1]]
    np.testing.assert_array_equal(found.active_per_token(), (acts > 0).sum(1))
    # One feature's row is what the feature page's probe shows for it.
    probe = feature_activations_on_text(
        RUN, 9, TEXT, models=tiny_pair, crosscoder=crosscoder, normalizer=NORM
    )
    np.testing.assert_allclose(found.feature_acts(9), probe.context.acts, rtol=1e-5)


def test_features_are_grouped_by_category_strongest_first(tiny_pair, crosscoder, found):
    _, acts = reference(tiny_pair, crosscoder, TEXT)
    table = found.features()
    assert tuple(table.columns) == FEATURE_COLUMNS
    assert sorted(table["feature_id"]) == np.flatnonzero((acts > 0).any(0)).tolist()
    every = feature_categories(crosscoder)
    assert every[0] == categories.A_EXCLUSIVE and every[4] == categories.B_EXCLUSIVE
    assert every[8] == categories.A_LEANING
    assert list(table["category"]) == [every[f] for f in table["feature_id"]]
    order = [categories.CATEGORIES.index(c) for c in table["category"]]
    assert order == sorted(order)
    for _, group in table.groupby("category"):
        assert list(group["activation"]) == sorted(group["activation"], reverse=True)
    for row in table.itertuples():
        assert row.activation == pytest.approx(acts[:, row.feature_id].max(), rel=1e-4)
        assert row.n_tokens == int((acts[:, row.feature_id] > 0).sum())
        assert acts[row.peak_token, row.feature_id] == pytest.approx(row.activation, rel=1e-4)


def test_one_token_filters_to_the_features_active_there(tiny_pair, crosscoder, found):
    _, acts = reference(tiny_pair, crosscoder, TEXT)
    token = int(np.argmax((acts > 0).sum(1)))
    here = found.features(token)
    assert sorted(here["feature_id"]) == np.flatnonzero(acts[token] > 0).tolist()
    for row in here.itertuples():
        assert row.activation == pytest.approx(acts[token, row.feature_id], rel=1e-4)
    with pytest.raises(ConfigError, match="does not exist"):
        found.features(found.n_tokens)


def test_empty_text_is_refused(tiny_pair, crosscoder):
    with pytest.raises(ConfigError, match="type some text"):
        features_on_text(RUN, "  ", models=tiny_pair, crosscoder=crosscoder, normalizer=NORM)
