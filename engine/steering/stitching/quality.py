"""How well a stitch translates: held-out fraction of variance explained (FVE) per
direction and round trip, and the warning when a direction's translation is too poor for
"does not transfer" to mean much."""

from __future__ import annotations

import math

import torch

from engine.specs import SIDES
from engine.steering.stitching.maps import Stitch
from engine.steering.transfer import other_model

FVE_WARN_BELOW = 0.5  # held-out FVE under which a direction's translation is flagged
DIRECTIONS = {"a": "a_to_b", "b": "b_to_a"}  # a vector's source model -> its FVE key


def fve_for(stitch: Stitch, source: str) -> float | None:
    """Held-out FVE of the map a vector from model `source` goes through (None if unknown)."""
    other_model(source)
    value = stitch.fve.get(DIRECTIONS[source])
    return None if value is None else float(value)


def stitch_warning(
    stitch: Stitch, source: str | None = None, threshold: float = FVE_WARN_BELOW
) -> str | None:
    """One line warning that the stitch translates poorly, or None when it is good enough.

    Checks the direction vectors from `source` travel (both when None): a held-out FVE
    below `threshold`, or none recorded, makes "the other model does not react" weak
    evidence of exclusivity.
    """
    sources = SIDES if source is None else (source,)
    low, unknown = [], []
    for m in sources:
        value = fve_for(stitch, m)
        arrow = f"{m.upper()}->{other_model(m).upper()}"
        if value is None or not math.isfinite(value):
            unknown.append(arrow)
        elif value < threshold:
            low.append(f"{arrow} {value:.2f}")
    if not (low or unknown):
        return None
    parts = []
    if low:
        parts.append(f"held-out FVE {', '.join(low)} is below {threshold:g}")
    if unknown:
        parts.append(f"no held-out FVE recorded for {', '.join(unknown)}")
    return (
        f"stitch quality: {'; '.join(parts)}, so a feature that does not transfer may only "
        "be badly translated; refit with more pairs (`modeldiff stitch --samples`) or read "
        "its exclusivity as an upper bound"
    )


def fve_lines(stitch: Stitch) -> list[str]:
    """The held-out FVE per direction and round trip, as lines for a terminal."""
    fve, info = stitch.fve, stitch.info
    if not fve:
        return ["held-out fraction of variance explained (FVE): not recorded"]
    held = info.get("heldout_pairs")
    dropped = info.get("outlier_rows")
    where = f" on {held} held-out pairs" if held is not None else ""
    if dropped:
        where += f" ({dropped} outlier pairs left out of fit and score)"

    def value(key: str) -> str:
        return f"{fve[key]:.3f}" if key in fve else "n/a"

    return [
        f"held-out fraction of variance explained (FVE){where}: A->B {value('a_to_b')}, "
        f"B->A {value('b_to_a')}",
        f"round trips: A->B->A {value('a_to_b_to_a')}, B->A->B {value('b_to_a_to_b')}",
    ]


def evaluate(stitch: Stitch, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, float]:
    """Fraction of variance explained per direction and for each round trip."""
    x_a, x_b = x_a.float(), x_b.float()
    to_b, to_a = stitch.a_to_b(x_a), stitch.b_to_a(x_b)
    return {
        "a_to_b": fve(to_b, x_b),
        "b_to_a": fve(to_a, x_a),
        "a_to_b_to_a": fve(stitch.b_to_a(to_b), x_a),
        "b_to_a_to_b": fve(stitch.a_to_b(to_a), x_b),
    }


def fve(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """1 - squared error / total variance (around the per-dimension mean)."""
    prediction, target = prediction.double(), target.double()
    error = (prediction - target).pow(2).sum()
    variance = (target - target.mean(dim=0)).pow(2).sum().clamp_min(1e-30)
    return float(1 - error / variance)
