"""A real dashboard server for the browser test, the page benchmark and the screenshots.

``DashboardServer(env, log)`` starts ``streamlit run app.py`` on a free port
(or ``port``) with the given environment (e.g. ``CMIL_DB``) and extra
``streamlit run`` arguments (e.g. ``--secrets.files``), waits for its health endpoint,
and stops it. ``CHROMIUM``/``CHROMIUM_ARGS`` launch Debian's Chromium through
Playwright (``executable_path=CHROMIUM``); Playwright never downloads a browser.
:func:`chromium_browser` does that launch for the tests (``tests/conftest.py``),
the benchmark and the screenshot scripts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# True once Streamlit has been idle for 5 polls in a row: no script running, connected,
# no "Running..." status widget. Use with page.wait_for_function(IDLE_JS, polling=100).
IDLE_JS = """() => {
    const app = document.querySelector("[data-testid='stApp']");
    const busy = !app
        || app.getAttribute('data-test-script-state') === 'running'
        || app.getAttribute('data-test-connection-state') !== 'CONNECTED'
        || [...document.querySelectorAll("[data-testid='stStatusWidget']")]
               .some(e => /Running/i.test(e.innerText));
    window.__cmilIdle = busy ? 0 : (window.__cmilIdle || 0) + 1;
    return window.__cmilIdle >= 5;
}"""


@contextmanager
def chromium_browser() -> Iterator[Any]:
    """Debian's Chromium (a Playwright ``Browser``), closed on leaving the block.

    Playwright's sync API allows one instance per thread: open one of these at a
    time and take every page from it (``browser.new_page(viewport=...)``).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DashboardServer:
    """``streamlit run app.py`` in a subprocess, its output in ``log``."""

    def __init__(
        self, env: dict[str, str], log: Path, *, timeout: float = 90.0,
        port: int | None = None, args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://localhost:{self.port}"
        self.log = log
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
             "--server.headless", "true", "--browser.gatherUsageStats", "false", *args],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._fh, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()  # reaped: no "subprocess is still running" warning later
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
