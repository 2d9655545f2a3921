"""Analyst work stays with the crosscoder weights it was made on: a run records the
fingerprint of the weights analysed, every explanation, score and triage mark carries it,
and re-analysing the run id from other (retrained) weights is refused while that work
exists, instead of moving the verdicts onto different features."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.analysis.analyze import analyze
from engine.results import Database, ResultsDBError
from tests.tiny_run import build_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("weights"))


def retrain(run_dir) -> None:
    """Other weights in the same run folder, as `train --fresh` leaves them."""
    path = run_dir / "crosscoder.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.randn_like(tensors[name])
    save_file(tensors, path)


def test_verdicts_stay_with_the_weights_they_were_made_on(tiny, tmp_path):
    db_path = tiny.db
    with Database(db_path) as db:
        weights = db.run(tiny.run_id)["weights"]
        assert weights and len(weights) == 16
        db.set_triage(tiny.run_id, 1, "verified", "tea feature", "erin")
        db.add_explanation(tiny.run_id, 1, explainer="x", prompt_version="v", explanation="tea")
        assert set(db.triage(tiny.run_id)["weights"]) == {weights}
        assert set(db.triage_history(tiny.run_id)["weights"]) == {weights}
        assert set(db.explanations(tiny.run_id)["weights"]) == {weights}
        features = db.features(tiny.run_id)["max_act"].tolist()

    # The same weights analysed again keep the analyst's work.
    analyze(tiny.run_dir, tiny.store, db_path, run_id=tiny.run_id, progress=False)

    retrain(tiny.run_dir)
    with pytest.raises(ResultsDBError, match=r"other crosscoder weights.*--run-id"):
        analyze(tiny.run_dir, tiny.store, db_path, run_id=tiny.run_id, progress=False)
    with Database(db_path, read_only=True) as db:
        assert db.run(tiny.run_id)["weights"] == weights  # nothing replaced
        assert db.features(tiny.run_id)["max_act"].tolist() == features
        assert db.triage(tiny.run_id)["status"].tolist() == ["verified"]

    # Under a new run id the new weights are analysed beside the old ones.
    analyze(tiny.run_dir, tiny.store, db_path, run_id="retrained", progress=False)
    with Database(db_path, read_only=True) as db:
        assert db.run("retrained")["weights"] not in (None, weights)
        assert db.triage("retrained").empty


def test_a_run_without_analyst_work_is_replaced(tmp_path):
    with Database(tmp_path / "r.duckdb") as db:
        run = {"model_a": {}, "model_b": {}, "architecture": "dfc", "n_features": 2}
        db.add_run("r", partition={}, weights="aaaa", **run)
        db.add_run("r", partition={}, weights="bbbb", **run)  # nothing to move: allowed
        assert db.run("r")["weights"] == "bbbb"
        db.write_features("r", pd.DataFrame({"feature_id": [0, 1], "partition": ["shared"] * 2}))
        db.set_triage("r", 0, "verified")
        with pytest.raises(ResultsDBError, match="1 triage"):
            db.add_run("r", partition={}, weights="cccc", **run)
