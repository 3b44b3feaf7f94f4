"""The deep-zoom slide viewer in a real browser: zoom, overlays, a click that shows Grad-CAM.

Marked ``browser`` and ``slow`` (a demo store and a Streamlit server); skipped
without Debian's Chromium, except in CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from cmil_core import store
from cmil_core.demo import generate_demo
from cmil_core.patients import attention_patches, patient_list
from scripts.dashboard_server import CHROMIUM, CHROMIUM_ARGS, IDLE_JS
from scripts.dashboard_server import DashboardServer as Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing in CI: .ci/run should have installed it")
    pytest.skip(f"{CHROMIUM} not installed (./test.sh installs it as root)", allow_module_level=True)

from playwright.sync_api import Frame, Page, sync_playwright


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = chromium.new_page(viewport={"width": 1400, "height": 1100})
        yield tab
        chromium.close()


def viewer_frame(page: Page) -> Frame:
    """The viewer component's iframe, once its OpenSeadragon has drawn tiles."""
    page.locator("iframe[src*='cmil_slide_viewer']").first.wait_for(timeout=90_000)
    frame = next(f for f in page.frames if "cmil_slide_viewer" in f.url)
    frame.wait_for_function("window.cmilViewer && window.cmilViewer.tilesLoaded > 0",
                            timeout=60_000)
    return frame


def test_zoom_toggle_an_overlay_and_click_a_patch_for_its_gradcam(tmp_path: Path,
                                                                    page: Page) -> None:
    db = tmp_path / "cmil.duckdb"
    generate_demo(db, size="small", seed=0)
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
