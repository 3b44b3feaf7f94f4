"""Where a model looks: patch scores against the synthetic demo's ground truth (demo study only).

:func:`localisation` reads a model's scored patches and the demo's tumour and
look-alike boxes and says, per cohort and pooled, how well patch probability
and attention find the tumour (see its docstring for the overlap rule,
:data:`OVERLAP_RULE`); :func:`tumour_fraction` is the overlap of a patch with
a slide's boxes. ``cmil evaluate`` prints it under the discrimination table
(:func:`cmil_core.outputs.evaluation.format_evaluation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.analysis.roc import roc_auc

__all__ = ["OVERLAP_RULE", "PATCH_THRESHOLD", "localisation", "tumour_fraction"]


def tumour_fraction(patches: pd.DataFrame, boxes: pd.DataFrame) -> np.ndarray:
    """Share of each patch's area inside the union of a slide's boxes (level-0 pixels).

    ``patches``: slide_id, x, y, size; ``boxes``: slide_id, x, y, width,
    height (tumour boxes, or look-alike boxes: any ground-truth boxes).
    """
    fractions = np.zeros(len(patches))
    if boxes.empty or patches.empty:
        return fractions
    for slide_id, idx in patches.groupby("slide_id").indices.items():
        b = boxes[boxes["slide_id"] == slide_id]
        if b.empty:
            continue
        p = patches.iloc[idx]
        for k, row in enumerate(p.itertuples()):
            size = int(row.size)
            mask = np.zeros((size, size), dtype=bool)
            for box in b.itertuples():
                x0 = max(int(box.x) - int(row.x), 0)
                y0 = max(int(box.y) - int(row.y), 0)
                x1 = min(int(box.x) + int(box.width) - int(row.x), size)
                y1 = min(int(box.y) + int(box.height) - int(row.y), size)
                if x1 > x0 and y1 > y0:
                    mask[y0:y1, x0:x1] = True
            fractions[idx[k]] = mask.mean()
    return fractions


#: The overlap rule of :func:`localisation`, in words (``{overlap}``: ``min_overlap``).
OVERLAP_RULE = (
    "a patch is tumour when at least {overlap:.0%} of its area lies inside the union of its "
    "slide's ground-truth tumour boxes; a look-alike when it is not tumour and at least "
    "{overlap:.0%} of its area lies inside benign look-alike boxes; otherwise background"
)
#: A patch is flagged when its patch probability is at least this (the patch classifier's 0.5).
PATCH_THRESHOLD = 0.5


def _auc_or_none(truth: np.ndarray, values: np.ndarray) -> float | None:
    keep = np.isfinite(values)
    t, v = truth[keep], values[keep]
    return float(roc_auc(t, v)) if 0 < t.sum() < len(t) else None


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def _localisation_summary(
    frame: pd.DataFrame, tumour: np.ndarray, lookalike: np.ndarray, threshold: float
) -> dict[str, Any]:
    positive = frame["bm_metastasis"].to_numpy() == 1
    probability = frame["probability"].to_numpy(dtype=float)
    attention = frame["attention"].to_numpy(dtype=float)
    flagged = probability >= threshold
    per_patient, top_on_lookalike = [], []
    keys = frame[["cohort", "patient_id"]].astype(str).agg("/".join, axis=1).to_numpy()
    for key in dict.fromkeys(keys):
        idx = np.flatnonzero(keys == key)
        a = attention[idx]
        if not np.isfinite(a).all():
            continue
        if positive[idx[0]]:
            t = tumour[idx]
            if 0 < t.sum() < len(t):
                per_patient.append(roc_auc(t, a))
        elif lookalike[idx].any():
            top_on_lookalike.append(bool(lookalike[idx][int(np.argmax(a))]))
    negative_patients = {k for k, pos in zip(keys, positive) if not pos}
    flagged_negative = {k for k, pos, f in zip(keys, positive, flagged) if not pos and f}
    return {
        "patients_positive": len({k for k, pos in zip(keys, positive) if pos}),
        "patients_negative": len(negative_patients),
        "patches": int(positive.sum()),
        "tumour_patches": int(tumour[positive].sum()),
        "probability_auroc": _auc_or_none(tumour[positive], probability[positive]),
        "probability_auroc_all": _auc_or_none(tumour, probability),
        "attention_auroc_mean": float(np.mean(per_patient)) if per_patient else None,
        "patients": len(per_patient),
        "tumour_flagged": _share(flagged[tumour]),
        "patches_negative": int((~positive).sum()),
        "negative_flagged": _share(flagged[~positive]),
        "negative_patients_flagged": len(flagged_negative),
        "lookalike_patches": int(lookalike.sum()),
        "lookalike_flagged": _share(flagged[lookalike]),
        "lookalike_top_attention": (float(np.mean(top_on_lookalike)) if top_on_lookalike
                                    else None),
        "lookalike_top_patients": len(top_on_lookalike),
    }


def localisation(
    store: store_mod.Store, model_id: str, *, min_overlap: float = 0.1,
    threshold: float = PATCH_THRESHOLD,
) -> dict[str, Any]:
    """Patch scores against the demo's ground truth, per cohort and pooled (demo study only).

    Overlap rule (:data:`OVERLAP_RULE`): a patch is *tumour* when at least
    ``min_overlap`` (10 %) of its area lies inside the union of its slide's
    tumour boxes (``demo_tumor_regions``); a *look-alike* when it is not
    tumour and at least ``min_overlap`` of it lies inside benign look-alike
    boxes (``demo_lookalike_regions``: lymphoid clusters, erythroid islands,
    monocytes, smudge cells), when the store has them. A patch is *flagged*
    when its patch probability is at least ``threshold`` (0.5).

    Per cohort (``cohorts``: one dict each, with ``cohort``) and pooled over
    all cohorts (the top-level keys), labelled patients only:

    * ``probability_auroc``: AUROC of patch probability, tumour against other
      patches, within metastatic patients (``patches``, ``tumour_patches``);
    * ``probability_auroc_all``: the same over every patient's patches, so
      that every patch of a negative patient counts as not tumour;
    * ``attention_auroc_mean``: mean over metastatic patients (``patients``)
      of the per-patient AUROC of attention (attention is normalised within
      each patient, so it is compared within patients only);
    * false positives: ``negative_flagged`` (share of negative patients'
      patches flagged, out of ``patches_negative``),
      ``negative_patients_flagged`` (negative patients with a flagged patch,
      out of ``patients_negative``), ``tumour_flagged`` (share of tumour
      patches flagged, the patch-level sensitivity at the same threshold);
    * look-alikes: ``lookalike_patches``, ``lookalike_flagged`` (share
      flagged), ``lookalike_top_attention`` (share of the negative patients
      with a look-alike patch, ``lookalike_top_patients``, whose
      highest-attention patch is a look-alike).

    Plus ``min_overlap``, ``threshold``, ``rule`` (the overlap rule in
    words) and ``lookalikes`` (whether look-alike ground truth was found).
    """
    frame = store_mod.localisation_patches(store, model_id).dropna(subset=["bm_metastasis"])
    frame = frame.reset_index(drop=True)
    boxes = store_mod.tumor_regions_frame(store)
    looks = store_mod.lookalike_regions_frame(store)
    meta = {"min_overlap": min_overlap, "threshold": threshold,
            "rule": OVERLAP_RULE.format(overlap=min_overlap), "lookalikes": not looks.empty}
    if frame.empty or boxes.empty:
        return {"patches": 0, "tumour_patches": 0, "probability_auroc": None,
                "attention_auroc_mean": None, "patients": 0, "cohorts": [], **meta}
    tumour = tumour_fraction(frame, boxes) >= min_overlap
    lookalike = ~tumour & (tumour_fraction(frame, looks) >= min_overlap)
    order = [c.cohort for c in store_mod.list_cohorts(store)]
    cohorts = []
    for cohort in [c for c in order if c in set(frame["cohort"])]:
        idx = np.flatnonzero(frame["cohort"].to_numpy() == cohort)
        cohorts.append({"cohort": cohort, **_localisation_summary(
            frame.iloc[idx], tumour[idx], lookalike[idx], threshold)})
    return {**_localisation_summary(frame, tumour, lookalike, threshold), "cohorts": cohorts,
            **meta}
