"""First launch: run.sh builds the demo as the server starts, without a browser (issue 18).

Fast tests drive :func:`cmil_core.demo.launch.start_first_launch` and
:class:`cmil_core.progress.TerminalProgress` with a fake build and a fake
clock; one slow test runs ``./run.sh`` itself on the small demo, its output
going to a file (not a terminal), and never opens a browser.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cmil_core import progress as progress_mod, store
from cmil_core.demo import launch
from cmil_core.demo.generator import DemoSummary
from cmil_core.ops.jobs import JobRunner
from cmil_core.progress import Progress, TerminalProgress

ROOT = Path(__file__).resolve().parents[1]


def _cv_events() -> list[Progress]:
    """What training reports: the last fold's last epoch ends the stage, then "done" again."""
    return [
        Progress("training (cross-validation)", 4, 5, 100, 400, "fold 1/4: epoch 40/40"),
        Progress("training (cross-validation)", 4, 5, 400, 400, "fold 4/4: epoch 40/40"),
        Progress("training (cross-validation)", 4, 5, 400, 400, "done"),
        Progress("training (training)", 4, 5, 40, 40, "done"),
    ]


def test_each_stage_end_is_written_once_when_not_a_terminal() -> None:
    out = io.StringIO()
    printer = TerminalProgress(out)
    for event in _cv_events():
        printer(event)
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" (", 1)[0] for line in lines] == [
        "[4/5] training (cross-validation): 400/400 fold 4/4: epoch 40/40",
        "[4/5] training (training): 40/40 done",
    ]


def test_a_line_at_least_every_heartbeat_while_a_stage_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    printer = TerminalProgress(out, heartbeat=5.0)
    printer(Progress("slides", 2, 5, 0, 46))
    assert out.getvalue() == ""
    clock[0] += 4.0
    printer.tick()
    assert out.getvalue() == ""  # not yet: under 5 s since the last line
    clock[0] += 1.5
    printer.tick()  # no new event, but 5.5 s passed: the job is alive, say so
    assert out.getvalue().splitlines() == ["[2/5] slides: 0/46 (5 s)"]
    clock[0] += 6.0
    printer(Progress("slides", 2, 5, 3, 46, "T003_slide1.tiff"))
    assert out.getvalue().splitlines()[-1] == "[2/5] slides: 3/46 T003_slide1.tiff (11 s)"
    clock[0] += 1.0
    printer(Progress("slides", 2, 5, 46, 46, "fov03.jpg"))
    clock[0] += 30.0
    printer.tick()  # the stage has ended: nothing more until the next one starts
    assert out.getvalue().splitlines()[-1] == "[2/5] slides: 46/46 fov03.jpg (12.5 s)"
    assert len(out.getvalue().splitlines()) == 3


def test_needs_demo(db_path: Path) -> None:
    assert launch.needs_demo(db_path)  # no store yet: a first launch
    with store.open_store(db_path) as st:
        store.set_meta(st, "demo", json.dumps({"size": "small", "seed": 0, "complete": False}))
    assert launch.needs_demo(db_path)  # an interrupted build: resume it
    with store.open_store(db_path) as st:
        store.set_meta(st, "demo", json.dumps({"size": "small", "seed": 0, "complete": True}))
    assert not launch.needs_demo(db_path)
    other = db_path.parent / "mine.duckdb"
    store.open_store(other).close()  # a store someone fills by hand: left alone
    assert not launch.needs_demo(other)


def test_first_launch_starts_the_build_and_ends_with_demo_ready(
    db_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, object]] = []

    def fake_build(db: str, *, size: str, progress: object, who: object, via: str) -> DemoSummary:
        calls.append({"db": db, "size": size, "via": via})
        for event in _cv_events():
            progress(event)  # type: ignore[operator]
        return DemoSummary(db, "demo", size, 0, {"training": 14}, 46, 46, 0, 10,
                           patients_scored=30)

    monkeypatch.setattr(launch, "generate_demo", fake_build)
    out = io.StringIO()
    runner = JobRunner()
    job = launch.start_first_launch(runner=runner, db=db_path, size="small", stream=out)
    assert job is not None and runner.get(launch.DEMO_JOB) is job  # the pages read this job
    deadline = time.monotonic() + 30
    while "demo ready" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = out.getvalue().splitlines()
    assert calls == [{"db": str(db_path), "size": "small", "via": "run.sh"}]
    assert lines[0].startswith("Building the small demo study in ")
    assert sum("training (cross-validation): 400/400" in line for line in lines) == 1
    assert lines[-1] == f"demo ready: 30 patients scored (small demo in {db_path})"
    with pytest.raises(ValueError, match="CMIL_DEMO_SIZE='huge'"):
        launch.start_first_launch(runner=runner, db=db_path.parent / "x.duckdb", size="huge")


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while True:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never came; run.sh wrote:\n{content[-4000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_run_sh_builds_the_demo_without_a_browser(tmp_path: Path) -> None:
    from scripts.dashboard_server import free_port

    port = free_port()
    log = tmp_path / "run.log"
    env = {**os.environ, "CMIL_DATA_DIR": str(tmp_path / "data"), "CMIL_DB": "",
           "CMIL_DEMO_SIZE": "small", "CMIL_SKIP_INSTALL": "1"}
    with open(log, "wb") as fh:  # a file, not a terminal: lines, not bars
        proc = subprocess.Popen(["./run.sh", "--server.port", str(port)], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = _wait_for(log, "demo ready:", proc, 600)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert f"The dashboard is at http://localhost:{port} " in text  # the real port
    assert "localhost:8501" not in text
    for stage in ("[1/5] clinical tables: 3/3", "[2/5] slides: 46/46", "[3/5] patches: 46/46",
                  "[4/5] training (cross-validation): 400/400",
                  "[5/5] scoring (scoring external_b): 24/24"):
        assert text.count(stage) == 1, (stage, text[-3000:])
    assert "demo ready: 30 patients scored" in text
    db = tmp_path / "data" / "cmil.duckdb"
    with store.open_store(db, read_only=True) as st:
        audit = store.audit_frame(st)
    assert audit["action"].tolist() == ["demo"]
    details = json.loads(audit["details"].iloc[0])
    assert details["via"] == "run.sh" and details["patients_scored"] == 30
