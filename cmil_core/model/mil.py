"""Multiple-instance learning (MIL) aggregators: patch embeddings -> patient score.

The problem
-----------
A patient's bone-marrow smear is cut into patches; a frozen CNN encoder turns
each quality-passed patch into an embedding (a row of ``D`` numbers). The
patient is a *bag* of such rows, ``np.ndarray [n_patches, D]``, with one label
(1 = marrow metastasis). Which patches show tumour is unknown: that is the
multiple-instance setting (Dietterich et al., Artif Intell 1997). Under the
standard MIL assumption a bag is positive when at least one instance is, and
in metastatic marrow the *witness rate* (share of tumour patches) may be a few
per cent, so every method here must find a small signal among many normal
patches with patient labels only.

Two aggregators share one interface
(:class:`~cmil_core.model.aggregator.Aggregator`): ``fit`` on the training
bags, ``predict`` a :class:`~cmil_core.model.aggregator.BagPrediction` per bag
(a patient score in [0, 1] and a per-patch importance), ``config`` and
``state`` to save, and ``from_state`` to rebuild.

- :class:`~cmil_core.model.histogram_mil.HistogramMIL` (``"histogram"``), the
  cMIL study's recipe (Ma et al., J Transl Med 2026, after the
  patch-likelihood-histogram and bag-of-words pipeline of Cao et al.,
  Theranostics 2020): a patch classifier trained with
  every patch carrying its patient's label, then patient features built from
  the distribution of that patient's patch probabilities, then a logistic
  regression.
- :class:`~cmil_core.model.attention_mil.AttentionMIL` (``"attention"``):
  gated attention MIL (Ilse, Tomczak and Welling, ICML 2018), which learns
  where to look and what it sees in one network trained on patient labels.

:func:`make_aggregator` and :func:`aggregator_from_state` make either one by
name; :func:`cross_validate` runs patient-stratified k-fold cross-validation of
either one and returns out-of-fold scores (:class:`CVResult`). This module is
the aggregators' front door: the interface and the machinery both share (input
checks, the deterministic torch session, early stopping) are in
:mod:`cmil_core.model.aggregator`, each aggregator in its own module.

Conventions
-----------
- Scores: higher means more likely metastatic (as in :mod:`cmil_core.analysis.roc`).
- Only the bags handed to ``fit`` are ever used for training, input scaling,
  early stopping or the TF-IDF vocabulary; ``predict`` scores each bag on its
  own (nothing is pooled across the bags of one call), so a patient's score
  never depends on which other patients are scored with it.
- Determinism: ``fit(..., seed=s)`` seeds a numpy ``Generator`` and torch (in a
  forked RNG, so the caller's global torch RNG is untouched), and every torch
  call of the aggregators runs single-threaded with
  ``torch.use_deterministic_algorithms(True)``: the same seed, data and
  machine give bit-identical scores. Both settings are process-wide in torch,
  so they are set and restored under one lock: fits and predictions of
  the aggregators run one at a time (safe from the dashboard's threads). One
  thread costs little here: the heads are small and Python overhead, not
  arithmetic, dominates.
- Bad input (an empty bag, a bag with another ``D``, NaN, labels other than
  0/1, one class only, an unknown hyper-parameter) raises
  :class:`~cmil_core.errors.InputError` with a one-line message.

Example
-------
>>> rng = np.random.default_rng(0)
>>> bags = [rng.normal(size=(12, 8)).astype(np.float32) for _ in range(20)]
>>> labels = [i % 2 for i in range(20)]
>>> for bag, y in zip(bags, labels):
...     bag[:3] += 3.0 * y  # three "tumour" patches in each positive bag
>>> model = make_aggregator("attention", max_epochs=5).fit(bags, labels, seed=0)
>>> pred = model.predict(bags[:1])[0]
>>> pred.probability.shape, round(float(pred.attention.sum()), 5)
((12,), 1.0)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedKFold

from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.model.aggregator import (
    Aggregator,
    ProgressFn,
    check_bags,
    check_labels,
    check_param,
    check_seed,
    safe_auc,
)
from cmil_core.model.attention_mil import AttentionMIL
from cmil_core.model.histogram_mil import HistogramMIL

log = logging.getLogger(__name__)

__all__ = [
    "AGGREGATORS",
    "CVResult",
    "aggregator_from_state",
    "cross_validate",
    "make_aggregator",
]


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CVResult:
    """Patient-stratified k-fold cross-validation of one aggregator.

    Attributes
    ----------
    auc:
        AUC of the pooled out-of-fold scores (every patient scored once, by the
        model that did not see them). Pooling mixes k models whose scores need
        not share a scale, so it can sit slightly below the mean fold AUC.
    fold_aucs:
        AUC within each fold's test patients.
    oof_scores:
        ``[n_patients]`` out-of-fold score of every patient, in input order.
    folds:
        Test indices (into the input bags) of each fold; they partition the
        patients. Save them to reproduce the split.
    k:
        Number of folds used (less than asked when a class is small).
    """

    auc: float
    fold_aucs: list[float]
    oof_scores: npt.NDArray[np.float64]
    folds: list[list[int]]
    k: int = 0
    seed: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_fold_auc(self) -> float:
        """Mean of the per-fold AUCs."""
        return float(np.mean(self.fold_aucs))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (for ``models.metrics``), folds included."""
        return {
            "cv_auc": self.auc,
            "cv_mean_fold_auc": self.mean_fold_auc,
            "cv_fold_aucs": list(self.fold_aucs),
            "cv_k": self.k,
            "cv_seed": self.seed,
            "cv_folds": [list(f) for f in self.folds],
        }


# ----------------------------------------------------------------------------
# Factory and cross-validation
# ----------------------------------------------------------------------------

AGGREGATORS: dict[str, type[Aggregator]] = {
    HistogramMIL.name: HistogramMIL,
    AttentionMIL.name: AttentionMIL,
}
"""The aggregators by name: ``"histogram"`` (the study's recipe) and ``"attention"``."""


def _aggregator_class(name: Any) -> type[Aggregator]:
    try:
        return AGGREGATORS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown aggregator {name!r}; expected one of {', '.join(sorted(AGGREGATORS))}"
        ) from None


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """A new, unfitted aggregator: ``"histogram"`` or ``"attention"``, with hyper-parameters.

    >>> make_aggregator("histogram", n_bins=20).config()["n_bins"]
    20
    """
    return _aggregator_class(name)(**params)


def aggregator_from_state(config: Mapping[str, Any], state: Mapping[str, Any]) -> Aggregator:
    """Rebuild a fitted aggregator of whichever kind ``config["aggregator"]`` names."""
    return _aggregator_class(config.get("aggregator")).from_state(config, state)


def cross_validate(
    name: str,
    bags: Sequence[np.ndarray],
    labels: Sequence[int],
    *,
    k: int = 5,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> CVResult:
    """Patient-stratified k-fold cross-validation of one aggregator.

    Patients are split by sklearn's ``StratifiedKFold(k, shuffle=True,
    random_state=seed)`` (each fold keeps the cohort's share of positives);
    for each fold a fresh aggregator with ``params`` is fitted, with ``seed``,
    on the other folds only (its input scaling, early stopping and TF-IDF
    included) and scores the fold's patients. When the smaller class has
    fewer than ``k`` patients, ``k`` drops to that count with a
    ``UserWarning`` (every test fold then holds both classes); fewer than two
    patients in a class is an ``InputError``.

    ``progress(done, total, message)`` counts per cent of the whole run
    (``total = 100 * k``).

    Bag-level CV only: patches of one patient never straddle folds, because
    a bag is one patient. If a patient has several bags (slides), merge them
    first, or folds will leak.
    """
    checked = check_bags(bags)
    y = check_labels(labels, len(checked))
    seed = check_seed(seed)
    k = check_param("k", k, "int", 2, 10_000)
    cls = _aggregator_class(name)
    params = dict(params or {})
    cls(**params)  # check the hyper-parameters before any work
    smallest = int(np.bincount(y, minlength=2).min())
    notes: list[str] = []
    if smallest < 2:
        raise InputError(
            f"a class has {smallest} patient; cross-validation needs at least 2 per class"
        )
    if smallest < k:
        note = f"k reduced from {k} to {smallest}: the smaller class has only {smallest} patients"
        warnings.warn(note, UserWarning, stacklevel=2)
        notes.append(note)
        k = smallest
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    oof = np.full(len(checked), np.nan)
    folds: list[list[int]] = []
    fold_aucs: list[float] = []
    for f, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(y)), y)):

        def fold_progress(done: int, total: int, message: str, _f: int = f) -> None:
            if progress is not None:
                share = int(100 * done / total) if total > 0 else 100
                progress(100 * _f + share, 100 * k, f"fold {_f + 1}/{k}: {message}")

        model = cls(**params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(
                [checked[i] for i in train_idx], y[train_idx], seed=seed, progress=fold_progress
            )
        for w in caught:
            notes.append(f"fold {f + 1}: {w.message}")
        predictions = model.predict([checked[i] for i in test_idx])
        oof[test_idx] = [pr.score for pr in predictions]
        folds.append(sorted(int(i) for i in test_idx))
        fold_aucs.append(safe_auc(y[test_idx], oof[test_idx]))
        log.info("cross-validation fold %d/%d: %d training and %d held-out patients, AUC %.3f",
                 f + 1, k, len(train_idx), len(test_idx), fold_aucs[-1])
    if progress is not None:
        progress(100 * k, 100 * k, "done")
    return CVResult(
        auc=roc_auc(y, oof),
        fold_aucs=fold_aucs,
        oof_scores=oof,
        folds=folds,
        k=k,
        seed=seed,
        warnings=notes,
    )
