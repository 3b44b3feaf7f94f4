"""How good a trained model is: discrimination, calibration and survival per cohort.

Every function here is a pure function of a
:class:`~cmil_core.store.model_rules.ModelScores`: a model's row, its parsed
rules (operating cutoff, training cohorts, priors) and its patient scores,
read once by :func:`~cmil_core.store.model_rules.read_model_scores` (and,
for :func:`clinical_cox`, of the clinical table). A page or the report reads
it once and passes it to each of them::

    scores = read_model_scores(store, model_id, in_sample=False)
    rows = discrimination(scores)

Which scores (honest numbers)
-----------------------------
The training cohort's row uses its **out-of-fold** scores (each patient
scored by the cross-validation fold model that did not see them; store
table ``oof_scores``), every other cohort the final model's scores, mapped
onto that same out-of-fold scale (:mod:`cmil_core.model.recalibration`), on
which the cutoff was chosen. Reading with ``in_sample=True`` (a switch on
the pages, ``--in-sample`` on the command line) puts the final model's
in-sample scores in the training row instead; they are optimistic and
labelled so. Each row or entry says which it used in ``scores``
(:data:`OUT_OF_FOLD`, :data:`IN_SAMPLE`, :data:`FINAL`: "out-of-fold",
"in-sample", "final model"; defined with the reading in
:mod:`cmil_core.store.model_rules` and named here too, this module being the
face of the topic) and carries a display ``label`` such as "training
(out-of-fold)".

:func:`discrimination` gives, per cohort, the AUC of the patient score
against the marrow-metastasis label with its DeLong 95% CI, and the
sensitivity and specificity at the model's training cutoff.

:func:`calibration` reads scores as probabilities only after moving them
from the 50 % prior of class-balanced training to the training prevalence
(:func:`cmil_core.model.recalibration.prevalence_shift`).

:func:`risk_survival` and :func:`clinical_cox`: survival by cMIL risk group,
the cutoff fixed on the training cohort (:func:`survival_cutoff`).

:func:`patient_flow` counts patients per cohort from import to analysis
(STARD). Localisation against the demo's ground truth is
:mod:`cmil_core.outputs.localisation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.analysis.calibration import (
    brier_score,
    calibration_bins,
    calibration_fit,
    calibration_smooth,
    decision_curve,
    format_calibration_fit,
)
from cmil_core.analysis.cox import cox_analysis
from cmil_core.analysis.cutoffs import metrics_at_cutoff
from cmil_core.analysis.risk_groups import risk_cutoff, risk_groups
from cmil_core.analysis.roc import (
    AucComparison,
    delong_ci,
    delong_paired_test,
    delong_unpaired_test,
    roc_auc,
    roc_curve,
)
from cmil_core.analysis.roc_bootstrap import roc_ci_band
from cmil_core.analysis.survival import kaplan_meier_table, survival_analysis
from cmil_core.analysis.time_auc import td_auc
from cmil_core.errors import InputError
from cmil_core.model.recalibration import prevalence_shift
from cmil_core.store.model_rules import FINAL, IN_SAMPLE, OUT_OF_FOLD, ModelScores

__all__ = [
    "CLINICAL_COVARIATES", "CMIL_COVARIATE", "COX_STRATA", "CUTOFF_METHODS", "ENDPOINTS", "FINAL",
    "IN_SAMPLE", "OUT_OF_FOLD", "POOLED", "TD_AUC_MONTHS", "calibration", "calibration_summary",
    "clinical_cox", "cohort_comparisons", "discrimination", "format_calibration",
    "format_evaluation", "format_flow", "metrics_table", "model_comparisons", "patient_flow",
    "patient_order", "probability_note", "risk_survival", "roc_curves", "survival_cutoff",
]


def _cohort_scores(part: pd.DataFrame) -> tuple[str, str]:
    """(scores, label) of one cohort's rows of :attr:`ModelScores.scores`."""
    return str(part["scores"].iloc[0]), str(part["label"].iloc[0])


def discrimination(model_scores: ModelScores) -> list[dict[str, Any]]:
    """Per cohort: n, positives, AUC with DeLong CI, sensitivity/specificity at the cutoff.

    Each entry also says which ``scores`` it used and its display ``label``
    (see :mod:`cmil_core.store.model_rules`).
    """
    scores = model_scores.scores
    out = []
    for cohort in model_scores.cohorts:  # training first
        rows = scores[scores["cohort"] == cohort]
        kind, label = _cohort_scores(rows)
        rows = rows.dropna(subset=["bm_metastasis"])
        y = rows["bm_metastasis"].to_numpy(dtype=int)
        s = rows["score"].to_numpy(dtype=float)
        entry: dict[str, Any] = {"cohort": cohort, "scores": kind, "label": label,
                                 "n": len(rows), "n_positive": int(y.sum())}
        if 0 < y.sum() < len(y):
            ci = delong_ci(y, s)
            at = metrics_at_cutoff(y, s, model_scores.operating_cutoff())
            entry.update(auc=roc_auc(y, s), ci_low=ci.low, ci_high=ci.high,
                         sensitivity=at.sensitivity, specificity=at.specificity)
        out.append(entry)
    return out


def roc_curves(
    model_scores: ModelScores, *, band: bool = False, n_boot: int = 2000
) -> list[dict[str, Any]]:
    """Per cohort with both classes: ``cohort, fpr, tpr`` (lists), ``auc, ci_low, ci_high``.

    With ``band``, each also carries ``band``: the stratified-bootstrap 95%
    CI of the sensitivity at specificities 0, 0.01, ..., 1
    (:func:`~cmil_core.analysis.roc_bootstrap.roc_ci_band`, as pROC's ``ci.se``; seed 0).
    """
    scores = model_scores.scores.dropna(subset=["bm_metastasis"])
    out = []
    for row in discrimination(model_scores):
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


def cohort_comparisons(model_scores: ModelScores) -> pd.DataFrame:
    """Unpaired DeLong tests of one model's AUC between every two cohorts.

    Different patients, so no covariance term (pROC ``roc.test(..., paired =
    FALSE)``). Columns: a, b (cohorts, store order), n ("n_a / n_b"), auc_a,
    auc_b, difference, diff_ci_low, diff_ci_high, z, p, method. Only cohorts
    with both classes take part; a training cohort is named by its label
    ("training (out-of-fold)").
    """
    scores = model_scores.scores
    usable = [(r["cohort"], r["label"]) for r in discrimination(model_scores) if "auc" in r]
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


def model_comparisons(model_a: ModelScores, model_b: ModelScores) -> pd.DataFrame:
    """Paired DeLong tests of two models' AUCs, per cohort, on the patients both scored.

    Same patients, so the covariance counts (pROC ``roc.test(..., paired =
    TRUE)``). One row per cohort with both classes among the shared patients;
    columns as :func:`cohort_comparisons` with ``a``/``b`` the model ids and
    a ``cohort`` column first, then ``scores`` (each model's, as
    :func:`~cmil_core.store.model_rules.read_model_scores` read them: out-of-fold on a
    cohort a model was trained on, unless read ``in_sample``).
    """
    keys = ["cohort", "patient_id"]
    a = model_a.scores.dropna(subset=["bm_metastasis"])
    b = model_b.scores[[*keys, "score", "scores"]]
    both = a.merge(b, on=keys, suffixes=("_a", "_b"))
    rows = []
    for cohort in [c for c in model_a.cohorts if c in set(both["cohort"])]:
        part = both[both["cohort"] == cohort]
        y = part["bm_metastasis"].to_numpy(dtype=int)
        if not 0 < y.sum() < len(y):
            continue
        test = delong_paired_test(
            y, part["score_a"].to_numpy(float), part["score_b"].to_numpy(float)
        )
        kinds = f"{part['scores_a'].iloc[0]} / {part['scores_b'].iloc[0]}"
        rows.append({"cohort": cohort, "scores": kinds,
                     **_test_row(model_a.model_id, model_b.model_id, test, str(len(part)))})
    return pd.DataFrame(rows, columns=["cohort", "scores", *_COMPARISON_COLUMNS])


def metrics_table(model_scores: ModelScores) -> pd.DataFrame:
    """Sensitivity, specificity, PPV and NPV with Wilson 95% CIs at the training cutoff, per cohort.

    Columns: cohort, scores, label (:class:`ModelScores`), n, then
    :meth:`cmil_core.analysis.cutoffs.ThresholdMetrics.to_dict`.
    """
    cutoff = model_scores.operating_cutoff()
    scores = model_scores.scores.dropna(subset=["bm_metastasis"])
    rows = []
    for cohort in [c for c in model_scores.cohorts if c in set(scores["cohort"])]:
        part = scores[scores["cohort"] == cohort]
        kind, label = _cohort_scores(part)
        m = metrics_at_cutoff(part["bm_metastasis"].to_numpy(dtype=int),
                              part["score"].to_numpy(), cutoff).to_dict()
        rows.append({"cohort": cohort, "scores": kind, "label": label, "n": len(part), **m})
    return pd.DataFrame(rows)


def probability_note(model_scores: ModelScores) -> str:
    """One sentence on how :func:`calibration` turns scores into probabilities."""
    prevalence, prior = model_scores.prevalence, model_scores.prior
    return (f"Scores are read as probabilities after moving them from the {prior:.0%} prior of "
            f"class-balanced training to the training prevalence ({prevalence:.1%}) by prior "
            "shift (posterior odds times the ratio of prior odds; Saerens et al. 2002); the "
            "shift keeps every ranking and AUC.")


def calibration(model_scores: ModelScores) -> list[dict[str, Any]]:
    """Per cohort with both classes: Brier score, binned and smoothed calibration, decision curve.

    The scores (:class:`ModelScores`: out-of-fold for the training cohort)
    are first moved from the prior of class-balanced training (50 %) to the
    training prevalence (:func:`cmil_core.model.recalibration.prevalence_shift`;
    :func:`~cmil_core.store.model_rules.training_priors`;
    :func:`probability_note` says so in words): a class-balanced model's
    scores overstate the probability of metastasis wherever it is rarer than
    one in two. Keys: ``cohort, scores, label, n, prevalence`` (the
    training prevalence used), ``brier, bins``
    (:func:`~cmil_core.analysis.calibration.calibration_bins`, 5 quantile bins), ``smooth``
    (:func:`~cmil_core.analysis.calibration.calibration_smooth`), ``decision``
    (:func:`~cmil_core.analysis.calibration.decision_curve`), ``fit`` (calibration intercept
    and slope with Wald 95% CIs, :func:`cmil_core.analysis.calibration.calibration_fit`).
    """
    prevalence, prior = model_scores.prevalence, model_scores.prior
    scores = model_scores.scores.dropna(subset=["bm_metastasis"])
    out = []
    for cohort in [c for c in model_scores.cohorts if c in set(scores["cohort"])]:
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
    model_scores: ModelScores, method: str | float = "model", endpoint: str = "os"
) -> dict[str, Any]:
    """The risk-group cutoff, always fixed on the model's training cohort.

    ``method``: a key of :data:`CUTOFF_METHODS` or a number. The data-driven
    methods (youden, median, maxstat) are chosen on the training cohort's
    out-of-fold scores (in-sample ones when ``model_scores`` was read
    ``in_sample``), the description says which. Returns ``{"method",
    "value", "description", "scores", ...}`` (maxstat adds its statistic and
    its search-corrected p).
    """
    if not isinstance(method, str):
        return {"method": "number", "value": float(method), "description": f"the number {method:g}",
                "scores": None}
    if method not in CUTOFF_METHODS:
        raise InputError(f"cutoff {method!r} is not one of {', '.join(CUTOFF_METHODS)} or a number")
    description = CUTOFF_METHODS[method]
    if method == "model":
        return {"method": method, "value": model_scores.operating_cutoff(),
                "description": description, "scores": OUT_OF_FOLD}
    time, event, _ = ENDPOINTS[endpoint]
    frame = model_scores.scores
    train = frame[frame["cohort"].isin(model_scores.training_cohorts)]
    if train.empty:
        raise InputError(f"model '{model_scores.model_id}' has no scores of its training cohort "
                         f"{model_scores.model.train_cohorts} to choose a cutoff on")
    kind = str(train["scores"].iloc[0])
    chosen = risk_cutoff(train, "score", method, time=time, event=event, label="bm_metastasis")
    return {**chosen.to_dict(), "description": f"{description} ({kind} training scores)",
            "scores": kind}


#: Times (months) of the time-dependent AUC of :func:`risk_survival`.
TD_AUC_MONTHS = (12.0, 24.0, 36.0)


def risk_survival(
    model_scores: ModelScores, endpoint: str = "os", cutoff: str | float = "model",
    *, td_auc_times: Sequence[float] = TD_AUC_MONTHS,
) -> list[dict[str, Any]]:
    """Per cohort: Kaplan-Meier by cMIL risk group, log-rank and Cox HR.

    Risk groups: score >= the cutoff of :func:`survival_cutoff` (fixed on the
    training cohort, applied unchanged); the training cohort's patients are
    grouped by their out-of-fold scores, unless ``model_scores`` was read
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
    chosen = survival_cutoff(model_scores, cutoff, endpoint)
    scores = model_scores.scores
    cohorts = list(model_scores.cohorts)
    out = []
    for c in cohorts:
        part = scores[scores["cohort"] == c]
        kind, label = _cohort_scores(part)
        out.append({**_risk_entry(c, part, chosen, time, event, td_auc_times),
                    "scores": kind, "label": label})
    validation = [c for c in cohorts if c not in model_scores.training_cohorts]
    with_followup = [e["cohort"] for e in out if e["cohort"] in validation and e["n"] > 0]
    if len(with_followup) >= 2:
        pooled = patient_order(scores[scores["cohort"].isin(with_followup)])
        entry = _risk_entry(POOLED, pooled, chosen, time, event, td_auc_times)
        entry.update(pooled=with_followup, scores=FINAL, label=POOLED)
        out.append(entry)
    return out


#: The name of the survival entry pooling every validation cohort with follow-up.
POOLED = "pooled validation"


def patient_order(scores: pd.DataFrame) -> pd.DataFrame:
    """Rows of one or several cohorts in the order the store lists patients (cohort, patient id).

    Pooled fits and the report's patient table use it (:attr:`ModelScores.scores`
    is in cohort order instead): a fit sums over patients in this order, so the
    same patients always give the same last digits, whatever the cohorts' order.
    """
    return scores.sort_values(["cohort", "patient_id"], kind="stable")


def _not_drawn(part: pd.DataFrame, event: str, cutoff: float) -> str:
    """Why a cohort's survival by risk group is not drawn, the first reason that holds."""
    if part.empty:
        return "no patient with follow-up"
    if part[event].sum() == 0:
        return f"no event among {len(part)} patients with follow-up"
    (group,) = part["risk_group"].unique()
    side = "at or above" if group == "high" else "below"
    return (f"a single risk group: all {len(part)} patients score {side} the cutoff "
            f"{display.cutoff(cutoff)} fixed on training")


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
        entry["note"] = _not_drawn(part, event, chosen["value"])
    else:
        frame = part[[time, event, "risk_group"]]
        entry["curves"] = kaplan_meier_table(frame, time, event, "risk_group")
        entry["result"] = survival_analysis(frame, time, event, group="risk_group")
    return entry


def patient_flow(store: store_mod.Store, model_id: str | None = None) -> pd.DataFrame:
    """Patients per cohort from import to analysis (STARD flow), each step within the one before.

    Columns: cohort, role, imported, with_slides, with_passed_patches,
    scored, labelled (see :func:`cmil_core.store.patient_flow`); for the
    model's training cohort "scored" means an out-of-fold score.
    """
    return store_mod.patient_flow(store, model_id)


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
    model_scores: ModelScores, clinical: pd.DataFrame, endpoint: str = "os",
    cutoff: str | float = "model", factors: Sequence[str] | None = None, *,
    strata: str | None = None,
) -> dict[str, Any]:
    """Cox model of the cMIL risk group adjusted for clinical factors, on the validation cohorts.

    Patients: the model's scored patients of every cohort it was not trained
    on, pooled, with follow-up for ``endpoint``; their clinical values come
    from ``clinical`` (columns cohort, patient_id and clinical, a dict per
    patient: :func:`cmil_core.store.patients_frame`). Covariates: "cMIL high
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

    Returns the :func:`cmil_core.analysis.cox.cox_analysis` dict plus
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
    model_id = model_scores.model_id
    time, event, _ = ENDPOINTS[endpoint]
    chosen = survival_cutoff(model_scores, cutoff, endpoint)
    trained_on = set(model_scores.training_cohorts)
    scores = model_scores.scores
    scores = patient_order(scores[~scores["cohort"].isin(trained_on)])
    scores = scores.dropna(subset=[time, event])
    if scores.empty:
        raise InputError(
            f"model '{model_id}': no scored patient with {endpoint} follow-up outside its "
            f"training cohort(s) {', '.join(sorted(trained_on))}"
        )
    clinical = clinical[["cohort", "patient_id", "clinical"]]
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
        centre = model_scores.centres
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
