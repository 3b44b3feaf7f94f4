"""The deep-zoom slide viewer in a real browser: zoom, overlays, a click that shows Grad-CAM,
and a pathologist's way from the review queue to a tumour cell and on to QuPath.

Marked ``browser`` and ``slow`` (the session's small demo store, read only, and
a Streamlit server per test); skipped without Debian's Chromium, except in CI.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import geojson
import pytest

from cmil_core import store
from cmil_core.viewer.patients import attention_patches, patient_list
from conftest import skip_without_chromium
from scripts.dashboard_server import IDLE_JS, DashboardServer as Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

skip_without_chromium()

from playwright.sync_api import (  # noqa: E402
    Browser,
    Error as PlaywrightError,
    Frame,
    Page,
)


@pytest.fixture(scope="module")
def page(chromium: Browser) -> Iterator[Page]:
    tab = chromium.new_page(viewport={"width": 1400, "height": 1100})
    yield tab
    tab.close()


def viewer_frame(page: Page) -> Frame:
    """The viewer component's iframe, once its OpenSeadragon has drawn tiles."""
    page.locator("iframe[src*='cmil_slide_viewer']").first.wait_for(timeout=90_000)
    frame = next(f for f in page.frames if "cmil_slide_viewer" in f.url)
    frame.wait_for_function("window.cmilViewer && window.cmilViewer.tilesLoaded > 0",
                            timeout=60_000)
    return frame


def test_zoom_toggle_an_overlay_and_click_a_patch_for_its_gradcam(
        small_demo_store: Path, tmp_path: Path, page: Page) -> None:
    db = small_demo_store
    with store.open_store(db, read_only=True) as st:
        model_id = str(store.list_models(st)["model_id"].iloc[0])
        listing = patient_list(st, model_id)
        # A scanned slide (training centre) of a patient with marrow metastasis.
        positive = listing[(listing["label"] == 1) & (listing["cohort"] == "training")].iloc[0]
        cohort, patient_id = str(positive["cohort"]), str(positive["patient_id"])
        top, _ = attention_patches(st, model_id, patient=(cohort, patient_id), k=1)
    best = top.iloc[0]
    server = Server({"CMIL_DB": str(db)}, tmp_path / "server.log")
    try:
        page.goto(server.url)
        page.get_by_role("heading", name="Study overview", level=1).wait_for(timeout=120_000)
        page.goto(f"{server.url}/patients?patient={quote(cohort + '/' + patient_id)}"
                  f"&model={quote(model_id)}")
        page.get_by_text("Slide viewer").first.wait_for(timeout=120_000)
        frame = viewer_frame(page)
        # The attention overlay is on from the start and paints the scored patches.
        frame.wait_for_function("window.cmilViewer.drawn.attention > 0", timeout=30_000)
        home_zoom = frame.evaluate("window.cmilViewer.viewer.viewport.getZoom()")
        home_level = frame.evaluate("window.cmilViewer.maxLevelLoaded")

        # Zoom in with the mouse wheel over the slide: finer tiles arrive.
        iframe = page.locator("iframe[src*='cmil_slide_viewer']").first
        iframe.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        box = iframe.bounding_box()
        assert box is not None
        centre = frame.evaluate(
            """(p) => { const v = window.cmilViewer.viewer, it = v.world.getItemAt(0);
                        const e = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(p.x, p.y));
                        const r = document.getElementById('viewer').getBoundingClientRect();
                        return {x: e.x + r.left, y: e.y + r.top}; }""",
            {"x": int(best["x"] + best["size"] // 2), "y": int(best["y"] + best["size"] // 2)},
        )
        page.mouse.move(box["x"] + centre["x"], box["y"] + centre["y"])
        for _ in range(10):
            page.mouse.wheel(0, -300)
            page.wait_for_timeout(100)
        # Zoomed in at least 4x, and tiles of the full-resolution level (the finest) arrived.
        frame.wait_for_function(
            f"window.cmilViewer.viewer.viewport.getZoom() > {home_zoom} * 4 && "
            "window.cmilViewer.maxLevelLoaded === "
            "window.cmilViewer.viewer.world.getItemAt(0).source.maxLevel", timeout=30_000)
        assert frame.evaluate("window.cmilViewer.maxLevelLoaded") >= home_level

        # Switch the probability overlay on and the attention overlay off; fade one.
        frame.get_by_label("Patch probability", exact=True).check()
        frame.get_by_label("Attention", exact=True).uncheck()
        frame.wait_for_function("window.cmilViewer.drawn.probability > 0", timeout=10_000)
        assert frame.evaluate("window.cmilViewer.drawn.attention") == 0
        frame.get_by_label("Patch probability opacity").fill("0.2")
        assert frame.evaluate("window.cmilViewer.alpha.probability") == 0.2

        # Hover the highest-attention patch: its scores show; click it: its Grad-CAM opens.
        spot = frame.evaluate(
            """(p) => { const v = window.cmilViewer.viewer, it = v.world.getItemAt(0);
                        const e = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(p.x, p.y));
                        const r = document.getElementById('viewer').getBoundingClientRect();
                        return {x: e.x + r.left, y: e.y + r.top}; }""",
            {"x": int(best["x"] + best["size"] // 2), "y": int(best["y"] + best["size"] // 2)},
        )
        page.mouse.move(box["x"] + spot["x"], box["y"] + spot["y"])
        tip = frame.locator("#tip")
        tip.wait_for(state="visible", timeout=10_000)
        assert f"patch {int(best['patch_id'])}" in tip.inner_text()
        assert "attention percentile 1.000" in tip.inner_text()
        page.mouse.click(box["x"] + spot["x"], box["y"] + spot["y"])
        page.get_by_text(f"Patch {int(best['patch_id'])}").first.wait_for(timeout=60_000)
        page.locator("[data-testid='stImage']", has_text="Grad-CAM").first.wait_for(timeout=120_000)
        page.wait_for_function(IDLE_JS, polling=100, timeout=60_000)
        body = page.inner_text("body")
        assert "Traceback" not in body
        assert f"Patch {int(best['patch_id'])} · level-0 ({int(best['x']):,}, {int(best['y']):,})" in body
        # The viewer kept its place across the page's rerun (not reopened at home).
        assert frame.evaluate("window.cmilViewer.viewer.viewport.getZoom()") > home_zoom * 4
    finally:
        server.stop()


# --------------------------------------------------------------------------- review queue -> cell

NAV_LINKS = "[data-testid='stSidebarNav'] a"
VIEW_JS = """() => { const s = window.cmilViewer; if (!s || !s.viewer || !s.viewer.world.getItemCount()) return null;
    const v = s.viewer, it = v.world.getItemAt(0);
    const c = it.viewportToImageCoordinates(v.viewport.getCenter(true));
    const b = it.viewportToImageRectangle(v.viewport.getBounds(true));
    return {key: s.key, selected: s.selected, x: c.x, y: c.y, width: b.width,
            zoom: v.viewport.getZoom(true), home: v.viewport.getHomeZoom(), focused: s.focused || 0,
            attention: s.drawn.attention, tiles: s.tilesLoaded}; }"""


def viewer_state(page: Page) -> tuple[Frame, dict[str, Any]] | None:
    """The viewer's frame and its state (see VIEW_JS), or None before it has opened a slide."""
    for frame in page.frames:
        if "cmil_slide_viewer" in frame.url:
            try:
                state = frame.evaluate(VIEW_JS)
            except PlaywrightError:  # a frame Streamlit is replacing
                continue
            if state is not None:
                return frame, state
    return None


def wait_viewer(page: Page, done: Any, what: str, timeout: float = 60.0) -> tuple[Frame, dict]:
    """Poll the viewer until ``done(state)``; fail naming ``what`` and the last state."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        found = viewer_state(page)
        if found is not None:
            last = found[1]
            if done(last):
                return found
        page.wait_for_timeout(200)
    raise AssertionError(f"viewer: {what} (last state {last})")


def test_from_the_review_queue_to_a_cell_under_attention_and_on_to_qupath(
        small_demo_store: Path, tmp_path: Path, page: Page) -> None:
    db = small_demo_store
    with store.open_store(db, read_only=True) as st:
        model_id = str(store.list_models(st)["model_id"].iloc[0])
        queue = patient_list(st, model_id)
    first = queue.iloc[0]  # the review queue's first patient
    cohort, patient_id = str(first["cohort"]), str(first["patient_id"])
    with store.open_store(db, read_only=True) as st:
        top, _ = attention_patches(st, model_id, patient=(cohort, patient_id), k=8)
    best = top.iloc[0]
    server = Server({"CMIL_DB": str(db)}, tmp_path / "server.log")
    try:
        # A link to the Patients page as the fresh server's very first request: the app's
        # own navigation, not Streamlit's listing of the files in pages/ (a flake once).
        page.goto(f"{server.url}/patients")
        page.get_by_role("heading", name="Patients", level=1).wait_for(timeout=120_000)
        page.wait_for_function(IDLE_JS, polling=100, timeout=120_000)
        links = [t.strip().splitlines()[-1].strip()  # the label after the icon
                 for t in page.locator(NAV_LINKS).all_inner_texts()]
        assert "Study overview" in links and "Patients" in links, links
        assert not {"common", "viewer", "_common", "_viewer", "app"} & set(links), links

        # Click 1: the review queue's first row.
        table = page.locator("[data-testid='stDataFrame']").first
        rows = table.locator("[role='row']")
        rows.nth(1).wait_for(state="attached")
        cells = rows.nth(1).locator("[role='gridcell']").all_inner_texts()
        assert cells[1:3] == [cohort, patient_id], cells
        box = table.bounding_box()
        header = rows.nth(0).bounding_box()
        assert box is not None
        row_h = header["height"] if header and header["height"] > 10 else 35
        page.mouse.click(box["x"] + 15, box["y"] + row_h * 1.5)
        page.wait_for_url(re.compile(r"[?&]patient="), timeout=30_000)
        page.get_by_role("heading", name=f"Patient {patient_id} · {cohort}").wait_for(
            timeout=60_000)
        page.get_by_text("Slide viewer").first.wait_for(timeout=120_000)
        frame, state = wait_viewer(page, lambda s: s["tiles"] > 0 and s["attention"] > 0,
                                   "tiles and the attention overlay drawn", 120)
        home = state["zoom"]

        # Click 2: the attention overlay off and on again (it starts on).
        frame.get_by_label("Attention", exact=True).uncheck()
        frame.wait_for_function("window.cmilViewer.drawn.attention === 0", timeout=10_000)
        frame.get_by_label("Attention", exact=True).check()
        frame.wait_for_function("window.cmilViewer.drawn.attention > 0", timeout=10_000)

        # Click 3: "Show on slide" under the highest-attention patch of the top-k gallery.
        page.get_by_text(re.compile(r"^The \d+ patches of highest")).first.wait_for(
            timeout=60_000)
        page.locator("[data-testid='stButton']", has_text="Show on slide").first.locator(
            "button").click()
        x, y, size = int(best["x"]), int(best["y"]), int(best["size"])
        frame, state = wait_viewer(
            page, lambda s: s["selected"] == int(best["patch_id"])
            and abs(s["x"] - (x + size / 2)) < size / 2 and abs(s["y"] - (y + size / 2)) < size / 2
            and s["width"] < 10 * size and s["zoom"] > home,
            f"centred and zoomed on patch {int(best['patch_id'])} at ({x}, {y})")
        assert state["attention"] > 0  # the overlay stayed on over the zoomed-in cells
        # The gallery's patch is selected as a click would: its Grad-CAM beside the viewer.
        page.get_by_text(f"Patch {int(best['patch_id'])} · level-0 ({x:,}, {y:,})").first.wait_for(
            timeout=60_000)
        page.locator("[data-testid='stImage']", has_text="Grad-CAM").first.wait_for(
            timeout=120_000)
        page.wait_for_function(IDLE_JS, polling=100, timeout=60_000)

        # Click 4: another patch in view, on the slide: its own Grad-CAM.
        iframe = page.locator("iframe[src*='cmil_slide_viewer']").first
        iframe.scroll_into_view_if_needed()
        other = frame.evaluate(
            """(skip) => { const s = window.cmilViewer, d = s.data, it = s.viewer.world.getItemAt(0);
                 const r = document.getElementById('viewer').getBoundingClientRect();
                 for (let i = 0; i < d.id.length; i++) {
                   if (d.id[i] === skip || d.percentile[i] === null) continue;
                   const e = it.imageToViewerElementCoordinates(
                       new OpenSeadragon.Point(d.x[i] + d.size[i] / 2, d.y[i] + d.size[i] / 2));
                   if (e.x > 40 && e.y > 40 && e.x < r.width - 200 && e.y < r.height - 40)
                     return {id: d.id[i], x: e.x + r.left, y: e.y + r.top, px: d.x[i], py: d.y[i]};
                 }
                 return null; }""", int(best["patch_id"]))
        assert other is not None, "no other scored patch in view"
        box = iframe.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + other["x"], box["y"] + other["y"])
        page.get_by_text(f"Patch {other['id']} · level-0 ({other['px']:,}, {other['py']:,})").first \
            .wait_for(timeout=60_000)
        page.locator("[data-testid='stImage']", has_text="Grad-CAM").first.wait_for(
            timeout=120_000)
        page.wait_for_function(IDLE_JS, polling=100, timeout=60_000)
        assert "Traceback" not in page.inner_text("body")

        # The same overlay for QuPath: the GeoJSON download under the viewer.
        layers = frame.evaluate("(() => { const d = window.cmilViewer.data; return "
                                "{id: d.id, percentile: d.percentile}; })()")
        button = page.locator("[data-testid='stDownloadButton']", has_text="GeoJSON for QuPath")
        with page.expect_download(timeout=60_000) as info:
            button.first.locator("button, a").first.click()
        download = info.value
        assert download.suggested_filename.endswith(".geojson")
        collection = geojson.loads(Path(download.path()).read_text())
        assert collection.is_valid
        detections = {int(f["properties"]["metadata"]["patch_id"]): f for f in
                      collection["features"] if f["properties"]["objectType"] == "detection"}
        assert sorted(detections) == sorted(layers["id"])
        for pid, percentile in zip(layers["id"], layers["percentile"], strict=True):
            measured = detections[pid]["properties"]["measurements"].get("attention percentile")
            assert (percentile is None) == (measured is None)
            if percentile is not None:
                assert measured == pytest.approx(percentile, abs=1e-4)
        chosen = detections[int(best["patch_id"])]
        assert chosen["geometry"]["coordinates"][0][0] == [x, y]  # level-0 pixels
        assert json.loads(json.dumps(collection))["type"] == "FeatureCollection"
    finally:
        server.stop()
