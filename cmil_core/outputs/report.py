"""The study report of one model: every table and figure a paper needs, in one folder.

:func:`write_report` reads a results store (read-only) and writes::

    out_dir/
      report.html     one self-contained page (figures embedded as base64 PNG)
      report.json     the same numbers as plain JSON
      figures/        roc, calibration, decision, km_<cohort>, cox_forest (.png 200 dpi, .svg)
      tables/         cohort_overview, discrimination, roc_band, metrics_at_cutoff,
                      calibration, survival_summary, survival_at_risk, time_dependent_auc,
                      cox_coefficients, patient_scores (.csv)

Every number comes from :mod:`cmil_core.outputs.evaluation` and the statistics of
:mod:`cmil_core.analysis`; this module only gathers, formats and writes.
The CSV tables and ``report.json`` hold full-precision values; the HTML
rounds them for reading. The folder is written next to its destination under
a temporary name and renamed into place, so a crash never leaves half a
report; an existing folder is replaced only when it is empty or a previous
report (its ``report.json`` says ``"generator": "cmil_core.outputs.report"``).

The Cox model of the report (:func:`cmil_core.outputs.evaluation.clinical_cox`) pools the validation
cohorts (those the model was not trained on) and adjusts the cMIL risk group
for the clinical factors the store holds.

Reproduce a report with ``python -m cmil_core report --db STORE --model ID
--out DIR [--endpoint os|efs] [--cutoff model|youden|median|maxstat|NUMBER]
[--pseudonymise]``.

With ``pseudonymise``, every patient id of the folder (tables, JSON, HTML) is
replaced by its salted hash (:mod:`cmil_core.ops.access`) before anything is
written, and the patient rows are ordered by pseudonym, so that neither an id
nor the order of the ids leaves; ``report.json`` says which kind of salt was
used, never the salt.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.analysis.risk_groups import describe_cutoff, risk_groups
from cmil_core.analysis.roc_bootstrap import roc_ci_band
from cmil_core.errors import InputError
from cmil_core.ingest import qc
from cmil_core.ops import access
from cmil_core.outputs import evaluation, figures
from cmil_core.progress import ProgressCallback, no_progress, stage_reporter
from cmil_core.store.model_rules import read_model_scores

__all__ = ["GENERATOR", "report_zip", "write_report"]

GENERATOR = "cmil_core.outputs.report"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------
# Plain JSON and tables
# ----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON's own types only: numpy and pandas scalars unwrapped, NaN and inf to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [_plain(r) for r in value.to_dict(orient="records")]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    return str(value)


def _split_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns holding [low, high] pairs become two columns, ``x_low`` and ``x_high``."""
    out = frame.copy()
    for column in list(out.columns):
        values = out[column].tolist()
        pairs = all(v is None or (isinstance(v, (list, tuple)) and len(v) == 2) for v in values)
        if values and pairs:
            base = column.removesuffix("_ci")
            position = out.columns.get_loc(column)
            low = [None if v is None else v[0] for v in values]
            high = [None if v is None else v[1] for v in values]
            out = out.drop(columns=column)
            out.insert(position, f"{base}_ci_high", high)
            out.insert(position, f"{base}_ci_low", low)
    return out


def _slug(name: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "cohort"
    candidate, k = slug, 2
    while candidate in taken:
        candidate, k = f"{slug}_{k}", k + 1
    taken.add(candidate)
    return candidate


# ----------------------------------------------------------------------------
# Gathering the results
# ----------------------------------------------------------------------------


def _gather(
    store: store_mod.Store, model: store_mod.ModelRow, endpoint: str, cutoff: str | float,
    step: Callable[[str], None], in_sample: bool = False,
) -> dict[str, Any]:
    # Honest numbers: every training row reads the out-of-fold scores (read_model_scores)
    # unless the in-sample ones are asked for, and each row says which. The model and its
    # scores are read once; every evaluation below is a function of them.
    model_id = model.model_id
    cohorts = [c.cohort for c in store_mod.list_cohorts(store)]
    step("cohorts and discrimination")
    overview = store_mod.cohort_overview(store)
    flow = evaluation.patient_flow(store, model_id)
    model_scores = read_model_scores(store, model_id, in_sample=in_sample)
    discrimination = evaluation.discrimination(model_scores)
    curves = evaluation.roc_curves(model_scores)
    scores = evaluation.patient_order(model_scores.scores)
    step("ROC confidence bands")
    labelled = scores.dropna(subset=["bm_metastasis"])
    for curve in curves:
        part = labelled[labelled["cohort"] == curve["cohort"]]
        curve["band"] = roc_ci_band(part["bm_metastasis"].to_numpy(dtype=int),
                                    part["score"].to_numpy(dtype=float))
    metrics = evaluation.metrics_table(model_scores)
    step("calibration")
    calibration = evaluation.calibration(model_scores)
    step("survival")
    chosen = evaluation.survival_cutoff(model_scores, cutoff, endpoint)
    survival = evaluation.risk_survival(model_scores, endpoint, cutoff)
    step("Cox model")
    try:
        cox: dict[str, Any] = evaluation.clinical_cox(
            model_scores, store_mod.patients_frame(store), endpoint, cutoff)
    except InputError as exc:
        cox = {"note": str(exc)}
    scores = scores.copy()
    scores["risk_group_at_report_cutoff"] = (
        risk_groups(scores["score"], chosen["value"]) if len(scores) else []
    )
    return {
        "cohort_order": cohorts, "overview": overview, "discrimination": discrimination,
        "curves": curves, "metrics": metrics, "calibration": calibration, "cutoff": chosen,
        "survival": survival, "cox": cox, "scores": scores,
        "quality": _quality(store, model_id), "flow": flow, "in_sample": in_sample,
        "probability_note": evaluation.probability_note(model_scores),
    }


def _quality(store: store_mod.Store, model_id: str) -> dict[str, Any]:
    """Each cohort's QC decision, the bias warnings, and this model's stale or mismatch notes."""
    decisions = [
        {"cohort": c, "decision_id": d["decision_id"], "decided_at": str(d["decided_at"]),
         "who": d["who"], "source": d["source"], "thresholds": d["thresholds"],
         "kept": d["kept"], "rejected": d["rejected"]}
        for c, d in store_mod.current_qc_decisions(store).items()]
    counts = store_mod.qc_patient_counts(store)
    return {"decisions": decisions,
            "warnings": [w.message for w in qc.warnings_from_counts(counts)],
            "model_notes": qc.model_notes(qc.stale_marks(store), model_id),
            "patient_counts": counts}  # for pseudonymised warnings; not written


def _tables(data: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The CSV tables, by file stem."""
    band_rows = []
    for c in data["curves"]:
        b = c["band"]
        for k, sp in enumerate(b["specificity"]):
            band_rows.append({"cohort": c["cohort"], "specificity": sp,
                              "sensitivity_low": b["se_low"][k],
                              "sensitivity_median": b["se_median"][k],
                              "sensitivity_high": b["se_high"][k]})
    survival_rows, at_risk_rows = [], []
    for e in data["survival"]:
        if "note" in e:
            survival_rows.append({"cohort": e["cohort"], "n_cohort": e["n"], "note": e["note"]})
            continue
        r = e["result"]
        cox = r.get("cox") or {}
        for g in r["groups"]:
            survival_rows.append({
                "cohort": e["cohort"], "n_cohort": e["n"], "group": g["group"], "n": g["n"],
                "events": g["events"], "median": g["median"],
                "median_ci_low": g["median_ci"][0], "median_ci_high": g["median_ci"][1],
                "logrank_statistic": r["logrank"]["statistic"], "logrank_df": r["logrank"]["df"],
                "logrank_p": r["logrank"]["p"],
                "hr_group": cox.get("group"), "hr_reference": cox.get("reference"),
                "hr": cox.get("hr"), "hr_ci_low": (cox.get("ci") or [None, None])[0],
                "hr_ci_high": (cox.get("ci") or [None, None])[1], "hr_p": cox.get("p"),
                "hr_ph_p": _ph_global_p(cox.get("ph_test")),
                "note": "",
            })
        for g in r["at_risk"]["groups"]:
            for t, n, s, ci in zip(r["at_risk"]["times"], g["at_risk"], g["survival"],
                                   g["survival_ci"], strict=True):
                at_risk_rows.append({"cohort": e["cohort"], "group": g["group"], "time": t,
                                     "at_risk": n, "survival": s, "survival_ci_low": ci[0],
                                     "survival_ci_high": ci[1]})
    td_rows = [{"cohort": e["cohort"], "time": t, "auc": a, "cases": c, "controls": n,
                "mean_auc": e["td_auc"]["mean_auc"]}
               for e in data["survival"] if e.get("td_auc")
               for t, a, c, n in zip(e["td_auc"]["times"], e["td_auc"]["auc"],
                                     e["td_auc"]["cases"], e["td_auc"]["controls"], strict=True)]
    cox = data["cox"]
    cox_rows = [
        {"name": c["name"], "coef": c["coef"], "se": c["se"], "hr": c["hr"],
         "hr_ci_low": (c["ci"] or [None, None])[0], "hr_ci_high": (c["ci"] or [None, None])[1],
         "p": c["p"], "ph_p": c.get("ph_p")}
        for c in cox.get("coefficients", [])
    ]
    discrimination = pd.DataFrame(data["discrimination"])
    return {
        "cohort_overview": data["overview"],
        "discrimination": discrimination,
        "roc_band": pd.DataFrame(band_rows),
        "metrics_at_cutoff": _split_intervals(data["metrics"]),
        "survival_summary": pd.DataFrame(survival_rows),
        "survival_at_risk": pd.DataFrame(at_risk_rows),
        "cox_coefficients": pd.DataFrame(cox_rows,
                                         columns=["name", "coef", "se", "hr", "hr_ci_low",
                                                  "hr_ci_high", "p", "ph_p"]),
        "calibration": pd.DataFrame(evaluation.calibration_summary(data["calibration"])),
        "time_dependent_auc": pd.DataFrame(td_rows, columns=["cohort", "time", "auc", "cases",
                                                              "controls", "mean_auc"]),
        "patient_scores": data["scores"],
        "patient_flow": data["flow"],
    }


def _figures(
    data: dict[str, Any], endpoint: str, step: Callable[[str], None]
) -> list[tuple[str, str, Any]]:
    """(file stem, caption, Figure) for every figure of the report."""
    order = data["cohort_order"]
    out: list[tuple[str, str, Any]] = []
    step("figure: ROC")
    out.append(("roc", "ROC curves by cohort: AUC with DeLong 95% CI; shaded, the 95% CI of "
                "sensitivity at each specificity (2,000 stratified bootstrap resamples).",
                figures.roc(data["curves"], cohorts=order)))
    step("figure: calibration and decision curve")
    out.append(("calibration", "Calibration: five equal-sized bins of the score (Wilson 95% CI) "
                "and a kernel-smoothed curve.", figures.calibration(data["calibration"],
                                                                     cohorts=order)))
    out.append(("decision", "Decision curve: net benefit of acting on the score, against "
                "acting for all (dashed) or none.", figures.decision(data["calibration"],
                                                                      cohorts=order)))
    label = evaluation.ENDPOINTS[endpoint][2]
    taken: set[str] = set()
    for e in data["survival"]:
        if "note" in e:
            continue
        step(f"figure: Kaplan-Meier {e['cohort']}")
        name = e.get("label", e["cohort"])
        out.append((f"km_{_slug(str(e['cohort']), taken)}",
                    f"{name}: {label} by cMIL risk group (Kaplan-Meier, log-log 95% CI).",
                    figures.km(e["curves"], e["result"],
                               title=f"{name}: {label} by cMIL risk group")))
    if "coefficients" in data["cox"]:
        step("figure: Cox model")
        cox = data["cox"]
        out.append(("cox_forest", f"Cox model of {label} on the validation cohorts "
                    f"({', '.join(cox['cohorts'])}), pooled.",
                    figures.forest(cox, title=f"Cox model, {label}: validation cohorts")))
    return out


# ----------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _n(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if not math.isfinite(number):
        return "—"
    return f"{number:.{digits}f}"


def _ci(value: Any, ci: Sequence[Any] | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if not ci or ci[0] is None or ci[1] is None:
        return _n(value, digits)
    return f"{_n(value, digits)} ({_n(ci[0], digits)}-{_n(ci[1], digits)})"


def _median(value: Any, ci: Sequence[Any] | None) -> str:
    """"34.6 (9.0-NR)": NR (not reached) where the curve or its band stays above one half."""
    low, high = ((_n(v, 1) if v is not None else "NR") for v in (ci or [None, None]))
    return f"{'NR' if value is None else _n(value, 1)} ({low}-{high})"


def _hr(row: dict[str, Any]) -> str:
    ci = row.get("ci") or [None, None]
    if row.get("hr") is None:
        return "not estimable"
    if any(v is None or not math.isfinite(v) or v <= 0 for v in ci):
        return f"{row['hr']:.3g} (CI not estimable)"
    return _ci(row["hr"], ci, 2)


def _p(p: Any) -> str:
    return display.p_cell(p).replace("<", "&lt;")


def _ph_global_p(ph: dict[str, Any] | None) -> float | None:
    """The GLOBAL p of a cox.zph result (:mod:`~cmil_core.analysis.proportional_hazards`)."""
    row = next((t for t in (ph or {}).get("tests", []) if t["term"] == "GLOBAL"), None)
    return None if row is None else row["p"]


def _ph(p: Any) -> str:
    """A proportional-hazards p for a table cell, flagged below 0.05."""
    return _p(p) + (" (not proportional)" if p is not None and p < 0.05 else "")


def _signed(value: Any, ci: Sequence[Any] | None) -> str:
    """"-0.12 (-0.55 to 0.31)": an estimate that may be negative, with its 95% CI."""
    if value is None:
        return "—"
    return _n(value, 2) + ("" if not ci else f" ({_n(ci[0], 2)} to {_n(ci[1], 2)})")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:60rem;
margin:2rem auto;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border-bottom:1px solid #e4e4e4;padding:.25rem .6rem;text-align:left}
th{background:#f6f6f6}figure{margin:1rem 0}img{max-width:100%;height:auto}
figcaption,.note{color:#555;font-size:.88rem}code{background:#f3f3f3;padding:0 .2rem}
"""


def _html(meta: dict[str, Any], data: dict[str, Any], figs: dict[str, tuple[str, bytes]],
          tables: dict[str, pd.DataFrame]) -> str:
    parts: list[str] = []
    model = meta["model"]
    cut = data["cutoff"]
    parts.append(f"<h1>cMIL report: model {_e(model['model_id'])}</h1>")
    parts.append(
        f"<p>Written {_e(meta['created_at'])} from the store <code>{_e(meta['store'])}</code>. "
        f"Model: {_e(model['aggregator'])} aggregator, {_e(model['encoder'])} encoder, trained "
        f"on {_e(model['train_cohorts'])}; operating cutoff {_n(model['cutoff'])} fixed on the "
        f"training cohort and applied unchanged to every cohort. Survival endpoint: "
        f"{_e(meta['endpoint']['name'])}; risk groups: score &ge; {_n(cut['value'])} is high "
        f"({_e(cut['description'])}).</p>"
    )
    if cut.get("method") == "maxstat" and cut.get("statistic") is not None:
        parts.append(
            f"<p class=\"note\">maxstat on the training cohort: {_e(describe_cutoff(cut))}. "
            "The search-corrected p tests whether any allowed split is associated with "
            "survival; the log-rank p of each cohort below is the classic test of the chosen "
            "groups, not corrected for choosing the cutoff.</p>"
        )
    if data["in_sample"]:
        parts.append("<p class=\"note\"><strong>In-sample training rows</strong>: the training "
                     "cohort is scored by the final model that was fitted on it (optimistic), as "
                     "asked; without <code>--in-sample</code> its rows use out-of-fold scores.</p>")
    else:
        parts.append("<p class=\"note\">Training rows marked <em>out-of-fold</em>: each "
                     "training patient is scored by the cross-validation model that did not see "
                     "them, the honest in-centre estimate; the final model's scores of every "
                     "cohort are mapped onto that scale, on which the cutoff was chosen.</p>")
    parts.append(f"<p class=\"note\">Reproduce: <code>{_e(meta['command'])}</code></p>")
    if meta.get("pseudonymised"):
        parts.append(f"<p class=\"note\">Patient ids are pseudonymised: "
                     f"{_e(meta['pseudonymised']['note'])}.</p>")

    parts.append("<h2>Cohorts</h2>")
    ov = tables["cohort_overview"]
    parts.append(_table(
        ["Cohort", "Role", "Centre", "Patients", "BM metastasis +", "BM metastasis −",
         "Label unknown", "OS known", "OS events", "Slides", "Patches passed QC"],
        [[r.cohort, r.role, r.center, r.patients, r.positives, r.negatives, r.unlabelled,
          r.os_known, r.os_events, r.slides, f"{r.patches_passed} of {r.patches}"]
         for r in ov.itertuples()]))

    parts.append("<h3>Patient flow (STARD)</h3>")
    parts.append(_table(
        ["Cohort", "Imported", "With slides", "With QC-passed patches", "Scored",
         "With a label (analysed)"],
        [[r.cohort, r.imported, r.with_slides, r.with_passed_patches,
          "—" if pd.isna(r.scored) else int(r.scored),
          "—" if pd.isna(r.labelled) else int(r.labelled)]
         for r in data["flow"].itertuples()]))
    parts.append("<p class=\"note\">Each step counts the patients of the one before it that "
                 "also have it; for the training cohort, scored means an out-of-fold score "
                 "(cross-validation uses labelled patients only).</p>")

    quality = data["quality"]
    parts.append("<h2>Quality control</h2>")
    parts.append(_table(
        ["Cohort", "QC decision", "Decided", "Thresholds"],
        [[d["cohort"], d["decision_id"], d["decided_at"],
          qc.format_thresholds(d["thresholds"], " ")]
         for d in quality["decisions"]]))
    notes = quality["warnings"] + quality["model_notes"]
    for note in notes:
        parts.append(f"<p class=\"note\"><strong>Warning</strong>: {_e(note)}</p>")
    if not notes:
        parts.append("<p class=\"note\">No quality-control warning: no cohort loses more than "
                     "30% of its patches, no patient loses all of them, and the share kept does "
                     "not differ by more than 10 points between label classes; this model's "
                     "scores are on every cohort's current QC decision.</p>")

    parts.append("<h2>Discrimination</h2>")
    parts.append(_figure_html(figs, "roc"))
    legend = "".join(f"<li>{_e(figures.auc_label(c))}</li>" for c in data["curves"])
    parts.append(f"<ul class=\"note\">{legend}</ul>")
    parts.append(_table(
        ["Cohort", "Patients", "Positives", "AUC (95% CI, DeLong)", "Sensitivity", "Specificity"],
        [[_e(r.get("label", r["cohort"])), _e(r["n"]), _e(r["n_positive"]),
          (_ci(r["auc"], [r.get("ci_low"), r.get("ci_high")]) if "auc" in r
           else "one class only"),
          _n(r.get("sensitivity")), _n(r.get("specificity"))] for r in data["discrimination"]],
        raw=True))
    parts.append("<h3>At the training cutoff</h3>")
    parts.append(_table(
        ["Cohort", "Patients", "TP / FN / TN / FP", "Sensitivity", "Specificity", "PPV", "NPV"],
        [[_e(r["label"]), _e(r["n"]), f"{r['tp']} / {r['fn']} / {r['tn']} / {r['fp']}",
          *(_ci(r.get(k), r.get(f"{k}_ci")) for k in ("sensitivity", "specificity", "ppv", "npv"))]
         for r in data["metrics"].to_dict(orient="records")], raw=True))
    parts.append("<p class=\"note\">Wilson 95% confidence intervals.</p>")

    parts.append("<h2>Calibration and clinical usefulness</h2>")
    parts.append(_figure_html(figs, "calibration"))
    parts.append(_table(["Cohort", "Patients", "Brier score", "Calibration intercept (95% CI)",
                         "Calibration slope (95% CI)"],
                        [[_e(e["label"]), _e(e["n"]), _n(e["brier"]),
                          _signed(e["fit"]["intercept"], e["fit"]["intercept_ci"]),
                          _signed(e["fit"]["slope"], e["fit"]["slope_ci"])]
                         for e in data["calibration"]], raw=True))
    parts.append("<p class=\"note\">Calibration intercept (ideal 0) and slope (ideal 1): "
                 "logistic recalibration of the outcome on the log-odds of the probability "
                 "(R glm), Wald 95% CIs."
                 + "".join(f" {_e(e['label'])}: {_e(e['fit']['note'])}."
                           for e in data["calibration"] if e["fit"].get("note")) + "</p>")
    parts.append(f"<p class=\"note\">{_e(data['probability_note'])}</p>")
    parts.append(_figure_html(figs, "decision"))

    parts.append(f"<h2>Survival by cMIL risk group ({_e(meta['endpoint']['name'])})</h2>")
    taken: set[str] = set()
    for e in data["survival"]:
        if "note" in e:
            parts.append(f"<p><strong>{_e(e['cohort'])}</strong>: {_e(e['note'])}.</p>")
            continue
        parts.append(_figure_html(figs, f"km_{_slug(str(e['cohort']), taken)}"))
        r = e["result"]
        cox = r.get("cox") or {}
        hr = _hr(cox) + (f", p {_p(cox.get('p'))}" if cox.get("hr") is not None else "")
        if _ph_global_p(cox.get("ph_test")) is not None:
            hr += f"; proportional hazards (cox.zph) p {_ph(_ph_global_p(cox['ph_test']))}"
        parts.append(_table(
            ["Group", "Patients", "Events", "Median (95% CI)"],
            [[_e(g["group"]), _e(g["n"]), _e(g["events"]),
              _median(g["median"], g["median_ci"])]
             for g in r["groups"]], raw=True))
        parts.append(
            f"<p class=\"note\">Log-rank of the chosen groups (not corrected for the cutoff "
            f"search) &chi;&sup2; = {_n(r['logrank']['statistic'])}, "
            f"df = {_e(r['logrank']['df'])}, p {_p(r['logrank']['p'])}; hazard ratio "
            f"{_e(cox.get('group'))} vs {_e(cox.get('reference'))}: {hr}.</p>"
        )
        for w in r.get("warnings", []):
            parts.append(f"<p class=\"note\">Note: {_e(w)}</p>")

    td = [e for e in data["survival"] if e.get("td_auc")]
    if td:
        times = td[0]["td_auc"]["times"]
        parts.append("<h3>Time-dependent AUC of the cMIL score</h3>")
        parts.append(_table(
            ["Cohort", *(f"{t:g} months" for t in times), "Mean"],
            [[_e(e["cohort"]), *(f"{_n(a)} ({c} / {n})" if a is not None else "—"
                                  for a, c, n in zip(e["td_auc"]["auc"], e["td_auc"]["cases"],
                                                     e["td_auc"]["controls"], strict=True)),
              _n(e["td_auc"]["mean_auc"])] for e in td], raw=True))
        parts.append("<p class=\"note\">Cumulative/dynamic AUC of the continuous score (cases: "
                     "event by that time; controls: event-free after it; in brackets cases / "
                     "controls), inverse probability of censoring weights (Uno 2007; "
                     "scikit-survival cumulative_dynamic_auc).</p>")

    parts.append("<h2>Cox model with clinical factors</h2>")
    cox = data["cox"]
    if "note" in cox:
        parts.append(f"<p>{_e(cox['note'])}</p>")
    else:
        parts.append(
            f"<p>Validation cohorts pooled ({_e(', '.join(cox['cohorts']))}): {_e(cox['n'])} "
            f"patients, {_e(cox['events'])} events; Harrell's C {_n(cox.get('concordance'))}. "
            "Efron ties; Wald 95% CIs.</p>"
        )
        parts.append(_figure_html(figs, "cox_forest"))
        definitions = {c["name"]: c["definition"] for c in cox["covariates"]}
        parts.append(_table(
            ["Covariate", "Definition", "HR (95% CI)", "p", "Proportional hazards p (cox.zph)"],
            [[_e(c["name"]), _e(definitions.get(c["name"])), _hr(c), _p(c["p"]),
              _ph(c.get("ph_p"))]
             for c in cox["coefficients"]], raw=True))
        if cox.get("ph_test"):
            parts.append("<p class=\"note\">Proportional hazards: Schoenfeld-residual score "
                         "test of R's cox.zph (transform \"km\"), whole model p "
                         f"{_ph(_ph_global_p(cox['ph_test']))}; p &lt; 0.05: the hazard ratio "
                         "changes with follow-up and is an average over it.</p>")
        for x in cox.get("excluded", []):
            parts.append(f"<p class=\"note\">Not in the model: {_e(x['column'])} "
                         f"({_e(x['reason'])}).</p>")
        for w in cox.get("warnings", []):
            parts.append(f"<p class=\"note\">Note: {_e(w)}</p>")

    parts.append("<h2>Patients</h2>")
    scores = data["scores"]
    rows = [[r.cohort, r.patient_id, _n(r.score), r.risk_group_at_report_cutoff,
             "—" if pd.isna(r.bm_metastasis) else int(r.bm_metastasis)]
            for r in scores.itertuples()]
    parts.append(f"<details><summary>{len(rows)} scored patients</summary>"
                 + _table(["Cohort", "Patient", "cMIL score", "Risk group", "BM metastasis"], rows)
                 + "</details>")

    parts.append("<h2>Files</h2><ul>")
    for name in meta["files"]:
        parts.append(f'<li><a href="{_e(name)}">{_e(name)}</a></li>')
    parts.append("</ul>")
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>cMIL report: {_e(model['model_id'])}</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _figure_html(figs: dict[str, tuple[str, bytes]], stem: str) -> str:
    if stem not in figs:
        return ""
    caption, png = figs[stem]
    return (f"<figure>{_img(png, caption)}<figcaption>{_e(caption)} "
            f'(<a href="figures/{stem}.png">PNG</a>, <a href="figures/{stem}.svg">SVG</a>)'
            "</figcaption></figure>")


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _is_report(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise InputError(
            f"{out}: folder is not empty and holds no cMIL report; choose a new or empty folder"
        )


def _command(db_path: Path, model_id: str, out: Path, endpoint: str, cutoff: str | float,
             pseudonymised: bool = False, in_sample: bool = False) -> str:
    return (f"python -m cmil_core report --db {db_path} --model {model_id} --out {out} "
            f"--endpoint {endpoint} --cutoff {cutoff}"
            + (" --in-sample" if in_sample else "")
            + (" --pseudonymise" if pseudonymised else ""))


def write_report(
    db_path: str | Path,
    model_id: str,
    out_dir: str | Path,
    *,
    endpoint: str = "os",
    cutoff: str | float = "model",
    progress: ProgressCallback | None = None,
    pseudonymise: bool | access.Pseudonymiser = False,
    in_sample: bool = False,
) -> Path:
    """Write the report of ``model_id`` into ``out_dir``; returns the path of its ``report.html``.

    ``endpoint``: "os" or "efs"; ``cutoff``: the risk-group cutoff, a key of
    :data:`cmil_core.outputs.evaluation.CUTOFF_METHODS` ("model", "youden",
    "median", "maxstat") or a number, always fixed on the training cohort.
    ``out_dir`` is created; an existing folder must be empty or a previous
    report, which is replaced whole. ``progress`` receives
    :class:`~cmil_core.progress.Progress` events. ``pseudonymise``: replace
    every patient id by its pseudonym (True: the salt of
    :func:`cmil_core.ops.access.make_pseudonymiser`, i.e. ``$CMIL_PSEUDONYM_SALT``
    or a random one; or a :class:`~cmil_core.ops.access.Pseudonymiser`).
    The training cohort's rows use its out-of-fold scores, labelled so;
    ``in_sample`` puts the final model's in-sample scores there instead
    (optimistic; labelled "in-sample").
    """
    db = Path(db_path)
    masker: access.Pseudonymiser | None = (
        pseudonymise if isinstance(pseudonymise, access.Pseudonymiser)
        else access.make_pseudonymiser() if pseudonymise else None
    )
    out = Path(out_dir).expanduser()
    if endpoint not in evaluation.ENDPOINTS:
        raise InputError(f"endpoint {endpoint!r} is not one of {', '.join(evaluation.ENDPOINTS)}")
    if isinstance(cutoff, str) and cutoff not in evaluation.CUTOFF_METHODS:
        raise InputError(
            f"cutoff {cutoff!r} is not one of {', '.join(evaluation.CUTOFF_METHODS)} or a number"
        )
    _check_target(out)
    callback = progress or no_progress
    with store_mod.open_store(db, read_only=True) as store:
        model = store_mod.get_model(store, model_id)
        if model is None:
            raise InputError(f"no model '{model_id}' in the store {db}")
        if store_mod.patient_scores_frame(store, model_id).empty:
            raise InputError(f"model '{model_id}' has scored no patient yet; run score first")
        n_cohorts = len(store_mod.list_cohorts(store))
        # gathering (5 steps), figures drawn then written (4 + a KM per cohort and the pooled
        # one at most), tables; made exact once the figures are known
        total = 5 + 2 * (5 + n_cohorts) + 1
        report = stage_reporter(callback, stage="report", index=1, stages=1)
        done = 0

        def step(message: str) -> None:
            nonlocal done
            report(done, total, message)
            done += 1

        data = _gather(store, model, endpoint, cutoff, step, in_sample)
    counts = data["quality"].pop("patient_counts")
    if masker is not None:
        data["scores"] = masker.frame(data["scores"])
        # The warnings name patients who lose every patch: by their pseudonyms.
        data["quality"]["warnings"] = [w.message for w in qc.warnings_from_counts(
            masker.frame(counts))]
    figs = _figures(data, endpoint, step)
    total = done + len(figs) + 1
    tables = _tables(data)
    files = ([f"figures/{stem}.{fmt}" for stem, _, _ in figs for fmt in figures.FORMATS]
             + [f"tables/{name}.csv" for name in tables] + ["report.json"])
    meta = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "store": str(db),
        "command": _command(db, model_id, out, endpoint, cutoff, masker is not None, in_sample),
        "training_scores": evaluation.IN_SAMPLE if in_sample else evaluation.OUT_OF_FOLD,
        "pseudonymised": (None if masker is None
                          else {"method": "HMAC-SHA256", "salt": masker.source,
                                "note": masker.describe()}),
        "model": {"model_id": model.model_id, "created_at": model.created_at,
                  "aggregator": model.aggregator, "encoder": model.encoder,
                  "train_cohorts": model.train_cohorts, "cutoff": model.cutoff},
        "endpoint": {"key": endpoint, "name": evaluation.ENDPOINTS[endpoint][2]},
        "files": files,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        (partial / "figures").mkdir(parents=True)
        (partial / "tables").mkdir()
        rendered: dict[str, tuple[str, bytes]] = {}
        for stem, caption, fig in figs:
            step(f"writing {stem}")
            png = figures.to_bytes(fig, "png")
            (partial / "figures" / f"{stem}.png").write_bytes(png)
            (partial / "figures" / f"{stem}.svg").write_bytes(figures.to_bytes(fig, "svg"))
            rendered[stem] = (caption, png)
        step("tables")
        for name, frame in tables.items():
            frame.to_csv(partial / "tables" / f"{name}.csv", index=False)
        document = _plain({**meta, **_json_sections(data)})
        (partial / "report.json").write_text(
            json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
        (partial / "report.html").write_text(_html(_plain(meta) | {"files": files}, data,
                                                   rendered, tables), encoding="utf-8")
        _swap(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report(total, total, "done")
    return out / "report.html"


def _json_sections(data: dict[str, Any]) -> dict[str, Any]:
    survival = []
    for e in data["survival"]:
        entry = {"cohort": e["cohort"], "scores": e.get("scores"), "n": e["n"]}
        if "note" in e:
            entry["note"] = e["note"]
        else:
            r = e["result"]
            entry.update({k: r.get(k) for k in ("groups", "logrank", "cox", "at_risk", "warnings")})
        if e.get("td_auc"):
            entry["td_auc"] = e["td_auc"]
        survival.append(entry)
    return {
        "cutoff": data["cutoff"],
        "cohorts": data["overview"],
        "discrimination": data["discrimination"],
        "roc": [{"cohort": c["cohort"], "scores": c["scores"], "auc": c["auc"],
                 "ci_low": c["ci_low"],
                 "ci_high": c["ci_high"], "legend": figures.auc_label(c), "band": c["band"]}
                for c in data["curves"]],
        "metrics_at_cutoff": data["metrics"],
        "patient_flow": data["flow"],
        "calibration": [{"cohort": e["cohort"], "scores": e["scores"], "n": e["n"],
                         "prevalence": e["prevalence"], "brier": e["brier"], "bins": e["bins"],
                         **{k: e["fit"].get(k) for k in (
                             "intercept", "intercept_se", "intercept_ci", "slope", "slope_se",
                             "slope_ci", "note")}}
                        for e in data["calibration"]],
        "probability_note": data["probability_note"],
        "survival": survival,
        "cox": data["cox"],
        "quality_control": data["quality"],
    }


def _swap(partial: Path, out: Path) -> None:
    """Put the finished folder in place; a previous report goes only once the new one is there."""
    if not out.exists():
        partial.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        partial.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def report_zip(out_dir: str | Path) -> bytes:
    """The report folder as a zip (entries under the folder's name), for a download."""
    out = Path(out_dir)
    if not _is_report(out):
        raise InputError(f"{out}: not a cMIL report folder (no report.json of ours)")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            archive.write(path, f"{out.name}/{path.relative_to(out).as_posix()}")
    return buffer.getvalue()
