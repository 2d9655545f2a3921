"""Paired activations in a single safetensors file (tensors 'a' and 'b')."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.crosscoder.data import DataError, check_pair_shapes


def save_pairs(path: str | Path, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
    """Write paired activations [n, d_a] and [n, d_b] to `path`."""
    check_pair_shapes(x_a, x_b)
    save_file({"a": x_a.contiguous(), "b": x_b.contiguous()}, str(path))


def load_pairs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read paired activations written by `save_pairs`, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path} is not a readable safetensors file ({err})") from None
    missing = {"a", "b"} - set(tensors)
    if missing:
        raise DataError(
            f"{path} lacks tensor(s) {', '.join(sorted(missing))}; expected 'a' [n, d_a] and "
            f"'b' [n, d_b]"
        )
    try:
        check_pair_shapes(tensors["a"], tensors["b"])
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    return tensors["a"], tensors["b"]
