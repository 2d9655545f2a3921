"""Steering: add alpha x s_max x d_i to a model's residual stream while it generates.

`d_i` is a feature's decoder vector converted back to the model's raw units (the crosscoder
works on normalised activations), `s_max` the feature's largest activation seen in analysis,
so alpha = 1 adds the feature at its natural maximum (paper B.4.3). The vector is added to
the output of the block the crosscoder was trained on. A sweep over strengths is one batched
generation in which every row carries its own coefficient, not a loop over strengths.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.models.layers import decoder_layers
from engine.models.loading import LoadedModel

POSITIONS = ("all", "prompt", "generated")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (paper B.5: greedy, or temperature 0.7 / top-p 0.9 with a seed)."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    chat_template: bool = True  # use the tokenizer's chat template where it has one


def feature_vector(
    crosscoder: Crosscoder, normalizer: Normalizer, feature: int, model: str
) -> torch.Tensor:
    """A feature's decoder vector in `model`'s raw activation units."""
    if not 0 <= feature < crosscoder.partition.n_features:
        raise ConfigError(
            f"feature {feature} does not exist; this crosscoder has "
            f"{crosscoder.partition.n_features} features"
        )
    if not crosscoder.decodes(feature, model):
        other = "b" if model == "a" else "a"
        raise ConfigError(
            f"feature {feature} has no decoder in model {model.upper()} (it is exclusive to "
            f"model {other.upper()}); steer model {other.upper()}, or transfer it"
        )
    with torch.no_grad():
        return normalizer.to_raw(crosscoder.decoder_matrix(model)[feature], model).float()


@contextmanager
def steering(model, layer: int, deltas: torch.Tensor, positions: str = "all"):
    """Add `deltas` [batch, d] (one row per sequence) to block `layer`'s output."""
    if positions not in POSITIONS:
        raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    block = decoder_layers(model)[layer]
    state = {"calls": 0}

    def hook(_module, _args, output):
        # The first call sees the whole prompt; with a KV cache, later calls see one new token.
        first = state["calls"] == 0
        state["calls"] += 1
        if (positions == "prompt" and not first) or (positions == "generated" and first):
            return None
        hidden = output[0] if isinstance(output, tuple | list) else output
        steered = hidden + deltas.to(hidden.device, hidden.dtype)[:, None, :]
        if isinstance(output, tuple | list):
            return (steered, *output[1:])
        return steered

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def render_prompt(loaded: LoadedModel, prompt: str, chat_template: bool = True) -> str:
    """The prompt as the model reads it: its chat template if it has one, else as is."""
    tok = loaded.tokenizer
    if chat_template and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


_LOCK = threading.Lock()  # one generation at a time per process (models are shared)


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    coefficients: Sequence[float] | None = None,
    positions: str = "all",
    cfg: GenerationConfig | None = None,
) -> list[str]:
    """Generate a continuation of each prompt, each row steered by coefficient x vector."""
    cfg = cfg or GenerationConfig()
    inputs = _batch(loaded, prompts, cfg)
    deltas = None
    if vector is not None:
        if layer is None or coefficients is None or len(coefficients) != len(prompts):
            raise ValueError("steering needs a layer and one coefficient per prompt")
        coef = torch.tensor(list(coefficients), dtype=torch.float32)
        deltas = coef[:, None] * vector.float()[None, :]
    with _LOCK, torch.inference_mode():
        if cfg.greedy is False:
            torch.manual_seed(cfg.seed)
        with _maybe_steering(loaded, layer, deltas, positions):
            out = loaded.model.generate(**inputs, **_decoding(loaded, cfg))
    new = out[:, inputs["input_ids"].shape[1] :]
    return loaded.tokenizer.batch_decode(new, skip_special_tokens=True)


def sweep(
    loaded: LoadedModel,
    prompt: str,
    vector: torch.Tensor,
    layer: int,
    s_max: float,
    alphas: Sequence[float],
    positions: str = "all",
    cfg: GenerationConfig | None = None,
) -> list[str]:
    """One prompt steered at every strength alpha (x s_max), as a single batched generation."""
    coefficients = [float(a) * s_max for a in alphas]
    return generate(
        loaded,
        [prompt] * len(alphas),
        vector=vector,
        layer=layer,
        coefficients=coefficients,
        positions=positions,
        cfg=cfg,
    )


def stream(
    loaded: LoadedModel,
    prompt: str,
    *,
    vector: torch.Tensor | None = None,
    layer: int | None = None,
    coefficient: float = 0.0,
    positions: str = "all",
    cfg: GenerationConfig | None = None,
) -> Iterator[str]:
    """The steered continuation of one prompt, piece by piece as it is generated."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cfg = cfg or GenerationConfig()
    inputs = _batch(loaded, [prompt], cfg)
    deltas = None if vector is None else (coefficient * vector.float())[None, :]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            steer = _maybe_steering(loaded, layer, deltas, positions)
            with _LOCK, torch.inference_mode(), steer:
                loaded.model.generate(**inputs, **_decoding(loaded, cfg), streamer=streamer)
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True, name="steer-stream")
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def _batch(loaded: LoadedModel, prompts: Sequence[str], cfg: GenerationConfig) -> dict:
    """Left-padded input ids and mask (generation appends on the right)."""
    tok = loaded.tokenizer
    texts = [render_prompt(loaded, p, cfg.chat_template) for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        # Templates already hold their special tokens.
        enc = tok(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=not cfg.chat_template or not getattr(tok, "chat_template", None),
        )
    finally:
        tok.padding_side = side
    return {k: v.to(loaded.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _decoding(loaded: LoadedModel, cfg: GenerationConfig) -> dict:
    """Keyword arguments of `generate` for these settings."""
    args = {
        "max_new_tokens": cfg.max_new_tokens,
        "pad_token_id": loaded.tokenizer.pad_token_id,
        "do_sample": not cfg.greedy,
    }
    if not cfg.greedy:
        args.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        args.update(temperature=None, top_p=None, top_k=None)
    return args


def _maybe_steering(loaded: LoadedModel, layer, deltas, positions: str):
    """`steering` when there is something to add, else a context that does nothing."""
    if deltas is None:
        return nullcontext()
    return steering(loaded.model, layer, deltas, positions)
