"""An interrupt never leaves half a result: a calibration item's score and its
calibration row land together (else the item is scored, perhaps paid, again), `steer
--save` records every strength or none, and a figure is replaced whole."""

from __future__ import annotations

import pytest

from engine import stages
from engine.results import Database


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.tiny_run import build_tiny_run

    tmp = tmp_path_factory.mktemp("half-writes")
    run = build_tiny_run(tmp)
    _, path = stages.fit_stitch(run.store, tmp / "stitch.safetensors", steps=0, seed=0)
    return run, path


def test_a_calibration_score_and_its_row_land_together(tiny_run, monkeypatch):
    from engine.steering.calibration import CalibrationConfig, run_calibration
    from engine.steering.judges import OfflineSteeringJudge
    from engine.steering.pair import SteeringPair

    run, stitch = tiny_run
    ex = stages.exclusivity_config(alphas=[60], max_new_tokens=2, samples=1)
    ex = type(ex)(**{**ex.__dict__, "prompts": ex.prompts[:1]})
    cfg = CalibrationConfig(per_category=1, exclusivity=ex)

    def interrupted(*args, **kwargs):
        raise Interrupted

    with Database(run.db) as db:
        before = len(db.scores(run.run_id, metric="exclusivity"))
        pair = SteeringPair.open(db, run.run_id, stitch)
        monkeypatch.setattr(Database, "add_calibration", interrupted)
        with pytest.raises(Interrupted):
            run_calibration(db, run.run_id, pair, OfflineSteeringJudge(), cfg)
        # The score written just before the interrupt went with its missing row.
        assert len(db.scores(run.run_id, metric="exclusivity")) == before


def test_steer_save_records_every_strength_or_none(tiny_run, monkeypatch):
    from engine.steering.run import steer_feature
    from engine.steering.steer import GenerationConfig

    run, _ = tiny_run
    real = Database.add_steering_sample
    calls = []

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
        return real(self, *args, **kwargs)

    with Database(run.db) as db:
        feature = int(db.features(run.run_id, dead=False)["feature_id"].iloc[0])
        monkeypatch.setattr(Database, "add_steering_sample", second_fails)
        with pytest.raises(Interrupted):
            steer_feature(db, run.run_id, feature, "The river", alphas=[1.0, 2.0, 3.0],
                          cfg=GenerationConfig(max_new_tokens=2), save=True)  # fmt: skip
        assert db.steering_samples(run.run_id, feature).empty


def test_figures_are_replaced_whole(tmp_path):
    import pandas as pd

    path = tmp_path / "figure.html"
    path.write_text("an earlier figure")
    inode = path.stat().st_ino
    frame = pd.DataFrame(
        columns=["category", "value", "ci_low", "ci_high", "unfiltered", "interpretability",
                 "judge", "item", "feature_id", "details", "created_at"]
    )  # fmt: skip
    stages.calibration_figure(frame, path, "empty")
    assert path.stat().st_ino != inode  # a new file renamed into place, not rewritten
    assert "<html>" in path.read_text()
