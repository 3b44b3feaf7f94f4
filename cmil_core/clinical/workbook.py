"""Reading a clinical table from an Excel workbook (``.xlsx``, ``.xlsm``) with openpyxl.

:func:`read_sheet` returns one sheet as text cells, as :func:`cmil_core.clinical.tables.read_table`
does for delimited text, so the import and the statistics treat both alike:

* the sheet is chosen by name or by 1-based position (``--sheet Patients`` or
  ``--sheet 2``); by default the first worksheet, and when the workbook has
  several a note says which one was read;
* the header is the first row with a value; empty rows are skipped; rows are
  numbered as Excel shows them (the header is usually row 1);
* values are read as typed: numbers as numbers (``3`` for an integer typed as
  ``3.0``), dates as ISO dates (``2021-03-04``, or ``2021-03-04T10:30:00`` with
  a time), booleans as ``TRUE``/``FALSE``;
* refused, with the cell address: a merged cell range (``B1:C1``: a merged
  header would give columns without names; merged data cells would leave
  blanks), a formula without a saved value (a workbook written by a program
  that never calculated it; open and save it in Excel), an Excel error value
  (``#DIV/0!``), a formula whose saved value is used otherwise.

Old ``.xls`` workbooks are not read (save them as ``.xlsx`` or CSV).
"""

from __future__ import annotations

import datetime as dt
import io
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

from cmil_core.errors import InputError, shown

__all__ = ["MAX_SHEET_CELLS", "Sheet", "is_workbook", "read_sheet", "sheet_names"]

MAX_SHEET_CELLS = 5_000_000


@dataclass(frozen=True)
class Sheet:
    """One worksheet as text: header, rows, their Excel row numbers, and which sheet it was."""

    name: str
    header: list[str]
    rows: list[list[str]]
    row_numbers: list[int]
    sheets: list[str]
    notes: list[str]


def is_workbook(data: bytes) -> bool:
    """Whether ``data`` is a zip archive holding an Excel workbook (``xl/workbook.xml``)."""
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return "xl/workbook.xml" in archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _load(data: bytes, source: str, *, values: bool) -> Any:
    """An openpyxl ``Workbook`` (openpyxl has no type information: Any)."""
    from openpyxl import load_workbook

    try:
        with warnings.catch_warnings():
            # openpyxl warns about styles, data validation and other parts it does not read.
            warnings.simplefilter("ignore")
            return load_workbook(io.BytesIO(data), data_only=values, read_only=False)
    except Exception as exc:  # noqa: BLE001 - openpyxl raises many kinds on a damaged file
        raise InputError(
            f"{source}: an Excel workbook that cannot be read ({exc.__class__.__name__}: "
            f"{shown(str(exc), 120)}); open it in Excel and save it again, or save the sheet as CSV"
        ) from None


def sheet_names(data: bytes, source: str = "workbook") -> list[str]:
    """The names of the workbook's worksheets, in order (chart sheets left out)."""
    book = _load(data, source, values=True)
    try:
        return [ws.title for ws in book.worksheets]
    finally:
        book.close()


def _choose(names: list[str], sheet: str | int | None, source: str) -> tuple[int, list[str]]:
    if not names:
        raise InputError(f"{source}: the workbook has no worksheet")
    if sheet is None or (isinstance(sheet, str) and not sheet.strip()):
        notes = []
        if len(names) > 1:
            notes.append(
                f"the workbook has {len(names)} sheets ({', '.join(repr(n) for n in names)}); "
                f"read the first, {names[0]!r} (choose another with --sheet NAME or NUMBER)"
            )
        return 0, notes
    if isinstance(sheet, str) and sheet in names:
        return names.index(sheet), []
    text = str(sheet).strip()
    if isinstance(sheet, str):
        folded = [n for n in names if n.strip().casefold() == text.casefold()]
        if len(folded) == 1:
            return names.index(folded[0]), []
    if text.isdigit():
        index = int(text)
        if 1 <= index <= len(names):
            return index - 1, []
        raise InputError(
            f"{source}: sheet number {index} does not exist; the workbook has {len(names)} "
            f"sheet(s): {', '.join(repr(n) for n in names)} (numbers start at 1)"
        )
    raise InputError(
        f"{source}: no sheet named {shown(text)!r}; sheets are: "
        + ", ".join(repr(n) for n in names)
    )


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0, 0):
            return value.date().isoformat()
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    return str(value).strip()


def read_sheet(data: bytes, source: str, sheet: str | int | None = None) -> Sheet:
    """One worksheet of the workbook ``data`` as text cells (see the module docstring).

    Raises :class:`InputError` naming the file, the sheet and the cell.
    """
    formulas = _load(data, source, values=False)
    cached = _load(data, source, values=True)
    try:
        names = [ws.title for ws in formulas.worksheets]
        index, notes = _choose(names, sheet, source)
        ws_f = formulas.worksheets[index]
        ws_v = cached.worksheets[index]
        where = f"{source}, sheet {ws_f.title!r}"
        merged = sorted(ws_f.merged_cells.ranges, key=lambda r: (r.min_row, r.min_col))
        if merged:
            first = merged[0]
            listed = ", ".join(str(r.coord) for r in merged[:5])
            more = f" and {len(merged) - 5} more" if len(merged) > 5 else ""
            raise InputError(
                f"{where}: cells {listed}{more} are merged (cell {first.start_cell.coordinate} "
                "spans several columns or rows); unmerge them so every column has its own "
                "name and every row its own values"
            )
        max_row, max_col = ws_f.max_row, ws_f.max_column
        if max_row * max_col > MAX_SHEET_CELLS:
            raise InputError(
                f"{where}: {max_row} rows x {max_col} columns is too large for a clinical table"
            )
        grid: list[tuple[int, list[str]]] = []
        for row_f, row_v in zip(ws_f.iter_rows(), ws_v.iter_rows()):
            texts: list[str] = []
            for cell_f, cell_v in zip(row_f, row_v):
                if cell_f.data_type == "f" and cell_v.value is None:
                    raise InputError(
                        f"{where}: cell {cell_f.coordinate} holds a formula "
                        f"({shown(str(cell_f.value), 60)}) with no saved value; open and "
                        "save the workbook in Excel, or paste the values"
                    )
                if cell_v.data_type == "e":
                    raise InputError(
                        f"{where}: cell {cell_v.coordinate} holds the Excel error "
                        f"{shown(str(cell_v.value), 20)}; correct it or empty the cell"
                    )
                texts.append(_text(cell_v.value))
            grid.append((row_f[0].row if row_f else len(grid) + 1, texts))
        header: list[str] | None = None
        rows: list[list[str]] = []
        numbers: list[int] = []
        for number, texts in grid:
            if not any(texts):
                continue
            if header is None:
                header = texts
                continue
            rows.append(texts)
            numbers.append(number)
        if header is None:
            raise InputError(f"{where}: the sheet is empty")
        # Trailing columns without a name or any value (formatting only) are not columns.
        width = len(header)
        while width and not header[width - 1] and not any(r[width - 1] for r in rows):
            width -= 1
        header = header[:width]
        rows = [r[:width] for r in rows]
        return Sheet(ws_f.title, header, rows, numbers, names, notes)
    finally:
        formulas.close()
        cached.close()
