"""Risk groups from a score: a cutoff chosen on a training frame, applied unchanged.

``score >= cutoff`` is "high", the rest "low"; the cutoff is chosen on a
training frame and applied unchanged to every cohort. Methods: ``median``;
``youden`` (needs a binary label; the ROC Youden cutoff of
:mod:`cmil_core.analysis.cutoffs`); ``maxstat`` (the maximally selected
log-rank statistic of Hothorn and Lausen 2003, exactly R ``maxstat.test``:
:mod:`cmil_core.analysis.maxstat`; its value is the midpoint between the two
adjacent distinct scores, as for Youden); or a number. The maximum of many
tests is optimistic, so ``maxstat`` comes with a p value corrected for the
search. The classic log-rank test of the resulting two groups
(:func:`cmil_core.analysis.survival.survival_analysis`) is still reported
and is what it is: a test of the chosen split, not corrected for the
search. Testing a cutoff on the patients it was chosen on inflates that
test: every such result carries a line in ``warnings``.

>>> risk_groups([0.2, 0.5, 0.7], 0.5).tolist()
['low', 'high', 'high']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from cmil_core.analysis import display
from cmil_core.analysis._checks import complete_cases, numeric_column, require_columns
from cmil_core.analysis._formatting import json_float
from cmil_core.analysis.cutoffs import youden_cutoff
from cmil_core.analysis.maxstat import (
    MAXSTAT_P_METHODS,
    MAXSTAT_STATISTIC,
    maxstat_p_method,
    maxstat_test,
)
from cmil_core.analysis.roc import binary_labels
from cmil_core.analysis.survival_data import EVENT, TIME, check_survival_data
from cmil_core.errors import InputError

__all__ = ["CUTOFF_METHODS", "RiskCutoff", "describe_cutoff", "risk_cutoff", "risk_groups"]

CUTOFF_METHODS = ("median", "youden", "maxstat")


@dataclass(frozen=True)
class RiskCutoff:
    """A risk-group cutoff: ``score >= value`` is "high".

    ``n`` is the number of training patients it was chosen on (None for a
    given number). For ``maxstat`` only: ``statistic`` (maxstat's M, the
    largest standardised log-rank score statistic), ``p`` (corrected for the
    search, by ``p_method``), ``cutpoint`` (R's "estimated cutpoint": the
    largest score of the low group, ``score <= cutpoint`` is low), ``n_low``,
    ``n_high``, ``min_share`` and ``max_share`` (R's minprop and maxprop).
    ``value`` is the midpoint between ``cutpoint`` and the next distinct
    score, as for Youden: the same patients fall on each side.
    """

    method: str
    value: float
    n: int | None = None
    statistic: float | None = None
    p: float | None = None
    p_method: str | None = None
    cutpoint: float | None = None
    n_low: int | None = None
    n_high: int | None = None
    min_share: float | None = None
    max_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "value": json_float(self.value),
            "n": self.n,
            "statistic": json_float(self.statistic),
            "p_corrected": json_float(self.p),
            "p_method": self.p_method,
        }
        if self.method == "maxstat":
            out.update({
                "statistic_name": MAXSTAT_STATISTIC,
                "cutpoint": json_float(self.cutpoint),
                "n_low": self.n_low,
                "n_high": self.n_high,
                "min_share": self.min_share,
                "max_share": self.max_share,
                "p_method_name": MAXSTAT_P_METHODS[self.p_method or "Lau92"],
                "r_call": (
                    "maxstat.test(Surv(time, event) ~ score, smethod = \"LogRank\", "
                    f"pmethod = \"{self.p_method}\", minprop = {self.min_share:g}, "
                    f"maxprop = {self.max_share:g})"
                ),
            })
        return out


def risk_groups(scores: npt.ArrayLike, cutoff: float) -> npt.NDArray[np.object_]:
    """"high" where score >= cutoff, else "low".

    >>> risk_groups([0.2, 0.5, 0.7], 0.5).tolist()
    ['low', 'high', 'high']
    """
    values = np.asarray(scores, dtype=np.float64)
    return np.where(values >= float(cutoff), "high", "low").astype(object)


def describe_cutoff(cutoff: dict[str, Any] | None) -> str:
    """One line saying how a cutoff was chosen, for pages, reports and the terminal.

    For ``maxstat`` it names the statistic, the cut, the group sizes and the
    search-corrected p with its method, so that it is not mistaken for the
    classic log-rank test of the chosen groups.

    >>> describe_cutoff({"method": "median", "value": 0.5})
    'score >= 0.500 is high (median cutoff)'
    """
    if cutoff is None:
        return ""
    text = f"score >= {display.cutoff(cutoff['value'])} is high ({cutoff['method']} cutoff)"
    if cutoff.get("method") != "maxstat" or cutoff.get("statistic") is None:
        return text
    return (
        f"score >= {display.cutoff(cutoff['value'])} is high (maxstat cutoff: low group score "
        f"<= {display.cutoff(cutoff['cutpoint'])}, "
        f"{cutoff['n_low']} low / {cutoff['n_high']} high; "
        f"maximally selected log-rank statistic M = {cutoff['statistic']:.3f}, search-corrected "
        f"p = {cutoff['p_corrected']:.2g} by {cutoff['p_method']} "
        f"({cutoff.get('p_method_name', '')}), groups of at least "
        f"{cutoff.get('min_share', 0.1):.0%})"
    )


def risk_cutoff(
    train: pd.DataFrame,
    score: str,
    method: str | float,
    *,
    time: str | None = None,
    event: str | None = None,
    label: str | None = None,
    positive: object | None = None,
    min_share: float = 0.1,
    p_method: str = "Lau92",
    n_perm: int = 10_000,
    seed: int = 0,
) -> RiskCutoff:
    """Choose a risk-group cutoff on a training frame (``score >= value`` is high).

    ``method``: "median"; "youden" (needs ``label``, 0/1 unless ``positive``
    is given); "maxstat" (needs ``time`` and ``event``:
    :func:`~cmil_core.analysis.maxstat.maxstat_test`, R
    ``maxstat.test(Surv(time, event) ~ score, smethod = "LogRank", pmethod =
    p_method, minprop = min_share, maxprop = 1 - min_share)``; ``p_method``
    one of :data:`~cmil_core.analysis.maxstat.MAXSTAT_P_METHODS`, "condMC"
    with ``n_perm`` seeded permutations); or a number (or numeric text), used as it is. "median"
    is R ``median(score)``; "youden" is pROC ``coords(roc(label, score),
    "best", best.method = "youden")``.

    >>> df = pd.DataFrame({"s": [0.1, 0.2, 0.3, 0.4]})
    >>> risk_cutoff(df, "s", "median").value
    0.25
    """
    fixed = _as_number(method)
    if fixed is not None:
        return RiskCutoff("fixed", fixed)
    method = str(method).strip().lower()
    if method not in CUTOFF_METHODS:
        choices = ", ".join(CUTOFF_METHODS)
        raise InputError(f"cutoff {method!r} is not a number nor one of {choices}")
    if method == "median":
        clean, _ = complete_cases(_checked(train, [score]), [score])
        values = numeric_column(clean[score], score)
        return RiskCutoff("median", float(np.median(values)), values.size)
    if method == "youden":
        if label is None:
            raise InputError("the youden cutoff needs a label column")
        clean, _ = complete_cases(_checked(train, [score, label]), [score, label])
        y = binary_labels(clean[label], label, positive)
        values = numeric_column(clean[score], score)
        return RiskCutoff("youden", youden_cutoff(y, values), values.size)
    if time is None or event is None:
        raise InputError("the maxstat cutoff needs time and event columns")
    if not 0.0 < min_share < 0.5:
        raise InputError(f"minimum group share {min_share!r} must lie strictly between 0 and 0.5")
    p_method = maxstat_p_method(p_method)
    data, _ = check_survival_data(train, time, event, [score])
    values = numeric_column(data[score], score)
    test = maxstat_test(
        data[TIME].to_numpy(), data[EVENT].to_numpy(), values, min_share=min_share,
        p_method=p_method, n_perm=int(n_perm), seed=seed, column=score,
    )
    return RiskCutoff(
        "maxstat", test.value, test.n, test.statistic, test.p, test.p_method,
        cutpoint=test.cutpoint, n_low=test.n_low, n_high=test.n - test.n_low,
        min_share=test.min_share, max_share=test.max_share,
    )


def _checked(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    require_columns(frame, columns)
    return frame


def _as_number(value: object) -> float | None:
    """A finite number from a number or numeric text, else None (a method name)."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(number):
        raise InputError(f"cutoff {value!r} is not a finite number")
    return number
