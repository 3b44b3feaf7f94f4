"""The maximally selected log-rank statistic (R ``maxstat``) and its corrected p values.

For a score and right-censored survival times, :func:`maxstat_test` finds
the cut between distinct scores that best separates the survival of the two
groups, exactly R ``maxstat.test(Surv(time, event) ~ score, smethod =
"LogRank", pmethod = "Lau92", minprop = 0.1, maxprop = 0.9)``: log-rank
scores (:func:`logrank_scores`), the standardised linear rank statistic with
its permutation variance at every cut that leaves ``min_share`` = 10% or
more in each group, maximised (Hothorn and Lausen 2003). The maximum of many
tests is optimistic, so it comes with a p value corrected for the search:
Lausen & Schumacher's (1992) approximation (``Lau92``, the default), the
Lau94 bound, the exact Gaussian-limit p (``exactGauss``) or a seeded Monte
Carlo permutation test (``condMC``). The risk-group cutoff built on it is
:func:`cmil_core.analysis.risk_groups.risk_cutoff` (method "maxstat").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as _sps

from cmil_core.errors import InputError

__all__ = [
    "MAXSTAT_P_METHODS",
    "MAXSTAT_STATISTIC",
    "MaxstatTest",
    "logrank_scores",
    "maxstat_p_method",
    "maxstat_test",
]

FloatArray = npt.NDArray[np.float64]

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
