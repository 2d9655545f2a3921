"""Each feature's example contexts: top, rank-quantile and random, with per-span activations.

After the scan (engine/analysis/scan.py) every feature has its top segments, a uniform sample
of the segments where it is active, and a sample of segments where it is not. This module

* chooses the examples: the `top_k` highest segments; from the active sample, sorted by
  activation, `n_quantiles` equal-count rank bins (bin 0 holds the weakest activations) with
  up to `per_quantile` segments each, evenly spaced within the bin and not already in the top
  list (the "rank-based quantiles" of delphi); and the random non-activating segments;
* reads the feature's activation on every aligned span of each chosen segment, encoding only
  the rows of the chosen segments, shard by shard;
* returns tables ready for the database: contexts and the windows they point into.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from engine.activations import ActivationStore
from engine.analysis.scan import EntryCache, ScanResult
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.progress import ProgressBar


@dataclass(frozen=True)
class ExampleConfig:
    """How many examples of each kind a feature gets."""

    n_quantiles: int = 5
    per_quantile: int = 4
    n_random: int = 10


@dataclass(frozen=True)
class Choice:
    """One chosen example: which feature, which segment, what kind."""

    feature: int
    segment: int
    kind: str  # top | quantile | random
    rank: int
    quantile: int | None = None


def choose(result: ScanResult, cfg: ExampleConfig | None = None) -> list[Choice]:
    """The examples of every feature (see the module docstring)."""
    cfg = cfg or ExampleConfig()
    out: list[Choice] = []
    top_seg, act_seg, act_val = result.top_seg.numpy(), result.active_seg, result.active_val
    off_seg = result.inactive_seg.numpy()
    for f in range(top_seg.shape[0]):
        tops = [int(s) for s in top_seg[f] if s >= 0]
        out += [Choice(f, s, "top", r) for r, s in enumerate(tops)]
        out += _quantiles(f, act_seg[f], act_val[f], set(tops), cfg)
        rand = [int(s) for s in off_seg[f] if s >= 0][: cfg.n_random]
        out += [Choice(f, s, "random", r) for r, s in enumerate(rand)]
    return out


def _quantiles(f: int, segs: torch.Tensor, vals: torch.Tensor, exclude: set[int], cfg):
    """Rank-quantile examples of one feature from its active sample."""
    keep = segs >= 0
    segs, vals = segs[keep].numpy(), vals[keep].numpy()
    order = np.argsort(vals, kind="stable")
    segs = [int(s) for s in segs[order] if int(s) not in exclude]
    out = []
    if not segs:
        return out
    for q, part in enumerate(np.array_split(np.arange(len(segs)), cfg.n_quantiles)):
        if len(part) == 0:
            continue
        picks = np.unique(np.linspace(0, len(part) - 1, min(cfg.per_quantile, len(part))).round())
        # Highest first within the bin, like the top list.
        for r, i in enumerate(picks[::-1].astype(int)):
            out.append(Choice(f, segs[part[i]], "quantile", r, q))
    return out


def read_examples(
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    store: ActivationStore,
    result: ScanResult,
    choices: list[Choice],
    progress: bool = True,
    cache: EntryCache | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(contexts, windows) tables for the chosen examples; shards whose activations the scan
    cached are read from `cache` instead of being encoded again."""
    segs = result.segments
    wanted: dict[int, set[int]] = defaultdict(set)  # segment -> features needing its acts
    for c in choices:
        if c.kind != "random":  # inactive by construction: all zeros, nothing to encode
            wanted[c.segment].add(c.feature)
    by_shard: dict[int, list[int]] = defaultdict(list)
    for seg in {c.segment for c in choices}:
        by_shard[segs.shard[seg]].append(seg)
    acts: dict[tuple[int, int], np.ndarray] = {}
    windows = []
    with ProgressBar("examples", len(by_shard), progress) as bar:
        for shard in sorted(by_shard):
            if cache is not None and shard in cache.shards:
                n_features = crosscoder.partition.n_features
                acts.update(_cached_acts(cache, shard, by_shard[shard], wanted, segs, n_features))
            else:
                acts.update(
                    _shard_acts(crosscoder, normalizer, store, shard, by_shard[shard], wanted, segs)
                )
            windows += _shard_windows(store, shard, {segs.window[s] for s in by_shard[shard]})
            bar.update(advance=1)
    rows = []
    for c in choices:
        n = segs.end[c.segment] - segs.start[c.segment]
        a = acts.get((c.segment, c.feature), np.zeros(n, dtype=np.float32))
        rows.append(
            {
                "feature_id": c.feature,
                "kind": c.kind,
                "rank": c.rank,
                "quantile": c.quantile,
                "window_id": segs.window[c.segment],
                "span_start": segs.start[c.segment],
                "span_end": segs.end[c.segment],
                "acts": a.tolist(),
                "max_act": float(a.max()) if len(a) else 0.0,
            }
        )
    return pd.DataFrame(rows), pd.DataFrame(windows)


def _cached_acts(cache: EntryCache, shard: int, seg_ids, wanted, segs, n_features: int):
    """The wanted (segment, feature) activation vectors of a shard, from cached entries."""
    pairs = [(s, f) for s in sorted(seg_ids) for f in sorted(wanted.get(s, ()))]
    if not pairs:
        return {}
    p_seg = np.array([s for s, _ in pairs], dtype=np.int64)
    p_feat = np.array([f for _, f in pairs], dtype=np.int64)
    keys = p_seg * n_features + p_feat  # ascending by construction
    lengths = np.array([segs.end[s] - segs.start[s] for s in p_seg])
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    flat = np.zeros(int(lengths.sum()), dtype=np.float32)
    e = cache.load(shard)
    entry_keys = e["seg"].numpy() * n_features + e["feat"].numpy()
    at = np.minimum(np.searchsorted(keys, entry_keys), len(keys) - 1)
    hit = keys[at] == entry_keys
    flat[offsets[at[hit]] + e["pos"].numpy()[hit]] = e["val"].numpy()[hit]
    parts = np.split(flat, offsets[1:])
    return dict(zip(zip(p_seg.tolist(), p_feat.tolist(), strict=True), parts, strict=True))


def _shard_acts(crosscoder, normalizer, store, shard: int, seg_ids, wanted, segs, chunk=2048):
    """Activations of the wanted features on every pair of the given segments of a shard,
    encoding at most about `chunk` rows at a time."""
    t = store.load_shard(shard, ("a", "b", "pair_window"))
    first_row = dict(zip(*np.unique(t["pair_window"].numpy(), return_index=True), strict=True))
    out: dict[tuple[int, int], np.ndarray] = {}
    group: list[tuple[int, int, int]] = []  # (segment, first row, end row)
    size = 0
    for s in sorted(s for s in seg_ids if wanted.get(s)):
        lo = int(first_row[segs.window[s]]) + segs.start[s]
        group.append((s, lo, lo + segs.end[s] - segs.start[s]))
        size += group[-1][2] - lo
        if size >= chunk:
            _encode_group(crosscoder, normalizer, t, group, wanted, out)
            group, size = [], 0
    _encode_group(crosscoder, normalizer, t, group, wanted, out)
    return out


def _encode_group(crosscoder, normalizer, t, group, wanted, out) -> None:
    """Encode the rows of a few segments and keep each segment's wanted columns."""
    if not group:
        return
    rows = torch.from_numpy(np.concatenate([np.arange(lo, hi) for _, lo, hi in group]))
    with torch.inference_mode():
        dense = crosscoder.encode(*normalizer.apply(t["a"][rows].float(), t["b"][rows].float()))
    # One gather for every (segment, feature) column: row and feature index per value.
    seg_ids, feats, starts, lengths = [], [], [], []
    pos = 0
    for s, lo, hi in group:
        fs = np.fromiter(sorted(wanted[s]), dtype=np.int64)
        seg_ids.append(np.full(len(fs), s))
        feats.append(fs)
        starts.append(np.full(len(fs), pos))
        lengths.append(np.full(len(fs), hi - lo))
        pos += hi - lo
    seg_ids, feats = np.concatenate(seg_ids), np.concatenate(feats)
    starts, lengths = np.concatenate(starts), np.concatenate(lengths)
    ends = np.cumsum(lengths)
    within = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)
    flat_rows = torch.from_numpy(np.repeat(starts, lengths) + within)
    flat_feats = torch.from_numpy(np.repeat(feats, lengths))
    values = dense[flat_rows, flat_feats].numpy().astype(np.float32)
    parts = np.split(values, ends[:-1])
    out.update(zip(zip(seg_ids.tolist(), feats.tolist(), strict=True), parts, strict=True))


def _shard_windows(store: ActivationStore, shard: int, window_ids: set[int]) -> list[dict]:
    """Rows of the windows table for the given windows of one shard."""
    return [
        {
            "window_id": w["index"],
            "doc_id": w["doc_id"],
            "source": w["source"],
            "text": w["text"],
            "spans": w["spans"].tolist(),
            "ids_a": w["ids_a"].tolist(),
            "offsets_a": w["offsets_a"].tolist(),
            "ids_b": w["ids_b"].tolist(),
            "offsets_b": w["offsets_b"].tolist(),
        }
        for w in store.windows(shard)
        if w["index"] in window_ids
    ]
