"""Cohorts: import a clinical table, attach and ingest slides, delete a cohort.

Writes that take milliseconds (an import, a deletion) run here; ingest runs as
a background job (``ingest:<cohort>``) in the process-wide job runner, so it
keeps going when the user changes page, and its progress is read back on
every visit. Server folders are only offered under ``$CMIL_SLIDE_ROOT``.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.clinical import workbook
from cmil_core.clinical.cohort_import import import_cohort, preview_table, problems_frame
from cmil_core.clinical.tables import ENCODING_CHOICES, unicode_text
from cmil_core.errors import InputError
from cmil_core.ingest import discovery, pipeline
from cmil_core.ingest.qc import THRESHOLD_FIELDS, decision_thresholds, flag_name
from cmil_core.ingest.quality import QCThresholds
from cmil_core.ops import access
from cmil_core.ops.jobs import Job
from pages import _common
from pages._common import flash, md, show_flash

ROLES = {"train": "Training", "validation": "External validation", "test": "External test"}
SEEN = "cohorts_jobs_seen"


def ingest_job_name(cohort: str) -> str:
    return f"ingest:{cohort}"


def cohort_rows(overview: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Cohort": overview["cohort"],
            "Role": [ROLES.get(r, r) for r in overview["role"]],
            "Centre": [c if isinstance(c, str) and c else "—" for c in overview["center"]],
            "Patients": overview["patients"],
            "Slides": overview["slides"],
            "Slides failed": overview["slides_failed"],
            "Patches passing QC": overview["patches_passed"],
        }
    )


st.title("Cohorts")
show_flash()
editing = _common.viewer_notice()  # viewers: every write control below is disabled
db = _common.db_path()
if not db.exists():
    store_mod.open_store(db).close()  # the store the user named: created empty, to import into
overview = _common.query("overview_rows", store_mod.cohort_overview)
cohorts = overview["cohort"].tolist()
runner = _common.job_runner()

st.dataframe(cohort_rows(overview), hide_index=True, width="stretch",
             column_config={name: st.column_config.NumberColumn(format="localized")
                            for name in ("Patients", "Slides", "Slides failed",
                                         "Patches passing QC")})
st.caption(
    "One row per cohort. Slides appear after ingest; a failed slide keeps its reason "
    "(see the ingest summary below; the Patients page lists each patient's slides)."
)

# ---------------------------------------------------------------------------
st.header("Import a clinical table")
st.caption(
    "A CSV, semicolon or tab-separated table, or an Excel workbook (.xlsx, or .xlsm "
    "whose macros are not run), with one row per patient. Required: "
    "patient_id. Optional: bm_metastasis (1/0, yes/no, positive/negative), os_months + "
    "os_event, efs_months + efs_event; common spellings are recognised, and every other "
    "column is kept as a clinical variable. Validated on upload; nothing is imported "
    "until you confirm. Same as `cmil import-cohort`."
)
upload_round = st.session_state.get("cohort_upload_round", 0)
uploaded = st.file_uploader(
    "Clinical table", type=["csv", "tsv", "txt", "xlsx", "xlsm"],
    key=f"cohort_table_{upload_round}", disabled=not editing,
)
if uploaded is not None:
    data = uploaded.getvalue()
    chosen_encoding: str | None = None
    chosen_sheet: str | None = None
    try:
        sheets = workbook.sheet_names(data, uploaded.name) if workbook.is_workbook(data) else []
    except InputError:
        sheets = []  # the preview below says why the workbook cannot be read
    if sheets:
        chosen_sheet = st.selectbox(
            "Sheet", sheets, key=f"import_sheet_{upload_round}",
            help="The workbook's sheet holding one row per patient (default: the first). "
                 "Same as `--sheet`.")
    elif not workbook.is_workbook(data) and not unicode_text(data):
        # Not UTF-8: a legacy code page, detected or chosen here.
        picked = st.selectbox(
            "Text encoding", ["detect", *ENCODING_CHOICES], key=f"import_encoding_{upload_round}",
            help="Detected by default (UTF-8, UTF-16, GB18030/GBK, Big5, Shift-JIS, EUC-KR, "
                 "cp1252, Latin-1); when the detection is unsure the table is refused with "
                 "the candidates: choose the one it was saved in. Same as `--encoding`.")
        chosen_encoding = None if picked == "detect" else picked
    try:
        preview = preview_table(data, uploaded.name, encoding=chosen_encoding,
                                sheet=chosen_sheet)
    except InputError as exc:
        st.error(f"{md(uploaded.name)} cannot be imported; nothing was imported. Problems:")
        st.dataframe(problems_frame(exc), hide_index=True, width="stretch")
        st.caption("Rows are numbered as a spreadsheet shows them: the header is row 1.")
    else:
        st.success(
            f"{md(uploaded.name)}: {preview.patients} patients, {preview.positives} with "
            f"bone-marrow metastasis, {preview.negatives} without, {preview.unlabelled} unknown."
        )
        st.caption(
            f"Read as {md(preview.encoding)}"
            + (f", sheet '{md(preview.sheet)}'" if preview.sheet else "")
            + ". Missing values: empty cells and NA/N/A/NaN/null everywhere; none, -, ?, . "
            "only in numeric columns (other columns keep them as values).")
        for note in preview.notes:
            st.info(md(note))
        left, right = st.columns([1, 2])
        left.markdown("**Columns detected**")
        left.dataframe(preview.mapping, hide_index=True)
        right.markdown("**Rows as they will be stored** (first 200)")
        right.dataframe(preview.frame.head(200))
        stem = uploaded.name.rsplit(".", 1)[0]
        name = st.text_input("Cohort name", value=stem, max_chars=64,
                             key=f"import_cohort_name_{upload_round}")
        role = st.selectbox("Role", list(ROLES), format_func=ROLES.get,
                            key=f"import_role_{upload_round}")
        center = st.text_input("Centre", key=f"import_center_{upload_round}")
        exists = name.strip() in cohorts
        if exists:
            st.error(
                f"A cohort named '{md(name.strip())}' already exists. Choose another name, or "
                "delete that cohort first (below)."
            )
        if st.button("Import", type="primary", disabled=exists or not name.strip() or not editing,
                     key="import_confirm") and _common.require_editor("import",
                                                                     cohort=name.strip()):
            try:
                result = import_cohort(
                    db, name, None, data=data, name=uploaded.name, role=role,
                    center=center.strip() or None, encoding=chosen_encoding,
                    sheet=chosen_sheet,
                )
            except (InputError, store_mod.StoreError) as exc:
                st.error(f"Nothing was imported: {md(exc)}")
            else:
                _common.audit("import", cohort=result.cohort,
                              details={"source": result.source, "patients": result.patients,
                                       "role": role, "encoding": result.encoding,
                                       "sheet": result.sheet})
                flash(
                    "success",
                    f"Imported cohort '{md(result.cohort)}' ({ROLES[role].lower()}) from "
                    f"{md(result.source)}: {result.patients} patients ({result.positives} with "
                    f"bone-marrow metastasis, {result.negatives} without, {result.unlabelled} "
                    f"unknown); {len(result.clinical_columns)} clinical columns kept.",
                )
                st.session_state["cohort_upload_round"] = upload_round + 1
                st.rerun()

# ---------------------------------------------------------------------------
st.header("Attach slides and run ingest")
if not cohorts:
    st.info("Import a clinical table first: slides are attached to a cohort's patients.")
else:
    st.caption(
        "Slides belong to patients by folder (one folder per patient: `P001/field01.jpg`), "
        "or by file name up to the first `_` (`P001_slide2.svs`). Ingest registers each "
        "slide, lays the patch grid and runs quality control; a bad slide is marked failed "
        "with its reason and the others go on; rerunning resumes. Same as "
        "`cmil ingest`."
    )
    target = st.selectbox("Cohort", cohorts, key="ingest_cohort")
    # Server folders are offered only when configured ($CMIL_SLIDE_ROOT); else zip uploads.
    try:
        root = discovery.configured_slide_root()
    except InputError as exc:
        root = None
        st.error(md(exc))
    if root is None:
        st.info(
            "Server folders are off: the dashboard only reads folders under the folder "
            f"named by the environment variable `{discovery.SLIDE_ROOT_ENV}`. Set it "
            "(e.g. `CMIL_SLIDE_ROOT=/data/slides ./run.sh`) and restart the dashboard "
            "to ingest from there; meanwhile, upload a zip."
        )
    source_kind = st.radio(
        "Slides from", ["server", "zip"] if root is not None else ["zip"], horizontal=True,
        key="ingest_source",
        format_func={"server": "A folder on the server", "zip": "A zip upload"}.get,
    )
    mpp = st.number_input(
        "Resolution, µm per pixel (for photographs whose files carry none)", min_value=0.01,
        max_value=100.0, value=None, step=0.05, format="%.3f", key="ingest_mpp",
        placeholder="as the files say",
    )
    decided = _common.query("qc_decisions", store_mod.current_qc_decisions).get(target)
    start = decision_thresholds(decided) if decided else QCThresholds()
    qc_values: dict[str, float] = {}
    with st.expander("Quality-control thresholds"):
        st.caption(
            ("The cohort's current decision" if decided else "The defaults")
            + ": ingest judges every patch of the cohort with these (change them later on the "
            "Quality control page without ingesting again). Same as `--qc FILE` or one flag "
            "per threshold on the command line.")
        qc_cols = st.columns(2)
        for i, name in enumerate(THRESHOLD_FIELDS):
            qc_values[name] = float(qc_cols[i % 2].number_input(
                display.threshold(name), value=float(getattr(start, name)), format="%g",
                key=f"ingest_qc_{target}_{name}",
                help=f"default {getattr(QCThresholds(), name):g}; `{flag_name(name)}`"))
    try:
        ingest_thresholds: QCThresholds | None = QCThresholds(
            **qc_values, nucleated_scope=start.nucleated_scope)
    except InputError as exc:
        ingest_thresholds = None
        st.error(f"Quality-control thresholds: {md(exc)}")
    job_name = ingest_job_name(target)
    current = runner.get(job_name)
    busy = current is not None and current.running
    path = None
    extract_dir = None
    zipped = None
    if source_kind == "server":
        if root is not None:
            folders = discovery.folders_under_root(root)
            relative = st.text_input(
                f"Folder (or .zip) relative to {md(root)}", key="ingest_folder",
                placeholder=folders[0] if folders else "",
            )
            if folders:
                st.caption("Folders there: " + ", ".join(md(f) for f in folders[:30])
                           + (" …" if len(folders) > 30 else ""))
            if relative.strip():
                try:
                    path = discovery.resolve_under_root(root, relative)
                except InputError as exc:
                    st.error(f"Refused: {md(exc)}")
    else:
        zipped = st.file_uploader("Zip of slides or photographs", type=["zip"],
                                  key="ingest_zip", disabled=not editing)
        if zipped is not None:
            folder = discovery.upload_folder(db, target)
            st.caption(f"Saved and extracted under {md(folder)} on the server when you run ingest.")
    # Disabled where nothing can be ingested: server folders off (then only zips are
    # offered); a missing folder or zip is said when the button is pressed.
    server_off = source_kind == "server" and root is None
    if st.button("Run ingest", type="primary",
                 disabled=busy or not editing or ingest_thresholds is None or server_off,
                 key="ingest_run") and _common.require_editor("ingest", cohort=target):
        if source_kind == "zip":
            if zipped is None:
                st.error("Upload a zip first.")
            else:
                saved = discovery.save_upload(zipped, zipped.name,
                                              discovery.upload_folder(db, target))
                path = saved
                extract_dir = saved.with_suffix("")
        elif path is None:
            st.error("Give a folder under the slide root first.")
        if path is not None:
            ingest_audited = _common.audited_job(
                pipeline.ingest, "ingest",
                lambda summary: [(summary.cohort, None, access.ingest_details(summary))])
            runner.start(job_name, ingest_audited, str(db), target, str(path), mpp=mpp,
                         extract_dir=None if extract_dir is None else str(extract_dir),
                         thresholds=ingest_thresholds,
                         who=_common.current_user().who or "anonymous")
            st.session_state.setdefault(SEEN, {})[job_name] = "running"
    if busy:
        st.caption(f"Ingest of {md(target)} is running; its progress is below.")


def ingest_summary(job: Job) -> None:
    summary: pipeline.IngestSummary = job.result
    slides = summary.slides
    counts = {s: sum(o.status == s for o in slides) for s in ("tiled", "skipped", "failed")}
    passed = sum(o.passed for o in slides)
    text = (
        f"Ingest of {md(summary.cohort)} finished: {len(slides)} slides, {counts['tiled']} tiled, "
        f"{counts['skipped']} already done, {counts['failed']} failed; "
        f"{sum(o.patches for o in slides)} patches, {passed} passed quality control."
    )
    (st.warning if counts["failed"] else st.success)(text)
    for warning in summary.warnings:
        st.warning(md(warning), icon=":material/warning:")
    failed = [o for o in slides if o.status == "failed"]
    if failed:
        st.dataframe(
            pd.DataFrame({"Slide": [o.path for o in failed],
                          "Patient": [o.patient_id for o in failed],
                          "Reason": [o.reason for o in failed]}),
            hide_index=True, width="stretch",
        )


@st.fragment(run_every=1.0)
def watch_ingest() -> None:
    """The ingest jobs of this store's cohorts; reruns the page once when one ends."""
    jobs = [j for c in cohorts if (j := runner.get(ingest_job_name(c))) is not None]
    if not jobs:
        return
    st.subheader("Ingest jobs")
    if _common.show_jobs(jobs, lambda job: f"Ingest of {md(job.name.split(':', 1)[1])}",
                         ingest_summary, SEEN):
        st.rerun(scope="app")  # the cohort table above shows the new slides


watch_ingest()

# ---------------------------------------------------------------------------
st.header("Delete a cohort")
if cohorts:
    doomed = st.selectbox("Cohort to delete", cohorts, key="delete_cohort")
    row = overview.set_index("cohort").loc[doomed]
    st.caption(
        f"Removes {md(doomed)}'s {row['patients']} patients, {row['slides']} slides, "
        f"{row['patches']} patches and every score of them from the store. Slide files on "
        "disk and models trained on it are kept."
    )
    typed = st.text_input("Type the cohort name to confirm", key="delete_confirm")
    job = runner.get(ingest_job_name(doomed))
    running = job is not None and job.running
    if running:
        st.warning(f"Ingest of {md(doomed)} is running; wait for it to end before deleting.")
    if st.button("Delete cohort", disabled=typed.strip() != doomed or running or not editing,
                 key="delete_button") and _common.require_editor("delete-cohort", cohort=doomed):
        scored = _common.read(store_mod.model_score_counts)
        n_scores = int(scored.loc[scored["cohort"] == doomed, "patients"].sum())
        try:
            with store_mod.open_store(db) as store:
                store_mod.delete_cohort(store, doomed)
        except store_mod.StoreError as exc:
            st.error(f"Nothing was deleted: {md(exc)}")
        else:
            _common.audit("delete-cohort", cohort=doomed,
                          details={"patients": int(row["patients"]), "slides": int(row["slides"]),
                                   "patches": int(row["patches"]), "scores": n_scores})
            flash(
                "success",
                f"Deleted cohort '{md(doomed)}': {row['patients']} patients, {row['slides']} "
                f"slides, {row['patches']} patches and {n_scores} patient scores. Slide files "
                "on disk were not touched.",
            )
            st.rerun()
