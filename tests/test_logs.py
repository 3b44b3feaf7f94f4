"""Logging: the dashboard jobs' rotating log file, and the command line's -v and -q.

A failed job's traceback must reach ``<data folder>/logs/cmil.log`` and the
page must tell editors where it is; ``-q`` silences the progress bar and
``-v`` shows ``cmil_core``'s debug log (each slide of an ingest).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from cmil_core import logs
from cmil_core.cli import main
from cmil_core.errors import InputError
from cmil_core.ops.jobs import JobRunner
from conftest import plain_text, run_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """The dashboard's log file for a store in tmp_path; detached afterwards."""
    path = logs.job_log_path(tmp_path / "data" / "cmil.duckdb")
    yield path
    logs.detach_file_log(path)


def _boom(progress: Any) -> None:
    raise RuntimeError("the disk is on fire")


def _file_handlers() -> list[logging.Handler]:
    return [h for h in logs.package_logger().handlers if isinstance(h, RotatingFileHandler)]


def test_job_log_path_is_under_the_data_folder(tmp_path: Path) -> None:
    assert logs.job_log_path(tmp_path / "data" / "cmil.duckdb") == (
        tmp_path / "data" / "logs" / "cmil.log").resolve()


def test_a_failed_job_writes_its_traceback_to_the_log_file(log_file: Path) -> None:
    runner = JobRunner(log_file=log_file)
    job = runner.start("train", _boom).wait(30)
    assert (job.state, job.error) == ("failed", "RuntimeError: the disk is on fire")
    assert job.log_path == log_file
    text = log_file.read_text(encoding="utf-8")
    assert "job train started" in text
    assert "ERROR" in text and "job train failed: RuntimeError: the disk is on fire" in text
    # The traceback itself, down to the line that raised.
    assert "Traceback (most recent call last):" in text
    assert 'raise RuntimeError("the disk is on fire")' in text


def test_a_finished_job_and_a_refused_one_are_logged_too(log_file: Path) -> None:
    runner = JobRunner(log_file=log_file)
    assert runner.start("add", lambda a, b, progress: a + b, 2, 3).wait(30).result == 5

    def refuse(progress: Any) -> None:
        raise InputError("clinical.csv: row 3, column 'os_months': '-3' is negative")

    refused = runner.start("import", refuse).wait(30)
    text = log_file.read_text(encoding="utf-8")
    assert "job add started" in text and "job add done in" in text
    # An input error is the user's to fix: logged as a warning, without a traceback.
    assert "WARNING" in text and "job import refused its input: clinical.csv: row 3" in text
    assert "Traceback" not in text
    assert refused.details is None


def test_attaching_the_same_log_twice_keeps_one_handler(log_file: Path) -> None:
    before = len(_file_handlers())
    JobRunner(log_file=log_file)
    JobRunner().log_to(log_file)
    assert len(_file_handlers()) == before + 1
    logs.detach_file_log(log_file)
    assert len(_file_handlers()) == before


def test_a_runner_writes_to_one_log_file(tmp_path: Path, log_file: Path) -> None:
    before = len(_file_handlers())
    runner = JobRunner(log_file=tmp_path / "old" / "logs" / "cmil.log")
    assert runner.log_to(log_file) == log_file
    assert len(_file_handlers()) == before + 1  # the old file is closed
    # Attaching writes nothing: a page that only reads leaves the data folder alone.
    assert not log_file.parent.exists()
    runner.start("add", lambda a, b, progress: a + b, 1, 2).wait(30)
    assert "job add done" in log_file.read_text(encoding="utf-8")
    # A log folder deleted while the dashboard runs is made again.
    shutil.rmtree(log_file.parent)
    runner.start("add", lambda a, b, progress: a + b, 1, 2).wait(30)
    assert "job add done" in log_file.read_text(encoding="utf-8")


def test_without_a_log_file_a_job_names_none(tmp_path: Path) -> None:
    job = JobRunner().start("train", _boom).wait(30)
    assert job.state == "failed" and job.details and job.log_path is None


def _failed_job_page(root: str, log_file: str) -> None:
    """A page showing a failed background job, as the Models and Cohorts pages do."""
    import sys

    sys.path.insert(0, root)
    from cmil_core.ops.jobs import JobRunner
    from pages import _common

    def boom(progress: object) -> None:
        raise RuntimeError("the disk is on fire")

    job = JobRunner(log_file=log_file).start("train", boom).wait(30)
    _common.show_jobs([job], lambda j: "Training", lambda j: None, "seen_jobs")


SECRETS: dict[str, Any] = {
    "auth": {
        "redirect_uri": "http://localhost:8501/oauth2callback",
        "cookie_secret": "not-a-real-secret-used-only-in-tests",
        "client_id": "cmil-test", "client_secret": "not-a-real-secret",
        "server_metadata_url": "https://idp.example.org/.well-known/openid-configuration",
    },
    "cmil": {"roles": {"editors": ["ed@hospital.org"], "viewers": ["vi@partner.edu"]}},
}


@pytest.mark.parametrize(("email", "shown"), [(None, True), ("ed@hospital.org", True),
                                              ("vi@partner.edu", False)])
def test_the_page_shows_editors_where_the_traceback_is(
        log_file: Path, email: str | None, shown: bool) -> None:
    at = AppTest.from_function(_failed_job_page, args=(str(ROOT), str(log_file)),
                               default_timeout=60)
    if email is not None:  # None: no sign-in configured, the local user is an editor
        at.secrets = json.loads(json.dumps(SECRETS))
        at.user = {"is_logged_in": True, "email": email, "email_verified": True}
    run_app(at)
    assert [plain_text(e.value) for e in at.error] == [
        "Training failed: RuntimeError: the disk is on fire"]
    captions = [c.value for c in at.caption]
    if shown:
        assert captions == [f"Details (the traceback) are in the log file `{log_file}`."]
    else:
        assert captions == []
    assert "Traceback (most recent call last):" in log_file.read_text(encoding="utf-8")


def test_a_failed_demo_build_shows_where_its_traceback_is(
        tmp_path: Path, log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-launch page: the dashboard's runner logs to the store's data folder."""
    import streamlit as st

    from pages import _common

    monkeypatch.delenv("CMIL_DB", raising=False)
    monkeypatch.setenv("CMIL_DATA_DIR", str(tmp_path / "data"))
    st.cache_resource.clear()
    try:
        job = _common.job_runner().start(_common.DEMO_JOB, _boom).wait(30)
        assert job.log_path == log_file
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        run_app(at)
        assert [plain_text(e.value) for e in at.error] == [
            "The demo could not be built: RuntimeError: the disk is on fire"]
        assert [c.value for c in at.caption] == [
            f"Details (the traceback) are in the log file `{log_file}`."]
        assert "job demo failed" in log_file.read_text(encoding="utf-8")
    finally:
        _common.job_runner().forget_finished()
        st.cache_resource.clear()


# --------------------------------------------------------------------------- -v and -q


@pytest.fixture
def photo_slides(tmp_path: Path) -> tuple[Path, Path]:
    """A store with a cohort of two patients and a folder of their photographs."""
    from qc_helpers import photo_cohort

    db = tmp_path / "store" / "cmil.duckdb"
    db.parent.mkdir(parents=True)
    return db, photo_cohort(db, tmp_path, "C", 2, seed=3)


def _ingest(capsys: pytest.CaptureFixture[str], db: Path, slides: Path,
            *flags: str) -> tuple[int, str, str]:
    code = main([*flags, "ingest", "--db", str(db), "--cohort", "C", "--slides", str(slides),
                 "--mpp", "0.5"])
    out, err = capsys.readouterr()
    return code, out, err


def test_progress_is_shown_by_default_and_quiet_silences_it(
        photo_slides: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    db, slides = photo_slides
    code, out, err = _ingest(capsys, db, slides)
    assert code == 0 and "cohort 'C' (run 1): 2 slides: 2 tiled" in out
    # Not a terminal: one progress line when the stage ends; no log lines.
    assert err.startswith("[1/1] slides of C: 2/2 done (")
    assert "INFO" not in err and "DEBUG" not in err
    for flags in (["-q"], ["--quiet"]):
        code, out, err = _ingest(capsys, db, slides, *flags)
        assert code == 0 and "2 slides: 2 skipped" in out  # the results still print
        assert err == ""


def test_quiet_goes_before_or_after_the_command(
        photo_slides: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    db, slides = photo_slides
    code = main(["ingest", "--db", str(db), "--cohort", "C", "--slides", str(slides),
                 "--mpp", "0.5", "-q"])
    out, err = capsys.readouterr()
    assert code == 0 and "2 tiled" in out and err == ""


def test_verbose_shows_the_debug_log(
        photo_slides: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    db, slides = photo_slides
    code, out, err = _ingest(capsys, db, slides, "-v")
    assert code == 0 and "2 tiled" in out
    lines = err.splitlines()
    assert "DEBUG cmil_core.cli: python -m cmil_core" in lines[0] and lines[0].endswith(": ingest")
    assert any(line.startswith("INFO cmil_core.ingest.pipeline: ingest run 1 of cohort C: 2 slides")
               for line in lines)
    slide_lines = [line for line in lines if line.startswith("INFO cmil_core.ingest.pipeline: slide ")]
    assert [line.split(": slide ")[1].split(" (")[0] for line in slide_lines] == [
        "1/2 C00_field.png", "2/2 C01_field.png"]
    assert all("tiled" in line for line in slide_lines)
    assert "DEBUG cmil_core.cli: ingest finished with exit status 0" in lines


def test_verbose_and_quiet_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["-v", "-q", "check"])
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_command_line_leaves_logging_as_it_found_it(
        photo_slides: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    logger = logs.package_logger()
    before = (logger.level, logger.propagate, list(logger.handlers))
    db, slides = photo_slides
    _ingest(capsys, db, slides, "-v")
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
