"""Writing an activation store: windows of paired activations appended one atomic shard at a
time, resumable where a harvest stopped.

Crash safety: a shard is written to a temporary file and renamed into place; then the
manifest, also replaced atomically, records it together with the windows it consumed. The
manifest is the only record of what is done, so a harvest killed at any moment resumes at
the first window not recorded, with no pair lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes

from engine.activations.layout import check_layout, clear_store
from engine.activations.manifest import (
    StoreError,
    check_compatible,
    check_rank,
    load_manifest,
    manifest_name,
    new_manifest,
    rank_files,
    store_dtype,
)
from engine.activations.shards import WindowRecord, shard_problem, shard_tensors
from engine.activations.stats import (
    add_interval,
    contains,
    merge_counts,
    recompute_stats,
    remove_interval,
    update_stats,
)
from engine.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


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
            clear_store(self.path, rank, world_size)
        else:
            check_layout(self.path, world_size)
        if self.manifest_file.is_file():
            self.manifest = load_manifest(self.manifest_file, self.path)
            check_compatible(self.manifest, header, dtype, self.path)
            self.bad_shards = self._drop_bad_shards()
        else:
            self.manifest = new_manifest(header, dtype)
            if world_size > 1:
                self.manifest["rank"] = {"rank": rank, "world_size": world_size}
            self.bad_shards = []
            self._write_manifest()
        if not fresh:  # (a fresh start races with the other ranks clearing their files)
            self._check_other_ranks(header, dtype)

    def _check_other_ranks(self, header: dict[str, Any], dtype: str) -> None:
        """Fail now, not when the store is read, if another rank harvested something else."""
        for (_, world), file in rank_files(self.path):
            if file != self.manifest_file and world == self.world_size:
                check_compatible(load_manifest(file, self.path), header, dtype, self.path)

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
        merge_counts(self.pending.counts, counts)
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
            update_stats(self.manifest["stats"], record["pairs"], sums)
        if pend.documents:
            self._write_document_log(pend.documents)
        for s, e in pend.consumed:
            self.manifest["progress"]["done_windows"] = add_interval(self.done, s, e)
        merge_counts(self.manifest["alignment"], pend.counts)
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
        tensors = shard_tensors(pend.windows, x_a, x_b, self.dtype)
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
            self.manifest["stats"] = recompute_stats(self.path, self.manifest)
            self.manifest["progress"]["complete"] = False
            self._write_manifest()
        return bad

    def _write_manifest(self) -> None:
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_text(self.manifest_file, json.dumps(self.manifest, indent=1))
