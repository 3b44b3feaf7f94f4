"""Patch quality metrics and the pass/fail rules of the cMIL "quality evaluation".

The cMIL study kept 1,384,007 bone-marrow smear patches "after the quality
evaluation". This module makes that step explicit: a few cheap, documented
numbers per patch (:func:`patch_metrics`), stored so the dashboard can show
their distributions, and a rule (:func:`qc_decision`) that turns them into
``qc_pass`` and a short ``qc_reason``, with thresholds (:class:`QCThresholds`)
stored with the run so every decision can be reproduced.

Colour relative to the glass
----------------------------
Light passing through a stained smear is attenuated by the stain (Beer-Lambert):
the optical density of channel ``c`` is ``OD_c = log10(I0_c / I_c)``, where
``I0_c`` is the light that reaches the camera through bare glass. Photographs
taken through a microscope rarely have white glass (the BCCD photographs'
glass is about RGB 200, a little green); scanners put it near 240-255. So the
pixel rules below measure OD *relative to the slide's own glass colour*
(``glass_rgb``, estimated from the thumbnail by :mod:`cmil_core.tiling`; white
when not given). Every OD rule is turned into per-channel thresholds on the
uint8 values once per batch (exactly: no rounding at the boundary), so the
per-pixel work is integer compares and one table lookup.

Metrics (:data:`METRIC_COLUMNS`), each a float per patch
--------------------------------------------------------
``background_fraction``
    Share of pixels that look like bare glass: every channel's OD relative to
    the glass at most :data:`GLASS_OD` (0.06, i.e. at least 87 % of the glass's
    light in every channel: near-white *and* unstained).
``mean_intensity``
    Mean grey level (ITU-R 601 luma, 0-255, absolute, not relative to the
    glass): the exposure.
``dark_fraction`` / ``bright_fraction``
    Share of pixels with grey below :data:`DARK_GREY` (40; nearly black) or at
    least :data:`BRIGHT_GREY` (250; clipped white).
``blur_variance``
    Variance of the Laplacian of the grey image (Pech-Pacheco et al., ICPR
    2000): the 4-neighbour kernel ``[[0,1,0],[1,-4,1],[0,1,0]]`` over the
    interior pixels (no padding). A sharp patch has strong edges, hence a wide
    spread of Laplacian values; defocus removes them. It is computed on the
    patch *at its output size* (``output_px``, 224 by default), which is what
    the CNN sees: blur depends on scale (downsampling sharpens), so the
    threshold is only meaningful for one physical patch size and output size.
    It also grows with contrast and with the share of the patch covered by
    cells, which is why the background rule is checked first.
``nuclei_fraction``
    Share of pixels coloured like a Wright-Giemsa nucleus: the azure/methylene
    blue complex in chromatin absorbs red light and passes blue, so a nucleus
    is dark blue-violet while red cells (eosin) pass red and look pink. A pixel
    counts when its red OD is at least :data:`NUCLEUS_RED_OD` (0.10) and its
    red OD exceeds its blue OD by at least :data:`NUCLEUS_RED_MINUS_BLUE_OD`
    (0.08). The same rule finds haematoxylin nuclei on H&E.

Limits of ``nuclei_fraction``: it is a colour count, not a cell detector.
Platelets, basophilic granules, stain precipitate and the violet cytoplasm of
plasma cells or blasts also count; smudged cells count; a nucleus under a
strong stain shift (old stain, wrong pH, photographs with unusual white
balance) may not. It says "some nuclear material is here", which is what the
rejection "no nucleated cell" needs: a patch of red cells and glass alone
cannot hold the small round blue tumour cells the model looks for.

Decision (:func:`qc_decision`)
------------------------------
Rules are checked in this order and the first that fails names the reason
(:data:`QC_REASONS`):

1. ``"background"``: ``background_fraction > max_background_fraction``
   (mostly bare glass; such a patch is also flat, hence "blurred", and empty,
   hence "no nucleated cell", so it must come first);
2. ``"thick smear"``: the tiling's thumbnail mask says more than
   ``max_thick_fraction`` of the patch is a thick, unreadable area (only when
   ``thick_fraction`` is passed);
3. ``"too dark"``: ``mean_intensity < min_mean_intensity`` or
   ``dark_fraction > max_dark_fraction``;
4. ``"too bright"``: ``mean_intensity > max_mean_intensity`` (washed out);
   exposure comes before blur because a black or white patch has no edges;
5. ``"blurred"``: ``blur_variance < min_blur_variance``;
6. ``"no nucleated cell"``: ``nuclei_fraction < min_nuclei_fraction``.

A NaN metric fails its rule. The defaults (:class:`QCThresholds`) were set on
real Wright-Giemsa photographs (BCCD) and an Aperio H&E scan (CMU-1) at 112 um
patches resampled to 224 px; they are a starting point: look at the metric
distributions of your own cohort before trusting them.

>>> import numpy as np
>>> white = np.full((1, 64, 64, 3), 255, np.uint8)
>>> qc_decision(patch_metrics(white), QCThresholds())[1]
['background']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.errors import InputError

__all__ = [
    "BRIGHT_GREY",
    "DARK_GREY",
    "GLASS_OD",
    "METRICS_VERSION",
    "METRIC_COLUMNS",
    "NUCLEUS_RED_MINUS_BLUE_OD",
    "NUCLEUS_RED_OD",
    "QCRule",
    "QCThresholds",
    "QC_REASONS",
    "QC_RULES",
    "patch_metrics",
    "qc_decision",
]

#: Column names of :func:`patch_metrics`, in this order.
METRIC_COLUMNS: tuple[str, ...] = (
    "background_fraction",
    "mean_intensity",
    "dark_fraction",
    "bright_fraction",
    "blur_variance",
    "nuclei_fraction",
)
#: Bumped whenever a metric's definition changes; store it with the metrics.
METRICS_VERSION = 1
#: Every reason :func:`qc_decision` can give, in the order the rules are checked.
QC_REASONS: tuple[str, ...] = (
    "background",
    "thick smear",
    "too dark",
    "too bright",
    "blurred",
    "no nucleated cell",
)

#: A pixel is glass when every channel's OD relative to the glass is at most this.
GLASS_OD = 0.06
#: Grey level (0-255) below which a pixel is "dark".
DARK_GREY = 40
#: Grey level (0-255) from which a pixel is "bright" (clipped).
BRIGHT_GREY = 250
#: A nucleus pixel absorbs at least this much red light (OD relative to glass).
NUCLEUS_RED_OD = 0.10
#: ... and at least this much more red than blue (blue-violet, not pink).
NUCLEUS_RED_MINUS_BLUE_OD = 0.08

# ITU-R BT.601 luma weights, in 1/256 (integer grey in one pass, exact to 1 level).
_LUMA_256 = (77, 150, 29)
# Patches measured at once inside patch_metrics (temporaries of a few MB stay in cache).
_SUB_BATCH = 4


@dataclass(frozen=True)
class QCThresholds:
    """Pass/fail thresholds of :func:`qc_decision`; stored with every run.

    Defaults suit Wright-Giemsa smears at 112 um patches resampled to 224 px
    (the tiling's defaults):

    * ``max_background_fraction = 0.85``: a patch may be mostly glass (smears
      are thin; the reading zone is a monolayer with glass between cells) but
      not almost only glass;
    * ``max_thick_fraction = 0.5``: half the patch inside the thumbnail's
      thick-area mask is unreadable;
    * ``min_mean_intensity = 60``, ``max_dark_fraction = 0.5``: nearly black
      patches (thick clumps, dirt, an unlit photograph); a patch packed with
      Giemsa nuclei (about RGB 110, 70, 170: grey 93) stays above 60;
    * ``max_mean_intensity = 240``: washed-out patches that are not glass;
    * ``min_blur_variance = 12``: Laplacian variance (grey levels squared) at
      224 px. The in-focus CMU-1 scan gives 400-3000; the soft, pale BCCD
      photographs 11-26, the visibly defocused one (BloodImage_00040) 11.3; a
      Gaussian blur of sigma 2 px brings CMU-1 patches to 10-23, of 3 px to 3-7;
    * ``min_nuclei_fraction = 0.002``: 0.2 % of a 112 um patch is 25 um2,
      less than one small lymphocyte nucleus (about 7 um across, 38 um2) and
      more than a stray platelet.
    """

    max_background_fraction: float = 0.85
    max_thick_fraction: float = 0.5
    min_mean_intensity: float = 60.0
    max_dark_fraction: float = 0.5
    max_mean_intensity: float = 240.0
    min_blur_variance: float = 12.0
    min_nuclei_fraction: float = 0.002

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value):
                raise InputError(f"QC threshold {f.name}={value!r} is not a finite number.")
            object.__setattr__(self, f.name, float(value))
        for name in ("max_background_fraction", "max_thick_fraction", "max_dark_fraction",
                     "min_nuclei_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(
                    f"QC threshold {name}={value} is a fraction and must be in [0, 1]."
                )
        for name in ("min_mean_intensity", "max_mean_intensity"):
            value = getattr(self, name)
            if not 0.0 <= value <= 255.0:
                raise InputError(
                    f"QC threshold {name}={value} is a grey level and must be in [0, 255]."
                )
        if self.min_mean_intensity >= self.max_mean_intensity:
            raise InputError(
                f"QC thresholds min_mean_intensity={self.min_mean_intensity} must be below "
                f"max_mean_intensity={self.max_mean_intensity}."
            )
        if self.min_blur_variance < 0:
            raise InputError(
                f"QC threshold min_blur_variance={self.min_blur_variance} must be >= 0."
            )

    def to_dict(self) -> dict[str, float]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QCThresholds:
        """Thresholds from a dict such as :meth:`to_dict` gives; missing keys take defaults.

        Unknown keys raise :class:`~cmil_core.errors.InputError` (a typo must not
        silently fall back to a default).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown QC threshold(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}."
            )
        return cls(**dict(data))


@dataclass(frozen=True)
class QCRule:
    """One rule of :func:`qc_decision`: a patch passes when every condition holds.

    ``conditions`` are ``(metric column, ">=" or "<=", threshold field of
    :class:`QCThresholds`)``. A NaN (or SQL NULL) metric fails its condition.
    The store re-decides QC in SQL from the same table
    (:data:`QC_RULES`), so Python and SQL cannot drift apart.
    """

    reason: str
    conditions: tuple[tuple[str, str, str], ...]

    def passes(
        self, metrics: Mapping[str, npt.ArrayLike], thresholds: QCThresholds
    ) -> npt.NDArray[np.bool_]:
        """Bool array: which patches pass this rule (NaN fails)."""
        ok: npt.NDArray[np.bool_] | None = None
        for column, op, name in self.conditions:
            values = np.asarray(metrics[column], dtype=np.float64).reshape(-1)
            limit = getattr(thresholds, name)
            cond = values >= limit if op == ">=" else values <= limit
            ok = cond if ok is None else ok & cond
        assert ok is not None  # every rule has a condition (a programming invariant)
        return ok


#: The rules of :func:`qc_decision`, in the order they are checked (the first
#: that fails names the reason). ``thick smear`` applies only when the tiling's
#: ``thick_fraction`` is known.
QC_RULES: tuple[QCRule, ...] = (
    QCRule("background", (("background_fraction", "<=", "max_background_fraction"),)),
    QCRule("thick smear", (("thick_fraction", "<=", "max_thick_fraction"),)),
    QCRule("too dark", (("mean_intensity", ">=", "min_mean_intensity"),
                        ("dark_fraction", "<=", "max_dark_fraction"))),
    QCRule("too bright", (("mean_intensity", "<=", "max_mean_intensity"),)),
    QCRule("blurred", (("blur_variance", ">=", "min_blur_variance"),)),
    QCRule("no nucleated cell", (("nuclei_fraction", ">=", "min_nuclei_fraction"),)),
)
assert tuple(r.reason for r in QC_RULES) == QC_REASONS


def _glass_levels(glass_rgb: tuple[float, float, float]) -> np.ndarray:
    glass = np.asarray(glass_rgb, dtype=np.float64)
    valid = glass.shape == (3,) and bool(np.all(np.isfinite(glass)))
    if not valid or np.any(glass <= 0) or np.any(glass > 255):
        raise InputError(f"glass_rgb={glass_rgb!r} must be three values in (0, 255].")
    return glass


def patch_metrics(
    batch: npt.NDArray[np.uint8],
    glass_rgb: tuple[float, float, float] = (255.0, 255.0, 255.0),
) -> dict[str, npt.NDArray[np.float64]]:
    """Quality metrics of a batch of RGB patches, one value per patch.

    ``batch`` is uint8 ``[B, H, W, 3]`` (H, W >= 3); ``glass_rgb`` the colour of
    bare glass on this slide (see the module docstring; white by default, right
    for most scanners, not for photographs). Returns a dict keyed by
    :data:`METRIC_COLUMNS` of float64 arrays of length B.

    Vectorised over the batch in exact integer arithmetic (so the values do not
    depend on how patches are batched), a few patches at a time in reused
    buffers, so that the temporaries stay in cache and are not re-allocated.
    """
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
        raise InputError("patch_metrics needs a uint8 numpy array [B, H, W, 3].")
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[1] < 3 or batch.shape[2] < 3:
        raise InputError(
            f"patch_metrics needs shape [B, H, W, 3] with H, W >= 3, got {batch.shape}."
        )
    glass = _glass_levels(glass_rgb)
    n, h, w = batch.shape[:3]
    out = {name: np.empty(n, dtype=np.float64) for name in METRIC_COLUMNS}
    if n == 0:
        return out
    work = _Workspace(min(n, _SUB_BATCH), h, w)
    for start in range(0, n, _SUB_BATCH):
        stop = min(n, start + _SUB_BATCH)
        _metrics_kernel(batch[start:stop], glass, work, out, start)
    return out


def _nucleus_tables(glass: np.ndarray) -> tuple[np.uint8, npt.NDArray[np.uint8]]:
    """``red_max`` and ``blue_min[red]`` such that the nucleus rule is ``red <= red_max
    and blue >= blue_min[red]``, exactly.

    Red OD relative to glass >= a  <=>  red <= glass_r * 10**-a.
    Red OD - blue OD >= d  <=>  log10((blue / glass_b) / (red / glass_r)) >= d
    <=>  blue >= red * (glass_b / glass_r) * 10**d. Reds whose smallest blue
    would exceed 255 can never qualify and are cut from ``red_max``.
    """
    reds = np.arange(256, dtype=np.float64)
    blue_min = np.ceil(reds * (glass[2] / glass[0]) * 10.0**NUCLEUS_RED_MINUS_BLUE_OD - 1e-9)
    red_max = math.floor(glass[0] * 10.0 ** (-NUCLEUS_RED_OD) + 1e-9)
    reachable = np.flatnonzero(blue_min <= 255)
    red_max = min(red_max, int(reachable[-1]))  # red 0 is always reachable (blue_min 0)
    return np.uint8(red_max), np.minimum(blue_min, 255).astype(np.uint8)


class _Workspace:
    """Buffers reused across the sub-batches of one :func:`patch_metrics` call."""

    def __init__(self, n: int, h: int, w: int) -> None:
        self.planar = np.empty((n, 3, h, w), dtype=np.uint8)
        self.mask = np.empty((n, h, w), dtype=np.bool_)
        self.mask2 = np.empty((n, h, w), dtype=np.bool_)
        self.u8 = np.empty((n, h, w), dtype=np.uint8)
        self.grey = np.empty((n, h, w), dtype=np.uint16)
        self.tmp = np.empty((n, h, w), dtype=np.uint16)
        self.lap = np.empty((n, h - 2, w - 2), dtype=np.int16)
        self.lap32 = np.empty((n, h - 2, w - 2), dtype=np.int32)


def _metrics_kernel(
    batch: npt.NDArray[np.uint8], glass: np.ndarray, ws: _Workspace,
    out: dict[str, npt.NDArray[np.float64]], at: int,
) -> None:
    n = batch.shape[0]
    pixels = batch.shape[1] * batch.shape[2]
    stop = at + n
    # Planar copy [B, 3, H, W]: every per-channel operation below then runs on
    # contiguous memory (several times faster than on the interleaved views).
    planar = ws.planar[:n]
    np.copyto(planar, batch.transpose(0, 3, 1, 2))
    r, g, b = planar[:, 0], planar[:, 1], planar[:, 2]
    mask, mask2, grey16, tmp = ws.mask[:n], ws.mask2[:n], ws.grey[:n], ws.tmp[:n]

    def fraction(m: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        return np.count_nonzero(m.reshape(n, -1), axis=1) / pixels

    # Glass: every channel at least glass * 10**-GLASS_OD (integer compare per channel).
    lo = np.ceil(glass * 10.0 ** (-GLASS_OD) - 1e-9).astype(np.uint8)
    np.greater_equal(r, lo[0], out=mask)
    mask &= np.greater_equal(g, lo[1], out=mask2)
    mask &= np.greater_equal(b, lo[2], out=mask2)
    out["background_fraction"][at:stop] = fraction(mask)

    # Grey (BT.601 luma) in 1/256 fixed point: uint16 holds 255 * 256 exactly.
    np.multiply(r, np.uint16(_LUMA_256[0]), out=grey16)
    grey16 += np.multiply(g, np.uint16(_LUMA_256[1]), out=tmp)
    grey16 += np.multiply(b, np.uint16(_LUMA_256[2]), out=tmp)
    grey16 += np.uint16(128)
    grey16 >>= np.uint16(8)
    grey = grey16.view(np.int16)  # values 0..255: the same bits as int16
    out["mean_intensity"][at:stop] = grey.reshape(n, -1).sum(axis=1, dtype=np.int64) / pixels
    out["dark_fraction"][at:stop] = fraction(np.less(grey, DARK_GREY, out=mask))
    out["bright_fraction"][at:stop] = fraction(np.greater_equal(grey, BRIGHT_GREY, out=mask))

    # Laplacian (4-neighbour) over the interior, in int16 (|value| <= 4 * 255),
    # variance per patch from exact integer sums.
    lap = ws.lap[:n]
    np.add(grey[:, :-2, 1:-1], grey[:, 2:, 1:-1], out=lap)
    lap += grey[:, 1:-1, :-2]
    lap += grey[:, 1:-1, 2:]
    centre = grey[:, 1:-1, 1:-1]
    for _ in range(4):
        lap -= centre
    lap_flat = lap.reshape(n, -1)
    m = lap_flat.shape[1]
    lap_sum = lap_flat.sum(axis=1, dtype=np.int64).astype(np.float64)
    sq = ws.lap32[:n].reshape(n, -1)
    np.multiply(lap_flat, lap_flat, out=sq, dtype=np.int32)  # <= 1020**2 fits int32
    lap_sq = sq.sum(axis=1, dtype=np.int64).astype(np.float64)
    out["blur_variance"][at:stop] = (lap_sq - lap_sum**2 / m) / m

    # Nucleus colour: red OD >= NUCLEUS_RED_OD and red OD - blue OD >= NUCLEUS_RED_MINUS_BLUE_OD,
    # i.e. red <= red_max and blue >= blue_min[red] (exact integer tables, see _nucleus_tables).
    red_max, blue_min = _nucleus_tables(glass)
    np.less_equal(r, red_max, out=mask)
    blue_needed = ws.u8[:n]
    np.take(blue_min, r, out=blue_needed)
    mask &= np.greater_equal(b, blue_needed, out=mask2)
    out["nuclei_fraction"][at:stop] = fraction(mask)


def qc_decision(
    metrics: Mapping[str, npt.ArrayLike],
    thresholds: QCThresholds,
    *,
    thick_fraction: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.bool_], list[str | None]]:
    """``(qc_pass, qc_reason)`` per patch: the first failing rule names the reason.

    ``metrics`` maps every name of :data:`METRIC_COLUMNS` to equal-length
    arrays (a dict from :func:`patch_metrics` or a DataFrame); ``thick_fraction``
    (from the tiling's thumbnail mask) enables the ``"thick smear"`` rule. The
    order of the rules is in the module docstring; ``qc_reason`` is None where
    the patch passes.
    """
    missing = [name for name in METRIC_COLUMNS if name not in metrics]
    if missing:
        raise InputError(f"qc_decision: metrics lack column(s) {', '.join(missing)}.")
    cols = {
        name: np.asarray(metrics[name], dtype=np.float64).reshape(-1) for name in METRIC_COLUMNS
    }
    n = cols[METRIC_COLUMNS[0]].size
    if any(v.size != n for v in cols.values()):
        raise InputError("qc_decision: metric columns have different lengths.")
    passes: list[tuple[str, np.ndarray]] = []
    for rule in QC_RULES:
        if rule.reason == "thick smear":
            if thick_fraction is None:
                continue
            thick = np.asarray(thick_fraction, dtype=np.float64).reshape(-1)
            if thick.size != n:
                raise InputError(
                    f"qc_decision: thick_fraction has {thick.size} values for {n} patches."
                )
            values = {**cols, "thick_fraction": thick}
        else:
            values = cols
        passes.append((rule.reason, rule.passes(values, thresholds)))
    rules = passes
    reason_code = np.full(n, -1, dtype=np.int16)  # -1: passes so far
    names: list[str] = []
    for code, (name, ok) in enumerate(rules):
        names.append(name)
        reason_code[(reason_code < 0) & ~ok] = code
    qc_pass = reason_code < 0
    qc_reason: list[str | None] = [None if c < 0 else names[c] for c in reason_code.tolist()]
    return qc_pass, qc_reason
