"""Study overview: the cohorts, their patients, labels, follow-up, slides and patches."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.demo import demo_status
from cmil_core.slides import SlideError, open_slide
from cmil_core.study import study_overview
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
    rows = []
    for r in overview.itertuples():
        labelled = r.positives + r.negatives
        share = f" ({r.positives / labelled:.0%})" if labelled else ""
        followup = "—" if pd.isna(r.followup_median) else f"{r.followup_median:.1f}"
        rows.append(
            {
                "Cohort": r.cohort,
                "Role": ROLE_NAMES.get(r.role, r.role),
                "Centre": r.center or "—",
                "Patients": r.patients,
                "BM metastasis +": f"{r.positives}{share}",
                "BM metastasis −": r.negatives,
                "Label unknown": r.unlabelled,
                "Median follow-up (months)": followup,
                "Deaths": r.os_events,
                "Slides": r.slides,
                "Slides failed": r.slides_failed,
                "Patches (passed QC)": f"{r.patches} ({r.patches_passed})",
            }
        )
    return pd.DataFrame(rows)


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
totals[3].metric("Patches passing QC", f"{int(overview['patches_passed'].sum()):,}")

st.subheader("Cohorts")
st.dataframe(cohort_table(overview), hide_index=True, width="stretch")
st.caption(
    "Median follow-up by the reverse Kaplan-Meier method; deaths are overall-survival "
    "events. Patches appear once slides are ingested."
)
left, _ = st.columns([1, 1])
with left:
    st.plotly_chart(label_chart(overview), width="stretch")

slides = _common.query("slides", store_mod.list_slides)
patients = _common.query("patients", store_mod.patients_frame)
status_of = {
    (r.cohort, r.patient_id): "BM?" if pd.isna(r.bm_metastasis) else ("BM+" if r.bm_metastasis == 1 else "BM−")
    for r in patients.itertuples()
}
st.subheader("Slides")
for cohort in overview["cohort"]:
    these = [s for s in slides if s.cohort == cohort]
    st.markdown(f"**{cohort}** · {len(these)} slides")
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
