"""`steer`: generate with a run's feature added to a model, baseline and steered side by side.

The run's database row says which models and layers the crosscoder was trained on; the
feature's `s_max` comes from the analysis. A feature is steered in a model it decodes into;
asking for the other model (an exclusive feature's "other side") translates its vector
through the shared partition (paper B.4.5) and says so in the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import ConfigError
from engine.crosscoder.checkpoint import load_crosscoder
from engine.models.loading import LoadedModel, load_model
from engine.steering.steer import GenerationConfig, feature_vector, sweep
from engine.steering.transfer import transfer
from engine.store import Database


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
    spec = run[f"model_{model}"]
    vector, moved = _vector(cc, normalizer, feature_id, model)
    loaded = loaded or load_model(spec["name"])
    texts = sweep(loaded, prompt, vector, int(spec["layer"]), s_max, [0.0, *alphas], positions, cfg)
    result = SteerResult(feature_id, model, prompt, s_max, alphas, texts[0], texts[1:], moved)
    if save:
        for alpha, text in zip(alphas, result.steered, strict=True):
            result.sample_ids.append(
                db.add_steering_sample(
                    run_id, feature_id, model=model, prompt=prompt, alpha=alpha, s_max=s_max,
                    seed=None if cfg.greedy else cfg.seed,
                    temperature=0.0 if cfg.greedy else cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens, baseline=result.baseline, steered=text,
                    transfer=moved, author=author,
                )
            )  # fmt: skip
    return result


def _vector(cc, normalizer, feature_id: int, model: str):
    """The feature's vector in `model`'s raw units, translated if it has no decoder there."""
    if int(cc._rows(model)[feature_id]) >= 0:
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
