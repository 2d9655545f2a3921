"""Feature partitions of a crosscoder: which features belong to which model.

Features are laid out in four contiguous blocks, always in this order::

    [ A-exclusive | B-exclusive | shared | designated-shared (tied decoders) ]

A standard crosscoder has only the shared block, a DFC has the first three, a DSF
crosscoder has the last two. Model A owns A-exclusive + shared + designated features,
model B owns B-exclusive + shared + designated features; each model's parameters
exist only for the features it owns.

The partition sits below every package (the configuration validates one, the results
store names its roles); it imports torch only when asked for a mask, so the command line
and the results store can name roles without loading it. `engine.crosscoder.partition`
re-exports these names for the crosscoder modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Architecture(StrEnum):
    """The three crosscoder variants."""

    STANDARD = "standard"
    DFC = "dfc"
    DSF = "dsf"


class Role(StrEnum):
    """Partition a single feature belongs to."""

    A_EXCLUSIVE = "a_exclusive"
    B_EXCLUSIVE = "b_exclusive"
    SHARED = "shared"
    DESIGNATED = "designated_shared"


def _count(spec: float | int, n_features: int, name: str) -> int:
    """Turn a count (int) or a fraction in [0, 1) (float) into a feature count."""
    if isinstance(spec, bool) or not isinstance(spec, int | float):
        raise ValueError(f"{name} must be a count (int) or a fraction (float), got {spec!r}")
    if isinstance(spec, float):
        if not 0.0 <= spec < 1.0:
            raise ValueError(f"{name} as a fraction must be in [0, 1), got {spec}")
        return round(spec * n_features)
    if spec < 0:
        raise ValueError(f"{name} must be non-negative, got {spec}")
    return spec


@dataclass(frozen=True)
class Partition:
    """Sizes of the four feature blocks."""

    n_a_exclusive: int = 0
    n_b_exclusive: int = 0
    n_shared: int = 0
    n_designated: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"partition size {name} must be non-negative, got {value}")
        if self.n_features == 0:
            raise ValueError("a crosscoder needs at least one feature")
        if self.n_a_exclusive + self.n_shared + self.n_designated == 0:
            raise ValueError("model A owns no features (no A-exclusive, shared or designated)")
        if self.n_b_exclusive + self.n_shared + self.n_designated == 0:
            raise ValueError("model B owns no features (no B-exclusive, shared or designated)")

    @classmethod
    def build(
        cls,
        architecture: Architecture | str,
        n_features: int,
        a_exclusive: float | int = 0.05,
        b_exclusive: float | int = 0.05,
        designated: float | int = 0.10,
    ) -> Partition:
        """Partition for an architecture; sizes are counts (int) or fractions (float)."""
        arch = Architecture(architecture)
        if not isinstance(n_features, int) or n_features <= 0:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        if arch is Architecture.STANDARD:
            return cls(n_shared=n_features)
        if arch is Architecture.DSF:
            n_d = _count(designated, n_features, "designated")
            if not 0 < n_d < n_features:
                raise ValueError(
                    f"DSF needs 0 < designated < n_features, got {n_d} of {n_features}"
                )
            return cls(n_shared=n_features - n_d, n_designated=n_d)
        n_a = _count(a_exclusive, n_features, "a_exclusive")
        n_b = _count(b_exclusive, n_features, "b_exclusive")
        if n_a + n_b >= n_features:
            raise ValueError(
                f"exclusive partitions ({n_a} A + {n_b} B) leave no shared features "
                f"out of {n_features}; lower a_exclusive/b_exclusive"
            )
        return cls(n_a_exclusive=n_a, n_b_exclusive=n_b, n_shared=n_features - n_a - n_b)

    # -- sizes and block boundaries -------------------------------------------------

    @property
    def n_features(self) -> int:
        return self.n_a_exclusive + self.n_b_exclusive + self.n_shared + self.n_designated

    @property
    def n_a_features(self) -> int:
        """Features with parameters in model A."""
        return self.n_a_exclusive + self.n_shared + self.n_designated

    @property
    def n_b_features(self) -> int:
        """Features with parameters in model B."""
        return self.n_b_exclusive + self.n_shared + self.n_designated

    @property
    def shared_start(self) -> int:
        return self.n_a_exclusive + self.n_b_exclusive

    @property
    def designated_start(self) -> int:
        return self.shared_start + self.n_shared

    @property
    def architecture(self) -> Architecture:
        if self.n_designated:
            return Architecture.DSF
        if self.n_a_exclusive or self.n_b_exclusive:
            return Architecture.DFC
        return Architecture.STANDARD

    def block(self, role: Role | str) -> slice:
        """Global feature indices of one block."""
        role = Role(role)
        a, b, s = self.n_a_exclusive, self.n_b_exclusive, self.n_shared
        return {
            Role.A_EXCLUSIVE: slice(0, a),
            Role.B_EXCLUSIVE: slice(a, a + b),
            Role.SHARED: slice(a + b, a + b + s),
            Role.DESIGNATED: slice(a + b + s, self.n_features),
        }[role]

    def roles(self) -> list[str]:
        """Role name of every feature, in feature order."""
        return (
            [Role.A_EXCLUSIVE.value] * self.n_a_exclusive
            + [Role.B_EXCLUSIVE.value] * self.n_b_exclusive
            + [Role.SHARED.value] * self.n_shared
            + [Role.DESIGNATED.value] * self.n_designated
        )

    # -- mapping between global feature ids and each model's own rows --------------

    def owned_mask(self, model: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean [n_features]: which features have parameters in `model` ('a' or 'b')."""
        import torch

        mask = torch.ones(self.n_features, dtype=torch.bool, device=device)
        other = self.block(Role.B_EXCLUSIVE if _model(model) == "a" else Role.A_EXCLUSIVE)
        mask[other] = False
        return mask

    def model_rows(self, model: str) -> torch.Tensor:
        """Global feature ids owned by `model`, in the order of that model's parameter rows."""
        import torch

        return torch.nonzero(self.owned_mask(model)).squeeze(1)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _model(model: str) -> str:
    m = model.lower()
    if m not in ("a", "b"):
        raise ValueError(f"model must be 'a' or 'b', got {model!r}")
    return m
