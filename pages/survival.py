"""Survival by cMIL risk group: Kaplan-Meier, log-rank and hazard ratios per cohort and pooled
over the validation cohorts, and the risk group adjusted for clinical factors (Cox)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.analysis.risk_groups import describe_cutoff
from cmil_core.errors import InputError
from cmil_core.outputs import figures
from cmil_core.outputs.evaluation import (
    CLINICAL_COVARIATES,
    COX_STRATA,
    ENDPOINTS,
    clinical_cox,
    risk_survival,
)
from cmil_core.outputs.plots import forest_figure, km_figure
from cmil_core.store.model_rules import read_model_scores
from pages import _common

st.title("Survival")
model_id = _common.require_model()

endpoint, cutoff = _common.cutoff_picker("survival")
in_sample = _common.in_sample_toggle("survival")
# The model and its scores, read once; the curves and the Cox model are functions of them.
scores = _common.query(f"model-scores:{model_id}:{in_sample}",
                       lambda store: read_model_scores(store, model_id, in_sample=in_sample))
entries = _common.query(f"survival:{model_id}:{endpoint}:{cutoff}:{in_sample}",
                        lambda _store: risk_survival(scores, endpoint, cutoff))
if not entries:
    st.info(f"Model {model_id} has not scored any cohort yet: score them on the Models page.")
    st.stop()
chosen = entries[0]["cutoff"]
extra = ""
if chosen.get("method") == "maxstat" and chosen.get("p_corrected") is not None:
    extra = f" [{describe_cutoff(chosen)}]"
st.caption(
    f"Model {model_id}. Risk groups: score at or above {display.cutoff(chosen['value'])} is "
    "high: "
    f"{chosen['description']}{extra}, applied unchanged to every cohort. Kaplan-Meier with "
    "log-log 95% bands; the log-rank p on each plot is the classic test of the chosen groups "
    "(not corrected for choosing the cutoff); Cox hazard ratio (Efron ties)."
)
if chosen.get("method") == "maxstat":
    st.caption("maxstat search-corrected p: tests on the training cohort whether any allowed "
               "split is associated with survival, allowing for the search over splits (R "
               "maxstat.test, smethod = \"LogRank\"); it is not the p of the curves below.")
if in_sample:
    st.warning("Training cohort grouped by the final model's in-sample scores (optimistic), as "
               "asked; switch off for its out-of-fold scores.")
else:
    st.caption("Training cohort: patients grouped by their out-of-fold scores (each scored by "
               "the cross-validation model that did not see them; labelled patients only).")
if cutoff in ("youden", "median", "maxstat"):
    st.warning("This cutoff was chosen on the training cohort: its own curves are optimistic; "
               "judge the external cohorts.")
name = ENDPOINTS[endpoint][2]
drawn = [e for e in entries if "note" not in e]
if not drawn:
    st.info(f"No cohort has {name} follow-up with events in both risk groups. Import "
            f"{ENDPOINTS[endpoint][0]} and {ENDPOINTS[endpoint][1]} columns with the clinical "
            "table (Cohorts page) to see survival.")
columns = st.columns(2)
for k, entry in enumerate(entries):
    with columns[k % 2]:
        shown_name = entry.get("label", entry["cohort"])
        if entry.get("n_dropped"):
            by_column = ", ".join(f"{_common.md(c)} empty for {n}"
                                  for c, n in entry.get("n_dropped_by_column", {}).items())
            st.caption(f"{_common.md(shown_name)}: {entry['n_dropped']} patient(s) left out "
                       f"for missing follow-up ({by_column}).")
        if "note" in entry:
            st.markdown(f"**{_common.md(shown_name)}**")
            st.caption(f"Not drawn: {entry['note']}.")
            continue
        title = f"{shown_name}: {name} by cMIL risk group"
        if entry.get("pooled"):
            title += f" ({' + '.join(entry['pooled'])})"
        st.plotly_chart(km_figure(entry["curves"], entry["result"], title=title), width="stretch",
                        key=f"km-{entry['cohort']}-{endpoint}-{cutoff}")
        _common.downloads(
            f"{model_id}_km_{entry['cohort']}_{endpoint}",
            lambda entry=entry, title=title: figures.km(entry["curves"], entry["result"],
                                                        title=title),
            entry["curves"],
        )

def p_cell(p: float | None) -> str:
    return display.p_cell(p)  # one p format everywhere: < 0.001 or two significant digits


def ph_cell(test: dict | None) -> str:
    """The GLOBAL cox.zph p, flagged when below 0.05."""
    row = next((t for t in (test or {}).get("tests", []) if t["term"] == "GLOBAL"), None)
    if row is None:
        return "—"
    return p_cell(row["p"]) + (" ⚠ not proportional" if row["violated"] else "")


hr_rows = []
for entry in drawn:
    cox_hr = entry["result"].get("cox") or {}
    hr_rows.append({
        "Cohort": entry.get("label", entry["cohort"]),
        "HR high vs low (95% CI)": "not estimable" if cox_hr.get("hr") is None else
        f"{cox_hr['hr']:.2f} ({cox_hr['ci'][0]:.2f}-{cox_hr['ci'][1]:.2f})"
        if None not in (cox_hr.get("ci") or [None]) else f"{cox_hr['hr']:.2f}",
        "p": p_cell(cox_hr.get("p")),
        "Proportional hazards p (cox.zph)": ph_cell(cox_hr.get("ph_test")),
    })
if hr_rows:
    st.markdown("**Hazard ratios and the proportional-hazards check**")
    st.dataframe(pd.DataFrame(hr_rows), hide_index=True, width="stretch")
    for entry in drawn:
        for note in entry["result"].get("warnings", []):
            if note.startswith("proportional hazards doubtful"):
                st.warning(f"{entry.get('label', entry['cohort'])}: {note}")
    st.caption("Proportional hazards: Schoenfeld-residual score test of R's cox.zph "
               "(transform \"km\"); p < 0.05 means the hazard ratio changes with follow-up, "
               "so the HR shown is an average over time.")
auc_entries = [e for e in entries if e.get("td_auc")]
if auc_entries:
    auc_times = auc_entries[0]["td_auc"]["times"]
    st.markdown(f"**Time-dependent AUC of the cMIL score** ({name})")
    st.dataframe(pd.DataFrame([
        {"Cohort": e.get("label", e["cohort"]),
         **{f"{t:g} months": "—" if a is None else f"{a:.3f} ({c} / {n})"
            for t, a, c, n in zip(e["td_auc"]["times"], e["td_auc"]["auc"], e["td_auc"]["cases"],
                                  e["td_auc"]["controls"], strict=True)},
         "Mean": "—" if e["td_auc"]["mean_auc"] is None else f"{e['td_auc']['mean_auc']:.3f}"}
        for e in auc_entries]), hide_index=True, width="stretch")
    st.caption("Cumulative/dynamic AUC at each time (cases: event by then; controls: event-free "
               "after it; in brackets cases / controls), censoring handled by inverse "
               "probability weighting (Uno 2007; scikit-survival cumulative_dynamic_auc); "
               "the continuous score, not the risk groups. — : no cases or controls at that "
               f"time. Times: {', '.join(f'{t:g}' for t in auc_times)} months.")

st.subheader("Adjusted for clinical factors")
factors = [label for label, _, _ in CLINICAL_COVARIATES.values()]
picked = st.multiselect("Clinical factors in the Cox model", factors, default=factors,
                        key="cox_factors")
by_centre = st.checkbox("Stratify by centre (each centre its own baseline hazard, as R's "
                        "strata(center))", value=False, key="cox_strata")
strata = "center" if by_centre else None
try:
    cox = _common.query(f"cox:{model_id}:{endpoint}:{cutoff}:{sorted(picked)}:{strata}:{in_sample}",
                        lambda store: clinical_cox(scores, store_mod.patients_frame(store),
                                                   endpoint, cutoff, factors=picked,
                                                   strata=strata))
except InputError as exc:
    st.info(f"No Cox model: {exc}")
    st.stop()
title = f"{name}: cMIL risk group and clinical factors"
st.plotly_chart(forest_figure(cox, title=title), width="stretch")
st.caption(
    f"Multivariable Cox model on the validation cohorts pooled ({', '.join(cox['cohorts'])}): "
    f"{cox['n']} patients, {cox['events']} events, concordance "
    f"{cox['concordance']:.2f}"
    + (f" (within centres); stratified by {COX_STRATA['center']}: "
       + ", ".join(f"{lv['level']} {lv['n']} patients, {lv['events']} events"
                   for lv in cox["strata"]["levels"]) if cox.get("strata") else "")
    + ". " + "; ".join(f"{c['name']}: {c['definition']}" for c in cox["covariates"]) + "."
)
st.dataframe(pd.DataFrame([
    {"Covariate": c["name"],
     "HR (95% CI)": "—" if c["hr"] is None else f"{c['hr']:.2f}" + (
         "" if None in (c.get("ci") or [None]) else f" ({c['ci'][0]:.2f}-{c['ci'][1]:.2f})"),
     "p": p_cell(c["p"]),
     "Proportional hazards p (cox.zph)": p_cell(c.get("ph_p")) + (
         " ⚠ not proportional" if c.get("ph_p") is not None and c["ph_p"] < 0.05 else "")}
    for c in cox["coefficients"]]), hide_index=True, width="stretch")
if cox.get("ph_test"):
    st.caption("Proportional-hazards check of the whole model (cox.zph GLOBAL), p: "
               f"{ph_cell(cox['ph_test'])}.")
for note in cox.get("warnings", []):
    st.warning(note)
left_out = [f"{e['column']} ({e['reason']})" for e in cox.get("excluded", [])
            if e["reason"] != "not chosen"]
if left_out:
    st.caption("Left out: " + ", ".join(left_out) + ".")
_common.downloads(f"{model_id}_cox_{endpoint}", lambda: figures.forest(cox, title=title),
                  pd.DataFrame(cox["coefficients"]))
