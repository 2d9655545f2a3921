"""The Streamlit dashboard on a real results database built by the engine (planted features,
offline explanations and scores), driven headless with `streamlit.testing.v1.AppTest`."""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from engine.analysis.analyze import analyze
from engine.analysis.context import Context
from engine.analysis.geometry import match_runs
from engine.analysis.scan import ScanConfig
from engine.crosscoder.checkpoint import save_crosscoder
from engine.crosscoder.normalize import Normalizer
from engine.interp.offline import OfflineExplainer, OfflineJudge, background_from
from engine.interp.run import explain_run, score_run
from engine.store import Database
from tests.test_analysis import make_store, planted_crosscoder

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
RUN = "planted"
OTHER = "planted-seed1"
TEA, BOMB = 1, 4  # the A-exclusive tea/coffee feature and the shared, harmful bomb feature
SCRIPT = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    """A results database with one analysed, explained and scored run; the app reads it
    through $MODELDIFF_DB."""
    tmp = tmp_path_factory.mktemp("dashboard")
    make_store(tmp / "store")
    save_crosscoder(
        tmp / "run",
        planted_crosscoder(),
        Normalizer.identity(),
        crosscoder_config={},
        train_config={},
        metrics={"fve_a": 0.91, "fve_b": 0.87, "dead_frac": 0.5, "l0": 2.5},
    )
    path = tmp / "results.duckdb"
    analyze(
        tmp / "run",
        tmp / "store",
        path,
        run_id=RUN,
        scan_cfg=ScanConfig(top_k=5, segment_pairs=8),
        progress=False,
    )
    # A second run of the same crosscoder, matched against the first (every feature recurs).
    analyze(tmp / "run", tmp / "store", path, run_id=OTHER, progress=False)
    with Database(path) as db:
        explainer = OfflineExplainer(background_from(db.window_texts(RUN)))
        explain_run(db, RUN, explainer, progress=False)
        score_run(db, RUN, OfflineJudge(), progress=False)
        cc = planted_crosscoder()
        db.write_matches(RUN, OTHER, match_runs(cc, cc))
    old = os.environ.get("MODELDIFF_DB")
    os.environ["MODELDIFF_DB"] = str(path)
    yield path
    from dashboard import data

    data.close_all()
    if old is None:
        os.environ.pop("MODELDIFF_DB", None)
    else:
        os.environ["MODELDIFF_DB"] = old


def app(page: str | None = None, **params: str) -> AppTest:
    """The app run once (with query parameters), then switched to `page` if given."""
    at = AppTest.from_file(APP, default_timeout=60)
    params = {"run": RUN, **params}
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def html_of(at: AppTest) -> str:
    """All HTML blocks of the page, joined."""
    return "\n".join(str(h.proto.body) for h in at.html)


def feature_ids(at: AppTest) -> list[int]:
    """The feature ids in the features table."""
    return [int(f) for f in at.dataframe[0].value["feature_id"]]


def explanation(db_path: Path, feature_id: int) -> str:
    with Database(db_path) as db:
        return str(db.explanations(RUN, feature_id)["explanation"].iloc[0])


# -- every view ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "page, title",
    [
        (None, "Runs"),
        ("views/features.py", "Features"),
        ("views/triage.py", "Triage"),
        ("views/compare.py", "Compare runs"),
    ],
)
def test_every_view_renders(db_path, page, title):
    at = app(page)
    assert not at.error, [e.value for e in at.error]
    assert [t.value for t in at.title] == [title]


def test_runs_view_shows_models_metrics_and_partition_counts(db_path):
    at = app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["FVE A"] == "0.910" and metrics["L0"] == "2.5"
    runs, summary = at.dataframe[0].value, at.dataframe[1].value.set_index("partition")
    assert list(runs["run"]) == [RUN, OTHER]
    assert summary.loc["A-exclusive", "features"] == 2
    assert summary.loc["shared", "flagged harmful"] == 1


def test_feature_page_renders_without_error(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    assert not at.error
    assert "Feature 1" in html_of(at)


def test_missing_database_explains_how_to_create_one(db_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELDIFF_DB", str(tmp_path / "nowhere.duckdb"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "No results database" in at.error[0].value
    assert any("modeldiff analyze" in c.value for c in at.code)


def test_run_selector_switches_runs(db_path):
    at = app()
    assert at.selectbox(key="run_choice").value == RUN
    at.selectbox(key="run_choice").set_value(OTHER).run()
    assert not at.exception
    assert at.query_params["run"] in (OTHER, [OTHER])
    assert any(f"Run `{OTHER}`" in h.value for h in at.header)


def test_compare_runs_counts_recurring_exclusive_features(db_path):
    at = app("views/compare.py")
    assert at.selectbox(key="cmp_other").value == OTHER
    summary = at.dataframe[0].value.set_index("partition")
    assert summary.loc["A-exclusive", "features"] == 2 and summary.loc["A-exclusive", "recur"] == 2
    table = at.dataframe[1].value
    assert set(table["partition"]) == {"A-exclusive", "B-exclusive"}
    assert (table["cosine"] > 0.99).all()
    # From the other run's side nothing is matched yet: the page says how to match.
    at = app("views/compare.py", run=OTHER)
    assert any(f"--run-id {OTHER} --other {RUN}" in c.value for c in at.code)


# -- the features browser ------------------------------------------------------------------


def test_filters_change_the_features_table(db_path):
    at = app("views/features.py")
    # Default: the exclusive partitions, live features only.
    assert feature_ids(at) == [TEA]
    at.multiselect(key="f_partitions").set_value(["A-exclusive", "B-exclusive", "shared"]).run()
    assert sorted(feature_ids(at)) == [TEA, BOMB]
    assert set(at.dataframe[0].value["partition"]) == {"A-exclusive", "shared"}
    at.checkbox(key="f_harmful").check().run()
    assert feature_ids(at) == [BOMB]
    at.checkbox(key="f_harmful").uncheck().run()
    at.text_input(key="f_search").input("tea").run()
    assert feature_ids(at) == [TEA]
    at.text_input(key="f_search").input("").run()
    at.checkbox(key="f_dead").check().run()
    assert sorted(feature_ids(at)) == [0, 1, 2, 3, 4, 5]
    at.multiselect(key="f_partitions").set_value(["B-exclusive"]).run()
    assert feature_ids(at) == [2]
    assert not at.exception


# -- the feature page ----------------------------------------------------------------------


def test_feature_page_shows_explanation_and_tea_contexts(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    page = html_of(at)
    assert html.escape(explanation(db_path, TEA)) in page
    assert "A-exclusive" in page
    # Highlighted spans carry their activation on hover, and the hottest text is tea/coffee.
    assert 'title="activation' in page
    hot = [
        html.unescape(piece.split(">", 1)[1])
        for piece in page.split("<span ")
        if piece.startswith('style="background:rgba') and 'title="activation' in piece
    ]
    words = {h.split("<", 1)[0].strip() for h in hot}
    assert "tea" in words and words <= {"tea", "coffee"}
    assert any("Quantile bin 0" in e.label for e in at.expander)
    assert any("Random non-activating" in e.label for e in at.expander)
    assert any("modeldiff steer" in i.value for i in at.info)


def test_feature_page_tokenization_and_whole_window(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    segment = len(html_of(at))
    at.toggle(key="ctx_whole").set_value(True).run()
    assert len(html_of(at)) > segment
    at.radio(key="ctx_tokens").set_value("model B tokens").run()
    assert not at.exception
    assert "token " in html_of(at) and "outline:1px" in html_of(at)


def test_query_params_restore_the_feature_page(db_path):
    # A shared link to the app's root with ?run=..&feature=.. opens the feature page.
    at = app(run=RUN, feature=str(BOMB))
    page = html_of(at)
    assert "Feature 4" in page and "flagged harmful" in page
    assert html.escape(explanation(db_path, BOMB)) in page
    assert at.query_params["feature"] in (str(BOMB), [str(BOMB)])
    # So does the feature page's own URL.
    at = app("views/feature.py", run=RUN, feature=str(BOMB))
    assert "Feature 4" in html_of(at)
    assert at.number_input(key="feature_input").value == BOMB


def test_feature_input_jumps_to_another_feature(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    at.number_input(key="feature_input").set_value(BOMB).run()
    assert not at.exception
    assert "Feature 4" in html_of(at)
    assert at.query_params["feature"] in (str(BOMB), [str(BOMB)])


# -- triage --------------------------------------------------------------------------------


def test_triage_save_persists_escapes_notes_and_exports(db_path):
    at = app("views/triage.py")
    # No exclusive feature is flagged harmful: the queue falls back to the exclusive ones.
    assert "Feature 1" in html_of(at)
    at.radio[1].set_value("verified")
    at.text_area[0].input(f"{SCRIPT} checked the tea contexts")
    at.text_input(key="reviewer").input("alice")
    next(b for b in at.button if b.label == "Save").click().run()
    assert not at.exception
    assert any("Saved feature 1" in s.value for s in at.success)

    with Database(db_path) as db:
        history = db.triage_history(RUN, TEA)
        assert list(history["status"])[-1] == "verified"
        assert list(history["reviewer"])[-1] == "alice"
        assert SCRIPT in list(history["notes"])[-1]

    # Shown in the history table, and escaped wherever it reaches HTML.
    table = at.dataframe[-1].value
    assert SCRIPT in " ".join(table["notes"])
    assert html.escape(SCRIPT) in html_of(at) and "<script>" not in html_of(at)
    # The reviewer's name is remembered for the session.
    at.switch_page("views/features.py").run()
    at.switch_page("views/triage.py").run()
    assert at.text_input(key="reviewer").value == "alice"

    # The feature page shows the decision, escaped too.
    feature = app("views/feature.py", run=RUN, feature=str(TEA))
    assert html.escape(SCRIPT) in html_of(feature) and "<script>" not in html_of(feature)

    # Export of the verified features: the report names the feature and its explanation.
    report = at.code[-1].value
    assert "## Feature 1 (A-exclusive)" in report
    assert explanation(db_path, TEA).split(" (")[0] in report
    assert "«" in report and "alice" in report
    assert any("Markdown" in d.label for d in at.get("download_button"))


# -- pure helpers --------------------------------------------------------------------------


def test_context_html_escapes_text_and_scales_colour():
    from dashboard.views.common import context_html, marked_text

    text = "<b>tea</b> & coffee"
    spans = np.array([[0, 3], [3, 6], [6, 10], [10, 12], [12, 19]])
    ctx = Context(text, spans, np.array([0, 2.0, 0, 0, 4.0], dtype=np.float32))
    out = context_html(ctx, max_act=4.0)
    assert "<b>" not in out and "&lt;b&gt;" in out and "&amp;" in out
    assert "rgba(255,140,0,1.00)" in out and 'title="activation 2.000"' in out
    assert marked_text(ctx) == "<b>«tea»</b> & «coffee»"


def test_token_pieces_follow_the_model_tokens():
    from dashboard.views.common import token_pieces

    text = "tea time now"
    spans = np.array([[0, 3], [3, 8], [8, 12]])
    ctx = Context(text, spans[1:2], np.array([3.0], dtype=np.float32))
    # Model tokens: "tea", " ti", "me", " now" (one empty special token first).
    window = {
        "text": text,
        "offsets_a": np.array([[0, 0], [0, 3], [3, 6], [6, 8], [8, 12]]),
        "ids_a": np.array([1, 10, 11, 12, 13]),
    }
    pieces = token_pieces(ctx, window, "a", whole=True)
    assert [p[0] for p in pieces] == ["tea", " ti", "me", " now"]
    # " ti" ends inside the active span (3, 8]; so does "me".
    assert [p[1] for p in pieces] == [0.0, 3.0, 3.0, 0.0]
    assert [p[0] for p in token_pieces(ctx, window, "a")] == [" ti", "me"]


def test_cli_dashboard_command_and_errors(tmp_path, monkeypatch):
    from engine.cli import dashboard_command, main

    db = tmp_path / "r.duckdb"
    command = dashboard_command(db)
    assert command[1:4] == ["-m", "streamlit", "run"]
    assert command[4].endswith(os.path.join("dashboard", "app.py"))
    assert "127.0.0.1" in command and "none" in command and command[-2:] == ["--db", str(db)]
    monkeypatch.delenv("MODELDIFF_DB", raising=False)
    assert main(["dashboard", "--db", str(db)]) == 2  # no such file: a clear error
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["dashboard", "--db", str(db)]) == 2
