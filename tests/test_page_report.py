"""The Report page, with Streamlit's AppTest against a real store."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.outputs.evaluation import roc_curves
from cmil_core.store.model_rules import read_model_scores
from conftest import run_app as _run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _page(db: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CMIL_DB", str(db))
    at = _run(AppTest.from_file(APP, default_timeout=120))
    at.switch_page("pages/report.py")
    return _run(at)


@pytest.fixture(scope="module")
def scored_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("scored") / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    return db


def test_without_a_model_the_page_says_what_to_do(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.open_store(db_path) as st:
        patients = [store.PatientRow("P1", 1), store.PatientRow("P2", 0)]
        store.import_patients(st, "training", patients, role="train", center=None)
    at = _page(db_path, monkeypatch)
    assert at.title[0].value == "Report"
    assert "No model yet" in at.info[0].value
    assert not at.button and not at.get("download_button")


@pytest.mark.slow
def test_write_the_report_and_download_it(
    scored_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _page(scored_demo, monkeypatch)
    with store.open_store(scored_demo, read_only=True) as st:
        (model_id,) = store.list_models(st)["model_id"]
        curves = roc_curves(read_model_scores(st, model_id))
    assert at.title[0].value == "Report"
    assert model_id in at.markdown[0].value and "report.html" in at.markdown[0].value
    assert not at.get("download_button")  # nothing written yet
    at.radio(key="report_endpoint").set_value("efs")
    at.selectbox(key="report_cutoff").set_value("median")
    button = next(b for b in at.button if b.label == "Write the report")
    button.click()
    _run(at)
    downloads = at.get("download_button")
    assert [d.proto.label for d in downloads] == [
        "Download the report (zip)", "Download report.html only"]
    html_path = Path(at.session_state[f"report:{model_id}"])
    folder = html_path.parent
    assert folder.parent == scored_demo.parent / "reports"
    assert folder.name.startswith(f"{model_id}-")
    assert str(folder) in at.success[0].value
    text = html_path.read_text()
    assert len(curves) == 3
    for c in curves:  # each cohort's AUC, as the ROC legend and the dashboard write it
        name = c.get("label", c["cohort"])  # the training row is "training (out-of-fold)"
        assert f"{name}: AUC {c['auc']:.2f} ({c['ci_low']:.2f}-{c['ci_high']:.2f})" in text
    meta = json.loads((folder / "report.json").read_text())
    assert meta["endpoint"]["key"] == "efs" and meta["cutoff"]["method"] == "median"
    # The zip offered is the folder: its report.html is the one on disk.
    zip_url = downloads[0].proto.url
    assert zip_url  # served by the media file manager
    from cmil_core.outputs.report import report_zip

    with zipfile.ZipFile(io.BytesIO(report_zip(folder))) as archive:
        assert archive.read(f"{folder.name}/report.html") == html_path.read_bytes()
