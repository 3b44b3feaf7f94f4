"""Score scales: the final model's scores on the out-of-fold scale, probabilities at the
training prevalence.

Why a map
---------
The operating cutoff is the Youden point of the training cohort's
*out-of-fold* (OOF) scores: each patient scored by the fold model that did
not see them. Those scores are the honest ones, and the cutoff belongs to
their scale. The final model is refitted on all training patients and scores
every cohort; its scale need not match the fold models' (more data, another
stopping epoch, a sharper fit), so the cutoff would be applied on a scale it
was not chosen on, and the training patients' own (in-sample) final scores
are near 0 and 1. :func:`fit_score_map` therefore maps the final model's
score onto the OOF scale before any cutoff, risk group or probability is
read from it.

The map (choice and why)
------------------------
Default, ``"quantile-oof"``: quantile mapping (distribution matching) fitted
on the training patients. The final model's in-sample scores and the OOF
scores are each sorted; the k-th smallest in-sample score maps to the k-th
smallest OOF score, linearly in between (on the logit scale) and beyond the
ends along the line through the end points. So on the training patients the
mapped final scores have exactly the OOF scores' distribution, and the same
share of them lies above the cutoff as of the OOF scores: at the cutoff the
two scales mean the same operating point. Chosen over

* a Platt-type fit (``"platt-oof"``, kept as an option:
  ``sigmoid(a + b * logit(s))`` fitted by cross-entropy against the OOF
  scores, a fractional-response logistic regression), which matches the
  scales on average but not at the cutoff: on the small demo it called a
  different number of training patients positive than the OOF scores did
  (sensitivity 0.50 against 0.75);
* isotonic regression of OOF on in-sample scores, whose steps tie patients
  (changing AUCs) and are flat outside the training range, where external
  centres' scores often lie;
* the fold models' ensemble, because with a CNN fine-tuned inside each fold
  it would embed every cohort ``k`` times (``k`` encoders), and its patch
  attention would be an average of ``k`` models' attention, not one model's.

Both maps are strictly increasing (ties among the OOF knots are broken by a
1e-6 logit ramp), so every AUC, ROC curve, DeLong test and patient ranking
of the final model is unchanged; only the cutoff's position, the risk groups
and the probability-based numbers move.

Its limit: the map is learnt on in-sample scores and applied to new
patients, and a monotone map keeps the final model's ranking: where the
final model orders the training patients differently from the fold models,
sensitivity and specificity on the same patients still differ (by the
patients ranked differently around the cutoff).

Prevalence
----------
Both aggregators (and the CNN fine-tuning) train class-balanced (sampling or
class weights), so a score reads as a probability at a 50 % prior, not at the
training prevalence. :func:`prevalence_shift` moves it (Saerens, Latinne &
Decaestecker, Neural Comput 2002: posterior odds times the ratio of prior
odds) before Brier scores, calibration plots and decision curves. The shift
is strictly increasing too: AUCs are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cmil_core.errors import InputError

__all__ = ["METHODS", "ScoreMap", "fit_score_map", "prevalence_shift"]

_EPS = 1e-6


def _logit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


METHODS = ("quantile-oof", "platt-oof")


@dataclass(frozen=True)
class ScoreMap:
    """A strictly increasing map of final-model scores onto the OOF scale.

    ``method``: ``"quantile-oof"`` (piecewise linear in logit through
    ``knots_in`` -> ``knots_out``), ``"platt-oof"`` (``sigmoid(a + b *
    logit(s))``) or ``"identity"``. ``n``: training patients it was fitted
    on; ``note``: why it is the identity, when it is.
    """

    method: str = "identity"
    a: float = 0.0
    b: float = 1.0
    n: int = 0
    note: str = ""
    knots_in: tuple[float, ...] = ()
    knots_out: tuple[float, ...] = ()

    def apply(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Scores on the out-of-fold scale (NaN stays NaN)."""
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "identity":
            return s.copy()
        z = _logit(s)
        if self.method == "platt-oof":
            out = _sigmoid(self.a + self.b * z)
        else:
            xs, ys = np.asarray(self.knots_in), np.asarray(self.knots_out)
            slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
            mapped = np.interp(z, xs, ys)
            mapped = np.where(z < xs[0], ys[0] + slope * (z - xs[0]), mapped)
            mapped = np.where(z > xs[-1], ys[-1] + slope * (z - xs[-1]), mapped)
            out = _sigmoid(mapped)
        out[~np.isfinite(s)] = np.nan
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "a": self.a, "b": self.b, "n": self.n, "note": self.note,
                "knots_in": list(self.knots_in), "knots_out": list(self.knots_out)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ScoreMap:
        """The map a model's config saved; the identity for models saved without one."""
        if not data:
            return cls(note="the model was saved without a score map")
        return cls(str(data.get("method", "identity")), float(data.get("a", 0.0)),
                   float(data.get("b", 1.0)), int(data.get("n", 0)), str(data.get("note", "")),
                   tuple(float(v) for v in data.get("knots_in", ())),
                   tuple(float(v) for v in data.get("knots_out", ())))


def fit_score_map(
    in_sample: npt.ArrayLike, oof: npt.ArrayLike, *, method: str = "quantile-oof",
    max_iter: int = 100,
) -> ScoreMap:
    """Fit the map from the final model's in-sample scores to the OOF scores (same patients).

    >>> s = np.array([0.02, 0.1, 0.3, 0.6, 0.9, 0.98])
    >>> m = fit_score_map(s, s)  # already on the same scale: (nearly) the identity
    >>> bool(np.abs(m.apply([0.05, 0.5, 0.95]) - [0.05, 0.5, 0.95]).max() < 1e-5)
    True
    >>> p = fit_score_map(s, s, method="platt-oof")
    >>> round(p.a, 6) + 0.0, round(p.b, 6)
    (0.0, 1.0)
    """
    if method not in METHODS:
        raise InputError(f"score map {method!r} is not one of {', '.join(METHODS)}")
    s = np.asarray(in_sample, dtype=np.float64)
    o = np.asarray(oof, dtype=np.float64)
    if s.shape != o.shape or s.ndim != 1:
        raise InputError(
            "fit_score_map: in-sample and out-of-fold scores must be 1-D, one per patient")
    keep = np.isfinite(s) & np.isfinite(o)
    s, o = s[keep], np.clip(o[keep], 0.0, 1.0)
    if s.size < 3:
        return ScoreMap(n=int(s.size), note="fewer than 3 patients: identity")
    z = _logit(s)
    if np.ptp(z) < 1e-9:
        return ScoreMap(n=int(s.size),
                        note="the final model gives every patient one score: identity")
    if method == "quantile-oof":
        return _quantile_map(z, _logit(o))
    x = np.column_stack([np.ones_like(z), z])
    beta = np.array([0.0, 1.0])
    for _ in range(max_iter):
        g = _sigmoid(x @ beta)
        grad = x.T @ (g - o)
        w = np.maximum(g * (1.0 - g), 1e-12)
        hess = (x * w[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta = beta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    a, b = float(beta[0]), float(beta[1])
    if not (np.isfinite(a) and np.isfinite(b)) or b <= 0:
        return ScoreMap(n=int(s.size),
                        note=f"fitted slope {b:.3g} is not positive (in-sample and out-of-fold "
                        "scores disagree in order): identity")
    return ScoreMap("platt-oof", a, b, int(s.size))


def _quantile_map(z_in: npt.NDArray[np.float64], z_oof: npt.NDArray[np.float64]) -> ScoreMap:
    """Sorted in-sample logits -> sorted OOF logits (tied inputs share the mean of their
    outputs)."""
    xs_all, ys_all = np.sort(z_in), np.sort(z_oof)
    xs, inverse = np.unique(xs_all, return_inverse=True)
    ys = np.bincount(inverse, weights=ys_all) / np.bincount(inverse)
    ys = ys + 1e-6 * np.arange(ys.size)  # strictly increasing: no two patients tied by the map
    return ScoreMap("quantile-oof", n=int(z_in.size),
                    knots_in=tuple(float(v) for v in xs), knots_out=tuple(float(v) for v in ys))


def prevalence_shift(
    p: npt.ArrayLike, prevalence: float, trained_prior: float = 0.5
) -> npt.NDArray[np.float64]:
    """Probabilities of a model trained at ``trained_prior`` moved to ``prevalence``.

    ``odds' = odds * [prevalence / (1 - prevalence)] / [prior / (1 - prior)]``.

    >>> prevalence_shift([0.5], 0.2).round(3).tolist()
    [0.2]
    """
    if not (0.0 < prevalence < 1.0 and 0.0 < trained_prior < 1.0):
        raise InputError(f"prevalence {prevalence} and prior {trained_prior} must lie in (0, 1)")
    q = np.asarray(p, dtype=np.float64)
    ratio = (prevalence / (1.0 - prevalence)) / (trained_prior / (1.0 - trained_prior))
    # p r / (p r + 1 - p): the odds times r, written without clipping (0 and 1 stay, and
    # scores near them keep their order)
    with np.errstate(invalid="ignore"):
        out = q * ratio / (q * ratio + (1.0 - q))
    out[~np.isfinite(q)] = np.nan
    return out
