"""Reading the delimited text tables people export from spreadsheets.

:func:`read_table` accepts comma-, semicolon-, tab- and pipe-separated files,
UTF-8 with or without a byte-order mark, and Windows-1252 / Latin-1 (what
Excel writes on many European machines). With semicolons, decimal commas
(``12,5``) are read as decimal numbers, as that is what those exports mean.

Rows are numbered by the line of the file they end on, which is the row number
a spreadsheet shows (header row 1, first data row 2) unless a quoted cell holds
a line break. That number is what error messages quote.

Every cell is kept as text (stripped); the callers decide types, so that
their messages can quote the original value.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmil_core.errors import InputError

__all__ = [
    "MAX_TABLE_BYTES", "MISSING_VALUES", "TextTable", "numeric_columns", "parse_number",
    "read_frame", "read_table", "to_frame",
]

MAX_TABLE_BYTES = 100 * 1024 * 1024
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "null", "none", ".", "-", "?", "missing"})
_DELIMITERS = ",;\t|"
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


@dataclass(frozen=True)
class TextTable:
    """A table read from a file: header, data rows and where each row came from."""

    source: str
    header: list[str]
    rows: list[list[str]]
    row_numbers: list[int]
    delimiter: str
    encoding: str

    @property
    def decimal_comma(self) -> bool:
        return self.delimiter == ";"


def _decode(data: bytes, source: str) -> tuple[str, str]:
    if b"\x00" in data[:65536]:
        raise InputError(f"{source}: this is not a text table (it contains binary data)")
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise InputError(f"{source}: cannot decode the file as UTF-8 or Latin-1")  # pragma: no cover


def _sniff_delimiter(text: str) -> str:
    sample_lines = [line for line in text.splitlines()[:50] if line.strip()]
    sample = "\n".join(sample_lines)
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        pass
    header = sample_lines[0] if sample_lines else ""
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def read_table(path: str | Path, *, data: bytes | None = None, name: str | None = None) -> TextTable:
    """Read a delimited text table from ``path`` (or from ``data`` bytes, e.g. an upload).

    Raises :class:`InputError` for an empty, binary or ragged file, naming the
    file and the row.

    >>> import tempfile, os
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
    >>> _ = f.write("patient_id;age\\nP1;3,5\\n"); f.close()
    >>> t = read_table(f.name); t.delimiter, t.rows
    (';', [['P1', '3,5']])
    """
    source = name or Path(path).name
    if data is None:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{source}: no such file")
        if p.is_dir():
            raise InputError(f"{source}: is a folder, not a table")
        size = p.stat().st_size
        if size > MAX_TABLE_BYTES:
            raise InputError(f"{source}: {size} bytes is too large for a clinical table")
        data = p.read_bytes()
    if len(data) > MAX_TABLE_BYTES:
        raise InputError(f"{source}: {len(data)} bytes is too large for a clinical table")
    text, encoding = _decode(data, source)
    if not text.strip():
        raise InputError(f"{source}: the file is empty")
    delimiter = _sniff_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    numbers: list[int] = []
    try:
        for record in reader:
            # csv counts physical lines; with quoted newlines a record spans several.
            row_number = reader.line_num
            if header is None:
                if not any(cell.strip() for cell in record):
                    continue
                header = [cell.strip() for cell in record]
                continue
            if not any(cell.strip() for cell in record):
                continue  # blank line
            if len(record) != len(header):
                raise InputError(
                    f"{source}: row {row_number} has {len(record)} fields, "
                    f"the header has {len(header)} (check the separator and quoting)"
                )
            rows.append([cell.strip() for cell in record])
            numbers.append(row_number)
    except csv.Error as exc:
        raise InputError(f"{source}: row {reader.line_num}: cannot parse ({exc})") from exc
    if header is None:
        raise InputError(f"{source}: the file is empty")
    return TextTable(source, header, rows, numbers, delimiter, encoding)


def parse_number(text: str, *, decimal_comma: bool = False) -> float | None:
    """The number a cell holds, None when it is missing; ValueError when it is not a number.

    >>> parse_number("3,5", decimal_comma=True), parse_number("NA")
    (3.5, None)
    """
    value = text.strip()
    if value.lower() in MISSING_VALUES:
        return None
    if decimal_comma and _DECIMAL_COMMA.match(value):
        value = value.replace(",", ".")
    return float(value)


def to_frame(table: TextTable) -> pd.DataFrame:
    """The table as a DataFrame of text cells, indexed by file row number.

    Missing values (:data:`MISSING_VALUES`) become None; with semicolons,
    decimal commas become decimal points, so the statistics read the numbers
    a spreadsheet shows. Columns keep the header's names (duplicates refused).
    """
    seen: set[str] = set()
    for name in table.header:
        if name in seen:
            raise InputError(f"{table.source}: column '{name}' appears twice in the header")
        seen.add(name)

    def clean(cell: str) -> str | None:
        if cell.lower() in MISSING_VALUES:
            return None
        if table.decimal_comma and _DECIMAL_COMMA.match(cell):
            return cell.replace(",", ".")
        return cell

    data = {
        name: [clean(row[i]) for row in table.rows] for i, name in enumerate(table.header)
    }
    return pd.DataFrame(data, index=pd.Index(table.row_numbers, name="row"), dtype=object)


def numeric_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy in which every column whose present cells are all numbers is float."""
    out = frame.copy()
    for name in out.columns:
        present = out[name].dropna()
        if present.empty:
            continue
        converted = pd.to_numeric(present, errors="coerce")
        if converted.notna().all():
            out[name] = pd.to_numeric(out[name], errors="coerce").astype(float)
    return out


def read_frame(path: str | Path, *, numeric: bool = True) -> pd.DataFrame:
    """A file as a DataFrame indexed by row number: :func:`read_table`, :func:`to_frame`,
    then (with ``numeric``) :func:`numeric_columns`."""
    frame = to_frame(read_table(path))
    return numeric_columns(frame) if numeric else frame
