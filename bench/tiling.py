"""Benchmark of tiling + quality control against a plain OpenSlide read loop.

Run: ``.venv/bin/python bench/tiling.py [--side 8192] [--repeat 3]``

Slides:

* ``CMU-1-Small-Region.svs`` (Aperio, 2220 x 2967, 0.499 um/px; from
  ``tests/data/fixtures``);
* two synthetic pyramidal TIFFs written into a temporary folder the way the
  demo writes slides (tiled 256, JPEG, ``photometric='rgb'``, resolution tags
  in centimetres for 0.5 um/px, each pyramid level a separate IFD with
  ``subfiletype=1``; OpenSlide opens them as ``generic-tiff`` with an mpp): a
  smear-like texture inside an ellipse on glass, ``side x side`` and, for
  the memory check, ``2 side x 2 side`` (4x the area).

Throughput (same run, interleaved, best of ``--repeat``):

* ``ours``: :func:`cmil_core.ingest.tiling.tile_slide` with the default config:
  thumbnail, foreground mask, grid, reading every kept patch, all quality
  metrics and the decision;
* photographs: the BCCD fields of ``tests/data/real_smears`` at 0.1 um/px with
  32 um patches (:func:`photo_throughput`), against PIL decoding and cropping
  the same cells;
* ``baseline``: a plain loop over the very same grid cells, one
  ``openslide.OpenSlide.read_region`` per patch at the same pyramid level,
  ``.convert("RGB")``, resized to ``output_px`` (BOX) when the level's size
  differs, ``numpy.asarray``. No foreground, no quality control.

``ratio`` is ours patches/s divided by baseline patches/s; the issue's target
is >= 0.77 (quality control costs at most 30 % over bare reading).

Strips: reading one ``read_region`` per horizontal run of adjacent cells
(what :mod:`cmil_core.ingest.tiling` does) against one per patch through the same
``Slide`` face, both in one thread, reading only.

Memory: each slide is tiled in a fresh child process that prints the peak of
``tracemalloc`` (Python and numpy allocations) during :func:`tile_slide`
and the growth of the process's peak resident set over the call (VmHWM reset
through /proc/self/clear_refs; C libraries included). ``ru_maxrss`` is the
fallback where /proc is missing; on Linux it survives ``exec`` and would show
the parent's peak, hence the reset.
A flat peak from the small to the 4x larger synthetic slide shows that memory
does not grow with slide size (the result table itself grows, by about 100
bytes per patch).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmil_core.ingest import patch_grid, tiling  # noqa: E402
from cmil_core.ingest.foreground import detect_foreground  # noqa: E402
from cmil_core.ingest.quality import QCThresholds  # noqa: E402
from cmil_core.ingest.slides import Slide, open_slide  # noqa: E402
from cmil_core.ingest.tiling_config import TilingConfig  # noqa: E402

CMU1 = ROOT / "tests" / "data" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"
MPP = 0.5
TILE = 256
BLOCK = 2048  # synthetic texture period, level-0 px
T = TypeVar("T")


# ----------------------------------------------------------------- synthetic slides


def _smear_block(seed: int = 0) -> np.ndarray:
    """A 2048 px square of smear-like texture: pink red cells, some violet nuclei, grey glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:BLOCK, 0:BLOCK].astype(np.float32)
    img = np.empty((BLOCK, BLOCK, 3), np.float32)
    img[:] = (236, 236, 238)

    def discs(n: int, r_lo: float, r_hi: float, colour: tuple[float, float, float],
              pale_centre: bool) -> None:
        for _ in range(n):
            cx, cy = rng.uniform(0, BLOCK, 2)
            r = rng.uniform(r_lo, r_hi)
            x0, x1 = int(max(cx - r - 1, 0)), int(min(cx + r + 2, BLOCK))
            y0, y1 = int(max(cy - r - 1, 0)), int(min(cy + r + 2, BLOCK))
            d = np.hypot(xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy) / r
            a = np.clip((1.0 - d) * 3.0, 0.0, 1.0)
            if pale_centre:
                a *= 1.0 - 0.5 * np.clip(1.0 - d * 2.0, 0.0, 1.0)
            alpha = a[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + np.asarray(colour) * alpha

    discs(9000, 6.5, 8.5, (214, 150, 160), True)     # red cells, ~7.5 um at 0.5 um/px
    discs(500, 7.0, 11.0, (115, 80, 165), False)     # nuclei
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _downsample2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return a[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def write_synthetic_slide(path: Path, side: int) -> None:
    """A ``side x side`` pyramidal TIFF at 0.5 um/px: the smear block repeated inside an ellipse."""
    block = _smear_block()
    glass = np.array([236, 236, 238], np.uint8)
    per_cm = 10_000.0 / MPP
    level_side, level_block, first = side, block, True
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        while True:
            n = math.ceil(level_side / TILE)
            scale = side / level_side

            def tiles(n: int = n, lb: np.ndarray = level_block, ls: int = level_side,
                      scale: float = scale) -> Iterator[np.ndarray]:
                period = lb.shape[0]
                for ty in range(n):
                    for tx in range(n):
                        ys = (np.arange(ty * TILE, ty * TILE + TILE) % period)
                        xs = (np.arange(tx * TILE, tx * TILE + TILE) % period)
                        tile = lb[np.ix_(ys, xs)]
                        # Ellipse of smear, glass around it (and beyond the level's edge).
                        y = (np.arange(ty * TILE, ty * TILE + TILE) + 0.5) * scale / side - 0.5
                        x = (np.arange(tx * TILE, tx * TILE + TILE) + 0.5) * scale / side - 0.5
                        outside = (x[None, :] / 0.45) ** 2 + (y[:, None] / 0.38) ** 2 > 1.0
                        outside |= (np.arange(ty * TILE, ty * TILE + TILE) >= ls)[:, None]
                        outside |= (np.arange(tx * TILE, tx * TILE + TILE) >= ls)[None, :]
                        tile = tile.copy()
                        tile[outside] = glass
                        yield tile

            tif.write(
                tiles(), shape=(level_side, level_side, 3), dtype=np.uint8, tile=(TILE, TILE),
                compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                subfiletype=0 if first else 1, resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER", metadata=None,
            )
            first = False
            if level_side <= 512:
                break
            level_side //= 2
            level_block = _downsample2(level_block)
            per_cm /= 2.0


# ----------------------------------------------------------------- measurements


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def baseline_loop(path: Path, cells: list[tuple[int, int]], size: int, level: int,
                  lv_size: int, output_px: int) -> int:
    """One OpenSlide read_region per patch, to RGB numpy, resized to output_px if needed."""
    import openslide

    osr = openslide.OpenSlide(str(path))
    try:
        n = 0
        for x, y in cells:
            im = osr.read_region((x, y), level, (lv_size, lv_size)).convert("RGB")
            if lv_size != output_px:
                im = im.resize((output_px, output_px), Image.Resampling.BOX)
            patch = np.asarray(im)
            n += patch.shape[0] > 0
        return n
    finally:
        osr.close()


def grid_of(slide: Slide, config: TilingConfig) -> patch_grid.PatchGrid:
    return patch_grid.make_grid(slide, config, detect_foreground(slide, config))


def throughput(path: Path, repeat: int) -> dict[str, object]:
    """Patches/s of tile_slide, of measure_grid on a given grid, and of the plain loop."""
    config, thresholds = TilingConfig(), QCThresholds()
    with open_slide(path) as slide:
        foreground = detect_foreground(slide, config)
        grid = patch_grid.make_grid(slide, config, foreground)
        level = slide.best_level_for_downsample(grid.size / grid.output_px)
        lv_size = round(grid.size / slide.level_downsamples[level])
    cells = list(zip(grid.x.tolist(), grid.y.tolist(), strict=True))
    n = len(cells)
    best = {"ours": float("inf"), "qc": float("inf"), "baseline": float("inf")}
    frame = None
    for _ in range(repeat):  # interleaved, so that load from elsewhere hits all three alike
        with open_slide(path) as slide:
            start = time.perf_counter()
            frame = tiling.tile_slide(slide, config, thresholds)
            best["ours"] = min(best["ours"], time.perf_counter() - start)
        with open_slide(path) as slide:
            start = time.perf_counter()
            tiling.measure_grid(slide, grid, foreground.glass_rgb, thresholds)
            best["qc"] = min(best["qc"], time.perf_counter() - start)
        _, t = timed(lambda: baseline_loop(path, cells, grid.size, level, lv_size, grid.output_px))
        best["baseline"] = min(best["baseline"], t)
    assert frame is not None
    if len(frame) != n:
        raise SystemExit(f"grid mismatch: tile_slide gave {len(frame)} rows, the grid {n}")
    counts = frame["qc_reason"].fillna("pass").value_counts().to_dict()
    rate = {k: n / v for k, v in best.items()}
    return {"patches": n, "level": level, **rate, "ratio": rate["ours"] / rate["baseline"],
            "ratio_qc": rate["qc"] / rate["baseline"], "reasons": counts,
            "foreground_s": best["ours"] - best["qc"]}


PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "data" / "real_smears"


def photo_throughput(repeat: int, copies: int = 6) -> dict[str, float]:
    """Photographs (the BCCD fields of ``tests/data/real_smears``, 0.1 um/px, 32 um patches).

    ``ours``: open each photograph and :func:`cmil_core.ingest.tiling.tile_slide` it
    (edge-to-edge grid, glass field, stain estimate, metrics, decision);
    ``baseline``: open and decode it with PIL, crop the very same cells and
    resize each to ``output_px`` (BOX). ``copies`` passes over the folder.
    """
    paths = sorted(PHOTOS.glob("BloodImage_*.jpg")) * copies
    config, thresholds, mpp = TilingConfig(patch_um=32.0), QCThresholds(), 0.1
    cells: list[list[tuple[int, int, int]]] = []
    for path in paths:
        with open_slide(path, mpp=mpp) as slide:
            grid = grid_of(slide, config)
        cells.append(list(zip(grid.x.tolist(), grid.y.tolist(), [grid.size] * len(grid),
                              strict=True)))
    n = sum(len(c) for c in cells)

    def ours() -> None:
        for path in paths:
            with open_slide(path, mpp=mpp) as slide:
                tiling.tile_slide(slide, config, thresholds)

    def baseline() -> None:
        for path, cs in zip(paths, cells, strict=True):
            with Image.open(path) as im:
                rgb = im.convert("RGB")
                for x, y, size in cs:
                    np.asarray(rgb.crop((x, y, x + size, y + size)).resize(
                        (config.output_px, config.output_px), Image.Resampling.BOX))

    best = {"ours": float("inf"), "baseline": float("inf")}
    for _ in range(repeat):
        best["ours"] = min(best["ours"], timed(ours)[1])
        best["baseline"] = min(best["baseline"], timed(baseline)[1])
    rate = {k: n / v for k, v in best.items()}
    return {"patches": float(n), **rate, "ratio": rate["ours"] / rate["baseline"]}


def strip_vs_patch(path: Path, repeat: int) -> tuple[float, float]:
    """Patches/s reading with strips vs one read_region per patch, one thread, no QC."""
    config = TilingConfig()
    with open_slide(path) as slide:
        grid = grid_of(slide, config)
        chunks = np.array_split(np.arange(len(grid)), max(1, len(grid) // 64))
        strips = patch_grid._runs

        def singles(g: patch_grid.PatchGrid, idx: np.ndarray) -> list[np.ndarray]:
            return [idx[k : k + 1] for k in range(idx.size)]

        best = {"strip": float("inf"), "patch": float("inf")}
        try:
            for _ in range(repeat):
                for name, runs in (("strip", strips), ("patch", singles)):
                    patch_grid._runs = runs  # type: ignore[assignment]
                    start = time.perf_counter()
                    for chunk in chunks:
                        patch_grid.read_cells(slide, grid, chunk)
                    best[name] = min(best[name], time.perf_counter() - start)
        finally:
            patch_grid._runs = strips
    return len(grid) / best["strip"], len(grid) / best["patch"]


def _status_kb(key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in kB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(path: str) -> None:
    """In a fresh process: peak memory of tile_slide on one slide, printed as JSON.

    ``tracemalloc`` sees Python and numpy allocations; the resident-set peak
    (VmHWM, reset just before the call; ru_maxrss where /proc is missing) also
    sees OpenSlide's and PIL's C allocations, tile cache included.
    """
    config, thresholds = TilingConfig(), QCThresholds()
    with open_slide(path) as slide:
        reset = _reset_peak_rss()
        rss0 = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        frame = tiling.tile_slide(slide, config, thresholds)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"patches": len(frame), "tracemalloc_peak_mb": peak / 2**20,
                      "rss_growth_mb": ((rss1 or 0) - (rss0 or 0)) / 1024,
                      "rss_source": "VmHWM" if reset else "ru_maxrss"}))


def memory(path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(path)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=8192, help="small synthetic slide side, px")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return 0

    with tempfile.TemporaryDirectory(prefix="cmil-bench-tiling-") as tmp:
        small, large = Path(tmp) / "synthetic-small.tiff", Path(tmp) / "synthetic-large.tiff"
        _, t = timed(lambda: write_synthetic_slide(small, args.side))
        _, t2 = timed(lambda: write_synthetic_slide(large, 2 * args.side))
        print(f"synthetic slides written: {args.side}^2 and {2 * args.side}^2 px in {t + t2:.1f} s")
        slides = [("CMU-1-Small-Region.svs", CMU1), (f"synthetic {args.side}^2", small),
                  (f"synthetic {2 * args.side}^2", large)]
        ratios = []
        for name, path in slides:
            r = throughput(path, args.repeat)
            ratios.append((name, r["ratio"], r["ratio_qc"]))
            print(f"{name}: {r['patches']} patches (level {r['level']}); patches/s: tile_slide "
                  f"{r['ours']:.0f}, measure_grid on the same grid {r['qc']:.0f}, baseline "
                  f"{r['baseline']:.0f}; ratio {r['ratio']:.2f}, ratio_qc {r['ratio_qc']:.2f} "
                  f"(foreground pass {r['foreground_s'] * 1000:.0f} ms); reasons {r['reasons']}")
        ph = photo_throughput(args.repeat)
        ratios.append(("photographs (BCCD, 0.1 um/px, 32 um)", ph["ratio"], float("nan")))
        print(f"photographs: {ph['patches']:.0f} patches; patches/s: tile_slide {ph['ours']:.0f}, "
              f"baseline (PIL decode + crop + resize) {ph['baseline']:.0f}; "
              f"ratio {ph['ratio']:.2f}")
        for name, path in slides[:2]:
            strip, patch = strip_vs_patch(path, args.repeat)
            print(f"{name}: reading one strip per run {strip:.0f} patches/s, "
                  f"one read_region per patch {patch:.0f} patches/s (one thread, no QC)")
        for name, path in slides[1:]:
            m = memory(path)
            print(f"{name}: memory over {m['patches']} patches: tracemalloc peak "
                  f"{m['tracemalloc_peak_mb']:.1f} MB, peak resident growth "
                  f"{m['rss_growth_mb']:.1f} MB ({m['rss_source']})")
        for name, ratio, ratio_qc in ratios:
            print(f"ratio {name}: {ratio:.2f} (tile_slide / baseline), ratio_qc {ratio_qc:.2f} "
                  "(measure_grid / baseline); target >= 0.77")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
