"""From a slide to a grid of quality-checked patches at a physical size.

:func:`tile_slide` is the whole step: find the smear
(:func:`cmil_core.ingest.foreground.detect_foreground`), lay a patch grid over
it in microns (:func:`cmil_core.ingest.patch_grid.make_grid`), read every patch
at the CNN's input size with bounded memory
(:mod:`cmil_core.ingest.patch_reading`), measure and judge it
(:func:`measure_grid`, :mod:`cmil_core.ingest.quality`), and return one table
row per kept cell. Its settings are a
:class:`~cmil_core.ingest.tiling_config.TilingConfig`. This module also holds
what the metrics are measured against: the glass under each patch
(:func:`glass_per_patch`) and the slide's stains (:func:`estimate_slide_stains`).

Coordinate systems (as in :mod:`cmil_core.ingest.slides`, plus one):

* ``l0_``: level-0 pixels. Stored patch coordinates ``x, y, size`` are in it.
* ``lv_``: pixels of a pyramid level; ``l0 = lv * level_downsample``.
* ``th_``: pixels of the smear's thumbnail (:mod:`cmil_core.ingest.foreground`);
  ``l0 = th * l0_per_th``.
* ``g_``: patch-grid indices; the cell ``(g_col, g_row)`` has its top-left at
  ``l0_x = l0_origin_x + g_col * stride``, ``l0_y = l0_origin_y + g_row * stride``.

Memory does not grow with the slide: patch reading and measuring hold about
40 MB (the chunks in flight, strips, the metric buffers; measured 40, 46 and
47 MB by tracemalloc on 8k, 16k and 32k px square slides). Only the
foreground pass holds the thumbnail and its two masks, 5 bytes per thumbnail
pixel (78 kB per mm2 of slide at 8 um/px, at most 80 MB at the 4096 px cap),
and the result table grows by about 120 bytes per patch.

Example::

    from cmil_core.ingest.quality import QCThresholds
    from cmil_core.ingest.slides import open_slide
    from cmil_core.ingest.tiling import tile_slide
    from cmil_core.ingest.tiling_config import TilingConfig

    with open_slide("P001_slide1.svs") as slide:
        table = tile_slide(slide, TilingConfig(), QCThresholds())
    table["qc_reason"].fillna("pass").value_counts()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import ndimage

from cmil_core.errors import InputError
from cmil_core.ingest.foreground import Foreground, detect_foreground
from cmil_core.ingest.patch_grid import PatchGrid, grid_geometry, make_grid, read_cells
from cmil_core.ingest.patch_reading import check_batching, chunks, map_ordered
from cmil_core.ingest.quality import (
    METRIC_COLUMNS,
    METRICS_VERSION,
    QCThresholds,
    measured_od,
    patch_metrics,
    qc_decision,
)
from cmil_core.ingest.slides import Slide
from cmil_core.ingest.stains import StainModel, estimate_stains
from cmil_core.ingest.tiling_config import TilingConfig, require_mpp

__all__ = [
    "GRID_COLUMNS",
    "TILE_COLUMNS",
    "estimate_slide_stains",
    "glass_per_patch",
    "measure_grid",
    "tile_slide",
]


#: Columns describing each kept grid cell (``x, y, size`` in level-0 pixels).
GRID_COLUMNS: tuple[str, ...] = (
    "g_col", "g_row", "x", "y", "size", "foreground_fraction", "thick_fraction",
)
#: Columns of :func:`tile_slide`'s table, in order.
TILE_COLUMNS: tuple[str, ...] = (*GRID_COLUMNS, "qc_pass", "qc_reason", *METRIC_COLUMNS)


# Glass field of a photograph: a view of about this many pixels, cut into cells
# of about _GLASS_FIELD_CELLS along the longer side.
_GLASS_FIELD_CELLS = 8
# Patches read (evenly through the grid) to estimate a slide's stains.
_STAIN_SAMPLE_CELLS = 12
# A photograph's cells are read once and kept when they take at most this many bytes.
_PHOTO_CELLS_BYTES = 64 * 1024 * 1024


_Metrics = dict[str, npt.NDArray[np.float64]]


def glass_per_patch(grid: PatchGrid, foreground: Foreground) -> npt.NDArray[np.float64]:
    """The glass colour under each cell of ``grid``: ``[len(grid), 3]``.

    A scanner lights the slide evenly, so a whole-slide image has one glass
    colour (``foreground.glass_rgb``). A photograph through a microscope does
    not: vignetting darkens the corners and many cameras tint the field
    unevenly (pink edges, cyan centre). There the glass is a smooth field made
    from the photograph's view (``foreground.thumbnail``): cut into about
    :data:`_GLASS_FIELD_CELLS` cells along its longer side; in each, the glass
    is the mean colour of its brightest tenth (the gaps between cells); a 5x5
    grey-level closing lets a cell packed with cells, or covered by one large
    white cell, take the glass of its neighbours; each patch gets
    the field at its centre (bilinear).
    """
    n = len(grid)
    if not grid.fitted or n == 0:
        return np.tile(np.asarray(foreground.glass_rgb, dtype=np.float64), (n, 1))
    view = foreground.thumbnail.astype(np.float32)
    view_h, view_w = view.shape[:2]
    cell = max(4, math.ceil(max(view_w, view_h) / _GLASS_FIELD_CELLS))
    n_x, n_y = math.ceil(view_w / cell), math.ceil(view_h / cell)
    padded = np.pad(view, ((0, n_y * cell - view_h), (0, n_x * cell - view_w), (0, 0)),
                    mode="edge")
    blocks = padded.reshape(n_y, cell, n_x, cell, 3).transpose(0, 2, 1, 3, 4)
    blocks = blocks.reshape(n_y, n_x, cell * cell, 3)
    bright = blocks.sum(axis=-1)
    top = bright >= np.percentile(bright, 90, axis=-1, keepdims=True)
    field_rgb = (blocks * top[..., None]).sum(axis=2) / top.sum(axis=-1)[..., None]
    field_rgb = np.stack(
        [ndimage.grey_closing(field_rgb[..., c], size=(5, 5), mode="nearest") for c in range(3)],
        axis=-1,
    ).astype(np.float64)
    # Patch centres in cell units (cell centres at 0.5, 1.5, ...).
    per_cell = foreground.l0_per_th * cell
    centre_x = (grid.x + grid.size / 2.0) / per_cell - 0.5
    centre_y = (grid.y + grid.size / 2.0) / per_cell - 0.5
    glass = np.stack(
        [ndimage.map_coordinates(field_rgb[..., c], [centre_y, centre_x], order=1,
                                 mode="nearest") for c in range(3)],
        axis=-1,
    )
    out: npt.NDArray[np.float64] = np.clip(glass, 1.0, 255.0).astype(np.float64)
    return out


def _um_per_output_px(slide: Slide, grid: PatchGrid) -> float:
    return grid.size * require_mpp(slide) / grid.output_px


def estimate_slide_stains(slide: Slide, grid: PatchGrid, glass: npt.NDArray[np.float64],
                          *, workers: int = 2,
                          cells: npt.NDArray[np.uint8] | None = None) -> StainModel:
    """The slide's stain vectors (:func:`~cmil_core.ingest.stains.estimate_stains`), sampled.

    Up to :data:`_STAIN_SAMPLE_CELLS` cells spread evenly through the grid are
    read and their pixels, at the measuring scale and relative to the glass
    under each (``glass``: :func:`glass_per_patch`), are pooled. ``cells``:
    every cell of the grid already read (:func:`tile_slide` reads a
    photograph's once), else they are read here.
    """
    n = len(grid)
    if n == 0:
        return estimate_stains(np.empty((0, 3)))
    picks = np.unique(np.linspace(0, n - 1, min(n, _STAIN_SAMPLE_CELLS)).round().astype(np.int64))
    um_px, mpp = _um_per_output_px(slide, grid), require_mpp(slide)

    def od_of(idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        pixels = cells[idx] if cells is not None else read_cells(slide, grid, idx)
        return measured_od(pixels, glass[idx], um_per_px=um_px, native_um=mpp)

    chunks = [picks[i:i + 8] for i in range(0, picks.size, 8)]
    return estimate_stains(np.concatenate(list(map_ordered(od_of, chunks, workers))))


def measure_grid(
    slide: Slide,
    grid: PatchGrid,
    glass_rgb: tuple[float, float, float] | npt.NDArray[np.float64],
    thresholds: QCThresholds,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch_size: int = 32,
    workers: int = 2,
    stains: StainModel | None = None,
    cells: npt.NDArray[np.uint8] | None = None,
) -> pd.DataFrame:
    """Read every cell of ``grid``, measure it and judge it: the table of :func:`tile_slide`.

    ``glass_rgb`` is the glass colour the metrics are relative to: one colour
    (:attr:`Foreground.glass_rgb` of the mask ``grid`` was made from) or one
    row per cell (:func:`glass_per_patch`); ``stains`` the slide's stain model
    (:func:`estimate_slide_stains`; the Romanowsky defaults when None). The
    table has no ``attrs`` (:func:`tile_slide` adds them). Each worker thread
    reads a chunk of ``batch_size`` cells and measures it, so reading and
    arithmetic overlap; ``progress(done, total)`` is called from this thread
    after each chunk. ``cells``: every cell already read (then nothing is read).
    """
    check_batching(batch_size, workers)
    n = len(grid)
    glass = np.asarray(glass_rgb, dtype=np.float64)
    per_cell = glass.ndim == 2
    if per_cell and glass.shape != (n, 3):
        raise InputError(f"glass_rgb has {glass.shape[0]} rows for {n} cells.")
    metrics = {name: np.full(n, np.nan) for name in METRIC_COLUMNS}
    if progress is not None:
        progress(0, n)
    um_px = _um_per_output_px(slide, grid) if n else 0.5
    mpp = require_mpp(slide)

    def measure(idx: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], _Metrics]:
        g = glass[idx] if per_cell else glass
        pixels = cells[idx] if cells is not None else read_cells(slide, grid, idx)
        return idx, patch_metrics(pixels, g, um_per_px=um_px, native_um=mpp, stains=stains)

    done = 0
    for idx, values in map_ordered(measure, chunks(n, batch_size), workers):
        for name in METRIC_COLUMNS:
            metrics[name][idx] = values[name]
        done += idx.size
        if progress is not None:
            progress(done, n)
    # A photograph is one field of view (quality.py: nucleated_scope); a slide is not.
    field = np.zeros(n, dtype=np.int64) if grid.fitted else None
    qc_pass, qc_reason = qc_decision(metrics, thresholds, thick_fraction=grid.thick_fraction,
                                     field=field)
    table: dict[str, Any] = {
        "g_col": grid.g_col.astype(np.int32),
        "g_row": grid.g_row.astype(np.int32),
        "x": grid.x.astype(np.int64),
        "y": grid.y.astype(np.int64),
        "size": np.full(n, grid.size, dtype=np.int32),
        "foreground_fraction": grid.foreground_fraction,
        "thick_fraction": grid.thick_fraction,
        "qc_pass": qc_pass,
        "qc_reason": pd.Series(qc_reason, dtype=object),
    }
    table.update(metrics)
    return pd.DataFrame(table, columns=list(TILE_COLUMNS))


def tile_slide(
    slide: Slide,
    config: TilingConfig,
    thresholds: QCThresholds,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch_size: int = 32,
    workers: int = 2,
) -> pd.DataFrame:
    """Foreground, grid, patch metrics and QC decision of one slide: one row per kept cell.

    Columns are :data:`TILE_COLUMNS`: ``g_col, g_row`` (grid indices), ``x, y,
    size`` (level-0 pixels), ``foreground_fraction, thick_fraction`` (from the
    thumbnail masks), ``qc_pass, qc_reason`` (:func:`cmil_core.ingest.quality.qc_decision`)
    and :data:`cmil_core.ingest.quality.METRIC_COLUMNS`. Rows are in grid order
    (row-major); a slide without smear gives an empty table. ``table.attrs["tiling"]``
    holds what a run must store to be reproduced: the config, the thresholds,
    :data:`~cmil_core.ingest.quality.METRICS_VERSION`, this slide's foreground numbers
    (:meth:`Foreground.thresholds`) and grid (:meth:`PatchGrid.describe`); read it
    before any pandas operation, which may drop ``attrs``.
    ``progress(done, total)`` is called with patch counts. The result depends
    only on the slide, ``config`` and ``thresholds``, not on ``batch_size`` or
    ``workers``.

    Raises :class:`~cmil_core.errors.InputError` for a slide without mpp (pass
    ``--mpp``) or smaller than one patch; a
    :class:`~cmil_core.ingest.slides.SlideError` from unreadable pixels propagates.
    """
    check_batching(batch_size, workers)
    grid_geometry(slide, config)  # fail fast (no mpp, too small) before reading any pixel
    foreground = detect_foreground(slide, config, workers=workers)
    grid = make_grid(slide, config, foreground)
    mask_numbers = foreground.thresholds()
    glass = glass_per_patch(grid, foreground)
    del foreground  # the thumbnail and masks are not needed while reading patches
    # A photograph's cells are few: read them once for the stain estimate and the metrics.
    n = len(grid)
    small = grid.fitted and n * grid.output_px * grid.output_px * 3 <= _PHOTO_CELLS_BYTES
    cells = read_cells(slide, grid, np.arange(n, dtype=np.int64)) if small else None
    stains = estimate_slide_stains(slide, grid, glass, workers=workers, cells=cells)
    table = measure_grid(slide, grid, glass, thresholds, progress,
                         batch_size=batch_size, workers=workers, stains=stains, cells=cells)
    table.attrs["tiling"] = {
        "config": config.to_dict(),
        "thresholds": thresholds.to_dict(),
        "metrics_version": METRICS_VERSION,
        "foreground": mask_numbers,
        "grid": grid.describe(),
        "stains": stains.to_dict(),
        "photograph": grid.fitted,
    }
    return table
