"""cmil_core.outputs.evaluation: ground-truth overlap and per-cohort tables agree with the statistics."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cmil_core import store as store_mod
from cmil_core.analysis.cox import cox_analysis
from cmil_core.errors import InputError
from cmil_core.outputs import evaluation
from cmil_core.outputs.localisation import localisation, tumour_fraction
from cmil_core.store.model_rules import read_model_scores
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
    from cmil_core.demo.generator import generate_demo

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
    from cmil_core.analysis.roc import delong_unpaired_test
    from cmil_core.outputs.evaluation import cohort_comparisons

    db, model_id = scored
    with store.open_store(db, read_only=True) as st:
        table = cohort_comparisons(read_model_scores(st, model_id))
        scores = read_model_scores(st, model_id).scores  # training: out-of-fold
    assert list(zip(table["a"], table["b"])) == [
        ("training (out-of-fold)", "external_a"), ("training (out-of-fold)", "external_b"),
        ("external_a", "external_b")]
    cohort = {"training (out-of-fold)": "training"}
    for row in table.itertuples():
        expected = delong_unpaired_test(*_labels(scores, cohort.get(row.a, row.a)),
                                        *_labels(scores, cohort.get(row.b, row.b)))
        assert row.p == pytest.approx(expected.p) and row.z == pytest.approx(expected.z)
        assert row.difference == pytest.approx(expected.auc_a - expected.auc_b)
        assert row.method == "delong unpaired"


@pytest.mark.slow
def test_model_comparisons_are_paired_on_the_same_patients(scored) -> None:  # type: ignore[no-untyped-def]
    from cmil_core import store
    from cmil_core.analysis.roc import delong_paired_test
    from cmil_core.errors import InputError
    from cmil_core.outputs.evaluation import model_comparisons

    db, model_id = scored
    with store.open_store(db, read_only=True) as st:
        table = model_comparisons(read_model_scores(st, model_id), read_model_scores(st, "noisy"))
        a = read_model_scores(st, model_id).scores  # training: out-of-fold
        b = read_model_scores(st, "noisy").scores  # no out-of-fold scores: in-sample
        both = a.merge(b[["cohort", "patient_id", "score"]], on=["cohort", "patient_id"])
        with pytest.raises(InputError, match="no model 'nope'"):
            model_comparisons(read_model_scores(st, model_id), read_model_scores(st, "nope"))
    assert table["cohort"].tolist() == ["training", "external_a", "external_b"]
    assert table["scores"].tolist() == ["out-of-fold / in-sample", "final model / final model",
                                        "final model / final model"]
    for row in table.itertuples():
        part = both[both["cohort"] == row.cohort]
        expected = delong_paired_test(part["bm_metastasis"].astype(int).to_numpy(),
                                      part["score_x"].to_numpy(), part["score_y"].to_numpy())
        assert (row.auc_a, row.auc_b) == pytest.approx((expected.auc_a, expected.auc_b))
        assert row.p == pytest.approx(expected.p)
        assert row.method == "delong paired"


@pytest.mark.slow
def test_pooled_validation_survival_pools_the_external_cohorts(scored) -> None:  # type: ignore[no-untyped-def]
    from cmil_core import store
    from cmil_core.analysis.risk_groups import risk_groups
    from cmil_core.analysis.survival import survival_analysis
    from cmil_core.outputs.evaluation import POOLED, risk_survival

    db, model_id = scored
    with store.open_store(db, read_only=True) as st:
        entries = risk_survival(read_model_scores(st, model_id), "os")
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
    external = scores[scores["cohort"] != "training"]
    assert pooled["n_dropped"] == len(external) - len(frame)
    assert pooled["n_dropped_by_column"] == {
        c: int(external[c].isna().sum()) for c in ("os_months", "os_event")
        if external[c].isna().any()}
    assert pooled["result"]["logrank"]["p"] == pytest.approx(expected["logrank"]["p"])


@pytest.fixture(scope="module")
def report_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scored store without slides (test_report's builder): one cohort id is hostile."""
    db = tmp_path_factory.mktemp("report_store") / "cmil.duckdb"
    build_scored_store(db)
    return db


def test_clinical_cox_pools_validation_cohorts(report_store: Path) -> None:
    with store_mod.open_store(report_store, read_only=True) as st:
        result = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model")
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
        "stage": [float(c["inss_stage"] == "4") for c in data["clinical"]],
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
        result = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "efs", 0.5)
        with pytest.raises(InputError, match="every validation patient is in the low risk group"):
            evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", 0.9999)
        with pytest.raises(InputError, match="endpoint 'dfs'"):
            evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "dfs")
    assert [c["name"] for c in result["covariates"]] == [
        "cMIL high risk", "age > 18 months", "MYCN amplified"]
    assert result["excluded"] == [{"column": "inss_stage", "reason": "constant (INSS stage 4: 1)"}]
    assert result["endpoint"] == "efs" and result["cutoff"]["method"] == "number"




def test_clinical_cox_can_be_restricted_to_chosen_factors(report_store: Path) -> None:
    with store_mod.open_store(report_store, read_only=True) as st:
        result = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model", factors=["MYCN amplified"])
        with pytest.raises(InputError, match="unknown clinical factor"):
            evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model", factors=["shoe size"])
    assert [c["name"] for c in result["covariates"]] == ["cMIL high risk", "MYCN amplified"]
    assert {"column": "age_months", "reason": "not chosen"} in result["excluded"]


# ---------------------------------------------------------------------------
# Honest numbers: out-of-fold training rows, the cutoff's scale, probabilities,
# localisation with false positives, the patient flow, Cox by centre
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_training_row_is_out_of_fold_unless_asked(scored) -> None:  # type: ignore[no-untyped-def]
    from cmil_core.analysis.roc import roc_auc

    db, model_id = scored
    with store_mod.open_store(db, read_only=True) as st:
        oof = store_mod.oof_scores_frame(st, model_id)
        final = store_mod.patient_scores_frame(st, model_id)
        honest = evaluation.discrimination(read_model_scores(st, model_id))
        optimistic = evaluation.discrimination(read_model_scores(st, model_id, in_sample=True))
        model = store_mod.get_model(st, model_id)
    assert model is not None
    # Every labelled training patient has one out-of-fold score, from one of the k folds.
    labelled = final[(final["cohort"] == "training") & final["bm_metastasis"].notna()]
    assert sorted(oof["patient_id"]) == sorted(labelled["patient_id"])
    assert set(oof["fold"]) == set(range(model.metrics["cv_k"]))
    y = oof["bm_metastasis"].astype(int).to_numpy()
    assert honest[0]["label"] == "training (out-of-fold)" and honest[0]["scores"] == "out-of-fold"
    assert honest[0]["auc"] == pytest.approx(roc_auc(y, oof["score"].to_numpy()))
    assert honest[0]["auc"] == pytest.approx(model.metrics["cv_auc"])  # the Models page's CV AUC
    assert optimistic[0]["label"] == "training (in-sample)"
    assert optimistic[0]["auc"] == pytest.approx(
        roc_auc(labelled["bm_metastasis"].astype(int).to_numpy(), labelled["score"].to_numpy()))
    # External cohorts are the final model's either way.
    assert honest[1:] == optimistic[1:] and honest[1]["label"] == "external_a"


@pytest.mark.slow
def test_cutoff_means_the_same_on_out_of_fold_and_final_scores(scored) -> None:  # type: ignore[no-untyped-def]
    """The cutoff is chosen on out-of-fold scores; on the final model's scores of the same
    patients, mapped onto that scale, it calls as many patients positive, and sensitivity and
    specificity agree up to the patients the two models rank differently around it: at most one
    patient of each class here (the small demo has 14 training patients, so one positive is
    17 points; tests/test_recalibration.py shows exact agreement when the rankings agree)."""
    from cmil_core.analysis.roc import roc_auc

    db, model_id = scored
    with store_mod.open_store(db, read_only=True) as st:
        model = store_mod.get_model(st, model_id)
        oof = evaluation.metrics_table(read_model_scores(st, model_id)).iloc[0]
        final = evaluation.metrics_table(read_model_scores(st, model_id, in_sample=True)).iloc[0]
        scores = store_mod.patient_scores_frame(st, model_id)
    assert model is not None and model.config["score_map"]["method"] == "quantile-oof"
    assert (oof["label"], final["label"]) == ("training (out-of-fold)", "training (in-sample)")
    assert oof["n"] == final["n"]
    assert oof["tp"] + oof["fp"] == final["tp"] + final["fp"]  # the same operating point
    assert abs(oof["tp"] - final["tp"]) <= 1 and abs(oof["fp"] - final["fp"]) <= 1
    # The map is strictly increasing: the final model's AUCs are those of its raw output.
    for _, part in scores.dropna(subset=["bm_metastasis"]).groupby("cohort"):
        y = part["bm_metastasis"].astype(int).to_numpy()
        if 0 < y.sum() < len(y):
            assert roc_auc(y, part["score"].to_numpy()) == pytest.approx(
                roc_auc(y, part["score_raw"].to_numpy()))
    # Risk groups are read on the mapped scale, the cutoff's.
    assert ((scores["score"] >= model.cutoff) == (scores["risk_group"] == "high")).all()


@pytest.mark.slow
def test_calibration_reads_scores_at_the_training_prevalence(scored) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from cmil_core.analysis.calibration import brier_score
    from cmil_core.model.recalibration import prevalence_shift

    db, model_id = scored
    with store_mod.open_store(db, read_only=True) as st:
        entries = evaluation.calibration(read_model_scores(st, model_id))
        scores = read_model_scores(st, model_id).scores.dropna(subset=["bm_metastasis"])
        model = store_mod.get_model(st, model_id)
        note = evaluation.probability_note(read_model_scores(st, model_id))
    assert model is not None
    prevalence = model.metrics["n_positive"] / model.metrics["n_train"]
    assert model.config["training_prevalence"] == pytest.approx(prevalence)
    assert f"({prevalence:.1%})" in note and "50%" in note
    for e in entries:
        part = scores[scores["cohort"] == e["cohort"]]
        y = part["bm_metastasis"].astype(int).to_numpy()
        p = part["score"].to_numpy()
        corrected = prevalence_shift(p, prevalence, 0.5)
        assert e["prevalence"] == pytest.approx(prevalence)
        assert e["brier"] == pytest.approx(brier_score(y, corrected))
        # odds times prior-odds ratio, by hand for one patient
        odds = p[0] / (1 - p[0]) * prevalence / (1 - prevalence)
        assert corrected[0] == pytest.approx(odds / (1 + odds))
        assert np.all(np.argsort(corrected, kind="stable") == np.argsort(p, kind="stable"))


@pytest.mark.slow
def test_localisation_per_cohort_counts_false_positives(scored) -> None:  # type: ignore[no-untyped-def]
    db, model_id = scored
    with store_mod.open_store(db, read_only=True) as st:
        loc = localisation(st, model_id)
        patches = store_mod.localisation_patches(st, model_id).dropna(subset=["bm_metastasis"])
        looks = store_mod.lookalike_regions_frame(st)
        boxes = store_mod.tumor_regions_frame(st)
    assert [c["cohort"] for c in loc["cohorts"]] == ["training", "external_a", "external_b"]
    assert "at least 10% of its area" in loc["rule"] and loc["threshold"] == 0.5
    assert loc["lookalikes"] == (not looks.empty)
    assert sum(c["patches"] for c in loc["cohorts"]) == loc["patches"]
    assert sum(c["patches_negative"] for c in loc["cohorts"]) == loc["patches_negative"]
    # False positives by hand: negative patients' patches at probability >= 0.5.
    for c in loc["cohorts"]:
        part = patches[patches["cohort"] == c["cohort"]]
        negative = part[part["bm_metastasis"] == 0]
        assert c["patches_negative"] == len(negative)
        assert c["negative_flagged"] == pytest.approx((negative["probability"] >= 0.5).mean())
        flagged = negative[negative["probability"] >= 0.5]["patient_id"].nunique()
        assert c["negative_patients_flagged"] == flagged
        assert c["patients_negative"] == negative["patient_id"].nunique()
    truth = tumour_fraction(patches.reset_index(drop=True), boxes) >= 0.1
    assert loc["tumour_patches"] == int(truth[(patches["bm_metastasis"] == 1).to_numpy()].sum())
    if not looks.empty:
        assert loc["lookalike_patches"] > 0 and 0 <= loc["lookalike_flagged"] <= 1


@pytest.mark.slow
def test_patient_flow_goes_from_import_to_analysis(scored) -> None:  # type: ignore[no-untyped-def]
    db, model_id = scored
    with store_mod.open_store(db, read_only=True) as st:
        flow = evaluation.patient_flow(st, model_id)
        patients = store_mod.patients_frame(st)
        oof = store_mod.oof_scores_frame(st, model_id)
        final = store_mod.patient_scores_frame(st, model_id)
        text = evaluation.format_flow(flow)
    assert flow["cohort"].tolist() == ["training", "external_a", "external_b"]
    steps = ["imported", "with_slides", "with_passed_patches", "scored", "labelled"]
    for row in flow.to_dict("records"):
        counts = [int(row[s]) for s in steps]
        assert counts == sorted(counts, reverse=True)  # each step within the one before
        assert row["imported"] == (patients["cohort"] == row["cohort"]).sum()
    assert flow.iloc[0]["scored"] == len(oof)  # the training cohort's analysis is out-of-fold
    ext = final[final["cohort"] == "external_a"]
    assert flow.iloc[1]["scored"] == len(ext)
    assert flow.iloc[1]["labelled"] == ext["bm_metastasis"].notna().sum()
    assert "training: " in text and "with QC-passed patches" in text


def test_clinical_cox_stratified_by_centre_matches_r(report_store: Path) -> None:
    """The same model as R's coxph(... + strata(center)) (tests/data/cox_strata.R, whose data
    tests/data/cox_strata.csv are this store's validation patients)."""
    from test_survival import R_COX_STRATA, R_COX_STRATA_CONCORDANCE

    with store_mod.open_store(report_store, read_only=True) as st:
        result = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model", strata="center")
        with pytest.raises(InputError, match="strata 'cohort'"):
            evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model", strata="cohort")
    assert result["stratified_by"].startswith("the cohort's centre")
    assert [lv["n"] for lv in result["strata"]["levels"]] == [40, 40]
    for row, (coef, se, low, high, p) in zip(result["coefficients"], R_COX_STRATA.values()):
        assert row["coef"] == pytest.approx(coef, abs=1e-6)
        assert row["se"] == pytest.approx(se, rel=1e-6)
        assert row["ci"] == pytest.approx([low, high], rel=1e-6)
        assert row["p"] == pytest.approx(p, rel=1e-5)
    assert result["concordance"] == pytest.approx(R_COX_STRATA_CONCORDANCE, abs=1e-9)


# ---------------------------------------------------------------------------
# Issue 14, item 7: the PH check, the time-dependent AUC and calibration
# intercept/slope reach the evaluation tables (the statistics themselves are
# checked against R in test_proportional_hazards.py, test_time_auc.py,
# test_calibration.py and test_r_live.py)
# ---------------------------------------------------------------------------


def test_clinical_cox_carries_the_ph_test_of_its_model(report_store: Path) -> None:
    with store_mod.open_store(report_store, read_only=True) as st:
        result = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model")
        scores = store_mod.patient_scores_frame(st, MODEL)
        patients = store_mod.patients_frame(st)
    data = scores[scores["cohort"] != "training"].merge(patients[["cohort", "patient_id",
                                                                  "clinical"]])
    frame = pd.DataFrame({
        "t": data["os_months"], "e": data["os_event"],
        "risk": (data["score"] >= 0.5).astype(float),
        "age": [float(c["age_months"] > 18) for c in data["clinical"]],
        "stage": [float(c["inss_stage"] == "4") for c in data["clinical"]],
        "mycn": [float(c["mycn"] == "amplified") for c in data["clinical"]],
    })
    direct = cox_analysis(frame, "t", "e", ["risk", "age", "stage", "mycn"])
    ours, theirs = result["ph_test"]["tests"], direct["ph_test"]["tests"]
    assert [t["term"] for t in ours] == [*(c["name"] for c in result["covariates"]), "GLOBAL"]
    assert [t["chisq"] for t in ours] == pytest.approx([t["chisq"] for t in theirs], rel=1e-9)
    assert [c["ph_p"] for c in result["coefficients"]] == [t["p"] for t in ours[:-1]]
    flagged = [t["term"] for t in ours if t["violated"]]
    notes = [w for w in result["warnings"] if "proportional hazards doubtful" in w]
    assert flagged == ["age > 18 months"]  # p = 0.025 in this store
    assert notes == ["proportional hazards doubtful for covariate 'age > 18 months' (Schoenfeld "
                     "test, cox.zph km: p = 0.025): its hazard ratio changes with time; the HR "
                     "is an average over follow-up"]


def test_risk_survival_gives_the_td_auc_of_the_score(report_store: Path) -> None:
    from cmil_core.analysis.time_auc import td_auc

    with store_mod.open_store(report_store, read_only=True) as st:
        entries = evaluation.risk_survival(read_model_scores(st, MODEL), "os")
        scores = read_model_scores(st, MODEL).scores
    assert evaluation.TD_AUC_MONTHS == (12.0, 24.0, 36.0)
    for entry in entries[:-1]:  # the last one pools the validation cohorts
        part = scores[scores["cohort"] == entry["cohort"]].dropna(subset=["os_months", "os_event"])
        expected = td_auc(part["os_months"], part["os_event"], part["score"], [12, 24, 36])
        assert entry["td_auc"]["times"] == [12.0, 24.0, 36.0]
        assert entry["td_auc"]["auc"] == pytest.approx(expected["auc"], abs=1e-12)
        assert entry["result"]["cox"]["ph_test"]["tests"][-1]["term"] == "GLOBAL"


def test_calibration_gives_intercept_and_slope_per_cohort(report_store: Path, capsys) -> None:
    import json

    from cmil_core.analysis.calibration import calibration_fit
    from cmil_core.cli import main
    from cmil_core.model.recalibration import prevalence_shift

    with store_mod.open_store(report_store, read_only=True) as st:
        entries = evaluation.calibration(read_model_scores(st, MODEL))
        scores = read_model_scores(st, MODEL).scores.dropna(subset=["bm_metastasis"])
    for e in entries:
        part = scores[scores["cohort"] == e["cohort"]]
        p = prevalence_shift(part["score"].to_numpy(float), e["prevalence"], 0.5)
        expected = calibration_fit(part["bm_metastasis"].to_numpy(int), p)
        assert e["fit"]["slope"] == pytest.approx(expected["slope"], rel=1e-12)
        assert e["fit"]["intercept_ci"] == pytest.approx(expected["intercept_ci"], rel=1e-12)
    assert main(["evaluate", "--db", str(report_store), "--model", MODEL, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["calibration"]
    assert [r["cohort"] for r in rows] == [e["cohort"] for e in entries]
    assert set(rows[0]) == {"cohort", "scores", "label", "n", "prevalence", "brier", "intercept",
                            "intercept_se", "intercept_ci", "slope", "slope_se", "slope_ci",
                            "note"}
    assert rows[0]["slope"] == pytest.approx(entries[0]["fit"]["slope"], rel=1e-12)
    assert main(["evaluate", "--db", str(report_store), "--model", MODEL]) == 0
    text = capsys.readouterr().out
    first = entries[0]
    assert (f"  {first['label']}: n {first['n']}, Brier {first['brier']:.3f}, calibration "
            f"intercept {first['fit']['intercept']:.2f}") in text


def test_a_cohort_whose_survival_is_not_drawn_says_which_reason() -> None:
    """The Survival page's "Not drawn" names the reason, with the numbers behind it."""
    from cmil_core.outputs.evaluation import _not_drawn

    frame = pd.DataFrame({"os_event": [1, 0, 1], "risk_group": ["high"] * 3})
    assert _not_drawn(frame, "os_event", 0.4461) == (
        "a single risk group: all 3 patients score at or above the cutoff 0.446 fixed on training")
    assert _not_drawn(frame.assign(os_event=0), "os_event", 0.5) == (
        "no event among 3 patients with follow-up")
    assert _not_drawn(frame.iloc[:0], "os_event", 0.5) == "no patient with follow-up"
