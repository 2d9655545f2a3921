"""Load a causal LM and its fast tokenizer from a demo name, a directory, a GGUF file or the hub.

GGUF files are dequantised to fp32 and saved as plain safetensors ONCE, in
``cache_root()/models/<stem>-<sha256[:12]>``; later loads read that directory, which takes
seconds instead of the 20-60 s a GGUF conversion costs. The cache key is the file's SHA256, so
a changed file never loads a stale conversion.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.dtypes import DTYPES
from engine.errors import ConfigError
from engine.files import publish_folder
from engine.models.layers import decoder_layers, hidden_size
from engine.models.tokenizers import DEMO, cache_root, demo_gguf, load_tokenizer, sha256_file

# "name" or "org/name": anything else (absolute, relative with ./, deeper) is taken as a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
INSTALL = 'run: pip install -e ".[models]"'


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it came from."""

    model: nn.Module  # eval mode, no grads, on `device` in `dtype`
    tokenizer: Any  # a fast tokenizer (offsets are needed for alignment)
    name: str  # the spec the user gave
    source: dict[str, Any]  # JSON-able provenance: kind, id or path, revision or sha256
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = field(default=0.0, compare=False)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return hidden_size(self.model)


def quiet_transformers() -> None:
    """No per-tensor weight-loading progress bars from transformers (hub downloads keep
    theirs); callers print one line per loaded model instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load `spec` (demo name, HF directory, .gguf file or hub id) for inference.

    `cache_dir` is where converted GGUF models go (default ``cache_root()/models``) and, for
    hub ids, the hub download cache (default: the hub's own).
    """
    start = time.perf_counter()
    quiet_transformers()  # every command that loads a model prints its own one line
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    directory, source = _resolve_spec(spec, cache_dir, revision)
    if directory is None:
        model, tokenizer = _from_hub(spec, revision, torch_dtype, cache_dir)
        source["revision"] = getattr(model.config, "_commit_hash", None) or revision
    else:
        model = _auto("AutoModelForCausalLM").from_pretrained(str(directory), dtype=torch_dtype)
        tokenizer = _fast_tokenizer(str(directory))
    model.to(device=dev, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    decoder_layers(model)  # fail now, not at capture time, on an unsupported architecture
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        source=source,
        device=dev,
        dtype=torch_dtype,
        load_seconds=time.perf_counter() - start,
    )


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` names ('auto': cuda if available, else cpu)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        raise ConfigError(
            f"device {device!r} was asked for but CUDA is not available (no CUDA device: "
            f"torch {torch.__version__}, {why}); use --device cpu (or auto)"
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype `dtype` names ('auto': bfloat16 on CUDA, float32 elsewhere)."""
    if dtype == "auto":
        # bf16 matmuls are ~7x slower than fp32 on the CPUs this runs on.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _resolve_spec(
    spec: str, cache_dir: str | Path | None, revision: str | None
) -> tuple[Path | None, dict[str, Any]]:
    """The local directory to load `spec` from (None for a hub id) and its provenance."""
    models = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    if spec in DEMO:
        demo = DEMO[spec]
        source = {"kind": "demo", "id": spec, "file": demo.filename, "sha256": demo.sha256}
        target = models / f"{Path(demo.filename).stem}-{demo.sha256[:12]}"
        # The pinned hash names the cache, so a cached demo loads without reading the GGUF.
        if not _is_converted(target):
            _convert_gguf(demo_gguf(spec), target, tokenizer=load_tokenizer(spec))
        return target, source
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, {"kind": "dir", "path": str(path.resolve())}
    if path.is_file() and path.suffix == ".gguf":
        sha = sha256_file(path)
        target = models / f"{path.stem}-{sha[:12]}"
        if not _is_converted(target):
            _convert_gguf(path, target)
        return target, {"kind": "gguf", "path": str(path.resolve()), "sha256": sha}
    if path.is_file():
        raise ConfigError(f"{spec}: expected a model directory or a .gguf file")
    if not HUB_ID.fullmatch(spec) or spec.endswith(".gguf"):
        raise ConfigError(f"{spec}: no such file or directory")
    return None, {"kind": "hub", "id": spec, "revision": revision}


@contextlib.contextmanager
def _no_gguf_tensor_bar() -> Iterator[None]:
    """Silence transformers' per-tensor GGUF bar, which its progress-bar switch does not
    reach (a plain tqdm); the caller prints one line per model."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # a transformers version without it
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _is_converted(target: Path) -> bool:
    """Whether `target` holds a finished conversion (it is renamed into place only when done)."""
    return (target / "config.json").is_file()


def _convert_gguf(gguf: Path, target: Path, tokenizer: Any = None) -> None:
    """Dequantise `gguf` to an fp32 safetensors model (and tokenizer) in `target`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"converting GGUF files needs {' and '.join(missing)}; {INSTALL}")
    # The file is local and needs no hub: local_files_only keeps this load off the network
    # without switching the whole process offline (HF_HUB_OFFLINE would outlive it).
    kwargs: dict[str, Any] = {"local_files_only": True}
    try:
        from transformers import GgufConfig

        # transformers >= 5 can keep GGUF blocks packed (with `kernels` installed); the cache
        # must hold dense weights.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # older transformers always dequantise
    with _no_gguf_tensor_bar():
        model = _auto("AutoModelForCausalLM").from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
    if tokenizer is None:
        tokenizer = _fast_tokenizer(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    # The weights are dense now; left in place, these make the saved config claim quantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted conversion leaves no half cache.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        publish_folder(tmp, target, complete="config.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_hub(
    spec: str, revision: str | None, dtype: torch.dtype, cache_dir: str | Path | None
) -> tuple[nn.Module, Any]:
    """Model and fast tokenizer of a hub id, with a clear error when the hub is unreachable."""
    kwargs: dict[str, Any] = {"revision": revision}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        model = _auto("AutoModelForCausalLM").from_pretrained(spec, dtype=dtype, **kwargs)
        tokenizer = _fast_tokenizer(spec, **kwargs)
    except OSError as err:
        raise ConfigError(
            f"{spec!r} is not a local path, and the Hugging Face hub cannot provide it "
            f"(unreachable, or no such model: {str(err).splitlines()[0]}); pass a local model "
            f"directory or a .gguf file instead, or a demo name ({', '.join(DEMO)})"
        ) from None
    return model, tokenizer


def _fast_tokenizer(source: str, **kwargs: Any) -> Any:
    """A fast tokenizer; slow ones have no character offsets, which alignment needs."""
    tokenizer = _auto("AutoTokenizer").from_pretrained(source, use_fast=True, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{source}: only a slow tokenizer is available; a fast one is needed")
    return tokenizer


def _prepare_tokenizer(tokenizer: Any) -> None:
    """Make `tokenizer` pad on the right, with its EOS as pad token if it has none."""
    # Batches are right-padded and masked: real tokens keep positions 0..n-1 (so they match an
    # unpadded forward), and the pad id is never attended to, so any id works; EOS is one
    # every tokenizer has. Gemma's tokenizer defaults to left padding, hence the override.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _auto(name: str) -> Any:
    """A transformers Auto class, or an error naming the install command."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"loading models needs transformers; {INSTALL}") from None
    return getattr(transformers, name)
