"""cmil_core.model.modeling: train on the training cohort only, score every cohort, reload exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmil_core import store
from cmil_core.cli import main
from cmil_core.demo.generator import generate_demo
from cmil_core.errors import InputError
from cmil_core.model import modeling
from cmil_core.model.attention_mil import AttentionMIL
from cmil_core.outputs.evaluation import discrimination
from cmil_core.outputs.localisation import localisation
from cmil_core.store.model_rules import read_model_scores


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("modeling") / "cmil.duckdb"
    generate_demo(db, size="small", seed=1)  # ingests, trains and scores too
    return db


def _model_id(db: Path) -> str:
    """The demo's own model: the first one trained in this store."""
    with store.open_store(db, read_only=True) as st:
        return str(store.list_models(st)["model_id"].iloc[-1])


def test_the_demo_store_is_scored(demo_db: Path) -> None:
    model_id = _model_id(demo_db)
    with store.open_store(demo_db, read_only=True) as st:
        model = store.get_model(st, model_id)
        scores = store.patient_scores_frame(st, model_id)
        patients = store.patients_frame(st)
        n_passed = sum(len(store.passed_patches(st, c.cohort)) for c in store.list_cohorts(st))
        counts = store.table_counts(st)
    assert model is not None and model.train_cohorts == "training"
    assert 0.0 <= model.cutoff <= 1.0
    assert len(scores) == len(patients) == 30  # every patient has patches in the demo
    assert scores["score"].between(0, 1).all()
    expected = np.where(scores["score"] >= model.cutoff, "high", "low")
    assert (scores["risk_group"] == expected).all()
    assert counts["patch_scores"] == n_passed  # every patch that passed QC
    assert model.metrics["n_train"] == 14 and 0.0 <= model.metrics["cv_auc"] <= 1.0


def test_artifacts_describe_the_whole_pipeline(demo_db: Path) -> None:
    model_id = _model_id(demo_db)
    folder = modeling.artifact_dir(demo_db, model_id)
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "model.pt").exists()
    assert config["encoder"]["name"] == "smallcnn" and config["encoder_key"]
    assert config["aggregator"] == "attention" and config["seed"] == 1
    assert config["tiling"] and "thresholds" in config["tiling"][0]
    assert config["versions"]["torch"]
    folds = [pid for fold in config["cv"]["folds"] for pid in fold]
    assert sorted(folds) == [f"T{i:03d}" for i in range(1, 15)]  # training patients only, once


def test_reload_and_rescore_give_identical_scores(demo_db: Path) -> None:
    model_id = _model_id(demo_db)
    with store.open_store(demo_db, read_only=True) as st:
        before = store.patient_scores_frame(st, model_id)
    modeling.score(demo_db, model_id)
    with store.open_store(demo_db, read_only=True) as st:
        after = store.patient_scores_frame(st, model_id)
        assert store.table_counts(st)["patient_scores"] == 30  # replaced, not duplicated
    pd.testing.assert_frame_equal(before, after)


def test_training_sees_only_the_training_cohort(demo_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[np.ndarray]] = []
    original = AttentionMIL.fit

    def spy(self, bags, labels, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([np.asarray(b) for b in bags])
        return original(self, bags, labels, **kwargs)

    monkeypatch.setattr(AttentionMIL, "fit", spy)
    model_id = modeling.train(demo_db, "training", aggregator="attention", seed=1, folds=3)
    with store.open_store(demo_db) as st:
        enc = modeling.load_model(st, model_id).encoder
        training = modeling.cohort_bags(st, "training", enc)
        others = [modeling.cohort_bags(st, c, enc) for c in ("external_a", "external_b")]
    allowed = {b.tobytes() for b in training.bags}
    forbidden = {b.tobytes() for bags in others for b in bags.bags}
    assert len(seen) == 4  # three folds and the final fit
    for call in seen:
        for bag in call:
            key = bag.astype(np.float32).tobytes()
            assert key in allowed and key not in forbidden
    assert len(seen[-1]) == 14  # the final fit: every training patient
    assert all(len(call) < 14 for call in seen[:3])  # each fold holds some out


def test_same_seed_same_model(demo_db: Path) -> None:
    a = modeling.train(demo_db, "training", aggregator="histogram", seed=5, folds=3)
    b = modeling.train(demo_db, "training", aggregator="histogram", seed=5, folds=3)
    with store.open_store(demo_db, read_only=True) as st:
        ma, mb = store.get_model(st, a), store.get_model(st, b)
    assert a != b and ma is not None and mb is not None
    assert ma.metrics["cv_auc"] == mb.metrics["cv_auc"] and ma.cutoff == mb.cutoff
    modeling.score(demo_db, a, ["external_a"])
    modeling.score(demo_db, b, ["external_a"])
    with store.open_store(demo_db, read_only=True) as st:
        sa = store.patient_scores_frame(st, a)["score"].to_numpy()
        sb = store.patient_scores_frame(st, b)["score"].to_numpy()
    np.testing.assert_array_equal(sa, sb)


def test_evaluation_on_the_demo(demo_db: Path) -> None:
    model_id = _model_id(demo_db)
    with store.open_store(demo_db, read_only=True) as st:
        rows = discrimination(read_model_scores(st, model_id))
        loc = localisation(st, model_id)
    assert [r["cohort"] for r in rows] == ["training", "external_a", "external_b"]
    assert all(0 <= r["auc"] <= 1 for r in rows if "auc" in r)
    assert loc["tumour_patches"] > 0 and 0 <= loc["probability_auroc"] <= 1


def test_cli_train_prints_the_model_id_last(
    demo_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--db", str(demo_db), "--cohort", "training", "--folds", "2"]) == 0
    printed = capsys.readouterr()
    model_id = printed.out.strip().splitlines()[-1]
    assert model_id.startswith("training-attention-")
    # the default (auto) on 14 patients: frozen, and train says why
    assert "patch CNN: frozen (too small to train the patch CNN on" in printed.err
    assert main(["score", "--db", str(demo_db), "--model", model_id, "--cohort", "external_b"]) == 0
    assert "external_b: 8 patients scored" in capsys.readouterr().out
    assert main(["score", "--db", str(demo_db), "--model", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no model 'nope'")
    assert main(["evaluate", "--db", str(demo_db), "--model", model_id]) == 0
    assert "localisation (demo ground truth" in capsys.readouterr().out


def test_bad_requests(demo_db: Path) -> None:
    with pytest.raises(InputError, match="--aggregator 'deep'"):
        modeling.train(demo_db, "training", aggregator="deep")
    with pytest.raises(InputError, match="cohort 'nope' does not exist"):
        modeling.train(demo_db, "nope")
    with pytest.raises(InputError, match="no cohort 'x'"):
        modeling.score(demo_db, _model_id(demo_db), ["x"])


def test_delete_model_removes_its_row_scores_and_files_only(demo_db: Path) -> None:
    doomed = modeling.train(demo_db, "training", aggregator="histogram", seed=9, folds=3)
    modeling.score(demo_db, doomed, ["external_a"])
    kept = _model_id(demo_db)
    folder = modeling.artifact_dir(demo_db, doomed)
    assert (folder / "model.pt").exists()
    assert modeling.delete_model(demo_db, doomed) == folder
    assert not folder.exists()
    assert modeling.artifact_dir(demo_db, kept).is_dir()  # another model's files stay
    with store.open_store(demo_db, read_only=True) as st:
        assert store.get_model(st, doomed) is None
        assert store.patient_scores_frame(st, doomed).empty
        assert not store.patient_scores_frame(st, kept).empty
    with pytest.raises(InputError, match=f"no model '{doomed}'"):
        modeling.delete_model(demo_db, doomed)


def _cohort(n_per_class: int, patches_each: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    patients = pd.DataFrame({"patient_id": [f"P{i}" for i in range(2 * n_per_class)] + ["U"],
                             "bm_metastasis": [i % 2 for i in range(2 * n_per_class)] + [None]})
    patches = pd.DataFrame({"patient_id": [p for p in patients["patient_id"]
                                           for _ in range(patches_each)]})
    return patches, patients


def test_auto_trains_the_cnn_unless_the_study_is_tiny() -> None:
    """The auto rule: finetune from 10 labelled patients and 100 passed patches per class."""
    assert modeling.choose_encoder_training(*_cohort(10, 10), "smallcnn") == ("finetune", "")
    mode, why = modeling.choose_encoder_training(*_cohort(9, 50), "smallcnn")
    assert mode == "frozen" and "smaller class: 9 patients, 450" in why
    mode, why = modeling.choose_encoder_training(*_cohort(20, 1), "resnet18")  # one cell a patch
    assert mode == "frozen" and "20 patients, 20 quality-passed patches" in why
    mode, why = modeling.choose_encoder_training(*_cohort(50, 10), "torchscript")
    assert mode == "frozen" and "whole program" in why


def test_the_small_demo_keeps_its_encoder_frozen_and_says_why(demo_db: Path) -> None:
    """14 training patients: auto falls back to frozen; the model's record says so."""
    with store.open_store(demo_db, read_only=True) as st:
        model = store.get_model(st, _model_id(demo_db))
    assert model is not None and model.metrics["encoder_training"] == "frozen"
    assert "too small to train the patch CNN" in model.metrics["encoder_training_note"]
    config = json.loads((modeling.artifact_dir(demo_db, model.model_id) / "config.json")
                        .read_text())
    assert config["encoder_training_requested"] == "auto"
