"""Study overview: the cohorts, their patients, labels, follow-up, slides and patches."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.demo.generator import demo_status
from cmil_core.ingest.qc import qc_warnings
from cmil_core.ingest.slides import SlideError, open_slide
from cmil_core.outputs.evaluation import discrimination, metrics_table
from cmil_core.outputs.plots import qc_histogram_figure
from cmil_core.outputs.study import qc_table, study_overview
from cmil_core.store.model_rules import read_model_scores
from pages import _common

ROLE_NAMES = {"train": "Training", "validation": "External validation", "test": "External test"}


@st.cache_data(show_spinner=False, max_entries=512)
def thumbnail(path: str, sha256: str | None, mpp: float | None) -> object | None:
    """A slide's thumbnail (cached per file content); None when it cannot be read."""
    try:
        with open_slide(path, mpp=mpp) as slide:
            return slide.thumbnail(320)
    except (SlideError, OSError):
        return None


def cohort_table(overview: pd.DataFrame) -> pd.DataFrame:
    """One row per cohort, every column visible at 1280 px (an HTML table that wraps)."""
    rows = []
    for r in overview.itertuples():
        labelled = r.positives + r.negatives
        share = f" ({r.positives / labelled:.0%})" if labelled else ""
        followup = "—" if pd.isna(r.followup_median) else f"{r.followup_median:.1f}"
        slides = display.count(r.slides) + (f" ({display.count(r.slides_failed)} failed)"
                                             if r.slides_failed else "")
        rows.append(
            {
                "Cohort": r.cohort,
                "Role": ROLE_NAMES.get(r.role, r.role),
                "Centre": r.center or "—",
                "Patients": display.count(r.patients),
                "BM metastasis + / − / unknown": (
                    f"{display.count(r.positives)}{share} / {display.count(r.negatives)} / "
                    f"{display.count(r.unlabelled)}"),
                "Median follow-up (months)": followup,
                "Deaths": display.count(r.os_events),
                "Slides": slides,
                "Patches passing QC": (display.count_share(r.patches_passed, r.patches)
                                       if r.patches else "—"),
            }
        )
    return pd.DataFrame(rows).set_index("Cohort")


def label_chart(overview: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for column, name, colour in (
        ("positives", "BM metastasis", "#8e3b6e"),
        ("negatives", "No BM metastasis", "#9fb8c8"),
        ("unlabelled", "Unknown", "#d9d9d9"),
    ):
        fig.add_bar(x=overview["cohort"], y=overview[column], name=name, marker_color=colour)
    fig.update_layout(
        barmode="stack", height=260, margin=dict(l=10, r=10, t=30, b=10),
        title="Patients by bone-marrow status", legend=dict(orientation="h", y=-0.25),
        yaxis_title="patients",
    )
    return fig


st.title("Study overview")
overview = _common.query("overview", study_overview)
status = _common.query("demo", demo_status)
if status:
    st.info(
        f"Synthetic demo study ({status.get('size')}, seed {status.get('seed')}): "
        "computer-generated smears and patients, for trying the tool. Not patient data."
    )

totals = st.columns(4)
totals[0].metric("Cohorts", len(overview))
totals[1].metric("Patients", int(overview["patients"].sum()))
totals[2].metric("Slides", int(overview["slides"].sum()))
totals[3].metric("Patches passing QC", display.count(overview["patches_passed"].sum()))

st.subheader("Cohorts")
st.table(cohort_table(overview))
st.caption(
    "Median follow-up by the reverse Kaplan-Meier method; deaths are overall-survival "
    "events. Patches appear once slides are ingested."
)
left, _ = st.columns([1, 1])
with left:
    st.plotly_chart(label_chart(overview), width="stretch")

st.subheader("Quality control")
qc = _common.query("qc", qc_table)
for warning in _common.query("qc_warnings", lambda store: [w.message for w in qc_warnings(store)]):
    st.warning(_common.md(warning), icon=":material/warning:")
if qc.empty:
    st.caption("No patches yet: ingest slides (`cmil ingest`) to see quality "
               "control.")
else:
    reasons = [c for c in qc.columns if c not in ("cohort", "patches", "kept", "kept_share")]
    # Only the rules that rejected something: every column fits at 1280 px.
    hit = [r for r in reasons if int(qc[r].sum()) > 0]
    shown_qc = pd.DataFrame({
        "Cohort": qc["cohort"],
        "Patches": [display.count(n) for n in qc["patches"]],
        "Kept": [display.count_share(k, n) for k, n in zip(qc["kept"], qc["patches"])],
        **{f"Rejected: {reason}": [display.count(n) for n in qc[reason]] for reason in hit},
    }).set_index("Cohort")
    st.table(shown_qc)
    quiet = [r for r in reasons if r not in hit]
    st.caption(
        (f"No patch was rejected for: {', '.join(quiet)}. " if quiet else "")
        + "Each rejected patch is counted under the first rule it fails (background, thick "
        "smear, too dark, too bright, blurred, no nucleated cell). Compare the metric "
        "distributions between centres before trusting the thresholds on a new cohort; "
        "change them, per cohort, on the Quality control page."
    )
    metric = st.selectbox("Metric distribution", store_mod.QC_METRICS, key="qc_metric",
                          format_func=display.column)
    hist = _common.query(f"qc_hist:{metric}",
                         lambda store: store_mod.qc_metric_histogram(store, metric))
    st.plotly_chart(qc_histogram_figure(hist, metric, cohorts=overview["cohort"].tolist()),
                    width="stretch")

model_id = _common.selected_model()
if model_id is not None:
    model = _common.query(f"model:{model_id}", lambda store: store_mod.get_model(store, model_id))
    scores = _common.query(f"model-scores:{model_id}:False",
                           lambda store: read_model_scores(store, model_id))
    rows = _common.query(f"discrimination:{model_id}", lambda _store: discrimination(scores))
    at_cutoff = _common.query(f"metrics:{model_id}:False", lambda _store: metrics_table(scores))
    rates = {r.cohort: r for r in at_cutoff.itertuples()}
    st.subheader("Model")
    if model is not None:
        cv = model.metrics.get("cv_auc")
        st.caption(
            f"{model.model_id}: {model.aggregator} aggregator on {model.encoder} features, "
            f"trained on {model.train_cohorts}"
            + (f" (cross-validated AUC {cv:.2f}; its 95% CI is in the training row below)"
               if cv is not None else "")
            + f"; risk groups at the training cutoff {display.cutoff(model.cutoff)}."
        )

    def rate(cohort: str, name: str) -> str:
        r = rates.get(cohort)
        if r is None:
            return "—"
        low, high = getattr(r, f"{name}_ci")
        return display.proportion_ci(getattr(r, name), low, high)

    table = pd.DataFrame(
        {
            "Cohort": r.get("label", r["cohort"]),
            "Patients scored": display.count(r["n"]),
            "AUC (95% CI)": (
                display.estimate_ci(r["auc"], r["ci_low"], r["ci_high"])
                if r.get("auc") is not None and r.get("ci_low") is not None
                else "—"
            ),
            "Sensitivity (95% CI)": rate(r["cohort"], "sensitivity"),
            "Specificity (95% CI)": rate(r["cohort"], "specificity"),
        }
        for r in rows
    )
    st.table(table.set_index("Cohort") if len(table) else table)
    st.caption(
        "AUC with DeLong 95% CI; sensitivity and specificity (Wilson 95% CI) at the cutoff "
        "fixed on the training cohort. The training row uses out-of-fold scores "
        "(each patient scored by the "
        "cross-validation model that did not see them); the external centres are the test of "
        "transport to other centres."
    )

slides = _common.query("slides", store_mod.list_slides)
patients = _common.query("patients", store_mod.patients_frame)
status_of = {
    (r.cohort, r.patient_id): (
        "BM?" if pd.isna(r.bm_metastasis) else ("BM+" if r.bm_metastasis == 1 else "BM−"))
    for r in patients.itertuples()
}
st.subheader("Slides")
for cohort in overview["cohort"]:
    these = [s for s in slides if s.cohort == cohort]
    st.markdown(f"**{_common.md(cohort)}** · {display.count(len(these))} slides")
    if not these:
        st.caption("No slides registered yet.")
        continue
    shown = these[:6]
    cols = st.columns(6)
    for col, slide in zip(cols, shown):
        image = thumbnail(slide.path, slide.sha256, slide.mpp)
        label = status_of.get((slide.cohort, slide.patient_id), "BM?")
        caption = f"{slide.patient_id or '?'} · {label} · {slide.path.rsplit('/', 1)[-1]}"
        if image is None:
            col.warning(f"{caption}: cannot be read")
        else:
            col.image(image, caption=caption, width="stretch")
