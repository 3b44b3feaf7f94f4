"""Stain vectors of a slide and its nuclear-stain channel (colour deconvolution).

Why
---
"Does this patch hold a nucleated cell?" is a question about the nuclear
stain, not about a colour. Romanowsky stains (Wright, Giemsa, May-Grunwald-
Giemsa, Leishman, the rapid "Diff-Quik" family) all stain chromatin with a
thiazine dye (azure B, methylene blue: it absorbs red light) and red cells with
eosin (it absorbs green light), but the exact hues move with the reagent, its
pH and age, the staining time and the camera's white balance: violet nuclei on
pink cells on a white background under one lab's Wright stain, brownish-violet
nuclei on a yellowish background under a rapid stain. Fixed RGB thresholds
that fit one of them reject the nucleated cells of another. So the stain
directions are estimated per slide, and the nuclear signal is the amount of
nuclear stain in each pixel after unmixing (Ruifrok and Johnston, Anal Quant
Cytol Histol 2001).

Optical density and unmixing
----------------------------
Light through a stained smear follows Beer-Lambert: the optical density
``OD_c = log10(glass_c / I_c)`` of channel ``c``, relative to the light that
bare glass lets through, is a sum over the stains of
``concentration_s * vector_s[c]``. With the stains' unit OD vectors as the rows
of ``M`` (nuclear, counterstain, and their cross product as a residual
direction), a pixel's concentrations are ``OD @ inv(M)``.

Estimating the vectors: Macenko et al. (ISBI 2009)
--------------------------------------------------
Of a sample of the slide's pixels, keep the stained ones (OD norm at least
:data:`MIN_OD_NORM`, and at most :data:`MAX_OD_NORM`: nearly opaque clumps
carry no reliable hue), find the plane of their two main directions (the two
largest eigenvectors of the OD covariance), measure each pixel's angle in that
plane and take the robust extremes (the 1st and 99th percentiles of the angle)
as the two stain vectors. Macenko's method says nothing of which extreme is
which stain: the **nuclear** stain is the one that absorbs the larger share of
red light (thiazine dyes are blue to violet; eosin and haemoglobin pass red).

Checks, and the fallback
------------------------
Macenko always returns two directions, even on a field of red cells alone
(two shades of eosin) or on a nearly empty slide. The estimate is used only
when it is plausible, else the Romanowsky defaults (:data:`DEFAULT_NUCLEAR`,
:data:`DEFAULT_COUNTERSTAIN`) are used and the reason is recorded:

* at least :data:`MIN_STAINED_PIXELS` stained pixels;
* the nuclear vector absorbs red: red share at least :data:`MIN_NUCLEAR_RED`
  (0.30; eosin and red cells have about 0.1, thiazine-stained chromatin 0.45 to
  0.7), and clearly more than the counterstain (by :data:`MIN_RED_GAP`), which
  must pass red like eosin (red share at most :data:`MAX_COUNTERSTAIN_RED`);
* the two vectors differ by at least :data:`MIN_ANGLE_DEG` degrees;
* the nuclear vector lies within :data:`MAX_NUCLEAR_SHIFT_DEG` (30) degrees of
  the thiazine default: the estimate adapts the hue to the reagent, while a
  red-absorbing artefact (the dark refractile rims of red cells in a
  photograph, chromatic fringes, pen marks) cannot take the nuclear channel's
  place.

A field of red cells alone thus falls back to the defaults, under which its
pixels have almost no nuclear stain, and is rejected as "no nucleated cell".

The nuclear threshold
---------------------
A pixel is nuclear when its nuclear concentration is at least
``nuclear_floor`` (chromatin over eosinophilic cytoplasm or granules still
counts). The floor is relative to the slide: the larger of a quarter of the
99th percentile of the nuclear concentration of the slide's stained pixels
(the chromatin present) and :data:`LEAK_MARGIN` times the 99th percentile of
the nuclear concentration of its counterstain-dominated pixels (how much the
red cells leak into the nuclear channel on this slide), clipped to
[:data:`MIN_NUCLEAR_FLOOR`, :data:`MAX_NUCLEAR_FLOOR`]. So a pale photograph
through a dim microscope and a deeply stained smear are judged alike, and the
darkest red cell of a slide without any nucleus does not pass for one.

>>> import numpy as np
>>> od = np.outer(np.linspace(0.2, 1.0, 500), DEFAULT_NUCLEAR)
>>> od = np.vstack([od, np.outer(np.linspace(0.2, 1.0, 500), DEFAULT_COUNTERSTAIN)])
>>> model = estimate_stains(od)
>>> model.source, round(float(np.dot(model.nuclear, DEFAULT_NUCLEAR)), 3)
('estimated', 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.errors import InputError

__all__ = [
    "DEFAULT_COUNTERSTAIN",
    "DEFAULT_NUCLEAR",
    "DEFAULT_STAINS",
    "LEAK_MARGIN",
    "MAX_COUNTERSTAIN_RED",
    "MAX_NUCLEAR_FLOOR",
    "MAX_NUCLEAR_SHIFT_DEG",
    "MAX_OD_NORM",
    "MIN_ANGLE_DEG",
    "MIN_NUCLEAR_FLOOR",
    "MIN_NUCLEAR_RED",
    "MIN_OD_NORM",
    "MIN_RED_GAP",
    "MIN_STAINED_PIXELS",
    "StainModel",
    "estimate_stains",
]


def _unit(v: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


#: Thiazine (azure B / methylene blue) chromatin of a Romanowsky stain: a Giemsa
#: nucleus of about RGB (110, 70, 170) under white glass, as a unit OD vector.
DEFAULT_NUCLEAR = _unit((0.339, 0.535, 0.150))
#: Eosin and haemoglobin (red cells, about RGB (225, 160, 170)), as a unit OD vector.
DEFAULT_COUNTERSTAIN = _unit((0.028, 0.176, 0.150))
#: A pixel is "stained" (used for the estimate) when its OD vector is at least this long.
MIN_OD_NORM = 0.15
#: ... and at most this long: nearly opaque pixels (clumps, dirt) carry no reliable hue.
MAX_OD_NORM = 1.5
#: The counterstain (eosin, haemoglobin) passes red: its red share is at most this.
MAX_COUNTERSTAIN_RED = 0.35
#: Fewer stained pixels than this in the sample: keep the defaults.
MIN_STAINED_PIXELS = 200
#: The nuclear vector's red component (of a unit vector) must be at least this.
MIN_NUCLEAR_RED = 0.30
#: ... and exceed the counterstain's by at least this.
MIN_RED_GAP = 0.15
#: The two estimated vectors must be at least this many degrees apart.
MIN_ANGLE_DEG = 10.0
#: The estimated nuclear vector may turn at most this far from :data:`DEFAULT_NUCLEAR`.
MAX_NUCLEAR_SHIFT_DEG = 30.0
#: Bounds of the per-slide nuclear-concentration threshold (OD units).
MIN_NUCLEAR_FLOOR = 0.05
MAX_NUCLEAR_FLOOR = 0.20
#: The floor is at least this many times the 99th percentile of the nuclear
#: channel over counterstain-dominated pixels (the red cells' leak into it).
LEAK_MARGIN = 1.5
# Robust extremes of the Macenko angle distribution (percent).
_ANGLE_PERCENTILE = 1.0
# At most this many stained pixels enter the estimate (a deterministic subsample).
_MAX_ESTIMATE_PIXELS = 50_000


@dataclass(frozen=True)
class StainModel:
    """A slide's nuclear and counterstain OD vectors and its nuclear threshold.

    ``nuclear`` and ``counterstain`` are unit OD vectors (R, G, B);
    ``nuclear_floor`` the nuclear concentration (OD units) from which a pixel
    is nuclear; ``source`` is ``"estimated"`` or ``"default"``, and ``note``
    says why the defaults were used; ``default_floor`` is the same slide's
    threshold for the default vectors (used beside an estimate, see
    :func:`cmil_core.ingest.quality.patch_metrics`).
    """

    nuclear: tuple[float, float, float]
    counterstain: tuple[float, float, float]
    nuclear_floor: float
    source: str
    note: str = ""
    default_floor: float | None = None

    def __post_init__(self) -> None:
        for name in ("nuclear", "counterstain"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (3,) or not np.all(np.isfinite(v)) or np.linalg.norm(v) <= 0:
                raise InputError(
                    f"stain vector {name}={getattr(self, name)!r} is not an OD vector.")
            v = v / np.linalg.norm(v)
            object.__setattr__(self, name, (float(v[0]), float(v[1]), float(v[2])))
        if not (math.isfinite(self.nuclear_floor) and self.nuclear_floor > 0):
            raise InputError(f"nuclear_floor={self.nuclear_floor!r} must be a positive number.")

    def unmixing(self) -> npt.NDArray[np.float32]:
        """``[3, 3]`` matrix ``U`` with ``concentrations = OD @ U``.

        Columns: nuclear, counterstain, the rest (their cross product)."""
        nuc, cs = np.asarray(self.nuclear), np.asarray(self.counterstain)
        rest = np.cross(nuc, cs)
        norm = np.linalg.norm(rest)
        rest = rest / norm if norm > 1e-9 else np.array([0.0, 0.0, 1.0])
        return np.linalg.inv(np.stack([nuc, cs, rest])).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` reads it back."""
        return {
            "nuclear": list(self.nuclear), "counterstain": list(self.counterstain),
            "nuclear_floor": self.nuclear_floor, "source": self.source, "note": self.note,
            "default_floor": self.default_floor,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StainModel:
        return cls(tuple(data["nuclear"]), tuple(data["counterstain"]),
                   float(data["nuclear_floor"]), str(data["source"]), str(data.get("note", "")),
                   data.get("default_floor"))


#: The Romanowsky defaults, with the middle of the floor's range.
DEFAULT_STAINS = StainModel(
    tuple(DEFAULT_NUCLEAR), tuple(DEFAULT_COUNTERSTAIN),
    0.15, "default", "",
)


def _floor_for(od: npt.NDArray[np.float64], model_u: npt.NDArray[np.float32]) -> float:
    """The slide's nuclear threshold for one set of stain vectors (module docstring)."""
    if od.size == 0:
        return MAX_NUCLEAR_FLOOR
    conc = od @ model_u
    nuclear = conc[:, 0]
    # How much red cells and eosinophilic material leak into the nuclear channel here.
    counter = nuclear[conc[:, 1] > conc[:, 0]]
    leak = float(np.percentile(counter, 99)) if counter.size else 0.0
    strong = float(np.percentile(nuclear, 99)) / 4.0
    return float(np.clip(max(strong, LEAK_MARGIN * leak), MIN_NUCLEAR_FLOOR, MAX_NUCLEAR_FLOOR))


def estimate_stains(od_pixels: npt.ArrayLike) -> StainModel:
    """The slide's :class:`StainModel` from OD pixels ``[N, 3]`` (method in the module docstring).

    Deterministic: the same pixels give the same model. Falls back to the
    Romanowsky defaults (``source="default"``, ``note`` says why) when the
    estimate is not plausible.
    """
    od = np.asarray(od_pixels, dtype=np.float32).reshape(-1, 3)
    if od.shape[0] > 4 * _MAX_ESTIMATE_PIXELS:  # a deterministic, evenly spread subsample
        od = od[:: math.ceil(od.shape[0] / (4 * _MAX_ESTIMATE_PIXELS))]
    od = od[np.all(np.isfinite(od), axis=1)]
    norm2 = np.einsum("ij,ij->i", od, od)
    stained = od[(norm2 >= MIN_OD_NORM**2) & (norm2 <= MAX_OD_NORM**2)]
    if stained.shape[0] > _MAX_ESTIMATE_PIXELS:
        stained = stained[:: math.ceil(stained.shape[0] / _MAX_ESTIMATE_PIXELS)]
    stained = stained.astype(np.float64)

    def fallback(note: str) -> StainModel:
        base = DEFAULT_STAINS
        floor = _floor_for(stained, base.unmixing()) if stained.size else MAX_NUCLEAR_FLOOR
        return StainModel(base.nuclear, base.counterstain, floor, "default", note)

    if stained.shape[0] < MIN_STAINED_PIXELS:
        return fallback(f"only {stained.shape[0]} stained pixels")
    _, vectors = np.linalg.eigh(np.cov(stained.T))
    plane = vectors[:, [2, 1]]  # the two largest directions
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = stained @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [_ANGLE_PERCENTILE, 100.0 - _ANGLE_PERCENTILE])
    a = np.abs(plane @ np.array([math.cos(lo), math.sin(lo)]))
    b = np.abs(plane @ np.array([math.cos(hi), math.sin(hi)]))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    nuclear, counter = (a, b) if a[0] >= b[0] else (b, a)
    angle = math.degrees(math.acos(float(np.clip(np.dot(nuclear, counter), -1.0, 1.0))))
    if nuclear[0] < MIN_NUCLEAR_RED:
        return fallback(f"no stain absorbs red (red share {nuclear[0]:.2f})")
    if counter[0] > MAX_COUNTERSTAIN_RED:
        return fallback(f"neither stain passes red like eosin (red share {counter[0]:.2f})")
    if nuclear[0] - counter[0] < MIN_RED_GAP:
        return fallback(f"the two stains absorb red alike ({nuclear[0]:.2f}, {counter[0]:.2f})")
    if angle < MIN_ANGLE_DEG:
        return fallback(f"the two stains are {angle:.1f} degrees apart")
    off = math.degrees(math.acos(float(np.clip(np.dot(nuclear, DEFAULT_NUCLEAR), -1.0, 1.0))))
    if off > MAX_NUCLEAR_SHIFT_DEG:
        return fallback(f"the red-absorbing stain is {off:.0f} degrees from a thiazine dye "
                        "(an artefact, not chromatin)")
    model = StainModel(tuple(nuclear), tuple(counter), 1.0, "estimated")
    floor = _floor_for(stained, model.unmixing())
    return StainModel(model.nuclear, model.counterstain, floor, "estimated",
                      default_floor=_floor_for(stained, DEFAULT_STAINS.unmixing()))
