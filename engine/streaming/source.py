"""The live source of a streamed run: paired activations cut from the window stream in
shuffled blocks; batch s is the same whether iteration starts at 0 or at s.

The stream is the harvest's own window stream (`engine.harvest.windows.window_stream`) of
the run's text sources, less the documents of the analysis store (its windows and the rest
of its last document) and the duplicate and empty windows the harvest drops too. Its pairs,
in stream order, are cut into consecutive blocks of `buffer_pairs` pairs. A window that
straddles a block boundary is split: its first pairs end one block, the rest start the
next. The models run over the whole window for both blocks, so each block is computed from
its own windows alone, in the same forward batches however iteration started. Block i's
rows are shuffled with a permutation seeded by (seed, i); step s takes batch
s mod (buffer_pairs / batch_size) of block s // (buffer_pairs / batch_size).

Exact resume without saving buffers: every window's pair count is known after tokenisation
and alignment, before any forward pass, so starting at block i replays the tokenisation
up to block i's first window (no forward pass) and runs the models from there. The blocks
the normaliser fit reads stay in memory until training has used them, so the fit and the
first steps run the models once.

Under torchrun, rank r of W streams only the documents whose number % W == r (as a split
harvest does) into its own blocks of buffer_pairs / W pairs and yields batch_size / W rows
a step: the same distribution as one process, but not the same rows in each global batch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.activations.reader import ActivationStore, read_manifest
from engine.activations.shards import WindowRecord
from engine.activations.split import split_store
from engine.config import HarvestConfig, StreamConfig
from engine.crosscoder.training import NORMALIZER_FIT_ROWS
from engine.harvest.forward import CapturedModel, chunk_budget, window_activations
from engine.harvest.windows import window_stream
from engine.progress import PLAIN_EVERY

Batch = tuple[torch.Tensor, torch.Tensor]
# Block i of seed s is shuffled with seed s x stride + i (the stores' epochs use the same).
SEED_STRIDE = 1_000_003
BYTES_PER_VALUE = 4  # blocks hold float32 activations


@dataclass(frozen=True)
class Planned:
    """A training window of one rank's stream and the row of its first pair in that stream."""

    window: WindowRecord
    first: int
    document: int  # number of its document in the text stream

    @property
    def end(self) -> int:
        """The row after its last pair."""
        return self.first + len(self.window)


# A window's pairs [start, stop) that belong to a block.
Piece = tuple[WindowRecord, int, int]


@dataclass
class Block:
    """One block of a rank's stream, its rows shuffled; shorter than asked where the text
    ran out."""

    x_a: torch.Tensor
    x_b: torch.Tensor

    def __len__(self) -> int:
        return self.x_a.shape[0]


@dataclass
class HeldOut:
    """The validation pairs (windows of the analysis store) and the source to train on, as
    `engine.crosscoder.validation.split` expects them."""

    train: StreamSource
    x_a: torch.Tensor
    x_b: torch.Tensor
    record: dict[str, Any]

    def info(self) -> dict[str, Any]:
        """What crosscoder.json records under "validation"."""
        return self.record


def stored_windows(manifest: dict[str, Any]) -> int:
    """How many windows of the stream (0 to n - 1) the analysis store consumed."""
    return max((int(end) for _, end in manifest["progress"]["done_windows"]), default=0)


class _Lines:
    """Progress as plain lines on stderr, at most one every PLAIN_EVERY seconds.

    Not a live bar: blocks are made while training's bar is live, and rich shows one live
    display at a time (a line printed meanwhile appears above the bar).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = self.last = time.monotonic()

    def restart(self) -> None:
        """Measure rates from now (the next line is still due PLAIN_EVERY after the last)."""
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def due(self) -> bool:
        """Whether a line is due (and then it counts as printed)."""
        now = time.monotonic()
        if not self.enabled or now - self.last < PLAIN_EVERY:
            return False
        self.last = now
        return True

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


class _Cursor:
    """A pass over one rank's planned windows, positioned at the start of block `block`."""

    def __init__(self, windows: Iterator[Planned]) -> None:
        self.windows = windows
        self.pending: Planned | None = None  # a window read but not used up
        self.block = 0

    def _next(self) -> Planned | None:
        item, self.pending = self.pending, None
        return item if item is not None else next(self.windows, None)

    def seek(self, row: int, lines: _Lines) -> None:
        """Pass over (tokenisation only) the windows that end at or before `row`."""
        while (item := self._next()) is not None:
            if item.end > row:
                self.pending = item
                return
            if lines.due():
                lines.say(
                    f"stream: replaying the text to pair {row:,} (no forward passes): "
                    f"{item.end:,} pairs, {item.end / lines.elapsed():,.0f} pairs/s"
                )

    def take(self, lo: int, hi: int) -> list[Piece]:
        """The windows holding rows [lo, hi) (after `seek(lo)`), each with the part of its
        pairs in that range; fewer rows where the text runs out."""
        pieces: list[Piece] = []
        while (item := self._next()) is not None:
            pieces.append((item.window, max(lo - item.first, 0), min(hi, item.end) - item.first))
            if item.end >= hi:
                if item.end > hi:  # straddles the boundary: its other pairs start the next
                    self.pending = item
                break
        return pieces


class StreamSource:
    """The trainer's paired-batch source (engine.crosscoder.data) computed live from two
    models, with the analysis store at `store` as its validation hold-out."""

    def __init__(
        self,
        cfg: HarvestConfig,
        stream: StreamConfig,
        models: tuple[CapturedModel, CapturedModel],
        store: str | Path,
        *,
        progress: bool = True,
        record: dict[str, Any] | None = None,
        run_entries: tuple[str, ...] = (),
    ) -> None:
        self.cfg, self.stream = cfg, stream
        self.a, self.b = models
        self.store = Path(store)
        self.manifest = read_manifest(self.store)  # training records its "models"
        self.store_windows = stored_windows(self.manifest)
        self.progress = progress
        self.record = dict(record or {})
        # Entries of the run directory that belong to the run but that --fresh keeps
        # (engine.crosscoder.checkpoint.clear_run): the store and the stream's settings.
        self.run_entries = run_entries
        self.ran_out: str | None = None  # why the last iteration ended, for the trainer
        self._blocks: dict[tuple[int, int, int, int], Block] = {}
        self._cursors: dict[tuple[int, int], _Cursor] = {}
        self._announced = False
        self._lines = _Lines(progress)

    @property
    def d_a(self) -> int:
        return self.a.loaded.d_model

    @property
    def d_b(self) -> int:
        return self.b.loaded.d_model

    def run_record(self) -> dict[str, Any]:
        """What the run's crosscoder.json records about its data (the stream, its store)."""
        return {"stream": self.record} if self.record else {}

    def hold_out(self, n_pairs: int) -> HeldOut | None:
        """Whole windows of the analysis store holding at least `n_pairs` pairs to validate
        on (the whole store is held out of training; these are measured)."""
        held = split_store(ActivationStore(self.store), n_pairs, whole=True)
        if held is None:
            return None
        return HeldOut(self, held.x_a, held.x_b, {**held.info(), "streamed": True})

    def training_windows(self, rank: int = 0, world_size: int = 1) -> Iterator[Planned]:
        """This rank's training windows in stream order, each with the row of its first
        pair in the rank's stream: the text tokenised and aligned, no forward pass."""
        row, store_document = 0, None
        for window, _, duplicate, document in window_stream(self.cfg, self.a.side, self.b.side):
            if window.index < self.store_windows:
                store_document = document  # ends as the store's last document
                continue
            mine = document % world_size == rank
            if document == store_document or duplicate or not len(window) or not mine:
                continue
            yield Planned(window, row, document)
            row += len(window)

    # batches -----------------------------------------------------------------------------

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0) -> Iterator[Batch]:
        """Batches of `batch_size` pairs from step `start_step` on (float32, CPU)."""
        return self.rank_batches(batch_size, start_step, seed, 0, 1)

    def rank_batches(
        self, batch_size: int, start_step: int, seed: int, rank: int, world_size: int
    ) -> Iterator[Batch]:
        """Rank `rank`'s batch_size / world_size rows of each step, from its own documents;
        ends (setting `ran_out`) where the text runs out."""
        self.stream.check_batch(batch_size, world_size)
        self._announce(batch_size, world_size)
        return self._batches(batch_size, start_step, seed, rank, world_size)

    def _batches(
        self, batch_size: int, step: int, seed: int, rank: int, world_size: int
    ) -> Iterator[Batch]:
        rows = self.stream.buffer_pairs // world_size
        per_step = batch_size // world_size
        steps_per_block = self.stream.buffer_pairs // batch_size
        while True:
            index, within = divmod(step, steps_per_block)
            block = self._block(rank, world_size, seed, index, rows)
            lo = within * per_step
            if len(block) < lo + per_step:
                allowed = index * steps_per_block + len(block) // per_step
                self._record_end(index * rows + len(block), allowed, batch_size, rank, world_size)
                return
            yield block.x_a[lo : lo + per_step], block.x_b[lo : lo + per_step]
            step += 1

    def _record_end(self, pairs: int, steps: int, batch: int, rank: int, world: int) -> None:
        who = "" if world == 1 else f" of rank {rank} of {world}"
        self.ran_out = (
            f"the text ran out after {pairs:,} training pairs{who} (the documents after the "
            f"analysis store's {self.manifest['stats']['count']:,} pairs), enough for "
            f"{steps:,} steps of batch {batch:,}; train for at most {steps:,} steps "
            "(--steps), or add text to the sources and start a new run"
        )

    def _announce(self, batch_size: int, world_size: int) -> None:
        """Say once what a block holds and what it costs in memory."""
        if self._announced or not self.progress:
            return
        self._announced = True
        rows = self.stream.buffer_pairs // world_size
        size = rows * (self.d_a + self.d_b) * BYTES_PER_VALUE
        shown = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        per_rank = f" per rank ({world_size} ranks)" if world_size > 1 else ""
        print(
            f"streaming: shuffled blocks of {rows:,} pairs{per_rank}, "
            f"{self.stream.buffer_pairs // batch_size:,} steps of {batch_size:,} each; a block "
            f"holds {shown} of float32 activations",
            file=sys.stderr,
        )

    # blocks ------------------------------------------------------------------------------

    def _block(self, rank: int, world: int, seed: int, index: int, rows: int) -> Block:
        """Block `index` of a rank's stream, from memory when it was just made."""
        key = (rank, world, seed, index)
        if key in self._blocks:
            return self._blocks[key]
        # Keep the blocks the normaliser fit read until training has passed them; otherwise
        # only the block in use (and none of another stream: the fit's, under torchrun).
        warm = math.ceil(NORMALIZER_FIT_ROWS / rows)
        for old in list(self._blocks):
            if old[:3] != key[:3] or (old[3] < index and index >= warm):
                del self._blocks[old]
        block = self._make_block(rank, world, seed, index, rows)
        self._blocks[key] = block
        return block

    def _make_block(self, rank: int, world: int, seed: int, index: int, rows: int) -> Block:
        """Run the models over block `index`'s windows and shuffle its rows."""
        # A cursor at or before the block moves on; one past it starts the text over. It is
        # taken out while in use: an interrupted block leaves it half-moved.
        cursor = self._cursors.pop((rank, world), None)
        if cursor is None or cursor.block > index:
            cursor = _Cursor(self.training_windows(rank, world))
        lines = self._lines
        lines.restart()
        cursor.seek(index * rows, lines)
        lines.restart()  # the forward passes' rates
        pieces = cursor.take(index * rows, (index + 1) * rows)
        cursor.block = index + 1
        n = sum(stop - start for _, start, stop in pieces)
        gen = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
        # Row i of the block in stream order goes to place[i] of the shuffled block (the
        # inverse permutation), so it is written there directly, with no second copy.
        place = torch.argsort(torch.randperm(n, generator=gen))
        block = Block(torch.empty(n, self.d_a), torch.empty(n, self.d_b))
        self._forward(pieces, block, place, index, lines)
        self._cursors[(rank, world)] = cursor
        return block

    def _forward(
        self, pieces: list[Piece], block: Block, place: torch.Tensor, index: int, lines: _Lines
    ) -> None:
        """Fill `block` with the pieces' activations, chunk by chunk of windows."""
        budget = chunk_budget(self.cfg.batch_tokens)
        chunk: list[Piece] = []
        tokens = done = seen_tokens = 0
        for i, piece in enumerate(pieces):
            chunk.append(piece)
            tokens += len(piece[0].ids_a) + len(piece[0].ids_b)
            if tokens < budget and i < len(pieces) - 1:
                continue
            done = self._run_chunk(chunk, block, place, done)
            seen_tokens += tokens
            chunk, tokens = [], 0
            if lines.due():
                lines.say(
                    f"stream block {index}: {done:,}/{len(block):,} pairs, "
                    f"{done / lines.elapsed():,.0f} pairs/s and "
                    f"{seen_tokens / lines.elapsed():,.0f} tok/s through both models"
                )

    def _run_chunk(self, chunk: list[Piece], block: Block, place: torch.Tensor, row: int) -> int:
        """Both models over a chunk of windows; their pieces' rows go into the block from
        stream row `row` on; returns the row after them."""
        windows = [window for window, _, _ in chunk]
        acts_a, acts_b = window_activations(windows, self.a, self.b, self.cfg.batch_tokens)
        for (_, start, stop), x_a, x_b in zip(chunk, acts_a, acts_b, strict=True):
            to = place[row : row + stop - start]
            block.x_a[to] = x_a[start:stop]
            block.x_b[to] = x_b[start:stop]
            row += stop - start
        return row
