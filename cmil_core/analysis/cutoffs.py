"""Cutoffs and accuracy at a cutoff: Youden, Se/Sp/PPV/NPV, Wilson and exact intervals.

Conventions (docs/DESIGN.md, "Statistics conventions"): ``y_true`` is 0/1 or
boolean (True: a positive patient) and a **higher score means more likely
positive**, as in :mod:`cmil_core.analysis.roc`.

- A cutoff classifies a patient positive when ``score >= cutoff``. The Youden
  cutoff follows pROC: candidates are the midpoints between adjacent distinct
  scores (plus -inf and +inf), and the reported threshold is that midpoint.
- A cutoff fixed on a training cohort is applied unchanged to a validation
  cohort (STARD 12a) with :func:`metrics_at_cutoff`.
- Proportions (sensitivity, specificity, PPV, NPV) carry Wilson 95%
  intervals (:func:`wilson_ci`); :func:`clopper_pearson_ci` is the exact one.

>>> youden_cutoff([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
0.25
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as _sps

from cmil_core.analysis._checks import check_arrays, check_level, critical_z
from cmil_core.analysis._formatting import json_float, json_pair
from cmil_core.errors import InputError

__all__ = [
    "ThresholdMetrics",
    "clopper_pearson_ci",
    "metrics_at_cutoff",
    "wilson_ci",
    "youden_cutoff",
]


# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdMetrics:
    """Confusion counts and rates at one cutoff (positive when score >= threshold).

    Rates whose denominator is zero (PPV with nobody called positive) are None.
    """

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    level: float = 0.95

    @property
    def sensitivity(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fn)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: rates, their Wilson intervals, and the counts."""
        pairs = {
            "sensitivity": (self.tp, self.tp + self.fn),
            "specificity": (self.tn, self.tn + self.fp),
            "ppv": (self.tp, self.tp + self.fp),
            "npv": (self.tn, self.tn + self.fn),
        }
        out: dict[str, Any] = {"threshold": json_float(self.threshold)}
        for name, (k, n) in pairs.items():
            out[name] = json_float(_ratio(k, n))
        for name, (k, n) in pairs.items():
            out[f"{name}_ci"] = json_pair(wilson_ci(k, n, self.level)) if n else None
        out.update(tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn)
        return out


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


# ----------------------------------------------------------------------------
# Cutoffs and threshold metrics
# ----------------------------------------------------------------------------


def youden_cutoff(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (pROC rule).

    Equals pROC ``coords(roc(y_true, y_score, levels = c(0, 1), direction = "<"),
    "best", best.method = "youden")$threshold`` (the highest threshold when J ties).

    Candidates are -inf, the midpoints between adjacent distinct scores, and
    +inf; a patient is positive when score >= threshold (pROC's default
    direction "<": controls below the threshold). Ties in J go to the highest
    threshold (the most specific one). Returns +inf when no split beats
    J = 0 (for example constant scores): nobody is called positive.

    >>> youden_cutoff([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    0.25
    """
    y, s = check_arrays(y_true, y_score)
    distinct = np.unique(s)
    candidates = np.r_[np.inf, ((distinct[1:] + distinct[:-1]) / 2.0)[::-1], -np.inf]
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    sens = (pos.size - np.searchsorted(pos, candidates, side="left")) / pos.size
    spec = np.searchsorted(neg, candidates, side="left") / neg.size
    j = sens + spec - 1.0
    best = int(np.argmax(j > j.max() - 1e-12))  # first (highest) of the ties
    return float(candidates[best])


def metrics_at_cutoff(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, cutoff: float, level: float = 0.95
) -> ThresholdMetrics:
    """Sensitivity, specificity, PPV, NPV at a fixed cutoff (score >= cutoff is positive).

    At the Youden threshold these equal pROC ``coords(r, "best", best.method =
    "youden", ret = c("sensitivity", "specificity", "ppv", "npv"))``; the
    intervals are :func:`wilson_ci`.

    This is how a cutoff fixed on the training cohort is applied, unchanged,
    to a validation cohort (STARD 12a): call it with the training cutoff.
    Wilson intervals come with ``ThresholdMetrics.to_dict()``.

    >>> m = metrics_at_cutoff([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.4], 0.25)
    >>> m.sensitivity, m.specificity, m.ppv, m.npv
    (0.5, 0.5, 0.5, 0.5)
    """
    level = check_level(level)
    y, s = check_arrays(y_true, y_score)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.number)):
        raise InputError(f"cutoff {cutoff!r} is not a number")
    if math.isnan(float(cutoff)):
        raise InputError("cutoff is NaN")
    called = s >= float(cutoff)
    tp = int(np.sum(called & y))
    fp = int(np.sum(called & ~y))
    return ThresholdMetrics(
        float(cutoff), tp=tp, fp=fp, tn=int((~y).sum()) - fp, fn=int(y.sum()) - tp, level=level
    )


# ----------------------------------------------------------------------------
# Intervals of a proportion
# ----------------------------------------------------------------------------


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n.

    Equals R ``prop.test(k, n, correct = FALSE, conf.level = level)$conf.int``
    (and ``binom::binom.confint(k, n, methods = "wilson")``).

    centre = (k + z^2/2) / (n + z^2), half-width = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4).
    Unlike the Wald interval it stays inside [0, 1] and behaves at k = 0 or n.

    >>> [round(x, 5) for x in wilson_ci(26, 41)]
    [0.48121, 0.7641]
    """
    k, n = _check_count(k, n)
    z = critical_z(check_level(level))
    z2 = z * z
    centre = (k + z2 / 2.0) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4.0)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def clopper_pearson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of k/n from beta quantiles; conservative.

    Equals R ``binom.test(k, n, conf.level = level)$conf.int``.

    low = Beta((1 - level)/2; k, n - k + 1), high = Beta((1 + level)/2; k + 1, n - k).

    >>> [round(x, 4) for x in clopper_pearson_ci(7, 50)]
    [0.0582, 0.2674]
    """
    k, n = _check_count(k, n)
    alpha = 1.0 - check_level(level)
    low = 0.0 if k == 0 else float(_sps.beta.ppf(alpha / 2.0, k, n - k + 1))
    high = 1.0 if k == n else float(_sps.beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return low, high


def _check_count(k: int, n: int) -> tuple[int, int]:
    if int(k) != k or int(n) != n or n < 1 or not 0 <= k <= n:
        raise InputError(f"a proportion needs integers 0 <= k <= n and n >= 1; got k={k}, n={n}")
    return int(k), int(n)
