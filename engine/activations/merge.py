"""One manifest for a store harvested by several processes (ranks): the rank manifests
merged, their shards, logs, counts and statistics together, and the windows every rank has
passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.activations.manifest import StoreError, load_manifest, rank_files
from engine.activations.stats import merge_counts


def merge_rank_manifests(
    path: Path, ranks: list[tuple[tuple[int, int], Path]] | None = None
) -> dict[str, Any]:
    """One manifest for a store harvested by several ranks: their shards, logs, counts and
    statistics together; complete once every rank is."""
    ranks = rank_files(path) if ranks is None else ranks
    worlds = sorted({w for (_, w), _ in ranks})
    if len(worlds) > 1:
        raise StoreError(
            f"{path} holds rank manifests of harvests with world sizes "
            f"{', '.join(map(str, worlds))}; harvest it again with --fresh"
        )
    world = worlds[0]
    parts = {r: load_manifest(file, path) for (r, _), file in ranks}
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
        merge_counts(merged["alignment"], m["alignment"])
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
