"""Discrimination statistics: ROC, AUC with confidence intervals, tests, cutoffs.

Conventions (docs/DESIGN.md, "Statistics conventions")
-------------------------------------------------
- ``y_true`` is a boolean array, True for a positive patient (in the cMIL
  study: bone-marrow metastasis); ``y_score`` is a float array in which a
  **higher score means more likely positive**. Nothing is ever flipped
  silently: a score with AUC below 0.5 is reported as such.
- Ties count one half: AUC = P(score_pos > score_neg) + 1/2 P(score_pos = score_neg),
  the Mann-Whitney U statistic divided by m * n.
- A cutoff classifies a patient positive when ``score >= cutoff``. The Youden
  cutoff follows pROC: candidates are the midpoints between adjacent distinct
  scores (plus -inf and +inf), and the reported threshold is that midpoint.
- 95% intervals: DeLong (default) clipped to [0, 1], or a stratified
  percentile bootstrap (2,000 resamples, seeded); Wilson intervals for
  proportions (sensitivity, specificity, PPV, NPV).

Naming rule
-----------
Functions are named after what they return: ``roc_auc`` and ``brier_score``
return a number, ``roc_curve`` a curve, ``*_ci`` an interval record, ``*_test``
a comparison record, ``*_cutoff`` a threshold, ``calibration_*`` and
``decision_curve`` pandas tables. They take arrays and check them once, at the
edge. ``roc_analysis`` takes a table (pandas DataFrame) and returns the
JSON-ready ``roc`` contract of docs/DESIGN.md (plain ``float``/``int``/``None``,
never NaN); ``format_roc`` renders it for a terminal.

Degenerate input (decided, and tested):
- one class only: ``InputError`` for everything ROC (``roc_curve`` included:
  a curve from one class is not a ROC curve); calibration, Brier score and
  decision curves accept it (they are defined without both classes);
- constant scores: AUC 0.5, DeLong interval [0.5, 0.5], and a line in the
  ``warnings`` list of ``roc_analysis`` (no Python warning is raised);
- fewer than two patients in a class: the AUC is reported, the DeLong
  interval and tests are ``None`` (their variance needs two per class);
- missing values in the label, score or group columns: the rows are dropped
  and counted in ``n_dropped``.

Example
-------
>>> import numpy as np
>>> y = np.array([0, 0, 1, 1], dtype=bool)
>>> roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8]))
0.75
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats as _sps

from cmil_core.analysis._checks import (
    FALSE_TEXTS,
    TRUE_TEXTS,
    as_text,
    complete_cases,
    list_values,
    numeric_column,
    require_columns,
)
from cmil_core.analysis._formatting import fmt, fmt_ci, fmt_p, json_float, json_pair, text_table
from cmil_core.errors import InputError

__all__ = [
    "AucComparison",
    "AucInterval",
    "RocCurve",
    "ThresholdMetrics",
    "binary_labels",
    "bootstrap_aucs",
    "bootstrap_ci",
    "brier_score",
    "calibration_bins",
    "calibration_smooth",
    "clopper_pearson_ci",
    "decision_curve",
    "delong_ci",
    "delong_covariance",
    "delong_paired_test",
    "delong_unpaired_test",
    "format_roc",
    "metrics_at_cutoff",
    "roc_analysis",
    "roc_auc",
    "roc_ci_band",
    "roc_curve",
    "wilson_ci",
    "youden_cutoff",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

CI_METHODS = ("delong", "bootstrap")
_CHUNK_ELEMENTS = 4_000_000  # bound on the cells of one bootstrap chunk (about 32 MB)


# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """Empirical ROC curve, from (0, 0) to (1, 1), both rates non-decreasing.

    ``thresholds[k]`` is the cutoff giving ``(fpr[k], tpr[k])`` with the rule
    ``score >= threshold``; ``thresholds[0]`` is +inf (nobody positive).
    """

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray


@dataclass(frozen=True)
class AucInterval:
    """An AUC with its interval: ``method`` is ``"delong"`` or ``"bootstrap"``.

    ``low``/``high``/``se`` are ``None`` where they cannot be computed (DeLong
    with fewer than two patients in a class).
    """

    auc: float
    low: float | None
    high: float | None
    se: float | None
    method: str
    level: float = 0.95


@dataclass(frozen=True)
class AucComparison:
    """Test of AUC_a - AUC_b = 0 (DeLong); ``z``/``p``/``diff_ci`` may be None.

    They are None when the variance of the difference is zero (two constant
    scores, two perfect scores) or cannot be computed (fewer than two patients
    in a class).
    """

    auc_a: float
    auc_b: float
    diff: float
    z: float | None
    p: float | None
    diff_ci: tuple[float, float] | None
    method: str
    df: float | None = None  # Student t degrees of freedom (unpaired test), else None (normal)


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


# ----------------------------------------------------------------------------
# Input checks (the edge)
# ----------------------------------------------------------------------------


def _check_arrays(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, both_classes: bool = True
) -> tuple[BoolArray, FloatArray]:
    """Check a label array and a score array once; return (bool, float) copies."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise InputError("y_true and y_score must be one-dimensional")
    if y.shape != s.shape:
        raise InputError(f"y_true has {y.size} values but y_score has {s.size}")
    if y.dtype != np.bool_:
        values = np.unique(y)
        if not np.all(np.isin(values, [0, 1])):
            raise InputError(f"y_true must be 0/1 or boolean; values are {list_values(values)}")
        y = y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise InputError("y_score contains missing or infinite values")
    if y.size == 0:
        raise InputError("y_true and y_score are empty")
    n_pos = int(y.sum())
    if both_classes and (n_pos == 0 or n_pos == y.size):
        kind = "negative" if n_pos == 0 else "positive"
        raise InputError(f"y_true has only {kind} cases (n={y.size}); a ROC analysis needs both")
    return y, s


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level {level!r} must lie strictly between 0 and 1")
    return float(level)


def binary_labels(series: pd.Series, column: str, positive: object | None = None) -> BoolArray:
    """Turn a label column (without missing values) into a boolean array.

    With ``positive=None`` the column must hold 0/1 or booleans (as numbers,
    or as text: "1", "0", "true", "false") and 1 is positive. Otherwise values
    are compared as text after stripping (1.0 and 1 both read '1'), and every
    other value is negative.

    >>> binary_labels(pd.Series(["Good", " Poor"]), "outcome", "Poor").tolist()
    [False, True]
    """
    if positive is None:
        values = series.tolist()
        texts = [as_text(v).lower() for v in values]
        if all(t in TRUE_TEXTS or t in FALSE_TEXTS for t in texts):
            return np.array([t in TRUE_TEXTS for t in texts], dtype=bool)
        raise InputError(
            f"column {column!r} is not 0/1 (values are {list_values(values)}); "
            "say which value is positive"
        )
    wanted = as_text(positive)
    shown = np.array([as_text(v) for v in series.tolist()], dtype=object)
    labels = shown == wanted
    if not labels.any():
        raise InputError(
            f"column {column!r}: positive value {wanted!r} not found; "
            f"values are {list_values(shown)}"
        )
    return np.asarray(labels, dtype=bool)


# ----------------------------------------------------------------------------
# ROC curve and AUC
# ----------------------------------------------------------------------------


def roc_curve(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> RocCurve:
    """Empirical ROC curve: one point per distinct score, highest first.

    At threshold t, tpr = #{pos: s >= t} / m and fpr = #{neg: s >= t} / n.
    Tied scores move the curve diagonally (that is where ties count 1/2).

    >>> c = roc_curve([0, 1, 1], [0.2, 0.2, 0.9])
    >>> c.fpr.tolist(), c.tpr.tolist()
    ([0.0, 0.0, 1.0], [0.0, 0.5, 1.0])
    """
    y, s = _check_arrays(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_block = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[last_of_block]
    fps = last_of_block + 1 - tps
    return RocCurve(
        fpr=np.r_[0.0, fps / (s.size - y.sum())],
        tpr=np.r_[0.0, tps / y.sum()],
        thresholds=np.r_[np.inf, s_sorted[last_of_block]],
    )


def roc_auc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Area under the ROC curve from midranks (Mann-Whitney), in O(N log N).

    Equals pROC ``auc(roc(y_true, y_score, levels = c(0, 1), direction = "<"))``.

    AUC = (R_pos - m (m + 1) / 2) / (m n), with R_pos the sum of the midranks
    of the m positives among all N = m + n scores.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y, s = _check_arrays(y_true, y_score)
    return _auc_from_ranks(y, s)


def _auc_from_ranks(y: BoolArray, s: FloatArray) -> float:
    m = int(y.sum())
    n = y.size - m
    ranks = _sps.rankdata(s)
    return float((ranks[y].sum() - m * (m + 1) / 2.0) / (m * n))


# ----------------------------------------------------------------------------
# DeLong
# ----------------------------------------------------------------------------


def _placements(y: BoolArray, scores: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """DeLong's structural components for k scores (rows of ``scores``).

    V10[r, i] = fraction of negatives below positive i (ties 1/2) and
    V01[r, j] = fraction of positives above negative j, from three midrank
    computations (Sun & Xu 2014) instead of an m-by-n comparison matrix:
    V10 = (rank_all - rank_within_pos) / n, V01 = 1 - (rank_all - rank_within_neg) / m.
    Returns (aucs, V10, V01).
    """
    m = int(y.sum())
    n = y.size - m
    rank_all = _sps.rankdata(scores, axis=1)
    rank_pos = _sps.rankdata(scores[:, y], axis=1)
    rank_neg = _sps.rankdata(scores[:, ~y], axis=1)
    v10 = (rank_all[:, y] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, ~y] - rank_neg) / m
    return v10.mean(axis=1), v10, v01


def _delong_cov(y: BoolArray, scores: FloatArray) -> tuple[FloatArray, FloatArray | None]:
    aucs, v10, v01 = _placements(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        return aucs, None
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n
    return aucs, cov


def delong_covariance(
    y_true: npt.ArrayLike, scores: Sequence[npt.ArrayLike]
) -> tuple[FloatArray, FloatArray]:
    """AUCs of k scores on the same patients and their k-by-k DeLong covariance.

    Cov(AUC_r, AUC_s) = S10[r, s] / m + S01[r, s] / n, where S10 and S01 are
    the sample covariances of the placement values (DeLong, DeLong &
    Clarke-Pearson 1988). Needs at least two patients in each class.
    """
    if len(scores) == 0:
        raise InputError("no scores given")
    y, _ = _check_arrays(y_true, scores[0])
    matrix = np.vstack([_check_arrays(y, s)[1] for s in scores])
    aucs, cov = _delong_cov(y, matrix)
    if cov is None:
        raise InputError("DeLong's variance needs at least two positive and two negative cases")
    return aucs, cov


def _z(level: float) -> float:
    return float(_sps.norm.ppf(0.5 + level / 2.0))


def _delong_interval(auc: float, variance: float | None, level: float) -> AucInterval:
    if variance is None:
        return AucInterval(auc, None, None, None, "delong", level)
    se = math.sqrt(max(variance, 0.0))
    half = _z(level) * se
    return AucInterval(auc, max(auc - half, 0.0), min(auc + half, 1.0), se, "delong", level)


def delong_ci(y_true: npt.ArrayLike, y_score: npt.ArrayLike, level: float = 0.95) -> AucInterval:
    """AUC with DeLong's asymptotic interval, AUC +- z * SE, clipped to [0, 1].

    Equals pROC ``ci.auc(roc(y_true, y_score, levels = c(0, 1), direction = "<"),
    method = "delong", conf.level = level)``, clipped to [0, 1] (pROC does not clip).

    The clipping is what pROC prints and what the paper's "0.775-1.000"
    implies. With fewer than two patients in a class, low/high/se are None.

    >>> r = delong_ci([0, 0, 0, 1, 1, 1], [0.1, 0.3, 0.5, 0.4, 0.6, 0.9])
    >>> round(r.auc, 4), round(r.low, 4), round(r.high, 4)
    (0.8889, 0.5809, 1.0)
    """
    level = _check_level(level)
    y, s = _check_arrays(y_true, y_score)
    aucs, cov = _delong_cov(y, s[None, :])
    return _delong_interval(float(aucs[0]), None if cov is None else float(cov[0, 0]), level)


def delong_paired_test(
    y_true: npt.ArrayLike,
    score_a: npt.ArrayLike,
    score_b: npt.ArrayLike,
    level: float = 0.95,
) -> AucComparison:
    """DeLong's test of two correlated AUCs (two scores on the same patients).

    z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab), two-sided normal p;
    the interval of the difference is diff +- z_level * SE, as pROC's
    ``roc.test(..., method = "delong", paired = TRUE)``.
    """
    level = _check_level(level)
    y, a = _check_arrays(y_true, score_a)
    _, b = _check_arrays(y, score_b)
    aucs, cov = _delong_cov(y, np.vstack([a, b]))
    variance = None if cov is None else float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    return _comparison(float(aucs[0]), float(aucs[1]), variance, level, "delong paired")


def delong_unpaired_test(
    y_true_a: npt.ArrayLike,
    score_a: npt.ArrayLike,
    y_true_b: npt.ArrayLike,
    score_b: npt.ArrayLike,
    level: float = 0.95,
) -> AucComparison:
    """DeLong's test of two AUCs from independent cohorts (different patients).

    Exactly pROC's ``roc.test(roc_a, roc_b, method = "delong", paired =
    FALSE)`` (pROC 1.18, ``delong.unpaired.test``): D = (AUC_a - AUC_b) /
    sqrt(Var_a + Var_b), no covariance term, and p = 2 P(T_df > |D|) from
    Student's t with Welch-Satterthwaite df = (Var_a + Var_b)^2 / (Var_a^2 /
    (n_a - 1) + Var_b^2 / (n_b - 1)), n the patients of each cohort (``df``
    of the result; ``z`` holds D). The interval of the difference uses the
    same t quantile (pROC gives none for this test).
    """
    level = _check_level(level)
    ya, a = _check_arrays(y_true_a, score_a)
    yb, b = _check_arrays(y_true_b, score_b)
    auc_a, cov_a = _delong_cov(ya, a[None, :])
    auc_b, cov_b = _delong_cov(yb, b[None, :])
    if cov_a is None or cov_b is None:
        return _comparison(float(auc_a[0]), float(auc_b[0]), None, level, "delong unpaired")
    var_a, var_b = float(cov_a[0, 0]), float(cov_b[0, 0])
    variance = var_a + var_b
    df = None
    if variance > 1e-15:
        df = variance**2 / (var_a**2 / (ya.size - 1) + var_b**2 / (yb.size - 1))
    return _comparison(float(auc_a[0]), float(auc_b[0]), variance, level, "delong unpaired", df)


def _comparison(
    auc_a: float, auc_b: float, variance: float | None, level: float, method: str,
    df: float | None = None,
) -> AucComparison:
    """z (normal; Student t with ``df`` when given), two-sided p and the interval of the diff."""
    diff = auc_a - auc_b
    if variance is None or variance <= 1e-15:
        return AucComparison(auc_a, auc_b, diff, None, None, None, method)
    se = math.sqrt(variance)
    z = diff / se
    if df is None:
        p = float(2.0 * _sps.norm.sf(abs(z)))
        half = _z(level) * se
    else:
        p = float(2.0 * _sps.t.sf(abs(z), df))
        half = float(_sps.t.ppf(0.5 + level / 2.0, df)) * se
    ci = (max(diff - half, -1.0), min(diff + half, 1.0))
    return AucComparison(auc_a, auc_b, diff, z, p, ci, method, df)


# ----------------------------------------------------------------------------
# Stratified bootstrap
# ----------------------------------------------------------------------------


def _resample_chunks(
    n_pos: int, n_neg: int, n_boot: int, seed: int
) -> Iterator[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """Stratified resample indices, chunk by chunk: (B_c x m, B_c x n) arrays.

    Positives are drawn with replacement among the positives and negatives
    among the negatives, so every resample keeps the cohort's prevalence.
    The stream depends only on (n_pos, n_neg, n_boot, seed).
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // (n_pos + n_neg))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        yield rng.integers(0, n_pos, size=(size, n_pos)), rng.integers(0, n_neg, size=(size, n_neg))


def _row_counts(indices: npt.NDArray[np.intp], width: int) -> npt.NDArray[np.int64]:
    """How often each of ``width`` items occurs in each row of ``indices``."""
    rows = indices.shape[0]
    flat = (indices + (np.arange(rows) * width)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * width).reshape(rows, width)


def bootstrap_aucs(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, n_boot: int = 2000, seed: int = 0
) -> FloatArray:
    """AUCs of ``n_boot`` stratified resamples, vectorised, in O(n_boot * N).

    Each resample is a vector of counts: w_j for negative j, v_i for positive
    i. With negatives sorted and C = cumulative sums of their counts, the
    resample's AUC is sum_i v_i (C[below_i] + C[at_or_below_i]) / 2 / (m n):
    every positive draw scores the negative draws below it, ties 1/2. No sort
    per resample, and memory is bounded by processing resamples in chunks.
    """
    y, s = _check_arrays(y_true, y_score)
    n_boot = _check_n_boot(n_boot)
    pos, neg = s[y], np.sort(s[~y])
    m, n = pos.size, neg.size
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    # neg is sorted, so the resample indices into it need the sort order of s[~y]
    rank_of_neg = np.empty(n, dtype=np.intp)
    rank_of_neg[np.argsort(s[~y], kind="mergesort")] = np.arange(n)
    out = np.empty(n_boot, dtype=np.float64)
    done = 0
    for pos_idx, neg_idx in _resample_chunks(m, n, n_boot, seed):
        neg_counts = _row_counts(rank_of_neg[neg_idx], n)
        cum = np.zeros((neg_counts.shape[0], n + 1))
        np.cumsum(neg_counts, axis=1, out=cum[:, 1:])
        credit = cum[:, below] + cum[:, at_or_below]  # 2 x (negatives below, ties 1/2)
        pos_counts = _row_counts(pos_idx, m)
        size = pos_counts.shape[0]
        out[done : done + size] = np.einsum("bi,bi->b", pos_counts, credit) / (2.0 * m * n)
        done += size
    return out


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"number of bootstrap resamples {n_boot!r} must be a positive integer")
    return int(n_boot)


def bootstrap_ci(
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> AucInterval:
    """AUC with a stratified percentile bootstrap interval (seeded, reproducible).

    The method of pROC ``ci.auc(r, method = "bootstrap", boot.n = n_boot,
    boot.stratified = TRUE)``; the random draws differ from R's, so the
    bounds agree with R only within bootstrap error.

    The interval is the (1 - level)/2 and (1 + level)/2 quantiles (linear
    interpolation, R's type 7 as pROC's ``ci.auc(method = "bootstrap")``) of
    the resampled AUCs; ``se`` is their standard deviation.

    >>> r = bootstrap_ci([0, 0, 0, 1, 1, 1], [0.1, 0.3, 0.5, 0.4, 0.6, 0.9], n_boot=200)
    >>> r.method, r.low <= r.auc <= r.high
    ('bootstrap', True)
    """
    level = _check_level(level)
    y, s = _check_arrays(y_true, y_score)
    aucs = bootstrap_aucs(y, s, n_boot, seed)
    low, high = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    se = float(aucs.std(ddof=1)) if aucs.size > 1 else None
    return AucInterval(_auc_from_ranks(y, s), float(low), float(high), se, "bootstrap", level)


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
    y, s = _check_arrays(y_true, y_score)
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
    level = _check_level(level)
    y, s = _check_arrays(y_true, y_score)
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
    z = _z(_check_level(level))
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
    alpha = 1.0 - _check_level(level)
    low = 0.0 if k == 0 else float(_sps.beta.ppf(alpha / 2.0, k, n - k + 1))
    high = 1.0 if k == n else float(_sps.beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return low, high


def _check_count(k: int, n: int) -> tuple[int, int]:
    if int(k) != k or int(n) != n or n < 1 or not 0 <= k <= n:
        raise InputError(f"a proportion needs integers 0 <= k <= n and n >= 1; got k={k}, n={n}")
    return int(k), int(n)


# ----------------------------------------------------------------------------
# Calibration and decision curves
# ----------------------------------------------------------------------------


def _check_probabilities(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike
) -> tuple[BoolArray, FloatArray]:
    y, p = _check_arrays(y_true, y_prob, both_classes=False)
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
    level = _check_level(level)
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
    predicted, observed.
    """
    y, p = _check_probabilities(y_true, y_prob)
    if bandwidth is None:
        spread = min(float(p.std()), float(_sps.iqr(p)) / 1.34)
        bandwidth = max(0.9 * spread * p.size ** (-0.2), 0.01)
    if not bandwidth > 0.0:
        raise InputError(f"bandwidth {bandwidth!r} must be positive")
    grid = np.linspace(p.min(), p.max(), int(grid_size))
    weights = np.exp(-0.5 * ((grid[:, None] - p[None, :]) / bandwidth) ** 2)
    observed = weights @ y.astype(np.float64) / weights.sum(axis=1)
    return pd.DataFrame({"predicted": grid, "observed": observed})


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


# ----------------------------------------------------------------------------
# The table-level analysis (docs/DESIGN.md "roc" JSON contract)
# ----------------------------------------------------------------------------


def roc_analysis(
    frame: pd.DataFrame,
    label: str,
    scores: list[str],
    positive: object | None = None,
    group: str | None = None,
    ci_method: str = "delong",
    n_boot: int = 2000,
    seed: int = 0,
    cutoff_group: str | None = None,
) -> dict[str, Any]:
    """ROC analysis of one or more score columns, per group, JSON-ready.

    For every group (one group, ``None``, without a ``group`` column) and every
    score: AUC with a 95% interval (DeLong or stratified bootstrap), and the
    Youden cutoff with Se/Sp/PPV/NPV and Wilson intervals. With two or more
    scores, every pair is compared by the paired DeLong test within each
    group. With ``cutoff_group``, the Youden cutoff of that group is applied
    unchanged to every group (STARD 12a), instead of each group's own.

    Rows missing the label, any score or the group are dropped (the same
    patients for every score, so comparisons stay paired) and counted in
    ``n_dropped``. Keys: results, comparisons, n_dropped, positive, warnings.

    >>> df = pd.DataFrame({"y": [0, 0, 1, 1], "s": [0.1, 0.4, 0.35, 0.8]})
    >>> roc_analysis(df, "y", ["s"])["results"][0]["auc"]
    0.75
    """
    scores = _check_roc_arguments(frame, label, scores, group, ci_method)
    n_boot = _check_n_boot(n_boot)
    if cutoff_group is not None:
        cutoff_group = as_text(cutoff_group)
    clean, n_dropped = complete_cases(frame, [label, *scores] + ([group] if group else []))
    warnings: list[str] = []
    if n_dropped:
        warnings.append(f"{n_dropped} rows with missing values dropped")
    y = binary_labels(clean[label], label, positive)
    matrix = np.vstack([numeric_column(clean[s], s) for s in scores])
    groups = _group_masks(clean, group)
    fixed_cutoffs = _cutoffs_from_group(y, matrix, groups, cutoff_group, label)
    results: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    for name, mask in groups:
        _require_both_classes(y[mask], label, name)
        sub_y, sub = y[mask], matrix[:, mask]
        aucs, cov = _delong_cov(sub_y, sub)
        if cov is None:
            warnings.append(f"{_where(name)}fewer than two cases in a class: no DeLong interval")
        for r, score in enumerate(scores):
            if np.ptp(sub[r]) == 0.0:
                warnings.append(f"{_where(name)}score {score!r} is constant: AUC 0.5")
            if ci_method == "delong":
                var = None if cov is None else float(cov[r, r])
                interval = _delong_interval(float(aucs[r]), var, 0.95)
            else:
                interval = bootstrap_ci(sub_y, sub[r], n_boot, seed)
            cutoff = fixed_cutoffs[r] if fixed_cutoffs else youden_cutoff(sub_y, sub[r])
            results.append(_result_row(score, name, sub_y, sub[r], interval, cutoff, cutoff_group))
        for a, b in combinations(range(len(scores)), 2):
            variance = None if cov is None else float(cov[a, a] + cov[b, b] - 2 * cov[a, b])
            test = _comparison(float(aucs[a]), float(aucs[b]), variance, 0.95, "delong paired")
            comparisons.append(_comparison_row(scores[a], scores[b], name, test))
    return {
        "results": results,
        "comparisons": comparisons,
        "n_dropped": n_dropped,
        "label": label,
        "positive": "1" if positive is None else as_text(positive),
        "cutoff_group": cutoff_group,
        "warnings": warnings,
    }


def _check_roc_arguments(
    frame: pd.DataFrame, label: str, scores: Sequence[str], group: str | None, ci_method: str
) -> list[str]:
    if isinstance(scores, str):
        scores = [scores]
    scores = list(scores)
    if not scores:
        raise InputError("no score column given")
    duplicated = {s for s in scores if scores.count(s) > 1}
    if duplicated:
        raise InputError(f"score column {sorted(duplicated)[0]!r} given twice")
    if ci_method not in CI_METHODS:
        raise InputError(f"ci method {ci_method!r} is not one of {', '.join(CI_METHODS)}")
    require_columns(frame, [label, *scores] + ([group] if group else []))
    for name in scores + ([group] if group else []):
        if name == label:
            raise InputError(f"column {label!r} is the label; it cannot also be a score or group")
    return scores


def _group_masks(clean: pd.DataFrame, group: str | None) -> list[tuple[str | None, BoolArray]]:
    if group is None:
        return [(None, np.ones(len(clean), dtype=bool))]
    texts = np.array([as_text(v) for v in clean[group].tolist()], dtype=object)
    return [(str(g), np.asarray(texts == g, dtype=bool)) for g in sorted(set(texts.tolist()))]


def _cutoffs_from_group(
    y: BoolArray,
    matrix: FloatArray,
    groups: list[tuple[str | None, BoolArray]],
    cutoff_group: str | None,
    label: str,
) -> list[float] | None:
    if cutoff_group is None:
        return None
    masks = dict(groups)
    wanted = cutoff_group
    if wanted not in masks:
        raise InputError(
            f"cutoff group {wanted!r} not found; groups are {list_values(masks.keys())}"
        )
    mask = masks[wanted]
    _require_both_classes(y[mask], label, wanted)
    return [youden_cutoff(y[mask], row[mask]) for row in matrix]


def _require_both_classes(y: BoolArray, label: str, group: str | None) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        kind = "negative" if n_pos == 0 else "positive"
        where = f"group {group!r}: " if group is not None else ""
        raise InputError(
            f"{where}column {label!r} has only {kind} cases (n={y.size}); AUC needs both classes"
        )


def _where(group: str | None) -> str:
    return "" if group is None else f"group {group!r}: "


def _result_row(
    score: str,
    group: str | None,
    y: BoolArray,
    s: FloatArray,
    interval: AucInterval,
    cutoff: float,
    cutoff_group: str | None,
) -> dict[str, Any]:
    youden = metrics_at_cutoff(y, s, cutoff).to_dict()
    youden["fixed_from_group"] = cutoff_group
    return {
        "score": score,
        "group": group,
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "auc": json_float(interval.auc),
        "ci_low": json_float(interval.low),
        "ci_high": json_float(interval.high),
        "ci_method": interval.method,
        "se": json_float(interval.se),
        "youden": youden,
    }


def _comparison_row(a: str, b: str, group: str | None, test: AucComparison) -> dict[str, Any]:
    return {
        "score_a": a,
        "score_b": b,
        "group": group,
        "method": test.method,
        "auc_a": json_float(test.auc_a),
        "auc_b": json_float(test.auc_b),
        "z": json_float(test.z),
        "p": json_float(test.p),
        "diff": json_float(test.diff),
        "diff_ci": None if test.diff_ci is None else json_pair(test.diff_ci),
    }


# ----------------------------------------------------------------------------
# Text rendering
# ----------------------------------------------------------------------------


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


def format_roc(result: dict[str, Any]) -> str:
    """Render a ``roc_analysis`` result as fixed-width text for a terminal.

    One row per score and group: n, positives, AUC [95% CI], the Youden
    cutoff, Se, Sp, PPV, NPV [Wilson 95% CI]; then the paired comparisons.
    """
    rows = []
    for r in result["results"]:
        y = r["youden"]
        rows.append(
            [
                r["score"],
                "-" if r["group"] is None else str(r["group"]),
                str(r["n"]),
                str(r["n_positive"]),
                fmt_ci(r["auc"], (r["ci_low"], r["ci_high"])),
                "-" if y["threshold"] is None else f"{y['threshold']:.4g}",
                fmt_ci(y["sensitivity"], y["sensitivity_ci"]),
                fmt_ci(y["specificity"], y["specificity_ci"]),
                fmt_ci(y["ppv"], y.get("ppv_ci")),
                fmt_ci(y["npv"], y.get("npv_ci")),
            ]
        )
    method = result["results"][0]["ci_method"] if result["results"] else "delong"
    title = (
        f"ROC analysis: label {result.get('label', '?')!r}, positive = "
        f"{result.get('positive', '?')!r}; AUC 95% CI by {method}, rates with Wilson 95% CI"
    )
    headers = ["score", "group", "n", "pos", "AUC [95% CI]", "cutoff", "Se", "Sp", "PPV", "NPV"]
    parts = [title, text_table(headers, rows, left=2)]
    if result.get("cutoff_group") is not None:
        parts.append(f"Cutoffs are the Youden cutoffs of group {result['cutoff_group']!r}.")
    if result["comparisons"]:
        comp_rows = [
            [
                c["score_a"],
                c["score_b"],
                "-" if c["group"] is None else str(c["group"]),
                fmt_ci(c["diff"], c["diff_ci"]),
                fmt(c["z"]),
                fmt_p(c["p"]),
            ]
            for c in result["comparisons"]
        ]
        parts += ["", "Paired DeLong tests (diff = AUC a - AUC b)"]
        headers = ["score a", "score b", "group", "diff [95% CI]", "z", "p"]
        parts.append(text_table(headers, comp_rows, left=3))
    parts += [f"note: {w}" for w in result.get("warnings", [])]
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# Confidence band of the ROC curve (pROC's ci.se)
# ----------------------------------------------------------------------------


def _sensitivity_at(
    fp: FloatArray, tp: FloatArray, fp_target: FloatArray
) -> FloatArray:
    """Sensitivity counts of monotone ROC curves (rows) at false-positive counts.

    ``fp`` and ``tp`` are (B x K) cumulative counts, non-decreasing along each
    row from (0, 0); ``fp_target`` holds the wanted false-positive counts
    (length J). Per row: where the curve has a point at exactly the target,
    the highest true-positive count there (the top of a vertical step);
    otherwise linear interpolation between the last point before the target
    and the first point after it. Fully vectorised: each row is shifted by a
    constant larger than its range, so one ``searchsorted`` on the flattened
    rows serves every row at once. Returns (B x J) counts.
    """
    rows, width = fp.shape
    span = float(fp[:, -1].max()) + 2.0
    offsets = np.arange(rows, dtype=np.float64)[:, None] * span
    flat = (fp + offsets).ravel()
    queries = (fp_target[None, :] + offsets).ravel()
    # last point with fp <= target (the highest tp there, as tp grows along the row)
    idx = np.searchsorted(flat, queries, side="right") - 1
    idx = idx.reshape(rows, -1) - (np.arange(rows) * width)[:, None]
    idx = np.clip(idx, 0, width - 1)
    nxt = np.minimum(idx + 1, width - 1)
    take = np.take_along_axis
    fp0, tp0 = take(fp, idx, axis=1), take(tp, idx, axis=1)
    fp1, tp1 = take(fp, nxt, axis=1), take(tp, nxt, axis=1)
    gap = fp1 - fp0
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(gap > 0, (fp_target[None, :] - fp0) / gap, 0.0)
    return tp0 + np.clip(share, 0.0, 1.0) * (tp1 - tp0)


def _check_specificities(specificities: npt.ArrayLike | None) -> FloatArray:
    if specificities is None:
        return np.arange(101, dtype=np.float64) / 100.0
    sp = np.asarray(specificities, dtype=np.float64)
    if sp.ndim != 1 or sp.size == 0:
        raise InputError("specificities must be a non-empty list of numbers")
    if not np.all(np.isfinite(sp)) or np.any((sp < 0.0) | (sp > 1.0)):
        raise InputError(f"specificities must lie within [0, 1]; got {list_values(sp)}")
    return sp


def roc_ci_band(
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    specificities: npt.ArrayLike | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Confidence band of a ROC curve: the CI of the sensitivity at given specificities.

    Like pROC's ``ci.se(roc, specificities = seq(0, 1, 0.01), boot.n = 2000)``
    with its default stratified bootstrap (``boot.stratified = TRUE``):

    1. ``n_boot`` resamples draw the positives with replacement among the
       positives and the negatives among the negatives (the cohort's
       prevalence is kept); the stream of resamples is that of
       :func:`bootstrap_aucs` for the same ``seed``.
    2. For each resample, its empirical ROC curve (one point per distinct
       score, rule ``score >= threshold``) is read at each specificity sp,
       as pROC's ``coords(roc, sp, input = "specificity", ret =
       "sensitivity")`` does: where the curve has points with specificity
       exactly sp, the **highest** sensitivity among them (the top of the
       vertical step); otherwise the sensitivity is **linearly
       interpolated** between the two adjacent points, i.e. read off the
       straight segment of the drawn curve at 1 - sp. (Equality is judged
       on false-positive counts, sp * n_negatives, so 0.7 and 7/10 match.)
    3. Per specificity, ``se_low``/``se_high`` are the (1 - level)/2 and
       (1 + level)/2 quantiles of the resampled sensitivities and
       ``se_median`` their median (linear interpolation, R's type 7, as
       pROC's ``quantile``).

    At sp = 0 every curve reaches sensitivity 1, so the band is [1, 1].
    Needs both classes (``InputError`` otherwise). Deterministic for a seed.

    Returns plain lists, JSON-ready: ``{"specificity", "se_low",
    "se_median", "se_high"}`` plus ``level`` and ``n_boot``.

    >>> band = roc_ci_band([0, 1], [0.3, 0.3], specificities=[0.0, 0.25], n_boot=10)
    >>> band["se_low"], band["se_high"]
    ([1.0, 0.75], [1.0, 0.75])
    """
    level = _check_level(level)
    y, s = _check_arrays(y_true, y_score)
    n_boot = _check_n_boot(n_boot)
    sp = _check_specificities(specificities)
    pos, neg = s[y], s[~y]
    m, n = pos.size, neg.size
    distinct = np.unique(s)[::-1]  # thresholds, highest first
    # index of each patient's score among the thresholds (0 = highest)
    pos_rank = distinct.size - 1 - np.searchsorted(distinct[::-1], pos)
    neg_rank = distinct.size - 1 - np.searchsorted(distinct[::-1], neg)
    fp_target = (1.0 - sp) * n
    snapped = np.round(fp_target)
    fp_target = np.where(np.abs(fp_target - snapped) < 1e-9, snapped, fp_target)
    out = np.empty((n_boot, sp.size), dtype=np.float64)
    done = 0
    for pos_idx, neg_idx in _resample_chunks(m, n, n_boot, seed):
        size = pos_idx.shape[0]
        tp = np.zeros((size, distinct.size + 1))
        fp = np.zeros((size, distinct.size + 1))
        np.cumsum(_row_counts(pos_rank[pos_idx], distinct.size), axis=1, out=tp[:, 1:])
        np.cumsum(_row_counts(neg_rank[neg_idx], distinct.size), axis=1, out=fp[:, 1:])
        out[done : done + size] = _sensitivity_at(fp, tp, fp_target) / m
        done += size
    low, median, high = np.quantile(out, [(1.0 - level) / 2.0, 0.5, (1.0 + level) / 2.0], axis=0)
    return {
        "specificity": [float(v) for v in sp],
        "se_low": [float(v) for v in low],
        "se_median": [float(v) for v in median],
        "se_high": [float(v) for v in high],
        "level": level,
        "n_boot": n_boot,
    }
