"""Both models ready to measure steering effects, with the null of random directions
computed once and kept (in memory, and by the caller in the results DB or a JSON file).

`EffectSession.measure` returns an `Effect` with its z-score and percentile against the
null of its source model; the null is computed on first use and only for directions that
the cache does not hold yet. Given target strings, it also returns each model's target
effect and its z-score and percentile among the null directions' target effects; a null
direction's target changes are measured at its stored iso-KL coefficients the first time a
target is asked for, and kept with its `Effect` (so `save_null` keeps them too).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.files import atomic_write_text
from engine.models.loading import LoadedModel
from engine.steering.effects.measure import (
    Effect,
    EffectsConfig,
    check_targets,
    mean_target_effect,
    measure_vectors,
    target_changes,
)
from engine.steering.effects.null import random_directions, standing
from engine.steering.effects.probe import Probe
from engine.steering.stitching import Stitch

MODELS = ("a", "b")


def settings_key(cfg: EffectsConfig, stitch: Stitch, models: dict[str, tuple[str, int]]) -> str:
    """What makes measurements comparable, as a short digest: the settings, the stitch and
    the models (name, layer) by side."""
    payload = {
        **cfg.key_payload(),
        "stitch": stitch.fingerprint,
        "models": {m: [models[m][0], int(models[m][1])] for m in MODELS},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EffectSession:
    """Probes of both models, the stitch between them, the activation sample the null is
    drawn from, and the null's effects by (source model, direction number)."""

    def __init__(
        self,
        models: dict[str, LoadedModel],
        layers: dict[str, int],
        stitch: Stitch,
        cfg: EffectsConfig | None = None,
        sample: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.cfg = cfg or EffectsConfig()
        self.stitch = stitch
        self.models, self.layers = models, layers
        self.probes = {
            m: Probe(models[m], layers[m], self.cfg.prompts, self.cfg.chat, self.cfg.positions)
            for m in MODELS
        }
        self._sample = sample
        self.nulls: dict[tuple[str, int], Effect] = {}

    @property
    def key(self) -> str:
        """What makes measurements comparable (`settings_key`)."""
        names = {m: (self.models[m].name, self.layers[m]) for m in MODELS}
        return settings_key(self.cfg, self.stitch, names)

    def translate(self, vector: torch.Tensor, source: str) -> dict[str, torch.Tensor]:
        """The vector for each model: itself in `source`, its stitched copy in the other."""
        target = "b" if source == "a" else "a"
        return {source: vector.float(), target: self.stitch.map(vector.float(), source).float()}

    def measure(self, vector: torch.Tensor, source: str, targets: Sequence[str] = ()) -> Effect:
        """A vector steering `source` (and its stitched copy the other model), read against
        the null of `source`; with targets (these and the settings'), also each model's
        target effect against the null's."""
        check_targets(targets)
        effect = measure_vectors(
            self.probes, self.translate(vector, source), source, self.cfg, targets
        )
        self.rank(effect)
        wanted = list(dict.fromkeys([*self.cfg.targets, *targets]))
        if wanted:
            self.rank_targets(effect, wanted)
        return effect

    def rank(self, effect: Effect) -> Effect:
        """`effect` with its z-score and percentile against its source model's null, and
        its iso-KL coefficients against the null's (as z-scores of the log)."""
        null = self.null(effect.source)
        effect.z, effect.percentile = standing(effect.exclusivity, [e.exclusivity for e in null])
        effect.null_n = len(null)
        for m in MODELS:
            log_null = [float(torch.tensor(e.coefficients[m]).log()) for e in null]
            coef_z, _ = standing(float(torch.tensor(effect.coefficients[m]).log()), log_null)
            effect.companions[f"coef_z_{m}"] = coef_z
            out_z, _ = standing(effect.output[m], [e.output[m] for e in null])
            effect.companions[f"output_z_{m}"] = out_z
        return effect

    def rank_targets(self, effect: Effect, targets: Sequence[str]) -> Effect:
        """`effect` with each model's target effect (the mean odd change of `targets`, which
        it measured) and its z-score and percentile among the null directions' of its
        source model."""
        null = self.null_targets(effect.source, targets)
        effect.target_effect = mean_target_effect(effect.targets, targets, MODELS)
        for m in MODELS:
            values = [mean_target_effect(changes, targets, [m])[m] for changes in null]
            z, pct = standing(effect.target_effect[m], values)
            effect.target_z[m], effect.target_percentile[m] = z, pct
        return effect

    def null_targets(self, source: str, targets: Sequence[str]) -> list[dict[str, dict]]:
        """Per null direction of `source`: target -> model -> odd change, measured at the
        direction's iso-KL coefficients for the targets it does not hold yet."""
        null = self.null(source)
        directions = None
        for i, effect in enumerate(null):
            missing = [t for t in targets if t not in effect.targets]
            if not missing:
                continue
            if directions is None:
                directions = self.null_vectors(source)
            vectors = self.translate(directions[i], source)
            effect.targets.update(
                target_changes(self.probes, vectors, effect.coefficients, missing)
            )
        return [effect.targets for effect in null]

    def null_vectors(self, source: str) -> torch.Tensor:
        """The null's random directions in `source` [nulls, d], seeded by the settings."""
        sample = self._sample() if callable(self._sample) else self._sample
        if sample is None:
            from engine.errors import ConfigError

            raise ConfigError(
                "the null needs activations of both models to draw random directions from: "
                "give the session an activation sample (the run's store)"
            )
        self._sample = sample
        seed = self.cfg.seed * 1_000_003 + (0 if source == "a" else 1)
        power = self.cfg.null_power[0 if source == "a" else 1]
        return random_directions(sample[source], self.cfg.nulls, seed, power)

    def null(
        self, source: str, on_item: Callable[[int, Effect], None] | None = None
    ) -> list[Effect]:
        """The null's effects for `source`, measuring only directions not yet held."""
        missing = [i for i in range(self.cfg.nulls) if (source, i) not in self.nulls]
        if missing:
            directions = self.null_vectors(source)
            for i in missing:
                vectors = self.translate(directions[i], source)
                effect = measure_vectors(self.probes, vectors, source, self.cfg)
                self.nulls[(source, i)] = effect
                if on_item is not None:
                    on_item(i, effect)
        return [self.nulls[(source, i)] for i in range(self.cfg.nulls)]

    # -- a JSON cache, for callers without a results DB ------------------------------------

    def load_null(self, path: str | Path) -> int:
        """Read null effects measured with the same settings from a JSON file; how many."""
        path = Path(path)
        if not path.is_file():
            return 0
        data = json.loads(path.read_text())
        if data.get("key") != self.key:
            return 0
        for row in data.get("null", []):
            self.nulls[(row["source"], int(row["item"]))] = Effect.from_json(row["effect"])
        return len(data.get("null", []))

    def save_null(self, path: str | Path) -> Path:
        """Write the null effects held to a JSON file (keyed by the settings)."""
        rows = [
            {"source": s, "item": i, "effect": e.to_json()}
            for (s, i), e in sorted(self.nulls.items())
        ]
        atomic_write_text(Path(path), json.dumps({"key": self.key, "null": rows}) + "\n")
        return Path(path)
