"""Benchmark of cmil_core.analysis.roc and roc_bootstrap against the plain ways of computing
the same numbers.

Run: ``.venv/bin/python bench/stats.py [--n-delong 100000] [--n-boot 2000]``

(a) DeLong variance for n patients (balanced): midranks, O(n log n), against
    the textbook O(m * n) placement matrix (every positive compared with every
    negative, in row chunks so that memory stays bounded; no subsampling).
(b) 2,000 stratified bootstrap resamples of the AUC for n = 359 (the cMIL
    study's size): the vectorised count-based AUC against a Python loop of
    ``sklearn.metrics.roc_auc_score`` over the very same resample indices.

Both checks verify that the results agree before printing the speed-ups
(baseline time / ours) as ``delong_speedup: 153.2x`` and
``bootstrap_speedup: 40.1x``; the exit status is 1 when they disagree.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmil_core.analysis import roc, roc_bootstrap

T = TypeVar("T")


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[T, float]:
    """Result of ``fn`` and the best wall time of ``repeat`` runs, in seconds."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best  # type: ignore[return-value]


def naive_delong(y: np.ndarray, s: np.ndarray, rows: int = 256) -> tuple[float, float]:
    """AUC and DeLong variance from the m-by-n placement matrix, chunk by chunk.

    psi(x, y) = 1 if x > y, 1/2 if x == y; V10 = row means, V01 = column means.
    """
    pos, neg = s[y], s[~y]
    v10 = np.empty(pos.size)
    col_sums = np.zeros(neg.size)
    for start in range(0, pos.size, rows):
        block = pos[start : start + rows, None]
        psi = (block > neg).astype(np.float64)
        psi += 0.5 * (block == neg)
        v10[start : start + rows] = psi.mean(axis=1)
        col_sums += psi.sum(axis=0)
    v01 = col_sums / pos.size
    variance = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    return float(v10.mean()), float(variance)


def bench_delong(n: int) -> tuple[float, bool]:
    rng = np.random.default_rng(0)
    y = np.zeros(n, dtype=bool)
    y[: n // 2] = True
    s = np.round(rng.normal(size=n) + 0.8 * y, 3)  # rounded: ties exercise the midranks

    def ours() -> tuple[float, float]:
        interval = roc.delong_ci(y, s)
        return interval.auc, float(interval.se) ** 2

    (auc, var), t_ours = timed(ours, repeat=5)
    (auc_naive, var_naive), t_naive = timed(lambda: naive_delong(y, s))
    pairs = int(y.sum()) * int((~y).sum())
    agree = abs(auc - auc_naive) < 1e-12 and abs(var - var_naive) <= 1e-9 * var_naive
    print(f"delong_n: {n} ({pairs:.3g} positive-negative pairs for the placement matrix)")
    print(f"delong_auc: ours {auc:.12f}  naive {auc_naive:.12f}")
    print(f"delong_variance: ours {var:.12e}  naive {var_naive:.12e}  agree: {agree}")
    print(f"delong_ours_s: {t_ours:.4f}")
    print(f"delong_naive_s: {t_naive:.2f}  ({t_naive / pairs * 1e9:.2f} ns per pair)")
    speedup = t_naive / t_ours
    print(f"delong_speedup: {speedup:.1f}x")
    return speedup, agree


def bench_bootstrap(n: int, n_boot: int) -> tuple[float, bool]:
    rng = np.random.default_rng(1)
    y = rng.random(n) < 0.4
    s = rng.normal(size=n) + 1.2 * y
    pos_rows, neg_rows = np.flatnonzero(y), np.flatnonzero(~y)

    def baseline() -> np.ndarray:
        out = []
        # the same stratified indices, in the same order, that bootstrap_aucs draws
        chunks = roc_bootstrap._resample_chunks(pos_rows.size, neg_rows.size, n_boot, 0)
        for pos_idx, neg_idx in chunks:
            for p, q in zip(pos_idx, neg_idx, strict=True):
                rows = np.concatenate([pos_rows[p], neg_rows[q]])
                out.append(roc_auc_score(y[rows], s[rows]))
        return np.array(out)

    ours, t_ours = timed(lambda: roc_bootstrap.bootstrap_aucs(y, s, n_boot, seed=0), repeat=5)
    theirs, t_theirs = timed(baseline)
    agree = ours.shape == theirs.shape and float(np.max(np.abs(ours - theirs))) < 1e-12
    print(f"bootstrap_n: {n} patients ({int(y.sum())} positive), {n_boot} resamples")
    print(f"bootstrap_max_abs_diff: {np.max(np.abs(ours - theirs)):.3g}  agree: {agree}")
    print(f"bootstrap_ours_s: {t_ours:.4f}")
    print(f"bootstrap_sklearn_loop_s: {t_theirs:.3f}")
    speedup = t_theirs / t_ours
    print(f"bootstrap_speedup: {speedup:.1f}x")
    return speedup, agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-delong", type=int, default=100_000)
    parser.add_argument("--n-bootstrap", type=int, default=359)
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    _, delong_ok = bench_delong(args.n_delong)
    _, boot_ok = bench_bootstrap(args.n_bootstrap, args.n_boot)
    if not (delong_ok and boot_ok):
        print("error: results disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
