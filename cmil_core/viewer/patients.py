"""One patient at a time: the review queue, a patient's record, and what drove the score.

Everything here is a pure function of the store (and of the slide files, read
on demand): the patients page draws what these return.

* :func:`patient_list`: every patient a model scored, the review queue first
  (patients misclassified at the model's training cutoff);
* :func:`patient_detail`: score, risk group, label, clinical variables,
  slides and patch counts of one patient;
* :func:`attention_patches`: a patient's (or a slide's) highest- and
  lowest-attention patches; :func:`read_patch` / :func:`read_patches` read
  them from the slide file, never from a cache of images;
  :func:`patch_gradcam` explains one patch through the model's encoder;
* :func:`slide_heatmap` and :func:`overlay`: a slide's thumbnail with patch
  scores painted over it;
* :func:`rejected_patches`: the patches quality control rejected, and why.

Coordinate systems (as in :mod:`cmil_core.ingest.slides`): ``x, y, size`` of
patches are level-0 pixels (``l0_``); heatmaps are in thumbnail pixels
(``th_``).

A patient is named by cohort and patient id together (patient ids are unique
only within a cohort). :func:`patient_ref` writes that pair as one string,
``"<cohort>/<patient_id>"``, for links (the page's ``?patient=`` parameter);
cohort names cannot contain ``/`` (see :mod:`cmil_core.clinical.cohort_import`), so
:func:`parse_patient_ref` splits at the first slash and patient ids may hold
slashes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError, shown
from cmil_core.store.model_rules import operating_cutoff

__all__ = [
    "IMPORTANCE_COLUMNS",
    "REVIEW_LABELS",
    "attention_patches",
    "importance_column",
    "model_from_link",
    "overlay",
    "parse_patient_ref",
    "patch_gradcam",
    "patient_detail",
    "patient_list",
    "patient_ref",
    "read_patch",
    "read_patches",
    "rejected_patches",
    "slide_heatmap",
]

#: ``review`` values of :func:`patient_list`, in queue order.
REVIEW_LABELS = ("false negative", "false positive")
#: Per-patch scores a gallery or heatmap can rank by.
IMPORTANCE_COLUMNS = ("attention", "attention_raw", "probability")
# Clinical columns of the patients table proper; the rest live in its JSON column.
_OUTCOME_COLUMNS = ("os_months", "os_event", "efs_months", "efs_event")
# Longest "<cohort>/<patient_id>" a link may hold: 64-character cohort, 128-character id.
MAX_REF_LENGTH = 64 + 1 + 128
# Largest side (pixels) a patch is read at: "full resolution" of a huge patch is capped.
MAX_PATCH_PX = 2048


# --------------------------------------------------------------------------- names


def patient_ref(cohort: str, patient_id: str) -> str:
    """``"<cohort>/<patient_id>"``: one string naming a patient (see the module docstring).

    >>> patient_ref("external_a", "A001")
    'external_a/A001'
    """
    if not cohort or "/" in cohort:
        raise InputError(f"cohort name {cohort!r} cannot name a patient (empty or has '/')")
    return f"{cohort}/{patient_id}"


def parse_patient_ref(text: str) -> tuple[str, str]:
    """``(cohort, patient_id)`` from :func:`patient_ref`'s string.

    A link is user input: one longer than any real reference
    (:data:`MAX_REF_LENGTH`), or holding control characters, is refused with
    an :class:`InputError` that quotes it shortened and escaped.

    >>> parse_patient_ref("external_b/B/07")
    ('external_b', 'B/07')
    """
    text = str(text)
    if len(text) > MAX_REF_LENGTH or not text.isprintable():
        raise InputError(
            f"patient '{shown(text)}' is not a patient reference "
            f"(<cohort>/<patient_id>, at most {MAX_REF_LENGTH} printable characters)"
        )
    cohort, sep, patient_id = text.partition("/")
    if not sep or not cohort or not patient_id:
        raise InputError(
            f"patient {text!r} is not of the form <cohort>/<patient_id> (e.g. training/T001)"
        )
    return cohort, patient_id


def model_from_link(wanted: str | None, model_ids: Sequence[str]) -> tuple[int, str | None]:
    """Which of ``model_ids`` a ``?model=`` link picks, and a notice when it names none.

    Returns (index into ``model_ids``, notice): index 0 and a one-line notice
    (the link's value shortened and escaped) when ``wanted`` is not a model
    of the store; no notice when there is no ``?model=`` at all.

    >>> model_from_link("m2", ["m1", "m2"])
    (1, None)
    >>> model_from_link("nope", ["m1"])
    (0, "The link's model 'nope' is not in this store; showing model 'm1'.")
    """
    if wanted is None or wanted == "":
        return 0, None
    if wanted in model_ids:
        return list(model_ids).index(wanted), None
    return 0, (f"The link's model '{shown(str(wanted))}' is not in this store; "
               f"showing model '{model_ids[0]}'.")


# --------------------------------------------------------------------------- checks


def _model(store: store_mod.Store, model_id: str) -> store_mod.ModelRow:
    model = store_mod.get_model(store, model_id)
    if model is None:
        raise InputError(f"no model {model_id!r} in the store (see the models list)")
    return model




def _positive_int(name: str, value: object, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name}={value!r} must be a whole number >= 1")
    if high is not None and int(value) > high:
        raise InputError(f"{name}={value!r} must be at most {high}")
    return int(value)


def _importance(by: str) -> str:
    if by not in IMPORTANCE_COLUMNS:
        raise InputError(f"by={by!r} is not one of {', '.join(IMPORTANCE_COLUMNS)}")
    return by


def _slide(store: store_mod.Store, slide_id: int) -> store_mod.SlideRow:
    slide = store_mod.get_slide(store, int(slide_id))
    if slide is None:
        raise InputError(f"no slide {slide_id} in the store")
    return slide


def _none_if_missing(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if np.isnan(value) else float(value)
    return value


# --------------------------------------------------------------------------- the list


def importance_column(store: store_mod.Store, model_id: str) -> str:
    """The per-patch score to rank patches by: ``attention``, or ``probability``
    for aggregators without attention (histogram)."""
    return "attention" if _model(store, model_id).aggregator == "attention" else "probability"


def patient_list(store: store_mod.Store, model_id: str) -> pd.DataFrame:
    """Every patient the model scored, the review queue first.

    Columns: cohort, patient_id, score, label (``bm_metastasis``: 1, 0 or
    missing), risk_group (``high`` when score >= the model's cutoff, as
    stored by scoring), review, margin (score - cutoff).

    ``review`` is ``"false negative"`` (label 1, low risk), ``"false
    positive"`` (label 0, high risk) or ``""``, at the cutoff fixed on the
    training cohort (``models.cutoff``). Order: false negatives, then false
    positives, each from the farthest from the cutoff (the most confidently
    wrong) to the nearest; then everyone else by score, highest first; ties
    by cohort and patient id.
    """
    model = _model(store, model_id)
    cutoff = operating_cutoff(model)
    frame = store_mod.patient_scores_frame(store, model_id)
    score = frame["score"].to_numpy(dtype=float)
    label = frame["bm_metastasis"].astype("Int16")
    high = score >= cutoff
    positive = (label == 1).fillna(False).to_numpy(dtype=bool)
    negative = (label == 0).fillna(False).to_numpy(dtype=bool)
    review = np.where(positive & ~high, REVIEW_LABELS[0],
                      np.where(negative & high, REVIEW_LABELS[1], ""))
    risk = frame["risk_group"].where(frame["risk_group"].notna(),
                                     pd.Series(np.where(high, "high", "low"), index=frame.index))
    out = pd.DataFrame({
        "cohort": frame["cohort"].astype(str),
        "patient_id": frame["patient_id"].astype(str),
        "score": score,
        "label": label,
        "risk_group": risk.astype(str),
        "review": review,
        "margin": score - cutoff,
    })
    queue = np.select([review == REVIEW_LABELS[0], review == REVIEW_LABELS[1]], [0, 1], 2)
    # Within the queue: farthest from the cutoff first; outside it: highest score first.
    key = np.where(queue < 2, -np.abs(score - cutoff), -score)
    out = out.assign(_q=queue, _k=key).sort_values(
        ["_q", "_k", "cohort", "patient_id"], kind="mergesort"
    )
    return out.drop(columns=["_q", "_k"]).reset_index(drop=True)


# --------------------------------------------------------------------------- one patient


def patient_detail(
    store: store_mod.Store, model_id: str, cohort: str, patient_id: str
) -> dict[str, Any]:
    """One patient's record under a model.

    Keys: cohort, patient_id, score, risk_group, label, review, cutoff (None
    for score, risk group and review when the model did not score the
    patient: no quality-passed patch, or a cohort not scored yet), clinical
    (a dict: follow-up columns, then the clinical table's other columns, in
    its order; missing values are None), slides (DataFrame: slide_id, path,
    name, sha256, kind, width, height, mpp, status, error, patches_kept,
    patches_rejected), patches_kept, patches_rejected.
    """
    model = _model(store, model_id)
    cutoff = operating_cutoff(model)
    patients = store_mod.patients_frame(store, cohort)
    match = patients[patients["patient_id"] == patient_id]
    if match.empty:
        raise InputError(f"no patient {patient_id!r} in cohort {cohort!r}")
    row = match.iloc[0]
    clinical: dict[str, Any] = {c: _none_if_missing(row[c]) for c in _OUTCOME_COLUMNS}
    clinical.update({str(k): _none_if_missing(v) for k, v in (row["clinical"] or {}).items()})
    label = _none_if_missing(row["bm_metastasis"])
    label = None if label is None else int(label)

    scores = store_mod.patient_scores_frame(store, model_id, cohort)
    scored = scores[scores["patient_id"] == patient_id]
    score = risk = None
    review = ""
    if not scored.empty:
        score = float(scored["score"].iloc[0])
        stored = _none_if_missing(scored["risk_group"].iloc[0])
        risk = stored or ("high" if score >= cutoff else "low")
        if label == 1 and score < cutoff:
            review = REVIEW_LABELS[0]
        elif label == 0 and score >= cutoff:
            review = REVIEW_LABELS[1]

    counts = store_mod.qc_counts(store, cohort)
    counts = counts[counts["patient_id"] == patient_id]
    kept = counts[counts["qc_reason"].isna()].groupby("slide_id")["patches"].sum()
    rejected = counts[counts["qc_reason"].notna()].groupby("slide_id")["patches"].sum()
    slides = pd.DataFrame(
        [
            {
                "slide_id": s.slide_id, "path": s.path, "name": Path(s.path).name,
                "sha256": s.sha256,
                "kind": s.kind, "width": s.width, "height": s.height, "mpp": s.mpp,
                "status": s.status, "error": s.error,
                "patches_kept": int(kept.get(s.slide_id, 0)),
                "patches_rejected": int(rejected.get(s.slide_id, 0)),
            }
            for s in store_mod.patient_slides(store, cohort, patient_id)
        ],
        columns=["slide_id", "path", "name", "sha256", "kind", "width", "height", "mpp", "status",
                 "error", "patches_kept", "patches_rejected"],
    )
    return {
        "cohort": cohort,
        "patient_id": patient_id,
        "score": score,
        "risk_group": risk,
        "label": label,
        "review": review,
        "cutoff": cutoff,
        "clinical": clinical,
        "slides": slides,
        "patches_kept": int(slides["patches_kept"].sum()),
        "patches_rejected": int(slides["patches_rejected"].sum()),
    }


def attention_patches(
    store: store_mod.Store,
    model_id: str,
    *,
    slide_id: int | None = None,
    patient: tuple[str, str] | None = None,
    k: int = 8,
    by: str = "attention",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(top, bottom)``: the ``k`` patches with the highest and the lowest ``by``.

    Of one slide (``slide_id``) or of all a patient's slides (``patient`` =
    ``(cohort, patient_id)``): give exactly one. ``by``: ``attention`` (the
    default; the softmax weights within the patient's bag), ``attention_raw``
    or ``probability``. ``top`` is ordered from the highest, ``bottom`` from
    the lowest; ties by patch id. When there are fewer than ``2 k`` scored
    patches, ``bottom`` holds only patches not in ``top``. Columns: patch_id,
    slide_id, x, y, size (level-0 pixels), attention, attention_raw,
    probability. Both are empty when the model scored no patch there.
    """
    k = _positive_int("k", k)
    by = _importance(by)
    if (slide_id is None) == (patient is None):
        raise InputError("attention_patches needs a slide_id or a patient, not both")
    if slide_id is not None:
        slide_ids = [int(slide_id)]
    else:
        assert patient is not None
        slide_ids = store_mod.patient_slide_ids(store, *patient)
    # Only these slides' rows are read: milliseconds at the study's 1.4 million
    # patches (bench/scale.py, topk_p95_ms). An unknown model or slide has no
    # scored patch: it is looked up only then, to say so.
    top, bottom, scored = store_mod.extreme_patches(store, model_id, slide_ids, by=by, k=k)
    if not scored:
        _model(store, model_id)
        if slide_id is not None:
            _slide(store, slide_id)
    elif top.empty:
        raise InputError(
            f"model {model_id!r} gives no {by} per patch (a histogram model has no attention); "
            "rank by probability instead"
        )
    return top, bottom


def rejected_patches(store: store_mod.Store, slide_id: int,
                     limit: int | None = 200) -> pd.DataFrame:
    """A slide's patches rejected by quality control, by reason then grid order.

    Columns: patch_id, slide_id, x, y, size (level-0 pixels), qc_reason (one
    of :data:`cmil_core.ingest.quality.QC_REASONS`) and the quality metrics.
    ``limit``: at most this many rows (None: all); per-reason totals are in
    :func:`patient_detail` and :func:`cmil_core.store.qc_counts`.
    """
    _slide(store, slide_id)
    if limit is not None:
        limit = _positive_int("limit", limit)
    return store_mod.rejected_patches_frame(store, int(slide_id), limit)


# --------------------------------------------------------------------------- pixels


def read_patches(
    slide_path: str | os.PathLike[str],
    mpp: float | None,
    patches: pd.DataFrame | Sequence[tuple[int, int, int]],
    out_px: int = 224,
) -> list[npt.NDArray[np.uint8]]:
    """Patches read from the slide file, opened once: RGB uint8 ``[out_px, out_px, 3]`` each.

    ``patches``: a frame with columns x, y, size, or (x, y, size) triples, in
    level-0 pixels. Pixels are those the encoder saw
    (:func:`cmil_core.ingest.patch_reading.read_patch`: the best pyramid level, then a box
    filter to ``out_px``). Raises :class:`~cmil_core.ingest.slides.SlideError` when
    the file is missing or unreadable.
    """
    from cmil_core.ingest.patch_reading import read_patch as _read
    from cmil_core.ingest.slides import open_slide

    out_px = _positive_int("out_px", out_px, MAX_PATCH_PX)
    if isinstance(patches, pd.DataFrame):
        coords = patches[["x", "y", "size"]].to_numpy(dtype=np.int64).tolist()
    else:
        coords = [tuple(int(v) for v in c) for c in patches]
    for x, y, size in coords:
        if size < 1:
            raise InputError(f"patch at ({x}, {y}) has size {size}; it must be >= 1 pixel")
    if not coords:
        return []
    with open_slide(slide_path, mpp=mpp) as slide:
        return [_read(slide, x, y, size, out_px) for x, y, size in coords]


def read_patch(
    slide_path: str | os.PathLike[str],
    mpp: float | None,
    x: int,
    y: int,
    size: int,
    out_px: int = 224,
) -> npt.NDArray[np.uint8]:
    """One patch, ``size`` level-0 px at ``(x, y)``, as RGB uint8 ``[out_px, out_px, 3]``.

    ``out_px = size`` reads it at full resolution. See :func:`read_patches`.
    """
    return read_patches(slide_path, mpp, [(int(x), int(y), int(size))], out_px)[0]


def patch_gradcam(
    db: store_mod.Store | str | os.PathLike[str],
    model_id: str,
    image: npt.NDArray[np.uint8],
    *,
    model: Any = None,
) -> npt.NDArray[np.float32]:
    """Grad-CAM of one patch under a model: float32 ``[H, W]`` in [0, 1], the image's size.

    ``model``: the model already loaded (:func:`cmil_core.model.modeling.load_model`),
    to skip reading it again; else it is loaded from the store's artifacts.

    ``image``: RGB uint8 ``[H, W, 3]`` (e.g. :func:`read_patch`), resized to
    the encoder's input inside. High values mark the pixels that pushed the
    model's patch classifier towards "tumour" (:func:`cmil_core.model.interpret.gradcam`);
    pass the result to :func:`overlay`. Raises
    :class:`~cmil_core.errors.InputError` when the model's encoder cannot be
    differentiated (a TorchScript module) or has no convolution.
    """
    from cmil_core.model.interpret import gradcam
    from cmil_core.model.modeling import load_model

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(
            f"Grad-CAM needs an RGB uint8 image [H, W, 3], not {arr.dtype} {arr.shape}"
        )
    if model is None:
        model = load_model(db, model_id)
    if model.encoder.spec.torchscript:
        raise InputError(
            f"model {model_id!r}: its encoder is a TorchScript file, whose layers Grad-CAM "
            "cannot reach; Grad-CAM needs one of cmil_core's CNN encoders"
        )
    cam, _ = gradcam(arr, model.encoder, model.aggregator)
    return cam


def slide_heatmap(
    store: store_mod.Store,
    model_id: str,
    slide_id: int,
    max_side: int = 1024,
    *,
    by: str = "attention",
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """``(thumbnail, heat)``: a slide's RGB uint8 thumbnail and a float32 map of one size.

    ``heat`` holds each scored patch's ``by`` (``attention``, the default,
    ``attention_raw`` or ``probability``) as a rank percentile within the
    slide, in (0, 1], averaged where patches overlap, NaN where no scored
    patch lies (glass, rejected patches): :func:`cmil_core.model.interpret.heatmap`.
    The thumbnail's longer side is at most ``max_side`` pixels.
    """
    from cmil_core.ingest.slides import open_slide
    from cmil_core.model.interpret import heatmap

    _model(store, model_id)
    by = _importance(by)
    max_side = _positive_int("max_side", max_side, 8192)
    slide = _slide(store, slide_id)
    with open_slide(slide.path, mpp=slide.mpp) as s:
        thumb = np.asarray(s.thumbnail(max_side).convert("RGB"), dtype=np.uint8)
        l0_size = s.dimensions
    frame = store_mod.scored_patches_frame(store, model_id, slide_id=int(slide_id))
    th_size = (thumb.shape[1], thumb.shape[0])
    heat = heatmap(l0_size, th_size, frame["x"], frame["y"], frame["size"],
                   frame[by].to_numpy(dtype=float))
    return thumb, heat


def overlay(
    image: npt.NDArray[np.uint8],
    heat: npt.NDArray[np.floating[Any]],
    opacity: float = 0.5,
    colormap: str = "inferno",
) -> npt.NDArray[np.uint8]:
    """``image`` with ``heat`` (values in [0, 1], NaN = leave the pixel) painted over it.

    ``heat`` has the image's height and width; each pixel becomes
    ``(1 - opacity) * image + opacity * colormap(heat)`` (a matplotlib
    colormap name). Returns RGB uint8 of the image's shape.
    """
    import matplotlib

    base = np.asarray(image)
    values = np.asarray(heat, dtype=np.float64)
    if base.ndim != 3 or base.shape[2] != 3 or base.dtype != np.uint8:
        raise InputError(
            f"overlay needs an RGB uint8 image [H, W, 3], not {base.dtype} {base.shape}"
        )
    if values.shape != base.shape[:2]:
        raise InputError(
            f"overlay: heat map {values.shape} and image {base.shape[:2]} differ in size"
        )
    if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0 <= opacity <= 1:
        raise InputError(f"opacity={opacity!r} must be between 0 and 1")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise InputError(
            f"colormap {colormap!r} is not a matplotlib colormap (e.g. inferno, viridis)"
        ) from None
    covered = np.isfinite(values)
    # Only the covered pixels are coloured and blended (a thumbnail is mostly glass);
    # the arithmetic per pixel is the same as blending the whole image.
    colours = cmap(np.clip(values[covered], 0.0, 1.0))[:, :3] * 255.0
    out = base.copy()
    blended = (1.0 - opacity) * base[covered].astype(np.float64) + opacity * colours
    out[covered] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
