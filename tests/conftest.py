"""Tiny random models for the tests: a Llama (model A) and a Gemma 3 (model B) built in code,
with the real demo tokenizers (SmolLM2's and Gemma 3's), in memory or saved to disk.

The builders take config overrides, so a test that needs other sizes still gets the same
models otherwise; each seeds torch first, so a model is the same wherever it is built.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# torch and the engine's model code are imported where used: every test session loads this
# file, and most tests need neither.
if TYPE_CHECKING:
    import torch

    from engine.models.loading import LoadedModel

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each, or they thrash (torch is imported
    # after this file, by the tests, so the setting takes effect). Subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fill the tokenizer cache once, before parallel workers start and would race for it."""
    if hasattr(session.config, "workerinput"):
        return
    try:
        from engine.models.tokenizers import load_tokenizer

        for name in ("smollm2", "gemma3"):
            load_tokenizer(name)
    except Exception:  # the tests that need them report the problem where it matters
        pass


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
    out = {}
    for key, config in (("a", a), ("b", b)):
        out[key] = Path(directory) / f"{prefix}{key}"
        shutil.copytree(_saved_tiny_model(key, json.dumps(config or {}, sort_keys=True)), out[key])
    return out


_SAVED: dict[tuple[str, str], Path] = {}


def _saved_tiny_model(key: str, config: str) -> Path:
    """A tiny model saved once per test process (building and saving one with Gemma's
    262,144-token tokenizer takes seconds; copying it, milliseconds)."""
    from engine.models.tokenizers import load_tokenizer

    if (key, config) not in _SAVED:
        build, spec = (tiny_llama, "smollm2") if key == "a" else (tiny_gemma, "gemma3")
        root = Path(tempfile.mkdtemp(prefix="modeldiff-tiny-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        tokenizer = load_tokenizer(spec)
        build(tokenizer, **json.loads(config)).save_pretrained(root / key)
        tokenizer.save_pretrained(root / key)
        _SAVED[key, config] = root / key
    return _SAVED[key, config]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[LoadedModel, LoadedModel]:
    """The tiny Llama ("tiny-llama", A) and Gemma 3 ("tiny-gemma", B), built once a module."""
    from engine.models.tokenizers import load_tokenizer

    tok_a, tok_b = load_tokenizer("smollm2"), load_tokenizer("gemma3")
    a = wrap(tiny_llama(tok_a), tok_a, "tiny-llama")
    return a, wrap(tiny_gemma(tok_b), tok_b, "tiny-gemma")
