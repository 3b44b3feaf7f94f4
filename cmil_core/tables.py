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

Hostile or mistaken files are refused with one line that says what the file
is: an empty file, a binary file (a gzip or zip archive, an Excel workbook, a
PDF or an image handed over as a table), more than :data:`MAX_TABLE_BYTES`
bytes or :data:`MAX_COLUMNS` columns, a quote that is never closed, a ragged
row. UTF-16 text (Excel's "Unicode text") is read when it starts with its
byte-order mark.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmil_core.errors import InputError, shown

__all__ = [
    "MAX_COLUMNS", "MAX_TABLE_BYTES", "MISSING_VALUES", "TextTable", "numeric_columns",
    "parse_number", "read_frame", "read_table", "to_frame",
]

MAX_TABLE_BYTES = 100 * 1024 * 1024
MAX_COLUMNS = 10_000
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "null", "none", ".", "-", "?", "missing"})
_DELIMITERS = ",;\t|"
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


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


# What a binary file that is not a table usually is, by its first bytes.
_MAGIC = (
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first"),
    (b"PK\x03\x04", "a zip archive (an Excel .xlsx workbook is one); save the sheet as CSV"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\xd0\xcf\x11\xe0", "an old Excel .xls workbook; save the sheet as CSV"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BZh", "a bzip2-compressed file; decompress it first"),
    (b"\xfd7zXZ", "an xz-compressed file; decompress it first"),
    (b"7z\xbc\xaf", "a 7-zip archive"),
)


def _decode(data: bytes, source: str) -> tuple[str, str]:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise InputError(f"{source}: starts as UTF-16 text but cannot be decoded") from None
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise InputError(f"{source}: this is not a text table: it is {what}")
    if b"\x00" in data[:65536]:
        raise InputError(
            f"{source}: this is not a text table (it contains binary data; "
            "UTF-16 text needs its byte-order mark, or save it as UTF-8 CSV)"
        )
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise InputError(f"{source}: cannot decode the file as UTF-8 or Latin-1")  # pragma: no cover


def _lines(text: str, limit: int | None = None) -> list[str]:
    """The file's lines as the csv reader sees them: broken at CR, LF or CRLF only.

    (``str.splitlines`` also breaks at form feeds, ``\\x1c``-``\\x1e`` and
    Unicode line separators, which a table may hold inside a cell.)
    """
    return _LINE_BREAK.split(text, maxsplit=limit or 0)[: limit or None]


def _sniff_delimiter(text: str) -> str:
    sample_lines = [line for line in _lines(text, 50) if line.strip()]
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
    if "\x00" in text:
        raise InputError(f"{source}: this is not a text table (it contains NUL characters)")
    if not text.strip():
        raise InputError(f"{source}: the file is empty")
    first = next((line for line in _lines(text, 50) if line.strip()), None) or next(
        line for line in _lines(text) if line.strip()
    )
    widest = max(first.count(d) for d in _DELIMITERS) + 1
    if widest > MAX_COLUMNS:
        raise InputError(
            f"{source}: the header has about {widest} columns; at most {MAX_COLUMNS} are read"
        )
    delimiter = _sniff_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    numbers: list[int] = []
    started = 1  # the line the record being read starts on
    try:
        for record in reader:
            # csv counts physical lines; with quoted newlines a record spans several.
            row_number = reader.line_num
            started = row_number + 1
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
        if "unexpected end of data" in str(exc):
            raise InputError(
                f"{source}: row {started}: a quote opened in this row is never closed "
                "(check the quoting)"
            ) from exc
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
            raise InputError(
                f"{table.source}: column '{shown(name)}' appears twice in the header"
            )
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
