"""The Quality control page with AppTest on a tiny photographed study: live counts from a
slider, Apply (a new decision, its audit row), and the stale marks it leaves."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.ingest import qc
from cmil_core.ingest.quality import QCThresholds
from conftest import plain_text, run_app
from qc_helpers import BLUR_COLUMN, BLUR_THRESHOLD, photo_study

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/quality.py"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    db, model_id = photo_study(tmp_path_factory.mktemp("qc_page") / "study")
    assert model_id is not None
    return db.parent, model_id


@pytest.fixture
def db(study: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "study"
    shutil.copytree(study[0], folder, symlinks=True)
    monkeypatch.setenv("CMIL_DB", str(folder / "cmil.duckdb"))
    return folder / "cmil.duckdb"


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


def _open() -> AppTest:
    at = run_app(AppTest.from_file(APP, default_timeout=60))
    at.switch_page(PAGE)
    return run_app(at)


def _metrics(at: AppTest) -> dict[str, int]:
    return {m.label: int(str(m.value).replace(",", "")) for m in at.metric}


def _kept(db: Path, cohort: str, thresholds: QCThresholds) -> dict[str, object]:
    with store.open_store(db, read_only=True) as st_:
        return qc.what_if(st_, cohort, thresholds)


@pytest.mark.slow
def test_a_slider_moves_the_counts_and_apply_records_a_decision(
        db: Path, study: tuple[Path, str]) -> None:
    model_id = study[1]
    at = _open()
    assert at.title[0].value == "Quality control"
    assert at.selectbox(key="qc_cohort").value == "A"
    with store.open_store(db, read_only=True) as st_:
        summary = store.qc_summary(st_)
        before = store.current_qc_decisions(st_)["A"]
    kept_now = int(summary[(summary["cohort"] == "A") & summary["qc_reason"].isna()]["patches"]
                   .iloc[0])
    shown = _metrics(at)
    assert shown["Kept"] == kept_now
    slider = at.slider(key=f"qc_A_{BLUR_THRESHOLD}")
    assert slider.value == pytest.approx(getattr(QCThresholds(), BLUR_THRESHOLD))
    assert not any("stale" in w.value for w in at.warning)

    # A stricter blur threshold: more patches rejected as blurred, live, nothing written.
    with store.open_store(db, read_only=True) as st_:
        patches = pd.concat([store.patches_frame(st_, s.slide_id)
                             for s in store.list_slides(st_, "A")])
    kept_blur = patches.loc[patches["qc_pass"], BLUR_COLUMN]
    strict = float(np.ceil(kept_blur.median() / slider.step) * slider.step)
    assert slider.value < strict <= slider.max
    slider.set_value(strict)
    run_app(at)
    expected = _kept(db, "A", QCThresholds(**{BLUR_THRESHOLD: strict}))
    shown = _metrics(at)
    assert shown["Kept"] == expected["kept"] < kept_now
    assert shown["Rejected: blurred"] == expected["rejected"]["blurred"]  # type: ignore[index]
    with store.open_store(db, read_only=True) as st_:
        assert store.current_qc_decisions(st_)["A"]["decision_id"] == before["decision_id"]

    # Apply: a new decision by the local user, re-judged patches, the model marked stale.
    at.button(key="qc_apply").click()
    run_app(at)
    successes = [plain_text(s.value) for s in at.success]
    with store.open_store(db, read_only=True) as st_:
        after = store.current_qc_decisions(st_)["A"]
        audit = store.audit_frame(st_)
        summary = store.qc_summary(st_)
    assert after["decision_id"] > before["decision_id"]
    assert (after["who"], after["source"]) == ("local", "dashboard")
    assert after["thresholds"][BLUR_THRESHOLD] == strict
    assert after["kept"] == expected["kept"]
    assert successes == [f"Recorded QC decision {after['decision_id']} for A: "
                         f"{expected['kept']} patches kept, "
                         f"{after['rejected']} rejected."]
    row = audit[audit["action"] == "qc-decision"].iloc[0]
    assert json.loads(row["details"])["decision_id"] == after["decision_id"]
    assert int(summary[(summary["cohort"] == "A") & summary["qc_reason"].isna()]["patches"]
               .iloc[0]) == expected["kept"]
    warnings = [plain_text(w.value) for w in at.warning]
    assert any("1 model(s) and the scores of 1 model-cohort pair(s) were built on an older QC "
               "decision" in w for w in warnings), warnings
    stale_table = at.dataframe[-1].value
    assert set(stale_table["Model"]) == {model_id}
    assert set(stale_table["What"]) == {"model (stale)", "scores (stale)"}
    # The model picker says so (the sidebar, drawn by the app around every page).
    home = run_app(AppTest.from_file(APP, default_timeout=60))
    picker = next(s for s in home.selectbox if s.label == "Model")
    (option,) = picker.options  # "attention, 3 Dec 14:52 · stale": short enough never to be cut
    assert option.startswith("attention, ") and option.endswith(" · stale") and len(option) <= 30
    assert f"{model_id} · attention · A · stale" in [plain_text(c.value) for c in home.sidebar.caption]


@pytest.mark.slow
def test_the_nucleated_scope_is_chosen_beside_the_sliders(db: Path) -> None:
    """Photographs judged by field (the default) keep their patches without a nucleus; patch
    by patch, the live counts reject them as "no nucleated cell", nothing written."""
    at = _open()
    scope = at.radio(key="qc_A_nucleated_scope")
    assert scope.value == "field" and list(scope.options) != []
    by_field = _kept(db, "A", QCThresholds())
    by_patch = _kept(db, "A", QCThresholds(nucleated_scope="patch"))
    assert by_patch["kept"] < by_field["kept"]  # type: ignore[operator]
    assert _metrics(at)["Kept"] == by_field["kept"]
    scope.set_value("patch")
    run_app(at)
    shown = _metrics(at)
    assert shown["Kept"] == by_patch["kept"]
    assert shown["Rejected: no nucleated cell"] == \
        by_patch["rejected"]["no nucleated cell"]  # type: ignore[index]
    with store.open_store(db, read_only=True) as st_:
        assert store.current_qc_decisions(st_)["A"]["thresholds"]["nucleated_scope"] == "field"


@pytest.mark.slow
def test_result_pages_and_models_page_show_the_marks(db: Path, study: tuple[Path, str]) -> None:
    model_id = study[1]
    with store.open_store(db) as st_:
        qc.apply_thresholds(st_, "B", QCThresholds(**{BLUR_THRESHOLD: 20.0}), who="ann")
    at = run_app(AppTest.from_file(APP, default_timeout=60))
    at.switch_page("pages/discrimination.py")
    run_app(at)
    notes = [plain_text(w.value) for w in at.warning]
    assert any(f"Scores of cohort(s) 'B' by {model_id} are stale" in n for n in notes), notes
    at.switch_page("pages/models.py")
    run_app(at)
    what, how = at.table[0].value, at.table[1].value  # two tables: every column fits 1280 px
    assert what.loc[model_id, "QC"] == "decision 1"  # the model is not stale: its cohort is A
    assert how.loc[model_id, "Scored"] == "A (6), B (6, stale)"
    assert at.checkbox(key="score_allow_mismatch").value is False


def test_a_store_without_patches_says_how_to_get_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "cmil.duckdb"
    csv = tmp_path / "a.csv"
    csv.write_text("patient_id\nP1\n")
    import_cohort(db, "A", csv, role="train")
    monkeypatch.setenv("CMIL_DB", str(db))
    at = _open()
    assert any("No patches yet" in plain_text(i.value) for i in at.info)
