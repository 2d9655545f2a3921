"""One streaming pass of an activation store through a trained crosscoder.

Every pair is encoded with the crosscoder's inference threshold (no batch needed). The pass
keeps, per feature and in memory independent of the store size:

* exact counts: how many pairs activate it, the sum and the maximum of its activations, and
  a histogram over fixed log-spaced bins;
* the `top_k` *segments* with the highest activation. A segment is a run of at most
  `segment_pairs` consecutive aligned pairs of one window (the unit a context shows; delphi
  uses 32-token windows), so one long document can supply several different contexts;
* a uniform sample (priority sampling with seeded keys) of the segments where it is active,
  from which rank-based quantile contexts are drawn afterwards, and of segments where it
  is not active (random negatives for detection scoring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.activations import ActivationStore
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.defaults import SEGMENT_PAIRS
from engine.progress import ProgressBar

HIST_LOW, HIST_HIGH, HIST_BINS = 1e-3, 1e3, 60  # activations (crosscoder units), log-spaced


@dataclass
class ScanConfig:
    """How much the pass keeps per feature."""

    top_k: int = 20
    sample_active: int = 64  # reservoir for quantile contexts
    sample_inactive: int = 10  # random non-activating segments
    segment_pairs: int = SEGMENT_PAIRS
    chunk_rows: int = 2048  # rows encoded at once (memory: chunk_rows x n_features floats)
    seed: int = 0


@dataclass
class Segments:
    """Every segment of the store: its window and its pair range within the window."""

    window: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)  # first pair (index within the window)
    end: list[int] = field(default_factory=list)
    shard: list[int] = field(default_factory=list)

    def add(self, window: int, start: int, end: int, shard: int) -> int:
        self.window.append(window)
        self.start.append(start)
        self.end.append(end)
        self.shard.append(shard)
        return len(self.window) - 1

    def __len__(self) -> int:
        return len(self.window)


@dataclass
class ScanResult:
    """Per-feature statistics and candidate segments from one pass."""

    n_pairs: int
    n_active: torch.Tensor  # int64 [F]
    sum_act: torch.Tensor  # float64 [F]
    max_act: torch.Tensor  # float32 [F]
    hist: torch.Tensor  # int64 [F, HIST_BINS]
    top_val: torch.Tensor  # float32 [F, top_k] (0 where fewer active segments)
    top_seg: torch.Tensor  # int64 [F, top_k] (-1 where none)
    active_val: torch.Tensor  # float32 [F, sample_active]: segment maxima of the sample
    active_seg: torch.Tensor  # int64 [F, sample_active] (-1 where none)
    inactive_seg: torch.Tensor  # int64 [F, sample_inactive] (-1 where none)
    segments: Segments

    @staticmethod
    def hist_edges() -> np.ndarray:
        """Bin edges of `hist` (HIST_BINS + 1 values; the first bin also holds smaller ones)."""
        return np.geomspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)


class _Scan:
    """Running state of the pass."""

    def __init__(self, n_features: int, cfg: ScanConfig) -> None:
        f = n_features
        self.cfg, self.f = cfg, f
        self.n_pairs = 0
        self.n_active = torch.zeros(f, dtype=torch.int64)
        self.sum_act = torch.zeros(f, dtype=torch.float64)
        self.max_act = torch.zeros(f)
        self.hist = torch.zeros(f * HIST_BINS, dtype=torch.int64)
        self.top_val = torch.zeros(f, cfg.top_k)
        self.top_seg = torch.full((f, cfg.top_k), -1, dtype=torch.int64)
        self.act_key = torch.full((f, cfg.sample_active), math.inf)
        self.act_val = torch.zeros(f, cfg.sample_active)
        self.act_seg = torch.full((f, cfg.sample_active), -1, dtype=torch.int64)
        self.off_key = torch.full((f, cfg.sample_inactive), math.inf)
        self.off_seg = torch.full((f, cfg.sample_inactive), -1, dtype=torch.int64)
        self.segments = Segments()

    def entries(self, feats: torch.Tensor, vals: torch.Tensor) -> None:
        """Fold non-zero activations (feature ids and values) into the counts."""
        self.n_active.index_add_(0, feats, torch.ones_like(feats))
        self.sum_act.index_add_(0, feats, vals.double())
        self.max_act.scatter_reduce_(0, feats, vals, "amax")
        log_pos = torch.log(vals.clamp_min(HIST_LOW) / HIST_LOW) / math.log(HIST_HIGH / HIST_LOW)
        bins = (log_pos * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        self.hist.index_add_(0, feats * HIST_BINS + bins, torch.ones_like(bins))

    def segments_done(self, seg_max: torch.Tensor, seg_ids: torch.Tensor, gen) -> None:
        """Merge one shard's segment maxima [S, F] into the top-k and the samples."""
        vals = seg_max.T  # [F, S]
        ids = seg_ids.expand(self.f, -1)
        both_v = torch.cat([self.top_val, vals], 1)
        both_i = torch.cat([self.top_seg, ids], 1)
        self.top_val, pick = both_v.topk(self.cfg.top_k, dim=1)
        self.top_seg = both_i.gather(1, pick)
        self.top_seg[self.top_val <= 0] = -1
        keys = torch.rand(vals.shape, generator=gen)
        active = vals > 0
        self.act_key, (self.act_val, self.act_seg) = _reservoir(
            self.act_key,
            (self.act_val, self.act_seg),
            keys.masked_fill(~active, math.inf),
            (vals, ids),
        )
        self.off_key, (self.off_seg,) = _reservoir(
            self.off_key, (self.off_seg,), keys.masked_fill(active, math.inf), (ids,)
        )

    def result(self) -> ScanResult:
        self.act_seg[~torch.isfinite(self.act_key)] = -1
        self.off_seg[~torch.isfinite(self.off_key)] = -1
        return ScanResult(
            n_pairs=self.n_pairs,
            n_active=self.n_active,
            sum_act=self.sum_act,
            max_act=self.max_act,
            hist=self.hist.view(self.f, HIST_BINS),
            top_val=self.top_val,
            top_seg=self.top_seg,
            active_val=self.act_val,
            active_seg=self.act_seg,
            inactive_seg=self.off_seg,
            segments=self.segments,
        )


def _reservoir(keys, kept: tuple, new_keys, new: tuple) -> tuple[torch.Tensor, tuple]:
    """Keep the entries with the smallest keys per row (priority sampling: a uniform
    sample of the entries with finite keys); returns (keys, kept tensors)."""
    all_keys = torch.cat([keys, new_keys], 1)
    out_keys, pick = all_keys.topk(keys.shape[1], dim=1, largest=False)
    outs = tuple(torch.cat([k, n], 1).gather(1, pick) for k, n in zip(kept, new, strict=True))
    return out_keys, outs


def scan(
    crosscoder: Crosscoder,
    normalizer: Normalizer,
    store: ActivationStore,
    cfg: ScanConfig | None = None,
    progress: bool = True,
    cache: EntryCache | None = None,
) -> ScanResult:
    """Stream every shard of `store` through `crosscoder` once (see the module docstring).

    With `cache`, the non-zero activations are also kept on disk (up to its byte limit) so
    that reading the examples afterwards needs no second encoding pass.
    """
    cfg = cfg or ScanConfig()
    state = _Scan(crosscoder.partition.n_features, cfg)
    crosscoder = crosscoder.eval()
    with ProgressBar("analyse", len(store), progress) as bar:
        for i in range(len(store.shards)):
            shard = store.load_shard(i, ("a", "b", "pair_window"))
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
            _scan_shard(crosscoder, normalizer, shard, i, state, gen, cache)
            bar.update(advance=int(shard["a"].shape[0]))
    return state.result()


class EntryCache:
    """Non-zero activations of scanned shards on disk: (segment, position, feature, value)."""

    def __init__(self, directory: str | Path, limit_bytes: int = 2 << 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.limit, self.used = limit_bytes, 0
        self.shards: set[int] = set()

    def save(self, shard: int, parts: list[tuple[torch.Tensor, ...]]) -> None:
        """Keep one shard's entries, unless the cache is full (that shard is re-encoded)."""
        seg, pos, feat, val = (torch.cat(p) for p in zip(*parts, strict=True))
        size = 16 * len(seg)
        if self.used + size > self.limit:
            return
        save_file(
            {"seg": seg, "pos": pos.int(), "feat": feat.int(), "val": val},
            str(self.directory / f"entries-{shard:06d}.safetensors"),
        )
        self.used += size
        self.shards.add(shard)

    def load(self, shard: int) -> dict[str, torch.Tensor]:
        """The cached entries of a shard (see `shards` for which are cached)."""
        return load_file(str(self.directory / f"entries-{shard:06d}.safetensors"))


def _scan_shard(crosscoder, normalizer, shard, number: int, state: _Scan, gen, cache) -> None:
    """Encode one shard in chunks; fold counts; merge its segments' maxima."""
    first_seg = len(state.segments)
    seg_local, pos = segment_rows(
        shard["pair_window"], state.cfg.segment_pairs, state.segments, number
    )
    n_seg = len(state.segments) - first_seg
    seg_max = torch.zeros(n_seg * state.f)
    x_a, x_b = shard["a"], shard["b"]
    parts = []
    with torch.inference_mode():
        for lo in range(0, x_a.shape[0], state.cfg.chunk_rows):
            hi = lo + state.cfg.chunk_rows
            a, b = normalizer.apply(x_a[lo:hi].float(), x_b[lo:hi].float())
            acts = crosscoder.encode(a, b)
            rows, feats = acts.nonzero(as_tuple=True)
            vals = acts[rows, feats]
            state.entries(feats, vals)
            seg = seg_local[lo:hi][rows]
            seg_max.scatter_reduce_(0, seg * state.f + feats, vals, "amax")
            if cache is not None:
                parts.append((seg + first_seg, pos[lo:hi][rows], feats, vals))
    if cache is not None and parts:
        cache.save(number, parts)
    state.n_pairs += x_a.shape[0]
    ids = torch.arange(first_seg, first_seg + n_seg, dtype=torch.int64)[None]
    state.segments_done(seg_max.view(n_seg, state.f), ids, gen)


def segment_rows(
    pair_window: torch.Tensor, size: int, segments: Segments, shard: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard-local segment index and position within the segment of every row; appends the
    shard's segments to `segments`."""
    windows = pair_window.numpy()
    seg = np.empty(len(windows), dtype=np.int64)
    pos = np.empty(len(windows), dtype=np.int64)
    n = 0
    # Rows of a window are contiguous and in pair order (the writer stores whole windows).
    bounds = np.flatnonzero(np.diff(windows)) + 1
    for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(windows)], strict=True):
        for s in range(start, end, size):
            e = min(s + size, end)
            segments.add(int(windows[start]), int(s - start), int(e - start), shard)
            seg[s:e] = n
            pos[s:e] = np.arange(e - s)
            n += 1
    return torch.from_numpy(seg), torch.from_numpy(pos)
