"""Input checks shared by the statistics modules (:mod:`cmil_core.analysis.roc`,
:mod:`cmil_core.analysis.cutoffs`, :mod:`cmil_core.analysis.calibration`, the survival
modules).

Most users should not import this module: its functions are the edge at
which those modules check their input once (columns present, complete rows,
numeric columns, label texts; label and score arrays, confidence levels),
raising :class:`~cmil_core.errors.InputError` with the column, row and value
in the message. Names here are public *within*
this private module, so that the statistics modules import them by those
names (no module imports another's ``_private`` names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats as _sps

from cmil_core.errors import InputError

__all__ = [
    "FALSE_TEXTS",
    "TRUE_TEXTS",
    "as_text",
    "check_arrays",
    "check_level",
    "check_n_boot",
    "complete_cases",
    "critical_z",
    "list_values",
    "numeric_column",
    "require_columns",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Texts read as a true / false binary value (after :func:`as_text` and lower-casing).
TRUE_TEXTS, FALSE_TEXTS = frozenset({"1", "true"}), frozenset({"0", "false"})


def list_values(values: Any, limit: int = 10) -> str:
    """"'a', 'b', ... (n in all)" for an error message."""
    texts = sorted({as_text(v) for v in values})
    shown = ", ".join(repr(t) for t in texts[:limit])
    return shown if len(texts) <= limit else f"{shown}, ... ({len(texts)} in all)"


def as_text(value: Any) -> str:
    """The text of a label or group value: 1.0 -> '1', ' Poor ' -> 'Poor'."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value).strip()


def require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """InputError naming the first of ``columns`` missing from ``frame``."""
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    for column in columns:
        if column not in frame.columns:
            raise InputError(
                f"column {column!r} not found; columns are {list_values(frame.columns, 20)}"
            )


def complete_cases(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """Rows with a value in every one of ``columns``, and how many were dropped.

    Missing: NaN, None, pandas NA, and blank text.
    """
    unique = list(dict.fromkeys(columns))
    present = frame[unique].notna()
    for column in unique:
        if frame[column].dtype == object:
            blank = frame[column].map(lambda v: isinstance(v, str) and not v.strip())
            present[column] &= ~blank.astype(bool)
    keep = present.all(axis=1)
    return frame.loc[keep, unique], int((~keep).sum())


def numeric_column(series: pd.Series, column: str) -> FloatArray:
    """Finite floats from a column without missing values, else InputError."""
    values: FloatArray  # pandas is untyped (Any): the arrays' type is stated here
    if pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64)
        return values
    converted = pd.to_numeric(series, errors="coerce")
    bad = converted.isna() & series.notna()
    if bad.any():
        row = bad.idxmax()
        raise InputError(
            f"row {row}, column {column!r}: value {as_text(series[row])!r} is not a number"
        )
    values = converted.to_numpy(dtype=np.float64)
    infinite = ~np.isfinite(values)
    if infinite.any():
        row = series.index[int(np.argmax(infinite))]
        raise InputError(f"row {row}, column {column!r}: value {values[infinite][0]} is not finite")
    return values



def check_arrays(
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


def check_level(level: float) -> float:
    """A confidence level strictly between 0 and 1, as a float."""
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level {level!r} must lie strictly between 0 and 1")
    return float(level)


def critical_z(level: float) -> float:
    """The normal quantile of a two-sided interval at ``level`` (1.96 at 0.95)."""
    return float(_sps.norm.ppf(0.5 + level / 2.0))


def check_n_boot(n_boot: int) -> int:
    """A number of bootstrap resamples: a positive integer (not a bool)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"number of bootstrap resamples {n_boot!r} must be a positive integer")
    return int(n_boot)
