"""Take the README's screenshot of the deep-zoom slide viewer: docs/screenshots/viewer.png.

Run: .venv/bin/python -m scripts.viewer_screenshot [--db STORE] [--out FILE]

Starts ``streamlit run app.py`` on the store (default: a small demo study built
into a temporary folder, a minute or two), in Chromium at 1400 x 1000 px opens
the Patients page on a training patient with marrow metastasis, presses "Show
on slide" under the top patch of the attention gallery (the viewer centres
that patch and shows its Grad-CAM beside it), zooms three more steps onto a
tumour cell of it with the attention overlay on (opacity 0.3, so the cells
show through) and keeps the viewport with the viewer and the Grad-CAM, at
1400 px wide.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from urllib.parse import quote

from scripts.dashboard_server import IDLE_JS, DashboardServer, chromium_browser
from scripts.screenshots import HIDE_EMOJI_CSS, has_emoji_font, save_small

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots" / "viewer.png"
WIDTH = 1400
POINT_JS = """(p) => { const v = window.cmilViewer.viewer, it = v.world.getItemAt(0);
    const e = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(p.x, p.y));
    const r = document.getElementById('viewer').getBoundingClientRect();
    return {x: e.x + r.left, y: e.y + r.top}; }"""
CENTRED_JS = """(p) => { const s = window.cmilViewer;
    if (!s || !s.viewer || s.selected !== p.id) return false;
    const v = s.viewer, it = v.world.getItemAt(0);
    const c = it.viewportToImageCoordinates(v.viewport.getCenter(true));
    return Math.abs(c.x - p.x) < p.size / 2 && Math.abs(c.y - p.y) < p.size / 2; }"""


def take(db: Path, out: Path) -> None:
    from cmil_core import store as store_mod
    from cmil_core.viewer.patients import attention_patches, patient_list

    with store_mod.open_store(db, read_only=True) as store:
        model_id = str(store_mod.list_models(store)["model_id"].iloc[0])
        listing = patient_list(store, model_id)
        chosen = listing[(listing["label"] == 1) & (listing["cohort"] == "training")].iloc[0]
        cohort, patient_id = str(chosen["cohort"]), str(chosen["patient_id"])
        top, _ = attention_patches(store, model_id, patient=(cohort, patient_id), k=1)
    best = top.iloc[0]
    centre = {"x": int(best["x"] + best["size"] // 2), "y": int(best["y"] + best["size"] // 2)}
    with tempfile.TemporaryDirectory() as tmp, \
            DashboardServer({"CMIL_DB": str(db)}, Path(tmp) / "server.log") as server, \
            chromium_browser() as browser:
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
        page.goto(f"{server.url}/patients?patient={quote(cohort + '/' + patient_id)}"
                  f"&model={quote(model_id)}")
        iframe = page.locator("iframe[src*='cmil_slide_viewer']").first
        iframe.wait_for(timeout=120_000)
        page.wait_for_function(IDLE_JS, polling=100, timeout=120_000)
        if not has_emoji_font():  # as scripts.screenshots: no empty boxes for the icons
            page.add_style_tag(content=HIDE_EMOJI_CSS)
        frame = next(f for f in page.frames if "cmil_slide_viewer" in f.url)
        frame.wait_for_function("window.cmilViewer && window.cmilViewer.tilesLoaded > 0",
                                timeout=60_000)
        # The top patch of the attention gallery: "Show on slide".
        page.locator("[data-testid='stButton']", has_text="Show on slide").first.locator(
            "button").click()
        frame.wait_for_function(CENTRED_JS, arg={**centre, "id": int(best["patch_id"]),
                                                 "size": int(best["size"])}, timeout=60_000)
        page.locator("[data-testid='stImage']", has_text="Grad-CAM").first.wait_for(
            timeout=120_000)
        page.wait_for_function(IDLE_JS, polling=100, timeout=60_000)
        frame.get_by_label("Attention opacity").fill("0.3")
        frame.evaluate("document.activeElement && document.activeElement.blur()")
        iframe.scroll_into_view_if_needed()
        page.evaluate("window.scrollBy(0, -120)")  # the viewer's heading and caption too
        page.wait_for_timeout(500)
        box = iframe.bounding_box()
        assert box is not None
        spot = frame.evaluate(POINT_JS, centre)
        page.mouse.move(box["x"] + spot["x"], box["y"] + spot["y"])
        for _ in range(3):  # closer, onto the cells of the patch
            page.mouse.wheel(0, -300)
            page.wait_for_timeout(300)
        page.mouse.move(box["x"] + 5, box["y"] + box["height"] - 5)  # no hover card over a cell
        frame.wait_for_function(
            "window.cmilViewer.maxLevelLoaded === "
            "window.cmilViewer.viewer.world.getItemAt(0).source.maxLevel", timeout=60_000)
        page.wait_for_timeout(2000)  # the finest tiles drawn
        out.parent.mkdir(parents=True, exist_ok=True)
        save_small(page.screenshot(), out, WIDTH, 700)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", type=Path, help="a scored store (default: a fresh small demo)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.db is not None:
        take(args.db, args.out)
    else:
        from cmil_core.demo.generator import generate_demo

        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "cmil.duckdb"
            generate_demo(db, size="small", seed=0)
            take(db, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
