"""Report: every table and figure of the chosen model, written as one folder to download."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import streamlit as st

from cmil_core.errors import InputError
from cmil_core.outputs.evaluation import CUTOFF_METHODS, ENDPOINTS
from cmil_core.outputs.report import report_zip, write_report
from cmil_core.progress import Progress
from cmil_core.store import StoreFolder
from pages import _common

st.title("Report")
model_id = _common.require_model()

st.write(
    f"Everything a paper needs about model **{model_id}**, in one folder: a self-contained "
    "`report.html` to read or send, the figures as PNG (200 dpi) and SVG (editable text), the "
    "tables as CSV and all the numbers as `report.json`."
)
st.markdown(
    "- **Cohorts**: patients, labels, follow-up, slides and patches per cohort.\n"
    "- **Discrimination**: ROC curves with DeLong 95% CIs of the AUC and a bootstrap band of "
    "sensitivity; sensitivity, specificity, PPV and NPV (Wilson CIs) at the training cutoff.\n"
    "- **Calibration** and **decision curve** per cohort.\n"
    "- **Survival**: Kaplan-Meier by cMIL risk group per cohort, with number at risk, log-rank "
    "test and hazard ratio.\n"
    "- **Cox model** on the validation cohorts pooled: the cMIL risk group adjusted for age "
    "(> 18 months), INSS stage 4 and MYCN amplification, where the clinical tables hold them.\n"
    "- **Patients**: every patient's score and risk group."
)

left, right = st.columns(2)
endpoint = left.radio("Survival endpoint", list(ENDPOINTS), horizontal=True,
                      format_func=lambda e: ENDPOINTS[e][2], key="report_endpoint")
choices = [*CUTOFF_METHODS, "number"]
method = right.selectbox("Risk-group cutoff, fixed on the training cohort", choices,
                         format_func=lambda m: CUTOFF_METHODS.get(m, "a number I choose"),
                         key="report_cutoff")
cutoff: str | float = method
if method == "number":
    cutoff = right.number_input("Cutoff (score)", min_value=0.0, max_value=1.0, value=0.5,
                                step=0.01, key="report_cutoff_number")

forced = _common.pseudonymise_forced()
pseudonymise = st.checkbox(
    "Pseudonymise patient ids", value=_common.pseudonymise_on(), disabled=forced,
    help="Every patient id in the tables, report.json and report.html becomes a salted hash "
         "(HMAC-SHA256), for sharing with collaborators. With the team's salt configured, the "
         "same patient has the same pseudonym in every export; without it each report draws "
         "its own salt and keeps it nowhere." + (" Always on for viewers here." if forced else ""),
)

state_key = f"report:{model_id}"
if st.button("Write the report", type="primary"):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = StoreFolder.of(_common.db_path()).report(model_id, stamp)
    bar = st.progress(0.0, text="Starting…")

    def show(event: Progress) -> None:
        bar.progress(event.overall, text=event.message or event.describe())

    try:
        masker = _common.pseudonymiser(pseudonymise)
        html_path = write_report(_common.db_path(), model_id, folder, endpoint=endpoint,
                                 cutoff=cutoff, progress=show,
                                 pseudonymise=masker if masker is not None else False)
    except InputError as exc:
        bar.empty()
        st.error(f"The report could not be written: {_common.md(exc)}")
    else:
        bar.progress(1.0, text="Done")
        st.session_state[state_key] = str(html_path)
        st.session_state[f"{state_key}:pseudonymised"] = masker is not None
        _common.audit("export", model_id=model_id,
                      details={"kind": "report", "folder": str(folder), "endpoint": endpoint,
                               "cutoff": cutoff, "pseudonymised": masker is not None})

written = st.session_state.get(state_key)
if written and Path(written).exists():
    html_path = Path(written)
    folder = html_path.parent
    masked_ids = bool(st.session_state.get(f"{state_key}:pseudonymised"))
    st.success(f"Report written to `{folder}`"
               + (" with pseudonymised patient ids." if masked_ids else " with real patient ids."))
    left, right = st.columns(2)
    downloaded = {"model_id": model_id,
                  "details": {"folder": str(folder), "pseudonymised": masked_ids}}
    left.download_button(
        "Download the report (zip)", report_zip(folder), file_name=f"{folder.name}.zip",
        mime="application/zip", type="primary", key="report_zip",
        on_click=_common.audit, args=("export",),
        kwargs={**downloaded, "details": {**downloaded["details"], "kind": "report zip download"}},
    )
    right.download_button(
        "Download report.html only", html_path.read_bytes(), file_name=f"{folder.name}.html",
        mime="text/html", key="report_html",
        on_click=_common.audit, args=("export",),
        kwargs={**downloaded, "details": {**downloaded["details"], "kind": "report html download"}},
    )
    st.caption("The same report from a terminal: "
               f"`cmil report --db {_common.db_path()} --model {model_id} "
               f"--out DIR --endpoint {endpoint} --cutoff {cutoff}"
               + (" --pseudonymise" if masked_ids else "") + "`")
