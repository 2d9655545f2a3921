"""Sources of paired activation batches and their validation.

The trainer consumes any object with ``batches(batch_size, start_step, seed)`` returning
an iterator of ``(x_a [n, d_a], x_b [n, d_b])``. Batch ``s`` must be the same whether
iteration started at 0 or at ``s``: that is what makes resumed training equal to an
uninterrupted run.

In data-parallel training rank r of W trains on rows ``[n r / W, n (r + 1) / W)`` of each
global batch. A source may offer ``rank_batches(batch_size, start_step, seed, rank,
world_size)`` yielding only those rows (so a rank reads no more than its share); any other
source is read whole by every rank and sliced.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from engine.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(UserError, ValueError):
    """Paired activations have the wrong shape or content."""


class PairedSource(Protocol):
    """Anything the trainer can draw paired batches from."""

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0) -> Iterator[Batch]: ...


class TensorPairs:
    """In-memory paired activations, shuffled afresh each epoch with a seeded permutation."""

    def __init__(self, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        check_pair_shapes(x_a, x_b)
        self.x_a, self.x_b = x_a, x_b

    def __len__(self) -> int:
        return self.x_a.shape[0]

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0) -> Iterator[Batch]:
        return self.rank_batches(batch_size, start_step, seed, 0, 1)

    def rank_batches(
        self, batch_size: int, start_step: int, seed: int, rank: int, world_size: int
    ) -> Iterator[Batch]:
        """Rank `rank`'s slice of each global batch, gathering only those rows."""
        n = len(self)
        if batch_size > n:
            raise DataError(f"batch_size {batch_size} exceeds the {n} pairs available")
        per_epoch = n // batch_size
        mine = rank_slice(batch_size, rank, world_size)
        step = start_step
        while True:
            epoch, within = divmod(step, per_epoch)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            for i in range(within, per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size][mine]
                yield self.x_a[idx], self.x_b[idx]
            step = (epoch + 1) * per_epoch


class IterableSource:
    """Wraps a re-iterable of ready-made batches; resuming skips the batches already used."""

    def __init__(self, iterable: Iterable[Batch]) -> None:
        self.iterable = iterable

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0) -> Iterator[Batch]:
        return itertools.islice(iter(self.iterable), start_step, None)


class RankSlice:
    """One rank's share of every global batch of another source."""

    def __init__(self, source: PairedSource, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0) -> Iterator[Batch]:
        if hasattr(self.source, "rank_batches"):
            return self.source.rank_batches(
                batch_size, start_step, seed, self.rank, self.world_size
            )
        return self._sliced(batch_size, start_step, seed)

    def _sliced(self, batch_size: int, start_step: int, seed: int) -> Iterator[Batch]:
        for x_a, x_b in self.source.batches(batch_size, start_step, seed):
            mine = rank_slice(x_a.shape[0], self.rank, self.world_size)
            yield x_a[mine], x_b[mine]


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rows of an n-row global batch that rank `rank` of `world_size` trains on."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def as_source(data) -> PairedSource:
    """Accept a PairedSource, a (x_a, x_b) tensor pair, or an iterable of batches."""
    if hasattr(data, "batches"):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return TensorPairs(*data)
    if isinstance(data, Iterable):
        return IterableSource(data)
    raise TypeError(f"cannot train on {type(data).__name__}: expected paired batches")


def check_pair_shapes(
    x_a: torch.Tensor, x_b: torch.Tensor, d_a: int | None = None, d_b: int | None = None
) -> None:
    """Raise a clear error for mismatched row counts or unexpected widths."""
    if x_a.ndim != 2 or x_b.ndim != 2:
        raise DataError(
            f"activations must be 2-D [n, d]; got shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    if x_a.shape[0] != x_b.shape[0]:
        raise DataError(
            f"paired batches need the same number of rows: model A has {x_a.shape[0]}, "
            f"model B has {x_b.shape[0]}"
        )
    for name, x, d in (("A", x_a, d_a), ("B", x_b, d_b)):
        if d is not None and x.shape[1] != d:
            raise DataError(f"model {name} activations have width {x.shape[1]}, expected {d}")


def finite_rows(x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """Boolean mask of rows where both models' vectors are entirely finite."""
    return torch.isfinite(x_a).all(dim=1) & torch.isfinite(x_b).all(dim=1)
