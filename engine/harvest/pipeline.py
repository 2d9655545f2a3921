"""`harvest`: paired residual-stream activations of two models on the same texts.

Texts stream from the configured sources; each document is rendered and tokenized for both
models, aligned, and cut into windows (engine.harvest.windows). Windows are gathered into
chunks; each model runs over the chunk in length-sorted, padded batches, stopped at its
captured layer; the activations at the aligned positions go to the activation store, a
shard at a time. Rerunning the same command resumes after the last recorded shard.

Split across N processes (ranks), every rank reads and tokenizes the whole stream, so all
ranks number the windows, drop duplicates and count pairs exactly as one process would,
but runs the models only on its own documents (number % N == rank) and writes its own
shards and manifest (engine.activations). Together they store the same pairs as one
process with the same settings.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.activations.layout import resumed_manifest
from engine.activations.manifest import StoreError, check_compatible, check_rank
from engine.activations.reader import read_manifest
from engine.activations.shards import WindowRecord
from engine.activations.stats import bytes_per_pair, median_norms
from engine.activations.writer import StoreWriter
from engine.config import HarvestConfig, to_dict
from engine.harvest.forward import (
    CapturedModel,
    chunk_budget,
    load_pair,
    prepare,
    window_activations,
)
from engine.harvest.text import mixture_of
from engine.harvest.windows import StreamWindow, window_stream
from engine.interrupts import deferred_interrupts
from engine.models.capture import capture_residual
from engine.models.layers import resolve_layer
from engine.models.loading import LoadedModel
from engine.progress import ProgressBar
from engine.specs import ModelSpec, PairSpec


@dataclass(frozen=True)
class HarvestResult:
    """What a harvest produced: where, how many pairs, how fast."""

    path: Path
    pairs: int
    seconds: float
    new_pairs: int
    manifest: dict[str, Any]  # this rank's (the store's for one process)
    rank: int = 0
    world_size: int = 1

    @property
    def pairs_per_second(self) -> float:
        return self.new_pairs / self.seconds if self.seconds > 0 else float("nan")


def harvest(
    cfg: HarvestConfig,
    out: str | Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    models: tuple[LoadedModel, LoadedModel] | None = None,
    capture: Callable[..., torch.Tensor] = capture_residual,
    rank: int = 0,
    world_size: int = 1,
) -> HarvestResult:
    """Harvest aligned activation pairs into the store at `out` (resuming it if present).

    `models` replaces loading cfg.model_a / cfg.model_b (e.g. models built in code);
    `capture(model, layer, input_ids, attention_mask)` returns the residual stream (the
    benchmark swaps in a full forward pass). With `world_size` > 1 this process is rank
    `rank` of a harvest split by documents; cfg.max_pairs counts the pairs of all ranks.
    """
    check_rank(rank, world_size)
    # Everything that can be checked without the models is checked first: loading two
    # large models takes minutes, and a typo in a source path must not cost them.
    mixture_of(cfg.sources, cfg.weights, check=True)  # local files: empty is an error, not 0 pairs
    names = (cfg.model_a, cfg.model_b) if models is None else (models[0].name, models[1].name)
    _check_out(cfg, Path(out), names, fresh, rank, world_size)
    if models is None:
        models = load_pair(cfg, progress, rank, world_size)
    started = time.perf_counter()
    a, b = prepare(models[0], cfg.layer_a, capture), prepare(models[1], cfg.layer_b, capture)
    writer = StoreWriter(
        out, _header(cfg, a, b), cfg.store_dtype, cfg.shard_pairs, fresh, rank, world_size
    )
    before = writer.pairs
    stream = window_stream(cfg, a.side, b.side)
    reached = _finished(writer, cfg.max_pairs)
    total = cfg.max_pairs
    label = "harvest" if world_size == 1 else f"harvest (rank {rank} of {world_size})"
    with ProgressBar(label, total, progress, completed=min(before, total)) as bar:
        try:
            if not reached:
                reached = _run(cfg, stream, writer, a, b, _Meter(bar, before), rank, world_size)
        except KeyboardInterrupt:
            writer.close(complete=False)
            raise
    # Done either way: max_pairs reached, or the sources ran out (exhausted) before it.
    state = writer.manifest["progress"]
    state["exhausted"] = not reached
    if reached:
        state["max_pairs_reached"] = max(state.get("max_pairs_reached", 0), cfg.max_pairs)
    manifest = writer.close(complete=True)
    return HarvestResult(
        Path(out),
        writer.pairs,
        time.perf_counter() - started,
        writer.pairs - before,
        manifest,
        rank,
        world_size,
    )


def _finished(writer: StoreWriter, max_pairs: int) -> bool:
    """Whether an earlier run already harvested everything up to max_pairs."""
    state = writer.manifest["progress"]
    earlier = state["complete"] and state.get("max_pairs_reached", -1) >= max_pairs
    return earlier or writer.pairs >= max_pairs


def _check_out(
    cfg: HarvestConfig,
    out: Path,
    names: tuple[str, str],
    fresh: bool,
    rank: int,
    world_size: int,
) -> None:
    """Refuse, before the models load, an output folder the harvest cannot write, and a store
    to resume that was harvested with other models, layers or data settings."""
    manifest = resumed_manifest(out, fresh, rank, world_size)
    if manifest is None:
        return
    check_compatible(manifest, {"data": _data_settings(cfg)[0]}, cfg.store_dtype, out)
    models = PairSpec.from_dict(manifest.get("models"))
    for key, name, layer in (("a", names[0], cfg.layer_a), ("b", names[1], cfg.layer_b)):
        stored = models[key]
        wanted: dict[str, Any] = {"name": name}
        # The same model has the stored number of layers; a layer that does not resolve
        # (or a store that does not record n_layers) is reported against the loaded model.
        with contextlib.suppress(KeyError, TypeError, ValueError):
            wanted["layer"] = resolve_layer(int(stored.n_layers), layer)
        for field, value in wanted.items():
            if getattr(stored, field) != value:
                raise StoreError(
                    f"the store at {out} was harvested with model {key.upper()} "
                    f"{field} {getattr(stored, field)!r}, not {value!r}; pass --fresh to start "
                    "it over, or choose another output directory"
                )


def _data_settings(cfg: HarvestConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings that decide which pairs are harvested, and those that change only speed
    or volume."""
    data = to_dict(cfg)
    for name in ("model_a", "model_b", "layer_a", "layer_b"):
        data.pop(name)
    if not data["answer_pairs"]:  # stores from before the option resume as they were
        data.pop("answer_pairs")
    speed = ("max_pairs", "batch_tokens", "shard_pairs", "device", "model_dtype", "store_dtype")
    return data, {k: data.pop(k) for k in speed}


def _header(cfg: HarvestConfig, a: CapturedModel, b: CapturedModel) -> dict[str, Any]:
    """What must match for a store to be resumed, plus provenance."""
    data, run = _data_settings(cfg)
    models = PairSpec(
        ModelSpec.from_loaded(a.loaded, a.layer), ModelSpec.from_loaded(b.loaded, b.layer)
    )
    provenance = {
        "run": run,
        "modeldiff": _version("modeldiff"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "devices": {k: str(m.loaded.device) for k, m in (("a", a), ("b", b))},
        "dtypes": {k: str(m.loaded.dtype) for k, m in (("a", a), ("b", b))},
    }
    return {"models": models.to_dict(), "data": data, "provenance": provenance}


def _version(dist: str) -> str:
    """Installed version of a distribution, or "unknown"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Meter:
    """Progress bar: how far the stream has got (pairs of all ranks), and tokens/s and
    pairs/s of this process since the start of this run."""

    def __init__(self, bar: ProgressBar, before: int) -> None:
        self.bar, self.before, self.start = bar, before, time.perf_counter()
        self.tokens = 0

    def update(self, position: int, pairs: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(
            completed=min(position, self.bar.total),
            status=f"{self.tokens / elapsed:,.0f} tok/s  {(pairs - self.before) / elapsed:,.0f} "
            "pairs/s",
        )


def _run(
    cfg: HarvestConfig,
    stream: Iterator[StreamWindow],
    writer: StoreWriter,
    a: CapturedModel,
    b: CapturedModel,
    meter: _Meter,
    rank: int = 0,
    world_size: int = 1,
) -> bool:
    """Consume this rank's windows of the stream into the writer; True once max_pairs is
    reached.

    Every window's pair count is known before any forward pass, so each rank counts the
    pairs of all ranks in stream order and stops after the window where one process would.
    """
    chunk: list[tuple[WindowRecord, dict[str, Any]]] = []
    chunk_tokens = position = 0
    budget = chunk_budget(cfg.batch_tokens)
    for window, counts, duplicate, document in stream:
        useful = not duplicate and len(window) > 0
        position += len(window) if useful else 0
        last = useful and position >= cfg.max_pairs
        if document % world_size != rank:
            writer.pass_over(window.index)
        elif writer.is_done(window.index):
            pass
        elif not useful:
            with deferred_interrupts():  # the writer's queue must never be half-updated
                writer.skip(window, counts)
        else:
            chunk.append((window, counts))
            chunk_tokens += len(window.ids_a) + len(window.ids_b)
        if last or chunk_tokens >= budget:
            _flush_chunk(cfg, chunk, writer, a, b)
            meter.update(position, writer.pairs, chunk_tokens)
            chunk, chunk_tokens = [], 0
            if last:
                return True
    _flush_chunk(cfg, chunk, writer, a, b)
    meter.update(position, writer.pairs, chunk_tokens)
    return False


def _flush_chunk(cfg, chunk, writer: StoreWriter, a: CapturedModel, b: CapturedModel) -> None:
    """Run both models over a chunk of windows and hand the pairs to the writer."""
    if not chunk:
        return
    acts_a, acts_b = window_activations([w for w, _ in chunk], a, b, cfg.batch_tokens)
    for (window, counts), x_a, x_b in zip(chunk, acts_a, acts_b, strict=True):
        with deferred_interrupts():  # the writer's queue must never be half-updated
            writer.add(window, x_a, x_b, counts)


def summary(result: HarvestResult) -> str:
    """One-paragraph report of a harvest for the command line."""
    m = result.manifest
    al = m["alignment"]
    na, nb = median_norms(m) if m["shards"] else (float("nan"), float("nan"))
    who = "" if result.world_size == 1 else f"rank {result.rank} of {result.world_size}: "
    lines = [
        f"{who}{result.pairs:,} aligned pairs in {len(m['shards'])} shards at {result.path} "
        f"({bytes_per_pair(m):,.0f} bytes/pair, {m['dtype']})",
        f"this run: {result.new_pairs:,} pairs in {result.seconds:,.1f} s after loading "
        f"({result.pairs_per_second:,.0f} pairs/s)",
        f"documents {al.get('documents', 0):,}, windows {al.get('windows', 0):,} "
        f"(duplicates {al.get('duplicate_windows', 0):,}), tokens A {al.get('tokens_a', 0):,} "
        f"/ B {al.get('tokens_b', 0):,}, failed documents {al.get('failed_documents', 0)}",
        f"median norms: A {na:,.2f}, B {nb:,.2f}",
    ]
    if m["progress"].get("exhausted"):
        lines.append("the text sources ran out before max_pairs")
    if result.world_size > 1:
        store = read_manifest(result.path)
        done = store["ranks"]["complete"]
        waiting = sorted(set(range(result.world_size)) - set(done))
        lines.append(
            f"the store holds {store['stats']['count']:,} pairs; ranks complete: "
            f"{len(done)} of {result.world_size}"
            + (f" (still to finish: {', '.join(map(str, waiting))})" if waiting else "")
        )
    return "\n".join(lines)
