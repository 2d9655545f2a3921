"""The Streamlit dashboard on a real results database built by the engine (planted features,
offline explanations and scores), driven headless with `streamlit.testing.v1.AppTest`."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from engine.contexts import Context
from engine.results import Database
from tests.dashboard.dashboard_fixture import (
    B_LEANING,
    BOMB,
    JUDGE,
    MARKUP,
    OTHER,
    RUN,
    TEA,
    build_results_db,
)

ROOT = str(Path(__file__).resolve().parents[2])
APP = str(Path(ROOT) / "dashboard" / "app.py")
SCRIPT = "<script>alert('x')</script>"
TRANSFER_NOTE = (
    "Model B has no decoder for this A-exclusive feature: steered with its shared-partition "
    "transfer"
)


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    """The dashboard test database (tests/dashboard_fixture.py); the app reads it through
    $MODELDIFF_DB."""
    path = build_results_db(tmp_path_factory.mktemp("dashboard"))
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


CATEGORY_ROWS = ["A-exclusive", "A-leaning shared", "shared", "B-leaning shared", "B-exclusive"]


def test_runs_view_shows_models_metrics_and_partition_counts(db_path):
    at = app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["FVE A"] == "0.910" and metrics["L0"] == "2.5"
    runs, summary = at.dataframe[0].value, at.dataframe[1].value.set_index("partition")
    assert list(runs["run"]) == [RUN, OTHER]
    # Leaning shared features are rows of their own, from "only in A" to "only in B".
    assert list(summary.index) == CATEGORY_ROWS
    assert summary["features"].to_dict() == dict(zip(CATEGORY_ROWS, [2, 1, 1, 1, 1], strict=True))
    # The harmful bomb feature is shared but its B decoder is small: A-leaning.
    assert summary.loc["A-leaning shared", "flagged harmful"] == 1
    assert summary.loc["shared", "flagged harmful"] == 0
    # Only the tea feature has an exclusivity score (5): counted and averaged per partition.
    assert summary["exclusivity scored"].to_dict() == dict.fromkeys(CATEGORY_ROWS, 0) | {
        "A-exclusive": 1
    }
    assert summary.loc["A-exclusive", "mean exclusivity"] == "5.00"
    assert summary.loc["shared", "mean exclusivity"] == "–"
    # The "By partition" table has a value in every cell, for an unexplained run too.
    assert summary.notna().all().all() and summary["features"].sum() == 6
    other = app(run=OTHER).dataframe[1].value.set_index("partition")
    assert list(other.index) == CATEGORY_ROWS
    assert other.notna().all().all() and other["explained"].sum() == 0
    assert other["exclusivity scored"].sum() == 0 and "mean exclusivity" not in other
    assert any("above 0.8" in c.value and "below 0.2" in c.value for c in at.caption)


def test_runs_view_reports_dead_fraction_per_partition(db_path):
    at = app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["dead (training)"] == "50%"
    assert metrics["dead A-exclusive"] == "50%" and metrics["dead B-exclusive"] == "100%"
    assert metrics["dead shared"] == "33.3%"
    # The history the run recorded, drawn per partition and for all features.
    fig = chart(at, "Dead features during training, by partition")
    lines = {t["name"]: (values(t["x"]), values(t["y"])) for t in fig["data"]}
    assert set(lines) == {"all features", "A-exclusive", "B-exclusive", "shared"}
    assert lines["B-exclusive"] == ([50, 100], [0.0, 1.0])
    sizes = chart(at, "Exclusive partition sizes during training (adaptive partitions)")
    lines = {t["name"]: (values(t["x"]), values(t["y"])) for t in sizes["data"]}
    assert lines == {"A-exclusive": ([50, 100], [3, 2]), "B-exclusive": ([50, 100], [3, 1])}
    # The relative-norm histogram colours leaning features apart and marks both bounds.
    hist = chart(at, "Relative decoder norm (1 = only in A, 0 = only in B)")
    assert {t["name"] for t in hist["data"]} == set(CATEGORY_ROWS)
    assert sorted(shape["x0"] for shape in hist["layout"]["shapes"]) == [0.2, 0.8]


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
    # Default: every exclusive candidate (exclusive and leaning shared), live features only.
    assert at.multiselect(key="f_partitions").value == [
        "A-exclusive", "A-leaning shared", "B-leaning shared", "B-exclusive",
    ]  # fmt: skip
    assert sorted(feature_ids(at)) == [TEA, BOMB]
    shown = at.dataframe[0].value.set_index("feature_id")["partition"]
    assert shown.to_dict() == {TEA: "A-exclusive", BOMB: "A-leaning shared"}
    at.checkbox(key="f_harmful").check().run()
    assert feature_ids(at) == [BOMB]
    at.checkbox(key="f_harmful").uncheck().run()
    at.text_input(key="f_search").input("tea").run()
    assert feature_ids(at) == [TEA]
    at.text_input(key="f_search").input("").run()
    at.checkbox(key="f_dead").check().run()
    assert sorted(feature_ids(at)) == [0, TEA, 2, BOMB, B_LEANING]  # all but shared 3
    at.multiselect(key="f_partitions").set_value(["B-exclusive"]).run()
    assert feature_ids(at) == [2]
    assert not at.exception


@pytest.mark.parametrize(
    "chosen, expected",
    [
        (["A-leaning shared"], [BOMB]),
        (["B-leaning shared"], [B_LEANING]),
        (["shared"], [3]),  # shared and leaning to neither model
        (["A-leaning shared", "B-leaning shared", "shared"], [3, BOMB, B_LEANING]),
    ],
)
def test_leaning_shared_features_filter_apart_from_shared(db_path, chosen, expected):
    at = app("views/features.py")
    at.multiselect(key="f_partitions").set_value(chosen)
    at.checkbox(key="f_dead").check().run()
    assert sorted(feature_ids(at)) == expected
    assert set(at.dataframe[0].value["partition"]) == set(chosen)
    assert "0.8" in at.multiselect(key="f_partitions").help
    assert not at.exception


def every_feature(at: AppTest) -> None:
    """Widen the features browser to every partition, dead features included."""
    at.multiselect(key="f_partitions").set_value(CATEGORY_ROWS)
    at.checkbox(key="f_dead").check().run()


def match_line(at: AppTest) -> str:
    """The "N features match" line above the table."""
    return next(m.value for m in at.markdown if "match" in m.value)


def test_exclusivity_filter_and_sort(db_path):
    at = app("views/features.py")
    every_feature(at)
    assert sorted(feature_ids(at)) == [0, 1, 2, 3, 4, 5]
    table = at.dataframe[0].value.set_index("feature_id")
    assert table.loc[TEA, "exclusivity"] == 5.0 and table["exclusivity"].isna().sum() == 5
    # A narrowed range keeps only the features scored inside it.
    at.slider(key="f_excl").set_value((4.0, 5.0)).run()
    assert feature_ids(at) == [TEA]
    at.slider(key="f_excl").set_value((1.0, 4.5)).run()
    assert feature_ids(at) == [] and match_line(at).startswith("**0** features match")
    # The full range filters nothing: unscored features come back.
    at.slider(key="f_excl").set_value((1.0, 5.0)).run()
    assert len(feature_ids(at)) == 6
    at.selectbox(key="f_order").set_value("exclusivity").run()
    assert feature_ids(at)[0] == TEA  # descending, unscored features last
    assert not at.exception


def test_features_are_paged_in_the_database(db_path, monkeypatch):
    from dashboard import data

    monkeypatch.setattr(data, "PAGE_SIZE", 4)
    at = app("views/features.py")
    every_feature(at)
    at.selectbox(key="f_order").set_value("feature_id")
    at.toggle(key="f_desc").set_value(False).run()
    assert match_line(at) == "**6** features match. Rows 1–4."
    assert feature_ids(at) == [0, 1, 2, 3]
    assert at.number_input(key="f_page").max == 2
    at.number_input(key="f_page").set_value(2).run()
    assert match_line(at) == "**6** features match. Rows 5–6."
    assert feature_ids(at) == [4, 5]
    # The database sorts before it pages: page 2 of the descending order holds the lowest ids.
    at.toggle(key="f_desc").set_value(True).run()
    assert feature_ids(at) == [1, 0]
    # A filter that leaves one page removes the page input.
    at.text_input(key="f_search").input("tea").run()
    assert match_line(at) == "**1** feature matches." and feature_ids(at) == [TEA]
    assert not [n for n in at.number_input if n.key == "f_page"]
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


def test_feature_page_tokenization_and_whole_window(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    segment = len(html_of(at))
    at.toggle(key="ctx_whole").set_value(True).run()
    assert len(html_of(at)) > segment
    at.radio(key="ctx_tokens").set_value("model B tokens").run()
    assert not at.exception
    assert "token " in html_of(at) and "outline:1px" in html_of(at)


def values(array) -> list:
    """A Plotly JSON array as a list (Plotly writes numpy arrays as base64 typed arrays)."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def chart(at: AppTest, title: str) -> dict:
    """The Plotly figure (as JSON) of the chart with this title."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return next(s for s in specs if (s["layout"].get("title") or {}).get("text") == title)


def test_feature_page_shows_exclusivity_score_and_texts(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    page = html_of(at)
    assert "<b>Exclusivity 5.0</b> / 5" in page
    assert "interpretability 4.00 (needs ≥ 3)" in page and "similarity 1.00" in page
    assert f">{JUDGE}</code>" in page and "held-out FVE 0.43" in page
    # A stitch below the warning level says what that means for the score.
    assert "below 0.5, a target that does not react is weak evidence" in page
    # The offline judge's score is a proxy, marked beside the number.
    assert {m.label: m.value for m in at.metric}["exclusivity"] == "5.0 (proxy)"
    (texts,) = [e for e in at.expander if e.label.startswith("Steered texts")]
    assert texts.label.endswith("(3 prompts)")
    inside = "\n".join(str(h.proto.body) for h in texts.get("html"))
    # Both models' texts by strength, the judge's verdicts and reasons, all escaped.
    assert inside.count("<b>Prompt:</b>") == 3 and "α = 0 (baseline)" in inside
    assert "A cup of tea sounds lovely." in inside and "Let us talk about trains." in inside
    assert "<b>similarity 1</b>: steered answers of the two models" in inside
    assert html.escape(MARKUP) in inside and MARKUP not in inside
    assert inside.index("α = 4") < inside.index("α = 8")


def test_feature_page_draws_the_stored_steering_evaluation(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    fig = chart(at, "CCP alignment: feature 1")
    lines = {t["name"]: t["y"] for t in fig["data"] if t.get("name")}
    # Mean of the four prompts' ratings per strength (-2, 0, 2), in percent (score x 20).
    assert lines["model A: own decoder - chinese alignment"] == [25.0, 35.0, 90.0]
    assert lines["model B: stitched from model A - chinese alignment"] == [35.0, 40.0, 50.0]
    assert lines["model A: own decoder - coherence"] == [85.0, 100.0, 75.0]
    (rated,) = [e for e in at.expander if e.label.startswith("Rated responses")]
    assert rated.label == "Rated responses (24)"
    assert any("`steer-eval:china_alignment`: 4 prompts" in c.value for c in at.caption)


def test_feature_without_scores_says_how_to_create_them(db_path):
    at = app("views/feature.py", run=RUN, feature=str(BOMB))
    captions = " ".join(c.value for c in at.caption)
    assert "No exclusivity score yet" in captions and f"--features {BOMB}" in captions
    assert "No steering evaluation yet" in captions and f"--feature {BOMB}" in captions
    assert {m.label: m.value for m in at.metric}["exclusivity"] == "–"
    assert not [c for c in at.get("plotly_chart") if "CCP" in c.proto.spec]


def test_feature_page_neighbours_and_matches(db_path):
    from dashboard.data import label

    at = app("views/feature.py", run=RUN, feature=str(TEA))
    frames = [d.value for d in at.dataframe]
    near = next(f for f in frames if "neighbor_id" in f.columns)
    # Each neighbour's partition comes from its own feature-table row.
    with Database(db_path) as db:
        parts = db.features(RUN).set_index("feature_id")["partition"]
    assert list(near["partition"]) == [label(parts[n]) for n in near["neighbor_id"]]
    assert set(near["partition"]) == {"A-exclusive", "shared"}
    matched = next(f for f in frames if "recurs" in f.columns)
    assert list(matched["run"]) == [OTHER] and list(matched["feature"]) == [TEA]


def test_feature_page_defaults_to_the_strongest_live_exclusive_feature(db_path):
    at = app("views/feature.py")
    assert "Feature 1" in html_of(at)
    assert at.number_input(key="feature_input").value == TEA


def test_query_params_restore_the_feature_page(db_path):
    # A shared link to the app's root with ?run=..&feature=.. opens the feature page.
    at = app(run=RUN, feature=str(BOMB))
    page = html_of(at)
    assert "Feature 4" in page and "flagged harmful" in page
    assert ">A-leaning shared</span>" in page
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


# -- steering and typed text ----------------------------------------------------------------


def button(at: AppTest, label: str):
    """The (form submit) button with this label."""
    return next(b for b in at.button if b.label == label)


def steering_app(**widgets) -> AppTest:
    """The tea feature's page with the steering form filled in (short generations)."""
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    at.text_area(key="s_prompt").input("I would like a cup of")
    at.number_input(key="s_max_new").set_value(6)
    for key, value in widgets.items():
        if key == "s_target":
            at.radio(key=key).set_value(value)
        else:
            at.text_input(key=key).input(value)
    return at


def generated(at: AppTest) -> list[str]:
    """The generated texts shown in boxes, unescaped."""
    page = html_of(at)
    pieces = page.split('<div class="steer-text"')[1:]
    return [html.unescape(p.split(">", 1)[1].split("</div>", 1)[0]) for p in pieces]


def test_steering_generates_baseline_and_steered_text(db_path):
    at = steering_app()
    button(at, "Generate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    texts = generated(at)
    assert len(texts) == 2 and all(t.strip() for t in texts), texts
    assert any("Steered: α = 4" in c.value for c in at.caption)
    # Model A decodes the feature itself: no transfer note.
    assert not any(TRANSFER_NOTE in i.value for i in at.info)


def test_steering_the_other_model_uses_the_transfer_and_says_so(db_path):
    at = steering_app(s_target="both")
    button(at, "Generate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(generated(at)) == 4  # baseline and steered for A and for B
    assert any(TRANSFER_NOTE in i.value for i in at.info)


def test_saving_a_steering_sample_persists(db_path):
    at = steering_app()
    at.text_area(key="s_prompt").input("Save me: a cup of")
    button(at, "Generate").click().run()
    base, steered = generated(at)
    button(at, "Save sample").click().run()
    assert not at.exception
    assert any("Saved as steering sample" in s.value for s in at.success)
    with Database(db_path) as db:
        samples = db.steering_samples(RUN, TEA)
    row = samples[samples["prompt"] == "Save me: a cup of"].iloc[-1]
    assert row["model"] == "a" and row["alpha"] == 4.0 and row["temperature"] == 0.0
    assert row["baseline"] == base and row["steered"] == steered
    assert any("Saved steering samples of this feature" in e.label for e in at.expander)
    # Saved once: the button is replaced by the confirmation.
    assert not any(b.label == "Save sample" for b in at.button)


def test_strength_sweep_shows_one_row_per_strength(db_path):
    at = steering_app(s_target="both", s_sweep="0, 5 -5")
    button(at, "Strength sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "steer-sweep" in html_of(at)
    assert "α = 0 (baseline)" in html_of(at) and "α = -5" in html_of(at)
    assert len(generated(at)) == 3 * 2  # three strengths, two models
    assert any(TRANSFER_NOTE in i.value for i in at.info)
    assert any(b.label == "Save 4 samples" for b in at.button)


def test_steering_panel_explains_how_to_enable_it_when_models_are_missing(db_path):
    # The second run records no model names: one message, and the rest of the page works.
    at = app("views/feature.py", run=OTHER, feature=str(TEA))
    assert not at.error
    off = [i.value for i in at.info if "Live generation is off" in i.value]
    assert len(off) == 1 and "does not record which model" in off[0]
    assert not any(b.label == "Generate" for b in at.button)
    assert 'title="activation' in html_of(at)  # the contexts still render


def test_steering_problem_names_what_is_missing(db_path, tmp_path):
    from engine.steering.run import steering_problem

    with Database(db_path) as db:
        run = db.run(RUN)
    assert steering_problem(run) is None
    assert "no trained crosscoder" in steering_problem({**run, "checkpoint_path": str(tmp_path)})
    gone = {**run["model_b"], "name": str(tmp_path / "deleted-model")}
    assert "does not exist" in steering_problem({**run, "model_b": gone})


def plain(markup: str) -> str:
    """The text of an HTML block."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_steering_plans_of_a_run_feature(db_path):
    """The engine helpers behind the panel: plans per model, seeded sampled streams."""
    from engine.config import ConfigError
    from engine.crosscoder.checkpoint import load_crosscoder
    from engine.models.loading import load_model
    from engine.steering.run import plan_steering, stream_text
    from engine.steering.steer import GenerationConfig

    with Database(db_path) as db:
        run, feature = db.run(RUN), db.feature(RUN, TEA)
        dead = db.feature(RUN, 0)
    cc, normalizer, _ = load_crosscoder(run["checkpoint_path"])
    own, other = (plan_steering(run, feature, m, cc, normalizer) for m in "ab")
    assert own.note is None and own.layer == 1 and own.s_max == pytest.approx(feature["s_max"])
    assert other.transfer["from"] == "a" and other.note.startswith(TRANSFER_NOTE)
    assert other.vector.shape == (cc.d_b,) and own.vector.shape == (cc.d_a,)
    with pytest.raises(ConfigError, match="never activated"):
        plan_steering(run, dead, "a", cc, normalizer)

    tiny = load_model(run["model_a"]["name"])
    cfg = GenerationConfig(max_new_tokens=6, greedy=False, temperature=1.0, seed=3)
    first = "".join(own.stream(tiny, "Tea or", 4.0, cfg))
    assert first == "".join(own.stream(tiny, "Tea or", 4.0, cfg))
    greedy = GenerationConfig(max_new_tokens=6)
    assert (
        "".join(own.stream(tiny, "Tea or", 4.0, greedy))
        == own.sweep(tiny, "Tea or", [4.0], greedy)[0]
    )
    assert (
        "".join(stream_text(tiny, "Tea or", greedy)) == own.sweep(tiny, "Tea or", [0.0], greedy)[0]
    )
    sample = own.sample("Tea or", 4.0, cfg, "b", "s")
    assert sample["seed"] == 3 and sample["temperature"] == 1.0 and sample["transfer"] is None


def test_try_your_own_text_highlights_the_feature(db_path):
    at = app("views/feature.py", run=RUN, feature=str(TEA))
    text = "Tea <b>and</b> coffee, then a walk by the river."
    at.text_area(key="p_text").input(text)
    button(at, "Show activations").click().run()
    assert not at.exception and not at.error
    caption = next(c.value for c in at.caption if c.value.startswith("Active on"))
    assert "aligned tokens" in caption
    # All of the typed text is shown (tags stripped: the text itself), escaped.
    (box,) = [b for b in map(str, (h.proto.body for h in at.html)) if plain(b) == text]
    assert "<b>" not in box and 'title="activation' in box
    at.radio(key="p_view").set_value("model B tokens").run()
    assert not at.exception
    assert "token " in html_of(at) and "outline:1px" in html_of(at)


# -- triage --------------------------------------------------------------------------------


def test_triage_queue_holds_flagged_leaning_shared_features(db_path):
    at = app("views/triage.py")
    # The harmful bomb feature is shared, but leans to A: the flagged queue holds it.
    assert at.radio(key="t_mode").value == "flagged"
    assert not [i for i in at.info if "showing" in i.value]
    assert "Feature 4" in html_of(at) and ">A-leaning shared</span>" in html_of(at)
    assert any("Feature **1** of **1**" in m.value for m in at.markdown)
    # The candidates queue: exclusive first, then leaning (by relative decoder norm).
    at.radio(key="t_mode").set_value("exclusive").run()
    assert any("Feature **1** of **2**" in m.value for m in at.markdown)
    assert "Feature 1" in html_of(at) and ">A-exclusive</span>" in html_of(at)
    next(b for b in at.button if b.label == "Next →").click().run()
    assert "Feature 4" in html_of(at)
    assert not at.exception


def test_triage_save_persists_escapes_notes_and_exports(db_path):
    at = app("views/triage.py")
    # The queue of every live exclusive candidate starts with the A-exclusive tea feature.
    at.radio(key="t_mode").set_value("exclusive").run()
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
    assert "- **Exclusivity score:** 5.0 (offline proxy) / 5" in report
    assert any("Markdown" in d.label for d in at.get("download_button"))


# -- the dashboard and the modeldiff commands on one file ----------------------------------

CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def start_cli(*args: str) -> subprocess.Popen:
    """`modeldiff ARGS` started as a separate process."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args],
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    """The output of a started command, which must succeed."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def test_commands_write_while_the_dashboard_is_open(db_path, tmp_path, monkeypatch):
    # A copy of the test database, so that the other tests keep theirs unchanged.
    path = tmp_path / "results.duckdb"
    shutil.copy(db_path, path)
    monkeypatch.setenv("MODELDIFF_DB", str(path))
    page = app("views/feature.py", run=OTHER, feature=str(TEA))
    with Database(path, read_only=True) as db:
        assert db.explanations(OTHER).empty and db.triage_history(OTHER).empty
        theirs = str(db.explanations(RUN, TEA)["explanation"].iloc[0])
    assert html.escape(theirs) not in html_of(page)

    # Another process holds the file for writing (as an analysis does) while `explain`
    # starts and the dashboard reads a page it has not cached: both wait for it.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    explain = start_cli("explain", "--db", str(path), "--run-id", OTHER, "--quiet")
    triage = app("views/triage.py", run=OTHER)
    assert holder.wait(timeout=60) == 0
    assert "2 explained" in finish(explain)

    # The dashboard shows the rows `explain` wrote on its next rerun (no stale cache).
    page.run()
    assert not page.exception
    with Database(path, read_only=True) as db:
        ours = db.explanations(OTHER)
    assert len(ours) == 2
    assert html.escape(str(ours.set_index("feature_id").loc[TEA, "explanation"])) in html_of(page)

    # `score` writes while the dashboard saves a triage decision: neither is lost.
    score = start_cli("score", "--db", str(path), "--run-id", OTHER, "--quiet")
    triage.radio(key="t_mode").set_value("exclusive").run()
    triage.radio[1].set_value("verified")
    triage.text_input(key="reviewer").input("bob")
    next(b for b in triage.button if b.label == "Save").click().run()
    assert not triage.exception
    assert any("Saved feature" in s.value for s in triage.success)
    assert "2 scored" in finish(score)
    with Database(path, read_only=True) as db:
        assert list(db.triage_history(OTHER)["reviewer"]) == ["bob"]
        assert len(db.scores(OTHER)) == 2
        assert len(db.explanations(OTHER)) == 2
    page.run()
    assert not page.exception


def test_explain_holds_no_lock_during_its_cost_prompt(db_path, tmp_path):
    path = tmp_path / "results.duckdb"
    shutil.copy(db_path, path)
    explain = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "explain", "--db", str(path), "--run-id", OTHER,
         "--explainer", "anthropic"],
        env={**CLI_ENV, "ANTHROPIC_API_KEY": "never-sent"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    shown = ""
    while not shown.endswith("[y/N] "):
        char = explain.stdout.read(1)
        assert char, explain.stderr.read()
        shown += char
    # While the analyst reads the cost, others can write: no waiting (wait=0).
    with Database(path, wait=0) as db:
        db.set_triage(OTHER, TEA, "screening", "", "carol")
    out, err = explain.communicate("n\n", timeout=60)
    assert explain.returncode == 0, err
    assert "nothing sent" in out
    with Database(path, read_only=True) as db:
        assert list(db.triage_history(OTHER)["reviewer"]) == ["carol"]
        assert db.explanations(OTHER).empty


def test_a_blocked_save_says_so_and_can_be_retried(db_path, tmp_path, monkeypatch):
    from dashboard import data

    path = tmp_path / "results.duckdb"
    shutil.copy(db_path, path)
    monkeypatch.setenv("MODELDIFF_DB", str(path))
    with Database(path, read_only=True) as db:
        before = len(db.triage_history(RUN))  # (earlier tests may have triaged)
    at = steering_app()
    at.text_area(key="s_prompt").input("Blocked: a cup of")
    button(at, "Generate").click().run()
    triage = app("views/triage.py")
    data.database(str(path.resolve())).wait = 0.3  # give up quickly
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    button(at, "Save sample").click().run()
    triage.text_input(key="reviewer").input("erin")
    next(b for b in triage.button if b.label == "Save").click().run()
    assert holder.wait(timeout=60) == 0
    # Each page says what was not saved and why, and keeps working.
    assert not at.exception and not triage.exception
    assert any("Not saved" in e.value and "lock" in e.value for e in at.error)
    assert any("Not saved" in e.value and "lock" in e.value for e in triage.error)
    with Database(path, read_only=True) as db:
        assert len(db.triage_history(RUN)) == before
        assert "Blocked: a cup of" not in set(db.steering_samples(RUN, TEA)["prompt"])
    # Once the other process is done, saving again works.
    button(at, "Save sample").click().run()
    next(b for b in triage.button if b.label == "Save").click().run()
    assert any("Saved as steering sample" in s.value for s in at.success)
    assert any("Saved feature" in s.value for s in triage.success)
    with Database(path, read_only=True) as db:
        assert list(db.triage_history(RUN)["reviewer"])[before:] == ["erin"]
        assert "Blocked: a cup of" in set(db.steering_samples(RUN, TEA)["prompt"])


def test_explain_batch_holds_no_lock_while_the_batch_runs(db_path, tmp_path):
    pytest.importorskip("anthropic")
    from engine.interp.anthropic.client import Spending
    from engine.interp.anthropic.explainer import AnthropicExplainer
    from engine.interp.run import explain_run, ordered_features
    from tests.interp.test_interp import GOOD, FakeAPI, batch, jsonl, message

    path = tmp_path / "results.duckdb"
    shutil.copy(db_path, path)
    db = Database(path, create=False, hold=False)  # as `modeldiff explain` opens it
    ids = ordered_features(db, OTHER, None, None)
    # The Message Batches API (the network edge): one batch, in progress once, then ended.
    api = FakeAPI()
    api.on("POST", "/v1/messages/batches", batch("b1", "in_progress"))
    api.on("GET", "/v1/messages/batches/b1", batch("b1", "in_progress"), batch("b1", "ended"))
    good = {"type": "succeeded", "message": message(GOOD)}
    api.on("GET", "/v1/messages/batches/b1/results", jsonl({f"feature-{i}": good for i in ids}))
    writes: list[subprocess.CompletedProcess] = []

    def poll_wait(seconds: float) -> None:
        """While the batch runs, another process writes the file, without waiting."""
        command = [sys.executable, "-c", WRITE_TRIAGE, str(path), OTHER, str(ids[0])]
        writes.append(subprocess.run(command, env=CLI_ENV, capture_output=True, text=True))

    ex = AnthropicExplainer(
        client=api.client(), batch=True, poll_interval=1.0, sleep=poll_wait,
        spending=Spending.agreed(),
    )  # fmt: skip
    explain_run(db, OTHER, ex, ledger=tmp_path / "batches.json", progress=False)
    assert len(writes) == 1 and writes[0].returncode == 0, writes[0].stderr
    assert set(db.explanations(OTHER)["feature_id"]) == set(ids)
    assert list(db.triage_history(OTHER)["reviewer"]) == ["poller"]
    db.close()


# Records a triage decision (`python -c WRITE_TRIAGE PATH RUN FEATURE`), failing at once
# if the file is locked.
WRITE_TRIAGE = """
import sys
from engine.results import Database
with Database(sys.argv[1], create=False, wait=0) as db:
    db.set_triage(sys.argv[2], int(sys.argv[3]), "screening", "", "poller")
"""


# Holds a results file open for writing for 1.5 s (`python -c HOLD_LOCK PATH`).
HOLD_LOCK = """
import sys, time, duckdb
conn = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(1.5)
conn.close()
"""


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


def test_exclusivity_callout_for_filtered_and_unread_scores():
    from dashboard.views.common import exclusivity_html, steered_texts_html

    details = {"source": "b", "target": "a", "interpretability": 2.0, "similarity": None,
               "filtered": True, "min_interpretability": 3.0}  # fmt: skip
    filtered = exclusivity_html({"value": None, "judge": "j<1>", "details": details})
    assert "filtered: steering not interpretable" in filtered
    assert "interpretability 2.00 (needs ≥ 3)" in filtered and "similarity –" in filtered
    assert "model B steered with its decoder, model A through the stitch" in filtered
    assert "j&lt;1&gt;" in filtered
    unread = exclusivity_html({"value": float("nan"), "details": {**details, "filtered": False}})
    assert "no score" in unread and "filtered" not in unread
    # Texts sort by strength as numbers; a prompt never rated for similarity says so.
    entry = {
        "prompt": "Hi",
        "interpretability": {"score": 2.0, "reasoning": "flat"},
        "source_texts": {"10": "ten", "2": "two", "0": "zero"},
        "target_texts": {},
    }
    out = steered_texts_html(entry, "b", "a")
    assert out.index("α = 0") < out.index("α = 2") < out.index("α = 10")
    assert "<b>similarity</b>: not rated" in out and "model B (own decoder)" in out


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
