"""The Runs page's training section on a tiny run trained with a validation split: the
curves from the run's history, held-out FVE by partition, and CE loss recovered once
`modeldiff evaluate` has measured it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.analysis.evaluate import evaluate
from engine.analysis.run_metrics import (
    HELD_OUT,
    TRAINING,
    fve_history,
    l0_history,
    loss_history,
    partition_fve_history,
    validation_fves,
)
from tests.dashboard.test_dashboard import chart, values

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dashboard import data
    from tests.tiny_run import build_tiny_run

    run = build_tiny_run(tmp_path_factory.mktemp("tiny"), train_steps=20)
    old = os.environ.get("MODELDIFF_DB")
    os.environ["MODELDIFF_DB"] = str(run.db)
    yield run
    data.close_all()
    if old is None:
        os.environ.pop("MODELDIFF_DB", None)
    else:
        os.environ["MODELDIFF_DB"] = old


def runs_page(run_id: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = run_id
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def history_of(tiny):
    from engine.results import Database

    with Database(tiny.db, read_only=True) as db:
        return db.run_history(tiny.run_id), db.run(tiny.run_id)["metrics"]


def test_history_in_long_form(tiny):
    history, metrics = history_of(tiny)
    fve = fve_history(history)
    assert set(zip(fve["model"], fve["data"], strict=True)) == {
        (m, d) for m in ("A", "B") for d in (TRAINING, HELD_OUT)
    }
    last = history.iloc[-1]
    held = fve[(fve["step"] == last["step"]) & (fve["data"] == HELD_OUT)]
    assert dict(zip(held["model"], held["fve"], strict=True)) == {
        "A": last["val_fve_a"],
        "B": last["val_fve_b"],
    }
    assert validation_fves(metrics) == {"A": metrics["val_fve_a"], "B": metrics["val_fve_b"]}
    assert set(loss_history(history)["term"]) == {"loss", "AuxK loss"}
    assert set(l0_history(history)["data"]) == {TRAINING, HELD_OUT}
    parts = partition_fve_history(history)
    # A has no B-exclusive decoder, B no A-exclusive one.
    assert set(zip(parts["model"], parts["partition"], strict=True)) == {
        ("A", "a_exclusive"),
        ("A", "shared"),
        ("B", "b_exclusive"),
        ("B", "shared"),
    }
    assert fve_history(history.drop(columns=["fve_a", "fve_b", "val_fve_a", "val_fve_b"])).empty


def test_runs_page_draws_the_curves_then_ce_loss_recovered(tiny):
    history, metrics = history_of(tiny)
    at = runs_page(tiny.run_id)
    shown = {m.label: m.value for m in at.metric}
    assert shown["held-out FVE A"] == f"{metrics['val_fve_a']:.3f}"
    fig = chart(at, "Fraction of variance explained")
    lines = {(t["name"], t["line"]["dash"]): values(t["y"]) for t in fig["data"]}
    assert lines[("A, held out", "dot")] == list(history["val_fve_a"])
    assert lines[("B, training batch", "solid")] == list(history["fve_b"])
    chart(at, "Loss and its AuxK term (training batch)")
    chart(at, "Held-out FVE from one partition's features alone")
    assert any("modeldiff evaluate --run" in c.value for c in at.caption)

    result = evaluate(tiny.run_dir, tiny.store, max_windows=1)
    at = runs_page(tiny.run_id)
    table = next(d.value for d in at.dataframe if "CE spliced" in d.value.columns)
    assert list(table["model"]) == ["A", "B"]
    for row in table.itertuples():
        m = result["models"][row.model.lower()]
        assert row._3 == pytest.approx(m["ce_spliced"]) and row.tokens == m["tokens"]
    assert json.loads((tiny.run_dir / "evaluation.json").read_text()) == result
