"""`modeldiff demo` end to end on the real demo models, scaled down, then run again: the
second run must reuse every stage and change nothing."""

from __future__ import annotations

import time

import pytest

from engine.demo import RUN_ID, DemoSettings, run_demo
from engine.results import Database

pytestmark = pytest.mark.slow

STAGES = [
    "harvest",
    "train",
    "analyze",
    "evaluate",
    "explain",
    "score",
    "stitch",
    "exclusivity",
    "effects",
    "steer-eval",
]


def small_settings() -> DemoSettings:
    """The demo preset shrunk to a couple of minutes on 2 CPU cores."""
    return DemoSettings(
        progress=False,
        explain_limit=40,
        exclusivity_tokens=6,
        calibration_per_category=1,
        effects_nulls=2,
        eval_prompts=2,
        eval_alphas=(-4.0, 0.0, 4.0),
        eval_tokens=6,
        stitch_steps=20,
        overrides={
            "harvest": {"max_pairs": 3000, "context_length": 128},
            "crosscoder": {"n_features": 512},
            "train": {
                "steps": 60,
                "batch_size": 256,
                "warmup_steps": 10,
                "anneal_steps": 30,
                "checkpoint_every": 30,
                "log_every": 20,
                "dead_window_tokens": 7680,
            },
        },
    )


def counts(db_path) -> dict[str, int]:
    with Database(db_path, read_only=True) as db:
        return {
            "features": len(db.features(RUN_ID)),
            "explanations": len(db.explanations(RUN_ID)),
            "scores": len(db.scores(RUN_ID)),
            "exclusivity": len(db.scores(RUN_ID, metric="exclusivity")),
            "evaluations": len(db.evaluations(RUN_ID)),
        }


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A scaled-down demo run, with the counts right after it."""
    out = tmp_path_factory.mktemp("demo")
    demo = run_demo(out, small_settings())
    return out, demo, counts(demo.db)


def test_demo_runs_every_stage_then_reuses_them(demo_dir):
    tmp_path, demo, first = demo_dir
    assert list(demo.timings) == [*STAGES, "total"]
    assert first["features"] == 512 and first["explanations"] == 40
    # The calibration scores one feature per category (A-, B-exclusive, shared) and one
    # random direction; its features get exclusivity scores.
    assert 1 <= first["exclusivity"] <= 4 and first["scores"] > first["exclusivity"]
    assert first["evaluations"] == 1 and list(tmp_path.glob("steer-eval-*.html"))
    # Its short settings are the ones used, and its note says so.
    with Database(demo.db, read_only=True) as db:
        details = db.calibration(RUN_ID)["details"].tolist()
    assert all(d["alphas"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0] for d in details)
    note = demo.timings["exclusivity"]["note"]
    assert "strengths 0, 2, 4, 6, 8, 10 (paper: 0, 1, ..., 10)" in note
    assert (tmp_path / "timings.json").is_file() and demo.stitch.is_file()

    start = time.perf_counter()
    again = run_demo(tmp_path, small_settings())
    assert time.perf_counter() - start < 60
    for stage in ("harvest", "train", "analyze", "evaluate", "stitch"):
        assert again.timings[stage]["note"].startswith("cached"), again.timings[stage]
    assert counts(demo.db) == first


def test_a_trained_feature_steers_the_real_demo_model(demo_dir):
    """Steering SmolLM2 with one of its own trained features changes what it writes, and
    alpha 0 leaves the greedy baseline unchanged."""
    from engine.steering.run import steer_feature

    _, demo, _ = demo_dir
    with Database(demo.db) as db:
        live = db.features(RUN_ID, partition="a_exclusive", dead=False)
        feature = int(live.sort_values("max_act", ascending=False).feature_id.iloc[0])
        result = steer_feature(
            db, RUN_ID, feature, "Tell me about your weekend.", model="a",
            alphas=[0.0, 12.0], save=True,
        )  # fmt: skip
        saved = db.steering_samples(RUN_ID, feature)
    assert result.steered[0] == result.baseline  # alpha 0 adds nothing
    assert result.steered[1] != result.baseline
    assert len(saved) == 2 and set(saved.model) == {"a"}
