"""A run's two models, crosscoder and stitch, ready to steer a feature in either model.

The exclusivity score and the steering evaluations both steer a feature in the model it
decodes into (its *source*) and its stitched translation in the other model (the
*target*), over many prompts and strengths. `SteeringPair` loads everything once and
generates all strengths of a prompt as one batched generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.crosscoder.checkpoint import load_crosscoder
from engine.crosscoder.model import Crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.errors import ConfigError
from engine.models.loading import LoadedModel, load_model
from engine.results import Database
from engine.specs import SIDES, PairSpec
from engine.steering.steer import GenerationConfig, Grid, feature_vector, generate_grid
from engine.steering.stitching import Stitch
from engine.steering.transfer import other_model

Texts = dict[str, dict[float, str]]  # prompt -> strength -> generated text


@dataclass
class FeatureVectors:
    """A feature's steering vectors in raw units: its own decoder and the stitched copy."""

    feature_id: int
    source: str  # the model whose decoder is used
    target: str  # the model steered with the stitched vector
    s_max: float
    source_vector: torch.Tensor
    target_vector: torch.Tensor

    def vector(self, model: str) -> torch.Tensor:
        """The vector that steers `model`."""
        return self.source_vector if model == self.source else self.target_vector

    def describe(self, model: str) -> str:
        """How `model` is steered, for tables and plots."""
        if model == self.source:
            return f"model {model.upper()}: own decoder"
        return f"model {model.upper()}: stitched from model {self.source.upper()}"


class SteeringPair:
    """Both models of a run, its crosscoder, and a stitch between the models."""

    def __init__(
        self,
        run: dict[str, Any],
        crosscoder: Crosscoder,
        normalizer: Normalizer,
        stitch: Stitch,
        models: dict[str, LoadedModel],
    ) -> None:
        self.run, self.crosscoder, self.normalizer = run, crosscoder, normalizer
        self.stitch, self.models = stitch, models
        recorded = PairSpec.from_run(run)
        self.layers = {m: recorded.layer(m, ConfigError) for m in SIDES}
        _check_stitch(stitch, crosscoder)

    @classmethod
    def open(
        cls,
        db: Database,
        run_id: str,
        stitch: Stitch | str | Path,
        models: dict[str, LoadedModel] | None = None,
        device: str = "auto",
    ) -> SteeringPair:
        """Load a run's checkpoint, the stitch, and (unless given) both models."""
        run = db.run(run_id)
        if not run.get("checkpoint_path"):
            raise ConfigError(f"run {run_id!r} has no checkpoint path; run `modeldiff analyze`")
        crosscoder, normalizer, _ = load_crosscoder(run["checkpoint_path"])
        if not isinstance(stitch, Stitch):
            stitch = Stitch.load(stitch)
        # Before the models load (minutes): a stitch of another pair or layer is refused now.
        stitch.check_run(run, run_id)
        _check_stitch(stitch, crosscoder)
        models = dict(models or {})
        recorded = PairSpec.from_run(run)
        for m in SIDES:
            if m not in models:
                models[m] = load_model(recorded.require(m, ConfigError).name, device=device)
        return cls(run, crosscoder, normalizer, stitch, models)

    def vectors(self, feature_id: int, s_max: float, source: str = "a") -> FeatureVectors:
        """The feature's own vector and its stitched copy; the source is the model it
        decodes into (`source` is used for features both models decode)."""
        has = {m: self.crosscoder.decodes(feature_id, m) for m in ("a", "b")}
        if not (has["a"] and has["b"]):
            source = "a" if has["a"] else "b"
        own = feature_vector(self.crosscoder, self.normalizer, feature_id, source)
        moved = self.stitch.map(own, source)
        target = other_model(source)
        return FeatureVectors(feature_id, source, target, float(s_max), own, moved)

    def generate(
        self,
        model: str,
        vectors: FeatureVectors,
        prompts: Sequence[str],
        alphas: Sequence[float],
        cfg: GenerationConfig,
        samples: int = 1,
    ) -> Grid:
        """`model` steered with `vectors`' vector for it: every prompt x sample x strength
        (alpha x s_max), batched (`steer.generate_grid`)."""
        return generate_grid(
            self.models[model], prompts, alphas, vector=vectors.vector(model),
            layer=self.layers[model], s_max=vectors.s_max, samples=samples, cfg=cfg,
        )  # fmt: skip


def _check_stitch(stitch: Stitch, crosscoder: Crosscoder) -> None:
    """A ConfigError if the stitch maps between other widths than the run's models."""
    if (stitch.d_a, stitch.d_b) != (crosscoder.d_a, crosscoder.d_b):
        raise ConfigError(
            f"the stitch maps {stitch.d_a} -> {stitch.d_b} dims but the run's models have "
            f"{crosscoder.d_a} and {crosscoder.d_b}; train one on this run's store with "
            "`modeldiff stitch --store ...`"
        )
