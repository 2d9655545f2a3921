"""`steer`: generate with a run's feature added to a model, baseline and steered side by side.

The run's database row says which models and layers the crosscoder was trained on; the
feature's `s_max` comes from the analysis. A feature is steered in a model it decodes into;
asking for the other model (an exclusive feature's "other side") translates its vector
through the shared partition (paper B.4.5) and says so in the result.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.crosscoder.checkpoint import has_crosscoder, load_crosscoder
from engine.errors import ConfigError
from engine.models.loading import HUB_ID, INSTALL, LoadedModel, load_model
from engine.models.tokenizers import DEMO
from engine.results import Database
from engine.specs import SIDES, ModelSpec, PairSpec
from engine.steering.steer import (
    GenerationConfig,
    check_prompt,
    feature_vector,
    stream,
    sweep,
)
from engine.steering.transfer import transfer


@dataclass
class SteerResult:
    """Baseline and steered texts of one feature on one prompt, at each strength."""

    feature_id: int
    model: str  # "a" or "b": the model that generated
    prompt: str
    s_max: float
    alphas: list[float]
    baseline: str
    steered: list[str]
    transfer: dict[str, Any] | None = None  # set when the vector was translated
    sample_ids: list[int] = field(default_factory=list)


def steer_feature(
    db: Database,
    run_id: str,
    feature_id: int,
    prompt: str,
    *,
    model: str = "a",
    alphas: list[float] | None = None,
    cfg: GenerationConfig | None = None,
    positions: str = "all",
    loaded: LoadedModel | None = None,
    save: bool = False,
    author: str = "",
) -> SteerResult:
    """Steer `model` with a run's feature at each alpha (x s_max); optionally record samples."""
    if model not in ("a", "b"):
        raise ConfigError(f"model must be 'a' or 'b', got {model!r}")
    check_prompt(prompt)  # before any model loads
    cfg = cfg or GenerationConfig()
    alphas = list(alphas if alphas is not None else [0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    run = db.run(run_id)
    feature = db.feature(run_id, feature_id)
    s_max = float(feature["s_max"] or 0.0)
    if s_max <= 0:
        raise ConfigError(
            f"feature {feature_id} never activated in the analysis (s_max = 0); pick a live one"
        )
    cc, normalizer, _ = load_crosscoder(run["checkpoint_path"])
    spec = PairSpec.from_run(run).require(model, ConfigError)
    vector, moved = _vector(cc, normalizer, feature_id, model)
    loaded = loaded or load_model(spec.name)
    texts = sweep(loaded, prompt, vector, int(spec.layer), s_max, [0.0, *alphas], positions, cfg)
    result = SteerResult(feature_id, model, prompt, s_max, alphas, texts[0], texts[1:], moved)
    if save:
        with db.transaction():  # every strength's sample, or none
            for alpha, text in zip(alphas, result.steered, strict=True):
                result.sample_ids.append(
                    db.add_steering_sample(
                        run_id, feature_id, model=model, prompt=prompt, alpha=alpha,
                        s_max=s_max, seed=None if cfg.greedy else cfg.seed,
                        temperature=0.0 if cfg.greedy else cfg.temperature,
                        max_new_tokens=cfg.max_new_tokens, baseline=result.baseline,
                        steered=text, transfer=moved, author=author,
                    )
                )  # fmt: skip
    return result


def _vector(cc, normalizer, feature_id: int, model: str):
    """The feature's vector in `model`'s raw units, translated if it has no decoder there."""
    if cc.decodes(feature_id, model):
        return feature_vector(cc, normalizer, feature_id, model), None
    source = "b" if model == "a" else "a"
    own = feature_vector(cc, normalizer, feature_id, source)
    moved = transfer(cc, own, source, normalizer=normalizer)
    info = {
        "method": "shared-partition transfer (B.4.5)",
        "from": source,
        "features": moved.features,
        "weights": moved.weights,
    }
    return moved.vector, info


# -- one prompt at a time (the dashboard's steering panel) ---------------------------------


@dataclass(frozen=True)
class SteeringPlan:
    """How to steer one model with one feature of an analysed run."""

    feature_id: int
    model: str  # "a" or "b": the model that generates
    layer: int  # the block whose output the vector is added to
    s_max: float  # the strength unit: alpha = 1 adds the feature at its largest activation
    vector: torch.Tensor  # in the model's raw units
    transfer: dict[str, Any] | None = None  # set when the vector was translated (B.4.5)

    @property
    def note(self) -> str | None:
        """A sentence saying that (and how) the vector was translated, or None."""
        if self.transfer is None:
            return None
        source, target = self.transfer["from"].upper(), self.model.upper()
        n = len(self.transfer["features"])
        return (
            f"Model {target} has no decoder for this {source}-exclusive feature: steered with "
            f"its shared-partition transfer (the cosine-weighted decoders of {n} shared "
            f"feature{'s' if n != 1 else ''}, paper B.4.5)."
        )

    def stream(
        self,
        loaded: LoadedModel,
        prompt: str,
        alpha: float,
        cfg: GenerationConfig | None = None,
        positions: str = "all",
    ) -> Iterator[str]:
        """The continuation steered at strength alpha (x s_max), piece by piece."""
        return stream_text(
            loaded,
            prompt,
            vector=self.vector,
            layer=self.layer,
            coefficient=float(alpha) * self.s_max,
            positions=positions,
            cfg=cfg,
        )

    def sweep(
        self,
        loaded: LoadedModel,
        prompt: str,
        alphas: list[float],
        cfg: GenerationConfig | None = None,
        positions: str = "all",
    ) -> list[str]:
        """One continuation per strength alpha (x s_max), as a single batched generation."""
        return sweep(loaded, prompt, self.vector, self.layer, self.s_max, alphas, positions, cfg)

    def sample(
        self,
        prompt: str,
        alpha: float,
        cfg: GenerationConfig,
        baseline: str,
        steered: str,
        author: str = "",
    ) -> dict[str, Any]:
        """Keyword arguments of `Database.add_steering_sample` for one generation."""
        return {
            "model": self.model,
            "prompt": prompt,
            "alpha": float(alpha),
            "s_max": self.s_max,
            "seed": None if cfg.greedy else cfg.seed,
            "temperature": 0.0 if cfg.greedy else cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens,
            "baseline": baseline,
            "steered": steered,
            "transfer": self.transfer,
            "author": author,
        }


def stream_text(
    loaded: LoadedModel, prompt: str, cfg: GenerationConfig | None = None, **steer: Any
) -> Iterator[str]:
    """`steer.stream` with the sampling seed applied, so a sampled stream is reproducible."""
    if cfg is not None and not cfg.greedy:
        # The generation runs in a thread, but the CPU generator is global: seeding here
        # fixes what that thread draws.
        torch.manual_seed(cfg.seed)
    return stream(loaded, prompt, cfg=cfg, **steer)


def plan_steering(
    run: dict[str, Any], feature: dict[str, Any], model: str, crosscoder, normalizer
) -> SteeringPlan:
    """The plan to steer `model` with a feature (a `Database.feature` row) of `run`."""
    if model not in ("a", "b"):
        raise ConfigError(f"model must be 'a' or 'b', got {model!r}")
    feature_id = int(feature["feature_id"])
    s_max = float(feature.get("s_max") or 0.0)
    if s_max <= 0:
        raise ConfigError(
            f"feature {feature_id} never activated in the analysis (s_max = 0); pick a live one"
        )
    layer = PairSpec.from_run(run).layer(model, ConfigError)
    vector, moved = _vector(crosscoder, normalizer, feature_id, model)
    return SteeringPlan(feature_id, model, layer, s_max, vector, moved)


def steering_problem(run: dict[str, Any]) -> str | None:
    """Why this run's models or crosscoder cannot be loaded here, or None if they may be.

    Cheap checks only (nothing is loaded): a model that passes may still fail to load, e.g. a
    hub id with no network.
    """
    if importlib.util.find_spec("transformers") is None:
        return f"the model libraries are not installed ({INSTALL})"
    checkpoint = run.get("checkpoint_path")
    if not checkpoint:
        return "the run records no crosscoder checkpoint"
    if not has_crosscoder(checkpoint):
        return f"no trained crosscoder at `{checkpoint}` (moved or deleted?)"
    models = PairSpec.from_run(run)
    for key in SIDES:
        problem = models.missing(key) or _model_problem(key, models[key])
        if problem:
            return problem
    return None


def _model_problem(key: str, spec: ModelSpec) -> str | None:
    """Why a recorded model cannot be loaded here (cheap checks only), or None."""
    name = spec.name
    if name in DEMO:
        if importlib.util.find_spec(DEMO[name].package) is None:
            return f"demo model {name!r} is not installed (run: {DEMO[name].pip})"
    elif not HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        # Not a hub id, so a path: it must be here (a hub id is only tried at load time).
        return f"model {key.upper()} `{name}` does not exist on this machine"
    return None
