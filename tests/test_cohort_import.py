"""cmil_core.clinical.cohort_import: a table of good and bad clinical files.

Every bad file must be refused with the file, row and column of its problems,
and leave the store exactly as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st_

from cmil_core import store
from cmil_core.cli import main
from cmil_core.clinical.cohort_import import MAX_PROBLEMS, TableError, import_cohort
from cmil_core.errors import InputError

GOOD = [
    # (name, bytes, expected patients, positives, negatives)
    ("minimal.csv", b"patient_id\nP1\nP2\n", 2, 0, 0),
    (
        "full.csv",
        b"patient_id,bm_metastasis,os_months,os_event,efs_months,efs_event,age,sex\n"
        b"P1,1,12.5,1,6,1,3.5,M\nP2,0,40,0,40,0,1,F\nP3,,30,0,,,2,F\n",
        3, 1, 1,
    ),
    (
        "semicolon_decimal_comma.csv",
        b"Patient ID;BM status;OS time;OS status;Age\nP1;Positive;12,5;1;3,5\nP2;negative;40;0;1\n",
        2, 1, 1,
    ),
    ("tabs.tsv", b"id\tmetastasis\nP1\tYES\nP2\tno\n", 2, 1, 1),
    ("bom.csv", "\ufeffpatient_id,bm_metastasis\nP1,TRUE\nP2,false\n".encode(), 2, 1, 1),
    ("latin1.csv", "patient_id;bm_metastasis;centre\nP1;1;Orléans\n".encode("latin-1"), 1, 1, 0),
    ("trimmed.csv", b"patient_id , bm_metastasis\n  P1 , 1 \nP2,0\n", 2, 1, 1),
    ("na_values.csv", b"patient_id,bm_metastasis,os_months,os_event\nP1,NA,NA,NA\nP2,1,5,1\n", 2, 1, 0),
]

BAD = [
    # (name, bytes, fragments the message must contain)
    ("empty.csv", b"", ["empty.csv: the file is empty"]),
    ("header_only.csv", b"patient_id,age\n", ["no data rows"]),
    ("no_id.csv", b"name,age\nP1,3\n", ["no patient_id column"]),
    ("binary.csv", b"\x00\x01\x02PK\x03\x04", ["not a text table"]),
    ("duplicate_id.csv", b"patient_id\nP1\nP2\n P1 \n", ["row 4, column 'patient_id'", "repeats row 2"]),
    ("empty_id.csv", b"patient_id,age\nP1,2\n,3\n", ["row 3, column 'patient_id'", "empty"]),
    ("bad_label.csv", b"patient_id,bm_metastasis\nP1,maybe\n", ["row 2, column 'bm_metastasis'", "'maybe'"]),
    ("negative_time.csv", b"patient_id,os_months,os_event\nP1,-3,1\n", ["row 2, column 'os_months'", "negative"]),
    ("infinite_time.csv", b"patient_id,os_months,os_event\nP1,inf,1\n", ["row 2, column 'os_months'", "not finite"]),
    ("text_time.csv", b"patient_id,os_months,os_event\nP1,ten,1\n", ["row 2, column 'os_months'", "not a number"]),
    ("bad_event.csv", b"patient_id,os_months,os_event\nP1,10,2\n", ["row 2, column 'os_event'", "'2'"]),
    ("event_no_time.csv", b"patient_id,os_months,os_event\nP1,,1\n", ["row 2, column 'os_months'", "without a time"]),
    ("time_no_event.csv", b"patient_id,efs_months,efs_event\nP1,10,\n", ["row 2, column 'efs_event'", "without an event"]),
    ("event_column_only.csv", b"patient_id,os_event\nP1,1\n", ["row 2, column 'os_months'", "without a time"]),
    ("ragged.csv", b"patient_id,age\nP1,3\nP2,4,5\n", ["ragged.csv: row 3 has 3 fields"]),
    ("two_id_columns.csv", b"patient_id,id\nP1,1\n", ["both 'patient_id' and 'id'"]),
    ("repeated_header.csv", b"patient_id,age,Age\nP1,1,2\n", ["column 'Age'", "repeats 'age'"]),
    ("long_id.csv", b"patient_id\n" + b"x" * 200 + b"\n", ["row 2", "200 characters"]),
    ("decimal_comma_in_csv.csv", b'patient_id,os_months,os_event\nP1,"12,5",1\n', ["'12,5' is not a number"]),
]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _snapshot(db: Path) -> tuple[dict[str, int], pd.DataFrame, list[store.CohortRow]]:
    with store.open_store(db) as st:
        return store.table_counts(st), store.patients_frame(st), store.list_cohorts(st)


@pytest.fixture
def seeded_db(db_path: Path, tmp_path: Path) -> Path:
    """A store that already holds one cohort, to prove that refusals change nothing."""
    seed = _write(tmp_path, "seed.csv", b"patient_id,bm_metastasis\nS1,1\nS2,0\n")
    import_cohort(db_path, "existing", seed, role="train", center="C0")
    return db_path


@pytest.mark.parametrize(("name", "data", "n", "pos", "neg"), GOOD, ids=[g[0] for g in GOOD])
def test_good_tables_import(
    seeded_db: Path, tmp_path: Path, name: str, data: bytes, n: int, pos: int, neg: int
) -> None:
    result = import_cohort(seeded_db, "A", _write(tmp_path, name, data), role="validation", center="X")
    assert (result.patients, result.positives, result.negatives) == (n, pos, neg)
    with store.open_store(seeded_db) as st:
        frame = store.patients_frame(st, "A")
        cohorts = {c.cohort: c for c in store.list_cohorts(st)}
    assert len(frame) == n
    assert int((frame["bm_metastasis"] == 1).sum()) == pos
    assert cohorts["A"].role == "validation" and cohorts["A"].center == "X"
    assert cohorts["A"].source_file == name


def test_values_are_typed_and_clinical_columns_kept(db_path: Path, tmp_path: Path) -> None:
    data = GOOD[2][1]  # semicolons, decimal commas, aliases for every column
    import_cohort(db_path, "A", _write(tmp_path, "t.csv", data), role="train")
    with store.open_store(db_path) as st:
        frame = store.patients_frame(st, "A").set_index("patient_id")
    assert frame.loc["P1", "bm_metastasis"] == 1
    assert frame.loc["P1", "os_months"] == pytest.approx(12.5)
    assert frame.loc["P1", "os_event"] == 1
    assert frame.loc["P2", "os_event"] == 0
    assert frame.loc["P1", "clinical"] == {"Age": 3.5}
    assert frame.loc["P2", "clinical"] == {"Age": 1}


def test_a_text_column_keeps_its_digits_as_text(db_path: Path, tmp_path: Path) -> None:
    data = (b"patient_id,bm_metastasis,inss_stage,age_months,mycn\n"
            b"P1,1,4,30,1\nP2,0,4S,7.5,amplified\nP3,0,2,none,\n")
    import_cohort(db_path, "A", _write(tmp_path, "t.csv", data), role="train")
    with store.open_store(db_path) as st:
        frame = store.patients_frame(st, "A").set_index("patient_id")
    # one type per column: stages are text ("4" beside "4S"), ages numbers
    assert [frame.loc[p, "clinical"]["inss_stage"] for p in ("P1", "P2", "P3")] == ["4", "4S", "2"]
    assert [frame.loc[p, "clinical"]["age_months"] for p in ("P1", "P2", "P3")] == [30, 7.5, None]
    assert frame.loc["P1", "clinical"]["mycn"] == "1" and frame.loc["P3", "clinical"]["mycn"] is None


@pytest.mark.parametrize(("name", "data", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_bad_tables_are_refused_and_change_nothing(
    seeded_db: Path, tmp_path: Path, name: str, data: bytes, fragments: list[str]
) -> None:
    before = _snapshot(seeded_db)
    with pytest.raises(InputError) as info:
        import_cohort(seeded_db, "A", _write(tmp_path, name, data), role="validation")
    message = str(info.value)
    assert message.startswith(name), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    after = _snapshot(seeded_db)
    assert before[0] == after[0]
    pd.testing.assert_frame_equal(before[1], after[1])
    assert before[2] == after[2]


def test_all_problems_are_collected_with_rows_and_columns(tmp_path: Path, db_path: Path) -> None:
    data = b"patient_id,bm_metastasis,os_months,os_event\nP1,maybe,-1,1\nP1,1,5,7\n"
    with pytest.raises(TableError) as info:
        import_cohort(db_path, "A", _write(tmp_path, "t.csv", data))
    found = [(p.row, p.column) for p in info.value.problems]
    assert found == [(2, "bm_metastasis"), (2, "os_months"), (3, "patient_id"), (3, "os_event")]
    assert "4 problems" in str(info.value)


def test_problem_list_is_bounded(tmp_path: Path, db_path: Path) -> None:
    rows = b"".join(b"P%d,maybe\n" % i for i in range(500))
    with pytest.raises(TableError) as info:
        import_cohort(db_path, "A", _write(tmp_path, "t.csv", b"patient_id,bm_metastasis\n" + rows))
    assert len(info.value.problems) == MAX_PROBLEMS
    assert info.value.truncated
    assert f"{MAX_PROBLEMS}+ problems" in str(info.value)


def test_reimport_needs_replace_and_replace_is_complete(tmp_path: Path, db_path: Path) -> None:
    first = _write(tmp_path, "a.csv", b"patient_id\nP1\nP2\nP3\n")
    second = _write(tmp_path, "b.csv", b"patient_id\nP9\n")
    import_cohort(db_path, "A", first)
    with pytest.raises(InputError, match="already has 3 patients; pass --replace"):
        import_cohort(db_path, "A", second)
    import_cohort(db_path, "A", second, replace=True, role="test")
    with store.open_store(db_path) as st:
        assert store.patients_frame(st, "A")["patient_id"].tolist() == ["P9"]
        assert store.list_cohorts(st)[0].role == "test"


def test_dry_run_writes_nothing(tmp_path: Path, db_path: Path) -> None:
    result = import_cohort(db_path, "A", _write(tmp_path, "a.csv", b"patient_id\nP1\n"), dry_run=True)
    assert result.patients == 1
    assert not db_path.exists()


@pytest.mark.parametrize("cohort", ["", "a/b", "x" * 65])
def test_bad_cohort_names(tmp_path: Path, db_path: Path, cohort: str) -> None:
    with pytest.raises(InputError, match="cohort name"):
        import_cohort(db_path, cohort, _write(tmp_path, "a.csv", b"patient_id\nP1\n"))


# The command line, as a user runs it.

def test_cli_import_success(tmp_path: Path, db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _write(tmp_path, "clinical.csv", GOOD[1][1])
    code = main(["import-cohort", "--db", str(db_path), "--cohort", "A", "--csv", str(csv),
                 "--role", "train", "--center", "Centre 1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 patients imported" in out
    assert "1 positive, 1 negative, 1 unknown" in out
    assert "kept as clinical variables: age, sex" in out


def test_cli_refusal_is_one_error_line_with_exit_2(
    tmp_path: Path, seeded_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = _write(tmp_path, "clinical.csv", b"patient_id,os_months,os_event\nP1,-3,1\nP2,4,x\n")
    before = _snapshot(seeded_db)
    code = main(["import-cohort", "--db", str(seeded_db), "--cohort", "A", "--csv", str(csv)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: clinical.csv:")
    assert "row 2, column 'os_months'" in err and "row 3, column 'os_event'" in err
    assert "Traceback" not in err
    assert _snapshot(seeded_db)[0] == before[0]


def test_cli_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["import-cohort", "--cohort", "A"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


# --- previews and problem tables (the Cohorts page) ---

def test_preview_parses_values_and_names_the_mapping() -> None:
    from cmil_core.clinical.cohort_import import preview_table

    data = b"Patient ID;BM status;OS time;OS status;Stage\nP1;Positive;12,5;1;4\nP2;negative;40;0;4S\n"
    preview = preview_table(data, "centre.csv")
    assert (preview.patients, preview.positives, preview.negatives, preview.unlabelled) == (2, 1, 1, 0)
    assert preview.columns == {"patient_id": "Patient ID", "bm_metastasis": "BM status",
                               "os_months": "OS time", "os_event": "OS status"}
    assert preview.clinical_columns == ["Stage"]
    frame = preview.frame
    assert frame.index.tolist() == [2, 3]  # the spreadsheet's row numbers
    assert frame["patient_id"].tolist() == ["P1", "P2"]
    assert frame["bm_metastasis"].tolist() == [1, 0]
    assert frame["os_months"].tolist() == [12.5, 40.0]  # decimal comma read
    assert frame["os_event"].tolist() == [1, 0]
    assert "efs_months" not in frame.columns
    assert frame["Stage"].tolist() == ["4", "4S"]  # text and numbers mixed: text
    mapping = dict(zip(preview.mapping["contract column"], preview.mapping["column in the file"]))
    assert mapping["bm_metastasis"] == "BM status" and mapping["efs_months"] is None
    assert mapping["clinical"] == "Stage"


def test_preview_equals_what_the_import_stores(tmp_path: Path, db_path: Path) -> None:
    from cmil_core.clinical.cohort_import import preview_table

    data = GOOD[1][1]
    preview = preview_table(data, "full.csv")
    import_cohort(db_path, "A", None, data=data, name="full.csv", role="train")
    with store.open_store(db_path, read_only=True) as st:
        stored = store.patients_frame(st, "A").set_index("patient_id")
    shown = preview.frame.set_index("patient_id")
    assert shown.index.tolist() == stored.index.tolist() == ["P1", "P2", "P3"]
    for column in ("bm_metastasis", "os_months", "os_event", "efs_months", "efs_event"):
        assert [None if pd.isna(v) else float(v) for v in shown[column]] == \
            [None if pd.isna(v) else float(v) for v in stored[column]], column
    assert stored.loc["P1", "clinical"] == {"age": 3.5, "sex": "M"}
    assert shown.loc["P1", "age"] == 3.5 and shown.loc["P1", "sex"] == "M"


def test_problems_frame_lists_row_column_and_problem() -> None:
    from cmil_core.clinical.cohort_import import preview_table, problems_frame

    data = b"patient_id,bm_metastasis,os_months,os_event\nP1,maybe,-1,1\nP1,1,5,7\n"
    with pytest.raises(TableError) as info:
        preview_table(data, "t.csv")
    frame = problems_frame(info.value)
    assert frame.columns.tolist() == ["row", "column", "problem"]
    assert list(zip(frame["row"], frame["column"])) == [
        (2, "bm_metastasis"), (2, "os_months"), (3, "patient_id"), (3, "os_event")]
    assert frame["problem"][0].startswith("'maybe' is not a metastasis status")
    assert frame["problem"][2] == "patient_id 'P1' repeats row 2"


@pytest.mark.parametrize(
    ("data", "row", "column", "fragment"),
    [
        (b"patient_id,age\nP1,3\nP2,4,5\n", 3, None, "row 3 has 3 fields"),
        (b"", None, None, "the file is empty"),
        (b"name,age\nP1,3\n", 1, None, "no patient_id column"),
        (b"patient_id,age,Age\nP1,1,2\n", 1, "Age", "repeats 'age'"),
    ],
)
def test_problems_frame_of_unreadable_files(data: bytes, row: int | None, column: str | None,
                                            fragment: str) -> None:
    from cmil_core.clinical.cohort_import import preview_table, problems_frame

    with pytest.raises(InputError) as info:
        preview_table(data, "t.csv")
    frame = problems_frame(info.value)
    assert len(frame) == 1
    assert (None if pd.isna(frame["row"][0]) else int(frame["row"][0])) == row
    assert frame["column"][0] == column
    assert fragment in frame["problem"][0]
    assert not frame["problem"][0].startswith("t.csv")  # the file is named once, by the page


def test_problems_frame_says_when_the_list_was_cut() -> None:
    from cmil_core.clinical.cohort_import import preview_table, problems_frame

    rows = b"".join(b"P%d,maybe\n" % i for i in range(200))
    with pytest.raises(TableError) as info:
        preview_table(b"patient_id,bm_metastasis\n" + rows, "t.csv")
    frame = problems_frame(info.value)
    assert len(frame) == MAX_PROBLEMS + 1
    assert "more problems not listed" in frame["problem"].iloc[-1]
    assert frame["row"].iloc[0] == 2 and pd.isna(frame["row"].iloc[-1])


# --- property: random tables import exactly what is valid, or nothing ---------------------
#
# The oracle below re-states the README's table format independently of the
# module (only the alias table and the missing-value words are shared, as they
# are data, not logic): which columns are recognised, which cells are valid,
# and what each valid cell becomes in the store.

_KNOWN = ("patient_id", "bm_metastasis", "os_months", "os_event", "efs_months", "efs_event")
_MISSING = {"", "na", "n/a", "nan", "null", "none", ".", "-", "?", "missing"}
_ALWAYS = {"", "na", "n/a", "nan", "null"}  # missing in categorical columns too
_YES = {"1", "1.0", "yes", "y", "positive", "pos", "true", "t", "+"}
_NO = {"0", "0.0", "no", "n", "negative", "neg", "false", "f", "-"}
# Characters that make hostile cells: separators, quotes, line breaks, control and
# invisible characters, markup, formula starts, accents, digits of other scripts.
_NASTY = ",;\t|\"' \r\n\x00\x07\x1b\u202e\u200b\ufeff<>=+-@#.éß漢٣\u2028"


def _norm(name: str) -> str:
    out = name.strip().lstrip("\ufeff").lower()
    for ch in " .-/()":
        out = out.replace(ch, "_")
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


def _number(text: str, semicolon: bool) -> float:
    """What a numeric cell means (ValueError when it is none); decimal commas with ';'."""
    import re

    if semicolon and re.fullmatch(r"[+-]?\d+,\d+", text):
        text = text.replace(",", ".")
    return float(text)


def _bad_id(pid: str) -> bool:
    import unicodedata

    return (
        len(pid) > 128
        or any(unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"} for c in pid)
        or pid.startswith(("=", "+", "-", "@"))
        or "<" in pid or ">" in pid
    )


def _expected(header: list[str], rows: list[list[str]], semicolon: bool) -> list[dict] | None:
    """The patients the table holds, or None when it must be refused."""
    import math

    from cmil_core.clinical.cohort_import import COLUMN_ALIASES

    alias = {a: f for f, names in COLUMN_ALIASES.items() for a in names}
    if any("\x00" in cell for cell in [*header, *(c for r in rows for c in r)]):
        return None  # a NUL character anywhere: a binary file, not a table
    names = [h.strip() for h in header]
    normed = [_norm(h) for h in names]
    if any(not n for n in names) or len(set(normed)) < len(normed):
        return None
    fields = [alias.get(n) for n in normed]
    known = [f for f in fields if f]
    if len(set(known)) < len(known) or "patient_id" not in known:
        return None
    rows = [[c.strip() for c in r] for r in rows if any(c.strip() for c in r)]
    if not rows:
        return None
    def finite(text: str) -> bool:
        try:
            return "_" not in text and math.isfinite(_number(text, semicolon))
        except ValueError:
            return False

    # A clinical column is numeric when its cells, apart from missing tokens, are all
    # numbers (one at least): then none, -, ?, . are missing there; else they are values.
    numeric_column = {}
    for i in range(len(fields)):
        present = [r[i] for r in rows if r[i].lower() not in _MISSING]
        numeric_column[i] = bool(present) and all(finite(c) for c in present)
    out, seen = [], set()
    for cells in rows:
        cell = {f: cells[i] for i, f in enumerate(fields) if f}
        pid = cell["patient_id"]
        if pid.lower() in _MISSING or _bad_id(pid) or pid in seen:
            return None
        seen.add(pid)
        rec: dict = {"patient_id": pid}
        label = cell.get("bm_metastasis", "").lower()
        if label in _YES or label in _NO:
            rec["bm_metastasis"] = 1 if label in _YES else 0
        elif label in _MISSING:
            rec["bm_metastasis"] = None
        else:
            return None
        for prefix in ("os", "efs"):
            t, e = cell.get(f"{prefix}_months", ""), cell.get(f"{prefix}_event", "")
            time = event = None
            if t.lower() not in _MISSING:
                try:
                    time = _number(t, semicolon)
                except ValueError:
                    return None
                if not math.isfinite(time) or time < 0:
                    return None
            if e.lower() not in _MISSING:
                if e not in ("0", "1", "0.0", "1.0"):
                    return None
                event = int(float(e))
            if (time is None) != (event is None):
                return None
            rec[f"{prefix}_months"], rec[f"{prefix}_event"] = time, event
        clinical: dict = {}
        for i, f in enumerate(fields):
            if f:
                continue
            text = cells[i]
            value: object = None
            missing = _ALWAYS | (_MISSING if numeric_column[i] else set())
            if text.lower() not in missing and not numeric_column[i]:
                value = text  # one type per column: a text column keeps its digits as text
            elif text.lower() not in missing:
                try:
                    number = _number(text, semicolon)
                except ValueError:
                    value = text
                else:
                    if not math.isfinite(number):
                        value = text
                    elif number.is_integer() and "." not in text and "," not in text:
                        value = int(number)
                    else:
                        value = number
            clinical[names[i]] = value
        rec["clinical"] = clinical
        out.append(rec)
    return out


@st_.composite
def _tables(draw: st_.DrawFn) -> tuple[bytes, list[str], list[list[str]], bool]:
    """A clinical table as bytes, with the header and rows it was written from.

    Each table draws how hostile it is: most cells are then valid values of
    their column, the rest junk (any text, numbers, missing words, separators,
    quotes, line breaks, control characters), so that both outcomes are common.
    """
    text = st_.text(alphabet=st_.one_of(st_.characters(codec="utf-8"), st_.sampled_from(_NASTY)),
                    max_size=12)
    number = st_.one_of(
        st_.integers(0, 500).map(str),
        st_.floats(0, 1e4, allow_nan=False).map(lambda x: f"{x:.3g}"),
        st_.sampled_from(["12,5", "0.0", "1e3", "٣"]),
    )
    missing = st_.sampled_from(["", " ", "NA", "n/a", "nan", "NULL", "-", "?", "."])
    junk = st_.one_of(text, missing, st_.sampled_from(
        ["-3", "inf", "2", "yes", "12,5", "=1+1", "<b>x</b>", "P" * 130, "1e400", "P1"]))
    valid = {
        "bm_metastasis": st_.one_of(st_.sampled_from([*sorted(_YES | _NO), "YES", "Pos"]), missing),
        "event": st_.sampled_from(["0", "1", "1.0", "0.0"]),
    }
    known = draw(st_.lists(st_.sampled_from(_KNOWN[1:]), unique=True, max_size=5))
    if draw(st_.integers(0, 9)) > 0:
        known.insert(0, "patient_id")  # most tables have their id column
    junk_names = draw(st_.lists(text.map(lambda s: s if s.strip() else f"c{s}"), max_size=3))
    columns: list[tuple[str, str | None]] = [(k, k) for k in known]
    columns += [(j, None) for j in junk_names]
    columns = draw(st_.permutations(columns)) or [("patient_id", "patient_id")]
    header = [draw(st_.sampled_from([name, name.upper(), f" {name} "])) if kind else name
              for name, kind in columns]
    junk_rate = draw(st_.sampled_from([0, 0, 5, 20]))  # percent of cells that are junk
    rows = []
    for i in range(draw(st_.integers(0, 6))):
        pairs = {}
        for prefix in ("os", "efs"):
            pairs[prefix] = draw(st_.one_of(
                st_.tuples(number, valid["event"]), st_.tuples(missing, missing)))
        row = []
        for _, kind in columns:
            if draw(st_.integers(0, 99)) < junk_rate:
                row.append(draw(junk))
            elif kind == "patient_id":
                row.append(draw(st_.sampled_from([f"P{i + 1}", f"NB-{i + 1:03d}", f"é{i}"])))
            elif kind == "bm_metastasis":
                row.append(draw(valid["bm_metastasis"]))
            elif kind in ("os_months", "efs_months"):
                row.append(pairs[kind.split("_")[0]][0])
            elif kind in ("os_event", "efs_event"):
                row.append(pairs[kind.split("_")[0]][1])
            else:
                row.append(draw(st_.one_of(text, number, missing)))
        rows.append(row)
    delimiter = draw(st_.sampled_from([",", ";", "\t"]))
    quote_all = draw(st_.booleans())

    def field(cell: str) -> str:
        # RFC 4180 quoting; any line break (CR or LF) inside a cell is quoted.
        if quote_all or any(ch in cell for ch in (delimiter, '"', "\r", "\n")):
            return '"' + cell.replace('"', '""') + '"'
        return cell

    newline = draw(st_.sampled_from(["\n", "\r\n"]))
    text_table = "".join(delimiter.join(map(field, r)) + newline for r in [header, *rows])
    data = text_table.encode(draw(st_.sampled_from(["utf-8", "utf-8-sig"])))
    return data, header, rows, delimiter == ";"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty store: each example imports into a fresh copy of it."""
    path = tmp_path_factory.mktemp("template") / "cmil.duckdb"
    store.open_store(path).close()
    return path


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables())
def test_random_tables_import_exactly_what_is_valid_or_nothing(
    empty_store: Path, table: tuple[bytes, list[str], list[list[str]], bool],
) -> None:
    data, header, rows, semicolon = table
    expected = _expected(header, rows, semicolon)
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "cmil.duckdb"
        shutil.copyfile(empty_store, db)
        csv_path = _write(Path(folder), "random.csv", data)
        try:
            import_cohort(db, "R", csv_path, role="train")
        except InputError as exc:  # anything else fails the test
            assert "\n" not in str(exc)
            with store.open_store(db, read_only=True) as st:
                assert not any(store.table_counts(st).values())  # nothing written
            assert expected is None, f"a valid table was refused: {exc}"
            event("refused")
            return
        assert expected is not None, "an invalid table was imported"
        event(f"imported {len(expected)} patients")
        with store.open_store(db, read_only=True) as st:
            frame = store.patients_frame(st, "R")
            counts = store.table_counts(st)
    assert counts["patients"] == len(expected) and counts["cohorts"] == 1
    got = {r["patient_id"]: r for r in frame.to_dict("records")}
    assert set(got) == {e["patient_id"] for e in expected}
    for e in expected:
        row = got[e["patient_id"]]
        for key in _KNOWN[1:]:
            value = None if pd.isna(row[key]) else row[key]
            assert value == e[key], (e["patient_id"], key, value, e[key])
        assert row["clinical"] == e["clinical"]
