"""Cox proportional-hazards models, as R's ``coxph``.

Hazard h(t | x) = h0(t) exp(x' beta), Efron's handling of tied times
(lifelines' and R's default), Newton-Raphson converged as tightly as R;
HR = exp(beta) with Wald 95% intervals and p values; Harrell's concordance
C. Text covariates are one-hot encoded against their first sorted level
(R's default factor coding); ``strata`` gives each stratum a baseline hazard
of its own. Every fit carries R's ``cox.zph`` proportional-hazards test
(:mod:`cmil_core.analysis.proportional_hazards`). Convergence trouble
becomes a line in ``warnings``, never a traceback; a group without events
has no estimable hazard ratio (None, with a warning).

Inputs are checked by :func:`~cmil_core.analysis.survival_data.check_survival_data`.
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError, ConvergenceWarning, StatisticalWarning

from cmil_core.analysis._checks import as_text, numeric_column
from cmil_core.analysis._formatting import fmt, fmt_ci, fmt_p, json_float, json_pair, text_table
from cmil_core.analysis.proportional_hazards import format_zph, violations, zph_test
from cmil_core.analysis.survival_data import EVENT, TIME, check_survival_data
from cmil_core.errors import InputError

__all__ = ["cox_analysis", "format_cox", "two_group_cox"]

FloatArray = npt.NDArray[np.float64]
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
    frame = design.assign(**{TIME: times, EVENT: events})
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
                frame, duration_col=TIME, event_col=EVENT, fit_options=_COX_FIT, **extra
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
    if data[EVENT].sum() == 0:
        raise InputError(f"column {event!r} has no events; a Cox model needs at least one")
    design, references, terms = _design(data, covariates)
    layers = None
    described: dict[str, Any] = {}
    if strata is not None:
        layers = np.array([as_text(v) for v in data[strata].tolist()], dtype=object)
        levels = sorted(set(layers.tolist()))
        described = {"strata": {"column": strata, "levels": [
            {"level": level, "n": int((layers == level).sum()),
             "events": int(data[EVENT].to_numpy()[layers == level].sum())} for level in levels]}}
    fitter, notes = _fit_cox(design, data[TIME].to_numpy(), data[EVENT].to_numpy(), layers)
    if fitter is None:
        raise InputError(notes[0])
    warnings = ([f"{dropped} rows with missing values dropped"] if dropped else []) + notes
    ph = _ph_check(fitter, design, data[TIME].to_numpy(), data[EVENT].to_numpy(), terms, layers)
    return {
        **described,
        "n": len(data),
        "events": int(data[EVENT].sum()),
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


def two_group_cox(
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
