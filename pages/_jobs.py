"""Background jobs on the pages: the process's job runner, each job's progress or failure.

Imports :mod:`pages._text`, :mod:`pages._store_reads` and :mod:`pages._access`
(the log file is shown to editors) of the pages' shared code.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from cmil_core.demo import launch
from cmil_core.logs import job_log_path
from cmil_core.ops.jobs import Job, JobRunner, shared_runner
from pages._access import can_edit
from pages._store_reads import db_path
from pages._text import md

__all__ = ["DEMO_JOB", "job_runner", "show_job_log", "show_jobs"]


DEMO_JOB = launch.DEMO_JOB  # the demo build, started here or by run.sh (cmil_core.demo.launch)


@st.cache_resource
def job_runner() -> JobRunner:
    """One runner per server process: jobs outlive pages and browser refreshes.

    The process-wide runner, which the server's start-up (run.sh: the demo
    build of a first launch, :mod:`cmil_core.demo.launch`) uses too; a job still
    running there (the demo build) shows on the pages. Clearing Streamlit's
    resource cache forgets the jobs that have ended.
    """
    runner = shared_runner()
    runner.forget_finished()
    # The jobs' log (a failed job's traceback): <data folder>/logs/cmil.log.
    runner.log_to(job_log_path(db_path()))
    return runner


def show_job_log(job: Job) -> None:
    """For editors, where a failed job's traceback is: the log file's path."""
    if job.details is None or job.log_path is None or not can_edit():
        return
    st.caption(f"Details (the traceback) are in the log file `{job.log_path}`.")


def show_jobs(
    jobs: list[Job], label: Callable[[Job], str], finished: Callable[[Job], None], seen_key: str
) -> bool:
    """Each job's state: a live progress bar, its failure, or ``finished(job)``.

    Returns True when a job has ended since this session last looked (the
    caller reruns the page so that it shows what the job produced).
    """
    seen: dict[str, object] = st.session_state.setdefault(seen_key, {})
    ended = False
    for job in jobs:
        before = seen.get(job.name)
        seen[job.name] = "running" if job.running else job.finished_at
        ended = ended or (before == "running" and not job.running)
        if job.running:
            event = job.progress
            st.progress(0.0 if event is None else event.overall,
                        text=f"{label(job)}: "
                        + ("starting…" if event is None else md(event.describe())))
            for line in job.finished_stages:
                st.caption(f"✓ {md(line)}")
        elif job.state == "failed":
            st.error(f"{label(job)} failed: {md(job.error)}")
            show_job_log(job)
        else:
            finished(job)
    return ended
