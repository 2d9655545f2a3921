"""modeldiff dashboard: browse, read and triage the features of analysed crosscoder runs.

Run with `modeldiff dashboard --db results.duckdb`, or
`streamlit run dashboard/app.py -- --db results.duckdb` (or set MODELDIFF_DB).
The chosen run and feature are in the URL (`?run=..&feature=..`), so a link restores a view.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repository root.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from dashboard import data, serving  # noqa: E402
from dashboard.markdown import md_code  # noqa: E402

st.set_page_config(layout="wide", page_title="modeldiff", page_icon="🔬")
_EXPOSED = serving.exposure(st.get_option("server.address"), os.environ.get(serving.ALLOWED_HOST))
if _EXPOSED:  # e.g. `streamlit run` outside the repository root, without its config.toml
    st.error(_EXPOSED)
    st.stop()
# An analyst's tool, not an app under development: no "Deploy" button or developer menu.
st.set_option("client.toolbarMode", "viewer")

VIEWS = Path(__file__).parent / "views"
# Material icons ship with Streamlit, so they render without an emoji font.
PAGES = {
    "runs": st.Page(
        str(VIEWS / "runs.py"), title="Runs", icon=":material/dashboard:", default=True
    ),
    "features": st.Page(str(VIEWS / "features.py"), title="Features", icon=":material/search:"),
    "feature": st.Page(str(VIEWS / "feature.py"), title="Feature", icon=":material/scatter_plot:"),
    "search": st.Page(
        str(VIEWS / "search.py"), title="Search by text", icon=":material/text_fields:"
    ),
    "triage": st.Page(str(VIEWS / "triage.py"), title="Triage", icon=":material/fact_check:"),
    "compare": st.Page(
        str(VIEWS / "compare.py"), title="Compare runs", icon=":material/compare_arrows:"
    ),
}
page = st.navigation(list(PAGES.values()))
data.keep_widget_state()

db_path = data.require_db()
st.sidebar.caption(f"Database: {md_code(db_path)}")
data.select_run(db_path)

# A shared link to the landing page with `?feature=` opens that feature (first load only).
first = not st.session_state.get("_landed")
st.session_state["_landed"] = True
if first and page is PAGES["runs"] and data.param_int("feature") is not None:
    st.switch_page(PAGES["feature"], query_params=dict(st.query_params))

page.run()
