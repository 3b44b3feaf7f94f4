"""The dashboard in a real browser: Streamlit server + Debian's Chromium via Playwright.

Marked ``browser`` and ``slow``. Playwright never downloads a browser here: it
drives /usr/bin/chromium (``./test.sh`` installs it as root). Without it the
tests are skipped, except in CI, where they fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pytest

from cmil_core.demo.generator import generate_demo
from conftest import skip_without_chromium
from scripts.dashboard_server import IDLE_JS, ROOT, DashboardServer as Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

skip_without_chromium()

from playwright.sync_api import Browser, Page  # noqa: E402


@pytest.fixture(scope="module")
def browser(chromium: Browser) -> Browser:
    """The module's Chromium (conftest's ``chromium``)."""
    return chromium


@pytest.fixture(scope="module")
def browser_page(browser: Browser) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield page
    page.close()


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


# --------------------------------------------------------------------------- every page

ARTIFACTS = ROOT / "tests" / "artifacts" / "screenshots"
# Screenshot names of the pages (by sidebar label, which is also the page's h1); a
# page added later is visited too, under a name made from its label.
PAGE_NAMES = {
    "Study overview": "overview", "Cohorts": "cohorts", "Discrimination": "discrimination",
    "Survival": "survival", "Patients": "patients", "Report": "report", "Models": "models",
}
NAV_LABELS = "[data-testid='stSidebarNavLink'] [data-testid='stMarkdownContainer']"


def page_name(title: str) -> str:
    return PAGE_NAMES.get(title) or re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def wait_idle(page: Page, timeout: float = 60_000) -> None:
    """Wait until the script run is over and stays over for half a second.

    Streamlit marks its root with ``data-test-script-state`` (``running`` while a
    script runs) and shows a "Running..." status widget on slow runs.
    """
    page.evaluate("window.__cmilIdle = 0")
    page.wait_for_function(IDLE_JS, polling=100, timeout=timeout)


def wait_drawn(page: Page, timeout: float = 60_000) -> None:
    """Images loaded and every Plotly chart drawn."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)
              && [...document.querySelectorAll("[data-testid='stPlotlyChart']")]
                     .every(c => c.querySelector('.main-svg'))""",
        polling=200, timeout=timeout,
    )


def assert_no_error(page: Page, where: str, log: Path | None = None) -> None:
    """No exception box (the app hides its details: they go to the server's log)."""
    if page.locator("[data-testid='stException']").count():
        details = log.read_text()[-4000:] if log is not None else ""
        raise AssertionError(f"{where} shows an exception; server log:\n{details}")
    body = page.inner_text("body")
    for bad in ("Traceback", "Page not found"):
        assert bad not in body, f"{where}: {bad!r} on the page:\n{body[:3000]}"


def open_page(page: Page, title: str) -> None:
    """Click the page's sidebar link; wait for its title and for the run to end."""
    page.locator("[data-testid='stSidebarNavLink']").filter(
        has=page.get_by_text(title, exact=True)).click()
    page.get_by_role("heading", name=title, exact=True, level=1).wait_for(timeout=60_000)
    wait_idle(page)


def full_screenshot(page: Page, path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main block, not the document."""
    size = page.viewport_size
    assert size is not None
    height = page.evaluate(
        """() => Math.max(document.body.scrollHeight, ...[...document.querySelectorAll(
                 "[data-testid='stMain'], [data-testid='stAppViewContainer']")]
                 .map(e => e.scrollHeight))""")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": size["width"], "height": min(int(height), 12_000)})
    try:
        wait_drawn(page)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)


def test_every_page_in_the_browser(tmp_path: Path, browser_page: Page) -> None:
    db = tmp_path / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    server = Server({"CMIL_DB": str(db)}, tmp_path / "server.log")
    page = browser_page
    try:
        page.goto(server.url)
        page.get_by_role("heading", name="Study overview", level=1).wait_for(timeout=120_000)
        wait_idle(page, timeout=120_000)
        titles = [t.strip() for t in page.locator(NAV_LABELS).all_inner_texts()]
        assert set(PAGE_NAMES) <= set(titles), titles
        # The overview (the default page) last, so that it too is reached by a click.
        titles = [t for t in titles if t != "Study overview"] + ["Study overview"]
        for title in titles:
            name = page_name(title)
            open_page(page, title)
            if name == "patients":
                patient_page(page, server.url)
            elif name == "survival":
                survival_cutoff(page)
            elif name == "discrimination":
                discrimination_downloads(page)
            assert_no_error(page, title, server.log)
            wait_drawn(page)
            full_screenshot(page, ARTIFACTS / f"{name}.png")
            assert_no_error(page, title, server.log)
    finally:
        server.stop()


def patient_page(page: Page, url: str) -> None:
    table = page.locator("[data-testid='stDataFrame']").first
    table.wait_for()
    # The grid is a canvas; its accessible twin (role=row/gridcell) gives the rows' text.
    rows = table.locator("[role='row']")
    rows.nth(2).wait_for(state="attached")
    first = rows.nth(1).locator("[role='gridcell']").all_inner_texts()
    second = rows.nth(2).locator("[role='gridcell']").all_inner_texts()
    # Columns: Review, Cohort, Patient, ...; the header row and data rows are equally tall.
    box = table.bounding_box()
    assert box is not None
    header = rows.nth(0).bounding_box()
    row_h = header["height"] if header and header["height"] > 10 else 35
    page.mouse.click(box["x"] + 15, box["y"] + row_h * 1.5)  # the first row's checkbox
    page.wait_for_url(re.compile(r"[?&]patient="), timeout=30_000)
    wait_idle(page)
    heading = f"Patient {first[2]} · {first[1]}"
    page.get_by_role("heading", name=heading).wait_for(timeout=30_000)
    assert "patient=" + quote(f"{first[1]}/{first[2]}", safe="") in page.url
    page.locator("[data-testid='stMetric']", has_text="cMIL score").wait_for()
    page.locator("[data-testid='stImage']").first.wait_for(timeout=30_000)  # the heatmap
    assert_no_error(page, "Patients (selected)")  # the loop checks again, with the log

    # A shared link opens the patient directly (a fresh load of the page).
    model = parse_qs(urlparse(page.url).query)["model"][0]
    link = f"{url}/patients?patient={quote(second[1] + '/' + second[2])}&model={quote(model)}"
    page.goto(link)
    page.get_by_role("heading", name=f"Patient {second[2]} · {second[1]}").wait_for(timeout=60_000)
    wait_idle(page)
    assert second[2] in page.inner_text("body")
    assert parse_qs(urlparse(page.url).query).get("model") == [model]


def survival_cutoff(page: Page) -> None:
    caption = page.locator("[data-testid='stCaptionContainer']", has_text="Risk groups:").first
    assert "training median" not in caption.inner_text()
    page.get_by_role("combobox", name="Risk-group cutoff, fixed on the training cohort").click()
    page.get_by_role("option", name="training median").click()
    wait_idle(page)
    page.locator("[data-testid='stCaptionContainer']", has_text="training median").first.wait_for(
        timeout=30_000)
    assert "training median" in caption.inner_text()


def discrimination_downloads(page: Page) -> None:
    for label, check in (
        ("PNG", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 1000),
        ("SVG", lambda b: b"<svg" in b and b"AUC" in b and b.lstrip().startswith(b"<?xml")),
    ):
        button = page.locator("[data-testid='stDownloadButton']", has_text=label).first
        with page.expect_download(timeout=60_000) as info:
            button.locator("button, a").first.click()
        download = info.value
        data = Path(download.path()).read_bytes()
        assert check(data), f"{label} download {download.suggested_filename}: {data[:200]!r}"
        assert download.suggested_filename.endswith("." + label.lower())
    wait_idle(page)


def test_eight_sessions_keep_reading_while_a_command_line_job_writes(
    tmp_path: Path, browser: Browser
) -> None:
    """Issue 7's concurrency scheme, for real: 8 browser sessions on one server read
    every page while `train` then `score` run in another process on the same store.

    The scheme: the dashboard opens the store only for the moment of each read;
    the command-line job holds it only for its short transactions (never while
    the CNN or the aggregator runs); a read that meets a write in progress gets
    the last finished result of the same query, with a notice. No session may
    show an exception, a "database is locked" message or the busy page; once
    the job is done, a session sees the new model.
    """
    import subprocess
    import sys
    import threading

    from cmil_core import store

    db = tmp_path / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    with store.open_store(db, read_only=True) as st:
        before = set(store.list_models(st)["model_id"])
    server = Server({"CMIL_DB": str(db)}, tmp_path / "server.log")
    titles = ["Study overview", "Discrimination", "Survival", "Patients", "Models"]
    log = tmp_path / "writer.log"
    writer_rc: list[int] = []

    def write() -> None:
        # train prints the new model id last; then score every cohort with it.
        with open(log, "w") as out:
            train = subprocess.run(
                [sys.executable, "-m", "cmil_core", "train", "--db", str(db), "--cohort",
                 "training", "--aggregator", "histogram", "--folds", "3", "--seed", "4"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=out, text=True, check=False)
            writer_rc.append(train.returncode)
            if train.returncode == 0:
                model = train.stdout.strip().splitlines()[-1]
                writer_rc.append(subprocess.run(
                    [sys.executable, "-m", "cmil_core", "score", "--db", str(db), "--model", model],
                    cwd=ROOT, stdout=out, stderr=out, check=False).returncode)

    try:
        contexts = [browser.new_context(viewport={"width": 1200, "height": 900}) for _ in range(8)]
        pages = [context.new_page() for context in contexts]
        for page in pages:  # every session open, every page read once: caches warm
            page.goto(server.url)
            page.get_by_role("heading", name="Study overview", level=1).wait_for(timeout=120_000)
            wait_idle(page, timeout=120_000)
        for title in titles[1:]:
            open_page(pages[0], title)
        writer = threading.Thread(target=write)
        writer.start()
        visits = 0
        while writer.is_alive() or visits < 16:
            for k, page in enumerate(pages):
                title = titles[(visits + k) % len(titles)]
                open_page(page, title)
                assert_no_error(page, f"session {k}, {title}", server.log)
                body = page.inner_text("body")
                assert "database is locked" not in body.lower(), body[:2000]
                assert "The store is busy" not in body, f"session {k}, {title}"
                visits += 1
        writer.join()
        assert writer_rc == [0, 0], log.read_text()[-3000:]
        with store.open_store(db, read_only=True) as st:
            (new,) = set(store.list_models(st)["model_id"]) - before
            scored = store.patient_scores_frame(st, new)
        assert len(scored) == 30  # every patient of the small demo
        for context in contexts:
            context.close()
        # A session opened now sees the finished result.
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.goto(f"{server.url}/models")
        page.get_by_role("heading", name="Models", level=1).wait_for(timeout=120_000)
        wait_idle(page, timeout=120_000)
        assert new in page.inner_text("body")
        context.close()
    finally:
        server.stop()
    writer_log = log.read_text()
    assert "Traceback" not in writer_log and "locked" not in writer_log.lower(), writer_log
    assert visits >= 16


def test_quality_control_page_counts_apply_and_stale_marks(tmp_path: Path,
                                                          browser_page: Page) -> None:
    """Move a threshold slider, see the live counts change, apply, see the stale marks."""
    from cmil_core import store
    from cmil_core.analysis import display
    from qc_helpers import BLUR_THRESHOLD, photo_study

    db, model_id = photo_study(tmp_path / "study")
    server = Server({"CMIL_DB": str(db)}, tmp_path / "server.log")
    page = browser_page
    try:
        page.goto(server.url)
        page.get_by_role("heading", name="Study overview", level=1).wait_for(timeout=120_000)
        wait_idle(page, timeout=120_000)
        open_page(page, "Quality control")
        kept = page.locator("[data-testid='stMetric']", has_text="Kept").locator(
            "[data-testid='stMetricValue']")
        before = int(kept.inner_text().replace(",", ""))
        with store.open_store(db, read_only=True) as st_:
            assert before == store.current_qc_decisions(st_)["A"]["kept"]
        slider = page.locator("[data-testid='stSlider']",
                              has_text=display.threshold(BLUR_THRESHOLD)).locator(
                                  "input[type='range']")
        slider.focus()
        slider.press("End")  # the strictest blur threshold the slider offers
        page.wait_for_function(
            """([before]) => {
                 const m = [...document.querySelectorAll("[data-testid='stMetric']")]
                   .find(e => e.innerText.startsWith('Kept'));
                 const v = m && m.querySelector("[data-testid='stMetricValue']");
                 return v && parseInt(v.innerText.replace(/,/g, '')) < before;
               }""", arg=[before], timeout=60_000)
        wait_idle(page)
        after = int(kept.inner_text().replace(",", ""))
        assert after < before
        blurred = page.locator("[data-testid='stMetric']", has_text="Rejected: blurred")
        assert blurred.locator("[data-testid='stMetricDelta']").count() == 1  # a change shown
        assert_no_error(page, "Quality control", server.log)
        page.get_by_role("button", name="Apply these thresholds").click()
        page.get_by_text("Recorded QC decision").wait_for(timeout=60_000)
        page.get_by_text("were built on an older QC decision").wait_for(timeout=60_000)
        wait_idle(page)
        body = page.inner_text("body")
        assert ("1 model(s) and the scores of 1 model-cohort pair(s) were built on an older "
                "QC decision") in body  # the table below it is drawn on a canvas
        wait_drawn(page)  # the galleries' patches, read from the slides
        assert page.locator("[data-testid='stImage'] img").count() >= 2
        full_screenshot(page, ARTIFACTS / "quality_applied.png")
        assert_no_error(page, "Quality control", server.log)
        # The Models page and the model picker say so too.
        open_page(page, "Models")
        page.get_by_text("Stale: a model marked stale was trained on an older").wait_for(
            timeout=60_000)
        picker = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").first
        shown = " ".join(picker.locator("input").evaluate_all("els => els.map(e => e.value)"))
        assert "attention, " in shown + picker.inner_text() and "· stale" in shown
        sidebar = page.locator("[data-testid='stSidebar']").inner_text()
        assert f"{model_id} · attention · A · stale" in sidebar  # the whole label, under it
        assert_no_error(page, "Models", server.log)
        with store.open_store(db, read_only=True) as st_:
            decision = store.current_qc_decisions(st_)["A"]
        assert decision["source"] == "dashboard" and decision["kept"] == after
    finally:
        server.stop()
