"""The dashboard in a real browser: Streamlit server + Debian's Chromium via Playwright.

Marked ``browser`` and ``slow``. Playwright never downloads a browser here: it
drives /usr/bin/chromium (``./test.sh`` installs it as root). Without it the
tests are skipped, except in CI, where they fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmil_core.demo import generate_demo

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing in CI: .ci/run should have installed it")
    pytest.skip(f"{CHROMIUM} not installed (./test.sh installs it as root)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://localhost:{self.port}"
        self.log = log
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py",
             "--server.port", str(self.port), "--server.headless", "true"],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._fh, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"streamlit did not start:\n{log.read_text()}")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._fh.close()


@pytest.fixture(scope="module")
def browser_page() -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def test_overview_of_a_demo_store(tmp_path: Path, browser_page: Page) -> None:
    db = tmp_path / "cmil.duckdb"
    generate_demo(db, size="small", seed=0)
    server = Server({"CMIL_DB": str(db)}, tmp_path / "server.log")
    try:
        page = browser_page
        page.goto(server.url)
        # Generous timeouts: CI machines are shared, and the first page run imports a lot.
        page.get_by_role("heading", name="Study overview").wait_for(timeout=120_000)
        page.get_by_text("external_b · 24 slides").wait_for(timeout=60_000)
        # Streamlit draws in steps: wait for each thing a user would look for.
        for text in ("training · 14 slides", "external_a · 8 slides", "Patients",
                     "Synthetic demo study (small, seed 0)", str(db)):
            page.get_by_text(text, exact=False).first.wait_for(timeout=30_000)
        metric = page.locator("[data-testid='stMetric']", has_text="Patients")
        assert metric.inner_text().split() == ["Patients", "30"]
        body = page.inner_text("body")
        # The thumbnail strips: six per cohort, real images that loaded.
        page.wait_for_function(
            "document.querySelectorAll('img').length >= 18 && "
            "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=90_000,
        )
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
        assert "Traceback" not in body
    finally:
        server.stop()


def test_first_launch_shows_progress_in_page_and_terminal(tmp_path: Path, browser_page: Page) -> None:
    env = {"CMIL_DATA_DIR": str(tmp_path / "data"), "CMIL_DEMO_SIZE": "small", "CMIL_DB": ""}
    server = Server(env, tmp_path / "server.log")
    try:
        page = browser_page
        page.goto(server.url)
        page.get_by_role("heading", name="Building the demo study").wait_for(timeout=60_000)
        page.locator("[data-testid='stProgress']").first.wait_for(timeout=30_000)
        page.get_by_role("heading", name="Study overview").wait_for(timeout=180_000)
        page.get_by_text("external_b · 24 slides").wait_for(timeout=30_000)
        log = server.log.read_text()
        for step in ("[2/5] slides: 46/46", "[3/5] patches: 46/46", "[4/5] training",
                     "[5/5] scoring (scoring external_b)"):
            assert step in log, log[-2000:]
        # The demo's worker processes must not run the app again (app.py's __main__ guard).
        for noise in ("missing ScriptRunContext", "Session state does not", "No runtime found"):
            assert noise not in log, log[-2000:]
        assert (tmp_path / "data" / "cmil.duckdb").exists()
    finally:
        server.stop()
