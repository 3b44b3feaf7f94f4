"""Negative controls: what a rule that learns nothing gets on the same patients.

The colour-only control (:func:`colour_control`)
------------------------------------------------
A model's AUC means little if a rule without any learning does as well. The
obvious such rule on Wright-Giemsa smears is "how much dark blue-violet
material is there": tumour cells of neuroblastoma are small round *blue*
cells with hyperchromatic nuclei, so a patch full of tumour absorbs much red
light. The control is that rule and nothing else:

* per patch (QC-passed patches only, read through the slide reader at
  :data:`CONTROL_PX` pixels across), the share of pixels whose optical density
  in the red channel, relative to the slide's own glass colour (the glass the
  tiling estimated, as the QC metrics use), is at least :data:`RED_OD`
  (log10; 0.35 means at most 45 % of the glass's red light gets through): the
  dense nuclear chromatin of any nucleated cell, while red cells (which pass
  red light) and pale cytoplasm stay below it;
* per patient, the maximum of that share over all the patient's patches (the
  patch with the most dark nuclear material: a metastasis only needs one
  clump).

It is not a QC metric: ``nuclei_fraction`` counts any blue-violet pixel from
a red OD of 0.10 (pale basophilic cytoplasm included), which is the question
"is there a nucleated cell at all", not "how dark is the densest spot".

If the control discriminates as well as the model, the model may have learnt
nothing but darkness; on the demo study, where benign look-alikes are as dark
as tumour, the control stays low while a model that learns morphology can
rise above it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.analysis.roc import delong_ci, roc_auc
from cmil_core.errors import InputError
from cmil_core.ingest.patch_reading import read_patch
from cmil_core.ingest.slides import open_slide
from cmil_core.progress import Progress, ProgressCallback, no_progress

__all__ = [
    "CONTROL_PX",
    "RED_OD",
    "colour_control",
    "colour_control_scores",
    "dark_share",
    "format_control",
]

#: A pixel counts as dark nuclear material when its red OD relative to the
#: glass (log10) is at least this.
RED_OD = 0.35
#: Patches are read at this many pixels across (whatever their size on the slide).
CONTROL_PX = 112
#: What the control is, in one line (printed beside its AUC).
DESCRIPTION = (
    f"colour-only control: per patch the share of pixels with red OD >= {RED_OD} "
    "relative to the slide's glass; patient score = max over QC-passed patches"
)


def dark_share(
    batch: npt.NDArray[np.uint8],
    glass_rgb: tuple[float, float, float] = (255.0, 255.0, 255.0),
    red_od: float = RED_OD,
) -> npt.NDArray[np.float64]:
    """Per patch of a uint8 ``[B, H, W, 3]`` batch: share of pixels with red OD >= ``red_od``.

    OD is ``log10(glass_red / red)``: a pixel counts when
    ``red <= glass_red * 10**-red_od``.
    """
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4:
        raise InputError("dark_share needs a uint8 array [B, H, W, 3].")
    glass_red = float(glass_rgb[0])
    if not 0 < glass_red <= 255:
        raise InputError(f"glass red {glass_red} must be in (0, 255].")
    limit = math.floor(glass_red * 10.0 ** (-red_od) + 1e-9)
    red = batch[..., 0].reshape(batch.shape[0], -1)
    share: npt.NDArray[np.float64] = np.count_nonzero(red <= limit, axis=1) / max(red.shape[1], 1)
    return share


def colour_control_scores(
    store: store_mod.Store,
    cohorts: Sequence[str] | None = None,
    *,
    progress: ProgressCallback = no_progress,
) -> pd.DataFrame:
    """The control's patient scores: cohort, patient_id, bm_metastasis, score, patches.

    ``cohorts`` None means every cohort. Patients without a QC-passed patch
    are left out.
    """
    names = [c.cohort for c in store_mod.list_cohorts(store)]
    if cohorts is not None:
        unknown = sorted(set(cohorts) - set(names))
        if unknown:
            raise InputError(f"no cohort {', '.join(map(repr, unknown))} in the store")
        names = [c for c in names if c in set(cohorts)]
    parts = [(c, store_mod.passed_patches(store, c), store_mod.slide_glass_colours(store, c))
             for c in names]
    total = sum(int(p["slide_id"].nunique()) for _, p, _ in parts)
    done = 0
    rows: list[dict[str, Any]] = []
    for cohort, patches, glass in parts:
        best: dict[str, tuple[float, int]] = {}
        for slide_id, group in patches.groupby("slide_id", sort=True):
            first = group.iloc[0]
            mpp = float(first["mpp"]) if pd.notna(first["mpp"]) else None
            with open_slide(str(first["path"]), mpp=mpp) as slide:
                batch = np.stack([
                    read_patch(slide, int(r.x), int(r.y), int(r.size), CONTROL_PX)
                    for r in group.itertuples()
                ])
            shares = dark_share(batch, glass.get(int(slide_id), (255.0, 255.0, 255.0)))
            pid = str(first["patient_id"])
            old, n = best.get(pid, (-1.0, 0))
            best[pid] = (max(old, float(shares.max())), n + len(shares))
            done += 1
            progress(Progress("colour control", 1, 1, done, total, str(cohort)))
        labels = store_mod.patients_frame(store, cohort).set_index("patient_id")["bm_metastasis"]
        for pid, (score, n) in best.items():
            label = labels.get(pid)
            rows.append({"cohort": cohort, "patient_id": pid,
                         "bm_metastasis": None if pd.isna(label) else int(label),
                         "score": score, "patches": n})
    return pd.DataFrame(rows, columns=["cohort", "patient_id", "bm_metastasis", "score", "patches"])


def colour_control(
    store: store_mod.Store,
    cohorts: Sequence[str] | None = None,
    *,
    progress: ProgressCallback = no_progress,
) -> list[dict[str, Any]]:
    """Per cohort: n, n_positive and the control's AUC with its DeLong 95% CI.

    Cohorts with one class only have no ``auc`` key (as
    :func:`cmil_core.outputs.evaluation.discrimination`).
    """
    scores = colour_control_scores(store, cohorts, progress=progress)
    out: list[dict[str, Any]] = []
    for cohort in dict.fromkeys(scores["cohort"]):
        part = scores[(scores["cohort"] == cohort) & scores["bm_metastasis"].notna()]
        y = part["bm_metastasis"].to_numpy(dtype=int)
        s = part["score"].to_numpy(dtype=float)
        entry: dict[str, Any] = {"cohort": cohort, "n": len(part), "n_positive": int(y.sum())}
        if 0 < y.sum() < len(y):
            ci = delong_ci(y, s)
            entry.update(auc=roc_auc(y, s), ci_low=ci.low, ci_high=ci.high)
        out.append(entry)
    return out


def format_control(control: list[dict[str, Any]], model_rows: list[dict[str, Any]]) -> str:
    """Terminal lines: the control's AUC per cohort beside the model's (rows of
    ``discrimination``)."""
    model_auc = {r["cohort"]: r.get("auc") for r in model_rows}
    lines = [f"{DESCRIPTION}:"]
    for r in control:
        model = model_auc.get(r["cohort"])
        beside = "" if model is None else f"   (model {model:.3f})"
        if "auc" not in r:
            lines.append(f"  {r['cohort']:<14}{r['n']:>4}  (one class only)")
            continue
        ci = ("" if r["ci_low"] is None
              else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"  {r['cohort']:<14}{r['n']:>4}  AUC {r['auc']:.3f}{ci}{beside}")
    return "\n".join(lines)
