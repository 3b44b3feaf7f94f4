"""Input checks shared by the statistics modules (:mod:`cmil_core.analysis.stats`,
:mod:`cmil_core.analysis.survival`).

Most users should not import this module: its functions are the edge at
which those modules check a table once (columns present, complete rows,
numeric columns, label texts), raising :class:`~cmil_core.errors.InputError`
with the column, row and value in the message. Names here are public *within*
this private module, so that both statistics modules import them by those
names (no module imports another's ``_private`` names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from cmil_core.errors import InputError

__all__ = [
    "FALSE_TEXTS",
    "TRUE_TEXTS",
    "as_text",
    "complete_cases",
    "list_values",
    "numeric_column",
    "require_columns",
]

FloatArray = npt.NDArray[np.float64]

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
