"""Does a feature of an organism-bench cell raise the implanted answer, in which model, more
than random directions do? A judge-free check with the effect measure
(`engine.steering.effects`) where the organism decides how to answer:

- the probe's prompts are held-out CONTROL requests of the behaviour, rendered in each
  model's own chat form up to the answer header (`chat=True`);
- the feature's decoder is added at the header's last token only (`positions="last"`), in
  its own model, and its stitched copy (the cell's stitch) in the other, each at the
  coefficient that moves its next-token distribution by the same KL;
- the target is the behaviour's fixed answer (the refusal sentence): each model's target
  effect, the odd change of its teacher-forced log-probability, is read against random
  directions drawn from the cell's activation store, as a z-score and percentile.

A feature is confirmed exclusive to its model when its target z there is >= 3 and the other
model's stays within the null (|z| < 2). The null is cached in the cell folder, keyed by the
settings, so several features share it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

CONFIRM_Z = 3.0  # the feature's own model: this far above the null's mean
WITHIN_Z = 2.0  # the other model: this close to the null's mean


def verify_features(
    cell_dir: str | Path,
    features: Sequence[int],
    behaviour_name: str = "copyright-refusal",
    models: tuple[str, str] | None = None,
    *,
    run: str = "dfc-0",
    n_prompts: int = 12,
    nulls: int = 16,
    budget: float = 0.5,
    seed: int = 0,
    loaded: dict[str, Any] | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """The target check of each feature of a cell's run (one session, one null); a dict per
    feature (`verify_feature`'s)."""
    session, crosscoder, normalizer, cache = open_cell_session(
        Path(cell_dir), behaviour_name, models, run=run, n_prompts=n_prompts, nulls=nulls,
        budget=budget, seed=seed, loaded=loaded,
    )  # fmt: skip
    if session.load_null(cache):
        log(f"null: read {len(session.nulls)} measured directions from {cache}")
    out = []
    for feature in features:
        out.append(measure_one(session, crosscoder, normalizer, int(feature)))
        session.save_null(cache)  # the null and its target changes, for the next feature
        log(format_result(out[-1]))
    return out


def verify_feature(cell_dir: str | Path, feature: int, **kwargs: Any) -> dict[str, Any]:
    """The target check of one feature of a cell's run: per model its target effect, z and
    percentile among the null's, and the verdict (`verify_features` takes the settings)."""
    return verify_features(cell_dir, [feature], **kwargs)[0]


def open_cell_session(
    cell_dir: Path,
    behaviour_name: str,
    models: tuple[str, str] | None,
    *,
    run: str,
    n_prompts: int,
    nulls: int,
    budget: float,
    seed: int,
    loaded: dict[str, Any] | None,
):
    """An effect session over a cell (its run's crosscoder and layers, its stitch and its
    store's activations for the null), the crosscoder and normaliser, and the null cache."""
    from engine.crosscoder.checkpoint import load_crosscoder, trained_on
    from engine.organisms.behaviours import behaviour
    from engine.steering.effects.measure import EffectsConfig
    from engine.steering.effects.null import store_sample
    from engine.steering.effects.session import EffectSession

    chosen = behaviour(behaviour_name)
    for need in (cell_dir / run, cell_dir / "store", cell_dir / "stitch.safetensors"):
        if not need.exists():
            raise ConfigError(
                f"{need} is missing: the check needs a bench cell's run, store and stitch "
                "(fit one with `modeldiff stitch --store CELL/store --out CELL/stitch.safetensors`)"
            )
    crosscoder, normalizer, _ = load_crosscoder(cell_dir / run)
    pair = trained_on(crosscoder)
    if pair is None or pair.a is None or pair.b is None:
        raise ConfigError(f"{cell_dir / run} records no models; it is not a bench cell's run")
    cfg = EffectsConfig(
        budget=budget, prompts=tuple(chosen.prompts("control", "heldout", n_prompts)),
        nulls=nulls, seed=seed, targets=(chosen.prefix,), chat=True, positions="last",
    )  # fmt: skip
    models_loaded = loaded or _load(models or (pair.a.name, pair.b.name))
    from engine.steering.stitching import Stitch

    stitch = Stitch.load(cell_dir / "stitch.safetensors")
    store = cell_dir / "store"
    session = EffectSession(
        models_loaded, {"a": pair.a.layer, "b": pair.b.layer}, stitch, cfg,
        lambda: store_sample(store, seed=cfg.seed),
    )  # fmt: skip
    return session, crosscoder, normalizer, cell_dir / f"effects-null-{session.key}.json"


def _load(specs: tuple[str, str]) -> dict[str, Any]:
    from engine.models.loading import load_model

    return {m: load_model(spec, dtype="float32") for m, spec in zip("ab", specs, strict=True)}


def measure_one(session, crosscoder, normalizer, feature: int) -> dict[str, Any]:
    """One feature's target check in a session: its decoder in the model it decodes into
    (A where it decodes into both), the stitched copy in the other."""
    from engine.steering.steer import feature_vector

    source = "a" if crosscoder.decodes(feature, "a") else "b"
    vector = feature_vector(crosscoder, normalizer, feature, source)
    effect = session.measure(vector, source)
    null = session.null_targets(source, list(session.cfg.targets))
    return {
        "feature": feature,
        "source": source,
        "target": session.cfg.targets[0],
        "target_effect": effect.target_effect,
        "target_z": effect.target_z,
        "target_percentile": effect.target_percentile,
        "null_target_effects": {
            m: [sum(c[t][m] for t in c) / len(c) for c in null] for m in ("a", "b")
        },
        "coefficients": effect.coefficients,
        "kl": effect.kl,
        "reached": effect.reached,
        "exclusivity": effect.exclusivity,
        "exclusivity_z": effect.z,
        "null_n": effect.null_n,
        "verdict": verdict(effect.target_z, source),
    }


def verdict(target_z: dict[str, float | None], source: str) -> str:
    """"confirmed A-exclusive" (or B-): the source model's target z >= CONFIRM_Z and the
    other's within the null; "shared" where both reach CONFIRM_Z; else "not separated"."""
    other = "b" if source == "a" else "a"
    own, theirs = target_z.get(source), target_z.get(other)
    if own is None or theirs is None or own < CONFIRM_Z:
        return "not separated"
    if abs(theirs) < WITHIN_Z:
        return f"confirmed {source.upper()}-exclusive"
    return "shared" if theirs >= CONFIRM_Z else "not separated"


def format_result(row: dict[str, Any]) -> str:
    """One line per feature: each model's target effect, z and percentile, the verdict."""
    parts = []
    for m in ("a", "b"):
        z, pct = row["target_z"].get(m), row["target_percentile"].get(m)
        z_text = "n/a" if z is None else f"{z:+.2f}"
        pct_text = "n/a" if pct is None else f"{pct:.0f}%"
        parts.append(f"{m.upper()} target effect {row['target_effect'][m]:+.3f} nats, "
                     f"z {z_text}, percentile {pct_text}")
    return (f"feature {row['feature']} ({row['source'].upper()} decoder, null n = "
            f"{row['null_n']}): " + "; ".join(parts) + f" -> {row['verdict']}")


def random_shared(cell_dir: str | Path, k: int, run: str = "dfc-0", seed: int = 0) -> list[int]:
    """`k` shared features of a cell's run that fire on its store, drawn at random (seeded):
    controls for the check."""
    from engine.categories import SHARED
    from engine.crosscoder.checkpoint import load_crosscoder
    from engine.organisms.bench import store_max_act

    crosscoder, normalizer, _ = load_crosscoder(Path(cell_dir) / run)
    max_act = store_max_act(crosscoder, normalizer, Path(cell_dir) / "store", max_rows=20_000)
    roles = crosscoder.partition.roles()
    alive = [i for i, r in enumerate(roles) if r == SHARED and max_act[i] > 0]
    if len(alive) < k:
        raise ConfigError(f"the run has only {len(alive)} live shared features")
    return sorted(random.Random(seed).sample(alive, k))
