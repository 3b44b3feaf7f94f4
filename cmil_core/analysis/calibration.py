"""Predicted probabilities: calibration, Brier score and decision curves.

- :func:`calibration_bins` (observed rate in quantile bins of the prediction,
  with Wilson intervals) and :func:`calibration_smooth` (a kernel-smoothed
  calibration curve): the calibration plot;
- :func:`calibration_fit`: calibration intercept and slope (below);
- :func:`brier_score`: mean squared error of the probabilities;
- :func:`decision_curve`: net benefit across threshold probabilities
  (Vickers & Elkin 2006), beside treat-all and treat-none.

``y_true`` is 0/1 or boolean, ``y_prob`` probabilities in [0, 1]. A single
outcome class is accepted (these are defined without both classes, unlike
anything ROC).

Calibration intercept and slope (logistic recalibration)
--------------------------------------------------------
With lp = logit(p) the log-odds of each predicted probability and y the
observed outcome (0/1), two logistic models (Cox 1958; Van Calster et al.
2016, "A calibration hierarchy"):

- **calibration slope**: logit P(y = 1) = a + b * lp; the slope is b. Ideal
  1; below 1 the predictions are too extreme (over-fitting), above 1 too
  modest. R: ``coef(glm(y ~ lp, family = binomial))[2]``.
- **calibration intercept** (calibration-in-the-large): logit P(y = 1) =
  a + lp, lp an offset (slope fixed at 1); the intercept is a. Ideal 0;
  above 0 the predictions are too low on average, below 0 too high. R:
  ``coef(glm(y ~ 1, offset = lp, family = binomial))``.

Both by maximum likelihood (Newton-Raphson, converged to 1e-12 on the
deviance, tighter than R's ``glm`` default 1e-8); 95% intervals are Wald
intervals, estimate +- 1.96 SE, R's ``confint.default(fit)`` (checked live
against R in tests/test_r_live.py and against stored R values).

Degenerate input (decided, and tested): probabilities of exactly 0 or 1
have no log-odds: :class:`~cmil_core.errors.InputError`; a single outcome
class, or predictions that separate the classes perfectly, have no finite
estimate: the values are None and ``note`` says why.

>>> r = calibration_fit([0, 0, 1, 1, 0, 1], [0.2, 0.4, 0.6, 0.7, 0.5, 0.3])
>>> round(r["slope"], 3), round(r["intercept"], 3)
(1.557, 0.228)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import special, stats as _sps

from cmil_core.analysis._checks import check_arrays, check_level
from cmil_core.analysis._formatting import fmt_ci, json_float, json_pair
from cmil_core.analysis.cutoffs import wilson_ci
from cmil_core.errors import InputError

__all__ = [
    "MIN_SMOOTH_SUPPORT",
    "brier_score",
    "calibration_bins",
    "calibration_fit",
    "calibration_smooth",
    "decision_curve",
    "format_calibration_fit",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
_TOL, _MAX_STEPS = 1e-12, 100


def _logistic(
    y: FloatArray, x: FloatArray, offset: FloatArray
) -> tuple[FloatArray, FloatArray] | None:
    """ML coefficients and their covariance of logit P(y) = x beta + offset; None if none finite."""
    beta = np.zeros(x.shape[1])
    deviance = np.inf
    for _ in range(_MAX_STEPS):
        eta = x @ beta + offset
        mu = special.expit(eta)
        w = mu * (1.0 - mu)
        info = x.T @ (w[:, None] * x)
        try:
            step = np.linalg.solve(info, x.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        eta = x @ beta + offset
        new = -2.0 * float(np.sum(y * eta - np.logaddexp(0.0, eta)))
        if abs(new - deviance) <= _TOL * (abs(new) + 0.1):
            break
        deviance = new
    else:
        return None
    mu = special.expit(x @ beta + offset)
    info = x.T @ ((mu * (1.0 - mu))[:, None] * x)
    if not np.all(np.isfinite(beta)):
        return None
    return beta, np.asarray(np.linalg.inv(info), dtype=np.float64)


def calibration_fit(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, level: float = 0.95
) -> dict[str, Any]:
    """Calibration intercept and slope with Wald intervals, JSON-ready.

    Keys: n, events, intercept, intercept_se, intercept_ci, slope, slope_se,
    slope_ci, level, method, note (None when both were estimated).
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise InputError("y_true and y_prob must be two 1-D arrays of the same, non-zero length")
    if not np.all(np.isin(y, [0, 1])):
        raise InputError("y_true must be 0/1 or boolean")
    if not np.all(np.isfinite(p)) or p.min() <= 0.0 or p.max() >= 1.0:
        raise InputError("predicted probabilities must lie strictly between 0 and 1 "
                         f"(found {np.nanmin(p):g} to {np.nanmax(p):g}): 0 and 1 have no log-odds")
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level {level!r} must lie strictly between 0 and 1")
    yf = y.astype(np.float64)
    lp = np.log(p) - np.log1p(-p)
    z = float(_sps.norm.ppf(0.5 + level / 2.0))
    out: dict[str, Any] = {"n": int(y.size), "events": int(yf.sum()), "level": level,
                           "method": "logistic recalibration, Wald intervals (R glm, "
                                     "confint.default)", "note": None}
    ones = np.ones((y.size, 1))
    fits: dict[str, tuple[FloatArray, FloatArray] | None] = {"intercept": None, "slope": None}
    both = 0 < yf.sum() < y.size
    # the slope's maximum likelihood is finite only if the classes' log-odds overlap
    separated = both and (lp[y == 0].max() <= lp[y == 1].min()
                          or lp[y == 1].max() <= lp[y == 0].min())
    if both:
        fits["intercept"] = _logistic(yf, ones, lp)
    if both and not separated:
        fits["slope"] = _logistic(yf, np.column_stack([ones, lp]), np.zeros(y.size))
    for name, fit in fits.items():
        k = 0 if name == "intercept" else 1
        if fit is None:
            out.update({name: None, f"{name}_se": None, f"{name}_ci": None})
            continue
        beta, cov = fit
        est, se = float(beta[k]), float(np.sqrt(cov[k, k]))
        out.update({name: json_float(est), f"{name}_se": json_float(se),
                    f"{name}_ci": json_pair([est - z * se, est + z * se])})
    if out["intercept"] is None or out["slope"] is None:
        out["note"] = ("a single outcome class: no calibration intercept or slope"
                       if not both else
                       "the predictions separate the outcomes perfectly: no finite "
                       "calibration slope" if separated else
                       "the logistic recalibration did not converge")
    return out


def format_calibration_fit(result: dict[str, Any] | None) -> str:
    """"calibration intercept 0.12 [-0.40, 0.64] (ideal 0), slope 0.85 [0.31, 1.39] (ideal 1)"."""
    if not result:
        return ""
    if result["intercept"] is None and result["slope"] is None:
        return f"calibration: {result['note']}"
    return (f"calibration intercept {fmt_ci(result['intercept'], result['intercept_ci'], 2)} "
            f"(ideal 0), slope {fmt_ci(result['slope'], result['slope_ci'], 2)} (ideal 1)")


# ----------------------------------------------------------------------------
# Calibration curves, Brier score and decision curves
# ----------------------------------------------------------------------------


def _check_probabilities(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike
) -> tuple[BoolArray, FloatArray]:
    y, p = check_arrays(y_true, y_prob, both_classes=False)
    if p.min() < 0.0 or p.max() > 1.0:
        raise InputError(
            f"predicted probabilities must lie in [0, 1]; found {p.min():g} to {p.max():g}"
        )
    return y, p


def brier_score(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> float:
    """Mean squared error of predicted probabilities: mean((p - y)^2); lower is better.

    >>> brier_score([0, 1], [0.5, 0.5])
    0.25
    """
    y, p = _check_probabilities(y_true, y_prob)
    return float(np.mean((p - y) ** 2))


def calibration_bins(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, n_bins: int = 10, level: float = 0.95
) -> pd.DataFrame:
    """Observed event rate against mean prediction in quantile bins of the prediction.

    Bin edges are the quantiles of the predictions, so bins hold about equal
    numbers of patients; tied predictions never straddle two bins, which can
    leave fewer than ``n_bins`` bins. Columns: bin, n, mean_predicted,
    observed, observed_low, observed_high (Wilson interval).
    """
    y, p = _check_probabilities(y_true, y_prob)
    level = check_level(level)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"number of calibration bins {n_bins!r} must be a positive integer")
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    which = np.searchsorted(edges, p, side="right")
    rows: list[tuple[int, int, float, float, float, float]] = []
    for b in np.unique(which):
        inside = which == b
        k, n = int(y[inside].sum()), int(inside.sum())
        low, high = wilson_ci(k, n, level)
        rows.append((len(rows) + 1, n, float(p[inside].mean()), k / n, low, high))
    columns = ["bin", "n", "mean_predicted", "observed", "observed_low", "observed_high"]
    return pd.DataFrame(rows, columns=columns)


#: Patients' worth of kernel weight under which a smoothed calibration curve is not drawn.
MIN_SMOOTH_SUPPORT = 10.0


def calibration_smooth(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    bandwidth: float | None = None,
    grid_size: int = 101,
) -> pd.DataFrame:
    """Smoothed calibration curve by Gaussian-kernel (Nadaraya-Watson) regression.

    observed(x) = sum_i K((x - p_i)/h) y_i / sum_i K((x - p_i)/h), on a grid
    from min(p) to max(p). Default bandwidth h: Silverman's rule,
    0.9 * min(SD, IQR/1.34) * N^(-1/5), floored at 0.01. Columns:
    predicted, observed, and support: the kernel's weight summed over the
    patients, in patients (a patient at ``x`` counts 1, one a bandwidth away
    0.61), i.e. about how many patients the curve rests on there. Where scores
    are sparse, a few patients decide the curve: a figure draws it only where
    the support is large enough (:data:`MIN_SMOOTH_SUPPORT`).
    """
    y, p = _check_probabilities(y_true, y_prob)
    if bandwidth is None:
        spread = min(float(p.std()), float(_sps.iqr(p)) / 1.34)
        bandwidth = max(0.9 * spread * p.size ** (-0.2), 0.01)
    if not bandwidth > 0.0:
        raise InputError(f"bandwidth {bandwidth!r} must be positive")
    grid = np.linspace(p.min(), p.max(), int(grid_size))
    weights = np.exp(-0.5 * ((grid[:, None] - p[None, :]) / bandwidth) ** 2)
    support = weights.sum(axis=1)
    observed = weights @ y.astype(np.float64) / support
    return pd.DataFrame({"predicted": grid, "observed": observed, "support": support})


def decision_curve(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    thresholds: npt.ArrayLike | None = None,
) -> pd.DataFrame:
    """Net benefit across threshold probabilities (Vickers & Elkin 2006).

    At threshold probability t (treat when p >= t), a true positive is worth
    one and a false positive t / (1 - t): NB = TP/N - FP/N * t / (1 - t).
    Treat-all: NB = prevalence - (1 - prevalence) t / (1 - t); treat-none: 0.
    Default thresholds 0.01, 0.02, ..., 0.99. Columns: threshold,
    net_benefit_model, net_benefit_all, net_benefit_none.
    """
    y, p = _check_probabilities(y_true, y_prob)
    t = np.round(np.arange(1, 100) / 100.0, 2) if thresholds is None else np.asarray(thresholds)
    t = t.astype(np.float64)
    if t.ndim != 1 or np.any(~(t > 0.0) | ~(t < 1.0)):
        raise InputError("decision-curve thresholds must lie strictly between 0 and 1")
    pos, neg, total = np.sort(p[y]), np.sort(p[~y]), float(p.size)
    tp = pos.size - np.searchsorted(pos, t, side="left")
    fp = neg.size - np.searchsorted(neg, t, side="left")
    odds = t / (1.0 - t)
    prevalence = pos.size / total
    return pd.DataFrame(
        {
            "threshold": t,
            "net_benefit_model": tp / total - fp / total * odds,
            "net_benefit_all": prevalence - (1.0 - prevalence) * odds,
            "net_benefit_none": np.zeros_like(t),
        }
    )
