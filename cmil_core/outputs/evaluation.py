"""How good a trained model is: discrimination per cohort and, on the demo, localisation.

Which scores (honest numbers)
-----------------------------
Every function here reads a model's patient scores through
:func:`scores_frame`: the training cohort's row uses its **out-of-fold**
scores (each patient scored by the cross-validation fold model that did not
see them; store table ``oof_scores``), every other cohort the final model's
scores, mapped onto that same out-of-fold scale (:mod:`cmil_core.model.recalibration`),
on which the cutoff was chosen. ``in_sample=True`` (a switch on the pages,
``--in-sample`` on the command line) puts the final model's in-sample scores
in the training row instead; they are optimistic and labelled so. Each row
or entry says which it used in ``scores`` ("out-of-fold", "in-sample",
"final model") and carries a display ``label`` such as
"training (out-of-fold)".

:func:`discrimination` gives, per cohort, the AUC of the patient score
against the marrow-metastasis label with its DeLong 95% CI, and the
sensitivity and specificity at the model's training cutoff.

:func:`calibration` reads scores as probabilities only after moving them
from the 50 % prior of class-balanced training to the training prevalence
(:func:`cmil_core.model.recalibration.prevalence_shift`).

:func:`localisation` (demo study) checks patch scores against the
generator's ground truth, per cohort; see its docstring for the overlap rule.

:func:`patient_flow` counts patients per cohort from import to analysis
(STARD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.analysis.calibration import calibration_fit, format_calibration_fit
from cmil_core.analysis.stats import (
    AucComparison,
    brier_score,
    calibration_bins,
    calibration_smooth,
    decision_curve,
    delong_ci,
    delong_paired_test,
    delong_unpaired_test,
    metrics_at_cutoff,
    roc_auc,
    roc_ci_band,
    roc_curve,
)
from cmil_core.analysis.survival import (
    cox_analysis,
    kaplan_meier_table,
    risk_cutoff,
    risk_groups,
    survival_analysis,
)
from cmil_core.analysis.time_auc import td_auc
from cmil_core.errors import InputError
from cmil_core.model.recalibration import prevalence_shift
from cmil_core.store import model_rules
from cmil_core.store.model_rules import operating_cutoff

__all__ = [
    "CLINICAL_COVARIATES", "CMIL_COVARIATE", "COX_STRATA", "CUTOFF_METHODS", "FINAL", "IN_SAMPLE",
    "OUT_OF_FOLD", "OVERLAP_RULE", "PATCH_THRESHOLD", "POOLED", "TD_AUC_MONTHS", "calibration",
    "calibration_summary", "clinical_cox", "cohort_comparisons", "discrimination",
    "format_calibration", "format_evaluation", "format_flow", "localisation",
    "metrics_table", "model_comparisons", "patient_flow", "probability_note", "risk_survival",
    "roc_curves", "scores_frame", "survival_cutoff", "training_cohorts", "tumour_fraction",
]

#: The ``scores`` label of the training cohort's honest row.
OUT_OF_FOLD = "out-of-fold"
#: The ``scores`` label of the final model's scores of the cohorts it was trained on.
IN_SAMPLE = "in-sample"
#: The ``scores`` label of every other cohort (the final model, on the out-of-fold scale).
FINAL = "final model"


def _model(st: store_mod.Store, model_id: str) -> store_mod.ModelRow:
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    return model


def scores_frame(st: store_mod.Store, model_id: str, *, in_sample: bool = False) -> pd.DataFrame:
    """A model's patient scores as every table and figure reads them, with ``scores`` and ``label``.

    Columns of :func:`cmil_core.store.patient_scores_frame` plus ``scores``
    (:data:`OUT_OF_FOLD`, :data:`IN_SAMPLE` or :data:`FINAL`) and ``label``
    (the cohort's display name, "training (out-of-fold)" for instance). The
    cohorts the model was trained on get their out-of-fold scores (labelled
    patients only: cross-validation needs the label), unless ``in_sample``;
    a model saved without out-of-fold scores falls back to in-sample ones,
    labelled so.
    """
    _model(st, model_id)
    trained = set(training_cohorts(st, model_id))
    final = store_mod.patient_scores_frame(st, model_id)
    final["scores"] = np.where(final["cohort"].isin(trained), IN_SAMPLE, FINAL)
    if not in_sample:
        oof = store_mod.oof_scores_frame(st, model_id)
        have = set(oof["cohort"])
        if have:
            oof = oof.drop(columns=["fold"]).assign(scores=OUT_OF_FOLD)
            parts = [p for p in (final[~final["cohort"].isin(have)], oof) if not p.empty]
            final = pd.concat(parts, ignore_index=True) if parts else final.iloc[0:0]
    final["label"] = [_label(c, k) for c, k in zip(final["cohort"], final["scores"])]
    return final.reset_index(drop=True)


def _label(cohort: str, scores: str) -> str:
    return cohort if scores == FINAL else f"{cohort} ({scores})"


def _cohort_scores(part: pd.DataFrame) -> tuple[str, str]:
    """(scores, label) of one cohort's rows of :func:`scores_frame`."""
    return str(part["scores"].iloc[0]), str(part["label"].iloc[0])


def discrimination(
    st: store_mod.Store, model_id: str, *, in_sample: bool = False
) -> list[dict[str, Any]]:
    """Per cohort: n, positives, AUC with DeLong CI, sensitivity/specificity at the cutoff.

    Each entry also says which ``scores`` it used and its display ``label``
    (see :func:`scores_frame`).
    """
    model = _model(st, model_id)
    scores = scores_frame(st, model_id, in_sample=in_sample)
    order = [c.cohort for c in store_mod.list_cohorts(st)]  # training first
    out = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        rows = scores[scores["cohort"] == cohort]
        kind, label = _cohort_scores(rows)
        rows = rows.dropna(subset=["bm_metastasis"])
        y = rows["bm_metastasis"].to_numpy(dtype=int)
        s = rows["score"].to_numpy(dtype=float)
        entry: dict[str, Any] = {"cohort": cohort, "scores": kind, "label": label,
                                 "n": len(rows), "n_positive": int(y.sum())}
        if 0 < y.sum() < len(y):
            ci = delong_ci(y, s)
            at = metrics_at_cutoff(y, s, operating_cutoff(model))
            entry.update(auc=roc_auc(y, s), ci_low=ci.low, ci_high=ci.high,
                         sensitivity=at.sensitivity, specificity=at.specificity)
        out.append(entry)
    return out


def roc_curves(
    st: store_mod.Store, model_id: str, *, band: bool = False, n_boot: int = 2000,
    in_sample: bool = False,
) -> list[dict[str, Any]]:
    """Per cohort with both classes: ``cohort, fpr, tpr`` (lists), ``auc, ci_low, ci_high``.

    With ``band``, each also carries ``band``: the stratified-bootstrap 95%
    CI of the sensitivity at specificities 0, 0.01, ..., 1
    (:func:`~cmil_core.analysis.stats.roc_ci_band`, as pROC's ``ci.se``; seed 0).
    """
    scores = scores_frame(st, model_id, in_sample=in_sample).dropna(subset=["bm_metastasis"])
    out = []
    for row in discrimination(st, model_id, in_sample=in_sample):
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


def cohort_comparisons(
    st: store_mod.Store, model_id: str, *, in_sample: bool = False
) -> pd.DataFrame:
    """Unpaired DeLong tests of one model's AUC between every two cohorts.

    Different patients, so no covariance term (pROC ``roc.test(..., paired =
    FALSE)``). Columns: a, b (cohorts, store order), n ("n_a / n_b"), auc_a,
    auc_b, difference, diff_ci_low, diff_ci_high, z, p, method. Only cohorts
    with both classes take part; a training cohort is named by its label
    ("training (out-of-fold)").
    """
    scores = scores_frame(st, model_id, in_sample=in_sample)
    usable = [(r["cohort"], r["label"]) for r in discrimination(st, model_id, in_sample=in_sample)
              if "auc" in r]
    rows = []
    for i, (a, label_a) in enumerate(usable):
        for b, label_b in usable[i + 1:]:
            ya, sa = _labelled(scores, a)
            yb, sb = _labelled(scores, b)
            rows.append(_test_row(label_a, label_b, delong_unpaired_test(ya, sa, yb, sb),
                                  f"{len(ya)} / {len(yb)}"))
    return pd.DataFrame(rows, columns=_COMPARISON_COLUMNS)


_COMPARISON_COLUMNS = ["a", "b", "n", "auc_a", "auc_b", "difference", "diff_ci_low",
                       "diff_ci_high", "z", "p", "method"]


def model_comparisons(
    st: store_mod.Store, model_a: str, model_b: str, *, in_sample: bool = False
) -> pd.DataFrame:
    """Paired DeLong tests of two models' AUCs, per cohort, on the patients both scored.

    Same patients, so the covariance counts (pROC ``roc.test(..., paired =
    TRUE)``). One row per cohort with both classes among the shared patients;
    columns as :func:`cohort_comparisons` with ``a``/``b`` the model ids and
    a ``cohort`` column first, then ``scores`` (each model's, as
    :func:`scores_frame`: out-of-fold on a cohort a model was trained on).
    """
    for model_id in (model_a, model_b):
        if store_mod.get_model(st, model_id) is None:
            raise InputError(f"no model '{model_id}' in the store")
    keys = ["cohort", "patient_id"]
    a = scores_frame(st, model_a, in_sample=in_sample).dropna(subset=["bm_metastasis"])
    b = scores_frame(st, model_b, in_sample=in_sample)[[*keys, "score", "scores"]]
    both = a.merge(b, on=keys, suffixes=("_a", "_b"))
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    rows = []
    for cohort in [c for c in order if c in set(both["cohort"])]:
        part = both[both["cohort"] == cohort]
        y = part["bm_metastasis"].to_numpy(dtype=int)
        if not 0 < y.sum() < len(y):
            continue
        test = delong_paired_test(
            y, part["score_a"].to_numpy(float), part["score_b"].to_numpy(float)
        )
        kinds = f"{part['scores_a'].iloc[0]} / {part['scores_b'].iloc[0]}"
        rows.append({"cohort": cohort, "scores": kinds,
                     **_test_row(model_a, model_b, test, str(len(part)))})
    return pd.DataFrame(rows, columns=["cohort", "scores", *_COMPARISON_COLUMNS])


def metrics_table(st: store_mod.Store, model_id: str, *, in_sample: bool = False) -> pd.DataFrame:
    """Sensitivity, specificity, PPV and NPV with Wilson 95% CIs at the training cutoff, per cohort.

    Columns: cohort, scores, label (:func:`scores_frame`), n, then
    :meth:`cmil_core.analysis.stats.ThresholdMetrics.to_dict`.
    """
    model = _model(st, model_id)
    cutoff = operating_cutoff(model)
    scores = scores_frame(st, model_id, in_sample=in_sample).dropna(subset=["bm_metastasis"])
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    rows = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        part = scores[scores["cohort"] == cohort]
        kind, label = _cohort_scores(part)
        m = metrics_at_cutoff(part["bm_metastasis"].to_numpy(dtype=int),
                              part["score"].to_numpy(), cutoff).to_dict()
        rows.append({"cohort": cohort, "scores": kind, "label": label, "n": len(part), **m})
    return pd.DataFrame(rows)


def _priors(model: store_mod.ModelRow) -> tuple[float, float]:
    """(training prevalence, prior the model was trained at) of a model."""
    prior = float(model.config.get("trained_prior", 0.5))  # both aggregators train balanced
    prevalence = model.config.get("training_prevalence")
    if prevalence is None:
        n, pos = model.metrics.get("n_train"), model.metrics.get("n_positive")
        prevalence = pos / n if n else prior
    return float(prevalence), prior


def probability_note(st: store_mod.Store, model_id: str) -> str:
    """One sentence on how :func:`calibration` turns scores into probabilities."""
    prevalence, prior = _priors(_model(st, model_id))
    return (f"Scores are read as probabilities after moving them from the {prior:.0%} prior of "
            f"class-balanced training to the training prevalence ({prevalence:.1%}) by prior "
            "shift (posterior odds times the ratio of prior odds; Saerens et al. 2002); the "
            "shift keeps every ranking and AUC.")


def calibration(
    st: store_mod.Store, model_id: str, *, in_sample: bool = False
) -> list[dict[str, Any]]:
    """Per cohort with both classes: Brier score, binned and smoothed calibration, decision curve.

    The scores (:func:`scores_frame`: out-of-fold for the training cohort)
    are first moved from the prior of class-balanced training (50 %) to the
    training prevalence (:func:`cmil_core.model.recalibration.prevalence_shift`;
    :func:`probability_note` says so in words): a class-balanced model's
    scores overstate the probability of metastasis wherever it is rarer than
    one in two. Keys: ``cohort, scores, label, n, prevalence`` (the
    training prevalence used), ``brier, bins``
    (:func:`~cmil_core.analysis.stats.calibration_bins`, 5 quantile bins), ``smooth``
    (:func:`~cmil_core.analysis.stats.calibration_smooth`), ``decision``
    (:func:`~cmil_core.analysis.stats.decision_curve`), ``fit`` (calibration intercept
    and slope with Wald 95% CIs, :func:`cmil_core.analysis.calibration.calibration_fit`).
    """
    prevalence, prior = _priors(_model(st, model_id))
    scores = scores_frame(st, model_id, in_sample=in_sample).dropna(subset=["bm_metastasis"])
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    out = []
    for cohort in [c for c in order if c in set(scores["cohort"])]:
        part = scores[scores["cohort"] == cohort]
        kind, label = _cohort_scores(part)
        y = part["bm_metastasis"].to_numpy(dtype=int)
        p = prevalence_shift(part["score"].to_numpy(dtype=float), prevalence, prior)
        out.append({
            "cohort": cohort, "scores": kind, "label": label, "n": len(part),
            "prevalence": prevalence, "brier": brier_score(y, p),
            "bins": calibration_bins(y, p, n_bins=5), "smooth": calibration_smooth(y, p),
            "decision": decision_curve(y, p), "fit": _calibration_fit(y, p),
        })
    return out


def calibration_summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-ready rows of :func:`calibration`: cohort, scores, label, n, prevalence, brier, and
    the calibration intercept and slope with their Wald 95% CIs (``*_ci``) and ``note``."""
    keep = ("intercept", "intercept_se", "intercept_ci", "slope", "slope_se", "slope_ci", "note")
    return [{**{k: e[k] for k in ("cohort", "scores", "label", "n", "prevalence", "brier")},
             **{k: e["fit"].get(k) for k in keep}} for e in entries]


def format_calibration(entries: list[dict[str, Any]]) -> str:
    """Terminal lines of :func:`calibration`: Brier score, calibration intercept and slope."""
    lines = ["calibration (probabilities at the training prevalence; intercept ideal 0, "
             "slope ideal 1; Wald 95% CIs)"]
    for e in entries:
        lines.append(f"  {e['label']}: n {e['n']}, Brier {e['brier']:.3f}, "
                     f"{format_calibration_fit(e['fit'])}")
    return "\n".join(lines)


def _calibration_fit(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """:func:`cmil_core.analysis.calibration.calibration_fit`, or its empty form with the reason."""
    try:
        return calibration_fit(y, p)
    except InputError as exc:
        return {"n": int(y.size), "events": int(y.sum()), "intercept": None, "intercept_se": None,
                "intercept_ci": None, "slope": None, "slope_se": None, "slope_ci": None,
                "note": str(exc)}


ENDPOINTS = {"os": ("os_months", "os_event", "overall survival"),
             "efs": ("efs_months", "efs_event", "event-free survival")}


CUTOFF_METHODS = {
    "model": "the model's cutoff (Youden on out-of-fold training scores)",
    "youden": "training Youden",
    "median": "training median",
    "maxstat": "maxstat on training (maximally selected log-rank, groups of 10 % or more)",
}


def survival_cutoff(
    st: store_mod.Store, model_id: str, method: str | float = "model", endpoint: str = "os",
    *, in_sample: bool = False,
) -> dict[str, Any]:
    """The risk-group cutoff, always fixed on the model's training cohort.

    ``method``: a key of :data:`CUTOFF_METHODS` or a number. The data-driven
    methods (youden, median, maxstat) are chosen on the training cohort's
    out-of-fold scores (:func:`scores_frame`; in-sample ones with
    ``in_sample``), the description says which. Returns ``{"method",
    "value", "description", "scores", ...}`` (maxstat adds its statistic and
    its search-corrected p).
    """
    model = _model(st, model_id)
    if not isinstance(method, str):
        return {"method": "number", "value": float(method), "description": f"the number {method:g}",
                "scores": None}
    if method not in CUTOFF_METHODS:
        raise InputError(f"cutoff {method!r} is not one of {', '.join(CUTOFF_METHODS)} or a number")
    description = CUTOFF_METHODS[method]
    if method == "model":
        return {"method": method, "value": operating_cutoff(model), "description": description,
                "scores": OUT_OF_FOLD}
    time, event, _ = ENDPOINTS[endpoint]
    frame = scores_frame(st, model_id, in_sample=in_sample)
    train = frame[frame["cohort"].isin(training_cohorts(st, model_id))]
    if train.empty:
        raise InputError(f"model '{model_id}' has no scores of its training cohort "
                         f"{model.train_cohorts} to choose a cutoff on")
    kind = str(train["scores"].iloc[0])
    chosen = risk_cutoff(train, "score", method, time=time, event=event, label="bm_metastasis")
    return {**chosen.to_dict(), "description": f"{description} ({kind} training scores)",
            "scores": kind}


#: Times (months) of the time-dependent AUC of :func:`risk_survival`.
TD_AUC_MONTHS = (12.0, 24.0, 36.0)


def risk_survival(
    st: store_mod.Store, model_id: str, endpoint: str = "os", cutoff: str | float = "model",
    *, in_sample: bool = False, td_auc_times: Sequence[float] = TD_AUC_MONTHS,
) -> list[dict[str, Any]]:
    """Per cohort: Kaplan-Meier by cMIL risk group, log-rank and Cox HR.

    Risk groups: score >= the cutoff of :func:`survival_cutoff` (fixed on the
    training cohort, applied unchanged); the training cohort's patients are
    grouped by their out-of-fold scores (:func:`scores_frame`), unless
    ``in_sample``. Each entry: ``cohort``, ``scores``, ``label``, ``cutoff``,
    ``curves`` (the long table of
    :func:`~cmil_core.analysis.survival.kaplan_meier_table`), ``result`` (the
    :func:`~cmil_core.analysis.survival.survival_analysis` dict: groups, logrank, cox
    with "high" against "low" and its proportional-hazards test ``ph_test``,
    at_risk), ``td_auc`` (the time-dependent AUC of the continuous score at
    ``td_auc_times`` months, :func:`cmil_core.analysis.time_auc.td_auc`; needs events,
    not two risk groups). Cohorts without follow-up, or with a single risk
    group, come with ``note`` instead of curves and result. When two or more validation
    cohorts (not trained on) have follow-up, a last entry named
    :data:`POOLED` pools their patients (``pooled`` lists them).
    """
    if endpoint not in ENDPOINTS:
        raise InputError(f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    time, event, _ = ENDPOINTS[endpoint]
    chosen = survival_cutoff(st, model_id, cutoff, endpoint, in_sample=in_sample)
    scores = scores_frame(st, model_id, in_sample=in_sample)
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    cohorts = [c for c in order if c in set(scores["cohort"])]
    out = []
    for c in cohorts:
        part = scores[scores["cohort"] == c]
        kind, label = _cohort_scores(part)
        out.append({**_risk_entry(c, part, chosen, time, event, td_auc_times),
                    "scores": kind, "label": label})
    validation = [c for c in cohorts if c not in training_cohorts(st, model_id)]
    with_followup = [e["cohort"] for e in out if e["cohort"] in validation and e["n"] > 0]
    if len(with_followup) >= 2:
        pooled = scores[scores["cohort"].isin(with_followup)]
        entry = _risk_entry(POOLED, pooled, chosen, time, event, td_auc_times)
        entry.update(pooled=with_followup, scores=FINAL, label=POOLED)
        out.append(entry)
    return out


#: The name of the survival entry pooling every validation cohort with follow-up.
POOLED = "pooled validation"


def training_cohorts(st: store_mod.Store, model_id: str) -> list[str]:
    """The cohorts a model was trained on (the models table stores them comma-separated)."""
    return list(model_rules.training_cohorts(_model(st, model_id)))


def _risk_entry(
    name: str, scores: pd.DataFrame, chosen: dict[str, Any], time: str, event: str,
    td_auc_times: Sequence[float] = TD_AUC_MONTHS,
) -> dict[str, Any]:
    part = scores.dropna(subset=[time, event]).copy()
    entry: dict[str, Any] = {"cohort": name, "n": len(part), "cutoff": chosen}
    # Patients left out for want of follow-up: how many, and which column is empty.
    entry["n_dropped"] = len(scores) - len(part)
    entry["n_dropped_by_column"] = {c: int(scores[c].isna().sum()) for c in (time, event)
                                    if scores[c].isna().any()}
    if len(part) and part[event].sum() > 0 and td_auc_times:
        entry["td_auc"] = td_auc(part[time].to_numpy(dtype=float),
                                 part[event].to_numpy(dtype=float),
                                 part["score"].to_numpy(dtype=float), td_auc_times)
    part["risk_group"] = risk_groups(part["score"], chosen["value"]) if len(part) else []
    if part.empty or part[event].sum() == 0 or part["risk_group"].nunique() < 2:
        entry["note"] = "no follow-up, no events, or a single risk group"
    else:
        frame = part[[time, event, "risk_group"]]
        entry["curves"] = kaplan_meier_table(frame, time, event, "risk_group")
        entry["result"] = survival_analysis(frame, time, event, group="risk_group")
    return entry


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
    st: store_mod.Store, model_id: str, *, min_overlap: float = 0.1,
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
    frame = store_mod.localisation_patches(st, model_id).dropna(subset=["bm_metastasis"])
    frame = frame.reset_index(drop=True)
    boxes = store_mod.tumor_regions_frame(st)
    looks = store_mod.lookalike_regions_frame(st)
    meta = {"min_overlap": min_overlap, "threshold": threshold,
            "rule": OVERLAP_RULE.format(overlap=min_overlap), "lookalikes": not looks.empty}
    if frame.empty or boxes.empty:
        return {"patches": 0, "tumour_patches": 0, "probability_auroc": None,
                "attention_auroc_mean": None, "patients": 0, "cohorts": [], **meta}
    tumour = tumour_fraction(frame, boxes) >= min_overlap
    lookalike = ~tumour & (tumour_fraction(frame, looks) >= min_overlap)
    order = [c.cohort for c in store_mod.list_cohorts(st)]
    cohorts = []
    for cohort in [c for c in order if c in set(frame["cohort"])]:
        idx = np.flatnonzero(frame["cohort"].to_numpy() == cohort)
        cohorts.append({"cohort": cohort, **_localisation_summary(
            frame.iloc[idx], tumour[idx], lookalike[idx], threshold)})
    return {**_localisation_summary(frame, tumour, lookalike, threshold), "cohorts": cohorts,
            **meta}


def patient_flow(st: store_mod.Store, model_id: str | None = None) -> pd.DataFrame:
    """Patients per cohort from import to analysis (STARD flow), each step within the one before.

    Columns: cohort, role, imported, with_slides, with_passed_patches,
    scored, labelled (see :func:`cmil_core.store.patient_flow`); for the
    model's training cohort "scored" means an out-of-fold score.
    """
    return store_mod.patient_flow(st, model_id)


_FLOW_STEPS = (("imported", "imported"), ("with_slides", "with slides"),
               ("with_passed_patches", "with QC-passed patches"), ("scored", "scored"),
               ("labelled", "with a label"))


def format_flow(flow: pd.DataFrame) -> str:
    """The patient flow as terminal lines, one per cohort: ``training: 14 imported -> ...``."""
    lines = ["patient flow (STARD): imported -> with slides -> with QC-passed patches -> "
             "scored -> with a label (analysed)"]
    for r in flow.to_dict("records"):
        steps = [f"{int(r[k])} {name}" for k, name in _FLOW_STEPS if not pd.isna(r[k])]
        lines.append(f"  {r['cohort']}: " + " -> ".join(steps))
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def format_evaluation(
    rows: list[dict[str, Any]], loc: dict[str, Any] | None, flow: pd.DataFrame | None = None
) -> str:
    """A terminal table of :func:`discrimination` (and :func:`localisation`,
    :func:`patient_flow`)."""
    width = max([14, *(len(str(r.get("label", r["cohort"]))) + 1 for r in rows)])
    lines = [f"{'cohort':<{width}}  n  pos  AUC [95% CI]          Se     Sp   "
             "(at the training cutoff)"]
    for r in rows:
        name = str(r.get("label", r["cohort"]))
        if "auc" not in r:
            lines.append(f"{name:<{width}}{r['n']:>3}  {r['n_positive']:>3}  (one class only)")
            continue
        lines.append(
            f"{name:<{width}}{r['n']:>3}  {r['n_positive']:>3}  {r['auc']:.3f} "
            f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]  {_f(r['sensitivity'])}  "
            f"{_f(r['specificity'])}"
        )
    if any(r.get("scores") == OUT_OF_FOLD for r in rows):
        lines.append("out-of-fold: each training patient scored by the cross-validation model "
                     "that did not see them (--in-sample for the final model's optimistic scores)")
    if flow is not None and not flow.empty:
        lines.append(format_flow(flow))
    if loc and loc.get("patches"):
        lines.append(f"localisation (demo ground truth; {loc['rule']}; flagged: patch "
                     f"probability >= {loc['threshold']:g})")
        for c in loc.get("cohorts", []):
            text = (f"  {c['cohort']}: {c['tumour_patches']} of {c['patches']} patches of "
                    f"{c['patients_positive']} metastatic patients are tumour; AUROC of patch "
                    f"probability {_f(c['probability_auroc'])} (with negative patients' patches "
                    f"{_f(c['probability_auroc_all'])}), mean per-patient AUROC of attention "
                    f"{_f(c['attention_auroc_mean'])} ({c['patients']} patients); tumour patches "
                    f"flagged {_pct(c['tumour_flagged'])}; false positives: "
                    f"{_pct(c['negative_flagged'])} of {c['patches_negative']} patches of "
                    f"{c['patients_negative']} negative patients flagged "
                    f"({c['negative_patients_flagged']} patients with a flagged patch)")
            if loc.get("lookalikes"):
                text += (f"; look-alikes flagged {_pct(c['lookalike_flagged'])} of "
                         f"{c['lookalike_patches']}, top attention on a look-alike in "
                         f"{_pct(c['lookalike_top_attention'])} of "
                         f"{c['lookalike_top_patients']} negative patients")
            lines.append(text)
        lines.append(
            f"  all cohorts: AUROC of patch probability {_f(loc['probability_auroc'])}, mean "
            f"per-patient AUROC of attention {_f(loc['attention_auroc_mean'])} "
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


#: The stratification :func:`clinical_cox` offers: name -> what it stratifies by.
COX_STRATA = {"center": "the cohort's centre (each centre its own baseline hazard)"}


def clinical_cox(
    st: store_mod.Store, model_id: str, endpoint: str = "os", cutoff: str | float = "model",
    factors: Sequence[str] | None = None, *, strata: str | None = None,
    in_sample: bool = False,
) -> dict[str, Any]:
    """Cox model of the cMIL risk group adjusted for clinical factors, on the validation cohorts.

    Patients: the model's scored patients of every cohort it was not trained
    on, pooled, with follow-up for ``endpoint``. Covariates: "cMIL high
    risk" (score >= the cutoff of
    :func:`cmil_core.outputs.evaluation.survival_cutoff`, fixed on training: 1, else
    0), plus each clinical column of :data:`CLINICAL_COVARIATES` that the
    patients have and that is not constant among them: "age > 18 months",
    "INSS stage 4" (against 1, 2, 3, 4S), "MYCN amplified"; ``factors``
    restricts them to those names (None: all). Patients missing
    a chosen covariate are left out (counted in ``n_dropped``). If the full
    model cannot be fitted, the cMIL risk group alone is, with a warning.

    ``strata="center"`` stratifies by centre (the cohorts table's ``center``,
    else the cohort's name), as R's ``coxph(Surv(t, e) ~ cmil + age + ... +
    strata(center))``: each centre keeps its own baseline hazard (centres
    differ in referral, follow-up and treatment era) while the hazard ratios
    are shared; the result then carries ``strata`` (levels with patients and
    events). A stratum with a single centre is no stratification: an
    :class:`InputError`.

    Returns the :func:`cmil_core.analysis.survival.cox_analysis` dict plus
    ``endpoint``, ``cutoff``, ``cohorts``, ``covariates`` [{name, column,
    definition}] and ``excluded`` [{column, reason}]. Raises
    :class:`InputError` when there is nothing to fit (no validation cohort,
    no events, a single risk group).
    """
    if endpoint not in ENDPOINTS:
        raise InputError(f"endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    if strata is not None and strata not in COX_STRATA:
        raise InputError(f"strata {strata!r} is not one of {', '.join(COX_STRATA)}")
    known_factors = [name for name, _, _ in CLINICAL_COVARIATES.values()]
    unknown = sorted(set(factors or []) - set(known_factors))
    if unknown:
        raise InputError(f"unknown clinical factor(s) {', '.join(unknown)}; "
                         f"one of: {', '.join(known_factors)}")
    model = store_mod.get_model(st, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    time, event, _ = ENDPOINTS[endpoint]
    chosen = survival_cutoff(st, model_id, cutoff, endpoint, in_sample=in_sample)
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
            f"cutoff {display.cutoff(chosen['value'])}; no hazard ratio to estimate"
        )
    covariates = [{"name": CMIL_COVARIATE, "column": "score",
                   "definition": f"cMIL score >= {display.cutoff(chosen['value'])} "
                                 f"({chosen['description']})"}]
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
    layer = None
    if strata == "center":
        centre = {c.cohort: (c.center or c.cohort) for c in store_mod.list_cohorts(st)}
        layer = "centre"
        frame[layer] = [centre.get(c, c) for c in data["cohort"]]
        if frame[layer].nunique() < 2:
            raise InputError(f"model '{model_id}': the validation patients come from one centre "
                             f"({frame[layer].iloc[0]}); nothing to stratify by")
    warnings: list[str] = []
    try:
        result = cox_analysis(frame, time, event, names, strata=layer)
    except InputError as exc:
        if len(names) == 1:
            raise
        warnings.append(f"the model with clinical factors could not be fitted ({exc}); "
                        "cMIL risk group alone")
        excluded += [{"column": c["column"], "reason": "model not estimable"}
                     for c in covariates[1:]]
        covariates = covariates[:1]
        result = cox_analysis(frame, time, event, [CMIL_COVARIATE], strata=layer)
    return {
        **result,
        "warnings": warnings + list(result.get("warnings", [])),
        "endpoint": endpoint,
        "cutoff": chosen,
        "cohorts": sorted(set(scores["cohort"])),
        "covariates": covariates,
        "excluded": excluded,
        "stratified_by": None if strata is None else COX_STRATA[strata],
    }
