"""What a manifest keeps count of: the windows done (sorted, disjoint [start, end)
intervals of the window stream), counters by reason, and the activation statistics (pair
count, column means, median norms).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from engine.activations.manifest import StoreError


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


def merge_counts(total: dict[str, Any], add: dict[str, Any]) -> None:
    """Add numbers and nested {reason: n} dicts of `add` into `total`."""
    for key, value in add.items():
        if isinstance(value, dict):
            merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


def update_stats(stats: dict[str, Any], n_new: int, sums: dict[str, torch.Tensor]) -> None:
    """Fold one shard (its pair count and column sums) into the running count and means."""
    n_old = stats["count"]
    total = n_old + n_new
    for side, new_sum in sums.items():
        old_mean = torch.tensor(stats.get(f"mean_{side}", [0.0] * new_sum.shape[0]))
        stats[f"mean_{side}"] = ((old_mean.double() * n_old + new_sum) / total).tolist()
    stats["count"] = total
    stats.pop("median_norm_a", None)
    stats.pop("median_norm_b", None)


def recompute_stats(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
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


def bytes_per_pair(manifest: dict[str, Any]) -> float:
    """Disk bytes per stored pair (shards, everything included)."""
    pairs = sum(s["pairs"] for s in manifest["shards"])
    return sum(s["bytes"] for s in manifest["shards"]) / pairs if pairs else math.nan
