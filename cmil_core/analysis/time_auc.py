"""Time-dependent AUC of a risk score for censored survival (cumulative/dynamic, IPCW).

What is computed
----------------
At a time t, *cases* are the patients who had the event by t (time <= t,
event), *controls* those still event-free after t (time > t). The
cumulative/dynamic AUC(t) is the probability that a case has a higher score
than a control (a tie counts one half). Patients censored before t are
neither; to keep the estimate unbiased, every case i is weighted by the
inverse probability of having stayed uncensored until its time,
w_i = 1 / G(t_i), G being the Kaplan-Meier estimate of the *censoring*
distribution (Uno et al. 2007; Hung and Chiang 2010)::

    AUC(t) = sum_cases w_i sum_controls [I(s_i > s_j) + 1/2 I(s_i = s_j)]
             / (sum_cases w_i * n_controls)

The mean AUC over the chosen times weights each AUC(t_k) by the drop of the
Kaplan-Meier survival S between t_{k-1} and t_k, over 1 - S(t_last)
(Lambert and Chevret 2014).

This is scikit-survival's ``cumulative_dynamic_auc(survival_train,
survival_test, estimate, times)`` with the censoring distribution estimated
on the same patients (``survival_train = survival_test``), written out so
that scikit-survival is not a runtime dependency; ``tests/test_time_auc.py``
checks it against scikit-survival 0.28 to 1e-10. Conventions taken from it:
G is evaluated at the case's own time (censorings tied with a death count
as after it), and times must lie in [min time, max time). scikit-survival
counts scores within 1e-8 of each other as tied; this module only exact
equality.

A higher score must mean a higher risk (the cMIL score: more likely
metastatic, expected to die sooner). Times without any case or control have
no AUC (None) and are said so in ``notes``.

>>> import numpy as np
>>> t = np.array([2.0, 4, 6, 8, 10, 12]); e = np.array([1, 1, 0, 1, 1, 0])
>>> s = np.array([0.9, 0.8, 0.3, 0.4, 0.2, 0.1])
>>> td_auc(t, e, s, [5, 9])["auc"]
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.analysis._formatting import fmt, json_float
from cmil_core.errors import InputError

__all__ = ["cumulative_dynamic_auc", "format_td_auc", "td_auc"]

FloatArray = npt.NDArray[np.float64]


def _censoring_km(
    times: FloatArray, events: npt.NDArray[np.bool_]
) -> tuple[FloatArray, FloatArray]:
    """(unique times, G) of the censoring distribution; deaths leave the risk set first."""
    if events.all():
        return np.unique(times), np.ones(np.unique(times).size)
    uniq, inverse = np.unique(times, return_inverse=True)
    total = np.bincount(inverse)
    deaths = np.bincount(inverse, weights=events.astype(np.float64))
    at_risk = times.size - np.r_[0, np.cumsum(total)[:-1]]
    censored = total - deaths
    ratio = np.divide(censored, at_risk - deaths, out=np.zeros(uniq.size),
                      where=censored != 0)
    return np.r_[-np.inf, uniq], np.r_[1.0, np.cumprod(1.0 - ratio)]


def _step(grid: FloatArray, values: FloatArray, at: FloatArray) -> FloatArray:
    """A right-continuous step function (value at the last grid point <= t)."""
    return values[np.searchsorted(grid, at, side="right") - 1]


def _km(times: FloatArray, events: npt.NDArray[np.bool_]) -> tuple[FloatArray, FloatArray]:
    uniq, inverse = np.unique(times, return_inverse=True)
    deaths = np.bincount(inverse, weights=events.astype(np.float64))
    at_risk = times.size - np.r_[0, np.cumsum(np.bincount(inverse))[:-1]]
    return np.r_[-np.inf, uniq], np.r_[1.0, np.cumprod(1.0 - deaths / at_risk)]


def cumulative_dynamic_auc(
    times: npt.ArrayLike, events: npt.ArrayLike, scores: npt.ArrayLike, at: Sequence[float]
) -> tuple[FloatArray, float]:
    """AUC(t) at each time of ``at`` (sorted, unique) and their mean; NaN where undefined.

    Arrays as scikit-survival's ``cumulative_dynamic_auc`` with the censoring
    distribution from the same patients; ``at`` must lie in [min, max) of the
    times (InputError otherwise).
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if not (t.ndim == e.ndim == s.ndim == 1 and t.size == e.size == s.size and t.size > 0):
        raise InputError("times, events and scores must be three 1-D arrays of the same length")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(s))):
        raise InputError("times and scores must be finite")
    grid = np.unique(np.asarray(at, dtype=np.float64))
    if grid.size == 0 or grid.max() >= t.max() or grid.min() < t.min():
        raise InputError(f"time-dependent AUC times must lie within the follow-up "
                         f"[{t.min():g}, {t.max():g})")
    g_grid, g_values = _censoring_km(t, e)
    g_at_cases = _step(g_grid, g_values, t[e])
    if np.any(g_at_cases == 0.0):
        raise InputError("the censoring distribution is zero at an event time: no IPCW AUC")
    weights = np.zeros(t.size)
    weights[e] = 1.0 / g_at_cases
    aucs = np.full(grid.size, np.nan)
    for k, when in enumerate(grid):
        cases = (t <= when) & e
        controls = np.sort(s[t > when])
        if not cases.any() or controls.size == 0:
            continue
        below = np.searchsorted(controls, s[cases], side="left")
        tied = np.searchsorted(controls, s[cases], side="right") - below
        w = weights[cases]
        aucs[k] = float((w * (below + 0.5 * tied)).sum() / (w.sum() * controls.size))
    if grid.size == 1:
        return aucs, float(aucs[0])
    s_grid, s_values = _km(t, e)
    surv = _step(s_grid, s_values, grid)
    drop = -np.diff(np.r_[1.0, surv])
    return aucs, float((aucs * drop).sum() / (1.0 - surv[-1]))


def td_auc(
    times: npt.ArrayLike, events: npt.ArrayLike, scores: npt.ArrayLike, at: Sequence[float]
) -> dict[str, Any]:
    """JSON-ready time-dependent AUC of a score at the times ``at``.

    Times outside [min, max) of the follow-up, or without cases or controls,
    get ``auc`` None and a line in ``notes``; the mean is over the others.
    Keys: times, auc, cases, controls, mean_auc, method, notes.
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    wanted = sorted({float(x) for x in at})
    notes: list[str] = []
    usable = []
    for when in wanted:
        cases, controls = int(((t <= when) & e).sum()), int((t > when).sum())
        if t.size == 0 or when < t.min():
            notes.append(f"t = {when:g}: before the earliest follow-up time, no AUC")
        elif when >= t.max():
            notes.append(f"t = {when:g}: at or after the last follow-up time, no AUC")
        elif cases == 0 or controls == 0:
            notes.append(f"t = {when:g}: no {'cases' if cases == 0 else 'controls'}, no AUC")
        else:
            usable.append(when)
    by_time: dict[float, float] = {}
    mean = None
    if usable:
        aucs, mean_value = cumulative_dynamic_auc(t, e, s, usable)
        by_time = dict(zip(usable, aucs.tolist(), strict=True))
        mean = json_float(mean_value)
    return {
        "times": wanted,
        "auc": [json_float(by_time.get(w)) if w in by_time else None for w in wanted],
        "cases": [int(((t <= w) & e).sum()) for w in wanted],
        "controls": [int((t > w).sum()) for w in wanted],
        "mean_auc": mean,
        "method": "cumulative/dynamic AUC, IPCW (Uno 2007; scikit-survival "
                  "cumulative_dynamic_auc)",
        "notes": notes,
    }


def format_td_auc(result: dict[str, Any] | None, score: str = "score") -> str:
    """"Time-dependent AUC of score: t = 12: 0.812 (30 cases / 80 controls); ...; mean 0.80"."""
    if not result:
        return ""
    cells = [f"t = {w:g}: {fmt(a)} ({c} cases / {n} controls)"
             for w, a, c, n in zip(result["times"], result["auc"], result["cases"],
                                   result["controls"], strict=True)]
    mean = "" if result["mean_auc"] is None else f"; mean {fmt(result['mean_auc'])}"
    return f"Time-dependent AUC of {score} (cumulative/dynamic, IPCW): " + "; ".join(cells) + mean
