"""Take the README's screenshots of every dashboard page: docs/screenshots/<page>.png.

Run: .venv/bin/python -m scripts.screenshots [--db STORE] [--out DIR]

Starts ``streamlit run app.py`` on the store (default: a small demo study built
into a temporary folder, about half a minute), opens each page in Chromium
(/usr/bin/chromium, driven by Playwright) 1280 px wide (a laptop) by clicking its
sidebar link, and takes the whole page, top to bottom (the window is made as tall
as the page, at most --max-height px, so that every table, figure and caption a
reader scrolls to is in the picture at the laptop's layout), downscaled to 1000
px wide and optimised (a 256-colour palette when the full-colour file is over
--max-kb). The Patients page is taken with a patient opened, from the review
queue when it has one.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from scripts.dashboard_server import CHROMIUM, IDLE_JS, DashboardServer, chromium_browser

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}  # a laptop (issue 18)
# File names of the pages, by sidebar label (= the page's h1); a page added later is
# taken too, under a name made from its label.
PAGE_NAMES = {
    "Study overview": "overview", "Cohorts": "cohorts", "Discrimination": "discrimination",
    "Survival": "survival", "Patients": "patients", "Report": "report", "Models": "models",
}
NAV_LABELS = "[data-testid='stSidebarNavLink'] [data-testid='stMarkdownContainer']"
DRAWN_JS = """() => [...document.querySelectorAll('img')]
        .every(i => i.complete && i.naturalWidth > 0)
    && [...document.querySelectorAll("[data-testid='stPlotlyChart']")]
           .every(c => c.querySelector('.main-svg'))"""
# Without a colour-emoji font, Chromium draws the pages' emoji icons as empty boxes.
HIDE_EMOJI_CSS = "[data-testid='stIconEmoji'] { display: none !important; }"


def has_emoji_font() -> bool:
    if shutil.which("fc-list") is None:
        return False
    fonts = subprocess.run(["fc-list"], capture_output=True, text=True, check=False).stdout
    return "emoji" in fonts.lower()


def save_small(png: bytes, path: Path, width: int, max_kb: int) -> int:
    """Downscale to ``width`` px, optimise; a palette image when still over ``max_kb``."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    if buf.tell() > max_kb * 1024:
        buf = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                       dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
    path.write_bytes(buf.getvalue())
    return buf.tell()


def wait_idle(page: Page, timeout: float = 120_000) -> None:
    page.evaluate("window.__cmilIdle = 0")
    page.wait_for_function(IDLE_JS, polling=100, timeout=timeout)
    page.wait_for_function(DRAWN_JS, polling=200, timeout=timeout)
    page.wait_for_timeout(500)  # Plotly's transitions, the images' fade-in


def open_patient(page: Page) -> None:
    """Select the list's first row (the review queue comes first) and wait for its detail."""
    table = page.locator("[data-testid='stDataFrame']").first
    table.wait_for()
    rows = table.locator("[role='row']")
    rows.nth(1).wait_for(state="attached")
    box = table.bounding_box()
    header = rows.nth(0).bounding_box()
    row_h = header["height"] if header and header["height"] > 10 else 35
    page.mouse.click(box["x"] + 15, box["y"] + row_h * 1.5)  # the first row's checkbox
    page.wait_for_url("**/patients?*patient=*", timeout=60_000)
    page.get_by_role("heading", name=re.compile(r"^Patient .+ · ")).first.wait_for(timeout=60_000)
    wait_idle(page)
    page.mouse.move(5, 5)  # no hover highlight on the grid


def whole_page(page: Page, max_height: int) -> bytes:
    """The page top to bottom at the laptop's width: the window made as tall as the page.

    Streamlit scrolls its main block, not the document, so Playwright's ``full_page``
    would keep the first screen only; a taller window lays the page out the same
    (the width decides the layout) and shows all of it.
    """
    height = page.evaluate(
        """() => { const m = document.querySelector("[data-testid='stMain']");
                   const b = m && m.firstElementChild;
                   return Math.ceil(Math.max(b ? b.scrollHeight : 0,
                                             m ? m.scrollHeight : 0)); }""")
    page.set_viewport_size({"width": VIEWPORT["width"],
                            "height": max(VIEWPORT["height"], min(int(height) + 40, max_height))})
    wait_idle(page)
    try:
        return page.screenshot()
    finally:
        page.set_viewport_size(VIEWPORT)


def take(db: Path, out: Path, width: int, max_kb: int,
         max_height: int = 9000) -> list[tuple[Path, int]]:
    out.mkdir(parents=True, exist_ok=True)
    done = []
    with tempfile.TemporaryDirectory(prefix="cmil-shots-") as tmp:
        log = Path(tmp) / "server.log"
        server = DashboardServer({"CMIL_DB": str(db)}, log)
        url = server.url
        try:
            with chromium_browser() as browser:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.locator("h1").first.wait_for(timeout=180_000)
                first = page.locator("h1").first.inner_text()
                if first in ("The store is busy", "This store is empty"):
                    raise SystemExit(f"{db}: {first}\n{page.inner_text('body')[:1000]}")
                page.get_by_role("heading", name="Study overview", level=1).wait_for(
                    timeout=180_000)
                wait_idle(page, timeout=180_000)
                css = None if has_emoji_font() else HIDE_EMOJI_CSS
                titles = [t.strip() for t in page.locator(NAV_LABELS).all_inner_texts()]
                for title in titles:
                    name = PAGE_NAMES.get(title) or re.sub(r"[^a-z0-9]+", "_",
                                                           title.lower()).strip("_")
                    page.locator("[data-testid='stSidebarNavLink']").filter(
                        has=page.get_by_text(title, exact=True)).click()
                    page.get_by_role("heading", name=title, exact=True, level=1).wait_for(
                        timeout=120_000)
                    wait_idle(page)
                    if name == "patients":
                        open_patient(page)
                    if css:
                        page.add_style_tag(content=css)
                    problems = page.locator("[data-testid='stException']").count()
                    if problems or "Traceback" in page.inner_text("body"):
                        print(f"warning: {title} shows an exception", file=sys.stderr)
                    path = out / f"{name}.png"
                    png = whole_page(page, max_height)
                    done.append((path, save_small(png, path, width, max_kb)))
                    print(f"{path}  {done[-1][1] / 1024:.0f} KB", flush=True)
        except Exception:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            server.stop()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", type=Path, help="the store (default: a small demo, built now)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder (default {OUT})")
    parser.add_argument("--width", type=int, default=1000, help="PNG width in px (1000)")
    parser.add_argument("--max-kb", type=int, default=450,
                        help="above this, save a 256-colour palette PNG (450)")
    parser.add_argument("--max-height", type=int, default=9000,
                        help="the tallest page taken, in px at 1280 px wide (9000)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} is missing (./test.sh installs it as root)")
    with tempfile.TemporaryDirectory(prefix="cmil-demo-") as tmp:
        db = args.db
        if db is None:
            from cmil_core.demo.generator import generate_demo

            db = Path(tmp) / "cmil.duckdb"
            print(f"building a small demo study in {db} ...", flush=True)
            generate_demo(db, size="small", seed=0)
        elif not db.exists():
            parser.error(f"no store at {db}")
        take(db.resolve(), args.out, args.width, args.max_kb, args.max_height)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
