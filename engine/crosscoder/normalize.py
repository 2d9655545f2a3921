"""Per-model activation scaling (paper section 3.3) and per-batch outlier masking (B.1.4)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Normalizer:
    """Scalar factors that bring each model's median activation norm to sqrt(d_a + d_b) / 2.

    A scalar per model keeps directions intact, so decoder vectors convert back to a
    model's raw units by dividing by its factor.
    """

    scale_a: float
    scale_b: float

    @classmethod
    def fit(cls, x_a: torch.Tensor, x_b: torch.Tensor) -> Normalizer:
        """Fit on a sample of paired activations (rows with non-finite values ignored)."""
        target = math.sqrt(x_a.shape[1] + x_b.shape[1]) / 2
        return cls(
            scale_a=target / _median_norm(x_a, "A"),
            scale_b=target / _median_norm(x_b, "B"),
        )

    @classmethod
    def from_median_norms(cls, median_a: float, median_b: float, d_a: int, d_b: int) -> Normalizer:
        """Factors from median norms measured elsewhere (e.g. an activation store's stats)."""
        target = math.sqrt(d_a + d_b) / 2
        if not (median_a > 0 and median_b > 0):
            raise ValueError(f"median norms must be positive, got {median_a} and {median_b}")
        return cls(scale_a=target / median_a, scale_b=target / median_b)

    @classmethod
    def identity(cls) -> Normalizer:
        return cls(1.0, 1.0)

    def apply(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale raw activations into the crosscoder's space."""
        return x_a * self.scale_a, x_b * self.scale_b

    def to_raw(self, vector: torch.Tensor, model: str) -> torch.Tensor:
        """Convert a vector in the crosscoder's space (e.g. a decoder row) to raw model units."""
        return vector / (self.scale_a if model == "a" else self.scale_b)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _median_norm(x: torch.Tensor, name: str) -> float:
    norms = x.float().norm(dim=1)
    norms = norms[torch.isfinite(norms)]
    if norms.numel() == 0:
        raise ValueError(f"cannot fit normalisation: no finite activation rows for model {name}")
    median = norms.median().item()
    if median <= 0:
        raise ValueError(f"cannot fit normalisation: median norm of model {name} is 0")
    return median


def outlier_mask(x_a: torch.Tensor, x_b: torch.Tensor, factor: float | None) -> torch.Tensor:
    """Rows to keep: neither model's vector has norm > factor x its batch median."""
    if factor is None:
        return torch.ones(x_a.shape[0], dtype=torch.bool, device=x_a.device)
    keep = torch.ones(x_a.shape[0], dtype=torch.bool, device=x_a.device)
    for x in (x_a, x_b):
        norms = x.float().norm(dim=1)
        keep &= norms <= factor * norms.median()
    return keep
