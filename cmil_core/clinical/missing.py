"""Missing values of a clinical table, by what each column is used for, and the rows they cost.

The statistics commands (``roc``, ``survival``, ``cox``) analyse complete
cases. :func:`prepare` reads the columns they use by role before that:

* **numeric** columns (times, events, scores, labels): empty cells, ``NA``,
  ``N/A``, ``NaN``, ``null`` and also ``none``, ``-``, ``?``, ``.``,
  ``missing`` (any case; :data:`cmil_core.clinical.tables.MISSING_VALUES`) are missing;
* **categorical** columns (groups): only empty cells and ``NA``/``N/A``/
  ``NaN``/``null`` (:data:`cmil_core.clinical.tables.ALWAYS_MISSING`); every other
  text is a level, so ``none`` or ``-`` is a group of its own;
* **auto** columns (Cox covariates): numeric when every present cell that is
  not a numeric-only missing token is a number, else categorical.

It counts, per column, the rows missing it and which cell texts made them
missing, and refuses (:class:`~cmil_core.errors.InputError` naming the column,
the level and the columns that empty it) when a grouping column would lose a
whole level because every row of it misses another value, unless
``drop_missing`` (``--drop-missing``) accepts that. :meth:`Prepared.annotate`
adds what was dropped to an analysis' JSON result (keys added, none renamed):

* ``n_dropped_by_column``: {column: rows missing it} (a row missing two columns
  counts in both; ``n_dropped`` counts it once);
* ``missing_values``: {column: {"role": "numeric"|"categorical",
  "values": {cell text: rows}}}, the empty cell shown as ``(empty)``;
* ``levels_lost``: [{"column", "level", "rows"}], levels left out with ``drop_missing``;
* ``table``: {"source", "encoding", "sheet"} of the file read;

and one line per column to ``warnings``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cmil_core.clinical.tables import (
    ALWAYS_MISSING,
    MISSING_VALUES,
    is_number,
    numeric_cells,
    numeric_columns,
    read_table,
)
from cmil_core.errors import InputError, shown

__all__ = ["EMPTY", "Prepared", "prepare", "read_raw"]

EMPTY = "(empty)"


def read_raw(
    path: str | Path, *, encoding: str | None = None, sheet: str | int | None = None
) -> pd.DataFrame:
    """A table as text cells exactly as read (missing tokens kept), indexed by row number.

    ``frame.attrs`` holds ``source``, ``encoding``, ``sheet`` and ``notes``.
    """
    table = read_table(path, encoding=encoding, sheet=sheet)
    seen: set[str] = set()
    for name in table.header:
        if name in seen:
            raise InputError(f"{table.source}: column '{shown(name)}' appears twice in the header")
        seen.add(name)
    dc = table.decimal_comma
    data = {
        name: [
            row[i].replace(",", ".") if dc and row[i].count(",") == 1 and is_number(
                row[i].replace(",", ".")) else row[i]
            for row in table.rows
        ]
        for i, name in enumerate(table.header)
    }
    frame = pd.DataFrame(data, index=pd.Index(table.row_numbers, name="row"), dtype=object)
    frame.attrs.update(source=table.source, encoding=table.encoding, sheet=table.sheet,
                       notes=tuple(table.notes))
    return frame


@dataclass
class Prepared:
    """A table ready for an analysis, and what its missing values cost."""

    frame: pd.DataFrame
    roles: dict[str, str]
    missing: dict[str, dict[str, int]]
    n_dropped: int
    levels_lost: list[dict[str, Any]] = field(default_factory=list)
    table: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def missing_line(self) -> str | None:
        """One line: every column that lost rows, how many and to what, or None."""
        parts = []
        for column, values in self.missing.items():
            total = sum(values.values())
            why = ", ".join(f"{_token(v)} {n}" for v, n in values.items())
            parts.append(f"{column!r} {total} ({self.roles[column]}: {why})")
        if not parts:
            return None
        return (f"{self.n_dropped} row(s) dropped for missing values; by column: "
                + "; ".join(parts))

    def annotate(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with the keys of the module docstring added and the notes in its warnings."""
        out = dict(result)
        out["n_dropped_by_column"] = {c: sum(v.values()) for c, v in self.missing.items()}
        out["missing_values"] = {
            c: {"role": self.roles[c], "values": dict(v)} for c, v in self.missing.items()
        }
        out["levels_lost"] = list(self.levels_lost)
        out["table"] = dict(self.table)
        extra = list(self.notes)
        line = self.missing_line()
        if line:
            extra.append(line)
        extra += [
            f"level {lost['level']!r} of {lost['column']!r} ({lost['rows']} row(s)) left out: "
            "each of its rows misses a value (--drop-missing)"
            for lost in self.levels_lost
        ]
        generic = f"{out.get('n_dropped', self.n_dropped)} rows with missing values dropped"
        kept = [w for w in out.get("warnings", []) if not (line and w == generic)]
        out["warnings"] = kept + extra
        return out


def _token(value: str) -> str:
    return "empty" if value == EMPTY else repr(value)


def _is_missing(cell: object, role: str) -> bool:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return True
    text = str(cell).strip().lower()
    return text in (MISSING_VALUES if role == "numeric" else ALWAYS_MISSING)


def prepare(
    raw: pd.DataFrame,
    *,
    numeric: Sequence[str | None] = (),
    categorical: Sequence[str | None] = (),
    auto: Sequence[str | None] = (),
    groups: Sequence[str | None] = (),
    drop_missing: bool = False,
) -> Prepared:
    """Type the used columns of ``raw`` (from :func:`read_raw`) by role; count what is missing.

    ``groups`` names the grouping columns whose levels must survive (each also
    categorical). Columns not found are left to the analysis, which names them.
    Raises :class:`InputError` when a group level would be lost and not
    ``drop_missing``.

    >>> raw = pd.DataFrame({"t": ["5", "?", "3"], "e": ["1", "0", "1"], "g": ["a", "b", "none"]})
    >>> p = prepare(raw, numeric=["t", "e"], groups=["g"], drop_missing=True)
    >>> p.missing, p.n_dropped, [x["level"] for x in p.levels_lost]
    ({'t': {'?': 1}}, 1, ['b'])
    """
    roles: dict[str, str] = {}
    for column in [*numeric]:
        if column is not None and column in raw.columns:
            roles.setdefault(column, "numeric")
    for column in [*categorical, *groups]:
        if column is not None and column in raw.columns:
            roles.setdefault(column, "categorical")
    for column in auto:
        if column is not None and column in raw.columns and column not in roles:
            values = [None if _is_missing(v, "categorical") else str(v) for v in raw[column]]
            roles[column] = "numeric" if numeric_cells(values) else "categorical"
    frame = numeric_columns(raw.map(
        lambda v: None if v is None or str(v).strip().lower() in ALWAYS_MISSING else v))
    missing_mask = pd.DataFrame(False, index=raw.index, columns=list(roles))
    missing: dict[str, dict[str, int]] = {}
    for column, role in roles.items():
        cells = raw[column].tolist()
        flags = [_is_missing(v, role) for v in cells]
        missing_mask[column] = flags
        counts = Counter(
            EMPTY if v is None or not str(v).strip() else str(v).strip()
            for v, flag in zip(cells, flags) if flag
        )
        if counts:
            missing[column] = dict(counts.most_common())
        present = [None if flag else str(v).strip() for v, flag in zip(cells, flags)]
        if all(v is None or is_number(v) for v in present) and any(v is not None for v in present):
            frame[column] = pd.Series(
                [math.nan if v is None else float(v) for v in present], index=raw.index,
                dtype=float)
        else:
            frame[column] = pd.Series(present, index=raw.index, dtype=object)
    incomplete = missing_mask.any(axis=1) if roles else pd.Series(False, index=raw.index)
    levels_lost: list[dict[str, Any]] = []
    for group in dict.fromkeys(g for g in groups if g is not None and g in roles):
        present = ~missing_mask[group]
        levels = raw.loc[present, group].map(lambda v: str(v).strip())
        kept = set(levels[~incomplete[present]])
        for level, n in levels.value_counts(sort=False).items():
            if level in kept:
                continue
            rows = levels.index[levels == level]
            if not drop_missing:
                raise InputError(_lost_message(raw, missing_mask, roles, group, str(level), rows))
            levels_lost.append({"column": group, "level": str(level), "rows": int(n)})
    attrs = raw.attrs
    return Prepared(
        frame=frame,
        roles=roles,
        missing=missing,
        n_dropped=int(incomplete.sum()),
        levels_lost=levels_lost,
        table={k: attrs.get(k) for k in ("source", "encoding", "sheet")},
        notes=list(attrs.get("notes", ())),
    )


def _lost_message(
    raw: pd.DataFrame, mask: pd.DataFrame, roles: dict[str, str], group: str, level: str,
    rows: pd.Index,
) -> str:
    causes = []
    for column in roles:
        if column == group:
            continue
        hit = mask.loc[rows, column]
        if hit.any():
            texts = Counter(
                EMPTY if v is None or not str(v).strip() else str(v).strip()
                for v in raw.loc[rows[hit.to_numpy()], column]
            )
            why = ", ".join(f"{_token(t)} {n}" for t, n in texts.most_common())
            causes.append(f"{column!r} ({why})")
    listed = ", ".join(str(r) for r in list(rows)[:5]) + (" ..." if len(rows) > 5 else "")
    return (
        f"column {group!r}: the level {shown(level)!r} ({len(rows)} row(s): {listed}) would be "
        f"lost: every row of it misses a value in {' or '.join(causes)}; correct the table, "
        "or pass --drop-missing to analyse without it"
    )

