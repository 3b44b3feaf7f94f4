"""Survival by cMIL risk group: Kaplan-Meier, log-rank and hazard ratios per cohort."""

from __future__ import annotations

import streamlit as st

from cmil_core.evaluation import CUTOFF_METHODS, ENDPOINTS, risk_survival
from cmil_core.plots import km_figure
from pages import _common

st.title("Survival")
model_id = _common.selected_model()
if model_id is None:
    st.info("No model yet: train one (`python -m cmil_core train --db STORE --cohort TRAINING`).")
    st.stop()

left, right = st.columns(2)
endpoint = left.radio("Endpoint", list(ENDPOINTS), horizontal=True,
                      format_func=lambda e: ENDPOINTS[e][2])
choices = [*CUTOFF_METHODS, "number"]
method = right.selectbox("Risk-group cutoff, fixed on the training cohort", choices,
                         format_func=lambda m: CUTOFF_METHODS.get(m, "a number I choose"),
                         key="survival_cutoff")
cutoff: str | float = method
if method == "number":
    cutoff = right.number_input("Cutoff (score)", min_value=0.0, max_value=1.0, value=0.5,
                                step=0.01)
entries = _common.query(f"survival:{model_id}:{endpoint}:{cutoff}",
                        lambda s: risk_survival(s, model_id, endpoint, cutoff))
chosen = entries[0]["cutoff"] if entries else {"value": float("nan"), "description": method}
extra = ""
if chosen.get("p_corrected") is not None:
    extra = f" (max log-rank |Z| {chosen['statistic']:.2f}, search-corrected p {chosen['p_corrected']:.3g})"
st.caption(
    f"Model {model_id}. Risk groups: score at or above {chosen['value']:.3f} is high: "
    f"{chosen['description']}{extra}, applied unchanged to every cohort. Kaplan-Meier with "
    "log-log 95% bands, log-rank test, Cox hazard ratio (Efron ties)."
)
if method in ("youden", "median", "maxstat"):
    st.warning("This cutoff was chosen on the training cohort: its own curves are optimistic; "
               "judge the external cohorts.")
for entry in entries:
    if "note" in entry:
        st.markdown(f"**{entry['cohort']}**: {entry['note']}.")
        continue
    st.plotly_chart(
        km_figure(entry["curves"], entry["result"],
                  title=f"{entry['cohort']}: {ENDPOINTS[endpoint][2]} by cMIL risk group"),
        width="stretch", key=f"km-{entry['cohort']}-{endpoint}-{cutoff}",
    )
