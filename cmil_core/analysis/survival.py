"""Survival by group: Kaplan-Meier, log-rank, and the survival analysis of a table.

What is computed, and why
-------------------------
- **Kaplan-Meier**: S(t) = prod_{t_i <= t} (1 - d_i / n_i), with d_i deaths
  among n_i patients at risk at event time t_i. Its 95% interval is the
  "log-log" one (lifelines' default, R ``survfit(..., conf.type = "log-log")``):
  Greenwood's variance on log(-log S), which keeps the band inside [0, 1].
  The median survival is the first time S(t) <= 0.5; its interval is where
  the interval band crosses 0.5 (None when never reached: "not reached").
- **Log-rank** (``survdiff``): at every event time the deaths each group
  should have had under equal hazards; chi2 = (O - E)' V^-1 (O - E) with
  k - 1 degrees of freedom for k groups.
- :func:`survival_analysis` puts them together for a table, by a group
  column or by risk groups from a score: medians, log-rank, the Cox hazard
  ratio of two groups (:mod:`cmil_core.analysis.cox`), numbers at risk; the
  cutoff of a score is :func:`cmil_core.analysis.risk_groups.risk_cutoff`.

Inputs are checked once by
:func:`~cmil_core.analysis.survival_data.check_survival_data`: time numeric,
finite and >= 0; event 0/1 or boolean; rows missing time, event or another
needed column are dropped and counted (``n_dropped``). Bad input raises
:class:`~cmil_core.errors.InputError` naming the column.

Degenerate cases (decided, and tested): a group without events keeps its
Kaplan-Meier curve (median None); its hazard ratio is not estimable and is
reported as None with a warning, never a traceback. Fewer than two groups,
or no events at all, is an InputError for the log-rank test. Tiny groups are
analysed as they are.

Example
-------
>>> from lifelines.datasets import load_g3
>>> result = survival_analysis(load_g3(), "time", "event", group="group")
>>> round(result["logrank"]["statistic"], 4)
6.0629
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import median_survival_times

from cmil_core.analysis._checks import as_text, list_values, numeric_column
from cmil_core.analysis._formatting import fmt, fmt_ci, json_float, json_pair, p_text, text_table
from cmil_core.analysis.cox import two_group_cox
from cmil_core.analysis.risk_groups import RiskCutoff, describe_cutoff, risk_cutoff, risk_groups
from cmil_core.analysis.survival_data import EVENT, TIME, check_survival_data
from cmil_core.analysis.time_auc import format_td_auc, td_auc
from cmil_core.errors import InputError

__all__ = [
    "format_survival",
    "kaplan_meier",
    "kaplan_meier_table",
    "logrank",
    "number_at_risk",
    "pairwise_logrank",
    "survival_analysis",
]

FloatArray = npt.NDArray[np.float64]
_ALL = "all"  # the group name when no grouping is given


def _group_texts(data: pd.DataFrame, group: str | None) -> npt.NDArray[np.object_]:
    if group is None:
        return np.full(len(data), _ALL, dtype=object)
    return np.array([as_text(v) for v in data[group].tolist()], dtype=object)


# ----------------------------------------------------------------------------
# Kaplan-Meier and log-rank
# ----------------------------------------------------------------------------


def _km_fits(
    times: FloatArray, events: npt.NDArray[np.int64], groups: npt.NDArray[np.object_]
) -> dict[str, KaplanMeierFitter]:
    fits = {}
    for name in sorted(set(groups.tolist())):
        inside = groups == name
        fits[name] = KaplanMeierFitter().fit(times[inside], events[inside], label=name)
    return fits


def kaplan_meier(
    frame: pd.DataFrame, time: str, event: str, group: str | None = None
) -> dict[str, KaplanMeierFitter]:
    """Fitted lifelines Kaplan-Meier estimators, one per group (sorted by name).

    Without a group there is one, named "all". Each carries
    ``survival_function_`` and ``confidence_interval_`` (log-log, 95%): R
    ``survfit(Surv(time, event) ~ group, conf.type = "log-log")``.

    >>> from lifelines.datasets import load_g3
    >>> fits = kaplan_meier(load_g3(), "time", "event", "group")
    >>> round(float(fits["RIT"].survival_function_at_times(25).iloc[0]), 3)
    0.909
    """
    data, _ = check_survival_data(frame, time, event, [group] if group else [])
    return _km_fits(data[TIME].to_numpy(), data[EVENT].to_numpy(), _group_texts(data, group))


def kaplan_meier_table(
    frame: pd.DataFrame, time: str, event: str, group: str | None = None
) -> pd.DataFrame:
    """Kaplan-Meier curves in long form, for plots and export.

    Columns: group, time, survival, ci_low, ci_high (log-log 95%), at_risk,
    events, censored; one row per group and time point (time 0 included).
    """
    fits = kaplan_meier(frame, time, event, group)
    parts = []
    for name, fit in fits.items():
        table = fit.event_table
        ci = fit.confidence_interval_
        parts.append(
            pd.DataFrame(
                {
                    "group": name,
                    "time": fit.survival_function_.index.to_numpy(dtype=float),
                    "survival": fit.survival_function_.iloc[:, 0].to_numpy(),
                    "ci_low": ci.iloc[:, 0].to_numpy(),
                    "ci_high": ci.iloc[:, 1].to_numpy(),
                    "at_risk": table["at_risk"].to_numpy(),
                    "events": table["observed"].to_numpy(),
                    "censored": table["censored"].to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _median_with_ci(fit: KaplanMeierFitter) -> tuple[float | None, list[float | None]]:
    ci = median_survival_times(fit.confidence_interval_)
    return json_float(fit.median_survival_time_), json_pair(ci.iloc[0].tolist())


def _at_risk_counts(times: FloatArray, at: Sequence[float]) -> list[int]:
    """Number at risk at t: patients whose time is >= t (R's ``summary.survfit``)."""
    ordered = np.sort(times)
    return [int(ordered.size - np.searchsorted(ordered, t, side="left")) for t in at]


def _nice_times(max_time: float, count: int = 5) -> list[float]:
    """0 and a round step (1, 2, 2.5 or 5 x 10^k) giving about ``count`` steps to ``max_time``."""
    if max_time <= 0:
        return [0.0]
    power = 10.0 ** math.floor(math.log10(max_time / count))
    steps = [m * power for m in (0.5, 1.0, 2.0, 2.5, 5.0, 10.0)]
    step = min(steps, key=lambda s: abs(max_time / s - count))
    return [float(round(k * step, 10)) for k in range(int(max_time // step) + 1)]


def number_at_risk(
    frame: pd.DataFrame,
    time: str,
    event: str,
    group: str | None = None,
    times: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Numbers at risk (time >= t) per group at the given times (default: round steps).

    One row per group (index), one column per time: the table printed under
    Kaplan-Meier curves; R ``summary(survfit(Surv(time, event) ~ group),
    times = times, extend = TRUE)$n.risk``.
    """
    data, _ = check_survival_data(frame, time, event, [group] if group else [])
    at = _nice_times(float(data[TIME].max())) if times is None else [float(t) for t in times]
    labels = _group_texts(data, group)
    rows = {
        name: _at_risk_counts(data[TIME].to_numpy()[labels == name], at)
        for name in sorted(set(labels.tolist()))
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=at)


def _logrank(
    times: FloatArray, events: npt.NDArray[np.int64], groups: npt.NDArray[np.object_], column: str
) -> dict[str, Any]:
    names = sorted(set(groups.tolist()))
    if len(names) < 2:
        raise InputError(
            f"column {column!r}: the log-rank test needs two or more groups; "
            f"found only {list_values(names)}"
        )
    if events.sum() == 0:
        raise InputError("no events: the log-rank test needs at least one")
    result = multivariate_logrank_test(times, groups, events)
    return {
        "statistic": json_float(result.test_statistic),
        "df": int(result.degrees_of_freedom),
        "p": json_float(result.p_value),
    }


def logrank(frame: pd.DataFrame, time: str, event: str, group: str) -> dict[str, Any]:
    """Log-rank test across two or more groups: ``{"statistic", "df", "p"}``.

    Same as R ``survdiff(Surv(time, event) ~ group)``.
    """
    data, _ = check_survival_data(frame, time, event, [group])
    return _logrank(data[TIME].to_numpy(), data[EVENT].to_numpy(), _group_texts(data, group), group)


def _pairwise(
    times: FloatArray, events: npt.NDArray[np.int64], groups: npt.NDArray[np.object_], column: str
) -> list[dict[str, Any]]:
    names = sorted(set(groups.tolist()))
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            inside = (groups == a) | (groups == b)
            if events[inside].sum() == 0:
                rows.append({"group_a": a, "group_b": b, "statistic": None, "p": None})
                continue
            test = _logrank(times[inside], events[inside], groups[inside], column)
            rows.append(
                {"group_a": a, "group_b": b, "statistic": test["statistic"], "p": test["p"]}
            )
    for row, p_holm in zip(rows, _holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_holm
    return rows


def _holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: p_(i) * (k - i + 1), made monotone, capped at 1."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, p * (len(present) - rank)))
        adjusted[i] = running
    return adjusted


def pairwise_logrank(
    frame: pd.DataFrame, time: str, event: str, group: str
) -> list[dict[str, Any]]:
    """Log-rank test for every pair of groups, with Holm-adjusted p values.

    Each row: group_a, group_b, statistic, p, p_holm (statistic and p are
    None for a pair without events): R ``survdiff`` on each pair and
    ``p.adjust(p, method = "holm")`` (survminer ``pairwise_survdiff(...,
    p.adjust.method = "holm")``).
    """
    data, _ = check_survival_data(frame, time, event, [group])
    return _pairwise(
        data[TIME].to_numpy(), data[EVENT].to_numpy(), _group_texts(data, group), group
    )


# ----------------------------------------------------------------------------
# The table-level analysis (docs/DESIGN.md "survival" JSON contract)
# ----------------------------------------------------------------------------


def survival_analysis(
    frame: pd.DataFrame,
    time: str,
    event: str,
    group: str | None = None,
    score: str | None = None,
    cutoff: str | float | None = None,
    label: str | None = None,
    *,
    positive: object | None = None,
    train: pd.DataFrame | None = None,
    at_risk_times: Sequence[float] | None = None,
    min_share: float = 0.1,
    p_method: str = "Lau92",
    n_perm: int = 10_000,
    seed: int = 0,
    td_auc_times: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Kaplan-Meier, log-rank and Cox by group, or by risk group from a score, JSON-ready.

    Give either ``group`` (a column of group names) or ``score`` with
    ``cutoff`` ("median", "youden" with ``label``, "maxstat", or a number).
    The cutoff is chosen on ``train`` when given, else on ``frame`` itself,
    which is flagged in ``warnings`` (the log-rank p is then optimistic).

    Keys: cutoff {method, value, ...} (None with ``group``; maxstat adds
    statistic, p_corrected, p_method, cutpoint, n_low, n_high, min_share,
    max_share, statistic_name, p_method_name, r_call: see
    :class:`~cmil_core.analysis.risk_groups.RiskCutoff`), groups [{group, n,
    events, median, median_ci}],
    logrank {statistic, df, p, test} (R ``survdiff``; ``test`` says what it
    tests, with a cutoff: the chosen split, not corrected for choosing it), cox
    {reference, group, hr, ci, p} (exactly two groups, else None), pairwise
    (three or more groups), at_risk {times, groups: [{group, at_risk}]},
    n_dropped, warnings. The Cox HR carries ``ph_test``, R's ``cox.zph``
    (:mod:`cmil_core.analysis.proportional_hazards`). With ``score`` and
    ``td_auc_times``: ``td_auc``, the time-dependent AUC of the score itself
    (not of the groups) at those times (:func:`cmil_core.analysis.time_auc.td_auc`).
    """
    if (group is None) == (score is None):
        raise InputError("give either a group column or a score column with a cutoff, not both")
    if group is not None and cutoff is not None:
        raise InputError("a cutoff applies to a score column, not to a group column")
    if td_auc_times is not None and score is None:
        raise InputError("a time-dependent AUC needs a score column")
    data, dropped = check_survival_data(frame, time, event, [group or score])
    notes = [f"{dropped} rows with missing values dropped"] if dropped else []
    times, events = data[TIME].to_numpy(), data[EVENT].to_numpy()
    chosen: RiskCutoff | None = None
    if score is not None:
        if cutoff is None:
            raise InputError("a score needs a cutoff: median, youden, maxstat or a number")
        chosen = risk_cutoff(
            frame if train is None else train,
            score,
            cutoff,
            time=time,
            event=event,
            label=label,
            positive=positive,
            min_share=min_share,
            p_method=p_method,
            n_perm=n_perm,
            seed=seed,
        )
        if train is None and chosen.method != "fixed":
            notes.append(
                f"the {chosen.method} cutoff was chosen on the same patients it is tested on; "
                "the log-rank p value is optimistic (fix the cutoff on a training cohort)"
            )
        labels = risk_groups(numeric_column(data[score], score), chosen.value)
    else:
        labels = _group_texts(data, group)
    result = _describe_groups(times, events, labels, group or "risk group", at_risk_times)
    notes += result.pop("notes")
    if chosen is not None:
        result["logrank"]["test"] = (
            f"classic log-rank test of the two groups at the {chosen.method} cutoff "
            "(a test of the chosen split, not corrected for choosing it)"
        )
    extra: dict[str, Any] = {}
    if score is not None and td_auc_times is not None:
        extra["td_auc"] = {"score": score, **td_auc(
            times, events, numeric_column(data[score], score), td_auc_times)}
        notes += extra["td_auc"]["notes"]
    return {
        "cutoff": None if chosen is None else chosen.to_dict(),
        **result,
        **extra,
        "n_dropped": dropped,
        "warnings": notes,
    }


def _describe_groups(
    times: FloatArray,
    events: npt.NDArray[np.int64],
    labels: npt.NDArray[np.object_],
    column: str,
    at_risk_times: Sequence[float] | None,
) -> dict[str, Any]:
    fits = _km_fits(times, events, labels)
    notes: list[str] = []
    groups = []
    for name, fit in fits.items():
        median, median_ci = _median_with_ci(fit)
        inside = labels == name
        groups.append(
            {
                "group": name,
                "n": int(inside.sum()),
                "events": int(events[inside].sum()),
                "median": median,
                "median_ci": median_ci,
            }
        )
    test = _logrank(times, events, labels, column)
    cox = None
    if len(fits) == 2:
        reference = "low" if set(fits) == {"high", "low"} else sorted(fits)[0]
        cox, cox_notes = two_group_cox(times, events, labels, reference)
        notes += cox_notes
    if at_risk_times is None:
        at = _nice_times(float(times.max()))
    else:
        at = [float(t) for t in at_risk_times]
    return {
        "groups": groups,
        "logrank": test,
        "cox": cox,
        "pairwise": _pairwise(times, events, labels, column) if len(fits) > 2 else [],
        "at_risk": {
            "times": at,
            "groups": [
                {
                    "group": g,
                    "at_risk": _at_risk_counts(times[labels == g], at),
                    **_survival_at(fit, at),
                }
                for g, fit in fits.items()
            ],
        },
        "notes": notes,
    }


def _survival_at(fit: KaplanMeierFitter, at: Sequence[float]) -> dict[str, Any]:
    """S(t) and its log-log 95% interval at each time (the step value at or before t)."""
    sf = fit.survival_function_.iloc[:, 0]
    ci = fit.confidence_interval_
    index = sf.index.to_numpy(dtype=float)
    survival: list[float | None] = []
    bands: list[list[float | None]] = []
    for t in at:
        k = int(np.searchsorted(index, t, side="right")) - 1
        if k < 0:
            survival.append(1.0)
            bands.append([1.0, 1.0])
            continue
        survival.append(json_float(float(sf.iloc[k])))
        bands.append([json_float(float(ci.iloc[k, 0])), json_float(float(ci.iloc[k, 1]))])
    return {"survival": survival, "survival_ci": bands}


# ----------------------------------------------------------------------------
# Text tables
# ----------------------------------------------------------------------------


def format_survival(result: dict[str, Any]) -> str:
    """Render a ``survival_analysis`` result as fixed-width text for a terminal."""
    parts = []
    cut = result.get("cutoff")
    if cut is not None:
        parts.append(f"Risk groups: {describe_cutoff(cut)}")
    rows = [
        [g["group"], str(g["n"]), str(g["events"]), _fmt_median(g["median"], g["median_ci"])]
        for g in result["groups"]
    ]
    parts.append(text_table(["group", "n", "events", "median [95% CI]"], rows))
    lr = result["logrank"]
    label = "Log-rank"
    if cut is not None and cut.get("method") in ("median", "youden", "maxstat"):
        label = "Log-rank of the chosen groups (not corrected for the cutoff search)"
    parts.append(f"{label}: chi2 = {lr['statistic']:.3f}, df = {lr['df']}, {p_text(lr['p'])}")
    cox = result.get("cox")
    if cox is not None:
        vs = f"{cox['group']} vs {cox['reference']}"
        if cox["hr"] is None:
            parts.append(f"Cox: hazard ratio {vs} not estimable")
        else:
            hr = fmt_ci(cox["hr"], cox["ci"], 2)
            ph = _ph_global(cox.get("ph_test"))
            ph_text = "" if ph is None else (
                f"; proportional hazards (Schoenfeld, cox.zph {cox['ph_test']['transform']}): "
                f"{p_text(ph['p'])}" + (" - violated" if ph["violated"] else ""))
            parts.append(f"Cox: HR {vs} = {hr}, {p_text(cox['p'])}{ph_text}")
    for row in result.get("pairwise", []):
        parts.append(
            f"  {row['group_a']} vs {row['group_b']}: chi2 = {fmt(row['statistic'])}, "
            f"{p_text(row['p'])}, Holm-adjusted {p_text(row['p_holm'])}"
        )
    at_risk = result.get("at_risk")
    if at_risk:
        headers = ["at risk", *(f"{t:g}" for t in at_risk["times"])]
        body = [[g["group"], *map(str, g["at_risk"])] for g in at_risk["groups"]]
        parts += ["", text_table(headers, body)]
        if all("survival" in g for g in at_risk["groups"]):
            headers = ["S(t) [95% CI]", *(f"{t:g}" for t in at_risk["times"])]
            body = [
                [g["group"], *(fmt_ci(v, c, 3) for v, c in zip(g["survival"], g["survival_ci"]))]
                for g in at_risk["groups"]
            ]
            parts += ["", text_table(headers, body)]
    if result.get("td_auc"):
        parts += ["", format_td_auc(result["td_auc"], result["td_auc"].get("score", "score"))]
    parts += [f"note: {w}" for w in result.get("warnings", [])]
    return "\n".join(parts)


def _ph_global(ph: dict[str, Any] | None) -> dict[str, Any] | None:
    """The GLOBAL row of a :func:`~cmil_core.analysis.proportional_hazards.zph_test` result."""
    if not ph:
        return None
    return next((t for t in ph["tests"] if t["term"] == "GLOBAL" and t["p"] is not None), None)


def _fmt_median(median: float | None, ci: Sequence[float | None]) -> str:
    """"34.0 [9.0, NR]": NR (not reached) where the curve or its band stays above 0.5."""
    low, high = (fmt(v, 1) if v is not None else "NR" for v in ci)
    return f"{fmt(median, 1) if median is not None else 'NR'} [{low}, {high}]"
