"""Sharded, resumable, crash-safe store of paired residual-stream activations.

A store is a directory::

    manifest.json                  models, data config, shards, progress, statistics
    shards/shard-000000.safetensors

A harvest split across N processes (ranks) writes one manifest per rank instead of
`manifest.json`, and prefixes its files with the rank, so no two ranks write the same file::

    ranks/manifest-000-of-002.json     rank 0's manifest (the same format)
    shards/rank-000-shard-000000.safetensors
    documents/rank-000-part-000000.jsonl

Readers (`read_manifest`, `ActivationStore`) merge the rank manifests into one view.

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

Crash safety: a shard is written to a temporary file and renamed into place; then the
manifest, also replaced atomically, records it together with the windows it consumed. The
manifest is the only record of what is done, so a harvest killed at any moment resumes at
the first window not recorded, with no pair lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from engine.dtypes import DTYPES
from engine.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "modeldiff-activations"
VERSION = 1
MANIFEST = "manifest.json"
RANKS = "ranks"
_RANK_MANIFEST = re.compile(r"manifest-(\d+)-of-(\d+)\.json")
ACTIVATION_KEYS = ("a", "b")
# The files a manifest may name, relative to the store: only these are ever read, so a
# manifest cannot point a reader outside its store ("../victim.txt").
_SHARD_FILE = re.compile(r"shards/(rank-\d{3,}-)?shard-\d{6,}\.safetensors")
_DOCUMENT_FILE = re.compile(r"documents/(rank-\d{3,}-)?part-\d{6,}\.jsonl")
# The files a store writes in each of its folders ("" is the store itself), with the
# temporary files of an atomic write (a leading dot and a random tail) and shards set aside
# as .bad; `--fresh` removes these and nothing else.
_OWN_FILES = {
    "": re.compile(r"\.?manifest\.json(\..+)?"),
    RANKS: re.compile(r"\.?manifest-\d{3,}-of-\d{3,}\.json(\..+)?"),
    "shards": re.compile(r"\.?(rank-\d{3,}-)?shard-\d{6,}\.safetensors(\..+)?"),
    "documents": re.compile(r"\.?(rank-\d{3,}-)?part-\d{6,}\.jsonl(\..+)?"),
}


class StoreError(ValueError):
    """An activation store is missing, incompatible or damaged."""


def store_dtype(name: str) -> torch.dtype:
    """The torch dtype for a store dtype name, with a clear error for unknown names."""
    if name not in DTYPES:
        raise StoreError(f"unknown store dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


# -- windows and intervals ---------------------------------------------------------------


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


def add_interval(intervals: list[list[int]], start: int, end: int) -> list[list[int]]:
    """Union of sorted disjoint [start, end) intervals with one more, merged."""
    out: list[list[int]] = []
    for s, e in sorted([*intervals, [start, end]]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def remove_interval(intervals: list[list[int]], start: int, end: int) -> list[list[int]]:
    """Sorted disjoint intervals minus [start, end)."""
    out = []
    for s, e in intervals:
        if e <= start or s >= end:
            out.append([s, e])
            continue
        if s < start:
            out.append([s, start])
        if e > end:
            out.append([end, e])
    return out


def contains(intervals: list[list[int]], index: int) -> bool:
    """Whether `index` lies in one of the intervals."""
    return any(s <= index < e for s, e in intervals)


# -- writing -----------------------------------------------------------------------------


@dataclass
class _Pending:
    """Windows consumed since the last shard, with their activations and counts."""

    windows: list[WindowRecord] = field(default_factory=list)
    x_a: list[torch.Tensor] = field(default_factory=list)
    x_b: list[torch.Tensor] = field(default_factory=list)
    consumed: list[list[int]] = field(default_factory=list)  # window intervals consumed
    counts: dict[str, Any] = field(default_factory=dict)
    documents: list[dict[str, Any]] = field(default_factory=list)  # per-document records
    pairs: int = 0


class StoreWriter:
    """Appends windows of paired activations to a store, one atomic shard at a time."""

    def __init__(
        self,
        path: str | Path,
        header: dict[str, Any],
        dtype: str = "bfloat16",
        shard_pairs: int = 16_384,
        fresh: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path = Path(path)
        self.dtype_name, self.dtype = dtype, store_dtype(dtype)
        if shard_pairs <= 0:
            raise StoreError(f"shard_pairs must be positive, got {shard_pairs}")
        check_rank(rank, world_size)
        self.shard_pairs = shard_pairs
        self.rank, self.world_size = rank, world_size
        self.manifest_file = self.path / manifest_name(rank, world_size)
        self.prefix = "" if world_size == 1 else f"rank-{rank:03d}-"
        self.pending = _Pending()
        if fresh:
            _clear(self.path, rank, world_size)
        else:
            _check_layout(self.path, world_size)
        if self.manifest_file.is_file():
            self.manifest = _load_manifest(self.manifest_file, self.path)
            check_compatible(self.manifest, header, dtype, self.path)
            self.bad_shards = self._drop_bad_shards()
        else:
            self.manifest = _new_manifest(header, dtype)
            if world_size > 1:
                self.manifest["rank"] = {"rank": rank, "world_size": world_size}
            self.bad_shards = []
            self._write_manifest()
        if not fresh:  # (a fresh start races with the other ranks clearing their files)
            self._check_other_ranks(header, dtype)

    def _check_other_ranks(self, header: dict[str, Any], dtype: str) -> None:
        """Fail now, not when the store is read, if another rank harvested something else."""
        for (_, world), file in _rank_files(self.path):
            if file != self.manifest_file and world == self.world_size:
                check_compatible(_load_manifest(file, self.path), header, dtype, self.path)

    # progress ---------------------------------------------------------------------------

    @property
    def done(self) -> list[list[int]]:
        """Window intervals whose pairs are all in shards."""
        return self.manifest["progress"]["done_windows"]

    def is_done(self, index: int) -> bool:
        """Whether window `index` was already harvested (or skipped) and recorded."""
        return contains(self.done, index)

    @property
    def pairs(self) -> int:
        """Pairs recorded in shards plus those waiting for the next shard."""
        return self.manifest["stats"]["count"] + self.pending.pairs

    # appending --------------------------------------------------------------------------

    def add(
        self,
        window: WindowRecord,
        x_a: torch.Tensor,
        x_b: torch.Tensor,
        counts: dict[str, Any] | None = None,
    ) -> None:
        """Queue one window's pairs (and its counters); a shard is written once enough
        pairs are queued."""
        if x_a.shape[0] != len(window) or x_b.shape[0] != len(window):
            raise StoreError(
                f"window {window.index}: {len(window)} aligned pairs but activations of "
                f"{x_a.shape[0]} and {x_b.shape[0]} rows"
            )
        self._consume(window, counts)
        if len(window):
            self.pending.windows.append(window)
            self.pending.x_a.append(x_a.detach().float().cpu())
            self.pending.x_b.append(x_b.detach().float().cpu())
            self.pending.pairs += len(window)
        if self.pending.pairs >= self.shard_pairs:
            self.flush()

    def skip(self, window: WindowRecord, counts: dict[str, Any] | None = None) -> None:
        """Record a window that yields no pairs (duplicate, nothing aligned)."""
        self._consume(window, counts)

    def pass_over(self, index: int) -> None:
        """Record that window `index` belongs to another rank (no pairs, no counts here).

        Marking it keeps this rank's progress one interval, a prefix of the stream, instead
        of one interval per document it harvested.
        """
        if not self.is_done(index):
            self.pending.consumed = add_interval(self.pending.consumed, index, index + 1)

    def _consume(self, window: WindowRecord, counts: dict[str, Any] | None) -> None:
        """Mark a window consumed; its counters (numbers or {reason: n} dicts) are committed
        with it, and a document's own record with its first window."""
        index = window.index
        if self.is_done(index):
            raise StoreError(f"window {index} is already in the store")
        self.pending.consumed = add_interval(self.pending.consumed, index, index + 1)
        counts = counts or {}
        _merge_counts(self.pending.counts, counts)
        if counts.get("documents"):
            doc = {k: v for k, v in counts.items() if k not in ("documents", "windows")}
            self.pending.documents.append(
                {"doc_id": window.doc_id, "source": window.source, "first_window": index, **doc}
            )

    def flush(self) -> None:
        """Write queued windows as one shard and record it in the manifest."""
        pend = self.pending
        if not pend.consumed:
            return
        record = None
        if pend.pairs:
            number = self.manifest["next_shard"]
            record, sums = self._write_shard(number, pend)
            self.manifest["next_shard"] = number + 1
            self.manifest["shards"].append(record)
            _update_stats(self.manifest["stats"], record["pairs"], sums)
        if pend.documents:
            self._write_document_log(pend.documents)
        for s, e in pend.consumed:
            self.manifest["progress"]["done_windows"] = add_interval(self.done, s, e)
        _merge_counts(self.manifest["alignment"], pend.counts)
        self._write_manifest()
        self.pending = _Pending()

    def close(self, complete: bool = False) -> dict[str, Any]:
        """Flush what is queued, mark the harvest complete if asked, return the manifest."""
        self.flush()
        self.manifest["progress"]["complete"] = bool(complete)
        self._write_manifest()
        return self.manifest

    # internals --------------------------------------------------------------------------

    def _write_shard(
        self, number: int, pend: _Pending
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Write one shard; return its manifest record and its column sums per model."""
        x_a, x_b = torch.cat(pend.x_a), torch.cat(pend.x_b)
        tensors = _shard_tensors(pend.windows, x_a, x_b, self.dtype)
        metadata = {
            "doc_ids": json.dumps([w.doc_id for w in pend.windows]),
            "sources": json.dumps([w.source for w in pend.windows]),
        }
        data = save_bytes(tensors, metadata=metadata)
        name = f"shards/{self.prefix}shard-{number:06d}.safetensors"
        atomic_write_bytes(self.path / name, data)
        record = {
            "file": name,
            "pairs": int(x_a.shape[0]),
            "windows": pend.consumed,
            "n_windows": len(pend.windows),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "median_norm_a": float(tensors["norm_a"].median()),
            "median_norm_b": float(tensors["norm_b"].median()),
        }
        return record, {"a": tensors["sum_a"], "b": tensors["sum_b"]}

    def _write_document_log(self, documents: list[dict[str, Any]]) -> None:
        """Per-document records (tokens, pairs, drops by reason) as one JSONL part file."""
        logs = self.manifest.setdefault("document_logs", [])
        name = f"documents/{self.prefix}part-{len(logs):06d}.jsonl"
        text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
        atomic_write_text(self.path / name, text)
        logs.append(name)

    def _drop_bad_shards(self) -> list[str]:
        """Verify recorded shards; forget bad ones so their windows are harvested again."""
        bad = []
        for record in list(self.manifest["shards"]):
            problem = shard_problem(self.path, record)
            if problem is None:
                continue
            log.warning(
                "shard %s is %s; its windows will be harvested again", record["file"], problem
            )
            bad.append(f"{record['file']}: {problem}")
            file = self.path / record["file"]
            if file.exists():  # a shard deleted by hand has nothing to set aside
                file.replace(self.path / f"{record['file']}.bad")
            self.manifest["shards"].remove(record)
            for s, e in record["windows"]:
                self.manifest["progress"]["done_windows"] = remove_interval(self.done, s, e)
        if bad:
            self.manifest["stats"] = _recompute_stats(self.path, self.manifest)
            self.manifest["progress"]["complete"] = False
            self._write_manifest()
        return bad

    def _write_manifest(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_text(self.manifest_file, json.dumps(self.manifest, indent=1))


def _new_manifest(header: dict[str, Any], dtype: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "dtype": dtype,
        "created": now,
        "updated": now,
        "next_shard": 0,
        "shards": [],
        "progress": {"done_windows": [], "complete": False},
        "alignment": {},
        "stats": {"count": 0},
    }


def resumed_manifest(
    path: str | Path, fresh: bool = False, rank: int = 0, world_size: int = 1
) -> dict[str, Any] | None:
    """Check, before a harvest loads its models, that it can write the store at `path` (a
    directory it can create, one `fresh` may clear, laid out for this many processes); the
    manifest it would resume, or None for a new or fresh store."""
    path = Path(path)
    _check_writable(path)
    if fresh:
        _check_clearable(path)
        return None
    _check_layout(path, world_size)
    file = path / manifest_name(rank, world_size)
    return _load_manifest(file, path) if file.is_file() else None


def _check_writable(path: Path) -> None:
    """Refuse an output path that is a file, or whose nearest existing folder is a file or
    cannot be written to."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"--out {path} is a file; give a directory for the activation store")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StoreError(f"cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to {parent}; choose an --out directory you can write")


def check_compatible(manifest: dict, header: dict, dtype: str, path: Path) -> None:
    """Refuse to resume a store harvested with other models, layers or data settings."""
    for key, value in {**header, "dtype": dtype}.items():
        if key == "provenance":
            continue
        stored = manifest.get(key)
        if json.loads(json.dumps(value)) != stored:
            raise StoreError(
                f"the store at {path} was harvested with a different {key!r} "
                f"({json.dumps(stored)[:200]} vs now {json.dumps(value)[:200]}); "
                "pass --fresh to start it over, or choose another output directory"
            )


def manifest_name(rank: int = 0, world_size: int = 1) -> str:
    """The manifest of one rank of a harvest, relative to the store (one process: the store's)."""
    return MANIFEST if world_size == 1 else f"{RANKS}/manifest-{rank:03d}-of-{world_size:03d}.json"


def check_rank(rank: int, world_size: int) -> None:
    """Refuse a rank outside 0..world_size-1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise StoreError(
            f"rank {rank} of world size {world_size} is impossible; give a world size of at "
            "least 1 and a rank from 0 to world size - 1"
        )


def _rank_files(path: Path) -> list[tuple[tuple[int, int], Path]]:
    """((rank, world size), file) of every rank manifest in a store, by rank."""
    found = []
    for file in (path / RANKS).glob("manifest-*-of-*.json"):
        match = _RANK_MANIFEST.fullmatch(file.name)
        if match:
            found.append(((int(match[1]), int(match[2])), file))
    return sorted(found)


def _check_layout(path: Path, world_size: int) -> None:
    """Refuse to continue a store harvested by a different number of processes."""
    worlds = {w for (_, w), _ in _rank_files(path)}
    single = (path / MANIFEST).is_file()
    if world_size == 1 and worlds:
        raise StoreError(
            f"the store at {path} was harvested by {max(worlds)} processes; continue it with "
            f"--world-size {max(worlds)} (one process per rank), or pass --fresh to start over"
        )
    if world_size > 1 and single:
        raise StoreError(
            f"the store at {path} was harvested by one process; continue it without --rank/"
            "--world-size, or pass --fresh to start over"
        )
    if world_size > 1 and worlds - {world_size}:
        raise StoreError(
            f"the store at {path} was harvested with --world-size "
            f"{', '.join(map(str, sorted(worlds)))}; continue it with that world size, or "
            "pass --fresh to start over"
        )


def _clear(path: Path, rank: int = 0, world_size: int = 1) -> None:
    """Remove what a fresh harvest by this rank replaces: its manifest, shards and document
    logs; rank 0 also removes what no rank of this world size owns. Only a store (or a
    folder holding nothing else) is cleared, and only of the files a store writes."""
    _check_clearable(path)
    (path / manifest_name(rank, world_size)).unlink(missing_ok=True)
    if rank == 0:
        # Leftovers of a harvest with another number of processes.
        (path / MANIFEST).unlink(missing_ok=True)
        for (_, world), file in _rank_files(path):
            if world != world_size:
                file.unlink(missing_ok=True)  # (another rank may be clearing it too)
    for sub in ("shards", "documents"):
        for file in (path / sub).glob("*"):
            if _owned(sub, file) and _cleared_by(file.name, rank, world_size):
                file.unlink(missing_ok=True)


def _owned(folder: str, file: Path) -> bool:
    """Whether `file`, in the store's `folder`, is one a store writes."""
    return file.is_file() and _OWN_FILES[folder].fullmatch(file.name) is not None


def _check_clearable(path: Path) -> None:
    """Refuse to clear anything but an activation store, or a folder holding only what a
    store writes (a new or emptied one)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"--fresh refuses to clear {path}: it is a file, not a store directory")
    manifests = [path / MANIFEST] if (path / MANIFEST).exists() else []
    manifests += [file for _, file in _rank_files(path)]
    foreign = [m for m in manifests if not _is_store_manifest(m)]
    if foreign:
        raise StoreError(
            f"--fresh refuses to clear {path}: {foreign[0].relative_to(path)} is not an "
            "activation-store manifest, so the folder is not a modeldiff store; choose a new "
            "or empty --out directory"
        )
    if manifests:
        return  # a store: its own files go, anything else put in it stays
    others = _foreign_entries(path)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise StoreError(
            f"--fresh refuses to clear {path}: it is not an activation store (it holds "
            f"{shown}); choose a new or empty --out directory"
        )


def _foreign_entries(path: Path) -> list[str]:
    """What a folder holds that a store does not write, relative to it."""
    found = []
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and entry.name in _OWN_FILES:
            found += [
                f"{entry.name}/{f.name}"
                for f in sorted(entry.iterdir())
                if not _owned(entry.name, f)
            ]
        elif not _owned("", entry):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def _is_store_manifest(file: Path) -> bool:
    """Whether `file` is a store manifest, whole or damaged (its start names the format)."""
    try:
        data = file.read_bytes()
    except OSError:
        return False
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A damaged manifest (a crash in the middle of a copy) is still the store's: the
        # writer puts the format first.
        return f'"format": "{FORMAT}"'.encode() in data[:200]
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _cleared_by(name: str, rank: int, world_size: int) -> bool:
    """Whether a fresh harvest by `rank` removes this shard or document-log file."""
    if world_size == 1:
        return True
    match = re.match(r"\.?rank-(\d+)-", name)
    owner = None if match is None else int(match[1])
    # Rank 0 also removes the files no rank of this world size will replace.
    return owner == rank or (rank == 0 and (owner is None or owner >= world_size))


def _shard_tensors(
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


def _merge_counts(total: dict[str, Any], add: dict[str, Any]) -> None:
    """Add numbers and nested {reason: n} dicts of `add` into `total`."""
    for key, value in add.items():
        if isinstance(value, dict):
            _merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


def _update_stats(stats: dict[str, Any], n_new: int, sums: dict[str, torch.Tensor]) -> None:
    """Fold one shard (its pair count and column sums) into the running count and means."""
    n_old = stats["count"]
    total = n_old + n_new
    for side, new_sum in sums.items():
        old_mean = torch.tensor(stats.get(f"mean_{side}", [0.0] * new_sum.shape[0]))
        stats[f"mean_{side}"] = ((old_mean.double() * n_old + new_sum) / total).tolist()
    stats["count"] = total
    stats.pop("median_norm_a", None)
    stats.pop("median_norm_b", None)


def median_norms(manifest: dict[str, Any]) -> tuple[float, float]:
    """Median activation norm of each model, estimated as the pair-weighted median of the
    shard medians (each shard holds thousands of pairs)."""
    shards = manifest["shards"]
    if not shards:
        raise StoreError("the activation store has no shards yet; run modeldiff harvest first")
    out = []
    for side in ("a", "b"):
        medians = np.array([s[f"median_norm_{side}"] for s in shards])
        weights = np.array([s["pairs"] for s in shards], dtype=np.float64)
        order = np.argsort(medians)
        cum = np.cumsum(weights[order])
        out.append(float(medians[order][np.searchsorted(cum, cum[-1] / 2)]))
    return out[0], out[1]


def _recompute_stats(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Count and means from the column sums kept in every good shard."""
    count, sums = 0, {"a": None, "b": None}
    for record in manifest["shards"]:
        with safe_open(str(path / record["file"]), framework="pt") as fh:
            for side in sums:
                s = fh.get_tensor(f"sum_{side}")
                sums[side] = s if sums[side] is None else sums[side] + s
        count += record["pairs"]
    stats: dict[str, Any] = {"count": count}
    if count:
        stats.update({f"mean_{k}": (v / count).tolist() for k, v in sums.items()})
    return stats


# -- reading -----------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a store (the merged rank manifests of a split harvest), with clear
    errors for a missing, foreign or damaged one."""
    path = Path(path)
    ranks = _rank_files(path)
    if (path / MANIFEST).is_file():
        if ranks:
            raise StoreError(
                f"{path} holds both a one-process harvest ({MANIFEST}) and rank manifests "
                f"({RANKS}/); harvest it again with --fresh"
            )
        return _load_manifest(path / MANIFEST, path)
    if ranks:
        return merge_rank_manifests(path, ranks)
    raise StoreError(
        f"{path} is not an activation store (no {MANIFEST}); create one with modeldiff harvest"
    )


def _load_manifest(file: Path, store: Path) -> dict[str, Any]:
    """One manifest file, format- and version-checked."""
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(
            f"{file} is damaged ({err}); the store's record of its shards is lost: harvest it "
            f"again with `modeldiff harvest --out {store} --fresh`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not a modeldiff activation-store manifest")
    if manifest.get("version", 0) > VERSION:
        raise StoreError(
            f"{store} was written by a newer modeldiff (store version {manifest['version']}, "
            f"this one reads {VERSION}); upgrade modeldiff"
        )
    _check_file_names(manifest, file)
    return manifest


def _check_file_names(manifest: dict[str, Any], file: Path) -> None:
    """Refuse a manifest that names files other than the store's own shards and logs."""
    shard = (_SHARD_FILE, "shard", "shards/shard-000000.safetensors")
    names = [
        (r.get("file") if isinstance(r, dict) else r, *shard) for r in manifest.get("shards", [])
    ]
    log_file = (_DOCUMENT_FILE, "document log", "documents/part-000000.jsonl")
    names += [(n, *log_file) for n in manifest.get("document_logs", [])]
    for name, pattern, what, example in names:
        if not isinstance(name, str) or pattern.fullmatch(name) is None:
            raise StoreError(
                f"{file} names {name!r} as a {what}, which is not a file of the store (like "
                f"{example}); the manifest was edited by hand or is not from modeldiff: "
                "harvest the store again with --fresh"
            )


def merge_rank_manifests(
    path: Path, ranks: list[tuple[tuple[int, int], Path]] | None = None
) -> dict[str, Any]:
    """One manifest for a store harvested by several ranks: their shards, logs, counts and
    statistics together; complete once every rank is."""
    ranks = _rank_files(path) if ranks is None else ranks
    worlds = sorted({w for (_, w), _ in ranks})
    if len(worlds) > 1:
        raise StoreError(
            f"{path} holds rank manifests of harvests with world sizes "
            f"{', '.join(map(str, worlds))}; harvest it again with --fresh"
        )
    world = worlds[0]
    parts = {r: _load_manifest(file, path) for (r, _), file in ranks}
    first = next(iter(parts.values()))
    for r, m in parts.items():
        for key in ("models", "data", "dtype"):
            if m.get(key) != first.get(key):
                raise StoreError(
                    f"rank {r} of the store at {path} was harvested with a different {key!r} "
                    f"than rank {min(parts)}; harvest that rank again with --fresh"
                )
    skip = ("rank", "shards", "document_logs", "progress", "alignment", "stats", "next_shard")
    merged = {k: v for k, v in first.items() if k not in skip}
    merged["created"] = min(m["created"] for m in parts.values())
    merged["updated"] = max(m["updated"] for m in parts.values())
    merged["shards"] = [s for m in parts.values() for s in m["shards"]]
    merged["document_logs"] = [d for m in parts.values() for d in m.get("document_logs", [])]
    merged["alignment"] = {}
    for m in parts.values():
        _merge_counts(merged["alignment"], m["alignment"])
    merged["stats"] = _merge_stats([m["stats"] for m in parts.values()])
    done = None
    for m in parts.values():
        windows = m["progress"]["done_windows"]
        done = windows if done is None else _intersect(done, windows)
    complete = len(parts) == world and all(m["progress"]["complete"] for m in parts.values())
    merged["progress"] = {
        # Each rank's record covers the windows it passed, its own and others': every
        # window all ranks passed is stored (or was skipped) by its owner.
        "done_windows": done if len(parts) == world else [],
        "complete": complete,
        "exhausted": all(m["progress"].get("exhausted", False) for m in parts.values()),
    }
    merged["ranks"] = {
        "world_size": world,
        "found": sorted(parts),
        "complete": sorted(r for r, m in parts.items() if m["progress"]["complete"]),
    }
    return merged


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pair count and mean vectors of several stores' statistics together."""
    count = sum(p["count"] for p in parts)
    stats: dict[str, Any] = {"count": count}
    for side in ("a", "b"):
        weighted = [
            torch.tensor(p[f"mean_{side}"]).double() * p["count"] for p in parts if p["count"]
        ]
        if weighted:
            stats[f"mean_{side}"] = (sum(weighted) / count).tolist()
    return stats


def _intersect(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """Intersection of two lists of sorted disjoint [start, end) intervals."""
    out = []
    for s1, e1 in a:
        for s2, e2 in b:
            lo, hi = max(s1, s2), min(e1, e2)
            if lo < hi:
                out.append([lo, hi])
    return out


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


class ActivationStore:
    """Reads a store: shuffled training batches, whole shards, and window contexts.

    `batches` implements the trainer's PairedSource: each epoch visits the shards in a
    seeded order, a group at a time (two groups, at most `buffer_bytes` of activations, in
    memory), shuffles the rows of the group, and cuts batches from them; the next group is
    read, verified and shuffled in a background thread meanwhile. A shard whose SHA256 does
    not match the manifest is reported (logged, listed in `bad_shards`) and left out.
    """

    def __init__(self, path: str | Path, buffer_bytes: int = 1 << 30) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.shards = self.manifest["shards"]
        if not self.shards:
            raise StoreError(f"the activation store at {path} has no shards yet")
        self.buffer_bytes = buffer_bytes
        self.bad_shards: list[str] = []

    def __len__(self) -> int:
        return sum(s["pairs"] for s in self.shards)

    @property
    def d_a(self) -> int:
        return int(self.manifest["models"]["a"]["d_model"])

    @property
    def d_b(self) -> int:
        return int(self.manifest["models"]["b"]["d_model"])

    def median_norms(self) -> tuple[float, float]:
        """Median L2 norm of each model's activations."""
        return median_norms(self.manifest)

    def documents(self) -> Iterator[dict[str, Any]]:
        """Per-document records: id, source, tokens per model, pairs, drops by reason."""
        for name in self.manifest.get("document_logs", []):
            with (self.path / name).open() as fh:
                for line in fh:
                    yield json.loads(line)

    def verify(self) -> list[str]:
        """Check every shard against the manifest; the problems found, one line each."""
        problems = []
        for record in self.shards:
            problem = shard_problem(self.path, record)
            if problem:
                problems.append(f"{record['file']}: {problem}")
        return problems

    def load_shard(self, i: int, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """All tensors of shard `i` (or only `keys`), verified against its SHA256."""
        tensors = load_bytes(self._read(i))
        return tensors if keys is None else {k: tensors[k] for k in keys}

    def _read(self, i: int) -> bytes:
        """The bytes of shard `i`, verified against its SHA256."""
        record = self.shards[i]
        file = self.path / record["file"]
        data = file.read_bytes() if file.is_file() else b""
        problem = shard_problem(self.path, record, data) if file.is_file() else "missing"
        if problem:
            rank = re.match(r"shards/rank-(\d+)-", record["file"])
            who = f" as rank {int(rank[1])}" if rank else ""
            raise StoreError(
                f"shard {file} is {problem}; run the `modeldiff harvest --out {self.path}` "
                f"command that made the store again{who}: it harvests those windows again"
            )
        return data

    def windows(self, i: int) -> list[dict[str, Any]]:
        """The windows of shard `i`: text, both tokenizations, pair rows and their spans."""
        data = self._read(i)
        t = load_bytes(data)
        meta = _metadata(data)
        doc_ids, sources = json.loads(meta["doc_ids"]), json.loads(meta["sources"])
        text_bytes = t["text_bytes"].numpy().tobytes()
        out = []
        for w, index in enumerate(t["window_index"].tolist()):
            lo, hi = t["text_ptr"][w].item(), t["text_ptr"][w + 1].item()
            entry = {
                "index": index,
                "doc_id": doc_ids[w],
                "source": sources[w],
                "char_start": int(t["window_char_start"][w]),
                "text": text_bytes[lo:hi].decode(),
                "rows": torch.nonzero(t["pair_window"] == index).flatten(),
            }
            entry["spans"] = t["pair_span"][entry["rows"]]
            for side in ("a", "b"):
                lo, hi = t[f"ptr_{side}"][w].item(), t[f"ptr_{side}"][w + 1].item()
                entry[f"ids_{side}"] = t[f"ids_{side}"][lo:hi]
                entry[f"offsets_{side}"] = t[f"offsets_{side}"][lo:hi]
            out.append(entry)
        return out

    # shuffled batches ---------------------------------------------------------------------

    def batches(
        self, batch_size: int, start_step: int = 0, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches in the store's dtype (the trainer converts on its device, which
        halves host-to-GPU traffic for bf16 stores); batch s is the same whether iteration
        starts at 0 or at s."""
        n = len(self)
        if batch_size > n:
            raise StoreError(f"batch_size {batch_size} exceeds the {n} pairs in the store")
        per_epoch = n // batch_size
        epoch, within = divmod(start_step, per_epoch)
        skip = within * batch_size
        while True:
            yield from self._epoch(epoch, batch_size, skip, seed)
            epoch, skip = epoch + 1, 0

    def _epoch(self, epoch: int, batch_size: int, skip: int, seed: int):
        """Batches of one epoch, starting `skip` rows into its shuffled order."""
        groups = self._groups(epoch, seed)
        sizes = [sum(self.shards[i]["pairs"] for i in g) for g in groups]
        first = 0
        while first < len(groups) and skip >= sizes[first]:
            skip -= sizes[first]
            first += 1
        carry_a = carry_b = None
        for x_a, x_b in self._prefetched(groups[first:], epoch, seed, first):
            if skip:
                x_a, x_b, skip = x_a[skip:], x_b[skip:], 0
            if carry_a is not None:
                x_a, x_b = torch.cat([carry_a, x_a]), torch.cat([carry_b, x_b])
            # Rows short of a batch carry over into the next group; the epoch's last
            # partial batch is dropped.
            usable = (x_a.shape[0] // batch_size) * batch_size
            for lo in range(0, usable, batch_size):
                yield x_a[lo : lo + batch_size], x_b[lo : lo + batch_size]
            carry_a, carry_b = x_a[usable:], x_b[usable:]

    def _groups(self, epoch: int, seed: int) -> list[list[int]]:
        """Shards in this epoch's order, grouped to fit the memory buffer."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=gen).tolist()
        width = 2 if self.manifest["dtype"] in ("bfloat16", "bf16", "float16", "fp16") else 4
        per_pair = (self.d_a + self.d_b) * width
        # Two groups are in memory at once (one served, one prefetched).
        budget = max(1, self.buffer_bytes // (2 * per_pair))
        groups: list[list[int]] = [[]]
        size = 0
        for i in order:
            if groups[-1] and size + self.shards[i]["pairs"] > budget:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += self.shards[i]["pairs"]
        return groups

    def _load_group(self, group: list[int], epoch: int, seed: int, number: int):
        """The rows of a group of shards, shuffled with a seed fixed by (seed, epoch, group)."""
        parts_a, parts_b = [], []
        for i in group:
            try:
                t = self.load_shard(i, ACTIVATION_KEYS)
            except StoreError as err:
                log.warning("%s; leaving it out", err)
                self.bad_shards.append(str(err))
                continue
            parts_a.append(t["a"])
            parts_b.append(t["b"])
        if not parts_a:
            return None
        x_a, x_b = torch.cat(parts_a), torch.cat(parts_b)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + number)
        perm = torch.randperm(x_a.shape[0], generator=gen)
        return x_a[perm], x_b[perm]

    def _prefetched(self, groups: list[list[int]], epoch: int, seed: int, offset: int):
        """Loaded groups in order, each read by a background thread ahead of its use."""
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def work() -> None:
            try:
                for number, group in enumerate(groups, start=offset):
                    if stop.is_set():
                        return
                    ready.put(("ok", self._load_group(group, epoch, seed, number)))
                ready.put(("end", None))
            except BaseException as err:  # surfaced in the consumer thread
                ready.put(("error", err))

        thread = threading.Thread(target=work, daemon=True, name="store-prefetch")
        thread.start()
        try:
            while True:
                kind, item = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                if item is not None:
                    yield item
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue so the thread can exit.
            while thread.is_alive():
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata in the header of a serialised safetensors file."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})


def bytes_per_pair(manifest: dict[str, Any]) -> float:
    """Disk bytes per stored pair (shards, everything included)."""
    pairs = sum(s["pairs"] for s in manifest["shards"])
    return sum(s["bytes"] for s in manifest["shards"]) / pairs if pairs else math.nan
