"""ROC analysis: the ROC curve, AUC with DeLong or bootstrap intervals, DeLong tests.

Conventions (docs/DESIGN.md, "Statistics conventions")
-------------------------------------------------
- ``y_true`` is a boolean array, True for a positive patient (in the cMIL
  study: bone-marrow metastasis); ``y_score`` is a float array in which a
  **higher score means more likely positive**. Nothing is ever flipped
  silently: a score with AUC below 0.5 is reported as such.
- Ties count one half: AUC = P(score_pos > score_neg) + 1/2 P(score_pos = score_neg),
  the Mann-Whitney U statistic divided by m * n.
- 95% intervals: DeLong (default) clipped to [0, 1], or a stratified
  percentile bootstrap (2,000 resamples, seeded; the resampling itself is
  :mod:`cmil_core.analysis.roc_bootstrap`).
- Cutoffs (Youden) and the rates at a cutoff with their Wilson intervals are
  :mod:`cmil_core.analysis.cutoffs`; calibration, Brier score and decision
  curves :mod:`cmil_core.analysis.calibration`.

Naming rule
-----------
Functions are named after what they return: ``roc_auc`` returns a number,
``roc_curve`` a curve, ``*_ci`` an interval record, ``*_test`` a comparison
record. They take arrays and check them once, at the edge. ``roc_analysis``
takes a table (pandas DataFrame) and returns the JSON-ready ``roc`` contract
of docs/DESIGN.md (plain ``float``/``int``/``None``, never NaN);
``format_roc`` renders it for a terminal.

Degenerate input (decided, and tested):
- one class only: ``InputError`` for everything ROC (``roc_curve`` included:
  a curve from one class is not a ROC curve);
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
from collections.abc import Sequence
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
    check_arrays,
    check_level,
    check_n_boot,
    complete_cases,
    critical_z,
    list_values,
    numeric_column,
    require_columns,
)
from cmil_core.analysis._formatting import fmt, fmt_ci, fmt_p, json_float, json_pair, text_table
from cmil_core.analysis.cutoffs import metrics_at_cutoff, youden_cutoff
from cmil_core.analysis.roc_bootstrap import bootstrap_aucs
from cmil_core.errors import InputError

__all__ = [
    "CI_METHODS",
    "AucComparison",
    "AucInterval",
    "RocCurve",
    "binary_labels",
    "bootstrap_ci",
    "delong_ci",
    "delong_covariance",
    "delong_paired_test",
    "delong_unpaired_test",
    "format_roc",
    "roc_analysis",
    "roc_auc",
    "roc_curve",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

CI_METHODS = ("delong", "bootstrap")


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


# ----------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------


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
    y, s = check_arrays(y_true, y_score)
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
    y, s = check_arrays(y_true, y_score)
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
    y, _ = check_arrays(y_true, scores[0])
    matrix = np.vstack([check_arrays(y, s)[1] for s in scores])
    aucs, cov = _delong_cov(y, matrix)
    if cov is None:
        raise InputError("DeLong's variance needs at least two positive and two negative cases")
    return aucs, cov


def _delong_interval(auc: float, variance: float | None, level: float) -> AucInterval:
    if variance is None:
        return AucInterval(auc, None, None, None, "delong", level)
    se = math.sqrt(max(variance, 0.0))
    half = critical_z(level) * se
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
    level = check_level(level)
    y, s = check_arrays(y_true, y_score)
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
    level = check_level(level)
    y, a = check_arrays(y_true, score_a)
    _, b = check_arrays(y, score_b)
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
    level = check_level(level)
    ya, a = check_arrays(y_true_a, score_a)
    yb, b = check_arrays(y_true_b, score_b)
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
        half = critical_z(level) * se
    else:
        p = float(2.0 * _sps.t.sf(abs(z), df))
        half = float(_sps.t.ppf(0.5 + level / 2.0, df)) * se
    ci = (max(diff - half, -1.0), min(diff + half, 1.0))
    return AucComparison(auc_a, auc_b, diff, z, p, ci, method, df)


# ----------------------------------------------------------------------------
# Bootstrap interval (resamples: cmil_core.analysis.roc_bootstrap)
# ----------------------------------------------------------------------------


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
    level = check_level(level)
    y, s = check_arrays(y_true, y_score)
    aucs = bootstrap_aucs(y, s, n_boot, seed)
    low, high = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    se = float(aucs.std(ddof=1)) if aucs.size > 1 else None
    return AucInterval(_auc_from_ranks(y, s), float(low), float(high), se, "bootstrap", level)


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
    n_boot = check_n_boot(n_boot)
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
