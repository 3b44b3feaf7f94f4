"""The proportional-hazards check of a Cox model: R's ``cox.zph`` score test.

What is tested
--------------
A Cox model assumes each hazard ratio is constant in time. Grambsch and
Therneau (1994) test this by letting every coefficient drift with a function
g(t) of time, beta_j(t) = beta_j + theta_j g(t), and asking whether theta = 0.
This module computes the test exactly as R's survival package (3.0 and
later) does in ``cox.zph(fit, transform = "km", terms = TRUE)``: a *score*
test of theta = 0 in the Cox model with the covariates X and X * g(t),
evaluated at (beta_hat, 0):

- score U_theta = sum over deaths of g(t_i) (x_i - xbar(t_i)), the
  time-weighted sum of Schoenfeld residuals, with Efron's handling of tied
  deaths (as the model was fitted);
- the full 2p x 2p information of (beta, theta) at that point, summed over
  death times: [[V, gV], [gV, g^2 V]] with V the (Efron) weighted covariance
  of x in the risk set;
- per term (a numeric covariate, or all the dummy columns of a text
  covariate together, as ``terms = TRUE``): chi2 = u' I^-1 u with u = (0,
  U_theta of the term) over the rows/columns of all p betas and the term's
  thetas, df = the term's number of columns; ``GLOBAL``: all thetas at once,
  df = p. Like R, the beta part of the score is taken as exactly 0 (the fit
  converged).

g(t) (``transform``): ``"km"`` (R's default) is 1 - S(t-), the left-continuous
Kaplan-Meier estimate of all patients pooled (strata ignored), so the test
is not driven by a few late times; ``"rank"``, ``"identity"`` and ``"log"``
as in R. g is centred at its mean over deaths (numerics only: the score test
does not change). With strata, risk sets are within strata, as the model.

Not lifelines' ``proportional_hazard_test``: that is the older (R < 3.0)
test, which approximates the information by the average covariance and so
gives other numbers. This one matches R to 1e-6 (``tests/test_r_live.py``,
and stored R values in ``tests/data/reference/``).

A p value below 0.05 is a warning that the hazard ratio of that covariate
changes with time: the reported HR is then an average effect over follow-up.

>>> import numpy as np
>>> t = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
>>> e = np.array([1, 1, 0, 1, 1, 1, 0, 1])
>>> x = np.array([[0.0], [1], [0], [1], [0], [1], [1], [0]])
>>> r = zph_test(t, e, x, np.array([0.3]), terms={"x": [0]})
>>> [row["term"] for row in r["tests"]], r["tests"][0]["df"]
(['x', 'GLOBAL'], 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as _sps

from cmil_core.analysis._formatting import json_float, p_text
from cmil_core.errors import InputError

__all__ = ["GLOBAL", "PH_ALPHA", "TRANSFORMS", "format_zph", "violations", "zph_test"]

FloatArray = npt.NDArray[np.float64]

#: Transforms of time, as R's ``cox.zph(transform = ...)``.
TRANSFORMS = ("km", "rank", "identity", "log")
#: A covariate whose test has p below this is flagged (the HR drifts with time).
PH_ALPHA = 0.05
#: The name of the test of all covariates at once (as R prints it).
GLOBAL = "GLOBAL"


def _left_km(times: FloatArray, events: npt.NDArray[np.bool_]) -> FloatArray:
    """1 - S(t-) for every row: the pooled Kaplan-Meier just before each row's time."""
    death_times, deaths = np.unique(times[events], return_counts=True)
    at_risk = times.size - np.searchsorted(np.sort(times), death_times, side="left")
    surv = np.cumprod(1.0 - deaths / at_risk)
    before = np.searchsorted(death_times, times, side="left")  # death times strictly < t
    return 1.0 - np.concatenate(([1.0], surv))[before]


def _time_transform(times: FloatArray, events: npt.NDArray[np.bool_], transform: str) -> FloatArray:
    if transform == "km":
        return _left_km(times, events)
    if transform == "rank":
        return np.asarray(_sps.rankdata(times), dtype=np.float64)
    if transform == "log":
        if (times <= 0).any():
            raise InputError("transform 'log' needs every time above 0")
        return np.log(times)
    if transform == "identity":
        return times.astype(np.float64)
    raise InputError(f"transform {transform!r} is not one of {', '.join(TRANSFORMS)}")


def _score_and_information(
    times: FloatArray, events: npt.NDArray[np.bool_], x: FloatArray, risk: FloatArray,
    gtime: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """U (2p) and the 2p x 2p information of one stratum, Efron ties (R's zph1)."""
    p = x.shape[1]
    u = np.zeros(2 * p)
    info = np.zeros((2 * p, 2 * p))
    order = np.argsort(-times, kind="stable")  # latest first: risk sets grow as we go
    t, d, xs, r, g = times[order], events[order], x[order], risk[order], gtime[order]
    s0 = np.cumsum(r)
    s1 = np.cumsum(r[:, None] * xs, axis=0)
    s2 = np.cumsum(r[:, None, None] * xs[:, :, None] * xs[:, None, :], axis=0)
    _, first = np.unique(-t, return_index=True)  # in increasing -t: latest time first
    ends = np.r_[first[1:], t.size] - 1  # last row (in this order) with time >= that time
    for start, end in zip(first, ends, strict=True):
        dead = np.flatnonzero(d[start:end + 1]) + start
        if dead.size == 0:
            continue
        n_dead = dead.size
        d0, d1 = r[dead].sum(), (r[dead, None] * xs[dead]).sum(axis=0)
        d2 = (r[dead, None, None] * xs[dead, :, None] * xs[dead, None, :]).sum(axis=0)
        # risk set sums without the deaths at this time, then Efron's fractions of them
        a0, a1, a2 = s0[end] - d0, s1[end] - d1, s2[end] - d2
        v = np.zeros((p, p))
        mean_sum = np.zeros(p)
        for k in range(1, n_dead + 1):
            f = k / n_dead
            den = a0 + f * d0
            mean = (a1 + f * d1) / den
            mean_sum += mean
            v += (a2 + f * d2) / den - np.outer(mean, mean)
        score = xs[dead].sum(axis=0) - mean_sum
        gt = g[start]
        u[:p] += score
        u[p:] += gt * score
        info[:p, :p] += v
        info[:p, p:] += gt * v
        info[p:, p:] += gt * gt * v
    info[p:, :p] = info[:p, p:].T
    return u, info


def zph_test(
    times: npt.ArrayLike,
    events: npt.ArrayLike,
    x: npt.ArrayLike,
    beta: npt.ArrayLike,
    terms: Mapping[str, Sequence[int]],
    strata: npt.ArrayLike | None = None,
    transform: str = "km",
) -> dict[str, Any]:
    """Schoenfeld-residual score test of proportional hazards, as R ``cox.zph``.

    ``x``: the n x p design matrix of the fitted model (dummy columns for text
    covariates), ``beta`` its fitted coefficients, ``terms``: term name ->
    the design columns it owns (tested together), ``strata``: one label per
    row or None. Returns ``{"transform", "tests": [{"term", "chisq", "df",
    "p", "violated"}, ..., {"term": "GLOBAL", ...}], "alpha"}`` (JSON-ready;
    ``violated``: p < :data:`PH_ALPHA`).
    """
    t = np.asarray(times, dtype=np.float64)
    e = np.asarray(events).astype(bool)
    xm = np.asarray(x, dtype=np.float64)
    if xm.ndim == 1:
        xm = xm[:, None]
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    if xm.shape != (t.size, b.size) or e.shape != t.shape:
        raise InputError(f"zph_test: x is {xm.shape}, times {t.shape}, beta {b.shape}")
    if not e.any():
        raise InputError("the proportional-hazards test needs at least one event")
    if not np.all(np.isfinite(b)):
        raise InputError("the proportional-hazards test needs finite coefficients")
    gtime = _time_transform(t, e, transform)
    gtime = gtime - gtime[e].mean()
    xc = xm - xm.mean(axis=0)  # centred for stable sums, as R
    risk = np.exp(xc @ b)
    p = b.size
    u = np.zeros(2 * p)
    info = np.zeros((2 * p, 2 * p))
    labels = np.zeros(t.size, dtype=int) if strata is None else np.unique(
        np.asarray(strata, dtype=object).astype(str), return_inverse=True)[1]
    for level in np.unique(labels):
        inside = labels == level
        du, di = _score_and_information(t[inside], e[inside], xc[inside], risk[inside],
                                        gtime[inside])
        u += du
        info += di
    tests = []
    for name, columns in [*terms.items(), (GLOBAL, list(range(p)))]:
        cols = [int(c) for c in columns]
        keep = list(range(p)) + [p + c for c in cols]
        vec = np.r_[np.zeros(p), u[[p + c for c in cols]]]
        try:
            chisq = float(vec @ np.linalg.solve(info[np.ix_(keep, keep)], vec))
        except np.linalg.LinAlgError:
            chisq = float("nan")
        pval = float(_sps.chi2.sf(chisq, len(cols))) if np.isfinite(chisq) else None
        tests.append({"term": name, "chisq": json_float(chisq), "df": len(cols),
                      "p": json_float(pval), "violated": pval is not None and pval < PH_ALPHA})
    return {"transform": transform, "alpha": PH_ALPHA, "tests": tests}


def violations(result: Mapping[str, Any] | None) -> list[str]:
    """Warning sentences for the terms whose test has p < alpha (GLOBAL included)."""
    if not result:
        return []
    out = []
    for row in result.get("tests", []):
        if row.get("violated"):
            what = ("the model as a whole" if row["term"] == GLOBAL
                    else f"covariate {row['term']!r}")
            out.append(f"proportional hazards doubtful for {what} (Schoenfeld test, "
                       f"cox.zph {result['transform']}: {p_text(row['p'])}): its hazard "
                       "ratio changes with time; the HR is an average over follow-up")
    return out


def format_zph(result: Mapping[str, Any] | None) -> str:
    """One line per term: "Proportional hazards (...): age chi2 = 0.41 (df 1), p = 0.522; ..."."""
    if not result:
        return ""
    cells = [f"{r['term']} chi2 = {r['chisq']:.2f} (df {r['df']}), {p_text(r['p'])}"
             + (" (violated)" if r["violated"] else "")
             for r in result["tests"] if r["chisq"] is not None]
    return f"Proportional hazards (Schoenfeld, cox.zph {result['transform']}): " + "; ".join(cells)
