"""Exclusive candidates beyond the exclusive partitions: leaning shared features, how
`modeldiff exclusivity` picks them, and the dead fraction per partition of a run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from engine.analysis.run_metrics import (
    ALL,
    dead_fractions,
    dead_history,
    partition_size_history,
)
from engine.categories import (
    A_LEANING_ABOVE,
    B_LEANING_BELOW,
    CANDIDATES,
    CATEGORIES,
    LABELS,
    category,
)
from engine.config import ConfigError
from engine.results import Database
from engine.steering.exclusivity import (
    ExclusivityConfig,
    default_categories,
    exclusivity_run,
    pick_features,
    steering_source,
)
from engine.steering.judges import Verdict

RUN = "run"


def test_category_of_a_feature():
    assert (B_LEANING_BELOW, A_LEANING_ABOVE) == (0.2, 0.8)
    assert category("shared", 0.81) == "a_leaning" and category("shared", 0.19) == "b_leaning"
    assert category("shared", 0.8) == category("shared", 0.2) == category("shared", 0.5) == "shared"
    assert category("shared", None) == category("shared", math.nan) == "shared"
    assert category("shared", pd.NA) == "shared"
    # Only shared features lean: exclusive and designated features keep their partition.
    assert category("a_exclusive", 0.0) == "a_exclusive"
    assert category("designated_shared", 0.95) == "designated_shared"
    assert set(LABELS) == set(CATEGORIES) and LABELS["b_leaning"] == "B-leaning shared"


# -- picking features for the exclusivity score ----------------------------------------------


def make_run(db: Database, run_id: str, partitions: list[str], rel_norms: list[float]) -> None:
    """A run of features with these partitions and relative decoder norms; feature f has
    max activation f + 1 and the last feature is dead."""
    n = len(partitions)
    db.add_run(
        run_id,
        model_a={"name": "a"},
        model_b={"name": "b"},
        architecture="dfc" if set(partitions) != {"shared"} else "standard",
        n_features=n,
        partition={p: partitions.count(p) for p in set(partitions)},
    )
    ids = np.arange(n)
    frame = pd.DataFrame(
        {
            "feature_id": ids,
            "partition": partitions,
            "max_act": ids + 1.0,
            "s_max": ids + 1.0,
            "rel_norm": rel_norms,
            "dead": ids == n - 1,
        }
    )
    db.write_features(run_id, frame)


@pytest.fixture
def db(tmp_path):
    """A DFC run: A-exclusive 0-1, B-exclusive 2-3, shared 4-10 (4, 5, 10 A-leaning;
    6 B-leaning; 10 dead)."""
    with Database(tmp_path / "r.duckdb") as db:
        partitions = ["a_exclusive"] * 2 + ["b_exclusive"] * 2 + ["shared"] * 7
        norms = [1.0, 1.0, 0.0, 0.0, 0.9, 0.85, 0.1, 0.5, 0.5, 0.5, 0.99]
        make_run(db, RUN, partitions, norms)
        yield db


def test_exclusivity_picks_exclusive_partitions_by_default(db):
    assert default_categories(db, RUN) == ("a_exclusive", "b_exclusive")
    # Strongest first within each partition.
    assert sorted(pick_features(db, RUN, 1)) == [1, 3]
    assert sorted(pick_features(db, RUN, 5)) == [0, 1, 2, 3]


def test_exclusivity_picks_leaning_shared_features_on_request(db):
    # Live leaning features only (10 is dead), strongest first in each category.
    assert sorted(pick_features(db, RUN, 5, ["a_leaning", "b_leaning"])) == [4, 5, 6]
    assert pick_features(db, RUN, 1, ["a_leaning"]) == [5]
    # Flagged harmful goes first, whatever its activation.
    db.add_explanation(RUN, 4, explainer="x", prompt_version="1", explanation="bombs", harmful=True)
    assert pick_features(db, RUN, 1, ["a_leaning"]) == [4]
    assert sorted(pick_features(db, RUN, 1, list(CANDIDATES))) == [1, 3, 4, 6]
    with pytest.raises(ConfigError, match="cannot pick features of 'shared'"):
        pick_features(db, RUN, 1, ["shared"])


def test_a_standard_crosscoder_picks_its_leaning_features_by_default(tmp_path):
    with Database(tmp_path / "s.duckdb") as db:
        make_run(db, "standard", ["shared"] * 6, [0.95, 0.5, 0.1, 0.3, 0.85, 0.9])
        assert default_categories(db, "standard") == CANDIDATES
        assert sorted(pick_features(db, "standard", 5)) == [0, 2, 4]  # 5 is dead


def test_leaning_features_steer_from_the_model_they_lean_to():
    assert steering_source("a_leaning") == "a" and steering_source("b_leaning") == "b"
    assert steering_source("shared") == "a" and steering_source("b_exclusive") == "b"
    assert steering_source("b_leaning", requested="a") == "a"  # --source wins


class FakePair:
    """A steering pair that records which model each feature is steered from."""

    def __init__(self) -> None:
        self.sources: dict[int, str] = {}
        self.stitch = SimpleNamespace(fve={"a_to_b": 0.5}, info={})

    def vectors(self, feature_id: int, s_max: float, source: str) -> SimpleNamespace:
        self.sources[feature_id] = source
        return SimpleNamespace(
            feature_id=feature_id, source=source, target="b" if source == "a" else "a",
            s_max=s_max,
        )  # fmt: skip

    def generate(self, model, vectors, prompts, alphas, cfg, samples=1) -> dict:
        return {
            (p, j): {a: f"{model} at {a}" for a in alphas} for p in prompts for j in range(samples)
        }


class FakeJudge:
    name, prompt_version = "fake", "1"

    def interpretability(self, prompt, responses) -> Verdict:
        return Verdict(4.0, "clear")

    def similarity(self, prompt, source, target) -> Verdict:
        return Verdict(2.0, "different")


def test_exclusivity_run_steers_leaning_features_from_their_model(db):
    pair = FakePair()
    results = exclusivity_run(db, RUN, pair, FakeJudge(), [4, 6, 7], ExclusivityConfig(alphas=(1,)))
    assert pair.sources == {4: "a", 6: "b", 7: "a"}  # A-leaning, B-leaning, neither
    assert [r.exclusivity for r in results] == [4.0, 4.0, 4.0]
    stored = db.scores(RUN, metric="exclusivity").set_index("feature_id")["details"]
    assert stored[6]["source"] == "b" and stored[6]["target"] == "a"
    # An explicit source applies to every feature both models decode.
    pair = FakePair()
    cfg = ExclusivityConfig(alphas=(1,), source="a")
    exclusivity_run(db, RUN, pair, FakeJudge(), [6], cfg, force=True)
    assert pair.sources == {6: "a"}


def test_exclusivity_command_takes_categories():
    from engine import stages
    from engine.cli import build_parser

    parser = build_parser()
    base = ["exclusivity", "--db", "r.duckdb", "--run-id", RUN, "--stitch", "s.safetensors"]
    args = parser.parse_args([*base, "--categories", "a_leaning", "b_exclusive"])
    assert args.categories == ["a_leaning", "b_exclusive"] and args.source is None
    assert parser.parse_args(base).categories is None
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--categories", "shared"])
    # Left out, --source is None and steer-eval's config default (model a) applies.
    steer_eval = ["steer-eval", *base[1:], "--feature", "1", "--rubric", "gpt_mention"]
    args = parser.parse_args(steer_eval)
    assert stages.eval_config(args.rubric, source=args.source).source == "a"


# -- dead fraction per partition --------------------------------------------------------------


def test_dead_fractions_per_partition_from_training_metrics():
    metrics = {
        "dead_frac": 0.4,
        "dead_frac_shared": 0.1,
        "dead_frac_a_exclusive": 0.25,
        "dead_frac_b_exclusive": float("nan"),
        "fve_a": 0.9,
    }
    assert dead_fractions(metrics) == {"a_exclusive": 0.25, "shared": 0.1}
    assert dead_fractions({}) == {}


def test_dead_history_in_long_form():
    history = pd.DataFrame(
        {
            "step": [50, 100],
            "loss": [2.0, 1.0],
            "dead_frac": [0.0, 0.5],
            "dead_frac_b_exclusive": [0.2, 0.9],
        }
    )
    long = dead_history(history)
    assert list(long.columns) == ["step", "partition", "dead_frac"]
    rows = {(r.step, r.partition): r.dead_frac for r in long.itertuples()}
    assert rows == {(50, ALL): 0.0, (100, ALL): 0.5, (50, "b_exclusive"): 0.2,
                    (100, "b_exclusive"): 0.9}  # fmt: skip
    assert dead_history(pd.DataFrame()).empty
    assert dead_history(history[["step", "loss"]]).empty


def test_partition_size_history_in_long_form():
    history = pd.DataFrame(
        {"step": [50, 100], "loss": [2.0, 1.0], "n_a_exclusive": [205, 210],
         "n_b_exclusive": [205, 31]}
    )  # fmt: skip
    long = partition_size_history(history)
    rows = {(r.step, r.partition): r.features for r in long.itertuples()}
    assert rows == {(50, "a_exclusive"): 205, (100, "a_exclusive"): 210,
                    (50, "b_exclusive"): 205, (100, "b_exclusive"): 31}  # fmt: skip
    assert partition_size_history(history[["step", "loss"]]).empty
