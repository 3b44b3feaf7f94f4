"""How good a trained model is: discrimination per cohort and, on the demo, localisation.

:func:`discrimination` gives, per cohort, the AUC of the patient score
against the marrow-metastasis label with its DeLong 95% CI, and the
sensitivity and specificity at the model's training cutoff.

:func:`localisation` uses the demo's ground truth (``demo_tumor_regions``):
a patch is *tumour* when at least ``min_overlap`` of its area lies inside a
tumour box. Within metastatic patients, it reports the AUROC of the patch
probability against that truth over all their patches pooled, and the mean
over patients of the per-patient AUROC of the attention (attention is
normalised within each patient, so it is compared within patients only).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.stats import (
    brier_score,
    calibration_bins,
    calibration_smooth,
    decision_curve,
    delong_ci,
    metrics_at_cutoff,
    roc_auc,
    roc_curve,
)
from cmil_core.survival import kaplan_meier_table, risk_cutoff, risk_groups, survival_analysis

__all__ = [
    "CUTOFF_METHODS", "calibration", "discrimination", "format_evaluation", "localisation", "metrics_table",
    "risk_survival", "roc_curves", "survival_cutoff", "tumour_fraction",
]


def discrimination(st: store_mod.Store, model_id: str) -> list[dict[str, Any]]:
    """Per cohort: n, positives, AUC with DeLong CI, sensitivity/specificity at the cutoff."""
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    scores = store_mod.patient_scores_frame(st, model_id)
    order = [c.cohort for c in store_mod.list_cohorts(st)]  # training first
    out = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        rows = scores[scores["cohort"] == cohort]
        rows = rows.dropna(subset=["bm_metastasis"])
        y = rows["bm_metastasis"].to_numpy(dtype=int)
        s = rows["score"].to_numpy(dtype=float)
        entry: dict[str, Any] = {"cohort": cohort, "n": len(rows), "n_positive": int(y.sum())}
        if 0 < y.sum() < len(y):
            ci = delong_ci(y, s)
            at = metrics_at_cutoff(y, s, model.cutoff if model.cutoff is not None else 0.5)
            entry.update(auc=roc_auc(y, s), ci_low=ci.low, ci_high=ci.high,
                         sensitivity=at.sensitivity, specificity=at.specificity)
        out.append(entry)
    return out


def roc_curves(st: store_mod.Store, model_id: str) -> list[dict[str, Any]]:
    """Per cohort with both classes: ``cohort, fpr, tpr`` (lists), ``auc, ci_low, ci_high``."""
    scores = store_mod.patient_scores_frame(st, model_id).dropna(subset=["bm_metastasis"])
    out = []
    for row in discrimination(st, model_id):
        if "auc" not in row:
            continue
        rows = scores[scores["cohort"] == row["cohort"]]
        curve = roc_curve(rows["bm_metastasis"].to_numpy(dtype=int), rows["score"].to_numpy())
        out.append({**row, "fpr": curve.fpr.tolist(), "tpr": curve.tpr.tolist()})
    return out


def metrics_table(st: store_mod.Store, model_id: str) -> pd.DataFrame:
    """Sensitivity, specificity, PPV and NPV with Wilson 95% CIs at the training cutoff, per cohort."""
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    cutoff = model.cutoff if model.cutoff is not None else 0.5
    scores = store_mod.patient_scores_frame(st, model_id).dropna(subset=["bm_metastasis"])
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    rows = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        part = scores[scores["cohort"] == cohort]
        m = metrics_at_cutoff(part["bm_metastasis"].to_numpy(dtype=int),
                              part["score"].to_numpy(), cutoff).to_dict()
        rows.append({"cohort": cohort, "n": len(part), **m})
    return pd.DataFrame(rows)


def calibration(st: store_mod.Store, model_id: str) -> list[dict[str, Any]]:
    """Per cohort with both classes: Brier score, binned and smoothed calibration, decision curve.

    Keys: ``cohort, n, brier, bins`` (:func:`~cmil_core.stats.calibration_bins`,
    5 quantile bins), ``smooth`` (:func:`~cmil_core.stats.calibration_smooth`),
    ``decision`` (:func:`~cmil_core.stats.decision_curve`).
    """
    scores = store_mod.patient_scores_frame(st, model_id).dropna(subset=["bm_metastasis"])
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    out = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        part = scores[scores["cohort"] == cohort]
        y = part["bm_metastasis"].to_numpy(dtype=int)
        p = part["score"].to_numpy(dtype=float)
        out.append({
            "cohort": cohort, "n": len(part), "brier": brier_score(y, p),
            "bins": calibration_bins(y, p, n_bins=5), "smooth": calibration_smooth(y, p),
            "decision": decision_curve(y, p),
        })
    return out


ENDPOINTS = {"os": ("os_months", "os_event", "overall survival"),
             "efs": ("efs_months", "efs_event", "event-free survival")}


CUTOFF_METHODS = {
    "model": "the model's cutoff (Youden on out-of-fold training scores)",
    "youden": "training Youden (in-sample training scores)",
    "median": "training median",
    "maxstat": "maxstat on training (maximally selected log-rank, groups of 10 % or more)",
}


def survival_cutoff(
    st: store_mod.Store, model_id: str, method: str | float = "model", endpoint: str = "os"
) -> dict[str, Any]:
    """The risk-group cutoff, always fixed on the model's training cohort.

    ``method``: a key of :data:`CUTOFF_METHODS` or a number. Returns
    ``{"method", "value", "description", ...}`` (maxstat adds its statistic
    and its search-corrected p).
    """
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    if not isinstance(method, str):
        return {"method": "number", "value": float(method), "description": f"the number {method:g}"}
    if method not in CUTOFF_METHODS:
        raise InputError(f"cutoff {method!r} is not one of {', '.join(CUTOFF_METHODS)} or a number")
    description = CUTOFF_METHODS[method]
    if method == "model":
        return {"method": method, "value": model.cutoff, "description": description}
    time, event, _ = ENDPOINTS[endpoint]
    train = store_mod.patient_scores_frame(st, model_id, model.train_cohorts)
    chosen = risk_cutoff(train, "score", method, time=time, event=event, label="bm_metastasis")
    return {**chosen.to_dict(), "description": description}


def risk_survival(
    st: store_mod.Store, model_id: str, endpoint: str = "os", cutoff: str | float = "model"
) -> list[dict[str, Any]]:
    """Per cohort: Kaplan-Meier by cMIL risk group, log-rank and Cox HR.

    Risk groups: score >= the cutoff of :func:`survival_cutoff` (fixed on the
    training cohort, applied unchanged). Each entry: ``cohort``, ``cutoff``,
    ``curves`` (the long table of
    :func:`~cmil_core.survival.kaplan_meier_table`), ``result`` (the
    :func:`~cmil_core.survival.survival_analysis` dict: groups, logrank, cox
    with "high" against "low", at_risk). Cohorts without follow-up, or with a
    single risk group, come with ``note`` instead.
    """
    if endpoint not in ENDPOINTS:
        raise InputError(f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    time, event, _ = ENDPOINTS[endpoint]
    chosen = survival_cutoff(st, model_id, cutoff, endpoint)
    scores = store_mod.patient_scores_frame(st, model_id)
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    out: list[dict[str, Any]] = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        part = scores[scores["cohort"] == cohort].dropna(subset=[time, event]).copy()
        entry: dict[str, Any] = {"cohort": cohort, "n": len(part), "cutoff": chosen}
        part["risk_group"] = risk_groups(part["score"], chosen["value"]) if len(part) else []
        if part.empty or part[event].sum() == 0 or part["risk_group"].nunique() < 2:
            entry["note"] = "no follow-up, no events, or a single risk group"
        else:
            frame = part[[time, event, "risk_group"]]
            entry["curves"] = kaplan_meier_table(frame, time, event, "risk_group")
            entry["result"] = survival_analysis(frame, time, event, group="risk_group")
        out.append(entry)
    return out


def tumour_fraction(patches: pd.DataFrame, boxes: pd.DataFrame) -> np.ndarray:
    """Share of each patch's area inside the union of a slide's tumour boxes (level-0 pixels)."""
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


def localisation(
    st: store_mod.Store, model_id: str, *, min_overlap: float = 0.1
) -> dict[str, Any]:
    """AUROCs of patch scores against the demo's tumour boxes, within metastatic patients."""
    frame = st.cursor().execute(
        """SELECT s.cohort, s.patient_id, p.slide_id, p.x, p.y, p.size, ps.probability,
                  ps.attention
           FROM patch_scores ps JOIN patches p USING (patch_id) JOIN slides s USING (slide_id)
           JOIN patients pt ON pt.cohort = s.cohort AND pt.patient_id = s.patient_id
           WHERE ps.model_id = ? AND pt.bm_metastasis = 1""",
        [model_id],
    ).df()
    boxes = store_mod.tumor_regions_frame(st)
    if frame.empty or boxes.empty:
        return {"patches": 0, "tumour_patches": 0, "probability_auroc": None,
                "attention_auroc_mean": None, "patients": 0}
    truth = tumour_fraction(frame, boxes) >= min_overlap
    pooled = roc_auc(truth, frame["probability"].to_numpy()) if 0 < truth.sum() < len(truth) else None
    per_patient = []
    for _, idx in frame.groupby(["cohort", "patient_id"]).indices.items():
        t = truth[idx]
        a = frame["attention"].to_numpy()[idx]
        if 0 < t.sum() < len(t) and np.isfinite(a).all():
            per_patient.append(roc_auc(t, a))
    return {
        "patches": int(len(frame)),
        "tumour_patches": int(truth.sum()),
        "probability_auroc": pooled,
        "attention_auroc_mean": float(np.mean(per_patient)) if per_patient else None,
        "patients": len(per_patient),
        "min_overlap": min_overlap,
    }


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_evaluation(rows: list[dict[str, Any]], loc: dict[str, Any] | None) -> str:
    """A terminal table of :func:`discrimination` (and :func:`localisation`)."""
    lines = ["cohort          n  pos  AUC [95% CI]          Se     Sp   (at the training cutoff)"]
    for r in rows:
        if "auc" not in r:
            lines.append(f"{r['cohort']:<14}{r['n']:>3}  {r['n_positive']:>3}  (one class only)")
            continue
        lines.append(
            f"{r['cohort']:<14}{r['n']:>3}  {r['n_positive']:>3}  {r['auc']:.3f} "
            f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]  {_f(r['sensitivity'])}  "
            f"{_f(r['specificity'])}"
        )
    if loc and loc.get("patches"):
        fmt = _f
        lines.append(
            f"localisation (demo ground truth, metastatic patients): {loc['tumour_patches']} of "
            f"{loc['patches']} patches are tumour; AUROC of patch probability {fmt(loc['probability_auroc'])}, "
            f"mean per-patient AUROC of attention {fmt(loc['attention_auroc_mean'])} "
            f"({loc['patients']} patients)"
        )
    return "\n".join(lines)
