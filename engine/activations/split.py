"""A validation split of an activation store: whole windows held out of training.

The held-out windows are drawn in a fixed order (a permutation of the store's window
indices under a constant seed, not the training seed), one at a time until they hold
the asked number of pairs. So every run on the same store, whatever its seed, resumed or
run by several processes, holds out the same windows, and the training view never yields
one of their rows. Whole windows rather than single rows: the windows' texts are then
unseen by the crosscoder, which is what `modeldiff evaluate` needs to splice its
reconstructions into the models on held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from engine.activations.reader import ActivationStore

# The window order of every split; constant so runs with different seeds share it.
SPLIT_SEED = 20_261_126
# Tensors with one row per pair (everything else in a shard is per window or per column).
PAIR_KEYS = ("a", "b", "norm_a", "norm_b", "pair_window", "pair_pos", "pair_span")


@dataclass
class StoreSplit:
    """A store's training view, the held-out pairs (store dtype) and their windows."""

    train: ActivationStore
    x_a: torch.Tensor
    x_b: torch.Tensor
    windows: list[int]

    def info(self) -> dict[str, Any]:
        """What a run records about its held-out data (crosscoder.json "validation"): the
        window indices, and the store they index (its path and creation time)."""
        return {
            "unit": "windows",
            "pairs": int(self.x_a.shape[0]),
            "windows": self.windows,
            "store": store_identity(self.train),
        }


def store_identity(store: ActivationStore) -> dict[str, Any]:
    """What tells one store from another: where it is and when it was created."""
    return {"path": str(store.path.resolve()), "created": store.manifest.get("created")}


def split_store(store: ActivationStore, n_pairs: int, whole: bool = False) -> StoreSplit | None:
    """Hold out whole windows of `store` holding at least `n_pairs` pairs (at most a tenth
    of the store's pairs, or all of them with `whole`: a streamed run's store, which
    training never reads); None when that leaves nothing to hold out."""
    target = min(n_pairs, len(store) if whole else len(store) // 10)
    if target <= 0:
        return None
    counts = _WindowCounts(store)
    order = torch.randperm(counts.n_windows, generator=torch.Generator().manual_seed(SPLIT_SEED))
    chosen: list[int] = []
    held = 0
    for position in order.tolist():
        window = counts.window_at(position)
        pairs = counts.pairs(window)
        if pairs == 0 or held + pairs > 2 * target:  # a window far larger than asked for
            continue
        chosen.append(window)
        held += pairs
        if held >= target:
            break
    if not chosen:
        return None
    chosen.sort()
    x_a, x_b = _held_rows(store, counts, chosen)
    return StoreSplit(TrainingView(store, counts, chosen), x_a, x_b, chosen)


class _WindowCounts:
    """Which shard holds each window and how many pairs it has (read on demand)."""

    def __init__(self, store: ActivationStore) -> None:
        self.store = store
        self.ranges: list[tuple[int, int, int]] = []  # (first window, end, shard index)
        for i, record in enumerate(store.shards):
            for lo, hi in record.get("windows", []):
                self.ranges.append((int(lo), int(hi), i))
        self.n_windows = sum(hi - lo for lo, hi, _ in self.ranges)
        self._pair_windows: dict[int, torch.Tensor] = {}

    def window_at(self, position: int) -> int:
        """The window index at `position` in the store's list of windows."""
        for lo, hi, _ in self.ranges:
            if position < hi - lo:
                return lo + position
            position -= hi - lo
        raise IndexError(position)

    def shard_of(self, window: int) -> int:
        for lo, hi, shard in self.ranges:
            if lo <= window < hi:
                return shard
        raise KeyError(window)

    def pair_windows(self, shard: int) -> torch.Tensor:
        """The window of every pair of a shard (only that tensor is read)."""
        if shard not in self._pair_windows:
            file = self.store.path / self.store.shards[shard]["file"]
            with safe_open(str(file), framework="pt") as fh:
                self._pair_windows[shard] = fh.get_tensor("pair_window")
        return self._pair_windows[shard]

    def pairs(self, window: int) -> int:
        return int((self.pair_windows(self.shard_of(window)) == window).sum())


def _held_rows(
    store: ActivationStore, counts: _WindowCounts, windows: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of `windows`, in shard order (each shard verified as training reads it)."""
    held = torch.tensor(windows)
    parts_a, parts_b = [], []
    for shard in sorted({counts.shard_of(w) for w in windows}):
        t = store.load_shard(shard, ("a", "b", "pair_window"))
        rows = torch.isin(t["pair_window"], held)
        parts_a.append(t["a"][rows])
        parts_b.append(t["b"][rows])
    return torch.cat(parts_a), torch.cat(parts_b)


class TrainingView(ActivationStore):
    """The store without the held-out windows' pairs: what training draws batches from.

    Shards that held out windows report fewer pairs, and their rows of those windows are
    dropped as the shard is read; a shard left with no pairs is left out.
    """

    def __init__(self, store: ActivationStore, counts: _WindowCounts, windows: list[int]) -> None:
        # The store's state, not a second read of the manifest.
        self.path, self.manifest = store.path, store.manifest
        self.buffer_bytes, self.bad_shards = store.buffer_bytes, []
        by_shard: dict[int, list[int]] = {}
        for w in windows:
            by_shard.setdefault(counts.shard_of(w), []).append(w)
        self._held: dict[str, torch.Tensor] = {}
        shards = []
        for i, record in enumerate(store.shards):
            if i in by_shard:
                held = torch.tensor(by_shard[i])
                dropped = int(torch.isin(counts.pair_windows(i), held).sum())
                record = {**record, "pairs": record["pairs"] - dropped}
                self._held[record["file"]] = held
            if record["pairs"] > 0:
                shards.append(record)
        self.shards = shards

    def load_shard(self, i: int, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        held = self._held.get(self.shards[i]["file"])
        if held is None:
            return super().load_shard(i, keys)
        tensors = super().load_shard(i)
        keep = ~torch.isin(tensors["pair_window"], held)
        tensors = {k: t[keep] if k in PAIR_KEYS else t for k, t in tensors.items()}
        return tensors if keys is None else {k: tensors[k] for k in keys}
