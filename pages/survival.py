"""Survival by cMIL risk group: Kaplan-Meier, log-rank and hazard ratios per cohort."""

from __future__ import annotations

import streamlit as st

from cmil_core import store as store_mod
from cmil_core.evaluation import ENDPOINTS, risk_survival
from cmil_core.plots import km_figure
from pages import _common

st.title("Survival")
model_id = _common.selected_model()
if model_id is None:
    st.info("No model yet: train one (`python -m cmil_core train --db STORE --cohort TRAINING`).")
    st.stop()

endpoint = st.radio("Endpoint", list(ENDPOINTS), horizontal=True,
                    format_func=lambda e: ENDPOINTS[e][2])
model = _common.query(f"model:{model_id}", lambda s: store_mod.get_model(s, model_id))
entries = _common.query(f"survival:{model_id}:{endpoint}",
                        lambda s: risk_survival(s, model_id, endpoint))
st.caption(
    f"Model {model_id}. Risk groups: score at or above {model.cutoff:.3f} is high, the cutoff "
    "fixed on the training cohort (Youden on out-of-fold training scores) and applied "
    "unchanged; Kaplan-Meier with log-log 95% bands, log-rank test, Cox hazard ratio (Efron)."
)
for entry in entries:
    if "note" in entry:
        st.markdown(f"**{entry['cohort']}**: {entry['note']}.")
        continue
    st.plotly_chart(
        km_figure(entry["curves"], entry["result"],
                  title=f"{entry['cohort']}: {ENDPOINTS[endpoint][2]} by cMIL risk group"),
        width="stretch", key=f"km-{entry['cohort']}-{endpoint}",
    )
