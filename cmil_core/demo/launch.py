"""First launch: build the demo study as the dashboard's server starts, without a browser.

``./run.sh`` runs :mod:`scripts.serve`, which calls :func:`start_first_launch`
in the server's own process before Streamlit starts serving: the build runs in
the process-wide :func:`cmil_core.ops.jobs.shared_runner`, the same runner the
pages read, so a page opened at any time shows the build's progress, and the
terminal (or log) shows it too:

- on a terminal, a bar per stage;
- not on a terminal (a pipe, a log file), a line at the end of each stage,
  once, and a line at least every ``heartbeat`` seconds in between;
- at the end, ``demo ready: N patients scored`` (or why it failed).

Nothing here imports Streamlit.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from cmil_core import store as store_mod
from cmil_core.demo.generator import SIZES, DemoSummary, demo_status, generate_demo
from cmil_core.logs import job_log_path
from cmil_core.ops.jobs import Job, JobRunner, shared_runner
from cmil_core.progress import TerminalProgress

__all__ = ["DEMO_JOB", "HEARTBEAT_S", "demo_size", "needs_demo", "start_first_launch"]

#: The job name of the demo build in the runner (the dashboard reads it under this name).
DEMO_JOB = "demo"
#: Not on a terminal, at most this many seconds between two progress lines.
HEARTBEAT_S = 5.0


def demo_size() -> str:
    """``$CMIL_DEMO_SIZE`` (``small`` or ``full``), default ``full``."""
    return os.environ.get("CMIL_DEMO_SIZE", "").strip() or "full"


def using_default_store() -> bool:
    """True when ``$CMIL_DB`` is not set: only the default store gets the demo by itself."""
    return not os.environ.get("CMIL_DB", "").strip()


def needs_demo(db: str | os.PathLike[str] | None = None) -> bool:
    """Whether a first launch should (re)build the demo in ``db`` (default: the default store).

    True when the store file is missing, or holds a demo build that did not
    finish (the generator resumes it). A store someone filled otherwise, or
    one that cannot be read now, is left alone.
    """
    path = Path(db) if db is not None else store_mod.default_db_path()
    if not path.exists():
        return True
    try:
        with store_mod.open_store(path, read_only=True, timeout=3.0) as store:
            status = demo_status(store)
    except store_mod.StoreError:
        return False
    return status is not None and not status.get("complete")


def ready_line(summary: DemoSummary) -> str:
    """The last line of a first launch."""
    return (f"demo ready: {summary.patients_scored:,} patients scored "
            f"({summary.size} demo in {summary.db})")


def start_first_launch(
    *,
    runner: JobRunner | None = None,
    db: str | os.PathLike[str] | None = None,
    size: str | None = None,
    stream: TextIO | None = None,
    heartbeat: float = HEARTBEAT_S,
    who: str | None = None,
    force: bool = False,
) -> Job | None:
    """Start the demo build in the background when the store needs it; None when it does not.

    ``runner`` defaults to the process-wide runner (the one the dashboard's
    pages read); ``stream`` (default stderr) gets the progress and the final
    line. Returns the running job (already running ones are reused).
    """
    path = Path(db) if db is not None else store_mod.default_db_path()
    if not force and not needs_demo(path):
        return None
    size = size or demo_size()
    if size not in SIZES:
        raise ValueError(f"CMIL_DEMO_SIZE={size!r} is not one of {', '.join(SIZES)}")
    out = stream if stream is not None else sys.stderr
    printer = TerminalProgress(out, heartbeat=heartbeat)
    runner = runner if runner is not None else shared_runner()
    running = runner.get(DEMO_JOB)
    if running is not None and running.running:
        return running
    path.parent.mkdir(parents=True, exist_ok=True)
    if runner is shared_runner():  # the dashboard's jobs log to <data folder>/logs/cmil.log
        runner.log_to(job_log_path(path))
    out.write(f"Building the {size} demo study in {path} (once; later launches open at once)\n")
    out.flush()
    job = runner.start(DEMO_JOB, generate_demo, str(path), size=size, extra_progress=printer,
                       who=who, via="run.sh")

    def watch() -> None:
        while job.wait(1.0).running:
            printer.tick()
        if job.state == "done":
            out.write(ready_line(job.result) + "\n")
        else:
            out.write(f"demo build failed: {job.error}\n")
        out.flush()

    threading.Thread(target=watch, name="cmil-demo-watch", daemon=True).start()
    return job
