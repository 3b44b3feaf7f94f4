"""cmil_core.cohort_import: a table of good and bad clinical files.

Every bad file must be refused with the file, row and column of its problems,
and leave the store exactly as it was.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cmil_core import store
from cmil_core.cli import main
from cmil_core.cohort_import import MAX_PROBLEMS, TableError, import_cohort
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
    from cmil_core.cohort_import import preview_table

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
    from cmil_core.cohort_import import preview_table

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
    from cmil_core.cohort_import import preview_table, problems_frame

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
    from cmil_core.cohort_import import preview_table, problems_frame

    with pytest.raises(InputError) as info:
        preview_table(data, "t.csv")
    frame = problems_frame(info.value)
    assert len(frame) == 1
    assert (None if pd.isna(frame["row"][0]) else int(frame["row"][0])) == row
    assert frame["column"][0] == column
    assert fragment in frame["problem"][0]
    assert not frame["problem"][0].startswith("t.csv")  # the file is named once, by the page


def test_problems_frame_says_when_the_list_was_cut() -> None:
    from cmil_core.cohort_import import preview_table, problems_frame

    rows = b"".join(b"P%d,maybe\n" % i for i in range(200))
    with pytest.raises(TableError) as info:
        preview_table(b"patient_id,bm_metastasis\n" + rows, "t.csv")
    frame = problems_frame(info.value)
    assert len(frame) == MAX_PROBLEMS + 1
    assert "more problems not listed" in frame["problem"].iloc[-1]
    assert frame["row"].iloc[0] == 2 and pd.isna(frame["row"].iloc[-1])
