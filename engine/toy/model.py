"""Synthetic ground-truth toy model for cross-architecture diffing (paper B.2).

Random unit concept vectors are split into shared, A-exclusive and B-exclusive sets. Each
sample activates a sparse, correlated set of concepts; model A sees the shared and
A-exclusive concepts in their original directions, model B sees the shared and B-exclusive
concepts through a random affine map. A crosscoder trained on the pairs should recover the
concepts, and a good model-diffing crosscoder should flag exactly the exclusive ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Leading tags keep the construction stream and the batch streams apart (numpy's
# SeedSequence ignores trailing zeros, so the tag must come first).
_TAG_BUILD = 0
_TAG_BATCH = 1
# Geometric gaps drawn per concept: mean + _GAP_SDS standard deviations + _GAP_EXTRA, so a
# second round of draws is almost never needed.
_GAP_SDS = 6.0
_GAP_EXTRA = 8


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


@dataclass
class ToyConfig:
    """Parameters of the toy model (paper Table 6, plus the affine-map scale and seed)."""

    n_concepts: int = 2048
    d: int = 256
    exclusive_ratio: float = 0.05  # split equally between A and B
    target_sparsity: float | None = None  # expected active concepts per sample; None: n/100
    correlation_rank: int = 10
    decay: float = 0.001
    translation_scale: float = 0.1
    noise: float = 0.01
    min_probability: float = 1e-4
    linear_std: float = 0.5  # entries of the model-B linear map ~ N(0, linear_std^2)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_concepts", "d", "correlation_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0 < self.exclusive_ratio < 1:
            raise ValueError(f"exclusive_ratio must be in (0, 1), got {self.exclusive_ratio}")
        if self.n_exclusive_per_model == 0:
            raise ValueError(
                f"exclusive_ratio={self.exclusive_ratio} gives 0 exclusive concepts per model "
                f"for n_concepts={self.n_concepts}; raise exclusive_ratio or n_concepts"
            )
        if self.n_shared == 0:
            raise ValueError(
                f"exclusive_ratio={self.exclusive_ratio} leaves no shared concepts "
                f"out of n_concepts={self.n_concepts}; lower it"
            )
        if not 0 < self.sparsity < self.n_concepts:
            raise ValueError(
                f"target_sparsity must be in (0, n_concepts={self.n_concepts}), "
                f"got {self.target_sparsity}"
            )
        for name in ("decay", "translation_scale", "noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.linear_std > 0:
            raise ValueError(f"linear_std must be > 0, got {self.linear_std}")
        if not 0 <= self.min_probability < 1:
            raise ValueError(f"min_probability must be in [0, 1), got {self.min_probability}")

    @property
    def n_exclusive_per_model(self) -> int:
        """Exclusive concepts of each model."""
        return round(self.n_concepts * self.exclusive_ratio / 2)

    @property
    def n_shared(self) -> int:
        """Concepts both models see."""
        return self.n_concepts - 2 * self.n_exclusive_per_model

    @property
    def sparsity(self) -> float:
        """Resolved target sparsity (expected active concepts per sample)."""
        return self.n_concepts / 100 if self.target_sparsity is None else self.target_sparsity

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (for JSON provenance)."""
        return asdict(self)


class ToyModel:
    """Ground-truth concepts and a sampler of paired activations (x_a, x_b)."""

    def __init__(self, config: ToyConfig | None = None) -> None:
        self.config = config or ToyConfig()
        gen = torch.Generator().manual_seed(derive_seed(_TAG_BUILD, self.config.seed))
        self._concepts_a = _unit_gaussians(self.config.n_concepts, self.config.d, gen)
        self._assign_roles(gen)
        self._concepts_b = self._transform_for_b(gen)
        self._probabilities = self._make_probabilities(gen)
        # Rows of concepts a model cannot see are zeroed once here, so one sparse matmul
        # builds both models' activations and invisibility holds exactly.
        self._mix = torch.cat(
            [
                self._concepts_a * self.visible_a[:, None],
                self._concepts_b * self.visible_b[:, None],
            ],
            dim=1,
        )
        self._fallback = int(torch.argmax(self._probabilities))

    # -- construction ----------------------------------------------------------------

    def _assign_roles(self, gen: torch.Generator) -> None:
        """Randomly split concept indices into A-exclusive, B-exclusive and shared."""
        n_ex = self.config.n_exclusive_per_model
        perm = torch.randperm(self.config.n_concepts, generator=gen)
        self._a_idx = perm[:n_ex].sort().values
        self._b_idx = perm[n_ex : 2 * n_ex].sort().values
        self._shared_idx = perm[2 * n_ex :].sort().values
        self._visible_a = torch.ones(self.config.n_concepts, dtype=torch.bool)
        self._visible_a[self._b_idx] = False
        self._visible_b = torch.ones(self.config.n_concepts, dtype=torch.bool)
        self._visible_b[self._a_idx] = False

    def _transform_for_b(self, gen: torch.Generator) -> Tensor:
        """Model-B concept vectors: affine map, rescaled to the original median norm (eq. 4-5)."""
        cfg = self.config
        linear = torch.randn(cfg.d, cfg.d, generator=gen) * cfg.linear_std
        shift = torch.randn(cfg.d, generator=gen) * cfg.translation_scale
        mapped = self._concepts_a @ linear.T + shift
        # Medians over the concepts B can see: A-exclusive ones are never observed there.
        seen = self._visible_b
        ratio = self._concepts_a[seen].norm(dim=1).median() / mapped[seen].norm(dim=1).median()
        return mapped * ratio

    def _make_probabilities(self, gen: torch.Generator) -> Tensor:
        """Correlated, decaying per-concept firing probabilities (eq. 6-9)."""
        cfg = self.config
        n, r = cfg.n_concepts, cfg.correlation_rank
        # 0.5/sqrt(r) is read as the standard deviation of L's entries.
        factor = torch.randn(n, r, generator=gen) * (0.5 / math.sqrt(r))
        # One draw from MVN(0, L L^T + I) without building the n x n covariance.
        logits = factor @ torch.randn(r, generator=gen) + torch.randn(n, generator=gen)
        p = torch.sigmoid(logits)
        rank = torch.randperm(n, generator=gen).to(p.dtype)
        p = p * torch.exp(-cfg.decay * rank)
        p = p * (cfg.sparsity / p.sum())
        # Clamping above at 1 only matters for extreme target sparsities.
        return p.clamp(min=cfg.min_probability, max=1.0)

    # -- public views ------------------------------------------------------------------

    @property
    def concepts_a(self) -> Tensor:
        """[n_concepts, d] unit concept vectors in A's space (B-exclusive rows are unseen by A)."""
        return self._concepts_a

    @property
    def concepts_b(self) -> Tensor:
        """[n_concepts, d] concept vectors in B's space (A-exclusive rows are unseen by B)."""
        return self._concepts_b

    @property
    def shared_idx(self) -> Tensor:
        """Sorted indices of concepts both models see."""
        return self._shared_idx

    @property
    def a_exclusive_idx(self) -> Tensor:
        """Sorted indices of concepts only model A sees."""
        return self._a_idx

    @property
    def b_exclusive_idx(self) -> Tensor:
        """Sorted indices of concepts only model B sees."""
        return self._b_idx

    @property
    def visible_a(self) -> Tensor:
        """Boolean [n_concepts]: concepts model A sees."""
        return self._visible_a

    @property
    def visible_b(self) -> Tensor:
        """Boolean [n_concepts]: concepts model B sees."""
        return self._visible_b

    @property
    def probabilities(self) -> Tensor:
        """[n_concepts] firing probability of each concept."""
        return self._probabilities

    @property
    def d_a(self) -> int:
        """Width of model A's activations."""
        return self.config.d

    @property
    def d_b(self) -> int:
        """Width of model B's activations."""
        return self.config.d

    # -- sampling ----------------------------------------------------------------------

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw n activation pairs: x_a [n, d], x_b [n, d] (float32) and active mask z [n, C]."""
        # Measured on the 2-core dev CPU (n_concepts=512, d=64, n=4096): about 450k pairs/s
        # (median; 640k best), 700k/s through `batches`; at the paper's 2048 x 256 defaults
        # about 110k/s, where drawing the Gaussian noise dominates.
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rows, cols = bernoulli_events(self._probabilities, n, generator)
        rows, cols = self._activate_empty(rows, cols, n)
        scales = torch.rand(rows.numel(), generator=generator)
        noise = torch.randn(n, 2 * self.config.d, generator=generator) * self.config.noise
        # Few concepts fire per sample: a sparse [n, C] coefficient matrix times the stacked
        # concept vectors of both models builds x_a and x_b in one pass.
        coeff = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), scales, (n, self.config.n_concepts), check_invariants=False
        )
        x = torch.sparse.addmm(noise, coeff, self._mix)
        x_a, x_b = x[:, : self.config.d].contiguous(), x[:, self.config.d :].contiguous()
        z = torch.zeros(n, self.config.n_concepts, dtype=torch.bool)
        z[rows, cols] = True
        return x_a, x_b, z

    def _activate_empty(self, rows: Tensor, cols: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Add the most probable concept to every sample with no active concept.

        Algorithm 2 (steps 4-8) is garbled in the paper; the intended behaviour is that no
        sample is empty. All samples share one probability vector, so the fallback is always
        the globally most probable concept; this raises its firing rate by
        P(empty sample) = prod(1 - p), about exp(-target_sparsity).
        """
        empty = torch.ones(n, dtype=torch.bool)
        empty[rows] = False
        extra = empty.nonzero().squeeze(1)
        if extra.numel() == 0:
            return rows, cols
        fallback = torch.full_like(extra, self._fallback)
        return torch.cat([rows, extra]), torch.cat([cols, fallback])

    def batches(
        self, batch_size: int, start_step: int = 0, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless (x_a, x_b) batches; step s depends only on (config.seed, seed, s)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if start_step < 0 or seed < 0:
            raise ValueError(f"start_step and seed must be >= 0, got {start_step}, {seed}")
        step = start_step
        gen = torch.Generator()
        while True:
            # A fresh seed per step makes resuming at any step exact without replaying.
            gen.manual_seed(derive_seed(_TAG_BATCH, self.config.seed, seed, step))
            x_a, x_b, _ = self.sample(batch_size, gen)
            yield x_a, x_b
            step += 1


def bernoulli_events(
    p: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(sample, concept) index pairs of independent z ~ Bernoulli(p) over n samples.

    Each concept fires as a Bernoulli process along the sample axis, so the gaps between
    its firings are Geometric(p). Drawing the gaps costs about n * sum(p) random numbers
    instead of n * len(p), which is what makes sampling fast when few concepts fire.
    """
    q = torch.log1p(-p.double()).clamp(max=-torch.finfo(torch.float64).tiny)
    concepts = torch.arange(p.numel())
    start = torch.full_like(concepts, -1)  # position of the latest firing drawn so far
    found_rows, found_cols = [], []
    while concepts.numel():
        mean = n * p[concepts].double()
        draws = (mean + _GAP_SDS * mean.sqrt() + _GAP_EXTRA).ceil().long()
        col = torch.repeat_interleave(concepts, draws)
        u = 1.0 - torch.rand(col.numel(), dtype=torch.float64, generator=generator)
        gaps = (torch.log(u) / torch.repeat_interleave(q[concepts], draws)).floor() + 1
        gaps = gaps.clamp(max=n + 1).long()
        pos = _segment_cumsum(gaps, draws) + torch.repeat_interleave(start, draws)
        keep = pos < n
        found_rows.append(pos[keep])
        found_cols.append(col[keep])
        last = pos[draws.cumsum(0) - 1]
        unfinished = last < n - 1
        concepts, start = concepts[unfinished], last[unfinished]
    return torch.cat(found_rows), torch.cat(found_cols)


def _segment_cumsum(values: Tensor, lengths: Tensor) -> Tensor:
    """Cumulative sum restarted at the start of every segment of the given lengths."""
    total = values.cumsum(0)
    ends = lengths.cumsum(0)
    before = torch.cat([total.new_zeros(1), total[ends[:-1] - 1]])
    return total - torch.repeat_interleave(before, lengths)


def _unit_gaussians(n: int, d: int, gen: torch.Generator) -> Tensor:
    """n vectors uniform on the unit sphere in R^d (normalised Gaussians, eq. 3)."""
    u = torch.randn(n, d, generator=gen)
    return u / u.norm(dim=1, keepdim=True)
