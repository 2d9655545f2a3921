"""Settings of the toy-model sweep: what to sweep and how to train each crosscoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.config import CrosscoderConfig, TrainConfig
from engine.errors import UserError
from engine.toy.model import ToyConfig

KEYS = ["architecture", "n_features", "seed"]
METRICS = [
    "exclusive_recall",
    "exclusive_recall_relnorm",
    "a_exclusive_recall",
    "b_exclusive_recall",
    "shared_recall",
    "recovery_rate",
    "fp_rate",
    "fp_shared",
    "fp_none",
    "n_labelled_exclusive",
    "fve",
]
ARCH_COLOURS = {"dfc": "#1f77b4", "standard": "#ff7f0e", "dsf": "#d62728"}
# Lighter shades of the same hues for the "recovers no concept" share of false positives.
ARCH_LIGHT = {"dfc": "#9ecae1", "standard": "#fdd0a2", "dsf": "#fcbba1"}
# Settings that may differ between a sweep and its resumption: they only select runs.
_SELECTION_FIELDS = {"sizes", "architectures", "seeds", "out_dir", "device"}


@dataclass
class SweepConfig:
    """What to sweep and how to train each crosscoder."""

    toy: ToyConfig = field(default_factory=lambda: ToyConfig(n_concepts=512, d=64))
    sizes: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    architectures: list[str] = field(default_factory=lambda: ["standard", "dfc", "dsf"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 50
    k: int | None = None  # None: the toy model's target sparsity, rounded
    k_initial: int | None = None  # None: 4 x k
    anneal_steps: int | None = None  # None: a fifth of the steps
    designated_k_multiplier: float = 2.0
    exclusive_fraction: float = 0.05  # DFC: share of features exclusive to each model
    designated_fraction: float = 0.10  # DSF: share of designated-shared features
    score_weighting: str = "sum"  # BatchTopK decoder-norm weight: "sum" (paper) or "mean"
    # Steps between moves of lopsided shared features into the exclusive partitions
    # (TrainConfig.reassign_every); None: the trainer's default, 0: never (the paper).
    reassign_every: int | None = None
    reassign_low: float | None = None  # None: the trainer's defaults
    reassign_high: float | None = None
    adapt_partitions: bool | None = None  # None: the trainer's default (adaptive)
    recycle_after_windows: float | None = None  # None: the trainer's default
    exclusive_start: float | None = None  # None: the trainer's default
    swap_margin: float | None = None  # None: the trainer's default (0.5: no swaps)
    reassign_stop: float | None = None  # None: the trainer's default
    late_lean: float | None = None  # None: the trainer's default
    # None: 5% of the training tokens, scaled to these short runs as 10M is to 800M pairs
    # in the paper (but coarser, so AuxK gets a chance to act).
    dead_window_tokens: int | None = None
    # The toy data has no outliers by construction; masking would only drop dense samples.
    outlier_factor: float | None = None
    threshold: float = 0.8
    low: float = 0.2
    high: float = 0.8
    device: str = "cpu"  # the toy crosscoders are small; "auto" uses CUDA when present
    out_dir: str = "toy_sweep"

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive dictionary sizes, got {self.sizes}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds}")
        unknown = sorted(set(self.architectures) - set(ARCH_COLOURS))
        if unknown or not self.architectures:
            raise ValueError(
                f"unknown architecture(s) {unknown or self.architectures}; "
                f"choose from {', '.join(ARCH_COLOURS)}"
            )
        if self.resolved_k > min(self.sizes):
            raise ValueError(
                f"k={self.resolved_k} exceeds the smallest dictionary size {min(self.sizes)}"
            )

    @property
    def resolved_k(self) -> int:
        """Active features per token at the end of annealing."""
        return self.k if self.k is not None else max(1, round(self.toy.sparsity))

    @property
    def resolved_dead_window(self) -> int:
        """Tokens without firing after which a feature counts as dead."""
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        return max(self.batch_size, self.steps * self.batch_size // 20)

    def train_config(self, seed: int, n_features: int) -> TrainConfig:
        """Trainer settings of one run."""
        k = self.resolved_k
        k_initial = self.k_initial if self.k_initial is not None else 4 * k
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            k=k,
            k_initial=min(k_initial, n_features),
            anneal_steps=self.anneal_steps if self.anneal_steps is not None else self.steps // 5,
            designated_k_multiplier=self.designated_k_multiplier,
            dead_window_tokens=self.resolved_dead_window,
            outlier_factor=self.outlier_factor,
            seed=seed,
            log_every=max(1, self.steps // 10),
            checkpoint_every=self.steps,
            device=self.device,
            **self._reassignment(),
        )

    def _reassignment(self) -> dict[str, Any]:
        """The reassignment settings this sweep sets (the rest keep TrainConfig's defaults)."""
        names = ("reassign_every", "reassign_low", "reassign_high", "adapt_partitions")
        names += ("recycle_after_windows", "exclusive_start", "swap_margin")
        names += ("reassign_stop", "late_lean")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def crosscoder_config(self, architecture: str, n_features: int) -> CrosscoderConfig:
        """Crosscoder shape of one run."""
        return CrosscoderConfig(
            d_a=self.toy.d,
            d_b=self.toy.d,
            n_features=n_features,
            architecture=architecture,
            a_exclusive=self.exclusive_fraction,
            b_exclusive=self.exclusive_fraction,
            designated=self.designated_fraction,
            score_weighting=self.score_weighting,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting."""
        return dataclasses.asdict(self)


class SweepError(UserError, ValueError):
    """An output directory holds results that cannot be combined with this sweep."""
