"""The dashboard's access to the results database: short-lived connections, cached reads.

Every read goes through a `Database` method (the dashboard writes no SQL). The `Database`
holds no connection between calls: each query opens the file read-only and closes it, and
each write opens it for writing only while it writes, so `modeldiff explain`, `score` and
the other commands can write while the dashboard is open. Query results are cached per
(database, state of the file, arguments) with `st.cache_data`, so rows another process
writes show on the next rerun; a triage write also clears the caches that show triage.
The chosen run and feature live in `st.query_params` (so a URL restores the view) and in
session state (Streamlit clears query parameters on page changes).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from dashboard.markdown import md, md_code
from engine import categories
from engine.contexts import Context
from engine.results import Database, ResultsDBError
from engine.results.schema import TRIAGE_STATUSES

ENV_DB = "MODELDIFF_DB"
# Partitions and categories (a partition, or a shared feature leaning to one model) share
# one set of labels: the dashboard shows a feature's category as its "partition".
CATEGORY_LABELS = categories.LABELS
LABEL_CATEGORIES = {label: key for key, label in CATEGORY_LABELS.items()}
CATEGORY_ORDER = categories.CATEGORIES
CATEGORY_HELP = categories.DESCRIPTION
EXCLUSIVE = categories.EXCLUSIVE
CANDIDATES = categories.CANDIDATES  # exclusive partitions and leaning shared features
INTERPRETABLE = 0.8  # detection score at which a feature counts as interpretable
PAGE_SIZE = 50  # rows per page of the features browser
RECUR = categories.MATCH_COSINE  # decoder cosine at which a feature recurs in another run
STATUSES = TRIAGE_STATUSES
_WRITE_LOCK = threading.Lock()  # one triage write at a time across sessions
_OPENED: list[Database] = []  # every Database the resource cache made (see close_all)
# Seconds a query or write waits for a `modeldiff` command that is writing to the file.
LOCK_WAIT_S = 20.0
T = TypeVar("T")

CREATE_HELP = """\
modeldiff harvest --out stores/demo --model-a smollm2 --model-b gemma3 --sources demo:chitchat
modeldiff train   --config configs/demo.toml --store stores/demo --out runs/demo
modeldiff analyze --run runs/demo --store stores/demo --db results.duckdb
modeldiff explain --db results.duckdb --run-id demo
modeldiff score   --db results.duckdb --run-id demo
modeldiff dashboard --db results.duckdb"""


def label(category: Any) -> str:
    """The display label of a partition or category ("A-exclusive", "A-leaning shared")."""
    return CATEGORY_LABELS.get(str(category), str(category))


# -- the database ------------------------------------------------------------------------


def db_path_from_args(argv: list[str] | None = None) -> str | None:
    """The database path from `--db PATH` after `streamlit run app.py --`, else $MODELDIFF_DB."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--db" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--db="):
            return arg.split("=", 1)[1]
    return os.environ.get(ENV_DB) or None


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Database:
    """The shared `Database` of the file: it holds no connection (nor the file's lock)
    between calls, and may write (triage, steering samples)."""
    db = Database(path, read_only=False, create=False, hold=False, wait=LOCK_WAIT_S)
    _OPENED.append(db)  # never an empty file for a typo (create=False)
    return db


def close_all() -> None:
    """Close the cached connections and forget every cached read (tests, shutdown)."""
    st.cache_resource.clear()
    st.cache_data.clear()
    while _OPENED:
        _OPENED.pop().close()


def database(path: str) -> Database:
    """The shared `Database` of the file at `path`."""
    return _open(str(Path(path).resolve()))


def require_db() -> str:
    """The resolved database path of this session; stops the page with set-up help if the file
    is missing, unreadable or holds no run."""
    path = st.session_state.get("db_path") or db_path_from_args()
    if not path:
        _stop("No results database given.")
    file = Path(path).expanduser()
    if not file.is_file():
        _stop(f"No results database at {md_code(file)}.")
    resolved = str(file.resolve())
    try:
        ids = run_ids(resolved)
    except ResultsDBError as err:
        _stop(f"Cannot open {md_code(file)}: {md(err)}")
    if not ids:
        _stop(f"{md_code(file)} holds no analysed run yet.")
    st.session_state["db_path"] = resolved
    return resolved


def _stop(problem: str) -> None:
    """Show what is wrong and how to create a database, then stop the script run."""
    st.error(problem)
    st.markdown(
        "Start the dashboard with `modeldiff dashboard --db PATH` (or set `MODELDIFF_DB`). "
        "A results database is created by the pipeline:"
    )
    st.code(CREATE_HELP, language="bash")
    st.stop()


# -- cached reads (keyed by the database path and the state of its file) ----------------


def file_state(path: str) -> tuple[int, ...]:
    """Modification time and size of the file and its write-ahead log: they change with
    every commit, by this process or another."""
    state: list[int] = []
    for name in (path, f"{path}.wal"):
        try:
            stat = os.stat(name)
            state += [stat.st_mtime_ns, stat.st_size]
        except OSError:
            state += [0, 0]
    return tuple(state)


def cached(fn: Callable[..., T]) -> Callable[..., T]:
    """`st.cache_data` for a read of the database at its first argument, keyed also on the
    file's state, so that a rerun after another process wrote reads the new rows."""

    def stamped(path: str, state: tuple[int, ...], *args: Any, **kwargs: Any) -> T:
        return fn(path, *args, **kwargs)

    # Streamlit keys a cache on the function's module and qualified name (and source).
    stamped.__module__, stamped.__qualname__ = fn.__module__, f"{fn.__qualname__}.stamped"
    reader = st.cache_data(show_spinner=False)(stamped)

    def read(path: str, *args: Any, **kwargs: Any) -> T:
        return reader(path, file_state(path), *args, **kwargs)

    read.__name__, read.__qualname__, read.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    read.clear = reader.clear  # type: ignore[attr-defined]
    return read


@cached
def run_ids(path: str) -> list[str]:
    """Ids of the runs in the database, oldest first."""
    return [str(r) for r in database(path).runs()["run_id"]]


@cached
def runs(path: str) -> pd.DataFrame:
    """All runs (JSON columns decoded)."""
    return database(path).runs()


@cached
def run(path: str, run_id: str) -> dict[str, Any]:
    """One run as a dict."""
    return database(path).run(run_id)


@cached
def features(path: str, run_id: str) -> pd.DataFrame:
    """Per-feature statistics of the run (with histograms)."""
    return database(path).features(run_id)


@cached
def feature_table(path: str, run_id: str, **filters: Any) -> pd.DataFrame:
    """`Database.feature_table` with the given filters (and page: limit, offset)."""
    return database(path).feature_table(run_id, **filters)


@cached
def feature_count(path: str, run_id: str, **filters: Any) -> int:
    """How many rows `feature_table` has with these filters (`Database.feature_count`)."""
    return database(path).feature_count(run_id, **filters)


@cached
def run_history(path: str, run_id: str) -> pd.DataFrame:
    """The run's training metrics per logged step (empty when none was recorded)."""
    return database(path).run_history(run_id)


@cached
def feature(path: str, run_id: str, feature_id: int) -> dict[str, Any]:
    """One feature's statistics."""
    return database(path).feature(run_id, feature_id)


def feature_row(path: str, run_id: str, feature_id: int) -> dict[str, Any] | None:
    """The feature-table row of one feature (explanation, scores, triage), or None."""
    rows = feature_table(path, run_id, feature_ids=(int(feature_id),))
    return None if rows.empty else rows.iloc[0].to_dict()


@cached
def default_feature(path: str, run_id: str) -> int | None:
    """The strongest live exclusive feature, else the strongest live leaning shared one,
    else the strongest live one, else any one."""
    db = database(path)
    strongest = {"order_by": "max_act", "descending": True, "limit": 1}
    for pick in (
        lambda: db.features(run_id, category=list(EXCLUSIVE), dead=False, **strongest),
        lambda: db.features(run_id, category=list(categories.LEANING), dead=False, **strongest),
        lambda: db.features(run_id, dead=False, **strongest),
        lambda: db.features(run_id, limit=1),
    ):
        found = pick()
        if len(found):
            return int(found["feature_id"].iloc[0])
    return None


@cached
def contexts(path: str, run_id: str, feature_id: int) -> list[Context]:
    """All contexts of a feature (top, quantile, random)."""
    return database(path).contexts(run_id, feature_id)


@cached
def contexts_of(path: str, run_id: str, feature_ids: tuple[int, ...], kind: str) -> dict:
    """Contexts of several features of one kind: {feature_id: [Context]}."""
    return database(path).contexts_of(run_id, list(feature_ids), kind)


@cached
def windows(path: str, run_id: str, window_ids: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Several windows with both models' token ids and offsets, in one query: {id: window}."""
    return database(path).windows(run_id, window_ids)


@cached
def neighbors(path: str, run_id: str, feature_id: int) -> pd.DataFrame:
    """A feature's nearest features in both decoder spaces."""
    return database(path).neighbors(run_id, feature_id)


@cached
def logit_effects(path: str, run_id: str, feature_id: int) -> pd.DataFrame:
    """A feature's logit effects, one row per model, with token texts (empty if the
    analysis stored none)."""
    return database(path).logit_effects(run_id, feature_id)


@cached
def has_logit_effects(path: str, run_id: str) -> bool:
    """Whether the run's analysis stored logit effects."""
    return database(path).has_logit_effects(run_id)


@cached
def explanations(path: str, run_id: str, feature_id: int) -> pd.DataFrame:
    """Every explanation of a feature (all explainers, all versions)."""
    return database(path).explanations(run_id, feature_id, latest=False)


@cached
def matches(path: str, run_id: str, other: str, feature_id: int | None = None) -> pd.DataFrame:
    """Feature matches from one run to another (of one feature, if given), best first."""
    return database(path).matches(run_id, other, feature_id=feature_id)


@cached
def scores(path: str, run_id: str, feature_id: int, metric: str) -> pd.DataFrame:
    """A feature's scores of one metric (e.g. exclusivity), oldest first, details decoded."""
    return database(path).scores(run_id, feature_id=feature_id, metric=metric)


@cached
def effects(path: str, run_id: str) -> pd.DataFrame:
    """The run's judge-free effect measurements (features and the null), oldest first."""
    return database(path).effects(run_id)


@cached
def evaluations(path: str, run_id: str, feature_id: int) -> pd.DataFrame:
    """A feature's stored evaluations (e.g. steer-eval:<rubric>), oldest first."""
    return database(path).evaluations(run_id, feature_id=feature_id)


@cached
def triage(path: str, run_id: str) -> pd.DataFrame:
    """Current triage rows of the run."""
    return database(path).triage(run_id)


@cached
def triage_history(path: str, run_id: str, feature_id: int | None = None) -> pd.DataFrame:
    """Triage changes of the run (or of one feature), oldest first."""
    return database(path).triage_history(run_id, feature_id)


def save_triage(
    path: str, run_id: str, feature_id: int, status: str, notes: str, reviewer: str
) -> None:
    """Record a triage decision and drop the cached reads that show triage."""
    with _WRITE_LOCK:
        database(path).set_triage(run_id, int(feature_id), status, notes, reviewer)
    for cached in (feature_table, feature_count, triage, triage_history):
        cached.clear()


@cached
def steering_samples(path: str, run_id: str, feature_id: int) -> pd.DataFrame:
    """Saved steering samples of one feature, oldest first."""
    return database(path).steering_samples(run_id, feature_id)


def save_steering_samples(
    path: str, run_id: str, feature_id: int, samples: list[dict[str, Any]]
) -> list[int]:
    """Record steering samples (`Database.add_steering_sample` keywords); return their ids."""
    with _WRITE_LOCK:
        db = database(path)
        ids = [db.add_steering_sample(run_id, int(feature_id), **s) for s in samples]
    steering_samples.clear()
    return ids


# Widget values that outlive a page change (Streamlit drops the state of widgets a run did not
# draw, unless the value is written back in every run: `keep_widget_state`).
KEPT_KEYS = (
    "f_partitions", "f_status", "f_min_score", "f_excl", "f_search", "f_harmful", "f_dead",
    "f_order", "f_desc", "f_page", "ctx_whole", "ctx_tokens", "t_mode", "reviewer", "s_prompt",
    "s_alpha", "s_target", "s_sample", "s_temperature", "s_seed", "s_max_new", "s_sweep",
    "p_text", "p_view",
)  # fmt: skip


def keep_widget_state() -> None:
    """Write the kept widget values back, so they survive visits to other pages."""
    for key in KEPT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


# -- the shared selection: run and feature -----------------------------------------------


def param_int(name: str) -> int | None:
    """An integer query parameter, or None when absent or malformed."""
    try:
        return int(st.query_params[name])
    except (KeyError, ValueError):
        return None


def _run_changed() -> None:
    st.query_params["run"] = st.session_state["run_choice"]
    st.session_state.pop("feature_id", None)
    st.query_params.pop("feature", None)


def select_run(path: str) -> str:
    """The sidebar run selector; the URL's `?run=` wins on arrival."""
    ids = run_ids(path)
    wanted = st.query_params.get("run")
    if wanted in ids and wanted != st.session_state.get("run_choice"):
        st.session_state["run_choice"] = wanted
    elif st.session_state.get("run_choice") not in ids:
        st.session_state["run_choice"] = ids[-1]
    chosen = st.sidebar.selectbox("Run", ids, key="run_choice", on_change=_run_changed)
    st.query_params["run"] = chosen
    return chosen


def current_feature(path: str, run_id: str) -> int | None:
    """The feature in view: `?feature=`, else the last one viewed, else the strongest live
    exclusive feature (or any live one)."""
    n = int(run(path, run_id)["n_features"] or 0)
    for candidate in (param_int("feature"), st.session_state.get("feature_id")):
        if candidate is not None and 0 <= candidate < n:
            return int(candidate)
    return default_feature(path, run_id)


def set_feature(feature_id: int) -> None:
    """Make `feature_id` the feature in view (URL and session)."""
    st.session_state["feature_id"] = int(feature_id)
    st.query_params["feature"] = str(int(feature_id))


def feature_link(run_id: str, feature_id: int) -> str:
    """A relative link that opens the feature page of a feature."""
    return "feature?" + urlencode({"run": run_id, "feature": int(feature_id)})


def session() -> tuple[str, str]:
    """(database path, chosen run id) of this session, for a view."""
    path = require_db()
    run_id = st.session_state.get("run_choice")
    if run_id not in run_ids(path):
        run_id = select_run(path)
    return path, run_id
