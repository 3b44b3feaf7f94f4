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

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.stats import (
    brier_score,
    calibration_bins,
    calibration_smooth,
    AucComparison,
    decision_curve,
    delong_ci,
    delong_paired_test,
    delong_unpaired_test,
    metrics_at_cutoff,
    roc_auc,
    roc_ci_band,
    roc_curve,
)
from cmil_core.survival import (
    cox_analysis,
    kaplan_meier_table,
    risk_cutoff,
    risk_groups,
    survival_analysis,
)

__all__ = [
    "CLINICAL_COVARIATES", "CMIL_COVARIATE", "CUTOFF_METHODS", "POOLED", "calibration",
    "clinical_cox", "cohort_comparisons", "discrimination", "format_evaluation", "localisation",
    "metrics_table", "model_comparisons", "risk_survival", "roc_curves", "survival_cutoff",
    "training_cohorts", "tumour_fraction",
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


def roc_curves(
    st: store_mod.Store, model_id: str, *, band: bool = False, n_boot: int = 2000
) -> list[dict[str, Any]]:
    """Per cohort with both classes: ``cohort, fpr, tpr`` (lists), ``auc, ci_low, ci_high``.

    With ``band``, each also carries ``band``: the stratified-bootstrap 95%
    CI of the sensitivity at specificities 0, 0.01, ..., 1
    (:func:`~cmil_core.stats.roc_ci_band`, as pROC's ``ci.se``; seed 0).
    """
    scores = store_mod.patient_scores_frame(st, model_id).dropna(subset=["bm_metastasis"])
    out = []
    for row in discrimination(st, model_id):
        if "auc" not in row:
            continue
        rows = scores[scores["cohort"] == row["cohort"]]
        y = rows["bm_metastasis"].to_numpy(dtype=int)
        s = rows["score"].to_numpy(dtype=float)
        curve = roc_curve(y, s)
        entry = {**row, "fpr": curve.fpr.tolist(), "tpr": curve.tpr.tolist()}
        if band:
            entry["band"] = roc_ci_band(y, s, n_boot=n_boot, seed=0)
        out.append(entry)
    return out


def _labelled(scores: pd.DataFrame, cohort: str) -> tuple[np.ndarray, np.ndarray]:
    part = scores[scores["cohort"] == cohort].dropna(subset=["bm_metastasis"])
    return part["bm_metastasis"].to_numpy(dtype=int), part["score"].to_numpy(dtype=float)


def _test_row(a: str, b: str, test: AucComparison, n: str) -> dict[str, Any]:
    return {
        "a": a, "b": b, "n": n, "auc_a": test.auc_a, "auc_b": test.auc_b, "difference": test.diff,
        "diff_ci_low": None if test.diff_ci is None else test.diff_ci[0],
        "diff_ci_high": None if test.diff_ci is None else test.diff_ci[1],
        "z": test.z, "p": test.p, "method": test.method,
    }


def cohort_comparisons(st: store_mod.Store, model_id: str) -> pd.DataFrame:
    """Unpaired DeLong tests of one model's AUC between every two cohorts.

    Different patients, so no covariance term (pROC ``roc.test(..., paired =
    FALSE)``). Columns: a, b (cohorts, store order), n ("n_a / n_b"), auc_a,
    auc_b, difference, diff_ci_low, diff_ci_high, z, p, method. Only cohorts
    with both classes take part.
    """
    scores = store_mod.patient_scores_frame(st, model_id)
    usable = [r["cohort"] for r in discrimination(st, model_id) if "auc" in r]
    rows = []
    for i, a in enumerate(usable):
        for b in usable[i + 1:]:
            ya, sa = _labelled(scores, a)
            yb, sb = _labelled(scores, b)
            rows.append(_test_row(a, b, delong_unpaired_test(ya, sa, yb, sb), f"{len(ya)} / {len(yb)}"))
    return pd.DataFrame(rows, columns=_COMPARISON_COLUMNS)


_COMPARISON_COLUMNS = ["a", "b", "n", "auc_a", "auc_b", "difference", "diff_ci_low",
                       "diff_ci_high", "z", "p", "method"]


def model_comparisons(st: store_mod.Store, model_a: str, model_b: str) -> pd.DataFrame:
    """Paired DeLong tests of two models' AUCs, per cohort, on the patients both scored.

    Same patients, so the covariance counts (pROC ``roc.test(..., paired =
    TRUE)``). One row per cohort with both classes among the shared patients;
    columns as :func:`cohort_comparisons` with ``a``/``b`` the model ids and
    a ``cohort`` column first.
    """
    for model_id in (model_a, model_b):
        if store_mod.get_model(st, model_id) is None:
            raise InputError(f"no model '{model_id}' in the store")
    keys = ["cohort", "patient_id"]
    a = store_mod.patient_scores_frame(st, model_a).dropna(subset=["bm_metastasis"])
    b = store_mod.patient_scores_frame(st, model_b)[[*keys, "score"]]
    both = a.merge(b, on=keys, suffixes=("_a", "_b"))
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    rows = []
    for cohort in [c for c in order if c in set(both["cohort"])]:
        part = both[both["cohort"] == cohort]
        y = part["bm_metastasis"].to_numpy(dtype=int)
        if not 0 < y.sum() < len(y):
            continue
        test = delong_paired_test(y, part["score_a"].to_numpy(float), part["score_b"].to_numpy(float))
        rows.append({"cohort": cohort, **_test_row(model_a, model_b, test, str(len(part)))})
    return pd.DataFrame(rows, columns=["cohort", *_COMPARISON_COLUMNS])


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
    single risk group, come with ``note`` instead. When two or more validation
    cohorts (not trained on) have follow-up, a last entry named
    :data:`POOLED` pools their patients (``pooled`` lists them).
    """
    if endpoint not in ENDPOINTS:
        raise InputError(f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    time, event, _ = ENDPOINTS[endpoint]
    chosen = survival_cutoff(st, model_id, cutoff, endpoint)
    scores = store_mod.patient_scores_frame(st, model_id)
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    cohorts = [c for c in order if c in set(scores["cohort"])]
    out = [_risk_entry(c, scores[scores["cohort"] == c], chosen, time, event) for c in cohorts]
    validation = [c for c in cohorts if c not in training_cohorts(st, model_id)]
    with_followup = [e["cohort"] for e in out if e["cohort"] in validation and e["n"] > 0]
    if len(with_followup) >= 2:
        pooled = scores[scores["cohort"].isin(with_followup)]
        entry = _risk_entry(POOLED, pooled, chosen, time, event)
        entry["pooled"] = with_followup
        out.append(entry)
    return out


#: The name of the survival entry pooling every validation cohort with follow-up.
POOLED = "pooled validation"


def training_cohorts(st: store_mod.Store, model_id: str) -> list[str]:
    """The cohorts a model was trained on (the models table stores them comma-separated)."""
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    return [c.strip() for c in model.train_cohorts.split(",") if c.strip()]


def _risk_entry(
    name: str, scores: pd.DataFrame, chosen: dict[str, Any], time: str, event: str
) -> dict[str, Any]:
    part = scores.dropna(subset=[time, event]).copy()
    entry: dict[str, Any] = {"cohort": name, "n": len(part), "cutoff": chosen}
    part["risk_group"] = risk_groups(part["score"], chosen["value"]) if len(part) else []
    if part.empty or part[event].sum() == 0 or part["risk_group"].nunique() < 2:
        entry["note"] = "no follow-up, no events, or a single risk group"
    else:
        frame = part[[time, event, "risk_group"]]
        entry["curves"] = kaplan_meier_table(frame, time, event, "risk_group")
        entry["result"] = survival_analysis(frame, time, event, group="risk_group")
    return entry


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


# ----------------------------------------------------------------------------
# The clinical Cox model
# ----------------------------------------------------------------------------

#: The cMIL covariate of :func:`clinical_cox`: 1 for the high-risk group.
CMIL_COVARIATE = "cMIL high risk"


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _age_over_18(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return math.nan if math.isnan(number) else float(number > 18.0)


def _stage_4(value: Any) -> float:
    text = _text(value)
    if text is None:
        return math.nan
    text = text.upper().removeprefix("STAGE").strip()
    return float(text == "4")


_MYCN_AMPLIFIED = {"amplified", "amp", "yes", "1", "true", "positive", "+"}
_MYCN_NOT = {"non-amplified", "non amplified", "nonamplified", "not amplified", "no", "0",
             "false", "negative", "-", "gain", "normal"}


def _mycn_amplified(value: Any) -> float:
    text = _text(value)
    if text is None:
        return math.nan
    text = text.lower()
    if text in _MYCN_AMPLIFIED:
        return 1.0
    return 0.0 if text in _MYCN_NOT else math.nan


# clinical column -> (covariate name, definition, coding to 1.0 / 0.0 / NaN unknown)
CLINICAL_COVARIATES: dict[str, tuple[str, str, Callable[[Any], float]]] = {
    "age_months": ("age > 18 months", "age at diagnosis above 18 months (1) or not (0)",
                   _age_over_18),
    "inss_stage": ("INSS stage 4", "INSS stage 4 (1) against stages 1, 2, 3 and 4S (0)",
                   _stage_4),
    "mycn": ("MYCN amplified", "MYCN amplified (1) or not (0); other values unknown",
             _mycn_amplified),
}


def clinical_cox(
    st: store_mod.Store, model_id: str, endpoint: str = "os", cutoff: str | float = "model",
    factors: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Cox model of the cMIL risk group adjusted for clinical factors, on the validation cohorts.

    Patients: the model's scored patients of every cohort it was not trained
    on, pooled, with follow-up for ``endpoint``. Covariates: "cMIL high
    risk" (score >= the cutoff of
    :func:`cmil_core.evaluation.survival_cutoff`, fixed on training: 1, else
    0), plus each clinical column of :data:`CLINICAL_COVARIATES` that the
    patients have and that is not constant among them: "age > 18 months",
    "INSS stage 4" (against 1, 2, 3, 4S), "MYCN amplified"; ``factors``
    restricts them to those names (None: all). Patients missing
    a chosen covariate are left out (counted in ``n_dropped``). If the full
    model cannot be fitted, the cMIL risk group alone is, with a warning.

    Returns the :func:`cmil_core.survival.cox_analysis` dict plus
    ``endpoint``, ``cutoff``, ``cohorts``, ``covariates`` [{name, column,
    definition}] and ``excluded`` [{column, reason}]. Raises
    :class:`InputError` when there is nothing to fit (no validation cohort,
    no events, a single risk group).
    """
    if endpoint not in ENDPOINTS:
        raise InputError(f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    known_factors = [name for name, _, _ in CLINICAL_COVARIATES.values()]
    unknown = sorted(set(factors or []) - set(known_factors))
    if unknown:
        raise InputError(f"unknown clinical factor(s) {', '.join(unknown)}; "
                         f"one of: {', '.join(known_factors)}")
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    time, event, _ = ENDPOINTS[endpoint]
    chosen = survival_cutoff(st, model_id, cutoff, endpoint)
    trained_on = set(training_cohorts(st, model_id))
    scores = store_mod.patient_scores_frame(st, model_id)
    scores = scores[~scores["cohort"].isin(trained_on)].dropna(subset=[time, event])
    if scores.empty:
        raise InputError(
            f"model '{model_id}': no scored patient with {endpoint} follow-up outside its "
            f"training cohort(s) {', '.join(sorted(trained_on))}"
        )
    clinical = store_mod.patients_frame(st)[["cohort", "patient_id", "clinical"]]
    data = scores.merge(clinical, on=["cohort", "patient_id"], how="left")
    frame = pd.DataFrame({time: data[time].to_numpy(dtype=float),
                          event: data[event].to_numpy(dtype=float)})
    frame[CMIL_COVARIATE] = (risk_groups(data["score"], chosen["value"]) == "high").astype(float)
    if frame[CMIL_COVARIATE].nunique() < 2:
        group = "high" if frame[CMIL_COVARIATE].iloc[0] else "low"
        raise InputError(
            f"model '{model_id}': every validation patient is in the {group} risk group at "
            f"cutoff {chosen['value']:.4g}; no hazard ratio to estimate"
        )
    covariates = [{"name": CMIL_COVARIATE, "column": "score",
                   "definition": f"cMIL score >= {chosen['value']:.4g} ({chosen['description']})"}]
    excluded = []
    records = [c if isinstance(c, dict) else {} for c in data["clinical"]]
    for column, (name, definition, code) in CLINICAL_COVARIATES.items():
        if factors is not None and name not in factors:
            excluded.append({"column": column, "reason": "not chosen"})
            continue
        if not any(column in r for r in records):
            excluded.append({"column": column, "reason": "not in the clinical tables"})
            continue
        values = pd.Series([code(r.get(column)) for r in records], dtype=float)
        known = values.dropna()
        if known.empty:
            excluded.append({"column": column, "reason": "no usable values"})
        elif known.nunique() < 2:
            reason = f"constant ({name}: {int(known.iloc[0])})"
            excluded.append({"column": column, "reason": reason})
        else:
            frame[name] = values.to_numpy()
            covariates.append({"name": name, "column": column, "definition": definition})
    names = [c["name"] for c in covariates]
    warnings: list[str] = []
    try:
        result = cox_analysis(frame, time, event, names)
    except InputError as exc:
        if len(names) == 1:
            raise
        warnings.append(f"the model with clinical factors could not be fitted ({exc}); "
                        "cMIL risk group alone")
        excluded += [{"column": c["column"], "reason": "model not estimable"}
                     for c in covariates[1:]]
        covariates = covariates[:1]
        result = cox_analysis(frame, time, event, [CMIL_COVARIATE])
    return {
        **result,
        "warnings": warnings + list(result.get("warnings", [])),
        "endpoint": endpoint,
        "cutoff": chosen,
        "cohorts": sorted(set(scores["cohort"])),
        "covariates": covariates,
        "excluded": excluded,
    }
