"""The Patients page with Streamlit's AppTest on the small scored demo store."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.viewer.patients import attention_patches, patient_list
from conftest import run_app as _run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/patients.py"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The small scored demo store (about 30 s to build) and its model id."""
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("page_patients") / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    with store.open_store(db, read_only=True) as st:
        (model_id,) = store.list_models(st)["model_id"]
    return db, str(model_id)


def _open(db: Path, monkeypatch: pytest.MonkeyPatch, patient: str | None = None) -> AppTest:
    """The app on ``db``, on the Patients page, with ``?patient=`` when given."""
    monkeypatch.setenv("CMIL_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    if patient is not None:
        at.query_params["patient"] = patient
    _run(at)
    at.switch_page(PAGE)
    return _run(at)


def _captions(at: AppTest) -> list[list[str]]:
    """Captions of every st.image call, one list per call."""
    return [[img.caption for img in element.proto.imgs] for element in at.get("image")]


@pytest.mark.slow
def test_list_shows_every_scored_patient_review_queue_first(
    demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, model_id = demo
    at = _open(db, monkeypatch)
    assert at.title[0].value == "Patients"
    with store.open_store(db, read_only=True) as st:
        listing = patient_list(st, model_id)
        scores = store.patient_scores_frame(st, model_id)
    table = at.dataframe[0].value
    assert len(table) == len(scores) == 30
    assert list(zip(table["Cohort"], table["Patient"])) == list(
        zip(listing["cohort"], listing["patient_id"]))
    n_queue = int((listing["review"] != "").sum())
    assert n_queue > 0
    assert table["Review"].iloc[:n_queue].str.startswith("⚑ false ").all()
    assert (table["Review"].iloc[n_queue:] == "").all()
    assert table["cMIL score"].tolist() == pytest.approx(listing["score"].tolist())
    assert set(table["BM metastasis"]) <= {"yes", "no", "unknown"}
    assert "Select a patient" in at.info[0].value
    n_fn = int((listing["review"] == "false negative").sum())
    assert f"{n_fn} false negatives, then {n_queue - n_fn} false positives" in at.caption[0].value


@pytest.mark.slow
def test_link_opens_the_patient_with_its_score_and_top_patches(
    demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, model_id = demo
    at = _open(db, monkeypatch, patient="training/T009")
    with store.open_store(db, read_only=True) as st:
        scores = store.patient_scores_frame(st, model_id, "training").set_index("patient_id")
        top, bottom = attention_patches(st, model_id, patient=("training", "T009"), k=8)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["cMIL score"] == f"{scores.loc['T009', 'score']:.3f}"
    assert metrics["Risk group"] == scores.loc["T009", "risk_group"]
    assert metrics["BM metastasis"] == ("yes" if scores.loc["T009", "bm_metastasis"] == 1 else "no")
    # The slide heatmap (one image without caption), then the two galleries, in full rows of
    # four (one image per column): the patch's attention and its corner, in level-0 pixels.
    captions = [c for call in _captions(at)[1:] for c in call]
    expected = [f"{r.attention:.3f} · ({r.x:,}, {r.y:,})"
                for r in (*top.itertuples(), *bottom.itertuples())]
    assert captions[:len(expected)] == expected
    assert at.query_params["model"] == model_id
    clinical = at.table[0].value  # in words, not column names
    assert "MYCN" in clinical.index and "OS (months)" in clinical.index
    assert "mycn" not in clinical.index


@pytest.mark.slow
def test_selecting_a_row_opens_that_patient(
    demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, model_id = demo
    at = _open(db, monkeypatch)
    with store.open_store(db, read_only=True) as st:
        listing = patient_list(st, model_id)
    row = listing.iloc[3]
    # AppTest has no click on a table row: set the selection state the click would.
    at.session_state["patient_table"] = {"selection": {"rows": [3], "columns": [], "cells": []}}
    _run(at)
    assert at.query_params["patient"] == f"{row['cohort']}/{row['patient_id']}"
    assert {m.label: m.value for m in at.metric}["cMIL score"] == f"{row['score']:.3f}"


@pytest.mark.slow
def test_gradcam_of_a_chosen_patch(demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    db, model_id = demo
    at = _open(db, monkeypatch, patient="external_a/A002")
    with store.open_store(db, read_only=True) as st:
        top, _ = attention_patches(st, model_id, patient=("external_a", "A002"), k=8)
    picker = at.selectbox(key="patch:external_a/A002")
    x, y, size = (int(v) for v in top[["x", "y", "size"]].iloc[0])
    picker.set_value(int(top["patch_id"].iloc[0]))
    _run(at)
    flat = [c for call in _captions(at) for c in call]
    assert f"level-0 x {x}, y {y}, {size} × {size} px (full resolution)" in flat
    assert not any(c.startswith("Grad-CAM") for c in flat)
    at.toggle(key="gradcam").set_value(True)
    _run(at)
    flat = [c for call in _captions(at) for c in call]
    assert sum(c.startswith("Grad-CAM at the encoder's 224 px input") for c in flat) == 1
    assert not at.warning  # A002 is correctly classified and every read succeeded


@pytest.mark.slow
def test_several_slides_get_a_picker_and_rejected_patches_their_reasons(
    demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _ = demo
    at = _open(db, monkeypatch, patient="external_b/B002")
    with store.open_store(db, read_only=True) as st:
        slides = store.patient_slides(st, "external_b", "B002")
    picker = at.selectbox(key="slide:external_b/B002")
    assert picker.options == [f"{s.slide_id}: {Path(s.path).name}" for s in slides]
    at2 = _open(db, monkeypatch, patient="external_a/A002")
    with store.open_store(db, read_only=True) as st:
        (slide,) = store.patient_slides(st, "external_a", "A002")
        counts = store.qc_counts(st, slide_id=slide.slide_id)
    rejected = counts[counts["qc_reason"].notna()]
    assert len(rejected) > 0
    expander = at2.expander[0]
    total = int(rejected["patches"].sum())
    assert expander.label == f"Rejected patches of slide {slide.slide_id} ({total})"
    table = expander.dataframe[0].value
    assert table["Rejected because"].value_counts().to_dict() == dict(
        zip(rejected["qc_reason"], rejected["patches"]))


@pytest.mark.slow
def test_an_unknown_patient_link_says_so(
    demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _ = demo
    at = _open(db, monkeypatch, patient="training/<b>Z999</b>")
    assert at.warning[0].value == "This link names no patient of the store:"
    assert at.text[0].value == "no patient '<b>Z999</b>' in cohort 'training'"
    assert not at.metric


def test_no_model_says_how_to_train(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("patient_id,bm_metastasis\nT1,1\nT2,0\n")
    import_cohort(db_path, "train", csv, role="train", center=None)
    at = _open(db_path, monkeypatch)
    assert at.title[0].value == "Patients"
    assert "cmil train" in at.info[0].value
