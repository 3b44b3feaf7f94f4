"""From a slide to a grid of quality-checked patches at a physical size.

:func:`tile_slide` is the whole step: find the smear (:func:`detect_foreground`),
lay a patch grid over it in microns (:func:`make_grid`), read every patch at the
CNN's input size with bounded memory (:func:`iter_patch_batches`), measure and
judge it (:mod:`cmil_core.ingest.quality`), and return one table row per kept cell.

Coordinate systems (as in :mod:`cmil_core.ingest.slides`, plus one):

* ``l0_``: level-0 pixels. Stored patch coordinates ``x, y, size`` are in it.
* ``lv_``: pixels of a pyramid level; ``l0 = lv * level_downsample``.
* ``th_``: pixels of this module's thumbnail; ``l0 = th * l0_per_th``.
* ``g_``: patch-grid indices; the cell ``(g_col, g_row)`` has its top-left at
  ``l0_x = l0_origin_x + g_col * stride``, ``l0_y = l0_origin_y + g_row * stride``.

Foreground for smears
---------------------
H&E tissue segmenters look for large, dense, pink-purple regions; a marrow
smear is a thin film of mostly red cells with glass between them, thickening
into unreadable clumps and particles. So the smear is found by how much light
it absorbs compared with bare glass (:func:`detect_foreground`):

1. A thumbnail at ``thumbnail_um`` microns per pixel (8 um: about one red cell
   per pixel; capped at ``max_thumbnail_px`` on its longer side, never finer
   than level 0), read strip by strip from the best pyramid level and
   box-averaged, so memory does not grow with the slide.
2. The glass colour: the commonest brightness among nearly grey pixels of
   the brighter half of the thumbnail (bare glass is the largest uniform
   population of a slide), as the per-channel median of the pixels at that
   peak. A thumbnail under 16,384 pixels (a small slide, a photograph) is too
   coarse for a histogram; the glass is then estimated from a finer view.
   Photographs through a microscope have grey or tinted glass (about RGB 200
   on the BCCD images), so everything below is relative to it.
3. Optical density relative to the glass, ``OD_c = log10(glass_c / I_c)``
   (Beer-Lambert), and its maximum over the channels: glass is near 0 in every
   channel, red cells absorb green, nuclei absorb red.
4. Smear = ``OD_max >= t`` where ``t`` is Otsu's threshold on ``OD_max``,
   clipped to ``[min_smear_od, max_smear_od]``. The floor keeps a nearly empty
   slide from being split into "darker glass" and "lighter glass" (Otsu always
   finds two classes); the cap keeps a slide with much tissue, many nuclei or
   thick areas from being split into "thin smear" (called glass) and "dense".
5. Thick = mean OD over the channels ``>= thick_od`` (1.0 by default, less
   than 10 % of the light passes: nearly opaque at 8 um per pixel), inside the
   smear. Thick areas are kept as rows (they are smear) but flagged: their
   share of each cell becomes ``thick_fraction``, and the quality rule
   "thick smear" rejects cells that are mostly thick.
6. Cleaning with :mod:`scipy.ndimage`. A smear is cells with glass between
   them, so the smear mask is first closed with a disk of radius 16 um (2
   thumbnail pixels at 8 um/px): cells less than about two red-cell diameters apart join
   into one smear region, while open glass (the feathered edge, gaps, the
   slide around the smear) stays out. A 3x3 opening then drops specks (dust,
   a lone cell on glass). The thick mask is only opened. Borders are padded by
   replication so that neither operation eats the image edge.

Caveats: the glass estimate needs some bare glass on the slide; a slide
completely covered by smear makes its palest smear the "glass", and the floor
then keeps only the denser smear. Pen marks, labels and coverslip edges absorb
light too and are kept as smear (quality control rejects most of their
patches: no nucleated cell). The mask is coarse on purpose: it only spares the
reading of open glass; whether a patch is good is decided on its own pixels.

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
chunks in flight; in :func:`tile_slide` each worker also measures its chunk,
so reading and arithmetic overlap. Strips and single-patch reads measured the
same speed within 5 % (``bench/tiling.py``); strips make fewer calls and never
decode a tile twice when OpenSlide's tile cache is small. Results do not
depend on ``batch_size`` or ``workers``.

Memory does not grow with the slide: patch reading and measuring hold about
40 MB (the chunks in flight, strips, the metric buffers; measured 40, 46 and
47 MB by tracemalloc on 8k, 16k and 32k px square slides). Only the
foreground pass holds the thumbnail and its two masks, 5 bytes per thumbnail
pixel (78 kB per mm2 of slide at 8 um/px, at most 80 MB at the 4096 px cap),
and the result table grows by about 120 bytes per patch.

Example::

    from cmil_core.ingest.quality import QCThresholds
    from cmil_core.ingest.slides import open_slide
    from cmil_core.ingest.tiling import TilingConfig, tile_slide

    with open_slide("P001_slide1.svs") as slide:
        table = tile_slide(slide, TilingConfig(), QCThresholds())
    table["qc_reason"].fillna("pass").value_counts()
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
from PIL import Image
from scipy import ndimage

from cmil_core.errors import InputError
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

__all__ = [
    "GRID_COLUMNS",
    "TILE_COLUMNS",
    "Foreground",
    "PatchGrid",
    "TilingConfig",
    "detect_foreground",
    "estimate_slide_stains",
    "glass_per_patch",
    "is_photograph",
    "iter_patch_batches",
    "make_grid",
    "map_ordered",
    "measure_grid",
    "read_patch",
    "tile_slide",
]

#: Columns describing each kept grid cell (``x, y, size`` in level-0 pixels).
GRID_COLUMNS: tuple[str, ...] = (
    "g_col", "g_row", "x", "y", "size", "foreground_fraction", "thick_fraction",
)
#: Columns of :func:`tile_slide`'s table, in order.
TILE_COLUMNS: tuple[str, ...] = (*GRID_COLUMNS, "qc_pass", "qc_reason", *METRIC_COLUMNS)

# Level pixels per strip when reading the thumbnail (1 Mpx: about 8 MB with RGBA).
_THUMB_STRIP_PIXELS = 1024 * 1024
# Thumbnail pixels per strip when computing optical densities (float32 planes of 1 MB).
_OD_STRIP_PIXELS = 256 * 1024
# Otsu's histogram: optical densities 0 to 2.5 (black under white glass is 2.4) in 0.002 bins.
_OTSU_BIN_OD = 0.002
_OTSU_BINS = 1250
# Resampling filter for patches and thumbnails.
_RESAMPLE = Image.Resampling.BOX
_EPS = 1e-9
# A pyramid level within this factor of the wanted downsample is good enough.
_LEVEL_SLACK = 1.001
# The glass colour is a histogram mode: it needs at least this many pixels;
# from a smaller thumbnail it is taken from a finer view of about _GLASS_VIEW_PIXELS.
_GLASS_MIN_PIXELS = 16_384
_GLASS_VIEW_PIXELS = 65_536
_GLASS_SAMPLE_PIXELS = 1_048_576
# Glass field of a photograph: a view of about this many pixels, cut into cells
# of about _GLASS_FIELD_CELLS along the longer side.
_GLASS_FIELD_CELLS = 8
# Patches read (evenly through the grid) to estimate a slide's stains.
_STAIN_SAMPLE_CELLS = 12
# Closing radius of the smear mask in microns (2 px at 8 um/px): joins cells
# separated by less than about two red-cell diameters of glass.
_SMEAR_CLOSE_UM = 16.0

T = TypeVar("T")
R = TypeVar("R")
_Metrics = dict[str, npt.NDArray[np.float64]]


@dataclass(frozen=True)
class TilingConfig:
    """How a slide becomes a patch grid; store :meth:`to_dict` with the run.

    ``patch_um``: side of a patch in microns (112: see the module docstring).
    ``output_px``: side in pixels the patches are resampled to (224).
    ``overlap``: fraction of a patch shared with its neighbour, in [0, 0.9].
    ``min_foreground``: share of a cell that must be smear to keep it (0.1: the
    mask only skips open glass quickly; the pixel rule "background" of
    :mod:`cmil_core.ingest.quality` makes the real call, with a stored reason).
    ``thumbnail_um``: microns per thumbnail pixel for the foreground (8).
    ``max_thumbnail_px``: cap on the thumbnail's longer side (4096).
    ``min_smear_od`` / ``max_smear_od``: floor and cap of the Otsu threshold on
    the optical density relative to glass (0.04 and 0.08). Glass noise and
    JPEG ringing stay under 0.03 at thumbnail scale; a thin smear (red cells,
    green OD about 0.2, covering half of a thumbnail pixel) gives about 0.08
    to 0.1, and Otsu lands at 0.05-0.07 on the BCCD photographs. Tissue,
    nuclei or thick areas pull Otsu far higher (0.22 on CMU-1), which would
    call a thin smear glass: hence the cap.
    ``thick_od``: mean OD relative to glass from which a thumbnail pixel is a
    thick, unreadable area (1.0: a tenth of the light passes, nearly black).
    Deliberately high: dense clusters of small round blue tumour cells must
    not be masked as "thick"; darker-than-normal patches that are still
    translucent are judged by the quality rule "too dark" instead.
    ``fov_max_mm``: a plain image (jpg, png, bmp, one-level tif) whose longer
    side is at most this many millimetres (5: a 10x objective's field is about
    2 mm, a 100x oil field 0.2 mm) is a microscope field of view, tiled edge
    to edge (:func:`is_photograph`); a larger one (a stitched whole smear) is
    treated like a scan, with the smear mask. 0 treats every image as a scan.
    """

    patch_um: float = 112.0
    output_px: int = 224
    overlap: float = 0.0
    min_foreground: float = 0.1
    thumbnail_um: float = 8.0
    max_thumbnail_px: int = 4096
    min_smear_od: float = 0.04
    max_smear_od: float = 0.08
    thick_od: float = 1.0
    fov_max_mm: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value):
                raise InputError(f"tiling setting {f.name}={value!r} is not a finite number.")
        for name in ("output_px", "max_thumbnail_px"):
            value = getattr(self, name)
            if not float(value).is_integer():
                raise InputError(
                    f"tiling setting {name}={value!r} must be a whole number of pixels."
                )
            object.__setattr__(self, name, int(value))
        for name in ("patch_um", "overlap", "min_foreground", "thumbnail_um",
                     "min_smear_od", "max_smear_od", "thick_od", "fov_max_mm"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.patch_um <= 0:
            raise InputError(f"tiling setting patch_um={self.patch_um} must be positive.")
        if not 8 <= self.output_px <= 4096:
            raise InputError(f"tiling setting output_px={self.output_px} must be in [8, 4096].")
        if not 0.0 <= self.overlap <= 0.9:
            raise InputError(f"tiling setting overlap={self.overlap} must be in [0, 0.9].")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise InputError(
                f"tiling setting min_foreground={self.min_foreground} must be in [0, 1]."
            )
        if self.fov_max_mm < 0:
            raise InputError(f"tiling setting fov_max_mm={self.fov_max_mm} must be >= 0.")
        if self.thumbnail_um <= 0:
            raise InputError(f"tiling setting thumbnail_um={self.thumbnail_um} must be positive.")
        if self.max_thumbnail_px < 16:
            raise InputError(
                f"tiling setting max_thumbnail_px={self.max_thumbnail_px} must be >= 16."
            )
        if not 0.0 < self.min_smear_od <= self.max_smear_od:
            raise InputError(
                f"tiling settings need 0 < min_smear_od <= max_smear_od, got "
                f"{self.min_smear_od} and {self.max_smear_od}."
            )
        if self.thick_od <= self.max_smear_od:
            raise InputError(
                f"tiling setting thick_od={self.thick_od} must exceed "
                f"max_smear_od={self.max_smear_od}."
            )

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return dict(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TilingConfig:
        """A config from :meth:`to_dict`'s dict; missing keys take defaults, unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown tiling setting(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}."
            )
        return cls(**dict(data))

    def patch_l0_px(self, mpp: float) -> int:
        """Side of a patch in level-0 pixels at ``mpp`` microns per pixel."""
        return max(1, round(self.patch_um / mpp))


@dataclass(frozen=True, eq=False)
class Foreground:
    """Smear and thick-area masks of a slide, in thumbnail pixels.

    ``smear`` and ``thick`` are bool ``[th_h, th_w]``; ``thumbnail`` the uint8
    RGB thumbnail they come from; ``l0_per_th`` the level-0 pixels per
    thumbnail pixel (the same on both axes: ``l0 = th * l0_per_th``);
    ``glass_rgb`` the estimated colour of bare glass; ``otsu_od`` Otsu's
    threshold before clipping, ``smear_od`` the threshold used, ``thick_od``
    the thick-area threshold (optical densities relative to the glass).
    """

    smear: npt.NDArray[np.bool_]
    thick: npt.NDArray[np.bool_]
    thumbnail: npt.NDArray[np.uint8]
    l0_per_th: float
    glass_rgb: tuple[float, float, float]
    otsu_od: float
    smear_od: float
    thick_od: float

    @property
    def smear_fraction(self) -> float:
        """Share of the thumbnail that is smear."""
        return float(self.smear.mean()) if self.smear.size else 0.0

    def thresholds(self) -> dict[str, float | list[float]]:
        """The numbers this mask was made with, JSON-ready (store them with the slide)."""
        return {
            "l0_per_th": self.l0_per_th,
            "glass_rgb": [float(v) for v in self.glass_rgb],
            "otsu_od": self.otsu_od,
            "smear_od": self.smear_od,
            "thick_od": self.thick_od,
        }


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


def is_photograph(slide: Slide, config: TilingConfig | None = None) -> bool:
    """A plain picture (jpg, png, bmp, one-level tif) of at most ``config.fov_max_mm``.

    Such an image is a microscope field of view the operator chose: it is
    tiled edge to edge and only quality control rejects its patches.
    """
    cfg = config if config is not None else TilingConfig()
    if not slide.kind.startswith("image:") or slide.mpp is None:
        return False
    return max(slide.width, slide.height) * float(slide.mpp) <= cfg.fov_max_mm * 1000.0


def _require_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise InputError(
            f"{slide.path.name}: the file has no resolution (microns per pixel); "
            "pass --mpp (or an mpp column in the manifest)."
        )
    return float(slide.mpp)


# --------------------------------------------------------------------------- foreground


def _read_thumbnail(slide: Slide, l0_per_th: float, th_w: int, th_h: int,
                    workers: int) -> npt.NDArray[np.uint8]:
    """Box-averaged thumbnail ``[th_h, th_w, 3]``, read in strips from the best level."""
    level = slide.best_level_for_downsample(l0_per_th * _LEVEL_SLACK)
    lv_ds = float(slide.level_downsamples[level])
    lv_per_th = l0_per_th / lv_ds
    lv_w = th_w * lv_per_th  # may pass the slide's edge: read_region paints it white
    lv_read_w = math.ceil(lv_w - _EPS)
    rows = max(1, int(_THUMB_STRIP_PIXELS // max(lv_read_w * lv_per_th, 1.0)))
    out = np.empty((th_h, th_w, 3), dtype=np.uint8)

    def strip(th_r0: int) -> tuple[int, npt.NDArray[np.uint8]]:
        th_r1 = min(th_h, th_r0 + rows)
        lv_fy0, lv_fy1 = th_r0 * lv_per_th, th_r1 * lv_per_th
        lv_y0 = math.floor(lv_fy0 + _EPS)
        lv_y1 = max(lv_y0 + 1, math.ceil(lv_fy1 - _EPS))
        region = slide.read_region(0, round(lv_y0 * lv_ds), level, (lv_read_w, lv_y1 - lv_y0))
        img = Image.fromarray(region).resize(
            (th_w, th_r1 - th_r0), _RESAMPLE, box=(0.0, lv_fy0 - lv_y0, lv_w, lv_fy1 - lv_y0)
        )
        return th_r0, np.asarray(img)

    for th_r0, rgb in map_ordered(strip, range(0, th_h, rows), workers):
        out[th_r0 : th_r0 + rgb.shape[0]] = rgb
    return out


def _estimate_glass(rgb: npt.NDArray[np.uint8]) -> tuple[float, float, float]:
    """The colour of bare glass: the commonest brightness among nearly grey, bright pixels.

    Bare glass is the largest uniform population of a slide (and of the
    background of a photograph): a sharp peak in the brightness histogram of
    nearly grey pixels (max - min channel <= 24). The peak is searched in the
    brighter half of those pixels; the pixels within 12 (of 765) of it are the
    glass, and its colour is their per-channel median. Taking "the brightest
    5 %" instead would pick JPEG ringing or refractile artefacts brighter than
    the glass. Pure white stays in: it is the glass of scanners that clip it,
    and where it is OpenSlide's paint outside the scanned area, calling it the
    glass moves real glass (about 240) by an optical density of only 0.03.
    """
    step = max(1, math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / _GLASS_SAMPLE_PIXELS)))
    sample = rgb[::step, ::step]  # a histogram needs no more than about a megapixel
    r, g, b = (np.ascontiguousarray(sample[..., c]).reshape(-1) for c in range(3))
    brightness = r.astype(np.int32) + g + b
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    candidates = chroma <= 24
    if np.count_nonzero(candidates) < max(16, brightness.size // 200):
        candidates = np.ones_like(candidates)  # no grey at all: the commonest bright colour
    values = brightness[candidates]
    hist = np.bincount(values, minlength=766).astype(np.float64)
    smooth = np.convolve(hist, np.ones(7), mode="same")
    lower = int(np.median(values))
    peak = lower + int(np.argmax(smooth[lower:]))
    glass_px = candidates & (np.abs(brightness - peak) <= 12)
    glass = [float(np.clip(np.median(ch[glass_px]), 1.0, 255.0)) for ch in (r, g, b)]
    return (glass[0], glass[1], glass[2])


def _od_luts(glass: tuple[float, float, float]) -> list[npt.NDArray[np.float32]]:
    """Per channel, uint8 level -> optical density relative to the glass, clipped at 0."""
    levels = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    return [np.maximum(np.log10(glass[c] / levels), 0.0).astype(np.float32) for c in range(3)]


def _od_strips(
    rgb: npt.NDArray[np.uint8], luts: list[npt.NDArray[np.float32]],
) -> Iterator[tuple[slice, npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """``(rows, OD max over channels, OD sum over channels)`` strip by strip.

    Row strips of about a megapixel keep the float planes small whatever the
    thumbnail's size.
    """
    rows = max(1, _OD_STRIP_PIXELS // max(rgb.shape[1], 1))
    for r0 in range(0, rgb.shape[0], rows):
        part = rgb[r0 : r0 + rows]
        od_max = luts[0][part[..., 0]]
        od_sum = od_max.copy()
        for c in (1, 2):
            od_c = luts[c][part[..., c]]
            np.maximum(od_max, od_c, out=od_max)
            od_sum += od_c
        yield slice(r0, r0 + part.shape[0]), od_max, od_sum


def _otsu(hist: npt.NDArray[np.float64], bin_width: float) -> float:
    """Otsu's threshold (maximum between-class variance) of a histogram whose bins start at 0."""
    if hist.sum() <= 0 or np.count_nonzero(hist) < 2:
        return 0.0
    centres = (np.arange(hist.size) + 0.5) * bin_width
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.maximum(w0, 1.0)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1.0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return float((k + 1) * bin_width)


def _disk(radius: int) -> npt.NDArray[np.bool_]:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(xx * xx + yy * yy <= radius * radius + radius)  # 5x5 without corners for r=2


def _clean(mask: npt.NDArray[np.bool_], close_radius: int) -> npt.NDArray[np.bool_]:
    """Closing with a disk (join cells into a smear), then a 3x3 opening (drop specks).

    Borders are padded by replication, so neither operation eats the image
    edge. Works in strips of rows with a halo wide enough that the result is
    the same as on the whole mask, so the temporaries stay small.
    """
    h, w = mask.shape
    out = np.empty_like(mask)
    if mask.size == 0:
        return out
    halo = 2 * close_radius + 3  # closing reaches 2 r, opening 2 more, plus one
    square = np.ones((3, 3), dtype=bool)
    disk = _disk(close_radius) if close_radius > 0 else None
    rows = max(1, _OD_STRIP_PIXELS // (w + 2 * halo))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a0, a1 = max(0, r0 - halo), min(h, r1 + halo)
        pad_top, pad_bottom = halo - (r0 - a0), halo - (a1 - r1)
        work = np.pad(mask[a0:a1], ((pad_top, pad_bottom), (halo, halo)), mode="edge")
        if disk is not None:
            work = ndimage.binary_closing(work, structure=disk)
        work = ndimage.binary_opening(work, structure=square)
        out[r0:r1] = work[halo : halo + (r1 - r0), halo : halo + w]
    return out


def _field_of_view(slide: Slide, cfg: TilingConfig, workers: int) -> Foreground:
    """A photograph's "foreground": all of it is smear, none of it thick.

    The field is the operator's choice, so nothing is masked; the view
    (about :data:`_GLASS_VIEW_PIXELS`, fine enough to see the gaps between red
    cells) serves the glass estimate and the glass field
    (:func:`glass_per_patch`).
    """
    l0_per_px = max(1.0, math.sqrt(slide.width * slide.height / _GLASS_VIEW_PIXELS))
    view_w = max(1, math.ceil(slide.width / l0_per_px - _EPS))
    view_h = max(1, math.ceil(slide.height / l0_per_px - _EPS))
    view = _read_thumbnail(slide, l0_per_px, view_w, view_h, workers)
    return Foreground(
        smear=np.ones(view.shape[:2], dtype=bool), thick=np.zeros(view.shape[:2], dtype=bool),
        thumbnail=view, l0_per_th=float(l0_per_px), glass_rgb=_estimate_glass(view),
        otsu_od=0.0, smear_od=0.0, thick_od=cfg.thick_od,
    )


def detect_foreground(
    slide: Slide, config: TilingConfig | None = None, *, workers: int = 2
) -> Foreground:
    """Smear and thick-area masks at thumbnail scale (method in the module docstring).

    ``workers`` threads read the thumbnail's strips (0: the calling thread).

    Raises :class:`~cmil_core.errors.InputError` when the slide has no mpp, and
    lets a :class:`~cmil_core.ingest.slides.SlideError` from reading pixels through.
    """
    cfg = config if config is not None else TilingConfig()
    _check_workers(workers)
    mpp = _require_mpp(slide)
    if is_photograph(slide, cfg):
        return _field_of_view(slide, cfg, workers)
    longest = max(slide.width, slide.height)
    l0_per_th = max(cfg.thumbnail_um / mpp, 1.0, longest / cfg.max_thumbnail_px)
    th_w = max(1, math.ceil(slide.width / l0_per_th - _EPS))
    th_h = max(1, math.ceil(slide.height / l0_per_th - _EPS))
    rgb = _read_thumbnail(slide, l0_per_th, th_w, th_h, workers)
    if rgb.shape[0] * rgb.shape[1] >= _GLASS_MIN_PIXELS:
        glass = _estimate_glass(rgb)
    else:  # a small slide or photograph: estimate the glass from a finer view
        l0_per_px = max(1.0, math.sqrt(slide.width * slide.height / _GLASS_VIEW_PIXELS))
        fine_w = max(1, math.ceil(slide.width / l0_per_px - _EPS))
        fine_h = max(1, math.ceil(slide.height / l0_per_px - _EPS))
        glass = _estimate_glass(_read_thumbnail(slide, l0_per_px, fine_w, fine_h, workers))
    luts = _od_luts(glass)
    hist = np.zeros(_OTSU_BINS, dtype=np.float64)
    for _, od_max, _ in _od_strips(rgb, luts):
        idx = np.minimum((od_max * (1.0 / _OTSU_BIN_OD)).astype(np.int64), _OTSU_BINS - 1)
        hist += np.bincount(idx.reshape(-1), minlength=_OTSU_BINS)
    otsu = _otsu(hist, _OTSU_BIN_OD)
    smear_od = min(max(otsu, cfg.min_smear_od), cfg.max_smear_od)
    smear = np.empty(rgb.shape[:2], dtype=bool)
    thick = np.empty(rgb.shape[:2], dtype=bool)
    for rows, od_max, od_sum in _od_strips(rgb, luts):
        np.greater_equal(od_max, smear_od, out=smear[rows])
        np.greater_equal(od_sum, 3.0 * cfg.thick_od, out=thick[rows])
    close_radius = max(1, round(_SMEAR_CLOSE_UM / (l0_per_th * mpp)))
    smear = _clean(smear, close_radius)
    thick = _clean(thick, 0) & smear
    return Foreground(
        smear=smear, thick=thick, thumbnail=rgb, l0_per_th=float(l0_per_th), glass_rgb=glass,
        otsu_od=otsu, smear_od=float(smear_od), thick_od=cfg.thick_od,
    )


# --------------------------------------------------------------------------- grid


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
    n = math.ceil((length - size) / stride - _EPS) + 1
    return np.round(np.linspace(0.0, float(length - size), n)).astype(np.int64)


def _geometry(slide: Slide, config: TilingConfig) -> tuple[int, int, int, int, tuple[int, int]]:
    """``size, stride, n_cols, n_rows, l0_origin`` of the full grid (checks mpp and slide size).

    A photograph (:func:`is_photograph`) is covered edge to edge (``l0_origin``
    is (0, 0); :func:`make_grid` spreads the cells); a whole-slide image gets
    whole cells only, centred.
    """
    mpp = _require_mpp(slide)
    size = config.patch_l0_px(mpp)
    if size < MIN_PATCH_L0_PX:
        raise InputError(
            f"{slide.path.name}: at {mpp:g} um/px a {config.patch_um:g} um patch is only "
            f"{size} px; that resolution is not a microscope's: pass the right --mpp"
        )
    stride = max(1, round(size * (1.0 - config.overlap)))
    if slide.width < size or slide.height < size:
        fits_um = math.floor(min(slide.width, slide.height) * mpp * 10.0 + _EPS) / 10.0
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
    size, stride, n_cols, n_rows, l0_origin = _geometry(slide, config)
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
        keep = np.ones(n_cols, dtype=bool) if photo else fg >= config.min_foreground - _EPS
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


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Span:
    """Where a patch lies in a pyramid level: integer pixels to read, float box to resample."""

    lv_x0: int
    lv_y0: int
    lv_x1: int
    lv_y1: int
    box: tuple[float, float, float, float]  # relative to (lv_x0, lv_y0)


def _span(l0_x: int, l0_y: int, size: int, lv_ds: float) -> _Span:
    fx0, fy0 = l0_x / lv_ds, l0_y / lv_ds
    fx1, fy1 = (l0_x + size) / lv_ds, (l0_y + size) / lv_ds
    x0, y0 = math.floor(fx0 + _EPS), math.floor(fy0 + _EPS)
    x1, y1 = max(x0 + 1, math.ceil(fx1 - _EPS)), max(y0 + 1, math.ceil(fy1 - _EPS))
    return _Span(x0, y0, x1, y1, (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0))


def _resample(region: npt.NDArray[np.uint8], box: tuple[float, float, float, float],
              output_px: int, out: npt.NDArray[np.uint8]) -> None:
    """Write ``region``'s ``box`` resampled to ``output_px`` square into ``out``."""
    h, w = region.shape[:2]
    if (w, h) == (output_px, output_px) and box == (0.0, 0.0, float(w), float(h)):
        out[...] = region
        return
    img = Image.fromarray(np.ascontiguousarray(region))
    img = img.resize((output_px, output_px), _RESAMPLE, box=box)
    out[...] = np.asarray(img)


def _level_for(slide: Slide, size: int, output_px: int) -> tuple[int, float]:
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
    :func:`iter_patch_batches` reproduces pixel for pixel.
    """
    if size <= 0 or output_px <= 0:
        raise InputError(
            f"read_patch needs positive size and output_px, got {size} and {output_px}."
        )
    level, lv_ds = _level_for(slide, size, output_px)
    sp = _span(l0_x, l0_y, size, lv_ds)
    region = slide.read_region(round(sp.lv_x0 * lv_ds), round(sp.lv_y0 * lv_ds), level,
                               (sp.lv_x1 - sp.lv_x0, sp.lv_y1 - sp.lv_y0))
    out = np.empty((output_px, output_px, 3), dtype=np.uint8)
    _resample(region, sp.box, output_px, out)
    return out


def _runs(grid: PatchGrid, idx: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Split cells (row-major) into runs of horizontally adjacent cells of one row."""
    if idx.size == 0:
        return []
    cols, rows = grid.g_col[idx], grid.g_row[idx]
    breaks = np.flatnonzero((np.diff(rows) != 0) | (np.diff(cols) != 1)) + 1
    return np.split(idx, breaks)


def _read_cells(slide: Slide, grid: PatchGrid, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Patches of cells ``idx`` as ``[len(idx), output_px, output_px, 3]``, one strip per run."""
    out_px = grid.output_px
    out = np.empty((idx.size, out_px, out_px, 3), dtype=np.uint8)
    level, lv_ds = _level_for(slide, grid.size, out_px)
    pos = 0
    for run in _runs(grid, idx):
        spans = [_span(int(grid.x[i]), int(grid.y[i]), grid.size, lv_ds) for i in run]
        lv_x0, lv_y0 = spans[0].lv_x0, spans[0].lv_y0
        lv_x1, lv_y1 = spans[-1].lv_x1, spans[0].lv_y1
        strip = slide.read_region(round(lv_x0 * lv_ds), round(lv_y0 * lv_ds), level,
                                  (lv_x1 - lv_x0, lv_y1 - lv_y0))
        for sp in spans:
            region = strip[:, sp.lv_x0 - lv_x0 : sp.lv_x1 - lv_x0]
            _resample(region, sp.box, out_px, out[pos])
            pos += 1
    return out


# A photograph's cells are read once and kept when they take at most this many bytes.
_PHOTO_CELLS_BYTES = 64 * 1024 * 1024


def _chunks(n: int, batch_size: int) -> Iterator[npt.NDArray[np.int64]]:
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


def _check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers={workers!r} must be an integer >= 0 (0: read in this thread).")


def _check_batching(batch_size: int, workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be a positive integer.")
    _check_workers(workers)


def iter_patch_batches(
    slide: Slide, grid: PatchGrid, batch_size: int = 64, *, workers: int = 2,
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
    """Yield ``(indices, patches)``: grid positions and uint8 ``[B, output_px, output_px, 3]``.

    Batches come in grid order; memory holds at most ``2 * workers + 1``
    batches whatever the slide's size. ``workers=0`` reads in the calling thread.
    Arguments are checked here, before the first batch is asked for.
    """
    _check_batching(batch_size, workers)
    return map_ordered(lambda idx: (idx, _read_cells(slide, grid, idx)),
                        _chunks(len(grid), batch_size), workers)


# --------------------------------------------------------------------------- the whole step


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
    return grid.size * _require_mpp(slide) / grid.output_px


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
    um_px, mpp = _um_per_output_px(slide, grid), _require_mpp(slide)

    def od_of(idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        pixels = cells[idx] if cells is not None else _read_cells(slide, grid, idx)
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
    _check_batching(batch_size, workers)
    n = len(grid)
    glass = np.asarray(glass_rgb, dtype=np.float64)
    per_cell = glass.ndim == 2
    if per_cell and glass.shape != (n, 3):
        raise InputError(f"glass_rgb has {glass.shape[0]} rows for {n} cells.")
    metrics = {name: np.full(n, np.nan) for name in METRIC_COLUMNS}
    if progress is not None:
        progress(0, n)
    um_px = _um_per_output_px(slide, grid) if n else 0.5
    mpp = _require_mpp(slide)

    def measure(idx: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], _Metrics]:
        g = glass[idx] if per_cell else glass
        pixels = cells[idx] if cells is not None else _read_cells(slide, grid, idx)
        return idx, patch_metrics(pixels, g, um_per_px=um_px, native_um=mpp, stains=stains)

    done = 0
    for idx, values in map_ordered(measure, _chunks(n, batch_size), workers):
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
    _check_batching(batch_size, workers)
    _geometry(slide, config)  # fail fast (no mpp, too small) before reading any pixel
    foreground = detect_foreground(slide, config, workers=workers)
    grid = make_grid(slide, config, foreground)
    mask_numbers = foreground.thresholds()
    glass = glass_per_patch(grid, foreground)
    del foreground  # the thumbnail and masks are not needed while reading patches
    # A photograph's cells are few: read them once for the stain estimate and the metrics.
    n = len(grid)
    small = grid.fitted and n * grid.output_px * grid.output_px * 3 <= _PHOTO_CELLS_BYTES
    cells = _read_cells(slide, grid, np.arange(n, dtype=np.int64)) if small else None
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
