"""The effect measure of one steering vector and its stitched copy: iso-KL strengths, a
panel of strings, and how alike the two models' reactions to the panel are.

1. Matched strength. Each model is steered with a coefficient chosen so that its
   next-token distribution on neutral prompts moves by the same KL budget (`Probe.iso_kl`):
   no model is pushed into nonsense, and strengths are comparable across vectors and
   models whatever their norms.
2. A panel of strings: the tokens each model's steering promotes and demotes most (among its
   likely next tokens), decoded to text so that they mean the same in both tokenizers, plus
   any known target strings (an organism's marker).
3. Compare effects, not texts: for every panel string, the change of its teacher-forced
   log-probability after each prompt under steering, in each model (each string tokenised
   by that model): its odd part, (L(+cv) - L(-cv)) / 2, which leaves out the flattening
   any push causes whatever its direction. Similarity is the Spearman rank correlation of
   the two models' changes; exclusivity = 1 - similarity (0: the target reacts like the
   source, 2: the opposite).

The number is read against a null of random directions (`engine.steering.effects.null`),
as a z-score and a percentile.

4. Target effects. For known target strings (an organism's refusal sentence), each model's
   target effect is the odd change of the targets' log-probabilities, averaged over the
   prompts (and over the targets, if several), read against the same null directions'
   target effects (`EffectSession`): does the vector raise the target in this model more
   than random directions at the same KL do? Exclusivity cannot say this: random directions
   score about 1 too, so an exclusive feature does not stand out by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from engine.errors import ConfigError
from engine.steering.effects.probe import NEUTRAL_PROMPTS, Probe, check_positions

VERSION = "effects-v2"  # v2: the odd part of the effect (+v against -v)


@dataclass(frozen=True)
class EffectsConfig:
    """The measure's settings: KL budget, prompts, panel size, null size and seed."""

    budget: float = 0.5  # nats of KL(steered || unsteered) on the next token, per model
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    panel: int = 8  # strings each model contributes per direction (promoted, demoted)
    candidates: int = 200  # among this many most likely next tokens
    nulls: int = 32  # random directions per source model
    grid: int = 6  # coefficients per batched forward pass of the iso-KL search
    rounds: int = 2  # grids in the iso-KL search (each narrows the bracket)
    seed: int = 0
    targets: tuple[str, ...] = ()  # known strings that always join the panel
    # The null's covariance exponent per model (A, B): 1 draws from the activation
    # covariance, 0 isotropically; lower values put the directions where the activations
    # vary less, as feature decoders do (docs/verification.md).
    null_power: tuple[float, float] = (1.0, 1.0)
    # Each prompt rendered in each model's own chat form, up to the answer header (the
    # prompts are then user requests, e.g. an organism's held-out controls).
    chat: bool = False
    positions: str = "all"  # where the vector is added: "all", or "last" (the prompt's end)

    def __post_init__(self) -> None:
        if not self.budget > 0:
            raise ConfigError(f"the KL budget must be positive, got {self.budget}")
        if self.panel < 2:
            raise ConfigError(f"the panel needs at least 2 strings per model, got {self.panel}")
        if self.nulls < 2:
            raise ConfigError(f"the null needs at least 2 random directions, got {self.nulls}")
        if not self.prompts:
            raise ConfigError("the effect measure needs at least one prompt")
        check_positions(self.positions)
        check_targets(self.targets)

    def key_payload(self) -> dict[str, Any]:
        """What makes two measurements comparable (targets are per item, not here)."""
        payload = asdict(self)
        payload.pop("targets")
        # Settings added later join the key only when set, so the keys of measurements made
        # before they existed stay the same.
        for name, default in (("null_power", (1.0, 1.0)), ("chat", False), ("positions", "all")):
            value = tuple(payload[name]) if isinstance(payload[name], list) else payload[name]
            if value == default:
                payload.pop(name)
        payload["prompts"] = list(self.prompts)
        payload["version"] = VERSION
        return payload


@dataclass
class Effect:
    """One vector's measured effects in both models, and (once read against a null) its
    standing among random directions."""

    source: str
    target: str
    coefficients: dict[str, float]  # iso-KL coefficient per model, raw units
    kl: dict[str, float]  # the KL reached per model
    reached: dict[str, bool]  # whether the budget was reachable within 8x the typical norm
    strings: list[str]  # the panel
    origins: list[str]  # where each string came from: "a+", "b-", "target", ...
    changes: dict[str, list[float]]  # per model: each string's change of log-probability
    output: dict[str, float]  # per model: mean change of the vector's own logit-lens tokens
    similarity: float
    exclusivity: float
    z: float | None = None
    percentile: float | None = None  # share of random directions less exclusive, in %
    null_n: int = 0
    companions: dict[str, float] = field(default_factory=dict)
    # Per target string, per model: the odd change of its log-probability (`target_changes`).
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per model: the mean of the targets' changes, and its standing among the null's.
    target_effect: dict[str, float] = field(default_factory=dict)
    target_z: dict[str, float | None] = field(default_factory=dict)
    target_percentile: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the `details` of a stored row)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Effect:
        """The inverse of `to_json`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def measure_vectors(
    probes: dict[str, Probe],
    vectors: dict[str, torch.Tensor],
    source: str,
    cfg: EffectsConfig,
    targets: Sequence[str] = (),
) -> Effect:
    """Measure a vector steering `source` and its stitched copy steering the other model;
    `vectors` maps each model to the vector that steers it.

    The effect compared is the odd part of steering, (L(+c v) - L(-c v)) / 2 for each
    string's log-probability L, at the iso-KL coefficient c of +v: any push flattens the
    next-token distribution alike whatever its direction (frequent tokens down, rare ones
    up, in both models), and that even part would make every vector look shared; the odd
    part is what depends on where the vector points. The raw change L(+c v) - L(0) is kept
    as `companions["raw_similarity"]`."""
    target = "b" if source == "a" else "a"
    coefficients, kls, reached, panels, output = {}, {}, {}, {}, {}
    plus, minus = {}, {}
    for m in (source, target):
        probe, v = probes[m], vectors[m].float()
        if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
            raise ConfigError(f"the vector for model {m.upper()} is zero or not finite")
        found = probe.iso_kl(v, cfg.budget, cfg.grid, cfg.rounds)
        coefficients[m], kls[m], reached[m] = found.coef, found.kl, found.reached
        plus[m] = found.steered
        minus[m] = probe.next_token(v, -found.coef)
        odd = 0.5 * (plus[m] - minus[m]).mean(0)
        panels[m] = _panel(probe, odd, plus[m], minus[m], cfg)
        output[m] = _output_score(probe, v, odd)
    strings, origins = _merge(panels, source, list(cfg.targets) + list(targets))
    changes, raw = {}, {}
    for m in (source, target):
        probe, v, c = probes[m], vectors[m], coefficients[m]
        up = probe.string_logprobs(strings, v, c, plus[m])
        down = probe.string_logprobs(strings, v, -c, minus[m])
        changes[m] = (0.5 * (up - down)).tolist()
        raw[m] = (up - probe.string_logprobs(strings)).tolist()
    similarity = rank_correlation(changes[source], changes[target])
    companions = {"raw_similarity": rank_correlation(raw[source], raw[target])}
    effect = Effect(
        source, target, coefficients, kls, reached, strings, origins, changes, output,
        similarity, 1.0 - similarity, companions=companions,
    )  # fmt: skip
    for text, origin in zip(strings, origins, strict=True):
        if origin == "target":
            effect.targets[text] = {m: changes[m][strings.index(text)] for m in changes}
    return effect


def check_targets(targets: Sequence[str]) -> None:
    """Refuse an empty or blank target string (ConfigError)."""
    for text in targets:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"a target string must be non-empty text, got {text!r}")


def target_changes(
    probes: dict[str, Probe],
    vectors: dict[str, torch.Tensor],
    coefficients: dict[str, float],
    targets: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Per target, per model: the odd change (L(+c v) - L(-c v)) / 2 of its log-probability
    at the model's coefficient c, averaged over the prompts: what `measure_vectors` gives a
    target, for a vector whose coefficients are already known (a stored null direction)."""
    out: dict[str, dict[str, float]] = {t: {} for t in targets}
    for m, c in coefficients.items():
        probe, v = probes[m], vectors[m].float()
        up = probe.string_logprobs(list(targets), v, c)
        down = probe.string_logprobs(list(targets), v, -c)
        for i, t in enumerate(targets):
            out[t][m] = float(0.5 * (up[i] - down[i]))
    return out


def mean_target_effect(
    changes: dict[str, dict[str, float]], targets: Sequence[str], models: Sequence[str]
) -> dict[str, float]:
    """Per model, the mean over `targets` of their changes."""
    return {m: float(np.mean([changes[t][m] for t in targets])) for m in models}


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho, 0 where either side is constant."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    rho = float(spearmanr(x, y).statistic)
    return 0.0 if math.isnan(rho) else rho


def _panel(
    probe: Probe, odd: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor, cfg: EffectsConfig
) -> list[tuple[str, str]]:
    """The strings the vector's odd effect promotes most among the likely tokens under +v,
    and demotes most among the likely tokens under -v, as (text, "+"|"-")."""
    likely_up = torch.topk(plus.exp().mean(0), cfg.candidates).indices
    likely_down = torch.topk(minus.exp().mean(0), cfg.candidates).indices
    out: list[tuple[str, str]] = []
    for ids, sign in ((likely_up, "+"), (likely_down, "-")):
        order = torch.argsort(odd[ids], descending=sign == "+", stable=True)
        taken = 0
        for i in ids[order].tolist():
            text = probe.decode(i)
            if not _usable(text):
                continue
            out.append((text, sign))
            taken += 1
            if taken == cfg.panel:
                break
    return out


def _usable(text: str) -> bool:
    """A string that survives a trip through another tokenizer: printable, not blank, not
    a piece of a multi-byte character."""
    return bool(text.strip()) and "\ufffd" not in text and text.isprintable()


def _merge(
    panels: dict[str, list[tuple[str, str]]], source: str, targets: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The union of the models' panels (source first) and the targets, each string once."""
    strings, origins, seen = [], [], set()
    for text in targets:
        if text and text not in seen:
            seen.add(text)
            strings.append(text)
            origins.append("target")
    for m in sorted(panels, key=lambda k: k != source):
        for text, sign in panels[m]:
            if text not in seen:
                seen.add(text)
                strings.append(text)
                origins.append(f"{m}{sign}")
    return strings, origins


def _output_score(probe: Probe, vector: torch.Tensor, change: torch.Tensor, k: int = 10) -> float:
    """Mean change of next-token log-probability, under steering, of the vector's own top
    `k` logit-lens tokens (its direction read through the unembedding)."""
    head = probe.loaded.model.lm_head.weight
    with torch.inference_mode():
        lens = head.float() @ vector.float().to(head.device)
    top = torch.topk(lens, k).indices.cpu()
    return float(change[top].mean())
