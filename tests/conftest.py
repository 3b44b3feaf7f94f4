"""Shared test fixtures: paths to the real files in tests/data and temporary stores."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# Real slides and photographs nobody here wrote (sources and licences in SOURCES.md).
FIXTURES = DATA / "fixtures"
# Reference values of R survival, pROC and lifelines, with the aSAH data.
REFERENCE = DATA / "reference"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A path for a fresh results store."""
    return tmp_path / "store" / "cmil.duckdb"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.fail(f"test fixtures not found at {FIXTURES}")
    return FIXTURES


def is_plain_json(value: Any) -> bool:
    """Only JSON's own types: dict, list, str, int, float (finite), bool, None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_plain_json(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or type(value) in (str, int, bool)


def plotly_values(value: Any) -> list[Any]:
    """A plotly array as a list: plotly 7 sends numeric arrays as base64 typed arrays."""
    import base64

    import numpy as np

    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return array.reshape(value["shape"]).tolist() if "shape" in value else array.tolist()
    return list(value)


def run_app(at: Any, timeout: float = 120) -> Any:
    """Run a Streamlit AppTest and fail on any exception the page shows.

    The server hides error details from users (config.toml); tests want them.
    """
    from streamlit import config as streamlit_config

    streamlit_config.set_option("client.showErrorDetails", "full")
    at.run(timeout=timeout)
    assert not at.exception, [e.value for e in at.exception]
    return at


def plain_text(markdown: str) -> str:
    """A message as the user reads it: the pages escape user strings for markdown."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)


def job_runner() -> Any:
    """The dashboard's process-wide job runner (what the pages start jobs in)."""
    from pages import _common

    return _common.job_runner()


def rerun_until(at: Any, done: Any, seconds: float = 120, describe: Any = None) -> Any:
    """Rerun the page (as its one-second fragment would) until ``done(at)``."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        run_app(at)
        if done(at):
            return at
        if time.monotonic() > deadline:
            what = describe(at) if describe else [m.value for m in at.markdown]
            raise AssertionError(f"never done; page says {what}")
        time.sleep(0.3)


# --- a small scored demo and a dashboard server on it, once per test session ---------
# For browser tests that only read (layout checks): build nothing twice. Tests that
# write to the store make their own.


@pytest.fixture(scope="session")
def small_demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo study (seed 0), built once per session; treat it as read-only."""
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("small-demo") / "cmil.duckdb"
    generate_demo(db, size="small", seed=0, workers=1)
    return db


@pytest.fixture(scope="session")
def demo_dashboard(small_demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Streamlit server (``.url``, ``.log``) on :func:`small_demo_store`, once per session."""
    from scripts.dashboard_server import DashboardServer

    server = DashboardServer({"CMIL_DB": str(small_demo_store)},
                             tmp_path_factory.mktemp("demo-dashboard") / "server.log")
    yield server
    server.stop()


# --- Debian's Chromium for the browser tests ------------------------------------------


def skip_without_chromium() -> None:
    """Skip the calling browser-test module (at import) when /usr/bin/chromium is
    missing; in CI, fail instead."""
    from scripts.dashboard_server import CHROMIUM

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"{CHROMIUM} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{CHROMIUM} not installed (./test.sh installs it as root)",
                    allow_module_level=True)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Chromium (a Playwright ``Browser``), one per test module; take pages from it.

    Module scope: Playwright's sync API allows one instance per thread, and each
    module's instance is closed before the next module (or a non-browser test) runs.
    """
    from scripts.dashboard_server import chromium_browser

    with chromium_browser() as browser:
        yield browser
