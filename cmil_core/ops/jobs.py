"""Long work in a background thread, with its progress readable from anywhere.

The dashboard starts jobs (building the demo; later ingest, training,
scoring) here so that they keep running when the user changes page or
refreshes the browser: the :class:`JobRunner` lives once per process and a
page only reads a job's state. At most one job of a given name runs at once.

>>> runner = JobRunner()
>>> job = runner.start("add", lambda a, b, progress: a + b, 2, 3)
>>> job.wait(5).state, job.result
('done', 5)

A job's ``finished_stages`` lists the stages it has completed, in order, each
as its last progress line: what is ready so far.

Each job logs its start, its end and, when it fails, its traceback (logger
``cmil_core.ops.jobs``). A runner given a log file (``JobRunner(log_file=...)`` or
:meth:`JobRunner.log_to`; the dashboard's is ``<data folder>/logs/cmil.log``,
see :mod:`cmil_core.logs`) writes those records, and everything else
``cmil_core`` logs at INFO and above, to that rotating file; a failed job's
``log_path`` names it, so a page can say where the traceback is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmil_core.errors import InputError
from cmil_core.logs import attach_file_log, detach_file_log
from cmil_core.progress import Progress, ProgressCallback

__all__ = ["Job", "JobRunner", "shared_runner"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """The state of one job; read it from any thread."""

    name: str
    state: str = "running"  # running, done, failed
    progress: Progress | None = None
    finished_stages: list[str] = field(default_factory=list)  # "what is ready so far"
    result: Any = None
    error: str | None = None
    details: str | None = None  # traceback of an unexpected failure, for the logs
    log_path: Path | None = None  # the log file holding its records (None: no log file)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def wait(self, timeout: float | None = None) -> Job:
        self._done.wait(timeout)
        return self


class JobRunner:
    """Runs named jobs in daemon threads and keeps their last state.

    ``log_file``: a rotating log file for the jobs' records (see :meth:`log_to`).
    """

    def __init__(self, log_file: str | os.PathLike[str] | None = None) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.log_file: Path | None = None
        if log_file is not None:
            self.log_to(log_file)

    def log_to(self, log_file: str | os.PathLike[str]) -> Path:
        """Write ``cmil_core``'s records (INFO and above) to the rotating file ``log_file``.

        Idempotent; a runner writes to one file: the one it wrote to before is
        closed. Returns the file's absolute path, which jobs started from now on
        carry as ``log_path``.
        """
        previous = self.log_file
        self.log_file = attach_file_log(log_file)
        if previous is not None and previous != self.log_file:
            detach_file_log(previous)
        return self.log_file

    def get(self, name: str) -> Job | None:
        with self._lock:
            return self._jobs.get(name)

    def forget_finished(self) -> None:
        """Drop the jobs that have ended (done or failed); running ones stay."""
        with self._lock:
            self._jobs = {name: job for name, job in self._jobs.items() if job.running}

    def start(
        self,
        name: str,
        func: Callable[..., Any],
        *args: Any,
        extra_progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> Job:
        """Start ``func(*args, progress=..., **kwargs)`` unless a job ``name`` is running.

        Returns the running job, new or existing. ``extra_progress`` also
        receives every progress event (e.g. a terminal bar).
        """
        with self._lock:
            current = self._jobs.get(name)
            if current is not None and current.running:
                return current
            job = Job(name, log_path=self.log_file)
            self._jobs[name] = job

        def progress(event: Progress) -> None:
            previous = job.progress
            if previous is not None and (previous.index, previous.stage) != (
                event.index, event.stage
            ):
                job.finished_stages.append(previous.describe())
            job.progress = event
            if extra_progress is not None:
                extra_progress(event)

        def run() -> None:
            log.info("job %s started", name)
            try:
                job.result = func(*args, progress=progress, **kwargs)
                if job.progress is not None:
                    job.finished_stages.append(job.progress.describe())
                job.state = "done"
                log.info("job %s done in %.1f s", name, time.time() - job.started_at)
            except InputError as exc:
                job.error = str(exc)
                job.state = "failed"
                log.warning("job %s refused its input: %s", name, exc)
            except Exception as exc:  # reported to the user, traceback logged
                job.error = f"{type(exc).__name__}: {exc}"
                job.details = traceback.format_exc()
                job.log_path = self.log_file  # attached by now, if later than the start
                log.exception("job %s failed: %s", name, job.error)
                job.state = "failed"
            finally:
                job.finished_at = time.time()
                job._done.set()

        threading.Thread(target=run, name=f"cmil-job-{name}", daemon=True).start()
        return job


_SHARED: JobRunner | None = None
_SHARED_LOCK = threading.Lock()


def shared_runner() -> JobRunner:
    """The process-wide runner: the dashboard's pages and its start-up (run.sh) share it."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = JobRunner()
        return _SHARED
