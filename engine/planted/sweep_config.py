"""Settings of the planted-concept sweep: what to plant, which variants to train, where to."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.config import preset_names
from engine.planted import KINDS, PlantedError
from engine.planted.pairs import check_model
from engine.planted.triggers import DEFAULT_RANKS
from engine.planted.variants import (
    DEFAULT_VARIANTS,
    KNOWN_VARIANTS,
    Variant,
    check_variant,
    split_overrides,
)

KEYS = ["kind", "into", "strength", "rate", "seed", "variant"]
# Residual strengths are in units of the model's median activation norm, embedding
# strengths in units of its median embedding-row norm.
DEFAULT_STRENGTHS = {
    "residual": [0.05, 0.1, 0.2, 0.4, 0.8],
    "token": [0.05, 0.1, 0.2, 0.4, 0.8],
    "embedding": [0.25, 0.5, 1, 2, 4],
}

# Settings that only select which runs to do; the others must match the results on disk.
_SELECTION_FIELDS = {
    "into", "strengths", "rates", "seeds", "variants", "out_dir", "device", "keep_models",
    "keep_runs",
}  # fmt: skip


@dataclass
class PlantedConfig:
    """What to plant, which crosscoders to train on it, and where the results go."""

    store: str
    out_dir: str = "runs/planted"
    kind: str = "residual"
    into: list[str] = field(default_factory=lambda: ["a", "b"])
    strengths: list[float] | None = None  # None: DEFAULT_STRENGTHS of the kind
    rates: list[float] = field(default_factory=lambda: [0.03])
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: dict[str, Variant] = field(
        default_factory=lambda: {n: KNOWN_VARIANTS[n] for n in DEFAULT_VARIANTS}
    )
    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # every variant, KEY -> VALUE
    steps: int | None = None  # None: the preset's
    batch_size: int | None = None
    device: str | None = None
    max_pairs: int | None = None  # pairs used (residual) or harvested (embedding)
    holdout: float = 0.0  # share of pairs (the last ones) kept out of training, evaluated on
    threshold: float = 0.8  # F1 at which the concept counts as learned
    low: float = 0.2  # relative-norm labels of features without a partition
    high: float = 0.8
    ranks: tuple[int, int] = DEFAULT_RANKS  # trigger tokens' frequency ranks (embedding)
    keep_models: bool = False  # keep planted models (GBs each for real models)
    keep_runs: bool = False  # keep each crosscoder's run directory

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlantedError(f"unknown kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if self.strengths is None:
            self.strengths = list(DEFAULT_STRENGTHS[self.kind])
        self.into = [check_model(m) for m in dict.fromkeys(self.into)]
        _check_list("into", self.into, lambda v: True, "a or b")
        _check_list("strengths", self.strengths, lambda v: 0 <= v < math.inf, "numbers >= 0")
        _check_list("rates", self.rates, lambda v: 0 < v < 1, "fractions in (0, 1)")
        _check_list("seeds", self.seeds, lambda v: isinstance(v, int) and v >= 0, "integers >= 0")
        if not self.variants:
            raise PlantedError("no variants to train; name at least one (e.g. standard dfc)")
        self.variants = {n: check_variant(n, v) for n, v in self.variants.items()}
        split_overrides(self.overrides)  # refuse unknown keys now, not after a harvest
        if self.preset not in preset_names():
            raise PlantedError(
                f"unknown preset {self.preset!r}; choose one of: {', '.join(preset_names())}"
            )
        for name in ("steps", "batch_size", "max_pairs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PlantedError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.holdout < 1:
            raise PlantedError(f"holdout must be a fraction in [0, 1), got {self.holdout}")
        if not (0 < self.threshold <= 1 and 0 <= self.low < self.high <= 1):
            raise PlantedError("need 0 < threshold <= 1 and 0 <= low < high <= 1")
        if not 0 <= self.ranks[0] < self.ranks[1]:
            raise PlantedError(f"ranks must be (lo, hi) with 0 <= lo < hi, got {self.ranks}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting."""
        return dataclasses.asdict(self)


def _check_list(name: str, values: list, ok: Callable[[Any], bool], what: str) -> None:
    """Refuse an empty list or one with a bad value."""
    bad = [v for v in values if not ok(v)]
    if not values or bad:
        raise PlantedError(f"{name} must be {what}, got {bad or values}")
