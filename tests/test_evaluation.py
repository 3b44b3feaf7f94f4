"""cmil_core.evaluation: ground-truth overlap and per-cohort tables agree with the statistics."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cmil_core import evaluation
from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.evaluation import tumour_fraction
from cmil_core.survival import cox_analysis
from test_report import EVIL, MODEL, build_scored_store


def test_tumour_fraction_is_the_area_inside_the_union_of_boxes() -> None:
    patches = pd.DataFrame({"slide_id": [1, 1, 1, 2], "x": [0, 100, 0, 0], "y": [0, 0, 100, 0],
                            "size": [100, 100, 100, 100]})
    boxes = pd.DataFrame({"slide_id": [1, 1], "x": [50, 50], "y": [0, 25],
                          "width": [100, 100], "height": [50, 50]})
    fractions = tumour_fraction(patches, boxes)
    # Patch 1: x 50-100, y 0-75 of 100x100 -> 0.375 (the boxes overlap: counted once).
    assert fractions[0] == pytest.approx(0.375)
    assert fractions[1] == pytest.approx(0.375)  # x 100-150 of the patch at 100
    assert fractions[2] == 0.0  # below the boxes
    assert fractions[3] == 0.0  # another slide has no boxes


def test_no_boxes_no_tumour() -> None:
    patches = pd.DataFrame({"slide_id": [1], "x": [0], "y": [0], "size": [10]})
    assert tumour_fraction(patches, pd.DataFrame(columns=["slide_id", "x", "y", "width", "height"])).tolist() == [0.0]


# ---------------------------------------------------------------------------
# Per-cohort tables on a scored store: each equals the statistic computed by hand
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The small demo, plus a second model whose scores are the first's with noise."""
    from datetime import datetime

    import numpy as np

    from cmil_core import store
    from cmil_core.demo import generate_demo

    db = tmp_path_factory.mktemp("evaluation") / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    with store.open_store(db) as st:
        (first,) = store.list_models(st)["model_id"]
        model = store.get_model(st, first)
        assert model is not None
        store.add_model(st, store.ModelRow(
            model_id="noisy", created_at=datetime(2026, 1, 1), aggregator=model.aggregator,
            encoder=model.encoder, train_cohorts=model.train_cohorts, config={}, metrics={},
            artifact_path="", cutoff=model.cutoff))
        rng = np.random.default_rng(0)
        scores = store.patient_scores_frame(st, first)
        for cohort, part in scores.groupby("cohort"):
            noisy = part.assign(score=np.clip(part["score"] + rng.normal(0, 0.3, len(part)), 0, 1))
            store.write_scores(st, "noisy", str(cohort), noisy, pd.DataFrame(
                columns=["patch_id", "probability", "attention", "attention_raw"]))
    return db, str(first)


def _labels(scores: pd.DataFrame, cohort: str) -> tuple:  # type: ignore[type-arg]
    part = scores[scores["cohort"] == cohort]
    return part["bm_metastasis"].astype(int).to_numpy(), part["score"].to_numpy()


@pytest.mark.slow
def test_cohort_comparisons_are_unpaired_delong_tests(scored) -> None:  # type: ignore[no-untyped-def]
    from cmil_core import store
    from cmil_core.evaluation import cohort_comparisons
    from cmil_core.stats import delong_unpaired_test

    db, model_id = scored
    with store.open_store(db, read_only=True) as st:
        table = cohort_comparisons(st, model_id)
        scores = store.patient_scores_frame(st, model_id)
    assert list(zip(table["a"], table["b"])) == [
        ("training", "external_a"), ("training", "external_b"), ("external_a", "external_b")]
    for row in table.itertuples():
        expected = delong_unpaired_test(*_labels(scores, row.a), *_labels(scores, row.b))
        assert row.p == pytest.approx(expected.p) and row.z == pytest.approx(expected.z)
        assert row.difference == pytest.approx(expected.auc_a - expected.auc_b)
        assert row.method == "delong unpaired"


@pytest.mark.slow
def test_model_comparisons_are_paired_on_the_same_patients(scored) -> None:  # type: ignore[no-untyped-def]
    from cmil_core import store
    from cmil_core.errors import InputError
    from cmil_core.evaluation import model_comparisons
    from cmil_core.stats import delong_paired_test

    db, model_id = scored
    with store.open_store(db, read_only=True) as st:
        table = model_comparisons(st, model_id, "noisy")
        a = store.patient_scores_frame(st, model_id)
        b = store.patient_scores_frame(st, "noisy")
        with pytest.raises(InputError, match="no model 'nope'"):
            model_comparisons(st, model_id, "nope")
    assert table["cohort"].tolist() == ["training", "external_a", "external_b"]
    for row in table.itertuples():
        y, sa = _labels(a, row.cohort)
        _, sb = _labels(b, row.cohort)
        expected = delong_paired_test(y, sa, sb)
        assert (row.auc_a, row.auc_b) == pytest.approx((expected.auc_a, expected.auc_b))
        assert row.p == pytest.approx(expected.p)
        assert row.method == "delong paired"


@pytest.mark.slow
def test_pooled_validation_survival_pools_the_external_cohorts(scored) -> None:  # type: ignore[no-untyped-def]
    from cmil_core import store
    from cmil_core.evaluation import POOLED, risk_survival
    from cmil_core.survival import risk_groups, survival_analysis

    db, model_id = scored
    with store.open_store(db, read_only=True) as st:
        entries = risk_survival(st, model_id, "os")
        model = store.get_model(st, model_id)
        scores = store.patient_scores_frame(st, model_id)
    assert model is not None
    assert [e["cohort"] for e in entries] == ["training", "external_a", "external_b", POOLED]
    pooled = entries[-1]
    assert pooled["pooled"] == ["external_a", "external_b"]
    frame = scores[scores["cohort"] != "training"].dropna(subset=["os_months", "os_event"]).copy()
    frame["risk_group"] = risk_groups(frame["score"], model.cutoff)
    expected = survival_analysis(frame, "os_months", "os_event", group="risk_group")
    assert pooled["n"] == len(frame)
    assert pooled["result"]["logrank"]["p"] == pytest.approx(expected["logrank"]["p"])


@pytest.fixture(scope="module")
def report_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scored store without slides (test_report's builder): one cohort id is hostile."""
    db = tmp_path_factory.mktemp("report_store") / "cmil.duckdb"
    build_scored_store(db)
    return db


def test_clinical_cox_pools_validation_cohorts(report_store: Path) -> None:
    with store_mod.open_store(report_store, read_only=True) as st:
        result = evaluation.clinical_cox(st, MODEL, "os", "model")
        scores = store_mod.patient_scores_frame(st, MODEL)
        patients = store_mod.patients_frame(st)
    assert result["cohorts"] == sorted(["external_a", EVIL])
    assert result["n"] == 80 and result["cutoff"]["value"] == 0.5
    assert [c["name"] for c in result["covariates"]] == [
        "cMIL high risk", "age > 18 months", "INSS stage 4", "MYCN amplified"]
    # the same model, built by hand
    clinical = patients[["cohort", "patient_id", "clinical"]]
    data = scores[scores["cohort"] != "training"].merge(clinical)
    frame = pd.DataFrame({
        "t": data["os_months"], "e": data["os_event"],
        "risk": (data["score"] >= 0.5).astype(float),
        "age": [float(c["age_months"] > 18) for c in data["clinical"]],
        "stage": [float(c["inss_stage"] == 4) for c in data["clinical"]],
        "mycn": [float(c["mycn"] == "amplified") for c in data["clinical"]],
    })
    direct = cox_analysis(frame, "t", "e", ["risk", "age", "stage", "mycn"])
    assert [r["hr"] for r in result["coefficients"]] == pytest.approx(
        [r["hr"] for r in direct["coefficients"]], rel=1e-9)
    assert result["events"] == direct["events"]


def test_clinical_cox_leaves_out_constant_and_missing_columns(tmp_path: Path) -> None:
    db = tmp_path / "cmil.duckdb"
    build_scored_store(db, evil=False, stage4_validation=True)
    with store_mod.open_store(db, read_only=True) as st:
        result = evaluation.clinical_cox(st, MODEL, "efs", 0.5)
        with pytest.raises(InputError, match="every validation patient is in the low risk group"):
            evaluation.clinical_cox(st, MODEL, "os", 0.9999)
        with pytest.raises(InputError, match="endpoint 'dfs'"):
            evaluation.clinical_cox(st, MODEL, "dfs")
    assert [c["name"] for c in result["covariates"]] == [
        "cMIL high risk", "age > 18 months", "MYCN amplified"]
    assert result["excluded"] == [{"column": "inss_stage", "reason": "constant (INSS stage 4: 1)"}]
    assert result["endpoint"] == "efs" and result["cutoff"]["method"] == "number"




def test_clinical_cox_can_be_restricted_to_chosen_factors(report_store: Path) -> None:
    with store_mod.open_store(report_store, read_only=True) as st:
        result = evaluation.clinical_cox(st, MODEL, "os", "model", factors=["MYCN amplified"])
        with pytest.raises(InputError, match="unknown clinical factor"):
            evaluation.clinical_cox(st, MODEL, "os", "model", factors=["shoe size"])
    assert [c["name"] for c in result["covariates"]] == ["cMIL high risk", "MYCN amplified"]
    assert {"column": "age_months", "reason": "not chosen"} in result["excluded"]
