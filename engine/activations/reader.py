"""Reading an activation store: its manifest (the rank manifests merged, for a split
harvest), shuffled training batches, whole shards and the windows' contexts.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes

from engine.activations.manifest import MANIFEST, RANKS, StoreError, load_manifest, rank_files
from engine.activations.merge import merge_rank_manifests
from engine.activations.shards import ACTIVATION_KEYS, shard_metadata, shard_problem
from engine.activations.stats import median_norms

log = logging.getLogger(__name__)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a store (the merged rank manifests of a split harvest), with clear
    errors for a missing, foreign or damaged one."""
    path = Path(path)
    ranks = rank_files(path)
    if (path / MANIFEST).is_file():
        if ranks:
            raise StoreError(
                f"{path} holds both a one-process harvest ({MANIFEST}) and rank manifests "
                f"({RANKS}/); harvest it again with --fresh"
            )
        return load_manifest(path / MANIFEST, path)
    if ranks:
        return merge_rank_manifests(path, ranks)
    raise StoreError(
        f"{path} is not an activation store (no {MANIFEST}); create one with modeldiff harvest"
    )


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
        meta = shard_metadata(data)
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

    def hold_out(self, n_pairs: int):
        """Whole windows holding at least `n_pairs` pairs split off for validation, and
        the store without them to train on (`split.StoreSplit`); None if too small."""
        from engine.activations.split import split_store

        return split_store(self, n_pairs)

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
