"""The feature page's logit effects and the "Search by text" page, on the dashboard's test
database (tests/dashboard/dashboard_fixture.py) with the logit effects of its run computed
through the tiny saved models, driven headless with `streamlit.testing.v1.AppTest`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from engine.analysis.logit_effects import run_logit_effects, visible_token
from engine.analysis.search import features_on_text
from engine.categories import CATEGORIES, LABELS
from engine.crosscoder.checkpoint import load_crosscoder
from engine.models.loading import load_model
from engine.results import Database
from engine.specs import PairSpec
from tests.dashboard.dashboard_fixture import BOMB, OTHER, RUN, TEA, build_results_db

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
TEXT = "Tea and coffee by the river, then a bomb of a storm."


@pytest.fixture(scope="module")
def search_db(tmp_path_factory):
    """The dashboard database with RUN's logit effects stored, and the loaded run:
    (path, crosscoder, normalizer, models)."""
    path = build_results_db(tmp_path_factory.mktemp("search"))
    with Database(path) as db:
        run = db.run(RUN)
        cc, normalizer, _ = load_crosscoder(run["checkpoint_path"])
        pair = PairSpec.from_run(run)
        loaded = {k: load_model(str(pair[k].name)) for k in ("a", "b")}
        effects = run_logit_effects(cc, normalizer, pair, loaded=loaded)
        assert effects.skipped is None
        with db.transaction():
            db.write_logit_effects(RUN, effects.frame)
            for side, tokens in effects.vocab.items():
                db.write_vocab(RUN, side, tokens)
    old = os.environ.get("MODELDIFF_DB")
    os.environ["MODELDIFF_DB"] = str(path)
    yield path, run, cc, normalizer, loaded
    from dashboard import data

    data.close_all()
    if old is None:
        os.environ.pop("MODELDIFF_DB", None)
    else:
        os.environ["MODELDIFF_DB"] = old


def app(page: str, **params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90)
    for key, value in {"run": RUN, **params}.items():
        at.query_params[key] = value
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def logit_tables(at: AppTest) -> list:
    """The logit-effect tables in page order (A promoted, A suppressed, B ...)."""
    return [d.value for d in at.dataframe if list(d.value.columns) == ["token", "effect"]]


def search_tables(at: AppTest) -> list:
    """The search page's feature tables, one per category, in page order."""
    return [d.value for d in at.dataframe if "activation" in d.value.columns]


# -- logit effects on the feature page ---------------------------------------------------


def test_feature_page_shows_both_models_logit_effects(search_db):
    path = search_db[0]
    at = app("views/feature.py", feature=str(TEA))
    assert "Logit effects" in [s.value for s in at.subheader]
    with Database(path, read_only=True) as db:
        stored = db.logit_effects(RUN, TEA).set_index("model")
    tables = iter(logit_tables(at))
    assert len(logit_tables(at)) == 4
    for side in "ab":
        for kind in ("promoted", "suppressed"):
            shown = next(tables)
            row = stored.loc[side]
            assert list(shown["token"]) == [visible_token(t) for t in row[f"{kind}_tokens"]]
            assert list(shown["effect"]) == pytest.approx(list(row[f"{kind}_values"]))
    assert len(at.get("plotly_chart")) >= 3  # activations, then one histogram per model
    text = " ".join(m.value for m in at.markdown)
    # TEA is A-exclusive: model A reads its own decoder, model B its transfer, labelled so.
    assert "its own decoder" in text and "transferred vector" in text
    assert any("A-exclusive feature has no model B decoder" in c.value for c in at.caption)


def test_shared_feature_reads_its_own_decoder_in_both_models(search_db):
    at = app("views/feature.py", feature=str(BOMB))
    text = " ".join(m.value for m in at.markdown)
    assert text.count("its own decoder") == 2 and "transferred vector" not in text


def test_a_run_without_logit_effects_says_how_to_get_them(search_db):
    at = app("views/feature.py", run=OTHER, feature=str(TEA))
    assert any("Not computed for this run" in c.value for c in at.caption)
    assert not logit_tables(at)


# -- search by text ------------------------------------------------------------------------


def search(text: str = TEXT) -> AppTest:
    at = app("views/search.py")
    at.text_area(key="q_text").input(text)
    next(b for b in at.button if b.label == "Find features").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    return at


def shown_features(at: AppTest) -> list[list[int]]:
    """The feature ids each category's table lists, in page order."""
    return [list(t["feature"]) for t in search_tables(at)]


def by_category(table) -> list[list[int]]:
    """An engine feature table's ids per category, in the page's order of categories."""
    return [list(table[table["category"] == c]["feature_id"]) for c in CATEGORIES
            if (table["category"] == c).any()]  # fmt: skip


def test_search_lists_the_features_that_fire_grouped_by_category(search_db):
    _, run, cc, normalizer, loaded = search_db
    expected = features_on_text(
        run, TEXT, models=(loaded["a"], loaded["b"]), crosscoder=cc, normalizer=normalizer
    ).features()
    at = search()
    assert shown_features(at) == by_category(expected) and len(by_category(expected)) >= 2
    assert f"{len(expected):,} features active on the text" in " ".join(
        m.value for m in at.markdown
    )
    # Headings name each category; rows carry explanation and a link to the feature page.
    headings = " ".join(str(h.proto.body) for h in at.html)
    assert all(LABELS[c] in headings for c in set(expected["category"]))
    tea = next(t for t in search_tables(at) if TEA in list(t["feature"]))
    row = tea[tea["feature"] == TEA].iloc[0]
    assert row["link"] == f"feature?run={RUN}&feature={TEA}"
    with Database(search_db[0], read_only=True) as db:
        assert row["explanation"] == db.explanations(RUN, TEA)["explanation"].iloc[0]
    assert row["activation"] == pytest.approx(
        float(expected.set_index("feature_id").loc[TEA, "activation"])
    )


def test_clicking_a_token_keeps_the_features_active_there(search_db):
    _, run, cc, normalizer, loaded = search_db
    found = features_on_text(
        run, TEXT, models=(loaded["a"], loaded["b"]), crosscoder=cc, normalizer=normalizer
    )
    token = next(i for i, t in enumerate(found.tokens()) if t.strip() == "river")
    at = search()
    pills = at.get("button_group")[0]
    pills.set_value(token).run()
    assert not at.exception
    assert shown_features(at) == by_category(found.features(token))
    assert f"active on token {token} (␣river)" in " ".join(m.value for m in at.markdown)
    assert "peak at" not in search_tables(at)[0].columns
    pills.set_value(None).run()  # click again: every feature of the text
    assert shown_features(at) == by_category(found.features())


def test_search_explains_how_to_enable_it_without_models(search_db):
    at = app("views/search.py", run=OTHER)
    assert any("Live generation is off" in i.value for i in at.info)
    assert not at.text_area


# -- in a real browser ---------------------------------------------------------------------

# Beside the browser test's screenshots (git-ignored); copy them to docs/images/ by hand
# when the pages change, so a test run leaves the checkout clean.
IMAGES = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


@pytest.mark.slow
def test_browser_screenshots_of_logit_effects_and_search(search_db, tmp_path):
    """The served dashboard in headless Chromium: the feature page's logit effects and a
    search, clicked down to one token; screenshots to test-output/screenshots/."""
    import subprocess

    sync_api = pytest.importorskip("playwright.sync_api")
    from engine.cli import dashboard_command
    from tests.dashboard.test_browser import CHROMIUM, _wait_healthy, free_port

    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    port = free_port()
    command = dashboard_command(search_db[0], "127.0.0.1", port)
    at = command.index("--")
    command[at:at] = ["--server.headless", "true"]
    log_path = tmp_path / "server.log"
    root = Path(__file__).resolve().parents[2]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, server, log_path)
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True
                )
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(180_000)  # the first search loads the models
                try:
                    shots = _browse(page, url, sync_api)
                finally:
                    browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert all(s.stat().st_size > 20_000 for s in shots)


def _full_height(page) -> None:
    """Grow the viewport to the main block's height (Streamlit scrolls that block)."""
    page.set_viewport_size({"width": 1400, "height": 900})
    page.wait_for_timeout(300)
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": max(900, min(height + 40, 8000))})
    page.wait_for_timeout(1000)  # charts and grids redraw at the new size


def _browse(page, url: str, sync_api) -> list[Path]:
    """Open the tea feature's logit effects, then search a text and click a token."""
    from tests.dashboard.test_browser import _settled

    IMAGES.mkdir(parents=True, exist_ok=True)
    shots = [IMAGES / n for n in ("logit-effects.png", "search-by-text.png", "search-token.png")]
    page.goto(f"{url}/feature?run={RUN}&feature={TEA}")
    page.get_by_role("heading", name="Logit effects").wait_for()
    page.get_by_text("transferred vector").wait_for()
    _settled(page)
    _full_height(page)
    page.get_by_test_id("stPlotlyChart").nth(2).wait_for()  # activations, A and B effects
    top = page.get_by_role("heading", name="Logit effects").bounding_box()
    end = page.get_by_role("heading", name="Contexts").bounding_box()
    page.screenshot(
        path=str(shots[0]),
        clip={"x": 0, "y": top["y"] - 16, "width": 1400, "height": end["y"] - top["y"]},
    )
    assert page.get_by_test_id("stException").count() == 0

    page.get_by_role("link", name="Search by text", exact=True).click()
    page.get_by_label("Text", exact=True).fill(TEXT)
    page.get_by_role("button", name="Find features").click()
    page.get_by_text("features active on the text").wait_for()
    _settled(page)
    _full_height(page)
    page.screenshot(path=str(shots[1]))
    page.get_by_test_id("stButtonGroup").get_by_text("␣river", exact=True).click()
    page.get_by_text(re.compile(r"features active on token \d+ \(␣river\)")).wait_for()
    _settled(page)
    _full_height(page)
    page.screenshot(path=str(shots[2]))
    assert page.get_by_test_id("stException").count() == 0
    return shots
