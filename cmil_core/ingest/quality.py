"""Patch quality metrics and the pass/fail rules of the cMIL "quality evaluation".

The cMIL study kept 1,384,007 bone-marrow smear patches "after the quality
evaluation". This module makes that step explicit: a few cheap, documented
numbers per patch (:func:`patch_metrics`), stored so the dashboard can show
their distributions and re-decide without reading slides again, and a rule
table (:data:`QC_RULES`, applied by :func:`qc_decision` here and in SQL by the
store) that turns them into ``qc_pass`` and a short ``qc_reason``, with
thresholds (:class:`QCThresholds`) stored as a versioned decision per cohort.

Colour relative to the glass
----------------------------
Light passing through a stained smear is attenuated by the stain (Beer-Lambert):
the optical density of channel ``c`` is ``OD_c = log10(I0_c / I_c)``, where
``I0_c`` is the light that reaches the camera through bare glass. Photographs
taken through a microscope rarely have white glass (the BCCD photographs'
glass is about RGB 200, a little green; other cameras give pink, cyan or
yellowish glass, and vignetting darkens the corners); scanners put it near
240-255. So every colour rule below is *relative to the glass*: one colour per
whole-slide image, one per patch for photographs (a smooth background field,
:mod:`cmil_core.ingest.tiling`).

One physical scale: magnification does not change the verdict
--------------------------------------------------------------
Exposure and glass are measured on the patch as the CNN sees it. Sharpness and
nuclear material are measured at one physical scale, :data:`REFERENCE_UM`
(0.5 um per pixel, a 20x scan), after an area-average (box) resampling, as
HistoQC computes every metric at one working magnification (Janowczyk et al.,
JCO Clin Cancer Inform 2019). A patch coarser than that (a 10x scan) is
measured at its own scale, never upsampled (:func:`measure_scale`). The same
in-focus smear photographed at 0.1 um/px (100x oil) or scanned at 0.25 or 0.5
um/px therefore gives about the same numbers, and a patch of 32 um is judged
like one of 112 um.

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
    2000) *at the measuring scale*: the 4-neighbour kernel
    ``[[0,1,0],[1,-4,1],[0,1,0]]`` over the interior pixels (no padding). A
    sharp patch has strong edges, hence a wide spread of Laplacian values;
    defocus removes them. Measured on real smears (``bench/qc_fixtures.py``,
    ``tests/test_quality_real.py``): in-focus photographs and scans give 8 to
    several thousand (minimum: BCCD 35, the dim Chulalongkorn photographs 8,
    at 0.1, 0.25 and 0.5 um/px); a Gaussian blur of 2 um brings every one of
    them to 5 or less.
``nuclei_fraction`` / ``nuclear_area_um2``
    Nuclear-stain material: pixels whose nuclear-stain concentration (colour
    deconvolution with the slide's own stain vectors, :mod:`cmil_core.ingest.stains`)
    is at least the slide's floor, or whose concentration under the Romanowsky
    default vectors is (a wrong estimate on a small or unusual field must not
    hide chromatin the defaults see), cleaned by a 3x3 opening at the measuring
    scale (1.5 um: the one- or two-pixel refractile rims of red cells, JPEG
    fringes and most single platelets go), as a share of the patch and as an
    area in square microns.

Limits of the nuclear signal: it measures thiazine-stained material, not
cells. Platelet clumps, basophilic granules, stain precipitate and the violet
cytoplasm of plasma cells or blasts count; smudged cells count; a pale single
platelet usually does not. On peripheral-blood photographs (BCCD, 32 um
patches) about a third of the patches hold red cells, glass and at most a
few platelets: judged patch by patch they are rejected, judged by field (the
default for photographs, below) they are kept with the white cell the
operator photographed. It says "some nuclear-stained material is here",
which is what the rejection "no nucleated cell" needs: a patch (of a
whole-slide file) or a photograph of red cells and glass alone cannot hold
the small round blue tumour cells the model looks for.

Decision (:func:`qc_decision`, :data:`QC_RULES`)
------------------------------------------------
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
6. ``"no nucleated cell"``: ``nuclear_area_um2 < min_nuclear_area_um2``, judged
   per patch or per field (``nucleated_scope``, below).

A NaN metric fails its rule.

The field of a photograph (``nucleated_scope``)
-----------------------------------------------
A photograph (a one-level image tiled edge to edge,
:func:`cmil_core.ingest.tiling_config.is_photograph`) is a field of view the
operator chose, as a cytologist reads a field: with
``nucleated_scope = "field"`` (the default) a photograph that holds at least one
patch with nuclear material keeps its patches of red cells and glass (they are
part of the chosen field; other rules still apply to them one by one), while a
photograph with none (a field of red cells only, or such a crop saved as its own
image) is rejected as ``"no nucleated cell"``. Whole-slide files (and large
stitched images) are always judged patch by patch: nobody chose their fields.
``nucleated_scope = "patch"`` judges photographs patch by patch too. Only the
"no nucleated cell" rule has a field scope (:attr:`QCRule.field_setting`); a
patch's field is its slide, and the store re-decides it in SQL from the stored
metrics like every rule. The defaults (:class:`QCThresholds`) were set on
real Romanowsky-stained photographs (BCCD at 0.1 um/px, Chulalongkorn WBC
fields), an Aperio H&E scan (CMU-1, 0.5 um/px) and stain rotations of them;
they are a starting point: look at the metric distributions of your own
cohort (the Quality control page) before trusting them.

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
from PIL import Image

from cmil_core.errors import InputError
from cmil_core.ingest.stains import DEFAULT_STAINS, StainModel

__all__ = [
    "BRIGHT_GREY",
    "DARK_GREY",
    "GLASS_OD",
    "METRICS_VERSION",
    "METRIC_COLUMNS",
    "NUCLEATED_SCOPES",
    "NUMERIC_THRESHOLDS",
    "QC_REASONS",
    "QC_RULES",
    "REFERENCE_UM",
    "QCRule",
    "QCThresholds",
    "measure_scale",
    "measured_od",
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
    "nuclear_area_um2",
)
#: Bumped whenever a metric's definition changes; store it with the metrics.
#: 2: sharpness and nuclear material at one physical scale, stain-adaptive nuclei.
METRICS_VERSION = 2
#: Every reason :func:`qc_decision` can give, in the order the rules are checked.
QC_REASONS: tuple[str, ...] = (
    "background",
    "thick smear",
    "too dark",
    "too bright",
    "blurred",
    "no nucleated cell",
)

#: Values of :attr:`QCThresholds.nucleated_scope`.
NUCLEATED_SCOPES: tuple[str, ...] = ("field", "patch")
#: The :class:`QCThresholds` fields that are numbers (every one but ``nucleated_scope``).
NUMERIC_THRESHOLDS: tuple[str, ...] = (
    "max_background_fraction", "max_thick_fraction", "min_mean_intensity", "max_dark_fraction",
    "max_mean_intensity", "min_blur_variance", "min_nuclear_area_um2",
)

#: Microns per pixel at which sharpness and nuclear material are measured.
REFERENCE_UM = 0.5
#: A pixel is glass when every channel's OD relative to the glass is at most this.
GLASS_OD = 0.06
#: Grey level (0-255) below which a pixel is "dark".
DARK_GREY = 40
#: Grey level (0-255) from which a pixel is "bright" (clipped).
BRIGHT_GREY = 250

# ITU-R BT.601 luma weights, in 1/256 (integer grey in one pass, exact to 1 level).
_LUMA_256 = (77, 150, 29)
_BOX = Image.Resampling.BOX
# The opening that cleans the nuclear mask at the measuring scale (1.5 um at 0.5 um/px).
_OPENING = np.ones((3, 3), dtype=bool)
# Thresholds of metrics version 1 that no longer exist, with what replaced them.
_RETIRED_THRESHOLDS = {
    "min_nuclei_fraction": "min_nuclear_area_um2 (square microns of nuclear-stained material)",
}


@dataclass(frozen=True)
class QCThresholds:
    """Pass/fail thresholds of :func:`qc_decision`; stored with every run.

    Defaults suit Romanowsky-stained smears (Wright, Giemsa, May-Grunwald-Giemsa,
    rapid stains) at any patch size and magnification, since sharpness and
    nuclear material are measured at one physical scale (module docstring):

    * ``max_background_fraction = 0.85``: a patch may be mostly glass (smears
      are thin; the reading zone is a monolayer with glass between cells) but
      not almost only glass;
    * ``max_thick_fraction = 0.5``: half the patch inside the thumbnail's
      thick-area mask is unreadable;
    * ``min_mean_intensity = 60``, ``max_dark_fraction = 0.5``: nearly black
      patches (thick clumps, dirt, an unlit photograph); a patch packed with
      Giemsa nuclei (about RGB 110, 70, 170: grey 93) stays above 60;
    * ``max_mean_intensity = 240``: washed-out patches that are not glass;
    * ``min_blur_variance = 6``: Laplacian variance (grey levels squared) at
      0.5 um/px. In-focus 32 um patches of real photographs give 8 and more
      (the minimum over the dim, low-contrast Chulalongkorn fields; BCCD 35,
      CMU-1 several hundred) at 0.1, 0.25 and 0.5 um/px; a Gaussian blur of
      2 um brings every one of them to 5 or less (``bench/qc_fixtures.py``);
    * ``min_nuclear_area_um2 = 3``: square microns of nuclear-stained material
      (after the 1.5 um opening): the edge of a nucleus cut by the patch
      border; a small lymphocyte nucleus is about 38 um2. A field of red
      cells and glass alone has none.
    * ``nucleated_scope = "field"``: a photograph keeps its patches without
      nuclear material when another patch of it has some (module docstring);
      ``"patch"``: every patch on its own. Whole-slide files: always per patch.

    Every threshold but ``nucleated_scope`` (a word, :data:`NUCLEATED_SCOPES`)
    is a number (:data:`NUMERIC_THRESHOLDS`).
    """

    max_background_fraction: float = 0.85
    max_thick_fraction: float = 0.5
    min_mean_intensity: float = 60.0
    max_dark_fraction: float = 0.5
    max_mean_intensity: float = 240.0
    min_blur_variance: float = 6.0
    min_nuclear_area_um2: float = 3.0
    nucleated_scope: str = "field"

    def __post_init__(self) -> None:
        if self.nucleated_scope not in NUCLEATED_SCOPES:
            raise InputError(f"QC setting nucleated_scope={self.nucleated_scope!r} must be one "
                             f"of {', '.join(repr(s) for s in NUCLEATED_SCOPES)}.")
        for f in fields(self):
            if f.name not in NUMERIC_THRESHOLDS:
                continue
            value = getattr(self, f.name)
            numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value):
                raise InputError(f"QC threshold {f.name}={value!r} is not a finite number.")
            object.__setattr__(self, f.name, float(value))
        for name in ("max_background_fraction", "max_thick_fraction", "max_dark_fraction"):
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
        for name in ("min_blur_variance", "min_nuclear_area_um2"):
            if getattr(self, name) < 0:
                raise InputError(f"QC threshold {name}={getattr(self, name)} must be >= 0.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (numbers as floats); :meth:`from_dict` reads it back."""
        return {k: (float(v) if k in NUMERIC_THRESHOLDS else str(v))
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QCThresholds:
        """Thresholds from a dict such as :meth:`to_dict` gives; missing keys take defaults.

        Unknown keys raise :class:`~cmil_core.errors.InputError` (a typo must not
        silently fall back to a default).
        """
        known = {f.name for f in fields(cls)}
        retired = sorted(set(data) & set(_RETIRED_THRESHOLDS))
        if retired:
            raise InputError(
                f"QC threshold {retired[0]} no longer exists (metrics version {METRICS_VERSION}); "
                f"use {_RETIRED_THRESHOLDS[retired[0]]}."
            )
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown QC threshold(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}."
            )
        return cls(**dict(data))


assert tuple(f.name for f in fields(QCThresholds)) == (*NUMERIC_THRESHOLDS, "nucleated_scope")


@dataclass(frozen=True)
class QCRule:
    """One rule of :func:`qc_decision`: a patch passes when every condition holds.

    ``conditions`` are ``(metric column, ">=" or "<=", threshold field of
    :class:`QCThresholds`)``. A NaN (or SQL NULL) metric fails its condition.
    ``field_setting`` names the :class:`QCThresholds` field that, when
    ``"field"``, lets a patch of a photograph pass the rule when any patch of
    the same photograph holds every condition (module docstring).
    The store re-decides QC in SQL from the same table
    (:data:`QC_RULES`), so Python and SQL cannot drift apart.
    """

    reason: str
    conditions: tuple[tuple[str, str, str], ...]
    field_setting: str | None = None

    def by_field(self, thresholds: QCThresholds) -> bool:
        """Whether photographs are judged by field under ``thresholds``."""
        return self.field_setting is not None and getattr(
            thresholds, self.field_setting) == "field"

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
    QCRule("no nucleated cell", (("nuclear_area_um2", ">=", "min_nuclear_area_um2"),),
           field_setting="nucleated_scope"),
)
assert tuple(r.reason for r in QC_RULES) == QC_REASONS


def _glass_levels(glass_rgb: tuple[float, float, float]) -> np.ndarray:
    glass = np.asarray(glass_rgb, dtype=np.float64)
    valid = glass.shape == (3,) and bool(np.all(np.isfinite(glass)))
    if not valid or np.any(glass <= 0) or np.any(glass > 255):
        raise InputError(f"glass_rgb={glass_rgb!r} must be three values in (0, 255].")
    return glass


def _glass_array(glass_rgb: npt.ArrayLike, n: int) -> npt.NDArray[np.float64]:
    """``[n, 3]`` glass colours from one colour or one per patch (checked)."""
    glass = np.asarray(glass_rgb, dtype=np.float64)
    if glass.shape == (3,):
        glass = np.broadcast_to(_glass_levels(tuple(glass.tolist())), (n, 3))
    elif glass.shape == (n, 3):
        for row in glass:
            _glass_levels(tuple(row.tolist()))
    else:
        raise InputError(f"glass_rgb must be three values or one row of three per patch, "
                         f"got shape {glass.shape}.")
    return glass


def measure_scale(um_per_px: float, native_um: float | None = None) -> float:
    """Microns per pixel at which sharpness and nuclear material are measured.

    :data:`REFERENCE_UM` (0.5 um/px, a 20x scan), unless the patch pixels or
    the slide itself are coarser: a patch is never upsampled for measuring.
    """
    return max(REFERENCE_UM, float(um_per_px), float(native_um or 0.0))


def patch_metrics(
    batch: npt.NDArray[np.uint8],
    glass_rgb: npt.ArrayLike = (255.0, 255.0, 255.0),
    *,
    um_per_px: float = REFERENCE_UM,
    native_um: float | None = None,
    stains: StainModel | None = None,
) -> dict[str, npt.NDArray[np.float64]]:
    """Quality metrics of a batch of RGB patches, one value per patch.

    ``batch`` is uint8 ``[B, H, W, 3]`` (H, W >= 3); ``glass_rgb`` the colour of
    bare glass, one for the batch or one row per patch (see the module
    docstring; white by default, right for most scanners, not for
    photographs); ``um_per_px`` the microns per pixel of the patches as given
    and ``native_um`` those of the slide (the finest real detail);
    ``stains`` the slide's :class:`~cmil_core.ingest.stains.StainModel` (the
    Romanowsky defaults when None). Returns a dict keyed by
    :data:`METRIC_COLUMNS` of float64 arrays of length B.

    Each patch is measured on its own (values do not depend on batching):
    exposure and glass at the pixels given, sharpness and nuclear material at
    :func:`measure_scale`.
    """
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
        raise InputError("patch_metrics needs a uint8 numpy array [B, H, W, 3].")
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[1] < 3 or batch.shape[2] < 3:
        raise InputError(
            f"patch_metrics needs shape [B, H, W, 3] with H, W >= 3, got {batch.shape}."
        )
    if not (isinstance(um_per_px, numbers.Real) and math.isfinite(um_per_px) and um_per_px > 0):
        raise InputError(f"um_per_px={um_per_px!r} must be a positive number.")
    n = batch.shape[0]
    glass = _glass_array(glass_rgb, n)
    model = stains if stains is not None else DEFAULT_STAINS
    scale = measure_scale(um_per_px, native_um)
    out = {name: np.empty(n, dtype=np.float64) for name in METRIC_COLUMNS}
    # Nuclear projections and floors: the slide's estimate, and (when it was
    # estimated) the Romanowsky default as well, so that a wrong estimate on a
    # small or unusual field cannot hide chromatin the default sees.
    models = [model] if model.source == "default" else [model, DEFAULT_STAINS]
    project = np.stack([m.unmixing()[:, 0] for m in models], axis=1)  # [3, k]
    floor_list = [model.nuclear_floor]
    if len(models) == 2:
        floor_list.append(model.default_floor if model.default_floor is not None
                          else DEFAULT_STAINS.nuclear_floor)
    floors = np.array(floor_list, dtype=np.float32)
    for i in range(n):
        _measure_one(batch[i], glass[i], um_per_px, scale, floors, project, out, i)
    return out


def _at_scale(rgb: npt.NDArray[np.uint8], um_per_px: float, scale: float) -> npt.NDArray[np.uint8]:
    """``rgb`` box-resampled from ``um_per_px`` to ``scale`` microns per pixel (never up)."""
    if scale <= um_per_px * (1.0 + 1e-6):
        return rgb
    h, w = rgb.shape[:2]
    side_h = max(3, round(h * um_per_px / scale))
    side_w = max(3, round(w * um_per_px / scale))
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((side_w, side_h), _BOX))


def measured_od(
    batch: npt.NDArray[np.uint8],
    glass_rgb: npt.ArrayLike = (255.0, 255.0, 255.0),
    *,
    um_per_px: float = REFERENCE_UM,
    native_um: float | None = None,
) -> npt.NDArray[np.float32]:
    """Optical densities ``[N, 3]`` of the batch's pixels at the measuring scale.

    The pixels :func:`patch_metrics` unmixes: what
    :func:`cmil_core.ingest.stains.estimate_stains` needs to fit a slide's stains.
    """
    n = batch.shape[0]
    glass = _glass_array(glass_rgb, n)
    scale = measure_scale(um_per_px, native_um)
    parts = []
    for i in range(n):
        small = _at_scale(batch[i], um_per_px, scale).reshape(-1, 3)
        tables = _od_tables(glass[i])
        parts.append(np.stack([np.take(tables[c], small[:, c]) for c in range(3)], axis=1))
    return np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.float32)


def _od_tables(glass: npt.NDArray[np.float64]) -> list[npt.NDArray[np.float32]]:
    """Per channel, uint8 level -> OD relative to the glass (clipped at 0), ``[256]`` float32."""
    levels = np.maximum(np.arange(256, dtype=np.float32), 1.0)
    return [np.maximum(np.log10(np.float32(glass[c]) / levels), np.float32(0.0))
            for c in range(3)]


def _grey_u16(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint16]:
    """BT.601 luma in 1/256 fixed point, rounded: exact integer grey 0-255."""
    grey = rgb[..., 0].astype(np.uint16) * np.uint16(_LUMA_256[0])
    grey += rgb[..., 1].astype(np.uint16) * np.uint16(_LUMA_256[1])
    grey += rgb[..., 2].astype(np.uint16) * np.uint16(_LUMA_256[2])
    grey += np.uint16(128)
    grey >>= np.uint16(8)
    return grey


def _laplacian_variance(grey: npt.NDArray[np.uint16]) -> float:
    """Variance of the 4-neighbour Laplacian over the interior (exact integer sums).

    int16 holds every value (at most 4 * 255 in size), int32 every square.
    """
    g = grey.view(np.int16)  # 0..255: the same bits
    lap = g[:-2, 1:-1] + g[2:, 1:-1]
    lap += g[1:-1, :-2]
    lap += g[1:-1, 2:]
    lap -= 4 * g[1:-1, 1:-1]
    m = lap.size
    total = float(lap.sum(dtype=np.int64))
    squares = float(np.square(lap, dtype=np.int32).sum(dtype=np.int64))
    return (squares - total * total / m) / m


def _open3(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Binary opening with a 3x3 square, outside counting as background.

    The same as ``scipy.ndimage.binary_opening(mask, np.ones((3, 3)))``, in
    separable shifted ANDs and ORs (a tenth of the time).
    """
    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), dtype=bool)
    pad[1:-1, 1:-1] = mask
    rows = pad[:, :-2] & pad[:, 1:-1] & pad[:, 2:]          # [h + 2, w]
    eroded = rows[:-2] & rows[1:-1] & rows[2:]             # [h, w]
    pad2 = np.zeros((h + 2, w + 2), dtype=bool)
    pad2[1:-1, 1:-1] = eroded
    rows = pad2[:, :-2] | pad2[:, 1:-1] | pad2[:, 2:]
    return rows[:-2] | rows[1:-1] | rows[2:]


def _measure_one(
    rgb: npt.NDArray[np.uint8], glass: npt.NDArray[np.float64], um_per_px: float,
    scale: float, floors: npt.NDArray[np.float32], project: npt.NDArray[np.float32],
    out: dict[str, npt.NDArray[np.float64]], i: int,
) -> None:
    h, w = rgb.shape[:2]
    pixels = h * w
    # Glass: every channel at least glass * 10**-GLASS_OD (integer compare per channel).
    lo = np.ceil(glass * 10.0 ** (-GLASS_OD) - 1e-9).astype(np.int16)
    is_glass = (rgb[..., 0] >= lo[0]) & (rgb[..., 1] >= lo[1]) & (rgb[..., 2] >= lo[2])
    out["background_fraction"][i] = np.count_nonzero(is_glass) / pixels
    grey = _grey_u16(rgb)
    out["mean_intensity"][i] = grey.sum(dtype=np.int64) / pixels
    out["dark_fraction"][i] = np.count_nonzero(grey < DARK_GREY) / pixels
    out["bright_fraction"][i] = np.count_nonzero(grey >= BRIGHT_GREY) / pixels

    # Sharpness and nuclear material at the measuring scale (box-resampled, area average).
    small = _at_scale(rgb, um_per_px, scale)
    out["blur_variance"][i] = _laplacian_variance(grey if small is rgb else _grey_u16(small))
    # Unmixing through one 256-entry table per channel: OD (log10 once per level,
    # not per pixel) already multiplied by each stain model's nuclear projection.
    tables = _od_tables(glass)
    r, g, b = small[..., 0], small[..., 1], small[..., 2]  # take reads strided views as fast
    nuclear = np.zeros(small.shape[:2], dtype=bool)
    for k in range(project.shape[1]):
        conc = np.take(tables[0] * project[0, k], r)
        conc += np.take(tables[1] * project[1, k], g)
        conc += np.take(tables[2] * project[2, k], b)
        nuclear |= conc >= floors[k]
    nuclear = _open3(nuclear)
    count = np.count_nonzero(nuclear)
    out["nuclei_fraction"][i] = count / nuclear.size
    out["nuclear_area_um2"][i] = count * scale * scale


def qc_decision(
    metrics: Mapping[str, npt.ArrayLike],
    thresholds: QCThresholds,
    *,
    thick_fraction: npt.ArrayLike | None = None,
    field: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.bool_], list[str | None]]:
    """``(qc_pass, qc_reason)`` per patch: the first failing rule names the reason.

    ``metrics`` maps every name of :data:`METRIC_COLUMNS` to equal-length
    arrays (a dict from :func:`patch_metrics` or a DataFrame); ``thick_fraction``
    (from the tiling's thumbnail mask) enables the ``"thick smear"`` rule;
    ``field`` gives each patch's photograph (an integer label; negative: not a
    photograph, judged per patch), for the rules with a field scope
    (``nucleated_scope``; None: no patch is in a photograph). The order of the
    rules is in the module docstring; ``qc_reason`` is None where the patch
    passes.
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
    labels: npt.NDArray[np.int64] | None = None
    if field is not None:
        labels = np.asarray(field, dtype=np.int64).reshape(-1)
        if labels.size != n:
            raise InputError(f"qc_decision: field has {labels.size} values for {n} patches.")
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
        ok = rule.passes(values, thresholds)
        if labels is not None and rule.by_field(thresholds):
            ok = ok | _field_any(ok, labels)
        passes.append((rule.reason, ok))
    rules = passes
    reason_code = np.full(n, -1, dtype=np.int16)  # -1: passes so far
    names: list[str] = []
    for code, (name, ok) in enumerate(rules):
        names.append(name)
        reason_code[(reason_code < 0) & ~ok] = code
    qc_pass = reason_code < 0
    qc_reason: list[str | None] = [None if c < 0 else names[c] for c in reason_code.tolist()]
    return qc_pass, qc_reason


def _field_any(ok: npt.NDArray[np.bool_], labels: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Per patch: whether any patch of its field (label >= 0) is ``ok`` (False off fields)."""
    inside = labels >= 0
    out = np.zeros(ok.shape, dtype=bool)
    if not inside.any():
        return out
    good = np.unique(labels[inside & ok])
    out[inside] = np.isin(labels[inside], good)
    return out
