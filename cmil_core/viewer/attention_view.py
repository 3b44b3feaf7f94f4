"""How a slide's patch scores are coloured, with the scale said and flat attention flagged.

Two scales for the Patients page's heatmap (coordinates: level-0 pixels of
the slide, ``th_`` for thumbnail pixels):

- ``rank``: each scored patch's rank percentile within the slide, (0, 1].
  Always shows hot spots, even where every patch scored nearly alike, so it
  must go with :func:`spread`'s notice.
- ``absolute``: the value itself on a fixed range: tumour probability on
  [0, 1]; attention as a multiple of an even share (attention times the
  number of the patient's scored patches: 1 = every patch alike), on
  [0, :data:`ATTENTION_MAX_SHARE`] (higher values saturate).

**Nearly flat attention** ("no patch stands out"): the patient's highest
patch attention is under :data:`FLAT_RATIO` times the median patch's
(attention sums to 1 over a patient's patches, so this ratio does not depend
on how many there are). For tumour probability (no attention), the patches'
probabilities span less than :data:`FLAT_PROBABILITY_RANGE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.model.interpret import heatmap

__all__ = [
    "ATTENTION_MAX_SHARE", "FLAT_PROBABILITY_RANGE", "FLAT_RATIO", "SCALES", "HeatScale",
    "Spread", "describe", "heat_scale", "slide_heat", "spread",
]

#: "no patch stands out" when the top patch has under this many times the median attention.
FLAT_RATIO = 1.5
#: "no patch stands out" when the patches' tumour probabilities span less than this.
FLAT_PROBABILITY_RANGE = 0.1
#: The absolute attention scale ends at this multiple of an even share.
ATTENTION_MAX_SHARE = 4.0
SCALES = {"rank": "rank within the slide", "absolute": "absolute value"}
_NAMES = {"attention": "attention", "attention_raw": "raw attention",
          "probability": "tumour probability"}


@dataclass(frozen=True)
class Spread:
    """How much a patient's patch scores differ: ``flat`` says whether any patch stands out."""

    flat: bool
    ratio: float | None  # top / median attention (None for probability)
    low: float
    high: float
    n: int
    text: str


@dataclass(frozen=True)
class HeatScale:
    """What the colours mean: range ``low``..``high`` and a title naming the scale."""

    low: float
    high: float
    title: str
    ticks: tuple[float, ...]
    ticktext: tuple[str, ...]


def spread(values: npt.ArrayLike, by: str) -> Spread:
    """Whether a patient's patch ``by`` values (all their scored patches) are nearly flat."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if by not in _NAMES:
        raise InputError(f"by={by!r} is not one of {', '.join(_NAMES)}")
    if v.size == 0:
        return Spread(False, None, float("nan"), float("nan"), 0, "no scored patch")
    low, high = float(v.min()), float(v.max())
    if by == "probability":
        flat = high - low < FLAT_PROBABILITY_RANGE
        text = (f"tumour probabilities of the {v.size:,} patches range {low:.2f}-{high:.2f}")
        return Spread(flat, None, low, high, int(v.size), text)
    median = float(np.median(v))
    ratio = high / median if median > 0 else float("inf")
    text = (f"the most-attended of {v.size:,} patches has {ratio:.2f} times the median "
            f"patch's attention ({low:.3f}-{high:.3f})")
    return Spread(bool(ratio < FLAT_RATIO), ratio, low, high, int(v.size), text)


def heat_scale(by: str, scale: str) -> HeatScale:
    """The colour scale of :func:`slide_heat` for ``by`` and ``scale``."""
    name = _NAMES.get(by, by)
    if scale == "rank":
        return HeatScale(0.0, 1.0, f"Patch {name}: rank within this slide (percentile)",
                         (0.0, 0.25, 0.5, 0.75, 1.0), ("lowest", "25", "50", "75", "highest"))
    if scale != "absolute":
        raise InputError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    if by == "probability":
        return HeatScale(0.0, 1.0, "Patch tumour probability (absolute)",
                         (0.0, 0.25, 0.5, 0.75, 1.0), ("0", "0.25", "0.5", "0.75", "1"))
    top = ATTENTION_MAX_SHARE
    ticks = tuple(float(t) for t in np.arange(0.0, top + 0.5, 1.0))
    text = tuple(f"{t:g}×" + (" (even)" if t == 1 else "") for t in ticks)
    return HeatScale(0.0, top, f"Patch {name} as a multiple of an even share (absolute; "
                               f"{top:g}× and more: brightest)", ticks, text)


def slide_heat(
    store: store_mod.Store, model_id: str, slide_id: int, max_side: int = 1024, *,
    by: str = "attention", scale: str = "rank",
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], Spread]:
    """``(thumbnail, heat in [0, 1], spread)`` of one slide under ``scale``.

    ``heat`` is NaN where no scored patch lies; ``spread`` is the whole
    patient's (all their slides), so that the flat notice is the same on each.
    """
    from cmil_core.ingest.slides import open_slide

    if by not in _NAMES:
        raise InputError(f"by={by!r} is not one of {', '.join(_NAMES)}")
    shown = heat_scale(by, scale)
    slide = store_mod.get_slide(store, int(slide_id))
    if slide is None:
        raise InputError(f"slide {slide_id} is not in the store")
    if store_mod.get_model(store, model_id) is None:
        raise InputError(f"model {model_id!r} is not in the store")
    with open_slide(slide.path, mpp=slide.mpp) as s:
        thumb = np.asarray(s.thumbnail(int(max_side)).convert("RGB"), dtype=np.uint8)
        l0_size = s.dimensions
    frame = store_mod.scored_patches_frame(store, model_id, slide_id=int(slide_id))
    if slide.patient_id is not None:
        patient = store_mod.scored_patches_frame(store, model_id, cohort=slide.cohort,
                                                 patient_id=slide.patient_id)
    else:
        patient = frame
    values = frame[by].to_numpy(dtype=float)
    if scale == "absolute":
        if by.startswith("attention"):
            n = int(np.isfinite(patient[by].to_numpy(dtype=float)).sum())
            values = values * max(n, 1)
        values = np.clip((values - shown.low) / (shown.high - shown.low), 0.0, 1.0)
    heat = heatmap(l0_size, (thumb.shape[1], thumb.shape[0]), frame["x"], frame["y"],
                   frame["size"], values, normalise=scale == "rank")
    return thumb, heat, spread(patient[by].to_numpy(dtype=float), by)


def describe(info: Spread, by: str) -> dict[str, Any]:
    """Plain data of a :class:`Spread` (for JSON and reports)."""
    return {"by": by, "flat": info.flat, "ratio": info.ratio, "low": info.low,
            "high": info.high, "patches": info.n, "text": info.text}
