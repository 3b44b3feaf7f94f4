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
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmil_core.errors import InputError
from cmil_core.progress import Progress, ProgressCallback

__all__ = ["Job", "JobRunner"]


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
    """Runs named jobs in daemon threads and keeps their last state."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Job | None:
        with self._lock:
            return self._jobs.get(name)

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
            job = Job(name)
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
            try:
                job.result = func(*args, progress=progress, **kwargs)
                if job.progress is not None:
                    job.finished_stages.append(job.progress.describe())
                job.state = "done"
            except InputError as exc:
                job.error = str(exc)
                job.state = "failed"
            except Exception as exc:  # noqa: BLE001 - reported to the user, logged in details
                job.error = f"{type(exc).__name__}: {exc}"
                job.details = traceback.format_exc()
                job.state = "failed"
            finally:
                job.finished_at = time.time()
                job._done.set()

        threading.Thread(target=run, name=f"cmil-job-{name}", daemon=True).start()
        return job
