"""Reading a slide's pixels at a physical size with bounded memory.

:func:`read_patch` reads one square of level-0 pixels at the CNN's input size
(the reference the batched readers of :mod:`cmil_core.ingest.patch_grid`
reproduce pixel for pixel); :func:`read_thumbnail` reads a box-averaged
thumbnail in strips; :func:`map_ordered` is the small thread pool both use.
Coordinate prefixes (``l0_``, ``lv_``, ``th_``) as in :mod:`cmil_core.ingest.tiling`.

Reading with bounded memory
---------------------------
Patches are read at the pyramid level ``best_level_for_downsample(size /
output_px)`` (a level within 0.1 % of that downsample counts: pyramid
downsamples are rarely exact), then the remaining factor is resampled with
PIL's BOX filter (area average: alias-free, and an exact copy when no
resampling is needed, as at 0.5 um/px). Level 0 is never read whole, not even
for the thumbnail of a slide without a pyramid (it is read in strips of about
a megapixel). Cells are read in chunks of ``batch_size``, a horizontal run of
adjacent cells sharing one ``read_region`` (a strip), by a small thread pool
(OpenSlide, PIL and numpy release the GIL) with at most ``2 * workers``
chunks in flight; in :func:`cmil_core.ingest.tiling.tile_slide` each worker also measures its chunk,
so reading and arithmetic overlap. Strips and single-patch reads measured the
same speed within 5 % (``bench/tiling.py``); strips make fewer calls and never
decode a tile twice when OpenSlide's tile cache is small. Results do not
depend on ``batch_size`` or ``workers``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from cmil_core.errors import InputError
from cmil_core.ingest.slides import Slide

__all__ = [
    "EPS",
    "check_batching",
    "check_workers",
    "chunks",
    "level_for",
    "map_ordered",
    "patch_span",
    "read_patch",
    "read_thumbnail",
    "resample_into",
]


# Level pixels per strip when reading the thumbnail (1 Mpx: about 8 MB with RGBA).
_THUMB_STRIP_PIXELS = 1024 * 1024
# Resampling filter for patches and thumbnails.
_RESAMPLE = Image.Resampling.BOX
EPS = 1e-9
# A pyramid level within this factor of the wanted downsample is good enough.
_LEVEL_SLACK = 1.001


T = TypeVar("T")
R = TypeVar("R")


def chunks(n: int, batch_size: int) -> Iterator[npt.NDArray[np.int64]]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size), dtype=np.int64)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, at most ``2 * workers`` items in flight."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmil-tiling")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers={workers!r} must be an integer >= 0 (0: read in this thread).")


def check_batching(batch_size: int, workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be a positive integer.")
    check_workers(workers)


def read_thumbnail(slide: Slide, l0_per_th: float, th_w: int, th_h: int,
                    workers: int) -> npt.NDArray[np.uint8]:
    """Box-averaged thumbnail ``[th_h, th_w, 3]``, read in strips from the best level."""
    level = slide.best_level_for_downsample(l0_per_th * _LEVEL_SLACK)
    lv_ds = float(slide.level_downsamples[level])
    lv_per_th = l0_per_th / lv_ds
    lv_w = th_w * lv_per_th  # may pass the slide's edge: read_region paints it white
    lv_read_w = math.ceil(lv_w - EPS)
    rows = max(1, int(_THUMB_STRIP_PIXELS // max(lv_read_w * lv_per_th, 1.0)))
    out = np.empty((th_h, th_w, 3), dtype=np.uint8)

    def strip(th_r0: int) -> tuple[int, npt.NDArray[np.uint8]]:
        th_r1 = min(th_h, th_r0 + rows)
        lv_fy0, lv_fy1 = th_r0 * lv_per_th, th_r1 * lv_per_th
        lv_y0 = math.floor(lv_fy0 + EPS)
        lv_y1 = max(lv_y0 + 1, math.ceil(lv_fy1 - EPS))
        region = slide.read_region(0, round(lv_y0 * lv_ds), level, (lv_read_w, lv_y1 - lv_y0))
        img = Image.fromarray(region).resize(
            (th_w, th_r1 - th_r0), _RESAMPLE, box=(0.0, lv_fy0 - lv_y0, lv_w, lv_fy1 - lv_y0)
        )
        return th_r0, np.asarray(img)

    for th_r0, rgb in map_ordered(strip, range(0, th_h, rows), workers):
        out[th_r0 : th_r0 + rgb.shape[0]] = rgb
    return out


@dataclass(frozen=True)
class _Span:
    """Where a patch lies in a pyramid level: integer pixels to read, float box to resample."""

    lv_x0: int
    lv_y0: int
    lv_x1: int
    lv_y1: int
    box: tuple[float, float, float, float]  # relative to (lv_x0, lv_y0)


def patch_span(l0_x: int, l0_y: int, size: int, lv_ds: float) -> _Span:
    fx0, fy0 = l0_x / lv_ds, l0_y / lv_ds
    fx1, fy1 = (l0_x + size) / lv_ds, (l0_y + size) / lv_ds
    x0, y0 = math.floor(fx0 + EPS), math.floor(fy0 + EPS)
    x1, y1 = max(x0 + 1, math.ceil(fx1 - EPS)), max(y0 + 1, math.ceil(fy1 - EPS))
    return _Span(x0, y0, x1, y1, (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0))


def resample_into(region: npt.NDArray[np.uint8], box: tuple[float, float, float, float],
              output_px: int, out: npt.NDArray[np.uint8]) -> None:
    """Write ``region``'s ``box`` resampled to ``output_px`` square into ``out``."""
    h, w = region.shape[:2]
    if (w, h) == (output_px, output_px) and box == (0.0, 0.0, float(w), float(h)):
        out[...] = region
        return
    img = Image.fromarray(np.ascontiguousarray(region))
    img = img.resize((output_px, output_px), _RESAMPLE, box=box)
    out[...] = np.asarray(img)


def level_for(slide: Slide, size: int, output_px: int) -> tuple[int, float]:
    """The level to read patches from: the coarsest not finer than needed, within 0.1 %.

    Pyramid downsamples are rarely exact (a 4443 px level over a 2221 px one is
    2.00045x); a level within 0.1 % of the wanted downsample is read and the
    tiny remainder resampled, instead of reading four times the pixels.
    """
    level = slide.best_level_for_downsample(size / output_px * _LEVEL_SLACK)
    return level, float(slide.level_downsamples[level])


def read_patch(
    slide: Slide, l0_x: int, l0_y: int, size: int, output_px: int
) -> npt.NDArray[np.uint8]:
    """The square of ``size`` level-0 px at ``(l0_x, l0_y)`` as uint8 ``[output_px, output_px, 3]``.

    Reads the best level for ``size / output_px`` with one ``read_region`` and
    resamples the rest with PIL's BOX filter: the reference that
    :func:`~cmil_core.ingest.patch_grid.iter_patch_batches` reproduces pixel for pixel.
    """
    if size <= 0 or output_px <= 0:
        raise InputError(
            f"read_patch needs positive size and output_px, got {size} and {output_px}."
        )
    level, lv_ds = level_for(slide, size, output_px)
    sp = patch_span(l0_x, l0_y, size, lv_ds)
    region = slide.read_region(round(sp.lv_x0 * lv_ds), round(sp.lv_y0 * lv_ds), level,
                               (sp.lv_x1 - sp.lv_x0, sp.lv_y1 - sp.lv_y0))
    out = np.empty((output_px, output_px, 3), dtype=np.uint8)
    resample_into(region, sp.box, output_px, out)
    return out
