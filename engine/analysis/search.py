"""Search by text: every feature that fires on a typed text, and on which tokens.

The text is encoded as a probe encodes it (engine.analysis.probe: both models, aligned,
windowed, normalised, encoded with the inference threshold), but all features are kept, as
sparse (token, feature, activation) entries. Each feature carries its category (its
partition, or A-/B-leaning shared: engine.categories), from the crosscoder's own partition
and relative decoder norms, so the answer groups by category without the results database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine import categories
from engine.analysis.probe import check_text, encode_text
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.models.loading import LoadedModel

# The columns of `TextSearch.features`.
FEATURE_COLUMNS = ("feature_id", "category", "activation", "n_tokens", "peak_token")


@dataclass(frozen=True)
class TextSearch:
    """The features active on a text: sparse entries over its aligned tokens."""

    text: str
    spans: np.ndarray  # [n_tokens, 2]: each aligned token's characters in `text`
    token: np.ndarray  # [nnz]: the aligned token (row of `spans`) of each entry
    feature: np.ndarray  # [nnz]: the feature of each entry
    activation: np.ndarray  # [nnz]: its activation (> 0)
    category: dict[int, str]  # feature id -> category, for every active feature
    window: dict[str, Any]  # both models' tokens over the text (probe's token views)

    @property
    def n_tokens(self) -> int:
        return len(self.spans)

    def tokens(self) -> list[str]:
        """The text of each aligned token."""
        return [self.text[int(s) : int(e)] for s, e in self.spans]

    def active_per_token(self) -> np.ndarray:
        """How many features fire on each aligned token."""
        return np.bincount(self.token, minlength=self.n_tokens)

    def features(self, token: int | None = None) -> pd.DataFrame:
        """The features active on the text, or on aligned token `token` only: their
        category, activation (the largest on the text, or the one on that token), the
        number of tokens they fire on and the token of their peak; by category (A-exclusive
        first, as engine.categories orders them), strongest first within one."""
        if token is not None and not 0 <= int(token) < self.n_tokens:
            raise ConfigError(f"token {token} does not exist; the text has {self.n_tokens}")
        frame = pd.DataFrame(
            {"token": self.token, "feature_id": self.feature, "activation": self.activation}
        )
        if frame.empty:
            return pd.DataFrame({c: [] for c in FEATURE_COLUMNS})
        peaks = frame.loc[frame.groupby("feature_id")["activation"].idxmax()]
        out = peaks.rename(columns={"token": "peak_token"}).set_index("feature_id")
        out["n_tokens"] = frame.groupby("feature_id").size()
        if token is not None:
            here = frame[frame["token"] == int(token)].set_index("feature_id")["activation"]
            out = out.loc[here.index].assign(activation=here)
        out = out.reset_index()
        out["category"] = [self.category[int(f)] for f in out["feature_id"]]
        rank = {c: i for i, c in enumerate(categories.CATEGORIES)}
        out["_rank"] = out["category"].map(rank)
        out = out.sort_values(["_rank", "activation", "feature_id"], ascending=[True, False, True])
        return out[list(FEATURE_COLUMNS)].reset_index(drop=True)

    def feature_acts(self, feature_id: int) -> np.ndarray:
        """One feature's activation on each aligned token (0 where it does not fire)."""
        acts = np.zeros(self.n_tokens, dtype=np.float32)
        hit = self.feature == int(feature_id)
        acts[self.token[hit]] = self.activation[hit]
        return acts


def feature_categories(crosscoder: Crosscoder) -> list[str]:
    """Every feature's category: its partition, or A-/B-leaning shared by its relative
    decoder norm (the same rule the results database applies)."""
    rel = crosscoder.relative_decoder_norm().detach().cpu().tolist()
    roles = crosscoder.partition.roles()
    return [categories.category(role, r) for role, r in zip(roles, rel, strict=True)]


def features_on_text(
    run: dict[str, Any],
    text: str,
    *,
    models: tuple[LoadedModel, LoadedModel],
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    context_length: int = 1024,
) -> TextSearch:
    """Every feature's activations on the aligned tokens of `text` (only where > 0)."""
    check_text(text, "the features that fire")
    encoded = encode_text(
        run, text, models=models, crosscoder=crosscoder, normalizer=normalizer,
        context_length=context_length,
    )  # fmt: skip
    spans = [np.zeros((0, 2), dtype=np.int64)]
    tokens, features, acts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], []
    acts.append(np.zeros(0, np.float32))
    offset = 0
    for window_spans, codes in encoded.codes:
        rows, cols = torch.nonzero(codes > 0, as_tuple=True)
        spans.append(np.asarray(window_spans, dtype=np.int64))
        tokens.append(rows.cpu().numpy().astype(np.int64) + offset)
        features.append(cols.cpu().numpy().astype(np.int64))
        acts.append(codes[rows, cols].float().cpu().numpy())
        offset += len(window_spans)
    feature = np.concatenate(features)
    every = feature_categories(crosscoder)
    return TextSearch(
        text=text,
        spans=np.concatenate(spans),
        token=np.concatenate(tokens),
        feature=feature,
        activation=np.concatenate(acts),
        category={int(f): every[int(f)] for f in np.unique(feature)},
        window=encoded.window,
    )
