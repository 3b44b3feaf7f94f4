"""Validate a clinical table and import it as a cohort, all or nothing.

The table format (README "Clinical table"):

============== ======================================================== =========
column         values                                                   required
============== ======================================================== =========
patient_id     any text; unique after trimming spaces                   yes
bm_metastasis  1/0, yes/no, positive/negative, true/false (any case)    no
os_months      overall survival or follow-up time, months, >= 0         no
os_event       1 = died, 0 = alive at last follow-up                    with os_months
efs_months     event-free survival time, months, >= 0                   no
efs_event      1 = event (relapse, progression, death), 0 = none        with efs_months
anything else  kept as-is in ``patients.clinical`` (age, sex, stage...)  no
============== ======================================================== =========

Column names are matched after lower-casing and turning spaces, dots and
dashes into ``_``; :data:`COLUMN_ALIASES` lists the accepted variants (``id``,
``os_time``, ``efs_status``...). Empty cells and ``NA``/``N/A``/``NaN``/``null``
are missing values everywhere; ``none``, ``-``, ``?``, ``.`` and ``missing`` only in
the numeric columns (times, events, and clinical columns whose other cells are
all numbers): a categorical clinical column keeps them as values (a treatment
"none", a 1p deletion "-"). ``-`` is a negative ``bm_metastasis``.

Every problem is collected (up to :data:`MAX_PROBLEMS`) with its row and
column; when there is any, nothing is written and :class:`TableError` carries
them all, with a one-line summary as its message. Values are quoted in
messages with control characters escaped and long values cut
(:func:`shown`), so a message stays one readable line.

Identifiers (patient ids and cohort names) end up in every export: CSV
tables opened in spreadsheets, the HTML report, links. :func:`identifier_problem`
refuses, at import, any identifier that

* holds a control or invisible formatting character (newline, tab, NUL,
  right-to-left override...): it would break CSV rows and log lines, or make
  two different ids look the same;
* starts with ``=``, ``+``, ``-`` or ``@``: a spreadsheet opening an exported
  CSV would run it as a formula (CSV injection, e.g. ``=cmd|' /C calc'!A0``).
  Refusing these at the door means no export ever carries one, so exports
  write ids unchanged (no quote prefix that would alter the data);
* holds ``<`` or ``>``: ids are not markup (pages and the report escape
  everything anyway; this keeps ids plain everywhere else too).

Other clinical cells are kept as text and never evaluated; a clinical value
that looks like a formula is stored as is (it is data, and the study's CSV
exports carry ids, scores and statistics, not clinical free text).
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cmil_core import store as store_mod
from cmil_core.clinical.tables import (
    ALWAYS_MISSING,
    MISSING_VALUES,
    NUMERIC_MISSING,
    TextTable,
    numeric_cells,
    parse_number,
    read_table,
)
from cmil_core.clinical.workbook import sheet_names
from cmil_core.errors import InputError, shown

__all__ = [
    "COLUMN_ALIASES",
    "MAX_PROBLEMS",
    "ImportResult",
    "Problem",
    "TableError",
    "TablePreview",
    "identifier_problem",
    "import_cohort",
    "preview_table",
    "problems_frame",
    "shown",
    "validate_table",
]

MAX_PROBLEMS = 50
MAX_ID_LENGTH = 128

# Accepted spellings of each known column (after normalisation).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "patient_id": ("patient_id", "patientid", "patient", "id", "case_id", "subject_id", "pid"),
    "bm_metastasis": (
        "bm_metastasis", "bm_met", "bmm", "bm_status", "bone_marrow_metastasis",
        "marrow_metastasis", "metastasis",
    ),
    "os_months": ("os_months", "os", "os_time", "os_month", "overall_survival_months"),
    "os_event": ("os_event", "os_status", "death", "os_censor_event"),
    "efs_months": ("efs_months", "efs", "efs_time", "efs_month", "event_free_survival_months"),
    "efs_event": ("efs_event", "efs_status", "efs_censor_event"),
}
_TRUE = frozenset({"1", "1.0", "yes", "y", "positive", "pos", "true", "t", "+"})
_FALSE = frozenset({"0", "0.0", "no", "n", "negative", "neg", "false", "f", "-"})
_ROLES = ("train", "validation", "test")
MAX_COHORT_LENGTH = 64
# First characters a spreadsheet reads as the start of a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@")
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def identifier_problem(text: str) -> str | None:
    """Why ``text`` cannot be a patient id or cohort name, or None when it can.

    See the module docstring for the policy.

    >>> identifier_problem("NB-001") is None
    True
    >>> identifier_problem("=HYPERLINK(1)")
    "starts with '=', which a spreadsheet would run as a formula"
    """
    bad = next((ch for ch in text if unicodedata.category(ch) in _INVISIBLE), None)
    if bad is not None:
        return f"holds the control character {ascii(bad)[1:-1]} (U+{ord(bad):04X})"
    if text.startswith(_FORMULA_START):
        return f"starts with '{text[0]}', which a spreadsheet would run as a formula"
    if "<" in text or ">" in text:
        return "holds '<' or '>'; identifiers are plain text, not markup"
    return None


@dataclass(frozen=True)
class Problem:
    """One problem in a table: where, and what is wrong."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{shown(self.column)}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class TableError(InputError):
    """A table was refused; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[Problem], truncated: bool = False) -> None:
        self.source = source
        self.problems = problems
        self.truncated = truncated
        listed = "; ".join(str(p) for p in problems[:3])
        more = len(problems) - 3
        total = f"{len(problems)}{'+' if truncated else ''}"
        noun = "problem" if len(problems) == 1 else "problems"
        tail = f"; and {more}{'+' if truncated else ''} more" if more > 0 else ""
        super().__init__(f"{source}: {total} {noun}, nothing imported: {listed}{tail}")


@dataclass
class ImportResult:
    cohort: str
    source: str
    patients: int
    positives: int
    negatives: int
    unlabelled: int
    columns: dict[str, str]
    clinical_columns: list[str]
    rows: list[store_mod.PatientRow] = field(repr=False, default_factory=list)
    encoding: str = "utf-8"
    sheet: str | None = None
    notes: list[str] = field(default_factory=list)


def _normalise(name: str) -> str:
    out = name.strip().lstrip("\ufeff").lower()
    for ch in " .-/()":
        out = out.replace(ch, "_")
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


def _map_columns(table: TextTable, problems: list[Problem]) -> dict[str, int]:
    """Contract column name -> index in the table's header."""
    alias_to_field = {alias: fld for fld, aliases in COLUMN_ALIASES.items() for alias in aliases}
    mapping: dict[str, int] = {}
    seen: dict[str, str] = {}
    for index, raw in enumerate(table.header):
        if not raw:
            problems.append(Problem(1, f"#{index + 1}", "the header cell is empty"))
            continue
        norm = _normalise(raw)
        if norm in seen:
            problems.append(Problem(1, raw, f"the column name repeats '{shown(seen[norm])}'"))
            continue
        seen[norm] = raw
        fld = alias_to_field.get(norm)
        if fld is None:
            continue
        if fld in mapping:
            other = table.header[mapping[fld]]
            problems.append(
                Problem(1, raw,
                        f"both '{shown(other)}' and '{shown(raw)}' would be {fld}; keep one")
            )
            continue
        mapping[fld] = index
    if "patient_id" not in mapping:
        problems.append(
            Problem(
                1,
                None,
                "no patient_id column (accepted names: "
                + ", ".join(COLUMN_ALIASES["patient_id"])
                + f"); the header is: {shown(', '.join(table.header), 200)}"
                # a workbook whose table is on another sheet: say which sheets there are
                + "".join(f"; {note}" for note in table.notes),
            )
        )
    return mapping


def _parse_binary(text: str) -> int | None:
    value = text.strip().lower()
    if value in MISSING_VALUES and value not in ("-",):
        return None
    if value in _TRUE:
        return 1
    if value in _FALSE:
        return 0
    raise ValueError(text)


def _parse_event(text: str) -> int | None:
    value = text.strip().lower()
    if value in MISSING_VALUES:
        return None
    if value in ("1", "1.0"):
        return 1
    if value in ("0", "0.0"):
        return 0
    raise ValueError(text)


def _parse_time(text: str, decimal_comma: bool) -> float | None:
    value = parse_number(text, decimal_comma=decimal_comma)
    if value is None:
        return None
    if not math.isfinite(value):
        raise ValueError("not finite")
    if value < 0:
        raise ValueError("negative")
    return value


def _clinical_value(text: str, decimal_comma: bool, numeric: bool) -> object:
    """One clinical cell as stored: one type per column.

    In a numeric column (:func:`numeric_cells`) numbers, integers where
    written so; in any other column the text as written, digits included, so
    that INSS stages read "1", "2", "3", "4", "4S" rather than a mix of
    numbers and text.
    """
    lowered = text.strip().lower()
    if lowered in ALWAYS_MISSING or (numeric and lowered in NUMERIC_MISSING):
        return None
    if not numeric:
        return text
    try:
        number = parse_number(text, decimal_comma=decimal_comma)
    except ValueError:
        return text
    if number is None or not math.isfinite(number):
        return text
    return int(number) if number.is_integer() and "." not in text and "," not in text else number


def validate_table(table: TextTable) -> tuple[list[store_mod.PatientRow], dict[str, int]]:
    """Check every row; return the patients, or raise :class:`TableError` with all problems."""
    problems: list[Problem] = []

    def add(row: int | None, column: str | None, message: str) -> None:
        if len(problems) <= MAX_PROBLEMS:
            problems.append(Problem(row, column, message))

    mapping = _map_columns(table, problems)
    if not table.rows:
        add(None, None, "the table has a header but no data rows")
    if problems:
        raise TableError(table.source, problems)

    header = table.header
    known = set(mapping.values())
    clinical_idx = [i for i in range(len(header)) if i not in known]
    dc = table.decimal_comma
    numeric_clinical = {
        i: numeric_cells([
            None if row[i].strip().lower() in ALWAYS_MISSING
            else row[i].replace(",", ".") if dc else row[i]
            for row in table.rows
        ])
        for i in clinical_idx
    }
    first_seen: dict[str, int] = {}
    patients: list[store_mod.PatientRow] = []

    def col(cells: list[str], fld: str) -> tuple[str, str] | None:
        """(column name, cell) of field ``fld`` in a row, None when the table lacks it."""
        idx = mapping.get(fld)
        return None if idx is None else (header[idx], cells[idx])

    for cells, rownum in zip(table.rows, table.row_numbers):
        id_cell = col(cells, "patient_id")
        assert id_cell is not None  # _map_columns refused a table without patient_id
        name, pid = id_cell
        if pid.lower() in MISSING_VALUES:
            add(rownum, name, "patient_id is empty")
        elif len(pid) > MAX_ID_LENGTH:
            add(rownum, name, f"patient_id is {len(pid)} characters long (at most {MAX_ID_LENGTH})")
        elif (why := identifier_problem(pid)) is not None:
            add(rownum, name, f"patient_id '{shown(pid)}' {why}")
        elif pid in first_seen:
            add(rownum, name, f"patient_id '{pid}' repeats row {first_seen[pid]}")
        else:
            first_seen[pid] = rownum

        flags: dict[str, int | None] = {}  # bm_metastasis, os_event, efs_event: 0/1
        months: dict[str, float | None] = {}  # os_months, efs_months
        cell = col(cells, "bm_metastasis")
        if cell is not None:
            try:
                flags["bm_metastasis"] = _parse_binary(cell[1])
            except ValueError:
                add(rownum, cell[0], f"'{shown(cell[1])}' is not a metastasis status "
                    "(use 1/0, yes/no, positive/negative or true/false)")
        for prefix in ("os", "efs"):
            tcell, ecell = col(cells, f"{prefix}_months"), col(cells, f"{prefix}_event")
            t_value: float | None = None
            e_value: int | None = None
            t_ok = e_ok = True
            if tcell is not None:
                try:
                    t_value = _parse_time(tcell[1], dc)
                except ValueError as exc:
                    t_ok = False
                    reason = str(exc)
                    why = (
                        "is negative" if reason == "negative"
                        else "is not finite" if reason == "not finite"
                        else "is not a number"
                    )
                    add(rownum, tcell[0],
                        f"'{shown(tcell[1])}' {why} (a time in months is expected)")
            if ecell is not None:
                try:
                    e_value = _parse_event(ecell[1])
                except ValueError:
                    e_ok = False
                    add(rownum, ecell[0],
                        f"'{shown(ecell[1])}' is not an event indicator (use 1 or 0)")
            if t_ok and e_ok:
                if e_value is not None and t_value is None:
                    where = tcell[0] if tcell else f"{prefix}_months"
                    add(rownum, where, f"{prefix} event given without a time")
                if t_value is not None and e_value is None:
                    where = ecell[0] if ecell else f"{prefix}_event"
                    add(rownum, where, f"{prefix} time given without an event indicator")
            months[f"{prefix}_months"] = t_value
            flags[f"{prefix}_event"] = e_value

        clinical = {header[i]: _clinical_value(cells[i], dc, numeric_clinical[i])
                    for i in clinical_idx}
        patients.append(
            store_mod.PatientRow(
                patient_id=pid,
                bm_metastasis=flags.get("bm_metastasis"),
                os_months=months.get("os_months"),
                os_event=flags.get("os_event"),
                efs_months=months.get("efs_months"),
                efs_event=flags.get("efs_event"),
                clinical=clinical,
            )
        )
    if problems:
        truncated = len(problems) > MAX_PROBLEMS
        raise TableError(table.source, problems[:MAX_PROBLEMS], truncated)
    return patients, mapping


def import_cohort(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    csv_path: str | os.PathLike[str] | None,
    *,
    role: str = "validation",
    center: str | None = None,
    replace: bool = False,
    data: bytes | None = None,
    name: str | None = None,
    dry_run: bool = False,
    encoding: str | None = None,
    sheet: str | int | None = None,
) -> ImportResult:
    """Validate a clinical table and, if it is valid, store it as ``cohort``.

    ``db`` is an open :class:`~cmil_core.store.Store` or a path to one.
    ``data``/``name`` read an upload instead of a file. ``encoding`` overrides
    the detected encoding of a text table, ``sheet`` (name or 1-based number)
    chooses a workbook's sheet. ``dry_run`` validates only. On any problem
    raises :class:`TableError` (an ``InputError``) and writes nothing.
    """
    cohort = cohort.strip()
    if not cohort or len(cohort) > MAX_COHORT_LENGTH or any(ch in cohort for ch in "/\\\0"):
        raise InputError(
            f"cohort name '{shown(cohort)}' is not allowed "
            f"(1-{MAX_COHORT_LENGTH} characters, no slashes)"
        )
    if (why := identifier_problem(cohort)) is not None:
        raise InputError(f"cohort name '{shown(cohort)}' is not allowed: it {why}")
    if role not in _ROLES:
        raise InputError(f"role {role!r} is not one of {', '.join(_ROLES)}")
    source = name or Path(str(csv_path)).name
    table = read_table(csv_path or source, data=data, name=source, encoding=encoding, sheet=sheet)
    patients, mapping = validate_table(table)
    result = ImportResult(
        cohort=cohort,
        source=source,
        patients=len(patients),
        positives=sum(p.bm_metastasis == 1 for p in patients),
        negatives=sum(p.bm_metastasis == 0 for p in patients),
        unlabelled=sum(p.bm_metastasis is None for p in patients),
        columns={fld: table.header[i] for fld, i in mapping.items()},
        clinical_columns=[h for i, h in enumerate(table.header) if i not in mapping.values()],
        rows=patients,
        encoding=table.encoding,
        sheet=table.sheet,
        notes=list(table.notes),
    )
    if dry_run:
        return result
    own = not isinstance(db, store_mod.Store)
    store = db if isinstance(db, store_mod.Store) else store_mod.open_store(db)
    try:
        store_mod.import_patients(
            store, cohort, patients, role=role, center=center, source_file=source, replace=replace
        )
    finally:
        if own:
            store.close()
    return result


# --- previews and problem tables for the dashboard ---

_CONTRACT_COLUMNS = (
    "patient_id", "bm_metastasis", "os_months", "os_event", "efs_months", "efs_event",
)
_ROW_IN_MESSAGE = re.compile(r"\brow (\d+)\b")
_COLUMN_IN_MESSAGE = re.compile(r"\bcolumn '([^']*)'")


@dataclass(frozen=True)
class TablePreview:
    """A clinical table that passed validation, as the import would store it.

    ``frame`` holds the parsed values, one row per patient, indexed by the
    file's row number: the contract columns the file has (typed: labels and
    events as 0/1, times as numbers), then the clinical columns as read.
    ``mapping`` lists which column of the file became which contract column.
    A clinical column mixing text and numbers is shown as text.
    """

    source: str
    patients: int
    positives: int
    negatives: int
    unlabelled: int
    columns: dict[str, str]
    clinical_columns: list[str]
    frame: pd.DataFrame
    mapping: pd.DataFrame
    encoding: str = "utf-8"
    sheet: str | None = None
    sheets: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def preview_table(
    data: bytes, name: str, *, encoding: str | None = None, sheet: str | int | None = None
) -> TablePreview:
    """Validate an uploaded clinical table (bytes and file name) without writing anything.

    Raises :class:`TableError` (every problem, with row and column) or
    :class:`InputError` (an unreadable file) exactly as :func:`import_cohort`
    would; :func:`problems_frame` turns either into a table.

    >>> p = preview_table(b"ID,BM status,age\\nP1,yes,3\\nP2,no,5\\n", "c.csv")
    >>> p.patients, p.positives, p.columns
    (2, 1, {'patient_id': 'ID', 'bm_metastasis': 'BM status'})
    >>> int(p.frame.loc[3, "bm_metastasis"]), int(p.frame.loc[3, "age"])
    (0, 5)
    """
    table = read_table(name, data=data, name=name, encoding=encoding, sheet=sheet)
    patients, mapping = validate_table(table)
    fields = [f for f in _CONTRACT_COLUMNS if f in mapping or f == "patient_id"]
    clinical = [h for i, h in enumerate(table.header) if i not in mapping.values()]
    columns: dict[str, object] = {}
    for fld in fields:
        values = [getattr(p, fld) for p in patients]
        is_int = fld in ("bm_metastasis", "os_event", "efs_event")
        columns[fld] = pd.array(values, dtype="Int64" if is_int else None) if fld != "patient_id" \
            else values
    for name_ in clinical:
        values = [(p.clinical or {}).get(name_) for p in patients]
        if not all(v is None or isinstance(v, (int, float)) for v in values):
            # Text and numbers mixed (e.g. "4S" among stages 1-4): keep it all as text.
            values = [None if v is None else str(v) for v in values]
        columns[name_] = values
    frame = pd.DataFrame(columns, index=pd.Index(table.row_numbers, name="row"))
    mapping_frame = pd.DataFrame(
        {
            "contract column": list(_CONTRACT_COLUMNS) + ["clinical"] * len(clinical),
            "column in the file": [
                table.header[mapping[f]] if f in mapping else None for f in _CONTRACT_COLUMNS
            ] + clinical,
        }
    )
    return TablePreview(
        source=name,
        patients=len(patients),
        positives=sum(p.bm_metastasis == 1 for p in patients),
        negatives=sum(p.bm_metastasis == 0 for p in patients),
        unlabelled=sum(p.bm_metastasis is None for p in patients),
        columns={fld: table.header[i] for fld, i in mapping.items()},
        clinical_columns=clinical,
        frame=frame,
        mapping=mapping_frame,
        encoding=table.encoding,
        sheet=table.sheet,
        sheets=tuple(sheet_names(data, name)) if table.sheet is not None else (),
        notes=table.notes,
    )


def problems_frame(error: InputError) -> pd.DataFrame:
    """The problems of a refused table as rows of (row, column, problem).

    A :class:`TableError` gives one row per problem (a last row says when the
    list was cut at :data:`MAX_PROBLEMS`). Any other :class:`InputError` (an
    empty, binary or ragged file) gives one row; its row and column are read
    from the message's ``row N`` and ``column 'X'`` when it names them. Row
    numbers are the file's lines as a spreadsheet shows them (header = 1).
    """
    rows: list[tuple[int | None, str | None, str]] = []
    if isinstance(error, TableError):
        rows = [(p.row, p.column, p.message) for p in error.problems]
        if error.truncated:
            rows.append(
                (None, None, f"more problems not listed (the first {MAX_PROBLEMS} are shown)")
            )
    else:
        message = str(error)
        row = _ROW_IN_MESSAGE.search(message)
        column = _COLUMN_IN_MESSAGE.search(message)
        source, sep, rest = message.partition(": ")
        text = rest if sep and " " not in source.strip() else message
        rows = [(int(row.group(1)) if row else None, column.group(1) if column else None, text)]
    return pd.DataFrame(
        {
            "row": pd.array([r[0] for r in rows], dtype="Int64"),
            "column": [r[1] for r in rows],
            "problem": [r[2] for r in rows],
        }
    )
