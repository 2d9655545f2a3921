"""Search by text: type a text and see every feature that fires on it, grouped by category
(A-exclusive, A-leaning shared, shared, ..., B-exclusive), with its activation, explanation
and a link to its page; click a token to keep only the features active there.

The engine computes it (`engine.analysis.search.features_on_text`, the feature page's probe
over all features); the models load on the first search (dashboard.models).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data, models
from dashboard.views.common import badge, fmt
from engine import categories
from engine.analysis.logit_effects import visible_token
from engine.analysis.search import TextSearch, features_on_text
from engine.errors import UserError
from engine.steering.run import steering_problem

PLACEHOLDER = "Type or paste any text to see which features fire on it."
SHOWN = 50  # rows per category before "show all"

path, run_id = data.session()
info = data.run(path, run_id)
st.title("Search by text")
st.caption(
    "Both models read the text; the crosscoder encodes each aligned token pair, as in "
    "analysis. Features are grouped by category, strongest first."
)
problem = steering_problem(info)
if problem:
    st.info(models.enable_help(problem))
    st.stop()

st.session_state.setdefault("q_text", "")
with st.form("q_form"):
    text = st.text_area("Text", key="q_text", placeholder=PLACEHOLDER, height=110)
    go = st.form_submit_button("Find features", type="primary")
if go:
    try:
        found = models.run_on_text(info, features_on_text, text)
    except models.Unavailable as err:
        st.info(str(err))
        st.stop()
    except (UserError, ValueError, RuntimeError) as err:
        st.warning(f"Cannot search: {err}")
        st.stop()
    st.session_state["q_result"] = {"run": run_id, "search": found}
    st.session_state.pop("q_token", None)  # a new text: no token chosen yet

result = st.session_state.get("q_result")
if result is None or result["run"] != run_id:
    st.stop()
search: TextSearch = result["search"]
if not search.n_tokens:
    st.info("The two models' tokens of this text share no boundary to align on.")
    st.stop()

tokens = search.tokens()
counts = search.active_per_token()
token = st.pills(
    "Tokens (click one to see only the features active there; click it again for all)",
    list(range(search.n_tokens)),
    format_func=lambda i: visible_token(tokens[i]),
    selection_mode="single",
    key="q_token",
)
table = search.features(token)
where = (
    f"on token {token} ({visible_token(tokens[token])})"
    if token is not None
    else f"on the text ({search.n_tokens} aligned tokens)"
)
st.markdown(f"**{len(table):,} features active {where}**")
if table.empty:
    st.stop()

described = data.feature_table(path, run_id, feature_ids=tuple(int(f) for f in table["feature_id"]))
explained = described.set_index("feature_id")["explanation"] if len(described) else pd.Series()
for category in categories.CATEGORIES:
    group = table[table["category"] == category]
    if group.empty:
        continue
    st.html(
        f"{badge(category)} &nbsp;<b>{len(group):,}</b> feature{'s' if len(group) != 1 else ''}"
    )
    everything = len(group) <= SHOWN or st.toggle(
        f"Show all {len(group):,}", key=f"q_all_{category}"
    )
    shown = group if everything else group.head(SHOWN)
    frame = pd.DataFrame(
        {
            "feature": shown["feature_id"].astype(int),
            "activation": shown["activation"].astype(float),
            "tokens": shown["n_tokens"].astype(int),
            "peak at": [visible_token(tokens[int(i)]) for i in shown["peak_token"]],
            "explanation": [
                "" if pd.isna(e) else str(e) for e in shown["feature_id"].map(explained).tolist()
            ],
            "link": [data.feature_link(run_id, int(f)) for f in shown["feature_id"]],
        }
    )
    if token is not None:
        frame = frame.drop(columns=["peak at"])
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        key=f"q_table_{category}",
        column_config={
            "feature": st.column_config.NumberColumn("feature", format="%d"),
            "activation": st.column_config.NumberColumn(
                "activation",
                format="%.3f",
                help="on the chosen token" if token is not None else "the largest on the text",
            ),
            "tokens": st.column_config.NumberColumn(
                "tokens", help="aligned tokens of the text it fires on"
            ),
            "explanation": st.column_config.TextColumn("explanation", width="large"),
            "link": st.column_config.LinkColumn("page", display_text="open"),
        },
    )
    if not everything:
        st.caption(f"The {SHOWN} strongest of {len(group):,}.")
st.caption(
    f"{int(counts.sum()):,} activations over {search.n_tokens} tokens; "
    f"most features on one token: {fmt(int(counts.max()))}. {categories.DESCRIPTION}"
)
