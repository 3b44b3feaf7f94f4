"""The two facts every reader of a trained model takes from its row, read one way.

* :func:`operating_cutoff`: the score at or above which a patient is called
  metastatic (high risk). It is chosen at training on the out-of-fold
  scores of the training cohort (Youden) and stored in ``models.cutoff``;
  a model written by an older version may have it only in its
  configuration (``config["cutoff"]``). A model with neither has no
  operating point: callers get an :class:`~cmil_core.errors.InputError`
  naming the model, never a made-up 0.5.
* :func:`training_cohorts`: the cohorts the model was trained on, as a
  tuple. The models table keeps them as one comma-separated text
  (``train_cohorts``); nothing else should split or compare that text.

Evaluation, the patient review queue, quality control's stale marks, the
demo and the dashboard's pages all use these two functions.

:func:`read_model_scores` reads, once, everything an evaluation of one model
takes from the store: the model row with its parsed rules (the two above,
the priors of :func:`training_priors`, the training tiling) and the
patient scores, honest ones for the training cohorts, in cohort order: a
:class:`ModelScores`. The functions of :mod:`cmil_core.outputs.evaluation`
are pure functions of it.

Which scores (honest numbers)
-----------------------------
The cohorts the model was trained on get their **out-of-fold** scores
(each patient scored by the cross-validation fold model that did not see
them; store table ``oof_scores``; labelled patients only), every other
cohort the final model's scores, mapped onto that same out-of-fold scale
(:mod:`cmil_core.model.recalibration`), on which the cutoff was chosen.
``in_sample=True`` (a switch on the pages, ``--in-sample`` on the command
line) puts the final model's in-sample scores in the training rows instead;
they are optimistic and labelled so; a model saved without out-of-fold
scores falls back to them, labelled so too. Each row says which it is in
``scores`` (:data:`OUT_OF_FOLD`, :data:`IN_SAMPLE` or :data:`FINAL`) and
carries a display ``label`` such as "training (out-of-fold)".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cmil_core.errors import InputError
from cmil_core.store.cohorts import list_cohorts
from cmil_core.store.connection import Store
from cmil_core.store.models import ModelRow, get_model, oof_scores_frame, patient_scores_frame

__all__ = [
    "FINAL", "IN_SAMPLE", "OUT_OF_FOLD", "ModelScores", "operating_cutoff", "read_model_scores",
    "split_cohorts", "training_cohorts", "training_priors",
]

#: The ``scores`` label of the training cohort's honest rows.
OUT_OF_FOLD = "out-of-fold"
#: The ``scores`` label of the final model's scores of the cohorts it was trained on.
IN_SAMPLE = "in-sample"
#: The ``scores`` label of every other cohort (the final model, on the out-of-fold scale).
FINAL = "final model"


def split_cohorts(text: str | None) -> tuple[str, ...]:
    """``"A, B"`` -> ``("A", "B")``: the models table's ``train_cohorts`` text as names.

    >>> split_cohorts("training")
    ('training',)
    >>> split_cohorts(" A,B ,, ")
    ('A', 'B')
    """
    return tuple(c.strip() for c in (text or "").split(",") if c.strip())


def training_cohorts(model: ModelRow) -> tuple[str, ...]:
    """The cohorts ``model`` was trained on, in the order recorded."""
    return split_cohorts(model.train_cohorts)


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def operating_cutoff(model: ModelRow) -> float:
    """The model's operating cutoff: ``models.cutoff``, else ``config["cutoff"]``.

    Raises :class:`InputError` when neither holds a finite number.
    """
    for value in (model.cutoff, (model.config or {}).get("cutoff")):
        number = _finite(value)
        if number is not None:
            return number
    raise InputError(f"model '{model.model_id}' has no operating cutoff recorded "
                     "(retrain it to choose one on its out-of-fold scores)")


def training_priors(model: ModelRow) -> tuple[float, float]:
    """``(training prevalence, prior the model was trained at)`` of a model.

    Both aggregators train class-balanced (``config["trained_prior"]``, 0.5);
    the training prevalence is ``config["training_prevalence"]``, else
    ``n_positive / n_train`` of its metrics, else the prior.
    """
    prior = float(model.config.get("trained_prior", 0.5))  # both aggregators train balanced
    prevalence = model.config.get("training_prevalence")
    if prevalence is None:
        n, pos = model.metrics.get("n_train"), model.metrics.get("n_positive")
        prevalence = pos / n if n else prior
    return float(prevalence), prior


@dataclass(frozen=True, eq=False)
class ModelScores:
    """A model's row, parsed rules and patient scores, read once (:func:`read_model_scores`).

    ``scores``: the columns of :func:`cmil_core.store.patient_scores_frame`
    (cohort, patient_id, score, risk_group, score_raw, bm_metastasis,
    os_months, os_event, efs_months, efs_event) plus ``scores`` (which scores:
    :data:`OUT_OF_FOLD`, :data:`IN_SAMPLE` or :data:`FINAL`) and ``label``
    (the cohort's display name), ordered as ``cohorts`` and, within a cohort,
    by patient id. ``cohorts``: the scored cohorts in the store's order
    (training cohorts first, then by name). ``cutoff``: the operating cutoff
    (:func:`operating_cutoff`), None when the model has none recorded
    (:meth:`operating_cutoff` then raises). ``centres``: every cohort's centre
    (the cohort's name when none is recorded).
    """

    model: ModelRow
    training_cohorts: tuple[str, ...]
    cutoff: float | None
    prevalence: float
    prior: float
    training_tiling: dict[str, Any]
    in_sample: bool
    cohorts: tuple[str, ...]
    centres: dict[str, str]
    scores: pd.DataFrame

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def operating_cutoff(self) -> float:
        """The operating cutoff; an :class:`InputError` naming the model when none is recorded."""
        return operating_cutoff(self.model) if self.cutoff is None else self.cutoff

    def of(self, cohort: str) -> pd.DataFrame:
        """The rows of one cohort (every patient scored, labelled or not)."""
        return self.scores[self.scores["cohort"] == cohort]


def _label(cohort: str, scores: str) -> str:
    return cohort if scores == FINAL else f"{cohort} ({scores})"


def read_model_scores(
    store: Store, model_id: str, cohorts: Sequence[str] | None = None, *, in_sample: bool = False
) -> ModelScores:
    """Read a model's row and its patient scores once: a :class:`ModelScores`.

    ``cohorts``: only these cohorts' scores (None: every scored cohort); a
    cohort the store does not hold is an :class:`InputError`, as is an unknown
    model. The training cohorts get their out-of-fold scores unless
    ``in_sample`` (see the module docstring).
    """
    model = get_model(store, model_id)
    if model is None:
        raise InputError(f"no model '{model_id}' in the store")
    trained = training_cohorts(model)
    final = patient_scores_frame(store, model_id)
    final["scores"] = np.where(final["cohort"].isin(set(trained)), IN_SAMPLE, FINAL)
    if not in_sample:
        oof = oof_scores_frame(store, model_id)
        have = set(oof["cohort"])
        if have:
            oof = oof.drop(columns=["fold"]).assign(scores=OUT_OF_FOLD)
            parts = [p for p in (final[~final["cohort"].isin(have)], oof) if not p.empty]
            final = pd.concat(parts, ignore_index=True) if parts else final.iloc[0:0]
    final["label"] = [_label(c, k) for c, k in zip(final["cohort"], final["scores"])]
    listed = list_cohorts(store)
    order = [c.cohort for c in listed]
    if cohorts is not None:
        unknown = [c for c in cohorts if c not in order]
        if unknown:
            raise InputError(f"no cohort {', '.join(repr(c) for c in unknown)} in the store")
        order = [c for c in order if c in set(cohorts)]
    present = set(final["cohort"])
    scored = tuple(c for c in order if c in present)
    rank = {c: i for i, c in enumerate(scored)}
    final = final[final["cohort"].isin(rank)]
    position = final["cohort"].map(rank).to_numpy(dtype=int)
    final = final.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
    cutoff: float | None
    try:
        cutoff = operating_cutoff(model)
    except InputError:
        cutoff = None
    prevalence, prior = training_priors(model)
    return ModelScores(
        model=model, training_cohorts=trained, cutoff=cutoff, prevalence=prevalence, prior=prior,
        training_tiling=dict(model.config.get("training_tiling") or {}), in_sample=in_sample,
        cohorts=scored, centres={c.cohort: (c.center or c.cohort) for c in listed}, scores=final,
    )
