"""How fast the dashboard's pages open in a real browser, against the lightest page, in one run.

Run: ``.venv/bin/python bench/pages.py [--db /tmp/full/cmil.duckdb] [--rounds 3]``

The product target: on the full demo store (``python -m cmil_core demo --db
PATH --size full``, 359 patients) every page opens within 2 seconds after the
first visit.

The real server (``streamlit run app.py`` with ``CMIL_DB=STORE``) is started on
a free port and driven by Debian's Chromium (``/usr/bin/chromium``) through
Playwright, as tests/test_browser.py does:

* cold: the first visit of every page (the server's caches are empty: imports,
  store reads and figures are done here); the first page is opened by address,
  every other one by a click on its sidebar link; then one patient is opened
  on the Patients page by a click on the first row of the review queue (which
  sets ``?patient=`` through the app);
* warm: ``--rounds`` times, every page again by its sidebar link, in the same
  order, and the same patient again.

A time runs from the click (a capture listener in the page notes
``performance.now()``) to "page ready": the page's heading is shown (the
``h1`` title; for a patient the ``Patient ...`` subheader), Streamlit's
running indicator is gone, no element is stale, every image of the main area
has loaded, and the main area's number of ``stElementContainer`` elements
(and of images) has not changed for ``--quiet`` ms (300). ``ready`` includes
that quiet window (nothing subtracted); ``settled`` is when the final state
was first seen (ready minus the quiet window, at the 10 ms polling grain).

Absolute times on a shared machine mean little: each page's warm median is
also given as a ratio to the warm median of the baseline page (``--baseline``,
Report: a title, some text and two widgets, no store read), measured in the
same rounds. PASS/FAIL is the warm median ``ready`` against ``--target`` (2 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.dashboard_server import CHROMIUM, DashboardServer, chromium_browser  # noqa: E402

DEFAULT_DB = "/tmp/full/cmil.duckdb"

# (sidebar link text = page title, url path) in sidebar order.
PAGES = [
    ("Study overview", ""),
    ("Cohorts", "cohorts"),
    ("Discrimination", "roc"),
    ("Survival", "km"),
    ("Patients", "patients"),
    ("Report", "report"),
    ("Models", "models"),
]
PATIENT = "Patients › open a patient"

# Resolves when the page is ready (see the module docstring); times are relative
# to window.__bench.t0, set by the click listener.
WAIT_READY = """
([selector, prefix, quietMs, timeoutMs]) => new Promise((resolve) => {
  const t0 = window.__bench.t0 ?? performance.now();
  let lastSig = null, lastChange = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    const main = document.querySelector('[data-testid="stMain"]');
    const headingShown = !!main && [...main.querySelectorAll(selector)].some(
      (h) => h.offsetParent !== null && h.innerText.trim().startsWith(prefix));
    const running = !!document.querySelector('[data-testid="stStatusWidgetRunningIcon"]');
    const stale = !!main
      && !!main.querySelector('[data-testid="stElementContainer"][data-stale="true"]');
    const imgs = main ? [...main.querySelectorAll('img')] : [];
    const loading = imgs.some((i) => !i.complete);
    const ok = headingShown && !running && !stale && !loading;
    const sig = main ? main.querySelectorAll('[data-testid="stElementContainer"]').length
                       + ':' + imgs.length : '';
    if (!ok || sig !== lastSig) { lastSig = sig; lastChange = now; }
    if (ok && now - lastChange >= quietMs) {
      clearInterval(timer);
      resolve({ready: (now - t0) / 1000, settled: (lastChange - t0) / 1000, timeout: false});
    } else if (now - t0 > timeoutMs) {
      clearInterval(timer);
      resolve({ready: (now - t0) / 1000, settled: (lastChange - t0) / 1000, timeout: true,
               heading: headingShown, running, stale, loading});
    }
  }, 10);
})
"""

CLICK_LISTENER = """
() => {
  if (window.__bench) return;
  window.__bench = {t0: null};
  document.addEventListener('click', () => {
    if (window.__bench.t0 === null) window.__bench.t0 = performance.now();
  }, {capture: true});
}
"""


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class Driver:
    def __init__(self, page: Any, quiet_ms: int, timeout_s: float) -> None:
        self.page = page
        self.quiet_ms = quiet_ms
        self.timeout_ms = timeout_s * 1000

    def _arm(self) -> None:
        self.page.evaluate(CLICK_LISTENER)
        self.page.evaluate("() => { window.__bench.t0 = null; }")

    def wait(self, selector: str, prefix: str, what: str) -> tuple[float, float]:
        result = self.page.evaluate(WAIT_READY, [selector, prefix, self.quiet_ms, self.timeout_ms])
        if result["timeout"]:
            raise RuntimeError(f"{what}: not ready after {result['ready']:.1f} s ({result})")
        return float(result["ready"]), float(result["settled"])

    def open_first(self, url: str, title: str) -> tuple[float, float]:
        """Open ``url`` by address; timed from just before the navigation."""
        t0 = time.perf_counter()
        self.page.goto(url)
        self.page.evaluate(CLICK_LISTENER)
        self.page.evaluate("(t) => { window.__bench.t0 = performance.now() - t; }",
                           (time.perf_counter() - t0) * 1000)
        return self.wait("h1", title, title)

    def open_page(self, title: str) -> tuple[float, float]:
        link = self.page.locator('[data-testid="stSidebarNavLink"]', has_text=title)
        link.wait_for()
        self._arm()
        link.click()
        return self.wait("h1", title, title)

    def open_patient(self) -> tuple[float, float, str]:
        """Click the first row of the Patients list (its row-selection marker)."""
        frame = self.page.locator('[data-testid="stMain"] [data-testid="stDataFrame"]').first
        frame.wait_for()
        canvas = frame.locator("canvas").first
        canvas.wait_for()
        # Glide data grid: a 35 px header row, then 35 px rows; the row marker column
        # (the selection checkbox) is at the left.
        shown = self.page.locator('[data-testid="stMain"] h3', has_text="Patient ")
        if shown.count():
            raise RuntimeError(f"{PATIENT}: a patient is already shown before the click")
        box = canvas.bounding_box()
        assert box is not None
        self._arm()
        # A real mouse click at those coordinates (the grid's scroller lies over the canvas).
        self.page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)
        ready, settled = self.wait("h3", "Patient ", PATIENT)
        heading = self.page.locator('[data-testid="stMain"] h3', has_text="Patient ").first
        return ready, settled, heading.inner_text().strip()


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default=DEFAULT_DB, help=f"the store (default {DEFAULT_DB})")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds (default 3)")
    parser.add_argument("--target", type=float, default=2.0, help="seconds per warm page (2)")
    parser.add_argument("--baseline", default="Report", choices=[t for t, _ in PAGES],
                        help="the page the others are compared with (default Report)")
    parser.add_argument("--quiet", type=int, default=300,
                        help="ms without change in the main area before a page counts as ready")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per page at most")
    parser.add_argument("--no-patient", action="store_true", help="skip opening a patient")
    parser.add_argument("--screenshots", default=None, help="folder for a screenshot per page")
    args = parser.parse_args(argv)

    db = Path(args.db)
    if not db.is_file():
        print(f"{db} not found: build the full demo store first with\n"
              f"  {sys.executable} -m cmil_core demo --db {db} --size full", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not installed (./test.sh installs it as root)", file=sys.stderr)
        return 2
    print(f"store {db}, {os.cpu_count()} cores, load average {_loadavg()}, "
          f"{args.rounds} warm rounds, quiet window {args.quiet} ms", flush=True)
    names = [t for t, _ in PAGES] + ([] if args.no_patient else [PATIENT])
    cold: dict[str, tuple[float, float]] = {}
    warm: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    patient_name = ""
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t_start = time.perf_counter()
        server = DashboardServer({"CMIL_DB": str(db)}, Path(tmp) / "server.log")
        print(f"server up in {time.perf_counter() - t_start:.1f} s on {server.url}", flush=True)
        try:
            with chromium_browser() as browser:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                drv = Driver(page, args.quiet, args.timeout)

                def visit(title: str, first: bool = False) -> tuple[float, float]:
                    if first:
                        return drv.open_first(server.url, title)
                    return drv.open_page(title)

                for i, (title, _) in enumerate(PAGES):
                    cold[title] = visit(title, first=(i == 0))
                    print(f"cold  {title:<28} {cold[title][0]:6.2f} s", flush=True)
                    if shots:
                        page.screenshot(path=str(shots / f"cold-{i}.png"), full_page=True)
                    if title == "Patients" and not args.no_patient:
                        ready, settled, patient_name = drv.open_patient()
                        cold[PATIENT] = (ready, settled)
                        print(f"cold  {PATIENT:<28} {ready:6.2f} s ({patient_name})", flush=True)
                        if shots:
                            page.screenshot(path=str(shots / "cold-patient.png"), full_page=True)
                for r in range(args.rounds):
                    line = []
                    for title, _ in PAGES:
                        warm[title].append(visit(title))
                        line.append(f"{title.split()[-1]} {warm[title][-1][0]:.2f}")
                        if title == "Patients" and not args.no_patient:
                            ready, settled, _name = drv.open_patient()
                            warm[PATIENT].append((ready, settled))
                            line.append(f"patient {ready:.2f}")
                    print(f"round {r + 1}: " + ", ".join(line), flush=True)
        finally:
            server.stop()
            log = server.log.read_text()
            if "Traceback" in log:
                print("server log has a traceback:\n" + log[-3000:], file=sys.stderr)

    base = statistics.median(v[0] for v in warm[args.baseline])
    width = max(len(n) for n in names) + 2
    header = (f"{'page':<{width}}{'cold s':>8}{'warm median s':>15}{'settled s':>11}"
              f"{'ratio':>8}  target {args.target:g} s")
    print()
    print(header)
    print("-" * len(header))
    failed = []
    for name in names:
        ready = [v[0] for v in warm[name]]
        settled = [v[1] for v in warm[name]]
        med = statistics.median(ready)
        verdict = "PASS" if med <= args.target else "FAIL"
        if verdict == "FAIL":
            failed.append(name)
        mark = "  (baseline)" if name == args.baseline else ""
        print(f"{name:<{width}}{cold[name][0]:>8.2f}{med:>15.2f}{_fmt(settled):>11}"
              f"{med / base:>8.2f}  {verdict}{mark}")
    print("-" * len(header))
    if patient_name:
        print(f"patient opened: {patient_name} (first row of the review queue)")
    print(f"ratio = warm median / warm median of {args.baseline} ({base:.2f} s); "
          f"warm = median of {args.rounds} rounds; times include the {args.quiet} ms quiet window")
    print(f"{len(names) - len(failed)}/{len(names)} pass"
          + (f"; over {args.target:g} s warm: {', '.join(failed)}" if failed else "")
          + f"; load average at the end {_loadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
