"""The Runs page's exclusivity calibration panel and the feature page's reading of a score
against it, on the dashboard's test database with calibration rows stored through the
engine (`Database.add_calibration`, as `modeldiff exclusivity --protocol figure5` writes
them; values set by hand: the tiny models' steering is noise)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from engine.results import Database
from tests.dashboard.dashboard_fixture import JUDGE, OTHER, RUN, TEA, build_results_db
from tests.dashboard.test_dashboard import APP, html_of

# Category -> exclusivity of its items (None: not interpretable, filtered).
SCORES = {
    "a_exclusive": [5.0, 4.0, 4.5],
    "b_exclusive": [3.0, None],
    "shared": [1.0, 2.0, 1.5, 4.0, None],
    "random": [None, None, 2.0],
}


def store_calibration(path, scores: dict, tea: tuple[float, float, float]) -> None:
    """Calibration items (category -> exclusivity of each, None: filtered, unfiltered 3.0)
    and the tea feature's score again with its interval, as `modeldiff exclusivity` stores."""
    with Database(path) as db:
        for category, values in scores.items():
            for item, value in enumerate(values):
                db.add_calibration(
                    RUN, protocol="figure5", judge=JUDGE, category=category, item=item,
                    feature_id=None if category == "random" else item, value=value,
                    ci_low=None if value is None else max(value - 0.5, 1.0),
                    ci_high=None if value is None else min(value + 0.5, 5.0),
                    unfiltered=3.0 if value is None else value, interpretability=3.5,
                    details={"selection": "test"},
                )  # fmt: skip
        value, low, high = tea
        db.add_exclusivity_score(
            RUN, TEA, judge=JUDGE, prompt_version="minilm-shift-v1", value=value, ci_low=low,
            ci_high=high, n_examples=9, details={"source": "a", "target": "b", "units": 9},
        )  # fmt: skip


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    path = build_results_db(tmp_path_factory.mktemp("calibration_panel"))
    store_calibration(path, SCORES, (4.5, 3.9, 5.0))
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
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in {"run": RUN, **params}.items():
        at.query_params[key] = value
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_runs_page_draws_the_distributions_per_category(db_path):
    at = app()
    assert "Exclusivity calibration" in [s.value for s in at.subheader]
    assert any("proxies" in w.value for w in at.warning)  # the offline judge, said so
    table = at.dataframe[-1].value.set_index("category")
    assert list(table.index) == [
        "A-exclusive", "B-exclusive", "shared", "random direction (null)"
    ]  # fmt: skip
    assert table.loc["shared", "items"] == 5 and table.loc["shared", "interpretable"] == 4
    assert table.loc["shared", "mean exclusivity"].startswith("2.12 [")
    assert table.loc["random direction (null)", "mean exclusivity"] == "2.00 [2.00, 2.00]"
    figure = at.get("plotly_chart")[-1].proto.spec
    assert "shared: scored (4 of 5 interpretable)" in figure
    # A run without a calibration says how to make one.
    other = app(run=OTHER)
    assert any("--protocol figure5" in c.value for c in other.caption)


def test_feature_page_reads_a_score_against_the_calibration(db_path):
    at = app("views/feature.py", feature=str(TEA))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["exclusivity"] == "4.5 (proxy)"
    (line,) = [c.value for c in at.caption if c.value.startswith("Exclusivity 4.5")]
    assert "4.5 [3.9–5.0]" in line and "offline proxy" in line
    assert (
        "Above 100% of shared features (n = 4), 100% of random directions (n = 1), 33% of "
        "A-exclusive features (n = 3)"
    ) in line
    page = html_of(at)
    assert "offline proxy</span>, 95% interval [3.9, 5.0] over 9 prompt × sample units" in page


def test_pages_warn_when_exclusive_features_score_like_random_directions(tmp_path, monkeypatch):
    """A calibration whose random directions score as high as its exclusive features
    says so on the Runs page and next to a feature's score."""
    path = build_results_db(tmp_path)
    flat = {"a_exclusive": [5.0, 4.8, 5.0], "random": [5.0, 5.0, 4.8]}
    store_calibration(path, flat, (5.0, 5.0, 5.0))
    monkeypatch.setenv("MODELDIFF_DB", str(path))
    at = app()
    (warning,) = [w.value for w in at.warning if "do not stand out" in w.value]
    assert "random directions score 4.93" in warning and "n = 3" in warning
    feature = app("views/feature.py", feature=str(TEA))
    (line,) = [c.value for c in feature.caption if c.value.startswith("Exclusivity 5.0")]
    assert "random directions score as high as exclusive features" in line


def test_features_list_and_report_show_interval_and_proxy(db_path):
    at = app("views/features.py")
    table = at.dataframe[0].value.set_index("feature_id")
    assert table.loc[TEA, "exclusivity"] == 4.5
    assert table.loc[TEA, "exclusivity_note"] == "[3.9–5.0] offline proxy"
    from dashboard.views.common import report_csv, report_markdown

    with Database(db_path, read_only=True) as db:
        rows = db.feature_table(RUN, feature_ids=[TEA])
    report = report_markdown(RUN, rows, {})
    assert "- **Exclusivity score:** 4.5 [3.9–5.0] (offline proxy) / 5 (mean, 95% interval)" in (
        report
    )
    assert "exclusivity_low" in report_csv(rows).splitlines()[0]
