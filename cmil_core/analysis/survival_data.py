"""Survival data: the time and event columns of a table, checked once.

Every survival function (:mod:`cmil_core.analysis.survival`,
:mod:`cmil_core.analysis.cox`, :mod:`cmil_core.analysis.risk_groups`) reads
its table through :func:`check_survival_data`, R's ``Surv(time, event)``:
time numeric, finite and >= 0; event 0/1 or boolean (also as text: "1",
"0", "true", "false"); rows missing time, event or another needed column are
dropped and counted. Bad input raises :class:`~cmil_core.errors.InputError`
naming the column (and the row). The checked table holds the columns
:data:`TIME` and :data:`EVENT` beside the others asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from cmil_core.analysis._checks import (
    FALSE_TEXTS,
    TRUE_TEXTS,
    as_text,
    complete_cases,
    list_values,
    numeric_column,
    require_columns,
)
from cmil_core.errors import InputError

__all__ = ["EVENT", "TIME", "check_survival_data"]

#: The checked table's time (float) and event (int 0/1) columns.
TIME, EVENT = "__time__", "__event__"


def check_survival_data(
    frame: pd.DataFrame, time: str, event: str, columns: Sequence[str | None] = ()
) -> tuple[pd.DataFrame, int]:
    """Check survival columns once; return complete cases and the number dropped.

    The result holds ``__time__`` (float, finite, >= 0), ``__event__`` (int
    0/1) and the other ``columns`` unchanged, for rows where all of them are
    present. A None in ``columns`` (an optional column not asked for) is skipped.

    >>> df = pd.DataFrame({"t": [5.0, None, 3.0], "e": [1, 0, True]})
    >>> data, dropped = check_survival_data(df, "t", "e")
    >>> data["__event__"].tolist(), dropped
    ([1, 1], 1)
    """
    others = [c for c in dict.fromkeys(columns) if c is not None]
    require_columns(frame, [time, event, *others])
    if time == event:
        raise InputError(f"column {time!r} cannot be both the time and the event")
    for column in others:
        if column in (time, event):
            raise InputError(f"column {column!r} is already the time or the event column")
    clean, dropped = complete_cases(frame, [time, event, *others])
    if clean.empty:
        names = ", ".join(repr(c) for c in [time, event, *others])
        raise InputError(f"no rows left with values in all of the columns {names}")
    times = numeric_column(clean[time], time)
    if (times < 0).any():
        row = clean.index[int(np.argmax(times < 0))]
        raise InputError(f"row {row}, column {time!r}: time {times[times < 0][0]:g} is negative")
    data = clean[others].copy()
    data[TIME] = times
    data[EVENT] = _event_values(clean[event], event)
    return data, dropped


def _event_values(series: pd.Series, column: str) -> npt.NDArray[np.int64]:
    texts = [as_text(v).lower() for v in series.tolist()]
    bad = [t for t in texts if t not in TRUE_TEXTS | FALSE_TEXTS]
    if bad:
        raise InputError(
            f"column {column!r}: events must be 0/1 or true/false; values are "
            f"{list_values(series.tolist())}"
        )
    return np.array([t in TRUE_TEXTS for t in texts], dtype=np.int64)
