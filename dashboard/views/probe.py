"""The feature page's "Try your own text": the feature's activation on each token of any
text, through both models, highlighted like the stored contexts.

The engine computes it (`engine.analysis.probe.feature_activations_on_text`); the models
load on the first request (dashboard.models). A fragment behind a form, like steering.
"""

from __future__ import annotations

import streamlit as st

from dashboard import models
from dashboard.views.common import TOKEN_VIEWS, context_html, fmt, tokens_html
from engine.analysis.probe import feature_activations_on_text
from engine.errors import UserError
from engine.steering.run import steering_problem

PLACEHOLDER = "Type or paste any text to see where this feature fires in it."


def probe_panel(run_id: str, feature_id: int, run: dict, max_act: float) -> None:
    """The "Try your own text" section of a feature page."""
    st.subheader("Try your own text")
    if steering_problem(run):
        # The steering section below says why and how to enable both (one message).
        st.caption("Needs the run's models and crosscoder, which are not available here.")
        return
    st.session_state.setdefault("p_text", "")
    st.session_state.setdefault("p_view", next(iter(TOKEN_VIEWS)))
    _panel(run_id, feature_id, run, max_act)


@st.fragment
def _panel(run_id: str, feature_id: int, run: dict, max_act: float) -> None:
    """The form, and the highlighted text of the last probe of this feature."""
    with st.form("probe_form"):
        text = st.text_area("Text", key="p_text", placeholder=PLACEHOLDER, height=90)
        go = st.form_submit_button("Show activations", type="primary")
    key = (run_id, feature_id)
    if go:
        try:
            probe = models.run_on_text(run, feature_activations_on_text, feature_id, text)
        except models.Unavailable as err:
            st.info(str(err))
            return
        except (UserError, ValueError, RuntimeError) as err:
            st.warning(f"Cannot compute activations: {err}")
            return
        st.session_state["p_result"] = {"key": key, "probe": probe}
    result = st.session_state.get("p_result")
    if result is None or result["key"] != key:
        return
    probe = result["probe"]
    view = st.radio("Show", list(TOKEN_VIEWS), horizontal=True, key="p_view")
    model = TOKEN_VIEWS[view]
    # Colours share the scale of the stored contexts, so the two can be compared.
    scale = max_act if max_act > 0 else probe.max_act
    if model is None:
        st.html(context_html(probe.context, scale, whole=True))
    else:
        st.html(tokens_html(probe.context, probe.window, model, scale, whole=True))
    acts = probe.context.acts
    st.caption(
        f"Active on {int((acts > 0).sum())} of {len(acts)} aligned tokens; max activation "
        f"{fmt(probe.max_act)} (the feature's max on the analysed text: {fmt(max_act)}, "
        "which sets the colour scale)."
    )
