"""One shard of an activation store: the windows it holds, their tensors, and the check of
its bytes against the manifest's record.

A harvest reads a deterministic stream of *windows* (a stretch of one document that both
models read) and numbers them. Each shard holds whole windows:

    a [n, d_a], b [n, d_b]     activations of every aligned pair (the store dtype)
    pair_window [n] int64      stream index of the window the pair comes from
    pair_pos [n, 2] int32      the pair's token position in each model's window input
    pair_span [n, 2] int32     characters of the window text the pair covers
    norm_a, norm_b [n] f32     L2 norms before casting (statistics)
    sum_a, sum_b [d] f64       column sums (statistics)
    window_index [m] int64     stream index of each window in the shard
    window_char_start [m]      where the window starts in its document's shared text
    text_bytes, text_ptr       the window texts (UTF-8), so contexts can be re-rendered
    ids_a, offsets_a, ptr_a    each model's window input tokens, offsets into the window text
    ids_b, offsets_b, ptr_b
    metadata: doc_ids, sources (JSON lists, one per window)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ACTIVATION_KEYS = ("a", "b")


@dataclass
class WindowRecord:
    """One window both models read: its text, tokens and aligned pairs (no activations)."""

    index: int  # position in the harvest's window stream
    doc_id: str
    source: str
    char_start: int  # start of `text` in the document's shared text
    text: str
    ids_a: np.ndarray  # int [t_a]: model A's input tokens for this window
    offsets_a: np.ndarray  # int [t_a, 2]: into `text`; (0, 0) for prefix/template tokens
    ids_b: np.ndarray
    offsets_b: np.ndarray
    pos_a: np.ndarray  # int [k]: aligned positions in model A's input
    pos_b: np.ndarray
    spans: np.ndarray  # int [k, 2]: characters of `text` each pair covers

    def __len__(self) -> int:
        return len(self.pos_a)


def shard_tensors(
    windows: list[WindowRecord], x_a: torch.Tensor, x_b: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors of one shard (see the module docstring)."""
    texts = [w.text.encode() for w in windows]
    t = {
        "a": x_a.to(dtype),
        "b": x_b.to(dtype),
        "norm_a": x_a.norm(dim=1),
        "norm_b": x_b.norm(dim=1),
        "sum_a": x_a.double().sum(0),
        "sum_b": x_b.double().sum(0),
        "pair_window": _cat([np.full(len(w), w.index) for w in windows], np.int64),
        "pair_pos": _cat([np.stack([w.pos_a, w.pos_b], 1) for w in windows], np.int32),
        "pair_span": _cat([w.spans for w in windows], np.int32),
        "window_index": torch.tensor([w.index for w in windows], dtype=torch.int64),
        "window_char_start": torch.tensor([w.char_start for w in windows], dtype=torch.int64),
        "text_bytes": torch.frombuffer(bytearray(b"".join(texts) or b"\0"), dtype=torch.uint8),
        "text_ptr": _ptr([len(t) for t in texts]),
    }
    for side in ("a", "b"):
        ids = [getattr(w, f"ids_{side}") for w in windows]
        t[f"ids_{side}"] = _cat(ids, np.int32)
        t[f"offsets_{side}"] = _cat([getattr(w, f"offsets_{side}") for w in windows], np.int32)
        t[f"ptr_{side}"] = _ptr([len(i) for i in ids])
    return t


def _cat(parts: list[np.ndarray], dtype: type) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts).astype(dtype)))


def _ptr(lengths: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def shard_problem(path: Path, record: dict[str, Any], data: bytes | None = None) -> str | None:
    """Why a recorded shard cannot be used (missing, wrong size, wrong hash), else None."""
    file = path / record["file"]
    if data is None:
        if not file.is_file():
            return "missing"
        if file.stat().st_size != record["bytes"]:
            return f"{file.stat().st_size} bytes instead of {record['bytes']}"
        data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return "corrupt (SHA256 mismatch)"
    return None


def shard_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in the header of a serialised safetensors file."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})
