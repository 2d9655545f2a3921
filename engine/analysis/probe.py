"""A feature's activation on any text: "test with your own text" for an analysed run.

The text goes the same way as harvested text: rendered and tokenized for both models,
aligned, cut into windows (engine.harvest.windows), each model's residual stream captured
at the run's layer, normalised with the checkpoint's factors and encoded with the
crosscoder's inference threshold. The result is a `Context`, so it renders like the
stored ones, plus both models' tokens for the token views.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.contexts import Context
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.harvest.text_documents import Document
from engine.harvest.windows import document_windows, side
from engine.models.capture import capture_residual
from engine.models.loading import LoadedModel
from engine.specs import PairSpec

MAX_CHARS = 20_000  # an interactive probe, not a harvest


@dataclass(frozen=True)
class Probe:
    """One feature's activations on a text, with both models' tokenization of it."""

    context: Context  # the whole text, one activation per aligned span
    window: dict[str, Any]  # text, ids_a, offsets_a, ids_b, offsets_b (offsets into text)

    @property
    def max_act(self) -> float:
        """The feature's largest activation on the text."""
        return self.context.max_act


def feature_activations_on_text(
    run: dict[str, Any],
    feature_id: int,
    text: str,
    *,
    models: tuple[LoadedModel, LoadedModel],
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    context_length: int = 1024,
) -> Probe:
    """Feature `feature_id`'s activation on each aligned token pair of `text`."""
    check_text(text, "the feature's activations")
    if not 0 <= int(feature_id) < crosscoder.partition.n_features:
        raise ConfigError(
            f"feature {feature_id} does not exist; the crosscoder has "
            f"{crosscoder.partition.n_features} features"
        )
    spans, acts = [np.zeros((0, 2), dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    encoded = encode_text(
        run, text, models=models, crosscoder=crosscoder, normalizer=normalizer,
        context_length=context_length,
    )  # fmt: skip
    for window_spans, codes in encoded.codes:
        spans.append(window_spans)
        acts.append(codes[:, int(feature_id)].cpu().numpy().astype(np.float32))
    context = Context(
        text, np.concatenate(spans), np.concatenate(acts), doc_id="probe", kind="probe"
    )
    return Probe(context, encoded.window)


def check_text(text: str, what: str) -> None:
    """Refuse an empty text or one too long for an interactive probe."""
    if not text.strip():
        raise ConfigError(f"type some text to see {what} on it")
    if len(text) > MAX_CHARS:
        raise ConfigError(f"the text has {len(text):,} characters; keep it under {MAX_CHARS:,}")


@dataclass(frozen=True)
class EncodedText:
    """A text cut into windows as harvest cuts it, and its crosscoder codes window by window."""

    window: dict[str, Any]  # both models' tokens over the whole text (see _tokens_window)
    codes: Iterator[tuple[np.ndarray, torch.Tensor]]  # per window: spans in text, codes [n, F]


def encode_text(
    run: dict[str, Any],
    text: str,
    *,
    models: tuple[LoadedModel, LoadedModel],
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    context_length: int = 1024,
) -> EncodedText:
    """Both models' tokens of `text`, and (lazily, one window at a time, so a long text
    never holds every window's dense codes) each window's aligned spans and codes."""
    layers = _layers(run, models, crosscoder)
    doc = Document(id="probe", source="probe", text=text)
    windows, _ = document_windows(
        doc, side(models[0].tokenizer), side(models[1].tokenizer), context_length
    )

    def codes() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for window in windows:
            if not len(window):
                continue
            x_a = _residual(models[0], layers[0], window.ids_a, window.pos_a)
            x_b = _residual(models[1], layers[1], window.ids_b, window.pos_b)
            with torch.no_grad():
                f = crosscoder.encode(*normalizer.apply(x_a, x_b))
            yield window.spans + window.char_start, f

    tokens: dict[str, list[np.ndarray]] = {
        k: [] for k in ("ids_a", "offsets_a", "ids_b", "offsets_b")
    }
    for window in windows:
        for key in ("a", "b"):
            tokens[f"ids_{key}"].append(getattr(window, f"ids_{key}"))
            # Prefix tokens carry (0, 0): shifted, they stay empty, so views skip them.
            tokens[f"offsets_{key}"].append(getattr(window, f"offsets_{key}") + window.char_start)
    return EncodedText(_tokens_window(text, tokens), codes())


def _layers(run: dict[str, Any], models, crosscoder: Crosscoder) -> tuple[int, int]:
    """The run's captured layer of each model, after checking the models fit the crosscoder."""
    layers = []
    recorded = PairSpec.from_run(run)
    for key, loaded, width in (("a", models[0], crosscoder.d_a), ("b", models[1], crosscoder.d_b)):
        layer = recorded.layer(key, ConfigError)
        if loaded.d_model != width:
            raise ConfigError(
                f"model {key.upper()} ({loaded.name}) has width {loaded.d_model} but the "
                f"crosscoder reads {width}; load the models the run was trained on"
            )
        layers.append(layer)
    return layers[0], layers[1]


def _residual(loaded: LoadedModel, layer: int, ids: np.ndarray, positions: np.ndarray):
    """One window's residual stream at `positions`, as float32 on the CPU."""
    input_ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None].to(loaded.device)
    hidden = capture_residual(loaded.model, layer, input_ids)
    return hidden[0, torch.as_tensor(positions, device=hidden.device)].float().cpu()


def _tokens_window(text: str, tokens: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Both models' tokens over the whole text, in the shape of a stored window."""
    window: dict[str, Any] = {"text": text}
    for key, parts in tokens.items():
        width = (0, 2) if key.startswith("offsets") else (0,)
        window[key] = np.concatenate(parts) if parts else np.zeros(width, dtype=np.int64)
    return window
