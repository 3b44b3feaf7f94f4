"""The Models page with AppTest on the small demo study: list, train, score, delete.

Training and scoring run as jobs in the process-wide runner; the tests drive
the page as a user does, and rerun it as its one-second fragment would.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from cmil_core import store
from cmil_core.model import modeling
from conftest import job_runner as _runner, plain_text as _plain, rerun_until, run_app as _run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/models.py"


def _until(at: AppTest, done: Callable[[AppTest], bool], seconds: float = 180) -> AppTest:
    return rerun_until(at, done, seconds, describe=lambda at: [e.value for e in at.error])


def _open(page: str = PAGE) -> AppTest:
    at = _run(AppTest.from_file(APP, default_timeout=60))
    at.switch_page(page)
    return _run(at)


def _said(at: AppTest, start: str) -> str | None:
    texts = [_plain(s.value) for s in at.success]
    return next((t for t in texts if t.startswith(start)), None)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cmil_core.demo.generator import generate_demo

    folder = tmp_path_factory.mktemp("models_demo")
    generate_demo(folder / "cmil.duckdb", size="small", seed=2)
    return folder


@pytest.fixture
def demo_db(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the scored small demo (store, features, models) for one test."""
    folder = tmp_path / "study"
    shutil.copytree(demo_dir, folder, symlinks=True)
    db = folder / "cmil.duckdb"
    monkeypatch.setenv("CMIL_DB", str(db))
    return db


@pytest.fixture(autouse=True)
def fresh_runner() -> Iterator[None]:
    st.cache_resource.clear()
    yield
    runner = _runner()
    for job in list(runner._jobs.values()):
        job.wait(180)
    st.cache_resource.clear()


def _models(db: Path) -> list[store.ModelRow]:
    with store.open_store(db, read_only=True) as handle:
        ids = store.list_models(handle)["model_id"]
        return [m for i in ids if (m := store.get_model(handle, i)) is not None]


@pytest.mark.slow
def test_list_shows_configuration_and_cv_metrics(demo_db: Path) -> None:
    at = _open()
    assert at.title[0].value == "Models"
    (model,) = _models(demo_db)
    what, how = at.table[0].value, at.table[1].value  # two tables: every column fits 1280 px
    assert what.index.tolist() == how.index.tolist() == [model.model_id]
    row = {**what.iloc[0].to_dict(), **how.iloc[0].to_dict()}
    assert (row["Aggregator"], row["Encoder"], row["Training cohort"]) == (
        "attention", "smallcnn", "training")
    assert row["CV AUC (95% CI)"].startswith(f"{model.metrics['cv_auc']:.2f} (")
    assert int(row["CV folds"]) == model.metrics["cv_k"] == 5
    assert row["Cutoff"] == f"{model.cutoff:.3f}"
    n, positive = model.metrics["n_train"], model.metrics["n_positive"]
    assert row["Patients trained on (BM+)"] == f"{n} ({positive})"
    assert row["Scored"] == "external_a (8), external_b (8), training (14)"
    config = json.loads(at.json[0].value)
    assert config["model_id"] == model.model_id and config["cutoff"] == model.cutoff


def _start_training(at: AppTest, *, aggregator: str = "attention", epochs: int = 5) -> None:
    at.radio(key="train_aggregator").set_value(aggregator)
    _run(at)
    at.number_input(key=f"train_{aggregator}_max_epochs").set_value(epochs)
    at.number_input(key="train_folds").set_value(3)
    at.number_input(key="train_seed").set_value(4)
    at.button(key="train_button").click()
    _run(at)


@pytest.mark.slow
def test_training_from_the_page_gives_the_jobs_model_and_its_cv_metric(demo_db: Path) -> None:
    (old,) = _models(demo_db)
    at = _open()
    assert at.selectbox(key="train_cohort").value == "training"  # the training cohort first
    command = at.code[0].value
    assert "--aggregator attention" in command and "--param max_epochs=40" in command
    _start_training(at)
    assert "--seed 4 --folds 3" in at.code[0].value
    assert "--param max_epochs=5" in at.code[0].value
    job = _runner().get("train")
    assert job is not None
    at = _until(at, lambda a: _said(a, "Trained model") is not None)
    assert job.state == "done"
    new = {m.model_id: m for m in _models(demo_db)}
    assert set(new) == {old.model_id, job.result}
    model = new[job.result]
    assert (model.aggregator, model.train_cohorts, model.encoder) == (
        "attention", "training", "smallcnn")
    assert model.config["seed"] == 4 and model.config["cv"]["k"] == model.metrics["cv_k"] == 3
    assert model.config["aggregator_config"]["max_epochs"] == 5
    assert model.artifact_path == str(modeling.artifact_dir(demo_db, job.result))
    cv = model.metrics["cv_auc"]
    assert _said(at, "Trained model") == (
        f"Trained model {job.result} on training ({model.metrics['n_train']} patients): "
        f"cross-validated AUC {cv:.3f} over 3 folds; cutoff {model.cutoff:.3f}. "
        "Score cohorts with it below.")
    # The store's fingerprint changed, so the cached list shows the new model by itself.
    table = at.table[1].value
    assert table.loc[job.result, "CV AUC (95% CI)"].startswith(f"{cv:.2f}")
    assert table.loc[job.result, "Scored"] == "—"
    # The model pickers (the sidebar's among them) offer it too.
    offered = {o for box in at.selectbox if box.label == "Model" for o in box.options}
    assert offered == {old.model_id, job.result}


@pytest.mark.slow
def test_train_job_keeps_running_across_pages_while_the_store_is_read(
    demo_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train holds the store read-write in its thread; pages read it meanwhile."""
    real_train = modeling.train
    inside, release = threading.Event(), threading.Event()

    def held_train(*args: Any, progress: Any, **kwargs: Any) -> str:
        def gate(event: Any) -> None:
            progress(event)
            if not inside.is_set():  # first event: the store is open read-write
                inside.set()
                release.wait(120)
        return real_train(*args, progress=gate, **kwargs)

    monkeypatch.setattr(modeling, "train", held_train)
    try:
        at = _open()
        _start_training(at)
        assert inside.wait(60)
        job = _runner().get("train")
        assert job is not None and job.running
        _run(at)
        assert _plain(at.progress[0].proto.text).startswith("Training: [1/3] features")
        assert at.button(key="train_button").disabled  # one training at a time
        # Elsewhere in the app, reads go on while the job holds the store.
        at.switch_page("pages/overview.py")
        _run(at)
        assert at.title[0].value == "Study overview"
        assert {m.label: m.value for m in at.metric}["Patients"] == "30"
        with store.open_store(demo_db, read_only=True, timeout=5) as handle:
            assert len(store.list_models(handle)) == 1
        # Back on the page, and in a new browser session, the same job is shown.
        at.switch_page(PAGE)
        _run(at)
        assert _plain(at.progress[0].proto.text).startswith("Training: [1/3] features")
        fresh = _open()
        assert _plain(fresh.progress[0].proto.text).startswith("Training: [1/3] features")
    finally:
        release.set()
    at = _until(at, lambda a: _said(a, "Trained model") is not None)
    assert _runner().get("train") is job and job.state == "done"
    assert len(_models(demo_db)) == 2


@pytest.mark.slow
def test_scoring_from_the_page(demo_db: Path) -> None:
    (model,) = _models(demo_db)
    with store.open_store(demo_db) as handle:  # forget the demo's scores of external_a
        none = store.patient_scores_frame(handle, model.model_id).iloc[:0]
        store.write_scores(handle, model.model_id, "external_a", none, pd.DataFrame(
            columns=["patch_id", "probability", "attention", "attention_raw"]))
        assert store.patient_scores_frame(handle, model.model_id, "external_a").empty
    at = _open()
    at.multiselect(key="score_cohorts").set_value(["external_a"])
    _run(at)
    assert "--cohort external_a" in at.code[-1].value
    at.button(key="score_button").click()
    _run(at)
    at = _until(at, lambda a: _said(a, "Scored with") is not None)
    assert _said(at, "Scored with") == f"Scored with {model.model_id}: external_a: 8 patients."
    with store.open_store(demo_db, read_only=True) as handle:
        scores = store.patient_scores_frame(handle, model.model_id, "external_a")
    assert len(scores) == 8 and set(scores["risk_group"]) <= {"high", "low"}
    assert (scores["risk_group"] == "high").tolist() == (scores["score"] >= model.cutoff).tolist()
    table = at.table[1].value
    assert table.loc[model.model_id, "Scored"] == "external_a (8), external_b (8), training (14)"


@pytest.mark.slow
def test_delete_needs_the_typed_model_id(demo_db: Path) -> None:
    (model,) = _models(demo_db)
    folder = modeling.artifact_dir(demo_db, model.model_id)
    assert folder.is_dir()
    at = _open()
    assert at.button(key="delete_model_button").disabled
    at.text_input(key="delete_model_confirm").set_value(model.model_id[:-1])
    _run(at)
    assert at.button(key="delete_model_button").disabled
    at.text_input(key="delete_model_confirm").set_value(model.model_id)
    _run(at)
    at.button(key="delete_model_button").click()
    _run(at)
    assert _plain(at.success[0].value) == (f"Deleted model {model.model_id}, its 30 patient scores and its "
                                   f"files in {folder}.")
    assert not folder.exists()
    with store.open_store(demo_db, read_only=True) as handle:
        assert store.list_models(handle).empty
        assert store.table_counts(handle)["patient_scores"] == 0
    assert "No model trained yet" in _plain(at.info[0].value)


@pytest.mark.slow
def test_the_cnn_can_be_trained_from_the_page(
    demo_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing "trained on the smears" shows the CLI flag and reaches modeling.train."""
    seen: dict[str, Any] = {}

    def fake_train(*args: Any, **kwargs: Any) -> str:
        seen.update(kwargs)
        return "fake-model"

    monkeypatch.setattr(modeling, "train", fake_train)
    at = _open()
    at.radio(key="train_encoder_training").set_value("finetune")
    _run(at)
    assert any("--encoder-training finetune" in c.value for c in at.code)
    at.button(key="train_button").click()
    _run(at)
    job = _runner().get("train")
    assert job is not None
    job.wait(60)
    assert seen["encoder_training"] == "finetune"
