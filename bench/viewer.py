"""Deep Zoom tile speed of the slide viewer, against OpenSlide's read_region of the same area.

Two slides: CMU-1-Small-Region.svs (tests/data/fixtures, a real Aperio scan,
2,220 x 2,967 px) and a synthetic 8,960 px pyramidal TIFF written here the way
the demo writes its slides (256 px JPEG tiles, a 2x pyramid). For each, random
tiles of the finest Deep Zoom levels are fetched over HTTP from the app's tile
route (:class:`cmil_core.deepzoom.TileServer`):

* cold: the first request of a tile (made by DeepZoomGenerator, JPEG-encoded,
  written to the disk cache);
* warm: the same tile again (from the disk cache);
* baseline: ``read_region`` of the same level-0 area (256 x 256 px) by
  OpenSlide, without encoding or HTTP.

Targets (issue 16): warm <= 50 ms and cold <= 300 ms at the 95th percentile.

    python bench/viewer.py [--tiles 60] [--json]

``--json`` prints one line: ``tile_warm_ms``, ``tile_cold_ms`` and
``read_region_ms`` (95th percentiles, the worse of the two slides) and the same per slide.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmil_core.deepzoom import OVERLAP, TILE_SIZE, TileCache, TileServer

CMU1 = ROOT / "tests" / "data" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"
DEMO_SIDE = 8960


def write_demo_slide(path: Path, side: int = DEMO_SIDE, seed: int = 0) -> Path:
    """A smear-like pyramidal TIFF (JPEG tiles of 256 px, resolution tags), as the demo writes."""
    import tifffile

    rng = np.random.default_rng(seed)
    # Texture: pale red cells (blurred noise) with darker dots, tiled from one 1,120 px block.
    block = 1120
    base = rng.normal(0, 1, (block // 8, block // 8, 3)).repeat(8, 0).repeat(8, 1)
    img = np.clip(225 + 18 * base + rng.normal(0, 6, (block, block, 3)), 0, 255)
    dots = rng.integers(0, block, (400, 2))
    for y, x in dots:
        img[max(0, y - 6) : y + 6, max(0, x - 6) : x + 6] = (90, 60, 140)
    image = np.tile(img.astype(np.uint8), (side // block, side // block, 1))
    per_cm = 10_000.0 / 0.5
    with tifffile.TiffWriter(path) as tif:
        level, first = image, True
        while True:
            tif.write(level, tile=(256, 256), compression="jpeg", compressionargs={"level": 90},
                      photometric="rgb", subfiletype=0 if first else 1,
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", metadata=None)
            first = False
            if max(level.shape[:2]) <= 512:
                break
            level = level[::2, ::2]
            per_cm /= 2.0
    return path


def p95(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


def measure(slide: Path, n_tiles: int, seed: int = 0) -> dict[str, float]:
    import openslide

    with tempfile.TemporaryDirectory() as cache_dir:
        server = TileServer(TileCache(cache_dir, 4 << 30)).start()
        try:
            tiles = server.register(slide.resolve(), None)
            grid = server.cache.level_tiles(tiles.key)
            rng = random.Random(seed)
            wanted: list[tuple[int, int, int]] = []
            for level in (len(grid) - 1, len(grid) - 2):
                cols, rows = grid[level]
                cells = [(level, c, r) for c in range(cols) for r in range(rows)]
                wanted += rng.sample(cells, min(len(cells), n_tiles // 2))
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

            def fetch(level: int, col: int, row: int) -> float:
                path = f"{server.base_path()}/{tiles.key}_files/{level}/{col}_{row}.jpeg"
                t0 = time.perf_counter()
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                elapsed = (time.perf_counter() - t0) * 1000
                if response.status != 200 or not body.startswith(b"\xff\xd8"):
                    raise RuntimeError(f"tile {path}: HTTP {response.status}")
                return elapsed

            cold = [fetch(*t) for t in wanted]
            warm = [fetch(*t) for t in wanted]
            conn.close()
        finally:
            server.stop()
    osr = openslide.OpenSlide(str(slide))
    rng = random.Random(seed + 1)
    width, height = osr.dimensions
    side = TILE_SIZE + 2 * OVERLAP
    baseline = []
    for _ in range(len(wanted)):
        x, y = rng.randrange(0, max(1, width - side)), rng.randrange(0, max(1, height - side))
        t0 = time.perf_counter()
        osr.read_region((x, y), 0, (side, side))
        baseline.append((time.perf_counter() - t0) * 1000)
    osr.close()
    return {"tile_warm_ms": round(p95(warm), 2), "tile_cold_ms": round(p95(cold), 2),
            "read_region_ms": round(p95(baseline), 2), "tiles": len(wanted)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=60, help="tiles per slide (default 60)")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    results["CMU-1-Small-Region.svs"] = measure(CMU1, args.tiles)
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_slide(Path(tmp) / "demo_8960.tiff")
        results[f"demo {DEMO_SIDE} px"] = measure(demo, args.tiles)
    worst = {key: max(r[key] for r in results.values())
             for key in ("tile_warm_ms", "tile_cold_ms", "read_region_ms")}
    summary = {**worst, "warm_target_ms": 50, "cold_target_ms": 300,
               "cold_vs_read_region": round(worst["tile_cold_ms"] / worst["read_region_ms"], 1),
               "slides": results}
    if args.json:
        print(json.dumps(summary))
    else:
        for name, r in results.items():
            print(f"{name}: warm p95 {r['tile_warm_ms']} ms, cold p95 {r['tile_cold_ms']} ms, "
                  f"read_region p95 {r['read_region_ms']} ms ({r['tiles']} tiles)")
        print(f"targets: warm <= 50 ms, cold <= 300 ms; worst: warm {worst['tile_warm_ms']} ms, "
              f"cold {worst['tile_cold_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
