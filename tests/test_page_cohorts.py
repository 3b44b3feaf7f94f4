"""The Cohorts page with AppTest: import a table, attach slides, ingest, delete.

Uploads go through AppTest's own ``file_uploader.set_value`` (Streamlit 1.67
supports it), so the page is tested as a user drives it.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from conftest import job_runner as _runner, plain_text as _plain, rerun_until, run_app as _run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/cohorts.py"


def _until(at: AppTest, done: Callable[[AppTest], bool], seconds: float = 120) -> AppTest:
    return rerun_until(at, done, seconds)


def _cohorts_page() -> AppTest:
    at = _run(AppTest.from_file(APP, default_timeout=60))
    at.switch_page(PAGE)
    return _run(at)


def _snapshot(db: Path) -> tuple[dict[str, int], pd.DataFrame, list[store.CohortRow]]:
    with store.open_store(db, read_only=True) as handle:
        return store.table_counts(handle), store.patients_frame(handle), store.list_cohorts(handle)


@pytest.fixture(autouse=True)
def fresh_runner() -> Iterator[None]:
    """Each test starts with no jobs, and leaves none running."""
    st.cache_resource.clear()
    yield
    from pages import _common

    runner = _common.job_runner()
    for job in list(runner._jobs.values()):
        job.wait(120)
    st.cache_resource.clear()


@pytest.fixture
def one_cohort(db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store with cohort 'existing' (two patients), shown by the app."""
    csv = tmp_path / "seed.csv"
    csv.write_bytes(b"patient_id,bm_metastasis\nS1,1\nS2,0\n")
    import_cohort(db_path, "existing", csv, role="train", center="Centre 0")
    monkeypatch.setenv("CMIL_DB", str(db_path))
    monkeypatch.delenv("CMIL_SLIDE_ROOT", raising=False)
    return db_path


def test_page_lists_the_cohorts_of_the_store(one_cohort: Path) -> None:
    at = _cohorts_page()
    assert at.title[0].value == "Cohorts"
    table = at.dataframe[0].value
    assert table.to_dict("records") == [{
        "Cohort": "existing", "Role": "Training", "Centre": "Centre 0", "Patients": 2,
        "Slides": 0, "Slides failed": 0, "Patches passing QC": 0}]


BAD = b"patient_id,bm_metastasis,os_months,os_event\nP1,maybe,10,1\nP2,1,-2,1\nP1,0,5,1\n"


def test_bad_table_shows_each_problem_and_imports_nothing(one_cohort: Path) -> None:
    before = _snapshot(one_cohort)
    at = _cohorts_page()
    at.file_uploader[0].set_value(("centre_b.csv", BAD, "text/csv"))
    _run(at)
    assert "centre_b.csv cannot be imported; nothing was imported" in _plain(at.error[0].value)
    problems = at.dataframe[1].value
    assert list(zip(problems["row"], problems["column"])) == [
        (2, "bm_metastasis"), (3, "os_months"), (4, "patient_id")]
    assert "'maybe' is not a metastasis status" in problems["problem"][0]
    assert "is negative" in problems["problem"][1]
    assert problems["problem"][2] == "patient_id 'P1' repeats row 2"
    assert not [b for b in at.button if b.label == "Import"]  # nothing to confirm
    after = _snapshot(one_cohort)
    assert before[0] == after[0] and before[2] == after[2]
    pd.testing.assert_frame_equal(before[1], after[1])


def test_unreadable_table_shows_its_row(one_cohort: Path) -> None:
    at = _cohorts_page()
    at.file_uploader[0].set_value(("ragged.csv", b"patient_id,age\nP1,3\nP2,4,5\n", "text/csv"))
    _run(at)
    problems = at.dataframe[1].value
    assert problems["row"].tolist() == [3]
    assert "row 3 has 3 fields, the header has 2" in problems["problem"][0]


GOOD = (
    b"Patient ID;BM status;OS time;OS status;Stage\n"
    b"NB01;positive;12,5;1;4\nNB02;negative;40;0;4S\nNB03;;30;0;3\n"
)


def test_good_table_previews_then_imports_on_confirmation(one_cohort: Path) -> None:
    at = _cohorts_page()
    at.file_uploader[0].set_value(("centre_b.csv", GOOD, "text/csv"))
    _run(at)
    assert _plain(at.success[0].value).startswith(
        "centre_b.csv: 3 patients, 1 with bone-marrow metastasis, 1 without, 1 unknown")
    mapping = at.dataframe[1].value
    shown = dict(zip(mapping["contract column"], mapping["column in the file"]))
    assert shown["patient_id"] == "Patient ID" and shown["bm_metastasis"] == "BM status"
    assert shown["os_months"] == "OS time" and shown["clinical"] == "Stage"
    preview = at.dataframe[2].value
    assert preview["patient_id"].tolist() == ["NB01", "NB02", "NB03"]
    assert preview["os_months"].tolist() == [12.5, 40.0, 30.0]
    with store.open_store(one_cohort, read_only=True) as handle:
        assert [c.cohort for c in store.list_cohorts(handle)] == ["existing"]  # not yet

    assert at.text_input[0].value == "centre_b"  # the file's name is the default
    at.text_input[0].set_value("Centre B")
    at.selectbox[0].set_value("validation")
    at.text_input[1].set_value("Hospital B")
    next(b for b in at.button if b.label == "Import").click()
    _run(at)
    assert _plain(at.success[0].value).startswith(
        "Imported cohort 'Centre B' (external validation) from centre_b.csv: 3 patients")
    with store.open_store(one_cohort, read_only=True) as handle:
        cohorts = {c.cohort: c for c in store.list_cohorts(handle)}
        patients = store.patients_frame(handle, "Centre B").set_index("patient_id")
    assert cohorts["Centre B"].role == "validation" and cohorts["Centre B"].center == "Hospital B"
    assert patients.index.tolist() == ["NB01", "NB02", "NB03"]
    assert patients["bm_metastasis"].tolist()[:2] == [1, 0]
    assert pd.isna(patients["bm_metastasis"]["NB03"])
    assert patients["os_months"].tolist() == [12.5, 40.0, 30.0]
    assert patients.loc["NB02", "clinical"] == {"Stage": "4S"}
    # The list shows the new cohort; the uploader is empty again.
    table = at.dataframe[0].value.set_index("Cohort")
    assert table.loc["Centre B", "Patients"] == 3
    assert table.loc["Centre B", "Centre"] == "Hospital B"
    assert at.file_uploader[0].value is None


def test_existing_cohort_name_is_refused_clearly(one_cohort: Path) -> None:
    at = _cohorts_page()
    at.file_uploader[0].set_value(("existing.csv", GOOD, "text/csv"))
    _run(at)
    assert "A cohort named 'existing' already exists" in _plain(at.error[0].value)
    assert next(b for b in at.button if b.label == "Import").disabled
    with store.open_store(one_cohort, read_only=True) as handle:
        assert len(store.patients_frame(handle)) == 2


def test_server_folders_are_off_without_a_slide_root(one_cohort: Path) -> None:
    at = _cohorts_page()
    assert "Server folders are off" in _plain(at.info[0].value)
    assert "CMIL_SLIDE_ROOT" in _plain(at.info[0].value)


@pytest.fixture
def slide_root(tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CMIL_SLIDE_ROOT with one centre's smear photographs (copies of BCCD images),
    one folder per patient, and a link pointing out of the root."""
    root = tmp_path / "slide_root"
    photos = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:4]
    for i, photo in enumerate(photos):
        target = root / "centre_b" / f"S{i % 2 + 1}" / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target)
    (tmp_path / "outside" / "S1").mkdir(parents=True)
    shutil.copyfile(photos[0], tmp_path / "outside" / "S1" / "x.jpg")
    (root / "link_out").symlink_to(tmp_path / "outside", target_is_directory=True)
    monkeypatch.setenv("CMIL_SLIDE_ROOT", str(root))
    return root


@pytest.mark.parametrize("folder", ["../outside", "link_out", "/etc", "centre_b/../../outside"])
def test_folder_outside_the_slide_root_is_refused(
    one_cohort: Path, slide_root: Path, folder: str
) -> None:
    before = _snapshot(one_cohort)
    at = _cohorts_page()
    assert any(_plain(c.value) == "Folders there: centre_b, centre_b/S1, centre_b/S2"
               for c in at.caption)  # links are not offered
    at.text_input(key="ingest_folder").set_value(folder)
    _run(at)
    assert _plain(at.error[0].value).startswith("Refused: ")
    assert "outside the slide folder root" in _plain(at.error[0].value)
    at.button(key="ingest_run").click()
    _run(at)
    assert _runner().get("ingest:existing") is None  # no job started
    assert _snapshot(one_cohort)[0] == before[0]


def test_ingest_of_a_server_folder_runs_as_a_job(one_cohort: Path, slide_root: Path) -> None:
    at = _cohorts_page()
    at.text_input(key="ingest_folder").set_value("centre_b")
    at.number_input(key="ingest_mpp").set_value(0.3)  # BCCD photographs carry no resolution
    at.button(key="ingest_run").click()
    _run(at)
    job = _runner().get("ingest:existing")
    assert job is not None
    at = _until(at, lambda a: any(_plain(s.value).startswith("Ingest of existing finished")
                                  for s in a.success))
    summary = job.result
    assert job.state == "done" and len(summary.slides) == 4
    message = next(_plain(s.value) for s in at.success
                   if _plain(s.value).startswith("Ingest of existing"))
    passed = sum(s.passed for s in summary.slides)
    assert message.startswith("Ingest of existing finished: 4 slides, 4 tiled, 0 already done, "
                              f"0 failed; {sum(s.patches for s in summary.slides)} patches, "
                              f"{passed} passed quality control.")
    with store.open_store(one_cohort, read_only=True) as handle:
        slides = store.list_slides(handle, "existing")
    assert len(slides) == 4 and {s.status for s in slides} == {"tiled"}
    assert {s.patient_id for s in slides} == {"S1", "S2"}
    assert all(s.mpp == 0.3 and Path(s.path).is_relative_to(slide_root.resolve()) for s in slides)
    table = at.dataframe[0].value.set_index("Cohort")
    assert table.loc["existing", "Slides"] == 4
    assert table.loc["existing", "Patches passing QC"] == passed


def test_ingest_of_an_uploaded_zip(one_cohort: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "photos.zip"
    photos = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:3]
    with zipfile.ZipFile(archive, "w") as zf:
        for i, photo in enumerate(photos):
            zf.write(photo, f"S{i % 2 + 1}/{photo.name}")
        zf.writestr("S9/unknown_patient.jpg", photos[0].read_bytes())
    at = _cohorts_page()
    at.radio(key="ingest_source").set_value("zip")
    _run(at)
    at.file_uploader(key="ingest_zip").set_value(("centre b.zip", archive.read_bytes(),
                                                  "application/zip"))
    at.number_input(key="ingest_mpp").set_value(0.3)
    at.button(key="ingest_run").click()
    _run(at)
    at = _until(at, lambda a: any("Ingest of existing finished" in _plain(w.value)
                                  for w in a.warning))
    # The patient S9 is not in the cohort: that slide fails with its reason, the rest go on.
    reasons = at.dataframe[1].value
    assert reasons["Patient"].tolist() == ["S9"]
    assert "S9" in reasons["Reason"][0]
    uploads = one_cohort.parent / "uploads" / "existing"
    assert (uploads / "centre_b.zip").is_file()
    with store.open_store(one_cohort, read_only=True) as handle:
        slides = store.list_slides(handle, "existing")
    assert sorted(s.status for s in slides) == ["failed", "tiled", "tiled", "tiled"]
    assert all(Path(s.path).is_relative_to((uploads / "centre_b").resolve()) for s in slides)


def test_delete_needs_the_typed_name(one_cohort: Path, tmp_path: Path) -> None:
    csv = tmp_path / "b.csv"
    csv.write_bytes(b"patient_id\nB1\nB2\nB3\n")
    import_cohort(one_cohort, "B", csv, role="test")
    at = _cohorts_page()
    at.selectbox(key="delete_cohort").set_value("B")
    _run(at)
    button = at.button(key="delete_button")
    assert button.disabled
    at.text_input(key="delete_confirm").set_value("b")  # not the name
    _run(at)
    assert at.button(key="delete_button").disabled
    at.text_input(key="delete_confirm").set_value("B")
    _run(at)
    at.button(key="delete_button").click()
    _run(at)
    assert _plain(at.success[0].value).startswith(
        "Deleted cohort 'B': 3 patients, 0 slides, 0 patches and 0 patient scores.")
    with store.open_store(one_cohort, read_only=True) as handle:
        assert [c.cohort for c in store.list_cohorts(handle)] == ["existing"]
        assert store.table_counts(handle)["patients"] == 2
    assert at.dataframe[0].value["Cohort"].tolist() == ["existing"]


def test_user_strings_are_shown_as_typed_not_as_markup(one_cohort: Path) -> None:
    at = _cohorts_page()
    at.file_uploader[0].set_value(("**x** [link](http://example.org).csv", BAD, "text/csv"))
    _run(at)
    shown = at.error[0].value
    assert shown.startswith(r"\*\*x\*\* \[link\]\(http\:\/\/example\.org\)\.csv cannot be imported")
    assert _plain(shown).startswith("**x** [link](http://example.org).csv cannot be imported")


def test_legacy_encoding_is_chosen_when_detection_is_unsure(one_cohort: Path) -> None:
    at = _cohorts_page()
    tiny = "patient_id,性别\nP1,男\nP2,女\n".encode("gbk")  # too short to tell GBK from Big5
    at.file_uploader[0].set_value(("gbk.csv", tiny, "text/csv"))
    _run(at)
    problems = at.dataframe[1].value
    assert "the encoding cannot be told for sure" in problems["problem"][0]
    assert "GB18030" in problems["problem"][0]
    at.selectbox(key="import_encoding_0").set_value("gbk")
    _run(at)
    assert _plain(at.success[0].value).startswith("gbk.csv: 2 patients")
    assert at.dataframe[2].value["性别"].tolist() == ["男", "女"]


def test_workbook_sheet_is_picked_on_the_page(one_cohort: Path) -> None:
    import io

    from openpyxl import Workbook

    book = Workbook()
    book.active.title = "Notes"
    book.active.append(["exported by", "the hospital"])
    patients = book.create_sheet("Patients")
    for row in (["patient_id", "bm_metastasis", "os_months", "os_event"], ["X1", 1, 12.5, 1],
                ["X2", 0, 30, 0]):
        patients.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    at = _cohorts_page()
    xlsx_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    at.file_uploader[0].set_value(("cohort.xlsx", buffer.getvalue(), xlsx_type))
    _run(at)
    assert at.selectbox(key="import_sheet_0").options == ["Notes", "Patients"]
    assert "no patient_id column" in at.dataframe[1].value["problem"][0]  # first sheet
    at.selectbox(key="import_sheet_0").set_value("Patients")
    _run(at)
    assert _plain(at.success[0].value).startswith("cohort.xlsx: 2 patients, 1 with")
    assert at.dataframe[2].value["os_months"].tolist() == [12.5, 30.0]
