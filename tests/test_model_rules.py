"""One rule for a model's operating cutoff and training cohorts, whoever reads the model."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmil_core import store as store_mod
from cmil_core.analysis.cutoffs import metrics_at_cutoff
from cmil_core.errors import InputError
from cmil_core.outputs import evaluation
from cmil_core.store.model_rules import (
    operating_cutoff,
    read_model_scores,
    split_cohorts,
    training_cohorts,
)
from cmil_core.viewer import patients
from test_report import MODEL, build_scored_store

ROW = store_mod.ModelRow(model_id="m", created_at=datetime(2026, 1, 1), aggregator="attention",
                         encoder="smallcnn", train_cohorts="training", config={}, metrics={},
                         artifact_path="", cutoff=0.42)


def test_the_cutoff_column_wins_then_the_configuration() -> None:
    assert operating_cutoff(ROW) == 0.42
    assert operating_cutoff(replace(ROW, config={"cutoff": 0.3})) == 0.42
    assert operating_cutoff(replace(ROW, cutoff=None, config={"cutoff": 0.3})) == 0.3
    assert operating_cutoff(replace(ROW, cutoff=math.nan, config={"cutoff": "0.25"})) == 0.25


@pytest.mark.parametrize("config", [{}, {"cutoff": None}, {"cutoff": math.inf}, {"cutoff": "x"},
                                    {"cutoff": True}])
def test_no_recorded_cutoff_is_an_error_never_a_made_up_one(config: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InputError, match="model 'm' has no operating cutoff recorded"):
        operating_cutoff(replace(ROW, cutoff=None, config=config))


def test_training_cohorts_are_split_one_way() -> None:
    assert training_cohorts(ROW) == ("training",)
    assert training_cohorts(replace(ROW, train_cohorts="A, B")) == ("A", "B")
    assert split_cohorts(None) == () and split_cohorts(" , ") == ()


def test_evaluation_and_the_review_queue_use_the_same_cutoff(tmp_path: Path) -> None:
    # A model whose cutoff lives only in its configuration (an older model row):
    # evaluation used to fall back to 0.5 while the review queue used 0.7.
    db = tmp_path / "cmil.duckdb"
    build_scored_store(db, evil=False)
    old = "older-model"
    with store_mod.open_store(db) as st:
        row = store_mod.get_model(st, MODEL)
        assert row is not None
        store_mod.add_model(st, replace(row, model_id=old, cutoff=None, config={"cutoff": 0.7}))
        scores = store_mod.patient_scores_frame(st, MODEL)
        for cohort, part in scores.groupby("cohort"):
            store_mod.write_scores(st, old, str(cohort), part, pd.DataFrame(
                columns=["patch_id", "probability", "attention", "attention_raw"]))
    with store_mod.open_store(db, read_only=True) as st:
        rows = {r["cohort"]: r for r in evaluation.discrimination(read_model_scores(st, old))}
        scores = read_model_scores(st, old).scores.dropna(subset=["bm_metastasis"])
        part = scores[scores["cohort"] == "external_a"]
        at = metrics_at_cutoff(part["bm_metastasis"].to_numpy(dtype=int),
                               part["score"].to_numpy(dtype=float), 0.7)
        assert rows["external_a"]["sensitivity"] == pytest.approx(at.sensitivity)
        assert rows["external_a"]["specificity"] == pytest.approx(at.specificity)
        queue = patients.patient_list(st, old)
        assert np.allclose(queue["margin"], queue["score"] - 0.7)
        assert evaluation.survival_cutoff(read_model_scores(st, old), "model")["value"] == 0.7
