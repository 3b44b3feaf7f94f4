"""Clinical tables as hospitals keep them, each imported or refused exactly as documented.

The tables are made here (no files): realistic exports of a few dozen rows with
Chinese, Japanese or Korean headers and values in the code pages Excel writes
on those systems, UTF-16 without a byte-order mark, workbooks with two sheets,
merged headers and formulas, and categorical columns holding ``none`` / ``-``.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from openpyxl import Workbook

from cmil_core.clinical.cohort_import import import_cohort, preview_table
from cmil_core.clinical.missing import prepare, read_raw
from cmil_core.clinical.tables import read_table
from cmil_core.errors import InputError

ZH_HEADER = ["病历号", "性别", "年龄(月)", "诊断", "分期", "骨髓转移", "总生存期(月)", "死亡",
             "MYCN扩增", "备注"]
TW_HEADER = ["病歷號", "性別", "年齡(月)", "診斷", "分期", "骨髓轉移", "總生存期(月)", "死亡",
             "MYCN擴增", "備註"]
JA_HEADER = ["患者番号", "性別", "年齢(月)", "診断", "病期", "骨髄転移", "全生存期間(月)", "死亡",
             "MYCN増幅", "備考"]
KO_HEADER = ["환자번호", "성별", "나이(개월)", "진단", "병기", "골수전이", "전체생존기간(개월)", "사망",
             "MYCN증폭", "비고"]
VOCAB = {
    "zh": (["男", "女"], ["神经母细胞瘤", "节细胞神经母细胞瘤"], ["是", "否"],
           ["扩增", "未扩增", "不详"], ["无", "复发", "化疗后缓解", "失访", "转院"]),
    "tw": (["男", "女"], ["神經母細胞瘤", "節細胞神經母細胞瘤"], ["是", "否"],
           ["擴增", "未擴增", "不詳"], ["無", "復發", "化療後緩解", "失訪", "轉院"]),
    "ja": (["男", "女"], ["神経芽腫", "神経節芽腫"], ["あり", "なし"],
           ["増幅あり", "増幅なし", "不明"], ["なし", "再発", "化学療法後寛解", "転院", "フォロー中"]),
    "ko": (["남", "여"], ["신경모세포종", "신경절모세포종"], ["예", "아니오"],
           ["증폭", "비증폭", "미상"], ["없음", "재발", "항암치료 후 관해", "전원", "추적 중"]),
}
HEADERS = {"zh": ZH_HEADER, "tw": TW_HEADER, "ja": JA_HEADER, "ko": KO_HEADER}
# Outside GBK: only GB18030 (or Unicode) can hold them (a CJK Extension B character,
# and a character added in GB18030-2005).
RARE = "𠀀䶮"


def hospital_rows(lang: str, n: int = 30, seed: int = 0, rare: bool = False) -> list[list[str]]:
    """A header and ``n`` patients, as a hospital's clinical export would hold them."""
    r = random.Random(seed)
    sexes, diagnoses, yes_no, mycn, notes = VOCAB[lang]
    stage = "期" if lang in ("zh", "tw", "ja") else "기"
    rows = [list(HEADERS[lang])]
    for i in range(n):
        note = r.choice(notes)
        if rare and i % 7 == 0:
            note = f"姓名含{RARE}"
        rows.append([f"NB{i + 1:03d}", r.choice(sexes), str(r.randint(2, 120)),
                     r.choice(diagnoses), f"{r.choice(['1', '2', '3', '4', '4S'])}{stage}",
                     r.choice(yes_no), f"{r.uniform(1, 80):.1f}", str(r.randint(0, 1)),
                     r.choice(mycn), note])
    return rows


def csv_bytes(rows: list[list[str]], encoding: str, newline: str = "\r\n") -> bytes:
    return (newline.join(",".join(row) for row in rows) + newline).encode(encoding)


def workbook_bytes(sheets: dict[str, list[list[object]]],
                   edit: Callable[[Workbook], None] | None = None) -> bytes:
    book = Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        ws = book.create_sheet(title)
        for row in rows:
            ws.append(row)
    if edit is not None:
        edit(book)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


TWO_SHEETS = {
    "Patients": [["patient_id", "bm_metastasis", "os_months", "os_event", "diagnosed", "stage"],
                 ["P1", 1, 14.5, 1, dt.datetime(2019, 3, 4), "4"],
                 ["P2", 0, 62, 0, dt.datetime(2020, 11, 30, 10, 30), "4S"],
                 ["P3", "no", 30.25, 0, dt.date(2021, 1, 2), "2"]],
    "Lab": [["patient_id", "ldh"], ["P1", 812], ["P2", 240]],
}


@dataclass(frozen=True)
class Tricky:
    id: str
    make: Callable[[], tuple[bytes, str]]
    kwargs: dict[str, object]
    header: list[str] | None = None  # expected decoded header
    first_row: list[str] | None = None  # expected first data row
    encoding: str | None = None
    refused: str | None = None  # a regex the refusal must match
    check: Callable[[object], None] | None = None


def _rows(lang: str, **kw: object) -> list[list[str]]:
    return hospital_rows(lang, **kw)  # type: ignore[arg-type]


def _merged(book: Workbook) -> None:
    ws = book["Patients"]
    ws.insert_rows(1)
    ws["A1"], ws["B1"] = "patient", "outcome"
    ws.merge_cells("B1:D1")


def _formula(book: Workbook) -> None:
    book["Patients"]["C3"] = "=C2*2"


def _sheet_note(table: object) -> None:
    assert table.notes == (  # type: ignore[attr-defined]
        ("the workbook has 2 sheets ('Patients', 'Lab'); read the first, 'Patients' "
         "(choose another with --sheet NAME or NUMBER)"),)


CASES = [
    Tricky("gbk_chinese_hospital", lambda: (csv_bytes(_rows("zh"), "gbk"), "临床.csv"), {},
           header=ZH_HEADER, first_row=_rows("zh")[1], encoding="gb18030"),
    Tricky("gb18030_rare_characters", lambda: (csv_bytes(_rows("zh", rare=True), "gb18030"),
                                               "c.csv"), {},
           header=ZH_HEADER, first_row=_rows("zh", rare=True)[1], encoding="gb18030",
           check=lambda t: _has_rare(t)),
    Tricky("big5_traditional_chinese", lambda: (csv_bytes(_rows("tw", seed=2), "big5"), "c.csv"),
           {}, header=TW_HEADER, first_row=_rows("tw", seed=2)[1], encoding="big5"),
    Tricky("shift_jis_japanese", lambda: (csv_bytes(_rows("ja", seed=3), "shift_jis"), "c.csv"),
           {}, header=JA_HEADER, first_row=_rows("ja", seed=3)[1], encoding="cp932"),
    Tricky("euc_kr_korean", lambda: (csv_bytes(_rows("ko", seed=4), "euc_kr"), "c.csv"), {},
           header=KO_HEADER, first_row=_rows("ko", seed=4)[1], encoding="cp949"),
    Tricky("short_gbk_table_few_rows", lambda: (csv_bytes(_rows("zh", n=3, seed=5), "gbk"),
                                                "c.csv"), {},
           header=ZH_HEADER, first_row=_rows("zh", n=3, seed=5)[1], encoding="gb18030"),
    Tricky("utf16_le_without_bom", lambda: (csv_bytes(_rows("zh", n=12), "utf-16-le"), "c.txt"),
           {}, header=ZH_HEADER, first_row=_rows("zh", n=12)[1], encoding="utf-16-le"),
    Tricky("utf16_be_without_bom_tabs",
           lambda: ("\n".join("\t".join(r) for r in _rows("ja", n=8)).encode("utf-16-be"),
                    "c.txt"), {}, header=JA_HEADER, first_row=_rows("ja", n=8)[1],
           encoding="utf-16-be"),
    Tricky("utf8_with_bom", lambda: (b"\xef\xbb\xbf" + csv_bytes(_rows("ko", n=5), "utf-8"),
                                     "c.csv"), {},
           header=KO_HEADER, first_row=_rows("ko", n=5)[1], encoding="utf-8-sig"),
    Tricky("cp1252_french", lambda: ("patient_id;ville;remarque\nP1;Orléans;réglé 5 €\n"
                                     "P2;Besançon;—\n".encode("cp1252"), "c.csv"), {},
           header=["patient_id", "ville", "remarque"], first_row=["P1", "Orléans", "réglé 5 €"],
           encoding="cp1252"),
    # Two CJK characters read as Chinese, Korean, Big5 alike: refused with the candidates...
    Tricky("tiny_gbk_table_ambiguous", lambda: ("id,性别\nP1,男\n".encode("gbk"), "c.csv"), {},
           refused=r"^c\.csv: the encoding cannot be told for sure: the file reads differently "
                   r"as (?=.*GB18030 \(Chinese, holds GBK\))(?=.*Big5)(?=.*cp949 \(Korean)"
                   r".*--encoding NAME"),
    # ... and read as the user says.
    Tricky("tiny_gbk_table_with_encoding", lambda: ("id,性别\nP1,男\n".encode("gbk"), "c.csv"),
           {"encoding": "GBK"}, header=["id", "性别"], first_row=["P1", "男"], encoding="gbk"),
    Tricky("wrong_encoding_given", lambda: (csv_bytes(_rows("zh", n=4), "gbk"), "c.csv"),
           {"encoding": "utf-8"},
           refused=r"c\.csv: cannot be read as utf-8: the bytes at line 1 \(byte 0: "),
    Tricky("unknown_encoding_given", lambda: (b"id\nP1\n", "c.csv"), {"encoding": "klingon"},
           refused=r"--encoding klingon: not an encoding Python knows"),
    # cp932 maps two byte pairs to the same character: decoding loses which; refused.
    Tricky("no_round_trip", lambda: (b"id,x\nP1,\x87\x90\n", "c.csv"), {"encoding": "cp932"},
           refused=r"reading it as cp932 does not give back the same bytes"),
    Tricky("xlsx_two_sheets_default_first", lambda: (workbook_bytes(TWO_SHEETS), "c.xlsx"), {},
           header=TWO_SHEETS["Patients"][0],
           first_row=["P1", "1", "14.5", "1", "2019-03-04", "4"], encoding="xlsx",
           check=_sheet_note),
    Tricky("xlsx_sheet_by_name", lambda: (workbook_bytes(TWO_SHEETS), "c.xlsx"),
           {"sheet": "Lab"}, header=["patient_id", "ldh"], first_row=["P1", "812"],
           encoding="xlsx", check=lambda t: _no_notes(t)),
    Tricky("xlsx_sheet_by_number", lambda: (workbook_bytes(TWO_SHEETS), "c.xlsx"),
           {"sheet": "2"}, header=["patient_id", "ldh"], first_row=["P1", "812"],
           encoding="xlsx"),
    Tricky("xlsx_unknown_sheet", lambda: (workbook_bytes(TWO_SHEETS), "c.xlsx"),
           {"sheet": "Labs"}, refused=r"c\.xlsx: no sheet named 'Labs'; sheets are: "
                                      r"'Patients', 'Lab'"),
    Tricky("xlsx_merged_header", lambda: (workbook_bytes(TWO_SHEETS, _merged), "c.xlsx"), {},
           refused=r"c\.xlsx, sheet 'Patients': cells B1:D1 are merged \(cell B1 spans"),
    Tricky("xlsx_formula_without_value", lambda: (workbook_bytes(TWO_SHEETS, _formula),
                                                  "c.xlsx"), {},
           refused=r"sheet 'Patients': cell C3 holds a formula \(=C2\*2\) with no saved value"),
    Tricky("sheet_on_a_csv", lambda: (b"id\nP1\n", "c.csv"), {"sheet": "1"},
           refused=r"--sheet applies to Excel workbooks"),
    Tricky("encoding_on_a_workbook", lambda: (workbook_bytes(TWO_SHEETS), "c.xlsx"),
           {"encoding": "gbk"}, refused=r"an Excel workbook has no text encoding"),
]


def _has_rare(table: object) -> None:
    notes = [row[-1] for row in table.rows]  # type: ignore[attr-defined]
    assert f"姓名含{RARE}" in notes


def _no_notes(table: object) -> None:
    assert table.sheet == "Lab" and table.notes == ()  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_tricky_table(case: Tricky) -> None:
    data, name = case.make()
    if case.refused is not None:
        with pytest.raises(InputError) as caught:
            read_table(name, data=data, name=name, **case.kwargs)  # type: ignore[arg-type]
        assert re.search(case.refused, str(caught.value)), str(caught.value)
        return
    table = read_table(name, data=data, name=name, **case.kwargs)  # type: ignore[arg-type]
    assert table.header == case.header
    assert table.rows[0] == case.first_row
    assert table.encoding == case.encoding
    if case.check is not None:
        case.check(table)


def test_every_legacy_table_size_is_read_right() -> None:
    # The detection rule on realistic tables of 3 to 39 rows, five seeds, five code pages.
    for n in range(3, 40, 6):
        for seed in range(5):
            for lang, encoding in (("zh", "gbk"), ("tw", "big5"), ("ja", "shift_jis"),
                                   ("ko", "euc_kr")):
                rows = hospital_rows(lang, n=n, seed=seed)
                table = read_table("t.csv", data=csv_bytes(rows, encoding), name="t.csv")
                assert [table.header, *table.rows] == rows, (lang, n, seed)


# --------------------------------------------------------------------------- cohort import


def _chinese_cohort(encoding: str) -> bytes:
    rows = [["patient_id", "骨髓转移", "os_months", "os_event", "性别", "治疗", "1p缺失", "年龄"],
            ["NB001", "1", "14.2", "1", "男", "化疗", "-", "41"],
            ["NB002", "0", "62.0", "0", "女", "none", "+", "?"],
            ["NB003", "是", "30.5", "0", "女", "手术", "-", "27"]]
    return csv_bytes(rows, encoding)


def test_gbk_cohort_imports_with_chinese_values_and_categorical_levels(tmp_path: Path) -> None:
    data = _chinese_cohort("gbk") * 1
    data = data + "NB004,0,8.5,1,男,none,+,16\r\n".encode("gbk")
    result = import_cohort(tmp_path / "s.duckdb", "A", None, data=data, name="临床.csv",
                           dry_run=True)
    assert result.encoding == "gb18030"
    assert result.clinical_columns == ["骨髓转移", "性别", "治疗", "1p缺失", "年龄"]
    by_id = {p.patient_id: p.clinical for p in result.rows}
    # Categorical columns keep "none" and "-" as values; the numeric age reads "?" as missing.
    # 骨髓转移 holds 1, 0 and 是: a text column, so its digits stay text (one type per column).
    assert by_id["NB002"] == {"骨髓转移": "0", "性别": "女", "治疗": "none", "1p缺失": "+",
                              "年龄": None}
    assert by_id["NB001"]["1p缺失"] == "-" and by_id["NB001"]["年龄"] == 41
    assert by_id["NB003"]["骨髓转移"] == "是"


def test_cohort_from_the_second_sheet_of_a_workbook(tmp_path: Path) -> None:
    book = workbook_bytes({"Notes": [["written by", "Dr X"]], **TWO_SHEETS})
    preview = preview_table(book, "cohort.xlsx", sheet="Patients")
    assert (preview.sheet, preview.sheets, preview.notes) == (
        "Patients", ("Notes", "Patients", "Lab"), ())
    assert (preview.patients, preview.positives, preview.negatives) == (3, 1, 2)
    assert preview.frame["os_months"].tolist() == [14.5, 62.0, 30.25]
    assert preview.frame["diagnosed"].tolist() == ["2019-03-04", "2020-11-30T10:30:00",
                                                   "2021-01-02"]
    assert preview.frame["stage"].tolist() == ["4", "4S", "2"]
    with pytest.raises(InputError, match="no 'patient_id'|no patient_id column") as refused:
        preview_table(book, "cohort.xlsx")  # the first sheet holds no patients
    # ... and the message says where else to look
    assert "the workbook has 3 sheets ('Notes', 'Patients', 'Lab')" in str(refused.value)
    assert "--sheet NAME or NUMBER" in str(refused.value)


# --------------------------------------------------------------------------- statistics


def _rossi_like(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("week,arrest,aid\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_categorical_none_is_a_group_and_missing_counts_per_column(tmp_path: Path) -> None:
    f = _rossi_like(tmp_path / "r.csv", [("10", "1", "aid"), ("20", "0", "none"),
                                        ("?", "1", "aid"), ("5", "-", "none"),
                                        ("7", "1", "-"), ("", "0", "-"), ("9", "1", "NA")])
    prepared = prepare(read_raw(f), numeric=["week", "arrest"], groups=["aid"])
    assert prepared.frame["aid"].tolist() == ["aid", "none", "aid", "none", "-", "-", None]
    assert prepared.frame["week"].tolist()[:2] == [10.0, 20.0]
    assert prepared.missing == {"week": {"?": 1, "(empty)": 1}, "arrest": {"-": 1},
                                "aid": {"NA": 1}}
    assert prepared.n_dropped == 4


def test_a_group_level_lost_to_missing_values_is_refused(tmp_path: Path) -> None:
    f = _rossi_like(tmp_path / "r.csv", [("10", "1", "aid"), ("20", "0", "aid"),
                                        ("?", "1", "none"), ("", "0", "none"),
                                        ("7", "1", "-"), ("8", "0", "-")])
    raw = read_raw(f)
    with pytest.raises(InputError, match=r"column 'aid': the level 'none' \(2 row\(s\): 4, 5\) "
                                         r"would be lost: every row of it misses a value in "
                                         r"'week' \('\?' 1, empty 1\); .*--drop-missing"):
        prepare(raw, numeric=["week", "arrest"], groups=["aid"])
    prepared = prepare(raw, numeric=["week", "arrest"], groups=["aid"], drop_missing=True)
    assert prepared.levels_lost == [{"column": "aid", "level": "none", "rows": 2}]


def test_docstring_examples() -> None:
    import doctest

    from cmil_core.clinical import missing, tables

    for module in (tables, missing):
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0, module.__name__
