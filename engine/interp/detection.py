"""Detection score (paper B.4.4): how well a judge tells a feature's top examples from random
ones given only the explanation. A feature is interpretable at accuracy >= 0.8."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.contexts import Context
from engine.interp.base import Judge
from engine.interp.parse import ParseError

INTERPRETABLE = 0.8
N_EACH = 10  # top and random examples shown to the judge


@dataclass(frozen=True)
class DetectionResult:
    """A judge's labels on a shuffled mix of top (label True) and random examples."""

    accuracy: float
    n_examples: int
    predictions: list[bool]
    labels: list[bool]
    interpretable: bool
    judge: str
    prompt_version: str


def detection_score(
    judge: Judge,
    explanation: str,
    top: list[Context],
    random: list[Context],
    n: int = N_EACH,
    seed: int = 0,
) -> DetectionResult | None:
    """Score an explanation on up to n top and n random examples, shuffled by `seed`.

    Returns None when there is nothing to score (no top example, or an empty explanation);
    the caller counts that feature as skipped.
    """
    shown_top, shown_random = list(top[:n]), list(random[:n])
    if not shown_top or not explanation.strip():
        return None
    contexts = shown_top + shown_random
    labels = [True] * len(shown_top) + [False] * len(shown_random)
    order = np.random.default_rng(seed).permutation(len(contexts)).tolist()
    contexts = [contexts[i] for i in order]
    labels = [labels[i] for i in order]
    predictions = [bool(p) for p in judge.judge(explanation, contexts)]
    if len(predictions) != len(labels):
        raise ParseError(f"judge gave {len(predictions)} labels for {len(labels)} examples")
    accuracy = sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
    return DetectionResult(
        accuracy=accuracy,
        n_examples=len(labels),
        predictions=predictions,
        labels=labels,
        interpretable=accuracy >= INTERPRETABLE,
        judge=judge.name,
        prompt_version=judge.prompt_version,
    )
