"""The results database: round trips, replacement, joins, safety, migrations, threads."""

from __future__ import annotations

import subprocess
import sys
import threading

import duckdb
import numpy as np
import pandas as pd
import pytest

from engine.categories import CANDIDATES, category
from engine.contexts import Context
from engine.results import schema
from engine.results.db import Database, ResultsDBError

RUN = "run-1"
NASTY = "x'; DROP TABLE runs; --"
PARTS = ["a_exclusive"] * 2 + ["b_exclusive"] * 2 + ["designated_shared"] * 2 + ["shared"] * 6
N = len(PARTS)


def add_run(db: Database, run_id: str = RUN, **overrides) -> None:
    """Record a run with realistic metadata."""
    fields = {
        "name": "smollm2 vs gemma3",
        "model_a": {"name": "smollm2", "source": "demo", "layer": 15, "d_model": 576},
        "model_b": {"name": "gemma3", "source": "demo", "layer": 9, "d_model": 640},
        "architecture": "dfc",
        "n_features": N,
        "partition": {"a_exclusive": 2, "b_exclusive": 2, "designated_shared": 2, "shared": 6},
        "config": {"train": {"k": np.int64(4), "lr": 1e-4}},
        "metrics": {"fve_a": 0.8, "fve_b": float("nan")},
        "checkpoint_path": "runs/r/ckpt",
        "store_path": "runs/r/store",
        "provenance": {"torch": "2.13", "sha": "abc"},
    }
    db.add_run(run_id, **{**fields, **overrides})


def features_frame(scale: float = 1.0) -> pd.DataFrame:
    """Per-feature statistics as the analysis writes them (NaN where a decoder is absent)."""
    rng = np.random.default_rng(0)
    ids = np.arange(N)
    a_excl = np.array([p == "a_exclusive" for p in PARTS])
    b_excl = np.array([p == "b_exclusive" for p in PARTS])
    norm_a = np.where(b_excl, np.nan, rng.random(N))
    norm_b = np.where(a_excl, np.nan, rng.random(N))
    return pd.DataFrame(
        {
            "feature_id": ids,
            "partition": PARTS,
            "density": rng.random(N) * 0.01,
            "n_active": rng.integers(0, 1000, N),
            "max_act": (ids + 1.0) * scale,
            "mean_act": rng.random(N),
            "hist_counts": [rng.integers(0, 50, 8) for _ in ids],
            "hist_edges": [np.linspace(0, i + 1, 9) for i in ids],
            "dec_norm_a": norm_a,
            "dec_norm_b": norm_b,
            "rel_norm": rng.random(N),
            "dec_cos": np.where(a_excl | b_excl, np.nan, rng.random(N)),
            "dead": ids == N - 1,
            "s_max": rng.random(N) * 10,
        }
    )


TEXTS = ["Hello there, friend.", "def f(x): return x", "“Smart quotes” 🙂 and 한국어", "It's 100%"]


def windows_frame() -> pd.DataFrame:
    """Windows with aligned spans and both models' tokens (2-D offsets per row)."""
    rows = []
    for i, text in enumerate(TEXTS):
        ends = np.arange(2, len(text) + 1, 3)
        starts = np.concatenate([[0], ends[:-1]])
        spans = np.stack([starts, ends], 1)
        cuts = np.arange(0, len(text) + 1, 2)
        offsets = np.stack([cuts[:-1], cuts[1:]], 1)
        rows.append(
            {
                "window_id": 100 + i,
                "doc_id": f"doc{i}",
                "source": "demo:chitchat",
                "text": text,
                "spans": spans,
                "ids_a": np.arange(len(offsets)) + 7,
                "offsets_a": offsets,
                "ids_b": np.arange(len(spans)) + 250_000,
                "offsets_b": spans.copy(),
            }
        )
    return pd.DataFrame(rows)


def contexts_frame(windows: pd.DataFrame) -> pd.DataFrame:
    """Top, quantile and random contexts of features 0 and 6, written in shuffled order."""
    rows = []
    n_spans = dict(zip(windows.window_id, windows.spans.map(len), strict=True))
    plan = [("random", 0, None, 103), ("top", 1, None, 101), ("quantile", 0, 1, 102)]
    plan += [("top", 0, None, 100), ("quantile", 0, 0, 103)]
    for feature in (6, 0):
        for kind, rank, quantile, window in plan:
            acts = np.linspace(0, 1 + feature, n_spans[window]).astype(np.float32)
            rows.append(
                {
                    "feature_id": feature,
                    "kind": kind,
                    "rank": rank,
                    "quantile": quantile,
                    "window_id": window,
                    "acts": acts,
                    "max_act": float(acts.max()),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def db(tmp_path):
    """A database with one run and its features, windows and contexts."""
    with Database(tmp_path / "results.duckdb") as db:
        add_run(db)
        db.write_features(RUN, features_frame())
        windows = windows_frame()
        db.write_windows(RUN, windows)
        db.write_contexts(RUN, contexts_frame(windows))
        yield db


# -- schema and runs ---------------------------------------------------------------------


def test_new_file_has_the_allow_listed_schema(tmp_path):
    with Database(tmp_path / "new.duckdb") as db, db._cursor() as cur:
        assert db.schema_version == len(schema.MIGRATIONS)
        rows = cur.execute(
            "SELECT table_name, column_name FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = 'main' "
            "AND table_name != 'meta' ORDER BY column_index"
        ).fetchall()
    actual: dict[str, tuple[str, ...]] = {}
    for table, column in rows:
        actual[table] = (*actual.get(table, ()), column)
    assert actual == schema.COLUMNS
    assert _indexes(tmp_path / "new.duckdb") == schema.INDEXES


def _indexes(path) -> dict[str, tuple[str, str]]:
    """The file's indexes as {name: (table, column)}."""
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            "SELECT index_name, table_name, expressions FROM duckdb_indexes() "
            "WHERE database_name = current_database()"
        ).fetchall()
    return {name: (table, exprs.strip('[]"')) for name, table, exprs in rows}


def test_runs_round_trip_upsert_and_unknown(tmp_path):
    with Database(tmp_path / "r.duckdb") as db:
        add_run(db)
        run = db.run(RUN)
        assert run["model_a"]["d_model"] == 576 and run["config"]["train"]["k"] == 4
        assert np.isnan(run["metrics"]["fve_b"]) and run["partition"]["shared"] == 6
        add_run(db, name="renamed", metrics={"fve_a": 0.9})
        again = db.run(RUN)
        assert again["name"] == "renamed" and again["metrics"] == {"fve_a": 0.9}
        assert again["created_at"] == run["created_at"]
        add_run(db, "run-2")
        runs = db.runs()
        assert list(runs.run_id) == [RUN, "run-2"]
        assert runs.model_b.iloc[0]["name"] == "gemma3"
        with pytest.raises(
            ResultsDBError, match="unknown run 'nope'; known runs: 'run-1', 'run-2'"
        ):
            db.run("nope")
        with pytest.raises(ResultsDBError, match="unknown run"):
            db.features("nope")
        with pytest.raises(ResultsDBError, match="cannot be stored as JSON"):
            add_run(db, config={"bad": object()})


# -- features ----------------------------------------------------------------------------


def test_features_round_trip_filters_and_replacement(db):
    df = db.features(RUN)
    src = features_frame()
    assert list(df.feature_id) == list(range(N)) and list(df.partition) == PARTS
    np.testing.assert_array_equal(df.hist_counts.iloc[3], src.hist_counts.iloc[3])
    np.testing.assert_allclose(df.hist_edges.iloc[5], src.hist_edges.iloc[5])
    assert df.dec_norm_b.iloc[:2].isna().all() and df.dec_norm_a.iloc[2:4].isna().all()
    assert df.dec_cos.iloc[:4].isna().all() and df.dec_cos.iloc[4:].notna().all()
    with db._cursor() as cur:  # NaN in the frame is stored as NULL, not as NaN
        nulls = cur.execute("SELECT count(*) FROM features WHERE dec_cos IS NULL").fetchone()
    assert nulls == (4,)

    excl = db.features(
        RUN, partition=["a_exclusive", "b_exclusive"], order_by="max_act", descending=True
    )
    assert list(excl.feature_id) == [3, 2, 1, 0]
    assert list(db.features(RUN, partition="shared", dead=False, limit=2).feature_id) == [6, 7]
    assert list(db.features(RUN, feature_ids=[np.int64(9), 1]).feature_id) == [1, 9]
    assert db.features(RUN, feature_ids=[]).empty

    feature = db.feature(RUN, 4)
    assert feature["partition"] == "designated_shared" and feature["hist_counts"].dtype == np.int64
    np.testing.assert_allclose(feature["hist_edges"], np.linspace(0, 5, 9))
    with pytest.raises(ResultsDBError, match="no feature 99"):
        db.feature(RUN, 99)
    with pytest.raises(ResultsDBError, match="cannot order by 'name'; choose one of: feature_id"):
        db.features(RUN, order_by="name")
    with pytest.raises(ResultsDBError, match="unknown partition 'both'"):
        db.features(RUN, partition="both")

    db.write_features(RUN, features_frame(scale=2.0).iloc[:5])  # re-analysis replaces rows
    again = db.features(RUN)
    assert list(again.feature_id) == list(range(5)) and again.max_act.iloc[4] == 10.0


def test_run_history_round_trip_and_kept_on_update(tmp_path):
    with Database(tmp_path / "h.duckdb") as db:
        add_run(db)
        assert db.run_history(RUN).empty
        steps = [
            {"step": 50, "loss": 2.0, "dead_frac_a_exclusive": 0.1},
            {"step": 100, "loss": 1.0, "dead_frac_a_exclusive": 0.3, "fve_a": np.float32(0.5)},
        ]
        add_run(db, history=steps)
        history = db.run_history(RUN)
        assert list(history.step) == [50, 100] and list(history.dead_frac_a_exclusive) == [0.1, 0.3]
        assert np.isnan(history.fve_a.iloc[0]) and history.fve_a.iloc[1] == 0.5
        add_run(db, name="renamed")  # an update that gives no history keeps the recorded one
        assert len(db.run_history(RUN)) == 2 and db.run(RUN)["name"] == "renamed"
        # The listing and the run's dict leave the (long) history out.
        assert "history" not in db.run(RUN) and "history" not in db.runs().columns
        with pytest.raises(ResultsDBError, match="unknown run 'nope'"):
            db.run_history("nope")


# -- categories: shared features that lean to one model ----------------------------------

# Shared features 6-11 with relative decoder norms on and past the bounds (0.8, 0.2); the
# designated features lean too, but only shared features become leaning.
REL_NORMS = [1.0, 1.0, 0.0, 0.0, 0.95, 0.05, 0.95, 0.8, 0.81, 0.2, 0.05, np.nan]
CATEGORIES = [
    "a_exclusive", "a_exclusive", "b_exclusive", "b_exclusive", "designated_shared",
    "designated_shared", "a_leaning", "shared", "a_leaning", "shared", "b_leaning", "shared",
]  # fmt: skip


def test_categories_set_leaning_shared_features_apart(db, tmp_path):
    db.write_features(RUN, features_frame().assign(rel_norm=REL_NORMS))
    df = db.features(RUN)
    assert list(df.category) == CATEGORIES
    # The SQL agrees with the engine's definition (NULL relative norm: shared).
    pairs = zip(df.partition, df.rel_norm, strict=True)
    assert list(df.category) == [category(p, r) for p, r in pairs]
    assert db.feature(RUN, 10)["category"] == "b_leaning"
    assert db.feature(RUN, 7)["category"] == "shared"  # exactly 0.8 does not lean
    assert list(db.features(RUN, category="a_leaning").feature_id) == [6, 8]
    both = db.features(RUN, category=["b_leaning", "b_exclusive"], order_by="max_act")
    assert list(both.feature_id) == [2, 3, 10]
    # A partition filter still means the whole partition.
    assert list(db.features(RUN, partition="shared").feature_id) == list(range(6, 12))

    table = db.feature_table(RUN, category=list(CANDIDATES))
    assert list(table.feature_id) == [0, 1, 2, 3, 6, 8, 10]
    assert list(table.category) == [CATEGORIES[i] for i in table.feature_id]
    assert db.feature_count(RUN, category="shared") == 3  # 7, 9 and the dead 11
    assert db.feature_count(RUN, category="shared", dead=False) == 2
    page = db.feature_table(RUN, category=["a_leaning", "b_leaning"], order_by="rel_norm", limit=2)
    assert list(page.feature_id) == [10, 8]
    combined = db.feature_table(RUN, partition="shared", category=["a_leaning", "b_leaning"])
    assert list(combined.feature_id) == [6, 8, 10]
    out = db.export("feature_table", tmp_path / "leaning.csv", run_id=RUN, category="a_leaning")
    exported = pd.read_csv(out)
    assert list(exported.feature_id) == [6, 8] and set(exported.category) == {"a_leaning"}

    with pytest.raises(ResultsDBError, match="'a_leaning' is a category, not a partition"):
        db.features(RUN, partition="a_leaning")
    with pytest.raises(ResultsDBError, match="unknown category 'leaning'"):
        db.feature_table(RUN, category="leaning")


def test_every_partition_is_a_category():
    assert set(schema.PARTITIONS) <= set(schema.CATEGORIES)


def test_bad_frames_are_refused_and_leave_data_alone(db):
    good = features_frame()
    with pytest.raises(ResultsDBError, match=r"unknown column.*colour"):
        db.write_features(RUN, good.assign(colour=1))
    with pytest.raises(ResultsDBError, match=r"lacks column.*partition"):
        db.write_features(RUN, good.drop(columns="partition"))
    with pytest.raises(ResultsDBError, match="unknown partition 'both'"):
        db.write_features(RUN, good.assign(partition="both"))
    with pytest.raises(ResultsDBError, match=r"cannot write features.*[Dd]uplicate"):
        db.write_features(RUN, pd.concat([good, good.iloc[:1]]))
    with pytest.raises(ResultsDBError, match="run_id is not"):
        db.write_features(RUN, good.assign(run_id="other"))
    with pytest.raises(ResultsDBError, match="unknown run"):
        db.write_features("other", good)
    flat = windows_frame().assign(spans=lambda w: w.spans.map(np.ravel))
    with pytest.raises(ResultsDBError, match="'spans' needs a 2-D array"):
        db.write_windows(RUN, flat)
    assert len(db.window(RUN, 100)["spans"]) > 0
    assert len(db.features(RUN)) == N  # every failed write rolled back


# -- windows and contexts ----------------------------------------------------------------


def test_contexts_join_windows_into_context_objects(db):
    windows = windows_frame()
    got = db.contexts(RUN, 6)
    assert [(c.kind, c.quantile, c.rank) for c in got] == [
        ("top", None, 0),
        ("top", None, 1),
        ("quantile", 0, 0),
        ("quantile", 1, 0),
        ("random", None, 0),
    ]
    first = got[0]
    assert isinstance(first, Context) and first.window_id == 100 and first.doc_id == "doc0"
    assert first.text == TEXTS[0]
    np.testing.assert_array_equal(first.spans, windows.spans.iloc[0])
    assert first.spans.shape == (len(windows.spans.iloc[0]), 2)
    np.testing.assert_allclose(first.acts, np.linspace(0, 7, len(first.spans)), rtol=1e-6)
    assert "".join(p for p, _ in got[3].pieces()) == TEXTS[2]
    assert [c.kind for c in db.contexts(RUN, 0, kind="quantile")] == ["quantile"] * 2
    assert db.contexts(RUN, 3) == []

    window = db.window(RUN, 102)
    assert window["text"] == TEXTS[2] and window["offsets_a"].shape[1] == 2
    np.testing.assert_array_equal(window["ids_b"], windows.ids_b.iloc[2])
    np.testing.assert_array_equal(window["offsets_a"], windows.offsets_a.iloc[2])
    with pytest.raises(ResultsDBError, match="no window 7"):
        db.window(RUN, 7)
    with db._cursor() as cur:  # max_act is filled when the frame leaves it out
        assert cur.execute("SELECT count(*) FROM contexts WHERE max_act IS NULL").fetchone() == (0,)


def test_contexts_cover_their_span_range_and_come_by_feature(db):
    windows = windows_frame()
    spans = windows.spans.iloc[1]
    partial = pd.DataFrame(
        {
            "feature_id": [9, 9, 2],
            "kind": ["top", "random", "top"],
            "rank": [0, 0, 0],
            "window_id": [101, 100, 101],
            "span_start": [2, 0, 0],
            "span_end": [4, None, None],
            "acts": [
                np.array([0.5, 2.0], np.float32),
                np.zeros(len(windows.spans.iloc[0]), np.float32),
                np.ones(len(spans), np.float32),
            ],
        }
    )
    db.write_contexts(RUN, partial)
    (top, random) = db.contexts(RUN, 9)
    np.testing.assert_array_equal(top.spans, spans[2:4])
    assert top.spans.dtype == np.int64 and top.max_act == 2.0 and top.text == TEXTS[1]
    assert (random.kind, random.window_id, len(random.spans)) == ("random", 100, len(random.acts))
    found = db.contexts_of(RUN, [9, 2, 5], kind="top")
    assert [len(found[f]) for f in (9, 2, 5)] == [1, 1, 0]
    np.testing.assert_array_equal(found[2][0].spans, spans)
    with pytest.raises(ResultsDBError, match="unknown run"):
        db.contexts_of("nope", [9])


def test_contexts_must_match_their_windows(db):
    frame = contexts_frame(windows_frame())
    with pytest.raises(ResultsDBError, match="write the windows"):
        db.write_contexts(RUN, frame.assign(window_id=999))
    bad = frame.copy()
    bad.at[0, "acts"] = np.ones(2, np.float32)
    with pytest.raises(ResultsDBError, match="one activation per span"):
        db.write_contexts(RUN, bad)
    with pytest.raises(ResultsDBError, match="unknown kind 'best'"):
        db.write_contexts(RUN, frame.assign(kind="best"))
    assert len(db.contexts(RUN, 0)) == 5  # untouched by the failed writes
    db.write_contexts(RUN, frame[frame.feature_id == 0].drop(columns="max_act"))
    assert db.contexts(RUN, 6) == [] and len(db.contexts(RUN, 0)) == 5


# -- neighbours and matches --------------------------------------------------------------


def test_neighbors_and_matches(db):
    rows = [
        {"feature_id": 6, "neighbor_id": n, "cosine": 1 - r / 10, "rank": r, "space": space}
        for space in ("b", "a")
        for r, n in enumerate([7, 8, 9, 10])
    ]
    db.write_neighbors(RUN, pd.DataFrame(rows))
    near = db.neighbors(RUN, 6, limit=2)
    assert list(zip(near.space, near.neighbor_id, strict=True)) == [
        ("a", 7),
        ("a", 8),
        ("b", 7),
        ("b", 8),
    ]
    assert len(db.neighbors(RUN, 6, space="b", limit=None)) == 4
    assert db.neighbors(RUN, 0).empty

    add_run(db, "run-2")
    matches = pd.DataFrame(
        {
            "feature_id": [1, 0, 0],
            "other_feature_id": [5, 3, 4],
            "cosine": [0.5, 0.7, 0.9],
            "partition": ["a_exclusive"] * 3,
            "other_partition": ["shared", "a_exclusive", "shared"],
        }
    )
    db.write_matches(RUN, "run-2", matches)
    db.write_matches(RUN, "run-2", matches)  # idempotent
    got = db.matches(RUN, "run-2")
    assert list(got.other_feature_id) == [4, 3, 5] and set(got.other_run_id) == {"run-2"}
    assert db.matches(RUN, "run-2", feature_id=0).other_feature_id.tolist() == [4, 3]
    assert db.matches(RUN, "run-2", feature_id=7).empty
    with pytest.raises(ResultsDBError, match="unknown run 'run-3'"):
        db.write_matches(RUN, "run-3", matches)


# -- explanations, scores, steering, evaluations -----------------------------------------


def explain(db: Database, feature: int, text: str, **kw) -> int:
    """Record an explanation with defaults for the bookkeeping fields."""
    args = {"explainer": "offline:ngram-v1", "prompt_version": "v1", "raw": text, **kw}
    return db.add_explanation(RUN, feature, explanation=text, **args)


def test_explanations_scores_steering_evaluations(db):
    first = explain(db, 0, "greetings")
    second = explain(db, 0, "greetings and farewells", harmful=False, harmful_reason="benign")
    other = explain(db, 0, "hello", explainer="anthropic:claude-opus-4-1")
    explain(db, 6, "broken", parsed=False)
    assert first < second < other

    latest = db.explanations(RUN, feature_id=0)
    assert list(latest.explanation_id) == [second, other]
    assert len(db.explanations(RUN, latest=False)) == 4
    assert list(db.explanations(RUN, explainer="offline:ngram-v1").feature_id) == [0, 6]
    assert db.explained_features(RUN, "offline:ngram-v1", "v1") == {0, 6}
    assert db.explained_features(RUN, "offline:ngram-v1", "v1", parsed_only=True) == {0}
    assert db.explained_features(RUN, "offline:ngram-v1", "v2") == set()

    details = {"correct": [1, 0, 1], "labels": {"a": True}}
    score = db.add_score(
        RUN,
        0,
        explanation_id=second,
        judge="offline:judge",
        prompt_version="v1",
        value=0.75,
        n_examples=20,
        details=details,
    )
    scores = db.scores(RUN, feature_id=0)
    assert scores.score_id.tolist() == [score] and scores.details.iloc[0] == details
    assert db.scored_explanations(RUN, "offline:judge", "v1") == {second}
    assert db.scores(RUN, judge="other").empty

    sample = db.add_steering_sample(
        RUN,
        2,
        model="b",
        prompt="Tell me",
        alpha=4.0,
        s_max=3.5,
        seed=0,
        temperature=0.0,
        max_new_tokens=32,
        baseline="plain",
        steered="odd",
        transfer={"to": "a", "map": "ls"},
        author="ana",
    )
    samples = db.steering_samples(RUN, feature_id=2)
    assert samples.sample_id.tolist() == [sample] and samples.transfer.iloc[0]["to"] == "a"
    with pytest.raises(ResultsDBError, match="unknown model 'c'"):
        db.add_steering_sample(
            RUN,
            2,
            model="c",
            prompt="",
            alpha=1,
            s_max=None,
            seed=None,
            temperature=1,
            max_new_tokens=1,
            baseline="",
            steered="",
        )

    db.add_evaluation(RUN, kind="exclusivity", config={"n": 3}, result={"auc": 0.9})
    db.add_evaluation(RUN, kind="steering", config={}, result={"ok": True}, feature_id=2)
    evals = db.evaluations(RUN, kind="exclusivity")
    assert evals.result.iloc[0] == {"auc": 0.9} and pd.isna(evals.feature_id.iloc[0])
    assert db.evaluations(RUN, feature_id=2).config.iloc[0] == {}
    with pytest.raises(ResultsDBError, match="unknown run"):
        db.add_evaluation("zzz", kind="k", config={}, result={})


# -- triage and the feature table --------------------------------------------------------


def test_triage_history_is_append_only(db):
    assert db.triage(RUN).empty
    db.set_triage(RUN, 1, "screening", notes="looks like refusals", reviewer="ana")
    db.set_triage(RUN, 1, "needs steering", reviewer="ben")
    db.set_triage(RUN, 1, "verified", notes="confirmed", reviewer="ana")
    db.set_triage(RUN, 2, "false positive")
    current = db.triage(RUN)
    assert list(zip(current.feature_id, current.status, strict=True)) == [
        (1, "verified"),
        (2, "false positive"),
    ]
    history = db.triage_history(RUN, feature_id=1)
    assert list(history.status) == ["screening", "needs steering", "verified"]
    assert list(history.reviewer) == ["ana", "ben", "ana"]
    assert history.changed_at.is_monotonic_increasing
    assert len(db.triage_history(RUN)) == 4
    with pytest.raises(ResultsDBError, match="valid: unreviewed, screening, verified"):
        db.set_triage(RUN, 1, "approved")
    with pytest.raises(ResultsDBError, match="no feature 99"):
        db.set_triage(RUN, 99, "screening")
    assert len(db.triage_history(RUN)) == 4


def test_feature_table_joins_and_filters(db):
    e0 = explain(db, 0, "Refusal to help", harmful=True, harmful_reason="refusals")
    e0b = explain(db, 0, "Refusals of harmful requests", harmful=True)
    e2 = explain(db, 2, "100% literal percent and O'Brien", harmful=False)
    explain(db, 6, "Python code")
    for eid, value in ((e0, 0.2), (e0b, 0.4), (e0b, 0.9), (e2, 0.6)):
        db.add_score(
            RUN, 0, explanation_id=eid, judge="j", prompt_version="v1", value=value, n_examples=10
        )
    db.add_score(
        RUN,
        2,
        explanation_id=e2,
        judge="j",
        prompt_version="v1",
        metric="other",
        value=1.0,
        n_examples=10,
    )
    db.set_triage(RUN, 2, "screening")

    table = db.feature_table(RUN).set_index("feature_id")
    assert len(table) == N and "hist_counts" not in table.columns
    assert table.loc[0, "explanation"] == "Refusals of harmful requests"
    assert table.loc[0, "score"] == 0.9  # newest detection score of the newest explanation
    assert table.loc[2, "score"] == 0.6 and pd.isna(table.loc[6, "score"])
    assert table.loc[2, "status"] == "screening" and table.loc[5, "status"] == "unreviewed"

    def ids(**filters) -> list[int]:
        return db.feature_table(RUN, **filters).feature_id.tolist()

    assert ids(harmful=True) == [0] and ids(harmful=False) == [2]
    assert ids(status="screening") == [2] and len(ids(status=["unreviewed"])) == N - 1
    assert ids(min_score=0.5) == [0, 2] and ids(min_score=0.5, partition="b_exclusive") == [2]
    assert ids(search="refusal") == [0] and ids(search="o'brien") == [2]
    assert ids(search="100%") == [2] and ids(search="0%_") == []  # wildcards are literal
    assert ids(search=NASTY) == []
    assert ids(order_by="score", descending=True, limit=2) == [0, 2]
    assert ids(dead=True) == [N - 1]
    assert ids(explainer="nobody", search="a") == []
    with pytest.raises(ResultsDBError, match="cannot order by"):
        ids(order_by="explanation; DROP TABLE runs")
    assert len(db.runs()) == 1


EXCLUSIVITY = {"judge": "offline:exclusivity", "prompt_version": "b4.5", "metric": "exclusivity"}


def test_feature_table_exclusivity_is_the_features_latest_score(db):
    e0 = explain(db, 0, "Refusals")
    db.add_score(RUN, 0, value=2, details={"reason": "first look"}, **EXCLUSIVITY)
    db.add_score(RUN, 0, explanation_id=e0, value=5, **EXCLUSIVITY)  # newest wins
    db.add_score(RUN, 2, value=4, **EXCLUSIVITY)
    db.add_score(RUN, 3, value=1, **EXCLUSIVITY)
    db.add_score(RUN, 3, value=None, **EXCLUSIVITY)  # the judge gave none this time
    db.add_score(RUN, 6, value=3, **EXCLUSIVITY)
    db.add_score(RUN, 0, explanation_id=e0, judge="j", prompt_version="v1", value=0.7)

    table = db.feature_table(RUN).set_index("feature_id")
    assert table.loc[0, "exclusivity"] == 5 and table.loc[0, "score"] == 0.7
    assert table.loc[2, "exclusivity"] == 4 and pd.isna(table.loc[2, "score"])
    assert pd.isna(table.loc[3, "exclusivity"]) and pd.isna(table.loc[1, "exclusivity"])
    assert db.scores(RUN, feature_id=0, metric="exclusivity").details.iloc[0] == {
        "reason": "first look"
    }

    def ids(**filters) -> list[int]:
        return db.feature_table(RUN, **filters).feature_id.tolist()

    assert ids(min_exclusivity=4) == [0, 2] and ids(max_exclusivity=3) == [6]
    assert ids(min_exclusivity=3, max_exclusivity=4) == [2, 6]
    assert ids(min_exclusivity=3, partition="shared") == [6]
    assert ids(order_by="exclusivity", descending=True)[:4] == [0, 2, 6, 1]  # NULLs last
    assert ids(order_by="exclusivity")[:4] == [6, 2, 0, 1]
    assert ids(explainer="nobody", min_exclusivity=5) == [0]  # exclusivity is the feature's
    assert db.feature_count(RUN, min_exclusivity=3) == 3
    out = db.export("feature_table", db.path.parent / "excl.csv", run_id=RUN, min_exclusivity=4)
    assert pd.read_csv(out).exclusivity.tolist() == [5, 4]


def test_feature_table_pages_counts_and_density(db):
    for fid, value in ((0, 0.3), (2, 0.9), (5, 0.9), (7, 0.1)):
        eid = explain(db, fid, f"feature {fid}")
        db.add_score(RUN, fid, explanation_id=eid, judge="j", prompt_version="v1", value=value)
    density = features_frame().set_index("feature_id").density
    lo, hi = float(density.quantile(0.25)), float(density.quantile(0.75))
    cases = [
        ("max_act", True, {}),
        ("score", True, {}),
        ("score", False, {"dead": False}),
        ("feature_id", False, {"partition": "shared"}),
        ("density", False, {"min_density": lo, "max_density": hi}),
    ]
    for order_by, descending, filters in cases:
        whole = db.feature_table(RUN, order_by=order_by, descending=descending, **filters)
        pages = [
            db.feature_table(
                RUN, order_by=order_by, descending=descending, limit=5, offset=offset, **filters
            )
            for offset in range(0, N, 5)
        ]
        assert pd.concat(pages).feature_id.tolist() == whole.feature_id.tolist()
        assert pd.concat(pages).explanation.tolist() == whole.explanation.tolist()
        assert db.feature_count(RUN, **filters) == len(whole)
    inside = density[(density >= lo) & (density <= hi)].index.tolist()
    assert db.feature_table(RUN, min_density=lo, max_density=hi).feature_id.tolist() == inside
    assert db.feature_table(RUN, order_by="score", descending=True, limit=3).score.tolist() == [
        0.9,
        0.9,
        0.3,
    ]
    assert db.feature_table(RUN, feature_ids=[np.int64(9), 2]).feature_id.tolist() == [2, 9]
    assert db.feature_table(RUN, feature_ids=[2]).explanation.tolist() == ["feature 2"]
    assert (
        db.feature_table(RUN, feature_ids=[]).empty and db.feature_count(RUN, feature_ids=[]) == 0
    )
    assert db.feature_table(RUN, offset=N - 2).feature_id.tolist() == [N - 2, N - 1]
    with pytest.raises(ResultsDBError, match="non-negative"):
        db.feature_table(RUN, limit=5, offset=-1)
    with pytest.raises(ResultsDBError, match="unknown feature_table filter"):
        db.feature_count(RUN, order_by="score")
    with pytest.raises(ResultsDBError, match="unknown run"):
        db.feature_count("nope")


def test_bulk_explanations_and_scores_are_numbered_in_order(db):
    single = explain(db, 4, "one at a time")
    frame = pd.DataFrame(
        {
            "feature_id": [6, 0, 6],
            "explainer": "offline:ngram-v1",
            "prompt_version": "v1",
            "explanation": ["a", "b", "c"],
            "harmful": [True, None, False],
        }
    )
    ids = db.add_explanations(RUN, frame)
    assert ids == [single + 1, single + 2, single + 3]
    got = db.explanations(RUN, latest=False).set_index("explanation_id")
    assert got.loc[ids, "explanation"].tolist() == ["a", "b", "c"] and got.parsed.all()
    assert got.loc[ids[0], "harmful"] and pd.isna(got.loc[ids[1], "harmful"])
    assert db.explanations(RUN, feature_id=6).explanation.tolist() == ["c"]

    scores = pd.DataFrame(
        {
            "feature_id": [6, 0],
            "explanation_id": [ids[2], ids[1]],
            "judge": "j",
            "prompt_version": "v1",
            "metric": "detection",
            "value": [0.9, np.nan],
            "n_examples": 20,
            "details": [{"correct": [1, 0]}, None],
        }
    )
    score_ids = db.add_scores(RUN, scores)
    assert db.scores(RUN, feature_id=6).details.tolist() == [{"correct": [1, 0]}]
    assert db.scores(RUN, feature_id=0).details.tolist() == [None]
    table = db.feature_table(RUN).set_index("feature_id")
    assert table.loc[6, "score"] == 0.9 and pd.isna(table.loc[0, "score"])
    assert table.loc[6, "explanation_id"] == ids[2]
    later = db.add_score(RUN, 6, explanation_id=ids[2], judge="j", prompt_version="v1", value=1)
    assert later > score_ids[-1]

    with pytest.raises(ResultsDBError, match="the store assigns it"):
        db.add_explanations(RUN, frame.assign(explanation_id=1))
    with pytest.raises(ResultsDBError, match="lacks column"):
        db.add_scores(RUN, scores.drop(columns="metric"))
    with pytest.raises(ResultsDBError, match="unknown run"):
        db.add_explanations("nope", frame)
    assert len(db.explanations(RUN, latest=False)) == 4  # failed writes added nothing


# -- safety, export ----------------------------------------------------------------------


def test_values_with_quotes_and_sql_are_harmless(tmp_path):
    with Database(tmp_path / "nasty.duckdb") as db:
        # A run id becomes part of file names, so it is refused; every other value is kept.
        with pytest.raises(ResultsDBError, match="invalid run id"):
            add_run(db, NASTY)
        run = "o.neil_run-1"
        add_run(db, run, name=NASTY)
        db.write_features(run, features_frame())
        db.set_triage(run, 0, "screening", notes=NASTY, reviewer="o'neil")
        db.add_explanation(run, 0, explainer=NASTY, prompt_version=NASTY, explanation=NASTY)
        assert db.run(run)["name"] == NASTY
        assert len(db.features(run)) == N
        assert db.explained_features(run, NASTY, NASTY) == {0}
        assert db.feature_table(run, search=NASTY).feature_id.tolist() == [0]
        assert db.triage_history(run).notes.tolist() == [NASTY]
        path = db.export("features", tmp_path / "it's.csv", run_id=run)
        assert len(pd.read_csv(path)) == N
        assert db.runs().run_id.tolist() == [run]
        with pytest.raises(ResultsDBError, match="unknown run"):
            db.features(NASTY)  # in a read, a nasty id is only a parameter


def test_export_parquet_and_csv(db, tmp_path):
    explain(db, 2, "a b-exclusive thing", harmful=True)
    out = db.export(
        "feature_table", tmp_path / "out" / "table.parquet", run_id=RUN, partition="b_exclusive"
    )
    table = pd.read_parquet(out)
    assert table.feature_id.tolist() == [2, 3] and table.harmful.iloc[0]

    feats = pd.read_parquet(db.export("features", tmp_path / "f.parquet", run_id=RUN))
    assert len(feats) == N
    np.testing.assert_array_equal(feats.hist_counts.iloc[0], features_frame().hist_counts.iloc[0])
    ctx = db.export("contexts", tmp_path / "c.csv", run_id=RUN, kind="top", feature_id=6)
    assert len(pd.read_csv(ctx)) == 2
    got = duckdb.execute("SELECT count(*) FROM read_csv(?)", [str(ctx)]).fetchone()
    assert got == (2,)

    with pytest.raises(ResultsDBError, match="cannot export 'passwords'; choose one of"):
        db.export("passwords", tmp_path / "p.csv")
    with pytest.raises(ResultsDBError, match=r"ending in \.parquet or \.csv"):
        db.export("features", tmp_path / "f.xlsx")
    with pytest.raises(ResultsDBError, match="no column"):
        db.export("features", tmp_path / "f.csv", colour="red")
    with pytest.raises(ResultsDBError, match="unknown feature_table filter"):
        db.export("feature_table", tmp_path / "t.csv", run_id=RUN, colour="red")


# -- versions, files, threads ------------------------------------------------------------


def test_older_file_is_upgraded_in_place(tmp_path, monkeypatch):
    path = tmp_path / "old.duckdb"
    with Database(path) as db:  # a v1 file with data
        add_run(db)
        db.write_features(RUN, features_frame())
    current = len(schema.MIGRATIONS)
    later = "ALTER TABLE features ADD COLUMN label VARCHAR; UPDATE features SET label = 'new';"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, later])
    with pytest.raises(ResultsDBError, match="open it once with read_only=False"):
        Database(path, read_only=True)
    with Database(path) as db:
        assert db.schema_version == current + 1
        assert set(db.features(RUN).label) == {"new"} and len(db.features(RUN)) == N
    with Database(path, read_only=True) as db:
        assert db.schema_version == current + 1


def test_version_1_file_gains_the_indexes_and_keeps_its_data(tmp_path, monkeypatch):
    path = tmp_path / "v1.duckdb"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    with Database(path) as db:  # written by a modeldiff that knew only version 1
        add_run(db)
        db.write_features(RUN, features_frame())
        windows = windows_frame()
        db.write_windows(RUN, windows)
        db.write_contexts(RUN, contexts_frame(windows))
        first = explain(db, 0, "greetings")
        db.add_score(RUN, 0, explanation_id=first, judge="j", prompt_version="v1", value=0.5)
    assert _indexes(path) == {}
    monkeypatch.undo()
    with Database(path) as db:
        assert db.schema_version == len(schema.MIGRATIONS)
        assert db.run_history(RUN).empty  # version 3: runs gain a (still empty) history
        assert db.feature_table(RUN).set_index("feature_id").loc[0, "score"] == 0.5
        assert [c.window_id for c in db.contexts(RUN, 6, kind="top")] == [100, 101]
        assert db.window(RUN, 102)["text"] == TEXTS[2]
        assert db.explanations(RUN, feature_id=0).explanation.tolist() == ["greetings"]
    assert _indexes(path) == schema.INDEXES


def test_failed_upgrade_leaves_the_file_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "old.duckdb"
    with Database(path) as db:
        add_run(db)
    broken = "ALTER TABLE features ADD COLUMN label VARCHAR; SELECT * FROM no_such_table;"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    current = len(schema.MIGRATIONS) - 1
    with pytest.raises(
        ResultsDBError, match=rf"from schema {current} to {current + 1} failed.*unchanged"
    ):
        Database(path)
    monkeypatch.undo()
    with Database(path) as db:
        assert db.schema_version == current and "label" not in db.features(RUN).columns


def test_newer_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    Database(path).close()
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", ["99"])
    reads = len(schema.MIGRATIONS)
    with pytest.raises(ResultsDBError, match=rf"newer modeldiff \(schema 99, this reads {reads}\)"):
        Database(path)
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE sales (x INT)")
    with pytest.raises(ResultsDBError, match="not a modeldiff results database"):
        Database(other)
    with pytest.raises(ResultsDBError, match="no results database at"):
        Database(tmp_path / "missing.duckdb", read_only=True)


def test_reopen_read_only_and_close(tmp_path):
    path = tmp_path / "sub" / "db.duckdb"
    with Database(path) as db:
        add_run(db)
        db.write_features(RUN, features_frame())
        db.set_triage(RUN, 3, "screening")
    with Database(path, read_only=True) as db:
        assert len(db.features(RUN)) == N and db.triage(RUN).status.tolist() == ["screening"]
        with pytest.raises(ResultsDBError, match="opened read-only"):
            db.set_triage(RUN, 3, "verified")
    db.close()
    with pytest.raises(ResultsDBError, match="is closed"):
        db.runs()


def test_readers_run_while_a_writer_writes(db):
    errors: list[BaseException] = []
    reads: list[int] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                reads.append(1)
                assert len(db.features(RUN)) == N  # never a half-replaced run
                assert len(db.contexts(RUN, 0)) == 5
                db.feature_table(RUN, search="x")
        except BaseException as err:
            errors.append(err)

    def write() -> None:
        try:
            for i in range(15):
                db.write_features(RUN, features_frame(scale=i + 1.0))
                db.set_triage(RUN, i % N, "screening")
        except BaseException as err:
            errors.append(err)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writer = threading.Thread(target=write)
    for t in [*readers, writer]:
        t.start()
    writer.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert len(reads) > 2
    assert db.features(RUN).max_act.iloc[0] == 15.0
    assert len(db.triage_history(RUN)) == 15


# -- sharing the file with other processes ----------------------------------------------

# Holds the DuckDB file argv[1] open for writing for argv[2] seconds.
HOLD_LOCK = """
import sys, time, duckdb
conn = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.close()
"""


def hold_lock(path, seconds: float) -> subprocess.Popen:
    """Another process holding the file for writing (started and holding on return)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_opening_waits_for_another_process_then_names_it(tmp_path):
    path = tmp_path / "r.duckdb"
    with Database(path) as db:
        add_run(db)
        db.write_features(RUN, features_frame())
    holder = hold_lock(path, 2.0)
    with pytest.raises(ResultsDBError, match=r"after waiting 0.2 s: .*Conflicting lock"):
        Database(path, create=False, wait=0.2)
    # Waiting long enough gets the file once the other process lets go.
    db = Database(path, create=False, hold=False, wait=30)
    assert holder.wait(timeout=30) == 0
    # Between calls a hold=False Database leaves the file to others, who can write it.
    writer = "import sys, duckdb; duckdb.connect(sys.argv[1]).execute('CHECKPOINT').close()"
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True, timeout=60)
    db.set_triage(RUN, 1, "verified", "", "dana")
    assert list(db.triage(RUN)["reviewer"]) == ["dana"]
    # A held Database (the default) keeps it.
    held = Database(path, create=False)
    command = [sys.executable, "-c", writer, str(path)]
    blocked = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert blocked.returncode != 0 and "lock" in blocked.stderr
    held.close()
    db.close()
