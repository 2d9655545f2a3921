"""The effect measure over a run's features, with the null computed once per run, stitch and
settings and kept in the results DB; and `measure_feature`, the one-call form other code
(the organisms' checks) uses for a feature or a raw direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from engine.errors import ConfigError
from engine.models.loading import LoadedModel
from engine.results import Database
from engine.specs import PairSpec
from engine.steering.effects.measure import Effect, EffectsConfig
from engine.steering.effects.null import store_sample
from engine.steering.effects.session import MODELS, EffectSession, settings_key
from engine.steering.pair import SteeringPair
from engine.steering.stitching import Stitch

FEATURE, NULL, DIRECTION = "feature", "null", "direction"


def open_session(
    pair: SteeringPair, cfg: EffectsConfig | None = None, store: str | Path | None = None
) -> EffectSession:
    """A session over a steering pair; the null is drawn from `store` (default: the run's
    activation store), read only when a null direction must be measured."""
    path = store or pair.run.get("store_path")
    if not path:
        raise ConfigError(
            "the run records no activation store to draw the null's random directions from; "
            "pass one (--store)"
        )
    cfg = cfg or EffectsConfig()
    return EffectSession(
        pair.models, pair.layers, pair.stitch, cfg, lambda: store_sample(path, seed=cfg.seed)
    )


def load_null(db: Database, run_id: str, session: EffectSession) -> int:
    """Put the null effects stored with the session's settings into it; how many."""
    stored = db.effects(run_id, settings=session.key, kind=NULL)
    for row in stored.to_dict("records"):
        session.nulls[(row["source"], int(row["item"]))] = Effect.from_json(row["details"])
    return len(stored)


def ensure_null(
    db: Database,
    run_id: str,
    session: EffectSession,
    sources: Sequence[str] = MODELS,
    on_item: Callable[[str, int], None] | None = None,
) -> None:
    """Measure and store the null directions of `sources` not yet stored (resumable)."""
    load_null(db, run_id, session)
    for source in sources:

        def store(i: int, effect: Effect, source: str = source) -> None:
            db.add_effect(
                run_id, settings=session.key, kind=NULL, item=i, feature_id=None,
                source=source, similarity=effect.similarity, exclusivity=effect.exclusivity,
                z=None, percentile=None, details=effect.to_json(),
            )  # fmt: skip
            if on_item is not None:
                on_item(source, i)

        session.null(source, store)


def measure_features(
    db: Database,
    run_id: str,
    pair: SteeringPair,
    features: Sequence[int],
    cfg: EffectsConfig | None = None,
    *,
    store: str | Path | None = None,
    source: str | None = None,
    targets: Sequence[str] = (),
    force: bool = False,
    on_item: Callable[[str, int], None] | None = None,
    session: EffectSession | None = None,
) -> list[tuple[int, Effect]]:
    """Measure each feature (skipping those stored with the same settings, unless `force`)
    against the run's null, store them, and return (feature id, effect) for those measured."""
    session = session or open_session(pair, cfg, store)
    done = set()
    if not force:
        stored = db.effects(run_id, settings=session.key, kind=FEATURE)
        done = set(stored["item"].astype(int))
    todo = [int(f) for f in features if int(f) not in done]
    if not todo:
        return []
    ensure_null(db, run_id, session, on_item=on_item)
    out = []
    for fid in todo:
        vector, model = feature_direction(pair, fid, source)
        effect = session.measure(vector, model, targets)
        db.add_effect(
            run_id, settings=session.key, kind=FEATURE, item=fid, feature_id=fid,
            source=model, similarity=effect.similarity, exclusivity=effect.exclusivity,
            z=effect.z, percentile=effect.percentile, details=effect.to_json(),
        )  # fmt: skip
        out.append((fid, effect))
        if on_item is not None:
            on_item(FEATURE, fid)
    return out


def pending(
    db: Database, run_id: str, stitch: Stitch, features: Sequence[int], cfg: EffectsConfig
) -> list[int]:
    """The features not yet measured with these settings, stitch and the run's models
    (found without loading a model)."""
    spec = PairSpec.from_run(db.run(run_id))
    names = {m: (spec.require(m, ConfigError).name, spec.layer(m, ConfigError)) for m in MODELS}
    stored = db.effects(run_id, settings=settings_key(cfg, stitch, names), kind=FEATURE)
    done = set(stored["item"].astype(int))
    return [int(f) for f in features if int(f) not in done]


def feature_direction(
    pair: SteeringPair, feature_id: int, source: str | None = None
) -> tuple[torch.Tensor, str]:
    """A feature's decoder in raw units and the model it steers: the one it decodes into
    (for a feature both decode, `source`, else the model its decoder leans to)."""
    has = {m: pair.crosscoder.decodes(feature_id, m) for m in MODELS}
    if has["a"] and has["b"]:
        if source is None:
            with torch.no_grad():
                na = float(pair.crosscoder.decoder_matrix("a")[feature_id].norm())
                nb = float(pair.crosscoder.decoder_matrix("b")[feature_id].norm())
            source = "a" if na >= nb else "b"
    else:
        source = "a" if has["a"] else "b"
    vectors = pair.vectors(feature_id, 1.0, source)
    return vectors.source_vector, vectors.source


def measure_feature(
    db: Database | str | Path,
    run_id: str,
    stitch: Stitch | str | Path,
    *,
    feature: int | None = None,
    direction: torch.Tensor | None = None,
    source: str | None = None,
    targets: Sequence[str] = (),
    cfg: EffectsConfig | None = None,
    models: dict[str, LoadedModel] | None = None,
    store: str | Path | None = None,
    pair: SteeringPair | None = None,
) -> Effect:
    """The effect measure of one feature, or of a raw `direction` in model `source`, with
    its z-score and percentile against the run's null (computed once and stored in the
    results DB) and its per-model effects; `targets` (e.g. a marker sentence) join the
    string panel, and each model's target effect is read against the null directions'
    (`Effect.target_z`, `target_percentile`; the null's target changes are measured on each
    call, not stored). Nothing about the measured item is stored."""
    if (feature is None) == (direction is None):
        raise ConfigError("measure either a feature or a direction, not both or neither")
    if direction is not None and source not in MODELS:
        raise ConfigError("a raw direction needs the model it steers: source='a' or 'b'")
    own = db if isinstance(db, Database) else Database(db, create=False, hold=False)
    try:
        pair = pair or SteeringPair.open(own, run_id, stitch, models=models)
        session = open_session(pair, cfg, store)
        ensure_null(own, run_id, session)
        if direction is None:
            direction, source = feature_direction(pair, int(feature), source)
        return session.measure(direction, source, targets)
    finally:
        if own is not db:
            own.close()


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest row of each (kind, item) among the newest settings' rows."""
    if frame.empty:
        return frame
    frame = frame[frame["settings"] == frame["settings"].iloc[-1]]
    return frame.drop_duplicates(["kind", "item", "source"], keep="last")
