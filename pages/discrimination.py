"""Discrimination: ROC curves per cohort, metrics at the training cutoff, AUC comparisons,
calibration and the decision curve, for the chosen model."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.outputs import figures
from cmil_core.outputs.evaluation import (
    calibration,
    calibration_summary,
    cohort_comparisons,
    metrics_table,
    model_comparisons,
    probability_note,
    roc_curves,
)
from cmil_core.outputs.plots import (
    MIN_CALIBRATION_BIN,
    calibration_drawable,
    calibration_figure,
    decision_figure,
    roc_figure,
)
from cmil_core.store.model_rules import read_model_scores
from pages import _common

st.title("Discrimination")
model_id = _common.require_model()

in_sample = _common.in_sample_toggle("discrimination")
# The model and its scores, read once; every table below is a function of them.
scores = _common.query(f"model-scores:{model_id}:{in_sample}",
                       lambda store: read_model_scores(store, model_id, in_sample=in_sample))
curves = _common.query(f"roc-band:{model_id}:{in_sample}",
                       lambda _store: roc_curves(scores, band=True))
table = _common.query(f"metrics:{model_id}:{in_sample}", lambda _store: metrics_table(scores))
cohorts = _common.query("cohorts", store_mod.list_cohorts)
order = [c.cohort for c in cohorts]
if not curves:
    st.info(f"Model {model_id} has no scored cohort with both classes yet: score the cohorts "
            "on the Models page, or import labels (bm_metastasis) for them.")
    st.stop()

st.caption(
    f"Model {model_id}. Patient score against bone-marrow metastasis; AUC with DeLong 95% CI, "
    "shaded band: stratified-bootstrap 95% CI of the sensitivity at each specificity (2000 "
    f"resamples, as pROC's ci.se). The operating cutoff ({display.cutoff(scores.cutoff)}) was "
    "fixed on the "
    "training cohort and is applied unchanged to every cohort."
)
if in_sample:
    st.warning("Training row: the final model's in-sample scores, on the patients it was fitted "
               "on (optimistic). Switch off for the out-of-fold scores.")
else:
    st.caption("Training row: out-of-fold scores (each training patient scored by the "
               "cross-validation model that did not see them). Every cohort's final-model "
               "scores are mapped onto that scale, on which the cutoff was chosen.")
st.plotly_chart(roc_figure(curves, cohorts=order), width="stretch")
_common.downloads(f"{model_id}_roc", lambda: figures.roc(curves, cohorts=order),
                  pd.DataFrame([{k: c.get(k) for k in ("cohort", "n", "n_positive", "auc",
                                                       "ci_low", "ci_high")} for c in curves]))


def ci(low: object, high: object) -> str:
    return "" if low is None or pd.isna(low) else f" ({low:.2f}-{high:.2f})"


def rate(value: object, interval: object) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.2f}{ci(*interval)}"


def signed(value: float | None, interval: list[float] | None) -> str:
    """"0.40 (-0.73 to 1.53)": an estimate that may be negative, with its interval."""
    if value is None:
        return "—"
    return f"{value:.2f}" + ("" if not interval else f" ({interval[0]:.2f} to {interval[1]:.2f})")


shown = pd.DataFrame(
    {
        "Cohort": r.label,
        "Patients": r.n,
        "TP / FN / TN / FP": f"{r.tp} / {r.fn} / {r.tn} / {r.fp}",
        "Sensitivity": rate(r.sensitivity, r.sensitivity_ci),
        "Specificity": rate(r.specificity, r.specificity_ci),
        "PPV": rate(r.ppv, r.ppv_ci),
        "NPV": rate(r.npv, r.npv_ci),
    }
    for r in table.itertuples()
)
st.subheader("At the training cutoff")
st.table(shown.set_index("Cohort") if len(shown) else shown)  # wraps: every column visible
st.caption("Wilson 95% confidence intervals.")
_common.downloads(f"{model_id}_metrics_at_cutoff", table=table)


def p_text(p: object) -> str:
    return display.p_cell(p)


def comparison_table(frame: pd.DataFrame, first: str) -> pd.DataFrame:
    return pd.DataFrame({
        first: frame["cohort"] if first == "Cohort" else frame["a"] + " vs " + frame["b"],
        "Patients": frame["n"],
        "AUC": [f"{a:.2f} vs {b:.2f}" for a, b in zip(frame["auc_a"], frame["auc_b"])],
        "Difference (95% CI)": [
            f"{d:+.3f}" + ("" if pd.isna(lo) else f" ({lo:+.3f} to {hi:+.3f})")
            for d, lo, hi in zip(frame["difference"], frame["diff_ci_low"], frame["diff_ci_high"])
        ],
        "p (DeLong)": [p_text(p) for p in frame["p"]],
    })


st.subheader("Comparing AUCs")
between = _common.query(f"cohort-tests:{model_id}:{in_sample}",
                        lambda _store: cohort_comparisons(scores))
st.markdown("**Between cohorts** (different patients: unpaired DeLong test)")
if between.empty:
    st.caption("Needs two cohorts with both classes.")
else:
    st.dataframe(comparison_table(between, "Cohorts"), hide_index=True, width="stretch")
    _common.downloads(f"{model_id}_auc_between_cohorts", table=between)

models = _common.query("models", store_mod.list_models)
others = [m for m in models["model_id"] if m != model_id]
st.markdown("**Between models** (same patients: paired DeLong test)")
if not others:
    st.caption("Train a second model (Models page) to compare it with this one on the same "
               "patients.")
else:
    other = st.selectbox("Compare with", others, key="compare_model")
    paired = _common.query(
        f"model-tests:{model_id}:{other}:{in_sample}",
        lambda store: model_comparisons(scores, read_model_scores(store, other,
                                                                  in_sample=in_sample)))
    if paired.empty:
        st.caption(f"{model_id} and {other} share no scored cohort with both classes.")
    else:
        st.dataframe(comparison_table(paired, "Cohort"), hide_index=True, width="stretch")
        st.caption(f"AUC of {model_id} vs {other}, on the patients both scored.")
        _common.downloads(f"{model_id}_vs_{other}_auc", table=paired)

st.subheader("Calibration and clinical usefulness")
entries = _common.query(f"calibration:{model_id}:{in_sample}",
                        lambda _store: calibration(scores))
note = probability_note(scores)
# One above the other: side by side, each plot is too narrow at 1280 px.
left, right = st.container(), st.container()
with left:
    st.plotly_chart(calibration_figure(entries, cohorts=order), width="stretch")
    _drawn, not_drawn = calibration_drawable(entries)
    if not_drawn:
        st.info("Calibration not drawn where a bin would hold fewer than "
                f"{MIN_CALIBRATION_BIN} patients: " + "; ".join(not_drawn) + ".",
                icon=":material/info:")
    _common.downloads(f"{model_id}_calibration",
                      lambda: figures.calibration(entries, cohorts=order))
    fits = calibration_summary(entries)
    st.dataframe(pd.DataFrame({
        "Cohort": [f["label"] for f in fits],
        "Brier": [f"{f['brier']:.3f}" for f in fits],
        "Intercept (95% CI)": [signed(f["intercept"], f["intercept_ci"]) for f in fits],
        "Slope (95% CI)": [signed(f["slope"], f["slope_ci"]) for f in fits],
    }), hide_index=True, width="stretch")
    st.caption("Calibration intercept (ideal 0; above 0: predictions too low on average) and "
               "slope (ideal 1; below 1: predictions too extreme), logistic recalibration "
               "with Wald 95% CIs (R glm). "
               + " ".join(f"{f['label']}: {f['note']}." for f in fits if f["note"]))
with right:
    st.plotly_chart(decision_figure(entries, cohorts=order), width="stretch")
    _common.downloads(f"{model_id}_decision_curve",
                      lambda: figures.decision(entries, cohorts=order))
st.caption(
    "Calibration: patients in five equal-sized bins of the score, observed share with marrow "
    "metastasis (Wilson 95% CI) against the mean score, and a kernel-smoothed curve. Decision "
    "curve: net benefit of acting on the score at each threshold probability (Vickers & Elkin "
    "2006), against acting for everyone (dashed) or no one. " + note
)
