"""The patch grid over a slide at a physical size, and reading its cells.

:func:`make_grid` lays the grid over the smear of a
:class:`~cmil_core.ingest.foreground.Foreground` (a photograph's is fitted
edge to edge); :func:`iter_patch_batches` reads its cells in batches, a
horizontal run of adjacent cells sharing one strip (:func:`read_cells`).
Coordinate prefixes (``l0_``, ``lv_``, ``th_``, ``g_``) as in :mod:`cmil_core.ingest.tiling`.

Patch grid at a physical size
-----------------------------
The default patch is ``patch_um = 112`` microns resampled to ``output_px =
224`` pixels: 224 px is the input of the ImageNet CNNs the study's encoder
family uses; at 0.5 um/px (a 20x scan, and the demo slides) 112 um is exactly
224 px, so no resampling happens; at 0.25 um/px (40x) the patch is read from
the 2x pyramid level when there is one. 112 um holds several marrow cells
(10-20 um each) with their neighbours, enough context for a cluster of small
round blue cells, while staying small enough that one patch is mostly one
kind of tissue, which multiple-instance learning needs.

The grid covers the slide with whole cells only, centred (the margin left
over, less than one stride, is split between the two sides); ``overlap`` in
``[0, 0.9]`` shrinks the stride to ``size * (1 - overlap)``. A cell is kept
when at least ``min_foreground`` of it is smear on the thumbnail mask
(area-weighted, exact for the mask's pixels); cells dropped this way are not
rows of the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.errors import InputError
from cmil_core.ingest.foreground import Foreground
from cmil_core.ingest.patch_reading import (
    EPS,
    check_batching,
    chunks,
    level_for,
    map_ordered,
    patch_span,
    resample_into,
)
from cmil_core.ingest.slides import Slide
from cmil_core.ingest.tiling_config import TilingConfig, is_photograph, require_mpp

__all__ = [
    "MIN_PATCH_L0_PX",
    "PatchGrid",
    "grid_geometry",
    "iter_patch_batches",
    "make_grid",
    "read_cells",
]


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """The kept cells of a slide's patch grid.

    ``size`` is level-0 pixels; the cell ``(g_col[i], g_row[i])`` covers
    ``[x[i], x[i] + size) x [y[i], y[i] + size)`` with ``x = col_x[g_col]`` and
    ``y = row_y[g_row]``. On a whole-slide image the columns are ``stride``
    apart from ``l0_origin``; on a photograph (``fitted``) they are spread
    evenly from edge to edge, so the grid covers the whole field with as
    little overlap as that needs (``stride`` is then the largest gap between
    neighbours). Cells are in row-major order (by ``g_row``, then ``g_col``).
    ``n_cols, n_rows`` count the whole grid, kept or not.
    """

    size: int
    stride: int
    output_px: int
    l0_origin: tuple[int, int]
    n_cols: int
    n_rows: int
    g_col: npt.NDArray[np.int64]
    g_row: npt.NDArray[np.int64]
    foreground_fraction: npt.NDArray[np.float64]
    thick_fraction: npt.NDArray[np.float64]
    col_x: npt.NDArray[np.int64] | None = None
    row_y: npt.NDArray[np.int64] | None = None
    fitted: bool = False
    x: npt.NDArray[np.int64] = field(init=False)
    y: npt.NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        if self.col_x is None:
            object.__setattr__(self, "col_x", self.l0_origin[0]
                               + np.arange(self.n_cols, dtype=np.int64) * self.stride)
        if self.row_y is None:
            object.__setattr__(self, "row_y", self.l0_origin[1]
                               + np.arange(self.n_rows, dtype=np.int64) * self.stride)
        assert self.col_x is not None and self.row_y is not None
        object.__setattr__(self, "x", self.col_x[self.g_col].astype(np.int64))
        object.__setattr__(self, "y", self.row_y[self.g_row].astype(np.int64))

    def __len__(self) -> int:
        return int(self.g_col.size)

    def describe(self) -> dict[str, Any]:
        """The grid's geometry, JSON-ready (level-0 pixels and cell counts)."""
        return {
            "size": self.size, "stride": self.stride, "output_px": self.output_px,
            "l0_origin": [int(self.l0_origin[0]), int(self.l0_origin[1])],
            "n_cols": self.n_cols, "n_rows": self.n_rows, "kept": len(self),
            "fitted": self.fitted,
        }


def _box_fractions(
    mask: npt.NDArray[np.bool_], th_x0: npt.NDArray[np.float64], th_y0: float, th_side: float,
) -> npt.NDArray[np.float64]:
    """Share of each square ``[x0, x0 + side) x [y0, y0 + side)`` (thumbnail px) inside ``mask``.

    All squares share the top ``th_y0`` (one grid row). Bilinear interpolation
    of the summed-area table of the band of mask rows they cover is exact for a
    mask that is constant on each pixel; outside the thumbnail counts as not-mask.
    """
    h, w = mask.shape
    band0 = min(max(math.floor(th_y0), 0), h)
    band1 = min(max(math.ceil(th_y0 + th_side), band0), h)
    band = mask[band0:band1]
    sat = np.zeros((band.shape[0] + 1, w + 1), dtype=np.int32)  # exact counts
    if band.size:
        np.cumsum(np.cumsum(band, axis=0, dtype=np.int32), axis=1, out=sat[1:, 1:])

    def at(xs: npt.NDArray[np.float64], y: float) -> npt.NDArray[np.float64]:
        xs = np.clip(xs, 0.0, float(w))
        y = min(max(y - band0, 0.0), float(band.shape[0]))
        x0 = np.minimum(np.floor(xs).astype(np.int64), max(w - 1, 0))
        y0 = min(math.floor(y), max(band.shape[0] - 1, 0))
        fx, fy = xs - x0, y - y0
        top = sat[y0, x0] * (1.0 - fx) + sat[y0, x0 + 1] * fx
        bottom = sat[y0 + 1, x0] * (1.0 - fx) + sat[y0 + 1, x0 + 1] * fx
        return np.asarray(top * (1.0 - fy) + bottom * fy)

    if w == 0 or band.shape[0] == 0:
        return np.zeros(th_x0.shape, dtype=np.float64)
    x1, y1 = th_x0 + th_side, th_y0 + th_side
    inside = at(x1, y1) - at(th_x0, y1) - at(x1, th_y0) + at(th_x0, th_y0)
    return np.clip(inside / (th_side * th_side), 0.0, 1.0)


# A patch smaller than this many level-0 pixels means the resolution is wrong
# (e.g. a TIFF's 72-dpi default read as microns per pixel), not a real slide.
MIN_PATCH_L0_PX = 8


def _fitted_positions(length: int, size: int, stride: int) -> npt.NDArray[np.int64]:
    """Starts of cells of ``size`` spread evenly over ``length``, at most ``stride`` apart.

    The first cell starts at 0 and the last ends at ``length``; neighbours
    overlap only as much as covering the whole length needs.
    """
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((length - size) / stride - EPS) + 1
    return np.round(np.linspace(0.0, float(length - size), n)).astype(np.int64)


def grid_geometry(slide: Slide, config: TilingConfig) -> tuple[int, int, int, int, tuple[int, int]]:
    """``size, stride, n_cols, n_rows, l0_origin`` of the full grid (checks mpp and slide size).

    A photograph (:func:`is_photograph`) is covered edge to edge (``l0_origin``
    is (0, 0); :func:`make_grid` spreads the cells); a whole-slide image gets
    whole cells only, centred.
    """
    mpp = require_mpp(slide)
    size = config.patch_l0_px(mpp)
    if size < MIN_PATCH_L0_PX:
        raise InputError(
            f"{slide.path.name}: at {mpp:g} um/px a {config.patch_um:g} um patch is only "
            f"{size} px; that resolution is not a microscope's: pass the right --mpp"
        )
    stride = max(1, round(size * (1.0 - config.overlap)))
    if slide.width < size or slide.height < size:
        fits_um = math.floor(min(slide.width, slide.height) * mpp * 10.0 + EPS) / 10.0
        hint = (f"pass --patch-um {fits_um:g} or less (or check --mpp)" if fits_um * 10 >= 1
                else "check --mpp")
        raise InputError(
            f"{slide.path.name}: {slide.width}x{slide.height} px at {mpp:g} um/px "
            f"({slide.width * mpp:.4g} x {slide.height * mpp:.4g} um) is smaller than one "
            f"{config.patch_um:g} um patch ({size} px); {hint}."
        )
    if is_photograph(slide, config):
        n_cols = _fitted_positions(slide.width, size, stride).size
        n_rows = _fitted_positions(slide.height, size, stride).size
        return size, stride, n_cols, n_rows, (0, 0)
    n_cols = (slide.width - size) // stride + 1
    n_rows = (slide.height - size) // stride + 1
    l0_origin = (
        (slide.width - ((n_cols - 1) * stride + size)) // 2,
        (slide.height - ((n_rows - 1) * stride + size)) // 2,
    )
    return size, stride, n_cols, n_rows, l0_origin


def make_grid(slide: Slide, config: TilingConfig, foreground: Foreground) -> PatchGrid:
    """The patch grid at ``config.patch_um`` microns.

    On a whole-slide image, cells that are mostly smear are kept
    (``config.min_foreground``); a photograph is a field the operator chose, so
    the grid covers all of it (:func:`is_photograph`) and only quality control
    rejects patches. Raises :class:`~cmil_core.errors.InputError` when the
    slide has no mpp or is smaller than one patch (the message gives the
    ``--patch-um`` that fits).
    """
    size, stride, n_cols, n_rows, l0_origin = grid_geometry(slide, config)
    photo = is_photograph(slide, config)
    if photo:
        col_x = _fitted_positions(slide.width, size, stride)
        row_y = _fitted_positions(slide.height, size, stride)
        gaps = np.diff(np.concatenate([col_x, row_y]))
        stride = int(gaps.max()) if gaps.size else size
    else:
        col_x = l0_origin[0] + np.arange(n_cols, dtype=np.int64) * stride
        row_y = l0_origin[1] + np.arange(n_rows, dtype=np.int64) * stride
    th_side = size / foreground.l0_per_th
    cols = np.arange(n_cols, dtype=np.int64)
    keep_col: list[npt.NDArray[np.int64]] = []
    keep_row: list[npt.NDArray[np.int64]] = []
    keep_fg: list[npt.NDArray[np.float64]] = []
    keep_thick: list[npt.NDArray[np.float64]] = []
    th_x0 = col_x / foreground.l0_per_th
    for row in range(n_rows):  # one band of mask rows at a time: memory flat
        th_y0 = float(row_y[row]) / foreground.l0_per_th
        fg = _box_fractions(foreground.smear, th_x0, th_y0, th_side)
        keep = np.ones(n_cols, dtype=bool) if photo else fg >= config.min_foreground - EPS
        if not np.any(keep):
            continue
        keep_col.append(cols[keep])
        keep_row.append(np.full(int(keep.sum()), row, dtype=np.int64))
        keep_fg.append(fg[keep])
        keep_thick.append(_box_fractions(foreground.thick, th_x0[keep], th_y0, th_side))

    def cat(parts: list[npt.NDArray[Any]], dtype: type) -> npt.NDArray[Any]:
        return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)

    return PatchGrid(
        size=size, stride=stride, output_px=config.output_px, l0_origin=l0_origin,
        n_cols=n_cols, n_rows=n_rows,
        g_col=cat(keep_col, np.int64), g_row=cat(keep_row, np.int64),
        foreground_fraction=cat(keep_fg, np.float64), thick_fraction=cat(keep_thick, np.float64),
        col_x=col_x.astype(np.int64), row_y=row_y.astype(np.int64), fitted=photo,
    )


def _runs(grid: PatchGrid, idx: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Split cells (row-major) into runs of horizontally adjacent cells of one row."""
    if idx.size == 0:
        return []
    cols, rows = grid.g_col[idx], grid.g_row[idx]
    breaks = np.flatnonzero((np.diff(rows) != 0) | (np.diff(cols) != 1)) + 1
    return np.split(idx, breaks)


def read_cells(slide: Slide, grid: PatchGrid, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Patches of cells ``idx`` as ``[len(idx), output_px, output_px, 3]``, one strip per run."""
    out_px = grid.output_px
    out = np.empty((idx.size, out_px, out_px, 3), dtype=np.uint8)
    level, lv_ds = level_for(slide, grid.size, out_px)
    pos = 0
    for run in _runs(grid, idx):
        spans = [patch_span(int(grid.x[i]), int(grid.y[i]), grid.size, lv_ds) for i in run]
        lv_x0, lv_y0 = spans[0].lv_x0, spans[0].lv_y0
        lv_x1, lv_y1 = spans[-1].lv_x1, spans[0].lv_y1
        strip = slide.read_region(round(lv_x0 * lv_ds), round(lv_y0 * lv_ds), level,
                                  (lv_x1 - lv_x0, lv_y1 - lv_y0))
        for sp in spans:
            region = strip[:, sp.lv_x0 - lv_x0 : sp.lv_x1 - lv_x0]
            resample_into(region, sp.box, out_px, out[pos])
            pos += 1
    return out


def iter_patch_batches(
    slide: Slide, grid: PatchGrid, batch_size: int = 64, *, workers: int = 2,
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
    """Yield ``(indices, patches)``: grid positions and uint8 ``[B, output_px, output_px, 3]``.

    Batches come in grid order; memory holds at most ``2 * workers + 1``
    batches whatever the slide's size. ``workers=0`` reads in the calling thread.
    Arguments are checked here, before the first batch is asked for.
    """
    check_batching(batch_size, workers)
    return map_ordered(lambda idx: (idx, read_cells(slide, grid, idx)),
                        chunks(len(grid), batch_size), workers)
