"""What the slide viewer paints over a slide, and the same layers as files for QuPath and figures.

* :func:`slide_patches`: every patch of a slide with its QC decision and
  metrics and, under a model, its probability, attention and the rank
  percentile of its importance within the slide (what the attention
  overlay shows, as :func:`cmil_core.viewer.patients.slide_heatmap` does);
* :func:`viewer_layers`: that table as plain JSON arrays for the browser,
  with the demo's ground-truth tumour boxes;
* :func:`slide_geojson` / :func:`export_geojson`: QuPath-compatible
  detections (a GeoJSON ``FeatureCollection`` of square ``Polygon`` patches
  in level-0 pixels, ``objectType: "detection"``, a ``classification``, and
  the scores and QC metrics as ``measurements``), one collection per slide;
* :func:`heatmap_png`: the slide at a chosen pyramid level with the
  attention rank percentile painted over it, as PNG bytes.

Coordinates are level-0 pixels throughout (``l0_`` in :mod:`cmil_core.ingest.slides`):
QuPath reads GeoJSON in the full-resolution pixel space of the image.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError

__all__ = [
    "MAX_PNG_PIXELS",
    "QC_COLOURS",
    "QC_METRICS",
    "export_geojson",
    "heatmap_levels",
    "heatmap_png",
    "slide_geojson",
    "slide_patches",
    "viewer_layers",
]

#: Quality metrics shown on hover and exported as measurements.
QC_METRICS = store_mod.VIEWER_METRICS
#: Outline colour of each QC rejection reason (Okabe-Ito, colour-blind safe).
QC_COLOURS = {
    "background": "#56B4E9",
    "thick smear": "#CC79A7",
    "too dark": "#000000",
    "too bright": "#F0E442",
    "blurred": "#D55E00",
    "no nucleated cell": "#009E73",
}
OTHER_QC_COLOUR = "#999999"
#: Largest heatmap PNG (pixels): a finer level must be exported by region in QuPath.
MAX_PNG_PIXELS = 64_000_000


def _importance(store: store_mod.Store, model_id: str) -> str:
    model = store_mod.get_model(store, model_id)
    if model is None:
        raise InputError(f"no model {model_id!r} in the store (see the models list)")
    return "attention" if model.aggregator == "attention" else "probability"


def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank percentiles in (0, 1] of the finite values (ties averaged); NaN stays NaN.

    The same as ``scipy.stats.rankdata(v, method="average") / len(v)`` on the
    finite values, in numpy alone: the viewer's first open of a patient need
    not import scipy (about a second on a loaded machine).
    """
    out = np.full(values.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size:
        v = values[finite]
        order = np.argsort(v, kind="stable")
        _, first, counts = np.unique(v[order], return_index=True, return_counts=True)
        ranks = np.empty(v.size)
        ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, ties averaged
        out[finite] = ranks / v.size
    return out


def _slide_arrays(store: store_mod.Store, slide_id: int,
                  model_id: str | None) -> tuple[dict[str, Any], str | None]:
    """:func:`cmil_core.store.slide_patch_arrays` plus ``percentile``; the importance ranked."""
    if store_mod.get_slide(store, int(slide_id)) is None:
        raise InputError(f"no slide {slide_id} in the store")
    by = None if model_id is None else _importance(store, model_id)
    arrays = store_mod.slide_patch_arrays(store, int(slide_id), model_id)
    if by is not None:
        arrays["percentile"] = _percentile(arrays[by])
    return arrays, by


def slide_patches(store: store_mod.Store, slide_id: int,
                  model_id: str | None = None) -> pd.DataFrame:
    """Every patch of a slide: position, QC and metrics, and under ``model_id`` its scores.

    Columns: patch_id, x, y, size (level-0 pixels), qc_pass, qc_reason, the
    :data:`QC_METRICS`, and with a model: probability, attention,
    attention_raw (NaN where not scored) and ``percentile``, the rank
    percentile in (0, 1] of the model's importance (attention, or
    probability for aggregators without attention) within the slide.
    """
    arrays, _ = _slide_arrays(store, slide_id, model_id)
    return pd.DataFrame(arrays)


def _plain(values: np.ndarray, digits: int) -> list[Any]:
    """Floats to ``digits`` significant digits, NaN as None: compact JSON for the browser.

    Significant digits, not decimals: attention on a slide of thousands of
    patches is of the order of 1e-4, which 4 decimals would flatten.
    """
    arr = np.asarray(values, dtype=float)
    finite = np.isfinite(arr)
    out = arr.copy()  # zeros stay; NaN and infinities become None below
    nonzero = finite & (arr != 0)
    if nonzero.any():
        v = arr[nonzero]
        shift = digits - 1 - np.floor(np.log10(np.abs(v))).astype(int)
        up = shift >= 0  # scale by an exact power of ten, so the result prints short
        r = np.empty_like(v)
        r[up] = np.round(v[up] * 10.0 ** shift[up]) / 10.0 ** shift[up]
        r[~up] = np.round(v[~up] / 10.0 ** -shift[~up]) * 10.0 ** -shift[~up]
        out[nonzero] = r
    listed = out.astype(object)
    listed[~finite] = None
    return list(listed.tolist())


def viewer_layers(store: store_mod.Store, slide_id: int,
                  model_id: str | None = None) -> dict[str, Any]:
    """The viewer's overlay data for one slide, as JSON-ready lists (one entry per patch).

    Keys: ``id, x, y, size``; ``qc`` (reason, or None for a passed patch);
    ``metrics`` (name -> list, 4 significant digits); with a model
    ``probability``, ``attention`` (4 significant digits), ``percentile``
    (4 decimals) and ``by`` (the importance the percentile ranks);
    ``regions``: the demo's ground-truth tumour boxes ``[x, y, w, h]``;
    ``qc_colours``: reason -> colour. One query
    (:func:`cmil_core.store.slide_patch_arrays`) and numpy: about 20 ms for
    a slide of the paper-scale store (bench/viewer.py, ``open_patient_ms``).
    """
    arrays, by = _slide_arrays(store, slide_id, model_id)
    layers: dict[str, Any] = {
        "id": arrays["patch_id"].tolist(),
        "x": arrays["x"].tolist(),
        "y": arrays["y"].tolist(),
        "size": arrays["size"].tolist(),
        "qc": [None if passed else ("rejected" if reason is None else str(reason))
               for passed, reason in zip(arrays["qc_pass"].tolist(),
                                         arrays["qc_reason"].tolist(), strict=True)],
        "metrics": {m: _plain(arrays[m], 4) for m in QC_METRICS},
        "qc_colours": {**QC_COLOURS, "rejected": OTHER_QC_COLOUR},
    }
    if by is not None:
        layers["by"] = by
        layers["probability"] = _plain(arrays["probability"], 4)
        layers["attention"] = _plain(arrays["attention"], 4)
        percentile = np.round(arrays["percentile"], 4).astype(object)
        percentile[~np.isfinite(arrays["percentile"])] = None
        layers["percentile"] = percentile.tolist()
    regions = store_mod.tumor_regions_frame(store, int(slide_id))
    layers["regions"] = [[int(r.x), int(r.y), int(r.width), int(r.height)]
                         for r in regions.itertuples()]
    return layers


# --------------------------------------------------------------------------- GeoJSON


def _square(x: int, y: int, size: int) -> list[list[list[int]]]:
    return [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]


def _rgb(hex_colour: str) -> list[int]:
    h = hex_colour.lstrip("#")
    return [int(h[i : i + 2], 16) for i in (0, 2, 4)]


def slide_geojson(store: store_mod.Store, slide_id: int, model_id: str) -> dict[str, Any]:
    """One slide's patches as a QuPath-compatible GeoJSON ``FeatureCollection``.

    Each patch is a ``Feature`` with a square ``Polygon`` in level-0 pixels
    and properties ``objectType: "detection"``, ``classification`` (``name``
    and ``color``: ``"cMIL patch"`` for patches that passed QC, ``"QC: <reason>"``
    for rejected ones), ``measurements`` (``attention percentile``,
    ``probability``, ``attention``, and the QC metrics; missing values left
    out), and ``metadata`` (patch id, slide, patient). The demo's
    ground-truth tumour boxes follow as ``annotation`` features classified
    ``"Tumour (demo truth)"``.
    """
    slide = store_mod.get_slide(store, int(slide_id))
    if slide is None:
        raise InputError(f"no slide {slide_id} in the store")
    frame = slide_patches(store, slide_id, model_id)
    metrics = [m for m in QC_METRICS if m in frame.columns]
    features: list[dict[str, Any]] = []
    name = Path(slide.path).name
    for row in frame.itertuples(index=False):
        if row.qc_pass:
            cls = {"name": "cMIL patch", "color": [47, 125, 122]}
        else:
            reason = str(row.qc_reason) if isinstance(row.qc_reason, str) else "rejected"
            cls = {"name": f"QC: {reason}", "color": _rgb(QC_COLOURS.get(reason, OTHER_QC_COLOUR))}
        measurements: dict[str, float] = {}
        for key, column in (("attention percentile", "percentile"), ("probability", "probability"),
                            ("attention", "attention"), ("attention raw", "attention_raw"),
                            *((m, m) for m in metrics)):
            value = getattr(row, column)
            if value is not None and not pd.isna(value):
                measurements[key] = float(value)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": _square(int(row.x), int(row.y), int(row.size))},
            "properties": {
                "objectType": "detection",
                "classification": cls,
                "measurements": measurements,
                "metadata": {"patch_id": str(int(row.patch_id)), "slide": name,
                             "cohort": slide.cohort, "patient_id": str(slide.patient_id)},
            },
        })
    regions = store_mod.tumor_regions_frame(store, int(slide_id))
    for r in regions.itertuples():
        x, y, w, h = int(r.x), int(r.y), int(r.width), int(r.height)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {"objectType": "annotation",
                           "classification": {"name": "Tumour (demo truth)",
                                              "color": [0, 158, 115]}},
        })
    return {"type": "FeatureCollection", "features": features}


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def export_geojson(
    db: store_mod.Store | str | os.PathLike[str],
    model_id: str,
    cohort: str,
    patient_id: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> list[tuple[Path | None, dict[str, Any]]]:
    """GeoJSON of a model's patches on a cohort's (or one patient's) slides.

    One ``FeatureCollection`` per slide (:func:`slide_geojson`; QuPath
    imports one per image). ``out``: a ``.geojson`` file when the selection
    holds one slide, else a folder that receives
    ``<cohort>_<patient>_<slide>.geojson`` per slide; None returns the
    collections without writing. Returns ``(file or None, collection)`` pairs.
    Raises :class:`InputError` for an unknown model, cohort or patient,
    a selection without slides, or a file ``out`` for several slides.
    """
    with store_mod.using(db, read_only=True) as store:
        if store_mod.get_model(store, model_id) is None:
            raise InputError(f"no model {model_id!r} in the store (see the models list)")
        slides = store_mod.list_slides(store, cohort)
        if not slides and cohort not in [c.cohort for c in store_mod.list_cohorts(store)]:
            raise InputError(f"no cohort {cohort!r} in the store")
        if patient_id is not None:
            slides = [s for s in slides if s.patient_id == patient_id]
            if not slides:
                raise InputError(f"cohort {cohort!r} has no slide of patient {patient_id!r}")
        if not slides:
            raise InputError(f"cohort {cohort!r} has no slide")
        collections = [(s, slide_geojson(store, s.slide_id, model_id)) for s in slides]
    if out is None:
        return [(None, c) for _, c in collections]
    target = Path(out)
    written: list[tuple[Path | None, dict[str, Any]]] = []
    if len(collections) == 1 and target.suffix.lower() in (".geojson", ".json"):
        files = [target]
    else:
        if target.suffix.lower() in (".geojson", ".json"):
            raise InputError(
                f"--out {target}: the selection holds {len(collections)} slides, one GeoJSON "
                "each; give a folder, or --patient for one patient's slide"
            )
        files = [target / f"{_file_part(s.cohort)}_{_file_part(str(s.patient_id))}_"
                          f"{_file_part(Path(s.path).stem)}.geojson" for s, _ in collections]
    for file, (_, collection) in zip(files, collections, strict=True):
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".part")
        tmp.write_text(json.dumps(collection), encoding="utf-8")
        os.replace(tmp, file)
        written.append((file, collection))
    return written


# --------------------------------------------------------------------------- heatmap PNG


def heatmap_levels(store: store_mod.Store, slide_id: int) -> list[tuple[int, int, int]]:
    """``(level, width, height)`` of each pyramid level of a slide's file."""
    from cmil_core.ingest.slides import open_slide

    slide = store_mod.get_slide(store, int(slide_id))
    if slide is None:
        raise InputError(f"no slide {slide_id} in the store")
    with open_slide(slide.path, mpp=slide.mpp) as s:
        return [(i, int(w), int(h)) for i, (w, h) in enumerate(s.level_dimensions)]


def heatmap_png(store: store_mod.Store, model_id: str, slide_id: int, level: int,
                opacity: float = 0.5) -> bytes:
    """The slide at pyramid ``level`` with the importance rank percentile painted over it (PNG).

    Colours: matplotlib's inferno (dark = lowest, yellow = highest within the
    slide); glass and rejected patches stay uncoloured. Levels larger than
    :data:`MAX_PNG_PIXELS` are refused with the coarsest level that fits.
    """
    from PIL import Image

    from cmil_core.ingest.slides import open_slide
    from cmil_core.model.interpret import heatmap
    from cmil_core.viewer.patients import overlay

    slide = store_mod.get_slide(store, int(slide_id))
    if slide is None:
        raise InputError(f"no slide {slide_id} in the store")
    by = _importance(store, model_id)
    with open_slide(slide.path, mpp=slide.mpp) as s:
        if not 0 <= int(level) < s.level_count:
            raise InputError(f"slide {slide_id} has levels 0 to {s.level_count - 1}, not {level}")
        w, h = s.level_dimensions[int(level)]
        if w * h > MAX_PNG_PIXELS:
            fits = [i for i, (a, b) in enumerate(s.level_dimensions) if a * b <= MAX_PNG_PIXELS]
            hint = f"; level {fits[0]} fits" if fits else ""
            raise InputError(f"level {level} of slide {slide_id} is {w} x {h} px, more than "
                             f"{MAX_PNG_PIXELS:,} pixels{hint}")
        image = s.read_region(0, 0, int(level), (int(w), int(h)))
        l0_size = s.dimensions
    frame = store_mod.scored_patches_frame(store, model_id, slide_id=int(slide_id))
    heat = heatmap(l0_size, (int(w), int(h)), frame["x"], frame["y"], frame["size"],
                   frame[by].to_numpy(dtype=float))
    out = io.BytesIO()
    Image.fromarray(overlay(image, heat, opacity, "inferno")).save(out, format="PNG")
    return out.getvalue()
