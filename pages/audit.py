"""Audit trail: who imported, ingested, trained, scored, deleted or exported what, and when.

Editors only (the trail names colleagues); the page checks the role itself,
not only the menu. Rows come from the store's ``audit`` table, newest first;
the command line writes the operating-system user, the dashboard the signed-in
e-mail (``local`` without sign-in). Refused attempts by viewers are recorded
too, with the outcome ``denied``.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from pages import _common
from pages._common import md

LIMIT = 5000

st.title("Audit trail")
if not _common.can_edit():
    st.error("The audit trail is for editors. " + _common.ask_whom())
    st.stop()

trail = _common.query(f"audit:{LIMIT}", lambda store: store_mod.audit_frame(store, limit=LIMIT))
if trail.empty:
    st.info("Nothing recorded yet: imports, ingests, training, scoring, deletions and "
            "report exports appear here once someone does them.")
    st.stop()


def _details(text: Any) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


details = [_details(d) for d in trail["details"]]
table = pd.DataFrame({
    "When (UTC)": pd.to_datetime(trail["happened_at"]),
    "Who": trail["who"],
    "Action": trail["action"],
    "Cohort": trail["cohort"].fillna(""),
    "Model": trail["model_id"].fillna(""),
    "Outcome": [d.pop("outcome", "done") for d in details],
    # "via" leads the details: one column fewer, so that the grid fits 1280 px.
    "Details": [", ".join(([f"via {d.pop('via')}"] if "via" in d else [])
                          + [f"{k}: {v}" for k, v in d.items()]) for d in details],
})

cols = st.columns(3)
actions = cols[0].multiselect("Action", sorted(table["Action"].unique()), key="audit_action")
people = cols[1].multiselect("Who", sorted(table["Who"].unique()), key="audit_who")
cohorts = cols[2].multiselect("Cohort", sorted(c for c in table["Cohort"].unique() if c),
                              key="audit_cohort")
shown = table
if actions:
    shown = shown[shown["Action"].isin(actions)]
if people:
    shown = shown[shown["Who"].isin(people)]
if cohorts:
    shown = shown[shown["Cohort"].isin(cohorts)]

when = st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss")
grid = st.dataframe(shown, hide_index=True, width="stretch", column_config={
    "When (UTC)": when,
    # Long details would push the grid sideways: cut here, and written out in full below
    # for the selected row (hover shows them too; the CSV has all).
    "Details": st.column_config.TextColumn(width="small"),
}, on_select="rerun", selection_mode="single-row", key="audit_grid")
picked = grid.selection.rows if grid is not None else []
if picked and picked[0] < len(shown):
    row = shown.iloc[picked[0]]
    st.markdown(
        f"**{md(row['Action'])}** by {md(row['Who'])}, "
        f"{row['When (UTC)']:%Y-%m-%d %H:%M:%S} UTC"
        + (f", cohort {md(row['Cohort'])}" if row["Cohort"] else "")
        + (f", model `{row['Model']}`" if row["Model"] else "")
        + f" — {md(row['Outcome'])}. Details: {md(row['Details']) or 'none'}")
else:
    st.caption("Select a row to read its details in full.")
st.caption(
    f"{len(shown)} of {len(table)} rows" + (f" (the latest {LIMIT})" if len(table) >= LIMIT else "")
    + ". Recorded: cohort imports and deletions, ingests, training, scoring, model deletions, "
    "reports written or downloaded, restores. Not recorded: figure and table downloads of the "
    "result pages. The whole trail: the store's `audit` table. Store: " + md(_common.db_path())
)
_common.downloads("audit_trail", table=shown)
