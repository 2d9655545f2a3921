"""Triage: screen and verify features one by one (status, notes, reviewer, history), and
export the verified ones as an audit report. The queues hold the exclusive candidates:
exclusive features and shared features whose decoder norm leans to one model."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.markdown import md
from dashboard.views.common import (
    badge,
    contexts_html,
    esc,
    exclusivity_note,
    fmt,
    norm_lean,
    report_csv,
    report_markdown,
    triage_note_html,
    yes_no,
)
from engine.results import ResultsDBError

QUEUES = {
    "flagged": "Exclusive or leaning, flagged harmful, unreviewed",
    "exclusive": "All live exclusive and leaning shared features",
    "all": "All live features",
    "reviewed": "Already reviewed",
}

path, run_id = data.session()
st.title("Triage")

# The reviewer's name is remembered for the session (see `data.keep_widget_state`).
st.session_state.setdefault("reviewer", "")


def build_queue(table: pd.DataFrame, mode: str) -> tuple[list[int], str]:
    """Feature ids to review in this mode, most exclusive first (by relative decoder norm:
    exclusive, then leaning shared features), and the mode used."""
    live = table[~table["dead"].fillna(False).astype(bool)]
    exclusive = live[live["category"].isin(data.CANDIDATES)]
    harmful = exclusive["harmful"].fillna(False).astype(bool)
    unreviewed = exclusive["status"] == "unreviewed"
    picks = {
        "flagged": exclusive[harmful & unreviewed],
        "exclusive": exclusive,
        "all": live,
        "reviewed": table[table["status"] != "unreviewed"],
    }
    chosen = picks[mode]
    if mode == "flagged" and chosen.empty:
        # Nothing flagged is left: fall back to every exclusive feature.
        mode, chosen = "exclusive", exclusive
        if chosen.empty:
            chosen = table[table["category"].isin(data.CANDIDATES)]
    order = chosen.assign(_excl=chosen["rel_norm"].map(norm_lean)).sort_values(
        ["_excl", "max_act", "feature_id"], ascending=[False, False, True]
    )
    return [int(f) for f in order["feature_id"]], mode


def _queue_changed() -> None:
    st.session_state.pop("t_queue", None)


table = data.feature_table(path, run_id)
mode = st.radio(
    "Queue",
    list(QUEUES),
    format_func=QUEUES.get,
    horizontal=True,
    key="t_mode",
    on_change=_queue_changed,
)
# The queue is a snapshot: saving a decision does not reshuffle it under the reviewer.
refresh = st.button("Refresh queue", help="Rebuild the queue from the current statuses")
snapshot = st.session_state.get("t_queue")
if refresh or snapshot is None or snapshot.get("run") != run_id:
    ids, used = build_queue(table, mode)
    snapshot = {"run": run_id, "ids": ids, "mode": used, "pos": 0}
    st.session_state["t_queue"] = snapshot
ids = snapshot["ids"]
if snapshot["mode"] != mode:
    shown = QUEUES[snapshot["mode"]].lower()
    st.info(f"No unreviewed flagged exclusive or leaning features: showing {shown}.")
if not ids:
    st.warning("The queue is empty.")
else:
    pos = min(snapshot["pos"], len(ids) - 1)
    nav = st.columns([1, 1, 4])
    if nav[0].button("← Previous", disabled=pos == 0):
        pos -= 1
    if nav[1].button("Next →", disabled=pos >= len(ids) - 1):
        pos += 1
    snapshot["pos"] = pos
    fid = ids[pos]
    nav[2].markdown(f"Feature **{pos + 1}** of **{len(ids)}** in the queue.")

    row = table[table["feature_id"] == fid].iloc[0].to_dict()
    stats = data.feature(path, run_id, fid)
    st.html(
        f"<h3>Feature {fid} &nbsp;{badge(row['category'])}</h3>"
        f'<div style="font-size:1.1rem">{esc(row.get("explanation")) or "<em>no explanation</em>"}'
        "</div>"
        f'<div style="color:#555">harmful: <b>{esc(yes_no(row.get("harmful")))}</b>'
        + (f" — {esc(row.get('harmful_reason'))}" if esc(row.get("harmful_reason")) else "")
        + " · detection score "
        f"<b>{esc(fmt(row.get('score'), '.2f'))}</b> · exclusivity "
        f"<b>{esc(fmt(row.get('exclusivity'), '.1f'))}</b>"
        + (f" {esc(exclusivity_note(row))}" if exclusivity_note(row) else "")
        + " · relative norm "
        f"{esc(fmt(row.get('rel_norm'), '.3f'))}</div>"
    )
    top = [c for c in data.contexts(path, run_id, fid) if c.kind == "top"][:3]
    st.html(contexts_html(top, float(stats.get("max_act") or 0.0)))
    st.page_link(
        "views/feature.py",
        label="Open the full feature page",
        query_params={"run": run_id, "feature": str(fid)},
    )

    current = row.get("status") or "unreviewed"
    notes = row.get("notes")
    with st.form(f"t_form_{fid}"):
        status = st.radio(
            "Status",
            list(data.STATUSES),
            index=list(data.STATUSES).index(current) if current in data.STATUSES else 0,
            horizontal=True,
        )
        note = st.text_area("Notes", value="" if notes is None or pd.isna(notes) else notes)
        reviewer = st.text_input("Reviewer", key="reviewer")
        saved = st.form_submit_button("Save", type="primary")
    if saved:
        try:
            data.save_triage(path, run_id, fid, status, note, reviewer)
        except ResultsDBError as err:  # the file stayed locked by another process
            st.error(f"Not saved: {md(err)}")
        else:
            st.success(f"Saved feature {fid} as {status!r}.")
            row = data.feature_row(path, run_id, fid) or row

    st.html(
        triage_note_html(
            row.get("status"), row.get("notes"), row.get("reviewer"), row.get("updated_at")
        )
    )
    history = data.triage_history(path, run_id, fid)
    st.markdown(f"**History** ({len(history)} change{'' if len(history) == 1 else 's'})")
    if not history.empty:
        st.dataframe(
            history[["changed_at", "status", "reviewer", "notes"]],
            hide_index=True,
            width="stretch",
            column_config={
                "changed_at": st.column_config.DatetimeColumn("changed", format="YYYY-MM-DD HH:mm")
            },
        )

# -- export ------------------------------------------------------------------------------

st.divider()
st.subheader("Export")
wanted = st.multiselect("Statuses to export", list(data.STATUSES), default=["verified"])
chosen = data.feature_table(path, run_id, status=wanted or None, order_by="feature_id")
if chosen.empty:
    st.caption("No feature has these statuses yet.")
else:
    found = data.contexts_of(path, run_id, tuple(int(f) for f in chosen["feature_id"]), "top")
    report = report_markdown(run_id, chosen, found)
    cols = st.columns(2)
    cols[0].download_button(
        f"Export {len(chosen)} as Markdown report",
        report,
        file_name=f"modeldiff-{run_id}-audit.md",
        mime="text/markdown",
    )
    cols[1].download_button(
        "Export as CSV",
        report_csv(chosen),
        file_name=f"modeldiff-{run_id}-audit.csv",
        mime="text/csv",
    )
    with st.expander("Preview the report"):
        st.code(report, language="markdown")
