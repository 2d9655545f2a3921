"""The null of the effect measure: random directions drawn from each model's activation
covariance, and a value's standing among them (z-score, percentile).

Directions are Gaussian with the covariance of the model's own residual activations (rows
of the run's activation store, outlier rows left out), not isotropic: an isotropic
direction mostly points where the model never writes, and would make every feature look
special. Each is steered like a feature (iso-KL, the stitched copy in the other model), so
its exclusivity says what a vector with no feature behind it earns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engine.errors import ConfigError

SAMPLE_ROWS = 4096
OUTLIER_NORM = 3.0  # rows above this x the median norm are massive-activation tokens


def store_sample(
    store: str | Path, rows: int = SAMPLE_ROWS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Up to `rows` paired activations of a store, float32, outlier rows left out."""
    from engine.activations import ActivationStore

    path = Path(store)
    if not path.exists():
        raise ConfigError(
            f"the activation store {path} is missing; the null of random directions is drawn "
            "from it: pass the run's store (--store)"
        )
    source = ActivationStore(path)
    batch = min(rows, len(source))
    x_a, x_b = next(iter(source.batches(batch, 0, seed)))
    x_a, x_b = x_a.float(), x_b.float()
    keep = torch.isfinite(x_a).all(1) & torch.isfinite(x_b).all(1)
    for x in (x_a, x_b):
        norms = x.norm(dim=1)
        keep &= norms <= OUTLIER_NORM * norms[keep].median()
    return {"a": x_a[keep], "b": x_b[keep]}


def random_directions(sample: torch.Tensor, n: int, seed: int, power: float = 1.0) -> torch.Tensor:
    """`n` Gaussian directions [n, d] with the covariance of the rows of `sample` raised to
    `power` (1: the activation covariance; 0: isotropic; between: flatter), seeded."""
    if sample.shape[0] < 2:
        raise ConfigError("the null needs at least two activation rows to estimate a covariance")
    centred = sample.double() - sample.double().mean(0)
    gen = torch.Generator().manual_seed(int(seed))
    if power == 1.0:
        weights = torch.randn(n, sample.shape[0], generator=gen, dtype=torch.float64)
        return (weights @ centred / sample.shape[0] ** 0.5).float()
    evals, evecs = torch.linalg.eigh(centred.T @ centred / sample.shape[0])
    z = torch.randn(n, sample.shape[1], generator=gen, dtype=torch.float64)
    return ((z * evals.clamp(min=0).pow(power / 2)) @ evecs.T).float()


def standing(value: float, null: Sequence[float]) -> tuple[float | None, float | None]:
    """The z-score of `value` against the null's values, and the percentage of the null
    below it (ties count half); None where the null is empty or constant."""
    values = np.asarray([v for v in null if v == v], dtype=float)
    if values.size == 0:
        return None, None
    below = float(((values < value).sum() + 0.5 * (values == value).sum()) / values.size)
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    z = None if sd == 0.0 else float((value - values.mean()) / sd)
    return z, 100.0 * below
