"""The stratified bootstrap of a ROC: resampled AUCs and the ROC curve's confidence band.

Every resample draws the positives with replacement among the positives and
the negatives among the negatives, so each keeps the cohort's prevalence
(pROC's ``boot.stratified = TRUE``); the stream of resamples depends only on
the class sizes, the number of resamples and the seed, so a seed gives the
same numbers every time. :func:`bootstrap_aucs` gives the AUC of each
resample (the percentile interval of them is
:func:`cmil_core.analysis.roc.bootstrap_ci`); :func:`roc_ci_band` the
interval of the sensitivity at given specificities, pROC's ``ci.se``.
Both are vectorised: a resample is a vector of counts, never a sort.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.analysis._checks import check_arrays, check_level, check_n_boot, list_values
from cmil_core.errors import InputError

__all__ = ["bootstrap_aucs", "roc_ci_band"]

FloatArray = npt.NDArray[np.float64]

_CHUNK_ELEMENTS = 4_000_000  # bound on the cells of one bootstrap chunk (about 32 MB)


# ----------------------------------------------------------------------------
# Stratified resamples
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
    y, s = check_arrays(y_true, y_score)
    n_boot = check_n_boot(n_boot)
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
    level = check_level(level)
    y, s = check_arrays(y_true, y_score)
    n_boot = check_n_boot(n_boot)
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
