"""A model's scores read once (cmil_core.store.model_rules.read_model_scores): the cutoff rule,
the cohort order, out-of-fold against in-sample training rows, and the evaluation built on it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.outputs import evaluation
from cmil_core.store.model_rules import (
    FINAL,
    IN_SAMPLE,
    OUT_OF_FOLD,
    read_model_scores,
)

NO_PATCHES = pd.DataFrame(columns=["patch_id", "probability", "attention", "attention_raw"])

# Cohorts whose names sort otherwise than the store lists them (training first, then
# validation, then test): "zeta" trained on, "mid" validation, "alpha" test.
COHORTS = {
    "zeta": ("train", [("z1", 1, 0.9), ("z2", 0, 0.2), ("z3", 1, 0.7), ("z4", 0, 0.4),
                       ("z5", None, 0.5)]),
    "mid": ("validation", [("m2", 1, 0.8), ("m1", 0, 0.3), ("m3", 0, 0.6)]),
    "alpha": ("test", [("a1", 1, 0.65), ("a2", 0, 0.1)]),
}
#: Out-of-fold scores of the labelled training patients (the unlabelled z5 has none).
OOF = {"z1": 0.6, "z2": 0.35, "z3": 0.3, "z4": 0.45}


def _model(model_id: str, *, cutoff: float | None, config: dict | None = None,  # type: ignore[type-arg]
           metrics: dict | None = None) -> store_mod.ModelRow:  # type: ignore[type-arg]
    return store_mod.ModelRow(
        model_id=model_id, created_at=datetime(2026, 1, 2), aggregator="attention",
        encoder="smallcnn", train_cohorts="zeta", config=config or {}, metrics=metrics or {},
        artifact_path="", cutoff=cutoff)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model_scores") / "cmil.duckdb"
    with store_mod.open_store(path) as store:
        for cohort, (role, rows) in COHORTS.items():
            store_mod.import_patients(
                store, cohort, [store_mod.PatientRow(patient_id=p, bm_metastasis=y, os_months=12.0,
                                                     os_event=0) for p, y, _ in rows],
                role=role, center=None if cohort == "alpha" else f"Centre {cohort}")
        models = [
            _model("m", cutoff=0.5, config={"training_prevalence": 0.3, "trained_prior": 0.5}),
            _model("config-only", cutoff=None, config={"cutoff": 0.7},
                   metrics={"n_train": 4, "n_positive": 1}),
            _model("no-cutoff", cutoff=None),
        ]
        for model in models:
            store_mod.add_model(store, model)
            for cohort, (_role, rows) in COHORTS.items():
                frame = pd.DataFrame({"patient_id": [p for p, _, _ in rows],
                                      "score": [s for _, _, s in rows], "risk_group": "low"})
                store_mod.write_scores(store, model.model_id, cohort, frame, NO_PATCHES)
        store_mod.write_oof_scores(store, "m", "zeta", pd.DataFrame(
            {"patient_id": list(OOF), "fold": [0, 1, 0, 1], "score": list(OOF.values())}))
    return path


def test_the_cutoff_is_the_column_then_the_configuration_else_an_error(db: Path) -> None:
    with store_mod.open_store(db, read_only=True) as store:
        assert read_model_scores(store, "m").cutoff == 0.5
        older = read_model_scores(store, "config-only")
        assert older.cutoff == 0.7 and older.operating_cutoff() == 0.7
        assert evaluation.survival_cutoff(older, "model")["value"] == 0.7
        none = read_model_scores(store, "no-cutoff")  # reading works: no made-up 0.5
    assert none.cutoff is None
    with pytest.raises(InputError, match="model 'no-cutoff' has no operating cutoff recorded"):
        none.operating_cutoff()
    with pytest.raises(InputError, match="model 'no-cutoff' has no operating cutoff recorded"):
        evaluation.metrics_table(none)
    assert evaluation.survival_cutoff(none, 0.4)["value"] == 0.4  # a number needs no cutoff


def test_cohorts_come_in_the_stores_order_patients_by_id(db: Path) -> None:
    with store_mod.open_store(db, read_only=True) as store:
        scores = read_model_scores(store, "m")
        only = read_model_scores(store, "m", cohorts=["alpha", "mid"])
        with pytest.raises(InputError, match="no cohort 'nope' in the store"):
            read_model_scores(store, "m", cohorts=["nope"])
        with pytest.raises(InputError, match="no model 'ghost' in the store"):
            read_model_scores(store, "ghost")
    assert scores.model_id == "m" and scores.training_cohorts == ("zeta",)
    assert scores.cohorts == ("zeta", "mid", "alpha")  # training, validation, test
    assert list(dict.fromkeys(scores.scores["cohort"])) == ["zeta", "mid", "alpha"]
    assert scores.of("mid")["patient_id"].tolist() == ["m1", "m2", "m3"]
    assert [r["cohort"] for r in evaluation.discrimination(scores)] == ["zeta", "mid", "alpha"]
    assert scores.centres == {"zeta": "Centre zeta", "mid": "Centre mid", "alpha": "alpha"}
    assert only.cohorts == ("mid", "alpha") and set(only.scores["cohort"]) == {"mid", "alpha"}
    # Pooled fits and the report take the store's listing order: by cohort name.
    assert evaluation.patient_order(scores.scores)["cohort"].tolist()[:2] == ["alpha", "alpha"]


def test_training_rows_are_out_of_fold_unless_in_sample_is_asked(db: Path) -> None:
    with store_mod.open_store(db, read_only=True) as store:
        honest = read_model_scores(store, "m")
        optimistic = read_model_scores(store, "m", in_sample=True)
        fallback = read_model_scores(store, "config-only")  # saved without out-of-fold scores
    training = honest.of("zeta")
    # Labelled patients only (cross-validation needs the label), each its fold model's score.
    assert dict(zip(training["patient_id"], training["score"])) == OOF
    assert set(training["scores"]) == {OUT_OF_FOLD}
    assert set(training["label"]) == {"zeta (out-of-fold)"}
    assert not honest.in_sample and optimistic.in_sample
    trained = optimistic.of("zeta")
    assert trained["patient_id"].tolist() == ["z1", "z2", "z3", "z4", "z5"]
    assert trained["score"].tolist() == [0.9, 0.2, 0.7, 0.4, 0.5]
    assert set(trained["scores"]) == {IN_SAMPLE} and set(trained["label"]) == {"zeta (in-sample)"}
    assert set(fallback.of("zeta")["scores"]) == {IN_SAMPLE}
    # Other cohorts: the final model's scores either way, named by the cohort alone.
    for scores in (honest, optimistic):
        assert scores.of("mid")["score"].tolist() == [0.3, 0.8, 0.6]
        assert set(scores.of("mid")["scores"]) == {FINAL} and set(scores.of("mid")["label"]) == {
            "mid"}
    # The discrimination table reads the same rows: AUC of the out-of-fold scores (z1 0.6 and
    # z3 0.3 against z2 0.35 and z4 0.45: 2 of 4 pairs ranked right), of the in-sample ones 1.
    rows = {r["cohort"]: r for r in evaluation.discrimination(honest)}
    assert rows["zeta"]["auc"] == pytest.approx(0.5) and rows["zeta"]["n"] == 4
    assert evaluation.discrimination(optimistic)[0]["auc"] == pytest.approx(1.0)


def test_the_priors_are_read_from_the_configuration_then_the_metrics(db: Path) -> None:
    with store_mod.open_store(db, read_only=True) as store:
        scores = read_model_scores(store, "m")
        older = read_model_scores(store, "config-only")
    assert (scores.prevalence, scores.prior) == (0.3, 0.5)
    assert (older.prevalence, older.prior) == (0.25, 0.5)  # 1 positive of 4 trained on
    assert "training prevalence (30.0%)" in evaluation.probability_note(scores)
