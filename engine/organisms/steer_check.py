"""Does steering with a feature make a model show the implanted behaviour?

The feature's decoder direction (in the model's raw units) is added at the layer the
crosscoder reads, at every position, to held-out control prompts (requests that do not
trigger the behaviour); the marker rate of the greedy answers is read at each strength.
Strengths are multiples of the feature's largest activation, the scale at which the
crosscoder itself writes that direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.models.loading import LoadedModel
from engine.organisms.behaviours import Behaviour
from engine.organisms.data import chat_prompt, clean_answer
from engine.steering.steer import GenerationConfig, generate


@dataclass(frozen=True)
class SteeringRates:
    """Marker rate on neutral prompts at each strength."""

    strengths: tuple[float, ...]  # multiples of the feature's largest activation
    rates: tuple[float, ...]
    examples: tuple[str, ...]  # the first prompt's answer at each strength


def marker_rates(
    loaded: LoadedModel,
    layer: int,
    vector: torch.Tensor,
    scale: float,
    behaviour: Behaviour,
    prompts: Sequence[str],
    strengths: Sequence[float] = (0.0, 1.0, 2.0, 4.0, 8.0),
    max_new_tokens: int = 24,
    positions: str = "all",
) -> SteeringRates:
    """The behaviour's marker rate on `prompts` steered by strength x scale x vector, added
    at `positions` (engine.steering.steer.POSITIONS; "last": the answer header only)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, greedy=True, chat_template=False)
    texts = [chat_prompt(loaded.tokenizer, p) for p in prompts]
    rates, examples = [], []
    for strength in strengths:
        coefficients = [strength * scale] * len(texts)
        answers = [clean_answer(a) for a in generate(
            loaded, texts, vector=vector, layer=layer, coefficients=coefficients, cfg=cfg,
            positions=positions,
        )]  # fmt: skip
        rates.append(sum(behaviour.shows(a) for a in answers) / max(1, len(answers)))
        examples.append(answers[0] if answers else "")
    return SteeringRates(tuple(strengths), tuple(rates), tuple(examples))


def random_marker_rates(
    loaded: LoadedModel,
    layer: int,
    norm: float,
    scale: float,
    behaviour: Behaviour,
    prompts: Sequence[str],
    strengths: Sequence[float],
    n: int,
    seed: int = 0,
    positions: str = "all",
    max_new_tokens: int = 24,
) -> list[tuple[float, ...]]:
    """The marker rates of `n` random directions of L2 norm `norm` (isotropic, seeded),
    steered exactly as a feature is: the null a feature's rates are read against.

    Needed because an organism's implanted answer can be an attractor: pushed far enough
    in almost any direction at the answer header, the fine-tuned model falls back on it."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        direction = torch.randn(loaded.d_model, generator=gen)
        direction = direction * (norm / direction.norm())
        rates = marker_rates(
            loaded, layer, direction, scale, behaviour, prompts, strengths, max_new_tokens,
            positions,
        )
        out.append(rates.rates)
    return out


def share_at_least(rates: Sequence[float], null: Sequence[Sequence[float]]) -> list[float]:
    """Per strength: the share of random directions whose marker rate is at least the
    feature's (a p-value; small when the feature does what random pushes do not)."""
    if not null:
        return []
    return [sum(r[i] >= rate for r in null) / len(null) for i, rate in enumerate(rates)]
