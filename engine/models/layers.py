"""Where the transformer blocks of a causal LM live, and which one a user means.

Each family keeps its blocks at a fixed attribute path (checked against transformers 5.23).
Looking them up by the config's ``model_type`` rather than by probing any ``layers`` attribute
means an unknown architecture fails loudly instead of hooking the wrong modules.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.errors import ConfigError

# model_type -> attribute paths to the block list, tried in order. The CausalLM wrappers hold
# the base model under `model` (GPT-2: `transformer`); the bare base models hold it directly.
_LAYER_PATHS: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers", "layers"),
    "mistral": ("model.layers", "layers"),
    "qwen2": ("model.layers", "layers"),
    "qwen3": ("model.layers", "layers"),
    "gemma2": ("model.layers", "layers"),
    "gemma3_text": ("model.layers", "layers"),
    # Gemma3ForConditionalGeneration: model.language_model is the text model in
    # transformers 5; 4.50-4.51 had language_model.model instead.
    "gemma3": (
        "model.language_model.layers",
        "language_model.model.layers",
        "language_model.layers",
    ),
    "gpt_oss": ("model.layers", "layers"),
    "gpt2": ("transformer.h", "h"),
}

FAMILIES = "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, GPT-OSS, GPT-2"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of `model`, in order."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for path in _LAYER_PATHS.get(model_type, ()):
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList):
            return found
    raise ConfigError(
        f"cannot find the transformer blocks of {type(model).__name__} "
        f"(model_type {model_type!r}); supported families: {FAMILIES}"
    )


def resolve_layer(n_layers: int, layer: int | str = "middle") -> int:
    """The non-negative block index that `layer` (int, numeric string or 'middle') names."""
    valid = f"valid: 0..{n_layers - 1} or {-n_layers}..-1 or 'middle'"
    if isinstance(layer, str):
        text = layer.strip()
        if text == "middle":
            return n_layers // 2
        try:
            layer = int(text)
        except ValueError:
            raise ConfigError(f"layer {text!r} is not an integer or 'middle'; {valid}") from None
    # bool is an int subclass; True as a layer is almost certainly a mistake.
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer must be an int or 'middle', got {layer!r}; {valid}")
    if not -n_layers <= layer < n_layers:
        raise ConfigError(
            f"layer {layer} is out of range for a model with {n_layers} layers; {valid}"
        )
    return layer % n_layers


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the text model's, for multimodal configs)."""
    config = model.config
    # Multimodal configs (Gemma3Config) keep hidden_size on their text_config only.
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot find the hidden size in the config of {type(model).__name__}")


def _get_path(obj: Any, path: str) -> Any:
    """obj.a.b.c for path 'a.b.c', or None where an attribute is missing."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj
