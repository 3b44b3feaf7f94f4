"""Discrimination: ROC curves per cohort and metrics at the training cutoff, for the chosen model."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.evaluation import calibration, metrics_table, roc_curves
from cmil_core.plots import calibration_figure, decision_figure, roc_figure
from pages import _common

st.title("Discrimination")
model_id = _common.selected_model()
if model_id is None:
    st.info("No model yet: train one (`python -m cmil_core train --db STORE --cohort TRAINING`).")
    st.stop()

model = _common.query(f"model:{model_id}", lambda s: store_mod.get_model(s, model_id))
curves = _common.query(f"roc:{model_id}", lambda s: roc_curves(s, model_id))
table = _common.query(f"metrics:{model_id}", lambda s: metrics_table(s, model_id))

st.caption(
    f"Model {model_id}. Patient score against bone-marrow metastasis; AUC with DeLong 95% CI. "
    f"The operating cutoff ({model.cutoff:.3f}) was fixed on the training cohort "
    "and is applied unchanged to every cohort."
)
st.plotly_chart(roc_figure(curves), width="stretch")


def ci(low: object, high: object) -> str:
    return "" if low is None or pd.isna(low) else f" ({low:.2f}-{high:.2f})"


shown = pd.DataFrame(
    {
        "Cohort": r.cohort,
        "Patients": r.n,
        "TP / FN / TN / FP": f"{r.tp} / {r.fn} / {r.tn} / {r.fp}",
        "Sensitivity": f"{r.sensitivity:.2f}{ci(*r.sensitivity_ci)}" if r.sensitivity is not None else "—",
        "Specificity": f"{r.specificity:.2f}{ci(*r.specificity_ci)}" if r.specificity is not None else "—",
        "PPV": f"{r.ppv:.2f}{ci(*r.ppv_ci)}" if r.ppv is not None else "—",
        "NPV": f"{r.npv:.2f}{ci(*r.npv_ci)}" if r.npv is not None else "—",
    }
    for r in table.itertuples()
)
st.subheader("At the training cutoff")
st.dataframe(shown, hide_index=True, width="stretch")
st.caption("Wilson 95% confidence intervals.")
st.download_button(
    "Download the metrics (CSV)", table.to_csv(index=False).encode(),
    file_name=f"{model_id}_metrics_at_cutoff.csv", mime="text/csv",
)

st.subheader("Calibration and clinical usefulness")
entries = _common.query(f"calibration:{model_id}", lambda s: calibration(s, model_id))
left, right = st.columns(2)
left.plotly_chart(calibration_figure(entries), width="stretch")
right.plotly_chart(decision_figure(entries), width="stretch")
st.caption(
    "Calibration: patients in five equal-sized bins of the score, observed share with marrow "
    "metastasis (Wilson 95% CI) against the mean score, and a kernel-smoothed curve. Decision "
    "curve: net benefit of acting on the score at each threshold probability (Vickers & Elkin "
    "2006), against acting for everyone (dashed) or no one."
)
