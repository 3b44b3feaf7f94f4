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
"""

from __future__ import annotations

import math
from typing import Any

from cmil_core.errors import InputError
from cmil_core.store import ModelRow

__all__ = ["operating_cutoff", "split_cohorts", "training_cohorts"]


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
