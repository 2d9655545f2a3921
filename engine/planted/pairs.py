"""Paired activations in memory, optionally with a concept planted into one model's residual.

Every pair has a *global index*: its row in the store, shards taken in manifest order. The
residual planting is decided per global index by a seeded hash, so the same pairs are
planted in every epoch, whatever the batch order, and in the evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.activations import ActivationStore
from engine.planted import PlantedError

Batch = tuple[torch.Tensor, torch.Tensor]
MODELS = ("a", "b")
# Held in memory whole; beyond this, ask for fewer pairs rather than start swapping.
MAX_BYTES = 8 << 30
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def check_model(model: str) -> str:
    """`model` if it is 'a' or 'b', else a clear error."""
    if model not in MODELS:
        raise PlantedError(f"the planted model must be 'a' or 'b', got {model!r}")
    return model


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a well-mixed 64-bit hash of each element (uint64 arrays)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def planted_mask(indices: torch.Tensor | np.ndarray, rate: float, seed: int) -> torch.Tensor:
    """Bool per global pair index: Bernoulli(rate), fixed by (seed, index) alone."""
    if not 0 <= rate <= 1:
        raise PlantedError(f"rate must be a fraction in [0, 1], got {rate}")
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    key = _splitmix64(np.array([seed], dtype=np.int64).astype(np.uint64))
    uniform = (_splitmix64(idx ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy(uniform < rate)


def random_direction(d: int, seed: int) -> torch.Tensor:
    """A seeded random unit vector in R^d (float32)."""
    # Its own stream, so the direction does not move when the mask's hash changes.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    u = torch.randn(d, generator=gen)
    return u / u.norm()


def median_norm(x: torch.Tensor, chunk: int = 65_536) -> float:
    """Median L2 norm of the rows of x (computed in float32, a chunk at a time)."""
    norms = torch.cat([x[i : i + chunk].float().norm(dim=1) for i in range(0, len(x), chunk)])
    return float(norms.median())


@dataclass(frozen=True)
class ResidualPlant:
    """A vector added to one model's activations on the pairs the mask picks."""

    model: str  # "a" or "b"
    vector: torch.Tensor  # [d] raw units: strength x median norm x unit direction
    mask: torch.Tensor  # bool [n_pairs]


def residual_plant(
    x: torch.Tensor,
    model: str,
    strength: float,
    rate: float,
    seed: int,
    mask: torch.Tensor | None = None,
) -> ResidualPlant:
    """The planting of `strength` x median norm of `x` along a seeded direction, on the
    pairs `mask` picks (default: a seeded random `rate` of them)."""
    if not strength >= 0:
        raise PlantedError(f"strength must be >= 0, got {strength}")
    vector = strength * median_norm(x) * random_direction(x.shape[1], seed)
    if mask is None:
        mask = planted_mask(np.arange(x.shape[0]), rate, seed)
    return ResidualPlant(check_model(model), vector, mask.bool())


class PlantedPairs:
    """In-memory paired activations with trigger labels; a trainer source (`batches`).

    With `plant`, the rows it picks get its vector added to its model's activations, in
    training batches and in `rows` alike. `train_rows` (global indices) limits training to
    part of the pairs so the rest can be held out for evaluation.
    """

    def __init__(
        self,
        x_a: torch.Tensor,
        x_b: torch.Tensor,
        labels: torch.Tensor,
        plant: ResidualPlant | None = None,
        train_rows: torch.Tensor | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        n = x_a.shape[0]
        if x_b.shape[0] != n or labels.shape != (n,):
            raise PlantedError(
                f"{n} A rows, {x_b.shape[0]} B rows and {tuple(labels.shape)} labels: "
                "every pair needs one of each"
            )
        if plant is not None and plant.mask.shape != (n,):
            raise PlantedError(f"the planting mask covers {plant.mask.shape[0]} of {n} pairs")
        self.x_a, self.x_b, self.labels, self.plant = x_a, x_b, labels.bool(), plant
        self.train_rows = torch.arange(n) if train_rows is None else train_rows.long()
        # Kept so the trainer records which models the store came from.
        self.manifest = manifest

    def __len__(self) -> int:
        return self.x_a.shape[0]

    def rows(self, idx: torch.Tensor) -> Batch:
        """Activations (float32, planted) of the pairs with global indices `idx`."""
        x_a, x_b = self.x_a[idx].float(), self.x_b[idx].float()
        if self.plant is not None:
            target = x_a if self.plant.model == "a" else x_b
            hit = self.plant.mask[idx]
            target[hit] += self.plant.vector.to(target.dtype)
        return x_a, x_b

    def batches(self, batch_size: int, start_step: int = 0, seed: int = 0) -> Iterator[Batch]:
        """Shuffled batches of the training rows; batch s is the same from step 0 or s."""
        n = len(self.train_rows)
        if not 0 < batch_size <= n:
            raise PlantedError(f"batch size {batch_size} does not fit the {n} training pairs")
        per_epoch = n // batch_size
        step = start_step
        while True:
            epoch, within = divmod(step, per_epoch)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = self.train_rows[torch.randperm(n, generator=gen)]
            for i in range(within, per_epoch):
                yield self.rows(order[i * batch_size : (i + 1) * batch_size])
            step = (epoch + 1) * per_epoch

    def median_norms(self) -> tuple[float, float]:
        """Median activation norm of each model (before planting)."""
        return median_norm(self.x_a), median_norm(self.x_b)


def load_store_pairs(
    store: ActivationStore, max_pairs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' activations of a store (the first `max_pairs`), in the store's dtype."""
    n = len(store) if max_pairs is None else min(max_pairs, len(store))
    width = 2 if store.manifest["dtype"] in ("bfloat16", "float16") else 4
    need = n * (store.d_a + store.d_b) * width
    if need > MAX_BYTES:
        raise PlantedError(
            f"{n:,} pairs need {need / 2**30:.1f} GiB in memory; pass --max-pairs to use fewer"
        )
    parts_a, parts_b, have = [], [], 0
    for i in range(len(store.shards)):
        if have >= n:
            break
        t = store.load_shard(i, ("a", "b"))
        parts_a.append(t["a"])
        parts_b.append(t["b"])
        have += t["a"].shape[0]
    return torch.cat(parts_a)[:n], torch.cat(parts_b)[:n]


def open_store(path: str | Path) -> ActivationStore:
    """The activation store at `path`, with a clear error when there is none."""
    if not Path(path).is_dir():
        raise PlantedError(
            f"no activation store at {path}; make one with `modeldiff harvest --out {path}`"
        )
    return ActivationStore(path)
