"""cmil_core.ops.jobs: background jobs whose state any page can read."""

from __future__ import annotations

import threading
import time

from cmil_core.errors import InputError
from cmil_core.ops.jobs import JobRunner
from cmil_core.progress import Progress


def _staged(gate: threading.Event, progress) -> str:  # type: ignore[no-untyped-def]
    progress(Progress("one", 1, 2, 0, 2))
    progress(Progress("one", 1, 2, 2, 2))
    progress(Progress("two", 2, 2, 1, 3))
    gate.wait(5)
    progress(Progress("two", 2, 2, 3, 3))
    return "result"


def test_job_reports_progress_and_what_is_ready() -> None:
    runner = JobRunner()
    gate = threading.Event()
    job = runner.start("staged", _staged, gate)
    assert runner.start("staged", _staged, gate) is job  # one job of a name at a time
    deadline = time.monotonic() + 5
    while (job.progress is None or job.progress.stage != "two") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.running and job.finished_stages == ["[1/2] one: 2/2"]
    gate.set()
    job.wait(5)
    assert job.state == "done" and job.result == "result"
    assert job.finished_stages == ["[1/2] one: 2/2", "[2/2] two: 3/3"]
    assert runner.start("staged", _staged, gate) is not job  # a finished job can run again


def test_failures_are_kept_with_their_reason() -> None:
    runner = JobRunner()

    def bad_input(progress):  # type: ignore[no-untyped-def]
        raise InputError("clinical.csv: row 3, column 'os_months': '-1' is negative")

    def bug(progress):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    a = runner.start("a", bad_input).wait(5)
    b = runner.start("b", bug).wait(5)
    assert a.state == "failed" and a.error.startswith("clinical.csv: row 3") and a.details is None
    assert b.state == "failed" and b.error == "RuntimeError: boom" and "Traceback" in b.details
