"""Reading the clinical tables people export from spreadsheets: text or Excel.

:func:`read_table` accepts comma-, semicolon-, tab- and pipe-separated text
files and Excel workbooks (``.xlsx``, by content; :mod:`cmil_core.clinical.workbook`:
one sheet, by default the first). With semicolons, decimal commas (``12,5``)
are read as decimal numbers, as that is what those exports mean.

Encodings. A byte-order mark decides (UTF-8, UTF-16, UTF-32). Without one:
UTF-16 is recognised by its NUL bytes; text that is valid UTF-8 is UTF-8;
anything else is one of :data:`LEGACY_ENCODINGS` (GB18030/GBK, Big5,
Shift-JIS, EUC-KR as Windows writes them, cp1252, Latin-1), chosen by
charset-normalizer among the encodings that decode every byte and give the
same bytes back. When they read differently and the detector has no clear
winner (a short table with a few CJK characters reads as Chinese, Japanese
and Korean alike) the file is refused with the candidates named; the
caller's ``encoding`` (``--encoding NAME``) overrides. Text that does not
round-trip (decode, encode, same bytes) is never imported.

Rows are numbered by the line of the file they end on, which is the row number
a spreadsheet shows (header row 1, first data row 2) unless a quoted cell holds
a line break. That number is what error messages quote.

Every cell is kept as text (stripped); the callers decide types, so that
their messages can quote the original value. Missing values depend on the
column: :data:`ALWAYS_MISSING` (empty, NA, N/A, NaN, null, any case) in
every column, :data:`NUMERIC_MISSING` (none, ``-``, ``?``, ``.``, missing)
only in numeric columns; a categorical column keeps them as values.

Hostile or mistaken files are refused with one line that says what the file
is: an empty file, a binary file (a gzip or zip archive, an old ``.xls``
workbook, a PDF or an image handed over as a table), more than
:data:`MAX_TABLE_BYTES` bytes or :data:`MAX_COLUMNS` columns, a quote that
is never closed, a ragged row.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmil_core.clinical.workbook import is_workbook, read_sheet
from cmil_core.errors import InputError, shown

__all__ = [
    "ALWAYS_MISSING", "ENCODING_CHOICES", "LEGACY_ENCODINGS", "MAX_COLUMNS", "MAX_TABLE_BYTES",
    "MISSING_VALUES", "NUMERIC_MISSING", "TextTable", "is_number", "numeric_cells",
    "numeric_columns", "parse_number", "read_frame", "read_table", "to_frame", "unicode_text",
]

MAX_TABLE_BYTES = 100 * 1024 * 1024
MAX_COLUMNS = 10_000
# Missing in every column: an empty cell and the usual "not available" spellings (any case).
ALWAYS_MISSING = frozenset({"", "na", "n/a", "nan", "null"})
# Missing only in numeric columns (times, events, scores, labels); in a categorical column
# they are values ("none" as a treatment, "-" for a 1p deletion status).
NUMERIC_MISSING = frozenset({"none", ".", "-", "?", "missing"})
# Every token read as missing in a numeric column.
MISSING_VALUES = ALWAYS_MISSING | NUMERIC_MISSING
# The encodings tried, in this order, on a file that is not UTF-8 or UTF-16: Chinese
# (GB18030 holds GBK and GB2312), Traditional Chinese, Japanese and Korean as Windows
# writes them (cp950, cp932, cp949: supersets of Big5, Shift-JIS and EUC-KR), then
# Western European.
LEGACY_ENCODINGS = ("gb18030", "big5", "cp950", "cp932", "shift_jis", "cp949", "euc_kr",
                    "cp1252", "latin_1")
_ENCODING_LABELS = {
    "gb18030": "GB18030 (Chinese, holds GBK)", "big5": "Big5 (Traditional Chinese)",
    "cp950": "cp950 (Traditional Chinese)", "cp932": "cp932 (Japanese Shift-JIS)",
    "shift_jis": "Shift-JIS (Japanese)", "cp949": "cp949 (Korean EUC-KR)",
    "euc_kr": "EUC-KR (Korean)", "cp1252": "cp1252 (Western European)",
    "latin_1": "Latin-1",
}
# The encodings offered by name (the Cohorts page's choice; --encoding takes any Python codec).
ENCODING_CHOICES = ("utf-8", "utf-16", "gb18030", "gbk", "big5", "shift_jis", "cp932",
                    "euc_kr", "cp949", "cp1252", "latin_1")
_CHAOS_MARGIN = 0.05
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
    sheet: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def decimal_comma(self) -> bool:
        return self.delimiter == ";"


# What a binary file that is not a table usually is, by its first bytes.
_MAGIC = (
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first"),
    (b"PK\x03\x04", "a zip archive (and not an Excel .xlsx workbook)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\xd0\xcf\x11\xe0", "an old Excel .xls workbook; save it as .xlsx or CSV"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BZh", "a bzip2-compressed file; decompress it first"),
    (b"\xfd7zXZ", "an xz-compressed file; decompress it first"),
    (b"7z\xbc\xaf", "a 7-zip archive"),
)


def _line_of(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


def _strict(data: bytes, encoding: str) -> str | None:
    """``data`` decoded as ``encoding`` when it decodes strictly and round-trips, else None."""
    try:
        text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None
    try:
        if text.encode(encoding) != data:
            return None
    except UnicodeEncodeError:
        return None
    return text


def _canonical(encoding: str) -> str:
    """Python's name of a codec (``GBK`` -> ``gbk``, ``utf8`` -> ``utf-8``); InputError if
    unknown."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise InputError(
            f"--encoding {shown(encoding)}: not an encoding Python knows (try one of "
            f"{', '.join(ENCODING_CHOICES)})"
        ) from None


def _decode_as(data: bytes, encoding: str, source: str) -> tuple[str, str]:
    """``data`` decoded as the encoding the user chose; refused if it does not round-trip."""
    name = _canonical(encoding)
    body = data
    if name in ("utf-8", "utf-8-sig") and data.startswith(codecs.BOM_UTF8):
        body, name = data[len(codecs.BOM_UTF8):], "utf-8-sig"
        codec = "utf-8"
    elif name == "utf-16" and data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        codec = "utf-16-le" if data.startswith(codecs.BOM_UTF16_LE) else "utf-16-be"
        body = data[2:]
    elif name == "utf-16":
        codec = "utf-16-le"  # no byte-order mark: Windows' order
    else:
        codec = "utf-8" if name == "utf-8-sig" else name
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(data) - len(body))
        raise InputError(
            f"{source}: cannot be read as {encoding}: the bytes at line "
            f"{_line_of(data, offset)} (byte {offset}: {body[exc.start:exc.start + 4].hex(' ')}) "
            "are not valid there; choose another encoding"
        ) from None
    if text.encode(codec) != body:
        raise InputError(
            f"{source}: reading it as {encoding} does not give back the same bytes; "
            "refused (choose the encoding the file was saved in)"
        )
    return text, name


def _utf16_without_bom(data: bytes) -> str | None:
    """The byte order of UTF-16 text without a byte-order mark, by where its NUL bytes are.

    ASCII characters (digits, separators, line ends: every table has many) are
    a NUL byte and their code in UTF-16; in little-endian order the NULs sit at
    odd offsets, in big-endian at even ones.
    """
    sample = data[:65536]
    if len(sample) < 4:
        return None
    sample = sample[: len(sample) // 2 * 2]
    even, odd = sample[0::2], sample[1::2]
    even_nul, odd_nul = even.count(0) / len(even), odd.count(0) / len(odd)
    if odd_nul >= 0.2 and even_nul <= 0.02:
        return "utf-16-le"
    if even_nul >= 0.2 and odd_nul <= 0.02:
        return "utf-16-be"
    return None


def _looks_like_text(text: str) -> bool:
    """No NUL and (almost) no other control character: text, not binary data."""
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\r\n")
    return "\x00" not in text and controls <= len(text) // 1000


def _detect(data: bytes, source: str) -> tuple[str, str]:
    """A legacy (non-Unicode) encoding by charset-normalizer, among :data:`LEGACY_ENCODINGS`.

    Only encodings that decode every byte strictly and give the bytes back
    count. One text from all of them: taken. Several different texts: the
    detector's best is taken only when its mess measure ("chaos") beats the
    next different text by :data:`_CHAOS_MARGIN`; otherwise the file is
    refused, naming the candidates (short tables with a few CJK characters
    decode as Chinese, Japanese and Korean alike).
    """
    from charset_normalizer import from_bytes

    strict = {enc: text for enc in LEGACY_ENCODINGS if (text := _strict(data, enc)) is not None}
    if not strict:
        raise InputError(
            f"{source}: cannot be decoded as UTF-8, UTF-16 or any of "
            f"{', '.join(LEGACY_ENCODINGS)}; save it as UTF-8 CSV, or give --encoding"
        )
    texts = set(strict.values())
    if len(texts) == 1:
        return next(iter(texts)), next(iter(strict))
    matches = [m for m in from_bytes(data, cp_isolation=list(strict)) if m.encoding in strict]
    ranked: list[tuple[float, str]] = []
    seen: set[str] = set()
    for match in sorted(matches, key=lambda m: m.chaos):
        text = strict[match.encoding]
        if text in seen:
            continue
        seen.add(text)
        ranked.append((float(match.chaos), match.encoding))
    if ranked and (len(ranked) == 1 or ranked[1][0] - ranked[0][0] >= _CHAOS_MARGIN):
        encoding = ranked[0][1]
        return strict[encoding], encoding
    candidates = [enc for _, enc in ranked] or list(strict)
    named = ", ".join(_ENCODING_LABELS.get(c, c) for c in candidates)
    raise InputError(
        f"{source}: the encoding cannot be told for sure: the file reads differently as "
        f"{named}; give the right one (--encoding NAME, or the encoding choice on the "
        "Cohorts page), or save the table as UTF-8"
    )


def unicode_text(data: bytes) -> bool:
    """Whether ``data`` is Unicode text beyond doubt: a byte-order mark, or valid UTF-8
    (then no encoding needs choosing)."""
    boms = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    return data.startswith(boms) or _strict(data, "utf-8") is not None


def _decode(data: bytes, source: str, encoding: str | None = None) -> tuple[str, str]:
    if encoding:
        return _decode_as(data, encoding, source)
    for bom, codec, name in (
        (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32"),
        (codecs.BOM_UTF8, "utf-8", "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16"),
    ):
        if data.startswith(bom):
            text = _strict(data[len(bom):], codec)
            if text is None:
                raise InputError(
                    f"{source}: starts as {name.upper()} text but cannot be decoded (or does "
                    "not give back the same bytes)"
                )
            return text, name
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise InputError(f"{source}: this is not a text table: it is {what}")
    if b"\x00" in data[:65536]:
        order = _utf16_without_bom(data)
        text = None if order is None else _strict(data, order)
        if text is not None and order is not None and _looks_like_text(text):
            return text, order
        raise InputError(
            f"{source}: this is not a text table (it contains binary data; "
            "save it as UTF-8 CSV)"
        )
    text = _strict(data, "utf-8")
    if text is not None:
        return text, "utf-8"
    return _detect(data, source)


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


def read_table(
    path: str | os.PathLike[str],
    *,
    data: bytes | None = None,
    name: str | None = None,
    encoding: str | None = None,
    sheet: str | int | None = None,
) -> TextTable:
    """Read a delimited text table or an Excel workbook's sheet from ``path`` (or ``data``).

    ``data`` bytes (e.g. an upload) are read under ``name``. ``encoding``
    overrides the detection of a text file's encoding; ``sheet`` (a name or a
    1-based number) chooses a workbook's sheet, by default the first (a note
    in ``notes`` says which when there are several). Raises
    :class:`InputError` for an empty, binary or ragged file, an encoding that
    cannot be told, a refused workbook, naming the file and the row or cell.

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
    if is_workbook(data):
        if encoding:
            raise InputError(f"{source}: an Excel workbook has no text encoding; drop --encoding")
        found = read_sheet(data, source, sheet)
        return TextTable(source, found.header, found.rows, found.row_numbers, ",", "xlsx",
                         found.name, tuple(found.notes))
    if sheet is not None and str(sheet).strip():
        raise InputError(f"{source}: --sheet applies to Excel workbooks; this is a text table")
    text, encoding = _decode(data, source, encoding)
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
    """The number a cell of a numeric column holds, None when it is missing
    (:data:`MISSING_VALUES`); ValueError when it is not a number.

    >>> parse_number("3,5", decimal_comma=True), parse_number("NA"), parse_number("?")
    (3.5, None, None)
    """
    value = text.strip()
    if value.lower() in MISSING_VALUES:
        return None
    if decimal_comma and _DECIMAL_COMMA.match(value):
        value = value.replace(",", ".")
    return float(value)


def is_number(text: str) -> bool:
    """Whether ``text`` (decimal commas already turned to points) is a finite number."""
    try:
        return "_" not in text and math.isfinite(float(text))
    except ValueError:
        return False


def numeric_cells(values: Sequence[str | None]) -> bool:
    """Whether a column with these cells is numeric: every present cell that is not a
    numeric-only missing token (:data:`NUMERIC_MISSING`) is a number, and one at least is."""
    present = [v for v in values if v is not None and v.strip().lower() not in NUMERIC_MISSING]
    return bool(present) and all(is_number(v) for v in present)


def to_frame(table: TextTable) -> pd.DataFrame:
    """The table as a DataFrame of text cells, indexed by file row number.

    Cells missing in every column (:data:`ALWAYS_MISSING`: empty, NA, N/A,
    NaN, null) become None; every other text is kept, ``none`` and ``-``
    included (a categorical value; :func:`numeric_columns` and
    :mod:`cmil_core.clinical.missing` read them as missing in numeric columns). With
    semicolons, decimal commas become decimal points, so the statistics read
    the numbers a spreadsheet shows. Columns keep the header's names
    (duplicates refused).
    """
    seen: set[str] = set()
    for name in table.header:
        if name in seen:
            raise InputError(
                f"{table.source}: column '{shown(name)}' appears twice in the header"
            )
        seen.add(name)

    def clean(cell: str) -> str | None:
        if cell.lower() in ALWAYS_MISSING:
            return None
        if table.decimal_comma and _DECIMAL_COMMA.match(cell):
            return cell.replace(",", ".")
        return cell

    data = {
        name: [clean(row[i]) for row in table.rows] for i, name in enumerate(table.header)
    }
    frame = pd.DataFrame(data, index=pd.Index(table.row_numbers, name="row"), dtype=object)
    frame.attrs["source"] = table.source
    frame.attrs["encoding"] = table.encoding
    frame.attrs["sheet"] = table.sheet
    frame.attrs["notes"] = tuple(table.notes)
    return frame


def numeric_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy in which every numeric column (:func:`numeric_cells`) is float, its
    :data:`NUMERIC_MISSING` tokens NaN; other columns keep every text as a value."""
    out = frame.copy()
    for name in out.columns:
        values = out[name].tolist()
        if all(v is None or isinstance(v, str) for v in values) and numeric_cells(values):
            out[name] = [
                math.nan if v is None or v.strip().lower() in NUMERIC_MISSING else float(v)
                for v in values
            ]
            out[name] = out[name].astype(float)
    return out


def read_frame(
    path: str | os.PathLike[str],
    *,
    numeric: bool = True,
    encoding: str | None = None,
    sheet: str | int | None = None,
) -> pd.DataFrame:
    """A file as a DataFrame indexed by row number: :func:`read_table`, :func:`to_frame`,
    then (with ``numeric``) :func:`numeric_columns`. ``frame.attrs`` holds the file's
    ``source``, ``encoding``, ``sheet`` and ``notes``."""
    frame = to_frame(read_table(path, encoding=encoding, sheet=sheet))
    return numeric_columns(frame) if numeric else frame
