"""Tiny random models for the tests: a Llama (model A) and a Gemma 3 (model B) built in code,
with the real demo tokenizers (SmolLM2's and Gemma 3's), in memory or saved to disk.

The builders take config overrides, so a test that needs other sizes still gets the same
models otherwise; each seeds torch first, so a model is the same wherever it is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# torch and the engine's model code are imported where used: every test session loads this
# file, and most tests need neither.
if TYPE_CHECKING:
    import torch

    from engine.models.loading import LoadedModel

LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
GEMMA = {
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 12,
    "max_position_embeddings": 512,
    "sliding_window": 16,
}


def tiny_llama(tokenizer, **config: Any) -> torch.nn.Module:
    """A random Llama over `tokenizer`'s vocabulary (LLAMA, with `config` overriding it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA, "vocab_size": len(tokenizer), **config})
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma(tokenizer, **config: Any) -> torch.nn.Module:
    """A random Gemma 3 over `tokenizer`'s vocabulary (GEMMA, with `config` overriding it)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    cfg = Gemma3TextConfig(**{**GEMMA, "vocab_size": len(tokenizer), **config})
    return Gemma3ForCausalLM(cfg).eval()


def wrap(model, tokenizer, name: str) -> LoadedModel:
    """A model built in code as the engine's LoadedModel (CPU, float32)."""
    import torch

    from engine.models.loading import LoadedModel

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model, tokenizer, name, {"kind": "test", "name": name}, torch.device("cpu"), torch.float32
    )


def save_tiny_pair(
    directory: Path,
    prefix: str = "",
    a: dict[str, Any] | None = None,
    b: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """The tiny Llama and Gemma 3 (with config overrides `a` and `b`) saved with their demo
    tokenizers as Hugging Face directories `<prefix>a` and `<prefix>b` in `directory`, so
    that whatever loads models by name loads them; their paths by side."""
    from engine.models.tokenizers import load_tokenizer

    out = {}
    for key, build, spec, config in (
        ("a", tiny_llama, "smollm2", a),
        ("b", tiny_gemma, "gemma3", b),
    ):
        tokenizer = load_tokenizer(spec)
        out[key] = directory / f"{prefix}{key}"
        build(tokenizer, **(config or {})).save_pretrained(out[key])
        tokenizer.save_pretrained(out[key])
    return out


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[LoadedModel, LoadedModel]:
    """The tiny Llama ("tiny-llama", A) and Gemma 3 ("tiny-gemma", B), built once a module."""
    from engine.models.tokenizers import load_tokenizer

    tok_a, tok_b = load_tokenizer("smollm2"), load_tokenizer("gemma3")
    a = wrap(tiny_llama(tok_a), tok_a, "tiny-llama")
    return a, wrap(tiny_gemma(tok_b), tok_b, "tiny-gemma")
