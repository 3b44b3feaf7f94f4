"""Where the smear is on a slide: :func:`detect_foreground` and its :class:`Foreground`.

Coordinate prefixes (``l0_``, ``th_``) as in :mod:`cmil_core.ingest.tiling`.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cmil_core.ingest.patch_reading import EPS, check_workers, read_thumbnail
from cmil_core.ingest.slides import Slide
from cmil_core.ingest.tiling_config import TilingConfig, is_photograph, require_mpp

__all__ = [
    "Foreground",
    "detect_foreground",
]


# Thumbnail pixels per strip when computing optical densities (float32 planes of 1 MB).
_OD_STRIP_PIXELS = 256 * 1024
# Otsu's histogram: optical densities 0 to 2.5 (black under white glass is 2.4) in 0.002 bins.
_OTSU_BIN_OD = 0.002
_OTSU_BINS = 1250
# The glass colour is a histogram mode: it needs at least this many pixels;
# from a smaller thumbnail it is taken from a finer view of about _GLASS_VIEW_PIXELS.
_GLASS_MIN_PIXELS = 16_384
_GLASS_VIEW_PIXELS = 65_536
_GLASS_SAMPLE_PIXELS = 1_048_576
# Closing radius of the smear mask in microns (2 px at 8 um/px): joins cells
# separated by less than about two red-cell diameters of glass.
_SMEAR_CLOSE_UM = 16.0


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
    (:func:`cmil_core.ingest.tiling.glass_per_patch`).
    """
    l0_per_px = max(1.0, math.sqrt(slide.width * slide.height / _GLASS_VIEW_PIXELS))
    view_w = max(1, math.ceil(slide.width / l0_per_px - EPS))
    view_h = max(1, math.ceil(slide.height / l0_per_px - EPS))
    view = read_thumbnail(slide, l0_per_px, view_w, view_h, workers)
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
    check_workers(workers)
    mpp = require_mpp(slide)
    if is_photograph(slide, cfg):
        return _field_of_view(slide, cfg, workers)
    longest = max(slide.width, slide.height)
    l0_per_th = max(cfg.thumbnail_um / mpp, 1.0, longest / cfg.max_thumbnail_px)
    th_w = max(1, math.ceil(slide.width / l0_per_th - EPS))
    th_h = max(1, math.ceil(slide.height / l0_per_th - EPS))
    rgb = read_thumbnail(slide, l0_per_th, th_w, th_h, workers)
    if rgb.shape[0] * rgb.shape[1] >= _GLASS_MIN_PIXELS:
        glass = _estimate_glass(rgb)
    else:  # a small slide or photograph: estimate the glass from a finer view
        l0_per_px = max(1.0, math.sqrt(slide.width * slide.height / _GLASS_VIEW_PIXELS))
        fine_w = max(1, math.ceil(slide.width / l0_per_px - EPS))
        fine_h = max(1, math.ceil(slide.height / l0_per_px - EPS))
        glass = _estimate_glass(read_thumbnail(slide, l0_per_px, fine_w, fine_h, workers))
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
