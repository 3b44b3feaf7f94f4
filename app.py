"""cMIL dashboard: ``streamlit run app.py`` (the README's run command does this).

The entry point: navigation over the pages, the shared sidebar, and the first
launch. On a first launch with the default store (no ``CMIL_DB``), the demo
study is generated in the background, with progress on this page and in the
terminal; later launches open at once. ``./run.sh`` (:mod:`scripts.serve`)
starts that build as the server starts, before any browser opens the page;
this page then shows the same job (:func:`cmil_core.demo.launch.start_first_launch`).
"""

from __future__ import annotations

import streamlit as st

from cmil_core.demo import launch
from cmil_core.demo.generator import demo_status, generate_demo
from cmil_core.progress import TerminalProgress

FIRST_LAUNCH_SIZE = launch.demo_size()


def start_demo(size: str) -> None:
    _common.job_runner().start(
        _common.DEMO_JOB, generate_demo, str(_common.db_path()), size=size,
        extra_progress=TerminalProgress(heartbeat=launch.HEARTBEAT_S),
        who=_common.current_user().who or "anonymous", via="dashboard",
    )


def building_page() -> None:
    """Progress of the demo build; the app reruns itself when it is done."""
    st.title("Building the demo study")
    st.write(
        "A synthetic study shaped like the cMIL paper's (a training centre and two "
        "external centres) is being generated on this machine. Nothing is downloaded. "
        "This happens once; later launches open at once."
    )

    @st.fragment(run_every=1.0)
    def watch() -> None:
        job = _common.job_runner().get(_common.DEMO_JOB)
        if job is None:
            return
        if job.state == "failed":
            st.error(f"The demo could not be built: {job.error}")
            _common.show_job_log(job)
            if st.button("Try again"):
                start_demo(FIRST_LAUNCH_SIZE)
                st.rerun()
            return
        event = job.progress
        if event is None:
            st.progress(0.0, text="Starting…")
        else:
            st.progress(event.overall, text=event.describe())
        for line in job.finished_stages:
            st.markdown(f"✅ {line}")
        if job.state == "done":
            st.rerun(scope="app")

    watch()


def empty_page() -> None:
    st.title("This store is empty")
    st.write(f"No cohort in `{_common.db_path()}` yet. To fill it:")
    st.markdown(
        "- import a clinical table on the **Cohorts** page (in the menu), or with "
        "`cmil import-cohort --db STORE --cohort NAME --csv clinical.csv "
        "--role train`\n"
        "- or build the synthetic demo study here:"
    )
    st.page_link("pages/cohorts.py", label="Import a cohort", icon="🗂️")
    size = st.radio("Demo size", ["small", "full"], horizontal=True,
                    captions=["about 30 patients, under a minute", "the paper's 359 patients"])
    if st.button("Build the demo study", type="primary", disabled=not _common.can_edit()) and \
            _common.require_editor("demo"):
        start_demo(size)
        st.rerun()


def busy_page() -> None:
    st.title("The store is busy")
    st.warning(st.session_state.get("store_problem", "The store cannot be read right now."))
    st.caption("This page retries every few seconds.")

    @st.fragment(run_every=3.0)
    def retry() -> None:
        if _common.store_state() != "busy":
            st.rerun(scope="app")

    retry()


def _demo_unfinished() -> bool:
    try:
        status = _common.query("demo", demo_status)
    except _common.StoreUnavailable:
        return False
    return status is not None and not status.get("complete")


def main() -> None:
    st.set_page_config(page_title="cMIL dashboard", page_icon="🔬", layout="wide")
    if _common.access_gate():  # sign-in configured and this visitor has no role (yet)
        return
    job = _common.job_runner().get(_common.DEMO_JOB)
    state = _common.store_state()
    if job is not None and job.state in ("running", "failed"):
        # A failed build stays on this page with its reason and a retry button:
        # restarting it by itself would loop on the same failure.
        page = st.Page(building_page, title="Building the demo", icon="⏳")
    elif _common.using_default_store() and (state == "missing" or _demo_unfinished()):
        # First launch, or a launch after a demo build was interrupted: (re)start
        # it; the generator resumes where it stopped.
        start_demo(FIRST_LAUNCH_SIZE)
        page = st.Page(building_page, title="Building the demo", icon="⏳")
    elif state in ("missing", "empty"):
        # An empty store: the way in is importing a cohort, or the demo.
        _common.sidebar_access()
        st.navigation([
            st.Page(empty_page, title="Get started", icon="📥", default=True),
            st.Page("pages/cohorts.py", title="Cohorts", icon="🗂️", url_path="cohorts"),
        ]).run()
        return
    elif state == "busy":
        page = st.Page(busy_page, title="Store busy", icon="⏳")
    else:
        page = None
    if page is not None:
        st.navigation([page], position="hidden").run()
        return
    st.session_state["model_id"] = _common.sidebar()
    _common.sidebar_access()
    sections = {
        "Study": [
            st.Page("pages/overview.py", title="Study overview", icon="🏥", default=True),
            st.Page("pages/cohorts.py", title="Cohorts", icon="🗂️", url_path="cohorts"),
            st.Page("pages/quality.py", title="Quality control", icon="🔬",
                    url_path="quality"),
        ],
        "Results": [
            st.Page("pages/discrimination.py", title="Discrimination", icon="📈",
                    url_path="roc"),
            st.Page("pages/survival.py", title="Survival", icon="📉", url_path="km"),
            st.Page("pages/patients.py", title="Patients", icon="🧑‍⚕️", url_path="patients"),
            st.Page("pages/report.py", title="Report", icon="📄", url_path="report"),
        ],
        "Models": [
            st.Page("pages/models.py", title="Models", icon="🧠", url_path="models"),
        ],
    }
    if _common.can_edit():  # the audit trail names colleagues: editors only
        sections["Admin"] = [
            st.Page("pages/audit.py", title="Audit trail", icon="🧾", url_path="audit"),
        ]
    nav = st.navigation({name: pages for name, pages in sections.items() if pages})
    notice = st.empty()  # at the top of the page: filled once the page has read the store
    try:
        nav.run()
    except _common.StoreUnavailable as exc:
        # A read this page had never made before, while another process writes.
        st.warning(f"The store is busy, this page will retry in a few seconds: {exc}")
        _retry_when_free()
    with notice.container():
        _common.stale_notice()


@st.fragment(run_every=3.0)
def _retry_when_free() -> None:
    if _common.store_state() == "ready":
        st.rerun(scope="app")


# Streamlit runs this file as __main__. The demo's worker processes (spawn)
# import it again as __mp_main__: they must not draw pages, start jobs, or set
# up Streamlit's caches (pages._common), so all of that happens only here.
if __name__ == "__main__":
    from pages import _common

    main()
