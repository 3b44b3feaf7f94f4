"""cmil_core.clinical.tables: delimiters, encodings, decimal commas, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmil_core.clinical.tables import parse_number, read_table
from cmil_core.errors import InputError


@pytest.mark.parametrize(
    ("content", "encoding", "delimiter"),
    [
        ("patient_id,age\nP1,3\nP2,4\n", "utf-8", ","),
        ("\ufeffpatient_id,age\nP1,3\nP2,4\n", "utf-8", ","),  # BOM
        ("patient_id;age\nP1;3,5\nP2;4\n", "utf-8", ";"),
        ("patient_id\tage\nP1\t3\nP2\t4\n", "utf-8", "\t"),
        ("patient_id|age\nP1|3\nP2|4\n", "utf-8", "|"),
        ("patient_id;ville\nP1;Orléans\nP2;Besançon\n", "latin-1", ";"),
        ("patient_id,age\r\nP1,3\r\nP2,4\r\n", "utf-8", ","),  # Windows line ends
        ("patient_id\tage\r\nP1\t3\r\nP2\t4\r\n", "utf-16", "\t"),  # Excel "Unicode text"
    ],
)
def test_reads_common_exports(tmp_path: Path, content: str, encoding: str, delimiter: str) -> None:
    f = tmp_path / "t.csv"
    f.write_bytes(content.encode(encoding))
    table = read_table(f)
    assert table.delimiter == delimiter
    assert table.header[0] == "patient_id"
    assert [r[0] for r in table.rows] == ["P1", "P2"]
    assert table.row_numbers == [2, 3]


def test_latin1_text_is_decoded(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_bytes("patient_id;ville\nP1;Orléans\n".encode("latin-1"))
    assert read_table(f).rows == [["P1", "Orléans"]]


def test_quoted_cells_keep_separators(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text('patient_id,note\nP1,"a, b"\nP2,"say ""hi"""\n')
    assert read_table(f).rows == [["P1", "a, b"], ["P2", 'say "hi"']]


def test_only_cr_and_lf_end_a_line() -> None:
    # A form feed or a Unicode line separator inside a cell is not a line break
    # (the separator is still sniffed right; found by the property test of cohort_import).
    table = read_table("t.csv", data="a\x0c;b\u2028c;id\n1;2;P1\n".encode(), name="t.csv")
    assert (table.delimiter, table.header, table.rows) == (";", ["a", "b\u2028c", "id"],
                                                           [["1", "2", "P1"]])  # cells stripped


def test_blank_lines_are_skipped_and_rows_keep_file_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("patient_id,age\nP1,3\n\nP2,4\n")
    assert read_table(f).row_numbers == [2, 4]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "t.csv: the file is empty"),
        (b"  \n\n", "t.csv: the file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "not a text table"),
        (b"patient_id,age\nP1,3,4\n", "t.csv: row 2 has 3 fields, the header has 2"),
        (b"patient_id,age\nP1,\"3\nP2,4\n", "t.csv: row 2: a quote opened in this row is never"),
        (b"\x1f\x8b\x08\x00", "t.csv: this is not a text table: it is a gzip-compressed file"),
        (b"PK\x03\x04", "it is a zip archive \\(and not an Excel .xlsx workbook\\)"),
        ("patient_id,age\nP1,3\n".encode("utf-32-le"), "contains binary data"),
        (b",".join([b"c"] * 10_001), "the header has about 10001 columns; at most 10000"),
    ],
)
def test_refuses_unreadable_tables(tmp_path: Path, data: bytes, message: str) -> None:
    f = tmp_path / "t.csv"
    f.write_bytes(data)
    with pytest.raises(InputError, match=message):
        read_table(f)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.csv: no such file"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="is a folder"):
        read_table(tmp_path)


def test_reads_uploaded_bytes_under_their_name() -> None:
    table = read_table("ignored", data=b"patient_id\nP9\n", name="upload.csv")
    assert table.source == "upload.csv"
    assert table.rows == [["P9"]]


@pytest.mark.parametrize(
    ("text", "decimal_comma", "expected"),
    [("3.5", False, 3.5), ("3,5", True, 3.5), ("NA", False, None), ("", True, None),
     ("-2", False, -2.0), ("1e3", False, 1000.0)],
)
def test_parse_number(text: str, decimal_comma: bool, expected: float | None) -> None:
    assert parse_number(text, decimal_comma=decimal_comma) == expected


def test_parse_number_refuses_text_and_comma_without_semicolons() -> None:
    with pytest.raises(ValueError):
        parse_number("abc")
    with pytest.raises(ValueError):
        parse_number("3,5", decimal_comma=False)
