"""Survival statistics: Kaplan-Meier, log-rank, Cox models and risk-group cutoffs.

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
- **Cox model** (``coxph``): hazard h(t | x) = h0(t) exp(x' beta), Efron's
  handling of tied times (lifelines' and R's default); HR = exp(beta) with
  Wald 95% intervals and p values; Harrell's concordance C.
- **Risk groups**: a cutoff is chosen on a training frame and applied
  unchanged to every cohort; ``score >= cutoff`` is "high", the rest "low".
  Methods: ``median``; ``youden`` (needs a binary label; the ROC Youden cutoff
  of :mod:`cmil_core.analysis.stats`); ``maxstat`` (the maximally selected log-rank
  statistic of Hothorn and Lausen 2003, exactly R ``maxstat.test(Surv(time,
  event) ~ score, smethod = "LogRank", pmethod = "Lau92", minprop = 0.1,
  maxprop = 0.9)``: log-rank scores, the standardised linear rank statistic
  with its permutation variance at every cut between distinct scores that
  leaves ``min_share`` = 10% or more in each group, maximised; its value is
  the midpoint between the two adjacent distinct scores, as for Youden); or
  a number. The maximum of many tests is optimistic, so ``maxstat`` comes
  with a p value corrected for the search: Lausen & Schumacher's (1992)
  approximation (``Lau92``, the default), the Lau94 bound, the exact
  Gaussian-limit p (``exactGauss``) or a seeded Monte Carlo permutation test
  (``condMC``). The classic log-rank test of the resulting two groups is
  still reported (``logrank``) and is what it is: a test of the chosen
  split, not corrected for the search. Testing a cutoff on the patients it
  was chosen on inflates that test: every such result carries a line in
  ``warnings``.

Inputs are checked once by :func:`check_survival_data`: time numeric, finite
and >= 0; event 0/1 or boolean; rows missing time, event or another needed
column are dropped and counted (``n_dropped``). Bad input raises
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
import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning, StatisticalWarning
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import median_survival_times
from scipy import stats as _sps

from cmil_core.analysis import display
from cmil_core.analysis._checks import (
    FALSE_TEXTS,
    TRUE_TEXTS,
    as_text,
    complete_cases,
    list_values,
    numeric_column,
    require_columns,
)
from cmil_core.analysis._formatting import (
    fmt,
    fmt_ci,
    fmt_p,
    json_float,
    json_pair,
    p_text,
    text_table,
)
from cmil_core.analysis.proportional_hazards import format_zph, violations, zph_test
from cmil_core.analysis.stats import binary_labels, youden_cutoff
from cmil_core.analysis.time_auc import format_td_auc, td_auc
from cmil_core.errors import InputError

__all__ = [
    "CUTOFF_METHODS",
    "MAXSTAT_P_METHODS",
    "MaxstatTest",
    "RiskCutoff",
    "check_survival_data",
    "cox_analysis",
    "describe_cutoff",
    "format_cox",
    "format_survival",
    "kaplan_meier",
    "kaplan_meier_table",
    "logrank",
    "logrank_scores",
    "maxstat_p_method",
    "maxstat_test",
    "number_at_risk",
    "pairwise_logrank",
    "risk_cutoff",
    "risk_groups",
    "survival_analysis",
]

FloatArray = npt.NDArray[np.float64]
CUTOFF_METHODS = ("median", "youden", "maxstat")
_ALL = "all"  # the group name when no grouping is given
_T, _E = "__time__", "__event__"  # internal column names of checked data


# ----------------------------------------------------------------------------
# Input check, shared by every public function
# ----------------------------------------------------------------------------


def check_survival_data(
    frame: pd.DataFrame, time: str, event: str, columns: Sequence[str | None] = ()
) -> tuple[pd.DataFrame, int]:
    """Check survival columns once; return complete cases and the number dropped.

    The result holds ``__time__`` (float, finite, >= 0), ``__event__`` (int
    0/1) and the other ``columns`` unchanged, for rows where all of them are
    present. A None in ``columns`` (an optional column not asked for) is skipped.

    >>> df = pd.DataFrame({"t": [5.0, None, 3.0], "e": [1, 0, True]})
    >>> data, dropped = check_survival_data(df, "t", "e")
    >>> data["__event__"].tolist(), dropped
    ([1, 1], 1)
    """
    others = [c for c in dict.fromkeys(columns) if c is not None]
    require_columns(frame, [time, event, *others])
    if time == event:
        raise InputError(f"column {time!r} cannot be both the time and the event")
    for column in others:
        if column in (time, event):
            raise InputError(f"column {column!r} is already the time or the event column")
    clean, dropped = complete_cases(frame, [time, event, *others])
    if clean.empty:
        names = ", ".join(repr(c) for c in [time, event, *others])
        raise InputError(f"no rows left with values in all of the columns {names}")
    times = numeric_column(clean[time], time)
    if (times < 0).any():
        row = clean.index[int(np.argmax(times < 0))]
        raise InputError(f"row {row}, column {time!r}: time {times[times < 0][0]:g} is negative")
    data = clean[others].copy()
    data[_T] = times
    data[_E] = _event_values(clean[event], event)
    return data, dropped


def _event_values(series: pd.Series, column: str) -> npt.NDArray[np.int64]:
    texts = [as_text(v).lower() for v in series.tolist()]
    bad = [t for t in texts if t not in TRUE_TEXTS | FALSE_TEXTS]
    if bad:
        raise InputError(
            f"column {column!r}: events must be 0/1 or true/false; values are "
            f"{list_values(series.tolist())}"
        )
    return np.array([t in TRUE_TEXTS for t in texts], dtype=np.int64)


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
    return _km_fits(data[_T].to_numpy(), data[_E].to_numpy(), _group_texts(data, group))


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
    at = _nice_times(float(data[_T].max())) if times is None else [float(t) for t in times]
    labels = _group_texts(data, group)
    rows = {
        name: _at_risk_counts(data[_T].to_numpy()[labels == name], at)
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
    return _logrank(data[_T].to_numpy(), data[_E].to_numpy(), _group_texts(data, group), group)


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
    return _pairwise(data[_T].to_numpy(), data[_E].to_numpy(), _group_texts(data, group), group)


# ----------------------------------------------------------------------------
# Cox models
# ----------------------------------------------------------------------------


_S = "__stratum__"
# Newton-Raphson run to convergence as tight as R's coxph (lifelines' default
# precision 1e-7 leaves coefficients about 5e-6 away from R's on tied data).
_COX_FIT = {"precision": 1e-12, "r_precision": 1e-16, "step_size": 0.95, "max_steps": 500}


def _fit_cox(
    design: pd.DataFrame, times: FloatArray, events: npt.NDArray[np.int64],
    strata: npt.NDArray[np.object_] | None = None,
) -> tuple[CoxPHFitter | None, list[str]]:
    """Fit a Cox model (Efron ties); convergence trouble becomes notes, not exceptions.

    ``strata``: one stratum label per row (a baseline hazard of its own for
    each, as R's ``strata()``), or None.
    """
    frame = design.assign(**{_T: times, _E: events})
    extra: dict[str, Any] = {}
    if strata is not None:
        frame[_S] = strata
        extra["strata"] = [_S]
    notes: list[str] = []
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always", ConvergenceWarning)
        _warnings.simplefilter("always", StatisticalWarning)
        try:
            fitter = CoxPHFitter().fit(
                frame, duration_col=_T, event_col=_E, fit_options=_COX_FIT, **extra
            )
        except ConvergenceError as exc:
            fitter = None
            notes.append(f"Cox model did not converge: {_first_line(str(exc))}")
    for item in caught:
        if issubclass(item.category, (ConvergenceWarning, StatisticalWarning)):
            notes.append(f"Cox model: {_first_line(str(item.message))}")
        else:
            _warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return fitter, notes


def _first_line(text: str) -> str:
    return " ".join(text.strip().split("\n", 1)[0].split())


def _design(
    data: pd.DataFrame, covariates: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, str], dict[str, list[int]]]:
    """Numeric covariates as they are; text ones one-hot against a reference level.

    The reference of a categorical covariate is its first level in sorted
    text order (R's default factor coding); columns are named "name=level".
    Also returns the terms: covariate -> its design column positions.
    """
    columns: dict[str, FloatArray] = {}
    references: dict[str, str] = {}
    terms: dict[str, list[int]] = {}
    for name in covariates:
        series = data[name]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            values = numeric_column(series, name)
            if np.ptp(values) == 0:
                raise InputError(f"covariate {name!r} is constant ({values[0]:g}); drop it")
            terms[name] = [len(columns)]
            columns[name] = values
            continue
        texts = np.array([as_text(v) for v in series.tolist()], dtype=object)
        levels = sorted(set(texts.tolist()))
        if len(levels) < 2:
            raise InputError(f"covariate {name!r} has a single level {levels[0]!r}; drop it")
        references[name] = levels[0]
        terms[name] = list(range(len(columns), len(columns) + len(levels) - 1))
        for level in levels[1:]:
            columns[f"{name}={level}"] = (texts == level).astype(np.float64)
    return pd.DataFrame(columns, index=data.index), references, terms


def _coefficient_rows(
    fitter: CoxPHFitter, ph: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per coefficient; with ``ph`` (:func:`_ph_check`), each row's term's PH p."""
    summary = fitter.summary
    rows: list[dict[str, Any]] = []
    for name, row in summary.iterrows():
        rows.append(
            {
                "name": str(name),
                "coef": json_float(row["coef"]),
                "se": json_float(row["se(coef)"]),
                "hr": json_float(row["exp(coef)"]),
                "ci": json_pair([row["exp(coef) lower 95%"], row["exp(coef) upper 95%"]]),
                "p": json_float(row["p"]),
            }
        )
    if ph is not None:
        by_term = {t["term"]: t for t in ph["tests"]}
        for row in rows:
            term = by_term.get(row["name"]) or by_term.get(row["name"].split("=", 1)[0])
            row["ph_p"] = None if term is None else term["p"]
    return rows


def cox_analysis(
    frame: pd.DataFrame, time: str, event: str, covariates: list[str],
    strata: str | None = None,
) -> dict[str, Any]:
    """Cox proportional-hazards model, univariable or multivariable, JSON-ready.

    Like R ``coxph(Surv(time, event) ~ a + b, ties = "efron")`` (coef,
    SE, Wald p and CI; ``concordance`` is ``summary(fit)$concordance[1]``),
    converged as tightly as R (checked live in tests/test_r_live.py). Text
    covariates are one-hot encoded against their first sorted level, stated in
    ``references``. ``strata``: a column whose every value gets a baseline
    hazard of its own, the coefficients being shared, as R's ``coxph(... +
    strata(center))``; rows missing it are dropped like other incomplete
    rows; concordance is then counted within strata (as R). Keys: n, events,
    concordance (Harrell's C), coefficients [{name, coef, se, hr, ci, p}],
    references, n_dropped, warnings, and ``strata`` ({"column", "levels":
    [{"level", "n", "events"}]}) when stratified.

    >>> from lifelines.datasets import load_rossi
    >>> r = cox_analysis(load_rossi(), "week", "arrest", ["fin", "age", "prio"])
    >>> r["n"], r["events"]
    (432, 114)
    """
    if isinstance(covariates, str):
        covariates = [covariates]
    if not covariates:
        raise InputError("no covariates given")
    if strata is not None and strata in covariates:
        raise InputError(f"column {strata!r} cannot be both a covariate and the strata")
    data, dropped = check_survival_data(frame, time, event, [*covariates, strata])
    if data[_E].sum() == 0:
        raise InputError(f"column {event!r} has no events; a Cox model needs at least one")
    design, references, terms = _design(data, covariates)
    layers = None
    described: dict[str, Any] = {}
    if strata is not None:
        layers = np.array([as_text(v) for v in data[strata].tolist()], dtype=object)
        levels = sorted(set(layers.tolist()))
        described = {"strata": {"column": strata, "levels": [
            {"level": level, "n": int((layers == level).sum()),
             "events": int(data[_E].to_numpy()[layers == level].sum())} for level in levels]}}
    fitter, notes = _fit_cox(design, data[_T].to_numpy(), data[_E].to_numpy(), layers)
    if fitter is None:
        raise InputError(notes[0])
    warnings = ([f"{dropped} rows with missing values dropped"] if dropped else []) + notes
    ph = _ph_check(fitter, design, data[_T].to_numpy(), data[_E].to_numpy(), terms, layers)
    return {
        **described,
        "n": len(data),
        "events": int(data[_E].sum()),
        "concordance": json_float(fitter.concordance_index_),
        "coefficients": _coefficient_rows(fitter, ph),
        "references": references,
        "ph_test": ph,
        "n_dropped": dropped,
        "warnings": warnings + violations(ph),
    }


def _ph_check(
    fitter: CoxPHFitter, design: pd.DataFrame, times: FloatArray,
    events: npt.NDArray[np.int64], terms: dict[str, list[int]],
    strata: npt.NDArray[np.object_] | None = None,
) -> dict[str, Any] | None:
    """R's ``cox.zph(fit)`` of a fitted model (None where it cannot be computed)."""
    beta = fitter.params_.reindex(design.columns).to_numpy(dtype=np.float64)
    try:
        return zph_test(times, events, design.to_numpy(dtype=np.float64), beta, terms, strata)
    except InputError:
        return None


def _two_group_cox(
    times: FloatArray,
    events: npt.NDArray[np.int64],
    groups: npt.NDArray[np.object_],
    reference: str,
) -> tuple[dict[str, Any], list[str]]:
    other = next(g for g in sorted(set(groups.tolist())) if g != reference)
    empty = {"reference": reference, "group": other, "hr": None, "ci": None, "p": None,
             "ph_test": None}
    silent = [g for g in (reference, other) if events[groups == g].sum() == 0]
    if silent:
        return empty, [f"group {silent[0]!r} has no events: hazard ratio not estimable"]
    design = pd.DataFrame({other: (groups == other).astype(np.float64)})
    fitter, notes = _fit_cox(design, times, events)
    if fitter is None:
        return empty, notes
    ph = _ph_check(fitter, design, times, events, {other: [0]})
    row = _coefficient_rows(fitter)[0]
    return {**empty, "hr": row["hr"], "ci": row["ci"], "p": row["p"], "ph_test": ph}, [
        *notes, *(w.replace(f"covariate {other!r}", f"the HR {other} vs {reference}")
                  for w in violations(ph)[:1])]


# ----------------------------------------------------------------------------
# Risk-group cutoffs
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskCutoff:
    """A risk-group cutoff: ``score >= value`` is "high".

    ``n`` is the number of training patients it was chosen on (None for a
    given number). For ``maxstat`` only: ``statistic`` (maxstat's M, the
    largest standardised log-rank score statistic), ``p`` (corrected for the
    search, by ``p_method``), ``cutpoint`` (R's "estimated cutpoint": the
    largest score of the low group, ``score <= cutpoint`` is low), ``n_low``,
    ``n_high``, ``min_share`` and ``max_share`` (R's minprop and maxprop).
    ``value`` is the midpoint between ``cutpoint`` and the next distinct
    score, as for Youden: the same patients fall on each side.
    """

    method: str
    value: float
    n: int | None = None
    statistic: float | None = None
    p: float | None = None
    p_method: str | None = None
    cutpoint: float | None = None
    n_low: int | None = None
    n_high: int | None = None
    min_share: float | None = None
    max_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "value": json_float(self.value),
            "n": self.n,
            "statistic": json_float(self.statistic),
            "p_corrected": json_float(self.p),
            "p_method": self.p_method,
        }
        if self.method == "maxstat":
            out.update({
                "statistic_name": MAXSTAT_STATISTIC,
                "cutpoint": json_float(self.cutpoint),
                "n_low": self.n_low,
                "n_high": self.n_high,
                "min_share": self.min_share,
                "max_share": self.max_share,
                "p_method_name": MAXSTAT_P_METHODS[self.p_method or "Lau92"],
                "r_call": (
                    "maxstat.test(Surv(time, event) ~ score, smethod = \"LogRank\", "
                    f"pmethod = \"{self.p_method}\", minprop = {self.min_share:g}, "
                    f"maxprop = {self.max_share:g})"
                ),
            })
        return out


def risk_groups(scores: npt.ArrayLike, cutoff: float) -> npt.NDArray[np.object_]:
    """"high" where score >= cutoff, else "low".

    >>> risk_groups([0.2, 0.5, 0.7], 0.5).tolist()
    ['low', 'high', 'high']
    """
    values = np.asarray(scores, dtype=np.float64)
    return np.where(values >= float(cutoff), "high", "low").astype(object)


def describe_cutoff(cutoff: dict[str, Any] | None) -> str:
    """One line saying how a cutoff was chosen, for pages, reports and the terminal.

    For ``maxstat`` it names the statistic, the cut, the group sizes and the
    search-corrected p with its method, so that it is not mistaken for the
    classic log-rank test of the chosen groups.

    >>> describe_cutoff({"method": "median", "value": 0.5})
    'score >= 0.500 is high (median cutoff)'
    """
    if cutoff is None:
        return ""
    text = f"score >= {display.cutoff(cutoff['value'])} is high ({cutoff['method']} cutoff)"
    if cutoff.get("method") != "maxstat" or cutoff.get("statistic") is None:
        return text
    return (
        f"score >= {display.cutoff(cutoff['value'])} is high (maxstat cutoff: low group score "
        f"<= {display.cutoff(cutoff['cutpoint'])}, "
        f"{cutoff['n_low']} low / {cutoff['n_high']} high; "
        f"maximally selected log-rank statistic M = {cutoff['statistic']:.3f}, search-corrected "
        f"p = {cutoff['p_corrected']:.2g} by {cutoff['p_method']} "
        f"({cutoff.get('p_method_name', '')}), groups of at least "
        f"{cutoff.get('min_share', 0.1):.0%})"
    )


#: What maxstat's M is, in words (the ``statistic_name`` of a maxstat cutoff).
MAXSTAT_STATISTIC = (
    "maxstat M: largest |standardised linear rank statistic| with log-rank scores over the "
    "allowed cuts (Hothorn and Lausen 2003; R maxstat smethod = \"LogRank\")"
)
#: p value methods of maxstat, by R maxstat's ``pmethod`` name.
MAXSTAT_P_METHODS = {
    "Lau92": "Lausen and Schumacher 1992 approximation",
    "Lau94": "Lausen, Sauerbrei and Schumacher 1994 improved Bonferroni bound",
    "exactGauss": "exact for the limiting Gaussian process of the statistics",
    "condMC": "seeded Monte Carlo permutation test of the whole search",
}
_P_ALIASES = {"lau92": "Lau92", "lausen92": "Lau92", "lau94": "Lau94", "lausen94": "Lau94",
              "exactgauss": "exactGauss", "exact_gauss": "exactGauss", "exact": "exactGauss",
              "condmc": "condMC", "permutation": "condMC"}


def maxstat_p_method(name: str) -> str:
    """R maxstat's name of a p method ("Lau92", "Lau94", "exactGauss", "condMC").

    Also accepts lower-case spellings, "lausen92", "lausen94", "exact" and
    "permutation"; anything else is an InputError.
    """
    key = str(name).strip().lower()
    if key not in _P_ALIASES:
        choices = ", ".join(MAXSTAT_P_METHODS)
        raise InputError(f"maxstat p method {name!r} is not one of {choices}")
    return _P_ALIASES[key]


def logrank_scores(times: npt.ArrayLike, events: npt.ArrayLike) -> FloatArray:
    """Log-rank (Savage) scores of right-censored times, as R maxstat uses them.

    a_i = delta_i - sum_{j: t_j <= t_i} delta_j / (N - r_j + 1), where r_j is
    the rank of t_j with ties given the largest rank. This is exactly
    ``exactRankTests::cscores(Surv(time, event), type = "LogRank")``, which
    ``maxstat.test(..., smethod = "LogRank")`` calls; note its handling of
    tied times (each tied death counts 1 / (patients at risk after the tied
    block + 1)), which differs slightly from survdiff's d / n at risk.
    The scores sum to zero when the largest time is an event.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=np.float64)
    n = t.size
    order = np.argsort(t, kind="mergesort")
    rank = np.searchsorted(t[order], t, side="right")  # ties: the largest rank (irank)
    cumulative = np.cumsum((e / (n - rank + 1.0))[order])
    scores: FloatArray = e - cumulative[rank - 1]
    return scores


@dataclass(frozen=True)
class MaxstatTest:
    """The maximally selected log-rank statistic of :func:`maxstat_test`.

    ``cuts``: the allowed cutpoints (R's ``$cuts``: low group ``score <=
    cut``), ``stats``: |standardised statistic| at each (R's ``$stats``),
    ``m``: the low group's size at each; ``statistic`` = max(stats) (R's
    ``M``), ``cutpoint`` the first cut reaching it (R's ``$estimate``),
    ``p`` by ``p_method`` (R's ``$p.value``).
    """

    statistic: float
    cutpoint: float
    value: float
    n: int
    n_low: int
    cuts: FloatArray
    stats: FloatArray
    m: npt.NDArray[np.int64]
    p: float
    p_method: str
    min_share: float
    max_share: float


def maxstat_test(
    times: npt.ArrayLike,
    events: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    min_share: float = 0.1,
    max_share: float | None = None,
    p_method: str = "Lau92",
    n_perm: int = 10_000,
    seed: int = 0,
    column: str = "score",
) -> MaxstatTest:
    """Maximally selected log-rank statistic (Hothorn and Lausen 2003), as R maxstat.

    Equals R ``maxstat.test(Surv(time, event) ~ score, smethod = "LogRank",
    pmethod = p_method, minprop = min_share, maxprop = max_share)`` (maxstat
    0.7; ``max_share`` defaults to ``1 - min_share``):

    - log-rank scores a_i of :func:`logrank_scores`;
    - for a cut leaving the m lowest scores in the low group (cuts at
      distinct score values), the linear statistic S_m = sum of a over the
      low group, its permutation mean E_m = m/N sum(a) and variance V_m =
      m (N - m) / (N^2 (N - 1)) (N sum(a^2) - sum(a)^2); Z_m = (S_m - E_m) /
      sqrt(V_m);
    - allowed cuts: floor(N min_share) <= m <= floor(N max_share) (and m >=
      1), as R counts them; M = max |Z_m|, the cut the first maximum.

    p values (``p_method``, R's names): "Lau92" (Lausen and Schumacher
    1992, R ``pLausen92``), "Lau94" (Lausen, Sauerbrei and Schumacher 1994,
    R ``pLausen94`` over the actual cuts), "exactGauss" (P(max |Z| >= M) for
    the Gaussian limit of the Z_m, R ``pexactgauss``; R integrates it with
    ``mvtnorm::pmvnorm`` (Genz, random, error about 1e-3 at its defaults),
    here exactly up to a fine grid, using the fact that corr(Z_i, Z_j) =
    sqrt(m_i (N - m_j) / (m_j (N - m_i))) makes Z a Markov chain) or
    "condMC" (the conditional Monte Carlo permutation test, R's ``pmaxperm``
    with ``B = n_perm``; seeded with ``seed`` here, so it agrees with R only
    within Monte Carlo error; (1 + k) / (1 + B) rather than R's k / B, so
    never 0). The bounds are capped at 1 (R's can exceed it).

    Unlike the square root of survdiff's chi-square for each split (what
    this function computed before issue 19), M uses the permutation variance
    of the scores, for which the Lausen bounds were derived.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events, dtype=np.float64)
    x = np.asarray(scores, dtype=np.float64)
    upper = 1.0 - min_share if max_share is None else float(max_share)
    if not 0.0 < min_share < upper < 1.0:
        raise InputError(
            f"group shares min {min_share!r} and max {upper!r} must satisfy 0 < min < max < 1"
        )
    method = maxstat_p_method(p_method)
    n = x.size
    a = logrank_scores(t, e)
    order = np.argsort(x, kind="mergesort")
    xs, ys = x[order], a[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    m = np.flatnonzero(new)  # low-group sizes (R: which(!ties) - 1); m = 0 dropped below
    lowest, highest = max(1, math.floor(n * min_share)), math.floor(n * upper)
    m = m[(m >= lowest) & (m <= highest)]
    if m.size == 0:
        raise InputError(
            f"column {column!r}: no cutoff leaves {min_share:.0%} of the {n} patients "
            "in each group"
        )
    total, squares = float(ys.sum()), float((ys * ys).sum())
    mean = m / n * total
    var = m * (n - m) / (n * n * (n - 1.0)) * (n * squares - total * total)
    if not (var > 0).all():
        raise InputError("no events: the maxstat statistic needs at least one")
    stats = np.abs((np.cumsum(ys)[m - 1] - mean) / np.sqrt(var))
    best = int(np.argmax(stats))
    b = float(stats[best])
    if method == "Lau92":
        p = _lausen92_p(b, min_share, upper)
    elif method == "Lau94":
        p = _lausen94_p(b, n, m)
    elif method == "exactGauss":
        p = _exact_gauss_p(b, n, m)
    else:
        p = _permutation_p(b, ys, m, mean, var, n_perm, seed)
    cutpoint = float(xs[m[best] - 1])
    return MaxstatTest(
        statistic=b, cutpoint=cutpoint, value=(cutpoint + float(xs[m[best]])) / 2.0, n=n,
        n_low=int(m[best]), cuts=xs[m - 1], stats=stats, m=m.astype(np.int64), p=p,
        p_method=method, min_share=float(min_share), max_share=upper,
    )


def _lausen92_p(b: float, min_share: float, max_share: float | None = None) -> float:
    """Lausen & Schumacher (1992) bound on P(max |Z| >= b) over splits in [e1, e2].

    p = 4 phi(b) / b + phi(b) (b - 1/b) log(e2 (1 - e1) / ((1 - e2) e1)), as R
    maxstat's ``pLausen92(b, minprop = e1, maxprop = e2)`` (1 when b < 1),
    here also capped at 1.
    """
    if b < 1.0:
        return 1.0
    phi = float(_sps.norm.pdf(b))
    eps1 = min_share
    eps2 = 1.0 - min_share if max_share is None else max_share
    p = 4.0 * phi / b + phi * (b - 1.0 / b) * math.log(eps2 * (1.0 - eps1) / ((1.0 - eps2) * eps1))
    return min(max(p, 0.0), 1.0)


def _lausen94_p(b: float, n: int, m: npt.NDArray[np.intp]) -> float:
    """R maxstat's ``pLausen94(b, N, m = m)``: improved Bonferroni over the actual cuts."""
    d = 0.0
    if m.size > 1:
        m1, m2 = m[:-1].astype(float), m[1:].astype(float)
        t = np.sqrt(1.0 - m1 * (n - m2) / ((n - m1) * m2))
        d = float(np.sum(np.exp(-b * b / 2.0) / math.pi * (t - (b * b / 4.0 - 1.0) * t**3 / 6.0)))
    p = 2.0 * float(_sps.norm.sf(b)) + d
    return min(max(p, 0.0), 1.0)


def _exact_gauss_p(b: float, n: int, m: npt.NDArray[np.intp]) -> float:
    """P(max_k |Z_k| >= b) for the Gaussian limit, by its Markov property.

    Z_{k+1} = rho_k Z_k + sqrt(1 - rho_k^2) e, rho_k = sqrt(m_k (N - m_{k+1}) /
    (m_{k+1} (N - m_k))). The mass inside [-b, b] is carried on a grid of
    cells, each taken as uniform within the cell (transition masses in
    closed form with G(u) = u Phi(u) + phi(u), the integral of Phi); the
    error is O(h^2) in the cell width h, removed by Richardson extrapolation
    from h and 2h (agrees with ``pmvnorm(..., algorithm = Miwa())`` to about
    1e-8).
    """
    if m.size == 1:
        return min(1.0, 2.0 * float(_sps.norm.sf(b)))
    mf = m.astype(np.float64)
    rho = np.sqrt(mf[:-1] * (n - mf[1:]) / (mf[1:] * (n - mf[:-1])))
    cells = 2 * max(50, math.ceil(2.0 * b / 0.02) // 2)
    fine, coarse = _inside_mass(b, rho, cells), _inside_mass(b, rho, cells // 2)
    inside = (4.0 * fine - coarse) / 3.0
    return float(min(max(1.0 - inside, 0.0), 1.0))


def _inside_mass(b: float, rho: FloatArray, cells: int) -> float:
    """P(|Z_k| <= b for all k) on a grid of ``cells`` uniform cells over [-b, b]."""
    edges = np.linspace(-b, b, cells + 1)
    width = edges[1] - edges[0]
    mass = np.diff(_sps.norm.cdf(edges))
    for r in rho:
        sd = math.sqrt(max(1.0 - r * r, 1e-300))
        u = (edges[None, :] - r * edges[:, None]) / sd
        g = u * _sps.norm.cdf(u) + _sps.norm.pdf(u)  # G at edge j (destination), i (source)
        mean_cdf = (g[:-1, :] - g[1:, :]) * sd / (r * width)  # mean over source cell i
        mass = mass @ np.diff(mean_cdf, axis=1)
    return float(mass.sum())


def _permutation_p(
    b: float, ys: FloatArray, m: npt.NDArray[np.intp], mean: FloatArray, var: FloatArray,
    n_perm: int, seed: int,
) -> float:
    """Monte Carlo permutation p of M (R maxstat's condMC), seeded; (1 + k) / (1 + B)."""
    if n_perm < 1:
        raise InputError(f"the number of permutations must be positive; got {n_perm}")
    rng = np.random.default_rng(seed)
    sd = np.sqrt(var)
    exceed, done, chunk = 0, 0, max(1, 2_000_000 // max(ys.size, 1))
    while done < n_perm:
        k = min(chunk, n_perm - done)
        shuffled = ys[rng.permuted(np.tile(np.arange(ys.size), (k, 1)), axis=1)]
        z = np.abs((np.cumsum(shuffled, axis=1)[:, m - 1] - mean) / sd).max(axis=1)
        exceed += int((z >= b * (1.0 - 1e-12)).sum())
        done += k
    return (1.0 + exceed) / (1.0 + n_perm)


def risk_cutoff(
    train: pd.DataFrame,
    score: str,
    method: str | float,
    *,
    time: str | None = None,
    event: str | None = None,
    label: str | None = None,
    positive: object | None = None,
    min_share: float = 0.1,
    p_method: str = "Lau92",
    n_perm: int = 10_000,
    seed: int = 0,
) -> RiskCutoff:
    """Choose a risk-group cutoff on a training frame (``score >= value`` is high).

    ``method``: "median"; "youden" (needs ``label``, 0/1 unless ``positive``
    is given); "maxstat" (needs ``time`` and ``event``: :func:`maxstat_test`, R
    ``maxstat.test(Surv(time, event) ~ score, smethod = "LogRank", pmethod =
    p_method, minprop = min_share, maxprop = 1 - min_share)``; ``p_method``
    one of :data:`MAXSTAT_P_METHODS`, "condMC" with ``n_perm`` seeded
    permutations); or a number (or numeric text), used as it is. "median"
    is R ``median(score)``; "youden" is pROC ``coords(roc(label, score),
    "best", best.method = "youden")``.

    >>> df = pd.DataFrame({"s": [0.1, 0.2, 0.3, 0.4]})
    >>> risk_cutoff(df, "s", "median").value
    0.25
    """
    fixed = _as_number(method)
    if fixed is not None:
        return RiskCutoff("fixed", fixed)
    method = str(method).strip().lower()
    if method not in CUTOFF_METHODS:
        choices = ", ".join(CUTOFF_METHODS)
        raise InputError(f"cutoff {method!r} is not a number nor one of {choices}")
    if method == "median":
        clean, _ = complete_cases(_checked(train, [score]), [score])
        values = numeric_column(clean[score], score)
        return RiskCutoff("median", float(np.median(values)), values.size)
    if method == "youden":
        if label is None:
            raise InputError("the youden cutoff needs a label column")
        clean, _ = complete_cases(_checked(train, [score, label]), [score, label])
        y = binary_labels(clean[label], label, positive)
        values = numeric_column(clean[score], score)
        return RiskCutoff("youden", youden_cutoff(y, values), values.size)
    if time is None or event is None:
        raise InputError("the maxstat cutoff needs time and event columns")
    if not 0.0 < min_share < 0.5:
        raise InputError(f"minimum group share {min_share!r} must lie strictly between 0 and 0.5")
    p_method = maxstat_p_method(p_method)
    data, _ = check_survival_data(train, time, event, [score])
    values = numeric_column(data[score], score)
    test = maxstat_test(
        data[_T].to_numpy(), data[_E].to_numpy(), values, min_share=min_share,
        p_method=p_method, n_perm=int(n_perm), seed=seed, column=score,
    )
    return RiskCutoff(
        "maxstat", test.value, test.n, test.statistic, test.p, test.p_method,
        cutpoint=test.cutpoint, n_low=test.n_low, n_high=test.n - test.n_low,
        min_share=test.min_share, max_share=test.max_share,
    )


def _checked(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    require_columns(frame, columns)
    return frame


def _as_number(value: object) -> float | None:
    """A finite number from a number or numeric text, else None (a method name)."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(number):
        raise InputError(f"cutoff {value!r} is not a finite number")
    return number


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
    :class:`RiskCutoff`), groups [{group, n, events, median, median_ci}],
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
    times, events = data[_T].to_numpy(), data[_E].to_numpy()
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
        cox, cox_notes = _two_group_cox(times, events, labels, reference)
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


def format_cox(result: dict[str, Any]) -> str:
    """Render a ``cox_analysis`` result as fixed-width text for a terminal."""
    rows = [
        [c["name"], fmt(c["coef"], 4), fmt_ci(c["hr"], c["ci"], 3), fmt_p(c["p"]),
         fmt_p(c.get("ph_p"))]
        for c in result["coefficients"]
    ]
    head = (
        f"Cox model (Efron ties): n = {result['n']}, events = {result['events']}, "
        f"concordance = {fmt(result['concordance'])}"
    )
    parts = [head, text_table(["covariate", "coef", "HR [95% CI]", "p", "PH p"], rows)]
    if result.get("ph_test"):
        parts.append(format_zph(result["ph_test"]))
    parts += [f"reference of {k!r}: {v!r}" for k, v in result.get("references", {}).items()]
    parts += [f"note: {w}" for w in result.get("warnings", [])]
    return "\n".join(parts)
