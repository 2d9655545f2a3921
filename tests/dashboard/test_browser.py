"""End to end in a real browser: the dashboard served by `modeldiff dashboard`'s command line,
driven with Playwright and the system's headless Chromium. Browse the features, open one,
read its stored exclusivity score, probe it with typed text, steer both models and save the
sample, triage the feature; then check the database. Screenshots of each step go to the
test's directory and to test-output/screenshots/ (git-ignored)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from engine.cli import dashboard_command
from engine.results import Database
from tests.dashboard.dashboard_fixture import MARKUP, OTHER, RUN, TEA, build_results_db

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "screenshots"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright: pip install playwright"
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)",
    ),
]
TRANSFER_NOTE = "Model B has no decoder for this A-exclusive feature"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The dashboard on the fixture database: (url, database path, stop())."""
    tmp = tmp_path_factory.mktemp("browser")
    db = build_results_db(tmp)
    port = free_port()
    command = dashboard_command(db, "127.0.0.1", port)
    at = command.index("--")
    command[at:at] = ["--server.headless", "true"]
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()

    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, tmp / "server.log")
        yield url, db, stop
    finally:
        stop()


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until Streamlit answers its health check (fail with the log if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the dashboard exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the dashboard did not start within {timeout:.0f} s:\n{log.read_text()}")


class Shots:
    """Full-page screenshots of the app, numbered in order, kept in `directory`."""

    def __init__(self, page, directory: Path) -> None:
        self.page, self.directory, self.paths = page, directory, []

    def take(self, name: str) -> None:
        # Streamlit scrolls its main block, not the page: grow the viewport to its height
        # (measured at the default size, as the block is never shorter than the viewport).
        self.page.set_viewport_size({"width": 1400, "height": 900})
        self.page.wait_for_timeout(300)
        height = self.page.evaluate(
            "() => document.querySelector('[data-testid=stMain]').scrollHeight"
        )
        self.page.set_viewport_size({"width": 1400, "height": max(900, min(height + 40, 8000))})
        self.page.wait_for_timeout(800)  # let charts and grids redraw at the new size
        path = self.directory / f"{len(self.paths) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        self.paths.append(path)
        assert self.page.get_by_test_id("stException").count() == 0, name

    def publish(self) -> None:
        """Copy the screenshots to test-output/screenshots/ at the repository root."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob("*.png"):
            old.unlink()
        for path in self.paths:
            shutil.copy2(path, SHOTS / path.name)


def test_browse_open_probe_steer_save_and_triage(served, tmp_path):
    url, db, stop = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        shots = Shots(page, tmp_path)
        try:
            _walk(page, url, shots)
        except Exception as err:
            # Say what the app showed: a timeout alone does not tell a lost click from an error.
            alerts = page.get_by_test_id("stAlert").all_inner_texts()
            errors = page.get_by_test_id("stException").all_inner_texts()
            raise AssertionError(f"{err}\napp alerts: {alerts}\napp exceptions: {errors}") from err
        finally:
            shots.publish()
            browser.close()
    assert len(shots.paths) == 10 and all(p.stat().st_size > 10_000 for p in shots.paths)

    stop()  # the server holds the database open for writing
    with Database(db, read_only=True) as done:
        history = done.triage_history(RUN, TEA)
        samples = done.steering_samples(RUN, TEA)
    assert list(history["status"]) == ["verified"]
    assert list(history["notes"]) == ["checked in the browser"]
    assert list(history["reviewer"]) == ["bob"]
    assert sorted(samples["model"]) == ["a", "b"]
    assert set(samples["prompt"]) == {"I would like a cup of"}
    assert samples.set_index("model").loc["b", "transfer"]["from"] == "a"


# Streamlit marks the elements of the previous run stale while a script reruns, and shows a
# running icon in its status widget.
_RUNNING = (
    "[data-stale=true], [data-testid=stStatusWidgetRunningIcon], "
    "[data-testid=stStatusWidgetRunningManIcon]"
)


def _settled(page, quiet_ms: int = 500) -> None:
    """Wait until the app's script run has ended and stayed ended for `quiet_ms`."""
    page.wait_for_function(
        """([selector, quiet]) => {
            const now = performance.now();
            if (document.querySelector(selector)) { window.__busy = now; return false; }
            return now - (window.__busy ?? 0) > quiet;
        }""",
        arg=[_RUNNING, quiet_ms],
        polling=100,
    )


def _walk(page, url: str, shots: Shots) -> None:
    """The user's path through the app, one screenshot per step."""
    page.goto(f"{url}/?run={RUN}")
    page.get_by_text("By partition", exact=True).wait_for()
    shots.take("runs")

    # The features browser: select the (only) exclusive live feature's row.
    page.get_by_role("link", name="Features", exact=True).click()
    page.get_by_text(re.compile(r"features? match")).wait_for()
    shots.take("features")
    grid = page.get_by_test_id("stDataFrame").first.bounding_box()
    # The grid is a canvas: click the row marker of the first row (below the 35 px header).
    page.mouse.click(grid["x"] + 18, grid["y"] + 35 + 17)
    page.wait_for_url(re.compile(rf"/feature\?.*feature={TEA}"))
    page.get_by_role("heading", name="Try your own text").wait_for()
    page.get_by_test_id("stHtml").filter(has_text=f"Feature {TEA}").first.wait_for()
    shots.take("feature")

    # The stored exclusivity score: open every prompt's steered texts and the judge's reasons.
    page.get_by_text("Exclusivity 5.0", exact=True).wait_for()
    page.get_by_text("Steered texts and the judge's reasons").click()
    page.get_by_text("A cup of tea sounds lovely.").first.wait_for()
    page.get_by_text(MARKUP).first.wait_for()  # shown as text, not as markup
    shots.take("exclusivity")

    # Try your own text.
    page.get_by_label("Text", exact=True).fill("I drink tea & coffee <b>every</b> day.")
    page.get_by_role("button", name="Show activations").click()
    page.get_by_text(re.compile(r"Active on \d+ of \d+ aligned tokens")).wait_for()

    # Steer both models (B through the transfer), then save the pair of samples.
    page.get_by_label("Prompt", exact=True).fill("I would like a cup of")
    page.get_by_label("Max new tokens").fill("8")
    page.get_by_label("Max new tokens").press("Tab")
    page.get_by_test_id("stRadio").filter(has_text="Steer model").get_by_text("both").click()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('.steer-text').length == 4")
    page.get_by_text(TRANSFER_NOTE).wait_for()
    shots.take("steering")
    page.get_by_role("button", name="Save 2 samples").click()
    page.get_by_text("Saved as steering sample").wait_for()

    page.get_by_role("button", name="Strength sweep", exact=True).click()
    page.locator(".steer-sweep").wait_for()
    shots.take("sweep")

    # Triage the feature, then see the decision on its page. The flagged queue opens on the
    # harmful A-leaning shared bomb feature; the queue of every candidate starts with tea.
    page.get_by_role("link", name="Triage", exact=True).click()
    page.get_by_text("in the queue").wait_for()
    page.get_by_text("A-leaning shared", exact=True).wait_for()
    queue = page.get_by_test_id("stRadio").filter(has_text="Queue")
    queue.get_by_text("All live exclusive and leaning shared features").click()
    page.get_by_test_id("stHtml").filter(has_text=f"Feature {TEA}").first.wait_for()
    # Until the rerun ends, the bomb feature's form can still stand (stale) where the tea
    # feature's will be drawn: a click on it would be lost.
    _settled(page)
    status = page.get_by_test_id("stRadio").filter(has_text="Status")
    sync_api.expect(status).to_have_count(1)  # the bomb feature's form is gone
    status.get_by_role("radiogroup").get_by_text("verified", exact=True).click()
    sync_api.expect(status.get_by_role("radio", name="verified")).to_be_checked()
    page.get_by_label("Notes").fill("checked in the browser")
    page.get_by_label("Reviewer").fill("bob")
    sync_api.expect(page.get_by_label("Reviewer")).to_have_value("bob")
    page.get_by_role("button", name="Save", exact=True).click()
    page.get_by_text(f"Saved feature {TEA} as 'verified'").wait_for()
    shots.take("triage")
    page.goto(f"{url}/feature?run={RUN}&feature={TEA}")
    page.get_by_text("verified by bob").wait_for()
    shots.take("feature-after-triage")

    # Another run's models are not recorded: one message says how to enable live generation.
    page.get_by_role("link", name="Compare runs", exact=True).click()
    page.get_by_text("Exclusive features and their best match").wait_for()
    shots.take("compare")
    page.goto(f"{url}/feature?run={OTHER}&feature={TEA}")
    page.get_by_text("Live generation is off for this run").wait_for()
    shots.take("feature-without-models")
