"""cmil_core.ingest.qc and the store's QC decisions: thresholds files, SQL against Python, what-if
counts, decisions with their audit rows, bias warnings, stale marks, tiling differences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmil_core import store
from cmil_core.errors import InputError
from cmil_core.ingest import qc
from cmil_core.ingest.quality import METRIC_COLUMNS, QC_REASONS, QC_RULES, QCThresholds, qc_decision
from qc_helpers import (
    BLUR_COLUMN,
    BLUR_LIMIT,
    BLUR_THRESHOLD,
    BLURRED,
    GOOD,
    TILING,
    blur,
    cohort_with_patches,
)

DEFAULTS = QCThresholds().to_dict()


# --------------------------------------------------------------------------- thresholds files


def test_thresholds_from_toml_json_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "qc.toml"
    toml.write_text("min_blur_variance = 5\nmax_dark_fraction = 0.25\n")
    assert qc.load_thresholds_file(toml) == {"min_blur_variance": 5.0,
                                             "max_dark_fraction": 0.25}
    table = tmp_path / "table.toml"
    table.write_text("[qc]\nmax_background_fraction = 0.9\n")
    assert qc.load_thresholds_file(table) == {"max_background_fraction": 0.9}
    js = tmp_path / "qc.json"
    js.write_text(json.dumps({"min_blur_variance": 7}))
    # Precedence: defaults < file < flag; a flag of None is not given.
    t = qc.resolve_thresholds(toml, {"min_blur_variance": 9.0, "max_dark_fraction": None})
    assert t == QCThresholds(min_blur_variance=9.0, max_dark_fraction=0.25)
    assert qc.resolve_thresholds(js, {}) == QCThresholds(min_blur_variance=7.0)
    base = QCThresholds(max_dark_fraction=0.3)
    assert qc.resolve_thresholds(None, {"min_blur_variance": 1.0}, base=base) == QCThresholds(
        max_dark_fraction=0.3, min_blur_variance=1.0)
    assert qc.resolve_thresholds(None, {"min_blur_variance": None}) is None  # keep the current
    assert qc.flag_name("min_blur_variance") == "--min-blur-variance"
    assert tuple(DEFAULTS) == qc.QC_FIELDS
    assert tuple(k for k in DEFAULTS if k != "nucleated_scope") == qc.THRESHOLD_FIELDS


@pytest.mark.parametrize(("name", "text", "message"), [
    ("qc.toml", "min_blur = 5\n", "qc.toml: unknown QC threshold 'min_blur'"),
    ("qc.toml", "min_blur_variance = 'five'\n", "qc.toml: key 'min_blur_variance': 'five'"),
    ("qc.toml", "min_blur_variance = true\n", "qc.toml: key 'min_blur_variance': True"),
    ("qc.toml", "max_dark_fraction = 1.5\n", "qc.toml: key 'max_dark_fraction': "),
    ("qc.toml", "min_blur_variance = nan\n", "qc.toml: key 'min_blur_variance': nan"),
    ("qc.toml", "min_blur_variance = = 5\n", "qc.toml: not valid TOML"),
    ("qc.json", "[1, 2]", "qc.json: expected a table"),
    ("qc.json", "{", "qc.json: not valid JSON"),
])
def test_bad_thresholds_files_name_file_and_key(tmp_path: Path, name: str, text: str,
                                                message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as err:
        qc.load_thresholds_file(path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="absent.toml: no such QC thresholds file"):
        qc.load_thresholds_file(tmp_path / "absent.toml")


def test_a_bad_flag_is_named() -> None:
    with pytest.raises(InputError, match="^--min-mean-intensity: "):
        qc.resolve_thresholds(None, {"min_mean_intensity": 250.0})


# --------------------------------------------------------------------------- SQL == Python


def _edge_metrics(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Random metrics around every threshold, with exact boundaries, one ulp either side,
    NaN, and extremes."""
    t = QCThresholds()
    columns = {}
    for rule in QC_RULES:
        for column, _, name in rule.conditions:
            limit = getattr(t, name)
            specials = np.array([limit, np.nextafter(limit, -np.inf), np.nextafter(limit, np.inf),
                                 np.nan, 0.0, -0.0, 1e300, -1e300])
            spread = rng.normal(limit, abs(limit) * 0.5 + 1e-3, n)
            values = np.where(rng.random(n) < 0.3, rng.choice(specials, n), spread)
            columns[column] = values
    for column in METRIC_COLUMNS:  # metrics no rule reads (yet)
        columns.setdefault(column, rng.random(n))
    return pd.DataFrame(columns)


def test_sql_rules_agree_with_qc_decision_on_random_and_edge_values() -> None:
    rng = np.random.default_rng(0)
    for thresholds in (QCThresholds(), QCThresholds(max_background_fraction=1.0,
                                                    max_dark_fraction=1.0,
                                                    **{BLUR_THRESHOLD: 0.0})):
        metrics = _edge_metrics(rng, 4000)
        expected = qc_decision(metrics[list(METRIC_COLUMNS)], thresholds,
                               thick_fraction=metrics["thick_fraction"])[1]
        got = store.judge_metrics(metrics, thresholds.to_dict())
        assert got == expected
        reasons = {r for r in got if r is not None}
        assert reasons == set(QC_REASONS)  # every rule was exercised, and some patches kept
        assert None in got


def test_decision_in_the_store_agrees_with_python_nulls_included(db_path: Path,
                                                                  tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    metrics = _edge_metrics(rng, 600)
    rows = metrics.to_dict(orient="records")
    cohort_with_patches(db_path, tmp_path, "A", {"P1": (1, rows[:300]), "P2": (0, rows[300:])})
    thresholds = QCThresholds(max_dark_fraction=0.2, **{BLUR_THRESHOLD: BLUR_LIMIT * 1.5})
    with store.open_store(db_path) as st:
        decision = store.apply_qc_decision(st, "A", thresholds.to_dict(), who="ann",
                                           source="cli")
        stored = pd.concat([store.patches_frame(st, s.slide_id)
                            for s in store.list_slides(st, "A")])
    # The store keeps NaN as NULL; both fail their rule, as in Python.
    expected_pass, expected = qc_decision(metrics[list(METRIC_COLUMNS)], thresholds,
                                          thick_fraction=metrics["thick_fraction"])
    assert stored["qc_reason"].where(stored["qc_reason"].notna(), None).tolist() == expected
    assert stored["qc_pass"].tolist() == expected_pass.tolist()
    assert decision["kept"] == int(expected_pass.sum())
    assert decision["rejected"] == 600 - int(expected_pass.sum())


# --------------------------------------------------------------------------- field scope

NO_NUCLEUS = {**GOOD, "nuclear_area_um2": 0.0}


def test_the_nucleated_scope_is_a_setting_of_files_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "qc.toml"
    toml.write_text('nucleated_scope = "patch"\nmin_blur_variance = 5\n')
    assert qc.load_thresholds_file(toml) == {"nucleated_scope": "patch",
                                             "min_blur_variance": 5.0}
    assert qc.resolve_thresholds(toml, {}) == QCThresholds(nucleated_scope="patch",
                                                          min_blur_variance=5.0)
    assert qc.resolve_thresholds(None, {"nucleated_scope": "patch"}).nucleated_scope == "patch"
    assert QCThresholds().nucleated_scope == "field"
    assert QCThresholds.from_dict(QCThresholds(nucleated_scope="patch").to_dict()) == \
        QCThresholds(nucleated_scope="patch")
    toml.write_text('nucleated_scope = "cell"\n')
    with pytest.raises(InputError, match="^qc.toml: key 'nucleated_scope': 'cell' is not one "
                                         "of 'field', 'patch'"):
        qc.load_thresholds_file(toml)
    with pytest.raises(InputError, match="nucleated_scope='slide' must be one of"):
        QCThresholds(nucleated_scope="slide")


def test_sql_and_python_agree_on_fields_of_photographs() -> None:
    rng = np.random.default_rng(5)
    metrics = _edge_metrics(rng, 3000)
    # Small fields (photographs, about two patches each) and rows of no photograph (-1).
    metrics["field"] = rng.integers(-1, 1500, len(metrics))
    for scope in ("field", "patch"):
        thresholds = QCThresholds(nucleated_scope=scope)
        expected = qc_decision(metrics[list(METRIC_COLUMNS)], thresholds,
                               thick_fraction=metrics["thick_fraction"],
                               field=metrics["field"])[1]
        assert store.judge_metrics(metrics, thresholds.to_dict()) == expected
    by_field = qc_decision(metrics[list(METRIC_COLUMNS)], QCThresholds(),
                           thick_fraction=metrics["thick_fraction"], field=metrics["field"])[1]
    by_patch = qc_decision(metrics[list(METRIC_COLUMNS)], QCThresholds(nucleated_scope="patch"),
                           thick_fraction=metrics["thick_fraction"])[1]
    assert by_field.count("no nucleated cell") < by_patch.count("no nucleated cell")
    assert by_field.count("no nucleated cell") > 0  # fields without any nuclear material


def test_photographs_are_judged_by_field_and_slides_by_patch(db_path: Path,
                                                             tmp_path: Path) -> None:
    """A photograph holding one nucleated cell keeps its red-cell patches; a photograph of
    red cells only loses them all; a whole-slide file is judged patch by patch, and with
    nucleated_scope 'patch' photographs are too. Blur stays a rule of each patch."""
    photo = {**TILING, "photograph": True}
    patches = [GOOD, NO_NUCLEUS, NO_NUCLEUS, BLURRED]
    cohort_with_patches(db_path, tmp_path, "F", {"P1": (1, patches), "P2": (0, patches)},
                        tiling=photo)
    cohort_with_patches(db_path, tmp_path, "R", {"P1": (1, [NO_NUCLEUS] * 3)}, tiling=photo)
    cohort_with_patches(db_path, tmp_path, "W", {"P1": (1, patches), "P2": (0, patches)})
    with store.open_store(db_path) as st:
        for cohort in ("F", "R", "W"):
            qc.apply_thresholds(st, cohort, QCThresholds(), who="ann", source="cli")

        def reasons(cohort: str) -> list[str | None]:
            frame = pd.concat([store.patches_frame(st, s.slide_id)
                               for s in store.list_slides(st, cohort)])
            return frame["qc_reason"].where(frame["qc_reason"].notna(), None).tolist()

        assert reasons("F") == [None, None, None, "blurred"] * 2
        assert reasons("R") == ["no nucleated cell"] * 3
        assert reasons("W") == [None, "no nucleated cell", "no nucleated cell", "blurred"] * 2
        per_patch = QCThresholds(nucleated_scope="patch")
        # The live counts (what-if) and the patient counts follow the scope as well.
        assert qc.what_if(st, "F", QCThresholds())["kept"] == 6
        assert qc.what_if(st, "F", per_patch)["kept"] == 2
        assert qc.what_if(st, "W", QCThresholds())["kept"] == 2
        made = qc.apply_thresholds(st, "F", per_patch, who="ann", source="dashboard")
        assert (made["kept"], made["rejected"]) == (2, 6)
        assert made["thresholds"]["nucleated_scope"] == "patch"
        assert reasons("F") == [None, "no nucleated cell", "no nucleated cell", "blurred"] * 2
        assert qc.cohort_thresholds(st, "F") == per_patch
        near = store.qc_near_threshold(st, "F", "no nucleated cell", QCThresholds().to_dict())
        assert set(near["side"]) == {"kept"}  # by field, nothing is rejected for it
        status = qc.format_qc(qc.qc_status(st, "F", QCThresholds()))
        assert "nucleated_scope=field" in status


def test_the_qc_command_takes_the_nucleated_scope(db_path: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from cmil_core.cli import main

    photo = {**TILING, "photograph": True}
    cohort_with_patches(db_path, tmp_path, "F", {"P1": (1, [GOOD, NO_NUCLEUS, NO_NUCLEUS])},
                        tiling=photo)
    assert main(["qc", "--db", str(db_path), "--cohort", "F", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["candidate"]["kept"] == 3
    assert main(["qc", "--db", str(db_path), "--cohort", "F", "--nucleated-scope", "patch",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidate"]["kept"] == 1 and out["thresholds"]["nucleated_scope"] == "patch"
    with pytest.raises(SystemExit) as exited:
        main(["qc", "--db", str(db_path), "--cohort", "F", "--nucleated-scope", "cell"])
    assert exited.value.code == 2
    assert "invalid choice: 'cell'" in capsys.readouterr().err


# --------------------------------------------------------------------------- decisions


def test_what_if_counts_without_writing_and_apply_records_the_decision(
        db_path: Path, tmp_path: Path) -> None:
    cohort_with_patches(db_path, tmp_path, "A", {
        "P1": (1, [GOOD] * 6 + [BLURRED] * 2),
        "P2": (0, [GOOD] * 5 + [blur(1.25)] * 3),
    })
    loose = QCThresholds(**{BLUR_THRESHOLD: BLUR_LIMIT / 6})
    strict = QCThresholds(**{BLUR_THRESHOLD: BLUR_LIMIT * 5 / 3})
    with store.open_store(db_path) as st:
        first = qc.apply_thresholds(st, "A", QCThresholds(), who="ann", source="ingest")
        assert first["new"] and first["kept"] == 14 and first["rejected"] == 2
        before = store.qc_summary(st)
        counts = qc.what_if(st, "A", strict)
        assert counts["kept"] == 11 and counts["rejected"]["blurred"] == 5
        assert list(counts["rejected"]) == list(QC_REASONS) and counts["patches"] == 16
        assert qc.what_if(st, "A", loose)["kept"] == 16
        # Nothing written by the what-if.
        pd.testing.assert_frame_equal(store.qc_summary(st), before)
        assert len(store.qc_decisions_frame(st, "A")) == 1
        # Applying: patches re-judged, a decision and an audit row.
        second = qc.apply_thresholds(st, "A", strict, who="bob", source="dashboard")
        assert second["decision_id"] > first["decision_id"] and second["new"]
        assert (second["kept"], second["rejected"]) == (11, 5)
        summary = store.qc_summary(st)
        assert summary.set_index(summary["qc_reason"].fillna("kept"))["patches"].to_dict() == {
            "kept": 11, "blurred": 5}
        current = store.current_qc_decisions(st)["A"]
        assert current["who"] == "bob" and current["source"] == "dashboard"
        assert current["thresholds"] == strict.to_dict()
        audit = store.audit_frame(st)
        row = audit[audit["action"] == "qc-decision"].iloc[0]
        details = json.loads(row["details"])
        assert row["who"] == "bob" and row["cohort"] == "A"
        assert details["decision_id"] == second["decision_id"]
        assert details["previous_decision_id"] == first["decision_id"]
        # The same thresholds again, only if changed: no new decision (nothing goes stale).
        same = qc.apply_thresholds(st, "A", strict, who="ann", source="ingest",
                                   only_if_changed=True)
        assert not same["new"] and same["decision_id"] == second["decision_id"]
        assert len(store.qc_decisions_frame(st, "A")) == 2
        with pytest.raises(InputError, match="cohort 'Z' does not exist"):
            qc.apply_thresholds(st, "Z", strict, who="ann")


def test_near_threshold_samples_each_side_nearest_first(db_path: Path, tmp_path: Path) -> None:
    factors = [0.08, 0.4, 0.92, 0.99, 1.0, 1.08, 2.5, 25.0]
    cohort_with_patches(db_path, tmp_path, "A", {
        "P1": (1, [blur(f) for f in factors] + [
            {**GOOD, "background_fraction": 0.99}]),
    })
    with store.open_store(db_path, read_only=True) as st:
        near = store.qc_near_threshold(st, "A", "blurred", QCThresholds().to_dict(), k=3)
        with pytest.raises(InputError, match="unknown QC reason"):
            store.qc_near_threshold(st, "A", "fuzzy", DEFAULTS)
    rejected = (near[near["side"] == "rejected"][BLUR_COLUMN] / BLUR_LIMIT).round(6).tolist()
    kept = (near[near["side"] == "kept"][BLUR_COLUMN] / BLUR_LIMIT).round(6).tolist()
    assert rejected == [0.99, 0.92, 0.4]
    assert kept == [1.0, 1.08, 2.5]
    assert {"path", "x", "y", "size", "mpp"} <= set(near.columns)


# --------------------------------------------------------------------------- bias warnings


def test_cohort_losing_more_than_30_percent_is_warned(db_path: Path, tmp_path: Path) -> None:
    # 7 of 20 rejected (35 %) in A; 6 of 20 (30 %, not more) in B.
    cohort_with_patches(db_path, tmp_path, "A", {
        "P1": (1, [GOOD] * 6 + [BLURRED] * 4), "P2": (0, [GOOD] * 7 + [BLURRED] * 3)})
    cohort_with_patches(db_path, tmp_path, "B", {
        "Q1": (1, [GOOD] * 7 + [BLURRED] * 3), "Q2": (0, [GOOD] * 7 + [BLURRED] * 3)},
        role="validation")
    with store.open_store(db_path, read_only=True) as st:
        warnings = qc.qc_warnings(st)
    assert [(w.kind, w.cohort) for w in warnings] == [("cohort-loss", "A")]
    assert warnings[0].value == pytest.approx(0.35)
    assert "35% of its 20 patches" in warnings[0].message


def test_patients_losing_every_patch_are_listed(db_path: Path, tmp_path: Path) -> None:
    cohort_with_patches(db_path, tmp_path, "A", {
        "P1": (1, [GOOD] * 10 + [BLURRED]), "P2": (0, [BLURRED] * 2),
        "P3": (0, [GOOD] * 10), "P4": (1, [BLURRED])})
    with store.open_store(db_path, read_only=True) as st:
        warnings = qc.qc_warnings(st, "A")
    lost = [w for w in warnings if w.kind == "patients-without-patches"]
    assert len(lost) == 1 and lost[0].patients == ["P2", "P4"]
    assert lost[0].message.endswith(": P2, P4")


def test_kept_share_differing_between_classes_is_warned(db_path: Path, tmp_path: Path) -> None:
    # Positives keep 15 of 20 (75 %), negatives 17 of 20 (85 %): 10 points, not more.
    cohort_with_patches(db_path, tmp_path, "A", {
        "P1": (1, [GOOD] * 15 + [BLURRED] * 5), "P2": (0, [GOOD] * 17 + [BLURRED] * 3),
        "P3": (None, [BLURRED] * 1 + [GOOD])})  # unlabelled: in no class
    with store.open_store(db_path, read_only=True) as st:
        assert [w.kind for w in qc.qc_warnings(st)] == []
        # Candidate thresholds that reject more of the positives' patches: 11 points apart.
        counts = store.qc_patient_counts(st, QCThresholds(
            **{BLUR_THRESHOLD: BLUR_LIMIT / 6}).to_dict())
    assert counts.set_index("patient_id")["kept"].to_dict() == {"P1": 20, "P2": 20, "P3": 2}
    frame = pd.DataFrame({"cohort": "A", "patient_id": ["P1", "P2"], "bm_metastasis": [1, 0],
                          "patches": [100, 100], "kept": [80, 91]})
    gap = qc.warnings_from_counts(frame)
    assert [w.kind for w in gap] == ["class-imbalance"]
    assert gap[0].value == pytest.approx(-0.11)
    assert "80% of the patches of patients with bone-marrow metastasis and 91%" in gap[0].message


# --------------------------------------------------------------------------- stale marks, tiling


def _model(st: store.Store, model_id: str, cohort: str, config: dict) -> None:
    from datetime import datetime

    store.add_model(st, store.ModelRow(model_id, datetime(2026, 1, 1), "attention", "smallcnn",
                                       cohort, config, {}, "/nowhere", 0.5))


def test_models_and_scores_on_an_older_decision_are_stale(db_path: Path, tmp_path: Path) -> None:
    cohort_with_patches(db_path, tmp_path, "A", {"P1": (1, [GOOD] * 4), "P2": (0, [GOOD] * 4)})
    cohort_with_patches(db_path, tmp_path, "B", {"Q1": (1, [GOOD] * 4)}, role="validation")
    with store.open_store(db_path) as st:
        a1 = qc.apply_thresholds(st, "A", QCThresholds(), who="ann", source="ingest")
        b1 = qc.apply_thresholds(st, "B", QCThresholds(), who="ann", source="ingest")
        tiling = qc.training_tiling(st, "A")
        assert tiling["patch_um"] == [112.0] and tiling["overlap"] == [0.0]
        assert tiling["qc_decision"]["decision_id"] == a1["decision_id"]
        _model(st, "m1", "A", {"qc_decision": tiling["qc_decision"], "training_tiling": tiling})
        _model(st, "legacy", "A", {})
        scores = pd.DataFrame({"patient_id": ["Q1"], "score": [0.7], "risk_group": ["high"]})
        store.write_scores(st, "m1", "B", scores, pd.DataFrame(
            {"patch_id": [], "probability": [], "attention": [], "attention_raw": []}),
            qc_decision_id=b1["decision_id"])
        marks = qc.stale_marks(st)
        assert not marks["models"].set_index("model_id").loc["m1", "stale"]
        assert marks["models"].set_index("model_id").loc["legacy", "stale"]  # no decision kept
        assert not marks["scores"]["stale"].any()
        assert qc.model_notes(marks, "m1") == []
        # B decided again: m1's scores of B stale, the model not.
        qc.apply_thresholds(st, "B", QCThresholds(**{BLUR_THRESHOLD: 1.0}), who="bob")
        marks = qc.stale_marks(st)
        assert marks["scores"].set_index("cohort").loc["B", "stale"]
        assert not marks["models"].set_index("model_id").loc["m1", "stale"]
        notes = qc.model_notes(marks, "m1")
        assert len(notes) == 1 and "Scores of cohort(s) 'B' by m1 are stale" in notes[0]
        # A decided again: the model stale too.
        qc.apply_thresholds(st, "A", QCThresholds(**{BLUR_THRESHOLD: 1.0}), who="bob")
        marks = qc.stale_marks(st)
        assert marks["models"].set_index("model_id").loc["m1", "stale"]
        assert "Model m1 is stale" in qc.model_notes(marks, "m1")[0]


def test_tiling_differences_name_what_differs(db_path: Path, tmp_path: Path) -> None:
    cohort_with_patches(db_path, tmp_path, "A", {"P1": (1, [GOOD] * 2)})
    other = {"config": {"patch_um": 56.0, "overlap": 0.25, "output_px": 224},
             "metrics_version": 1}
    cohort_with_patches(db_path, tmp_path, "B", {"Q1": (1, [GOOD] * 2)}, tiling=other,
                        role="validation")
    cohort_with_patches(db_path, tmp_path, "C", {"R1": (1, [GOOD] * 2)}, role="validation")
    with store.open_store(db_path) as st:
        for cohort in "ABC":
            qc.apply_thresholds(st, cohort, QCThresholds(), who="ann", source="ingest")
        qc.apply_thresholds(st, "C", QCThresholds(**{BLUR_THRESHOLD: 5.0}), who="ann")
        trained = qc.training_tiling(st, "A")
        assert qc.tiling_differences(st, trained, "A") == []
        diffs = qc.tiling_differences(st, trained, "B")
        assert diffs == ["patch size (µm) 112 in training, 56 in 'B'",
                         "overlap 0 in training, 0.25 in 'B'"]
        assert qc.tiling_differences(st, trained, "C") == [
            f"QC thresholds {BLUR_THRESHOLD} {BLUR_LIMIT} vs 5.0 (training vs 'C')"]
        assert qc.tiling_differences(st, {}, "B") == []  # a model older than the record
    assert TILING["config"]["patch_um"] == 112.0


def test_slider_ranges_hold_the_value_and_the_metrics_on_a_round_grid() -> None:
    ranges = pd.DataFrame({"column": [BLUR_COLUMN], "low": [7.97], "high": [824.5],
                           "p01": [9.0], "p99": [800.0]})
    low, high, step = qc.threshold_range(BLUR_THRESHOLD, 2.0, ranges)
    assert (low, high, step) == (min(2.0, BLUR_LIMIT, 7.0), 825.0, 1.0)
    low, high, step = qc.threshold_range("min_mean_intensity", 60.0, pd.DataFrame(
        {"column": ["mean_intensity"], "low": [182.73], "high": [203.07], "p01": [183.0],
         "p99": [203.0]}))
    assert (low, high, step) == (60.0, 204.0, 1.0)
    low, high, step = qc.threshold_range("max_dark_fraction", 0.5, pd.DataFrame(
        {"column": ["dark_fraction"], "low": [0.0], "high": [0.0], "p01": [0.0], "p99": [0.0]}))
    assert (low, high, step) == (0.0, 0.5, 0.001)


def test_a_decision_recorded_before_field_scope_keeps_deciding_patch_by_patch() -> None:
    # Older decisions have no nucleated_scope: they were decided patch by patch, and
    # re-deciding them must not change their photographs' outcome silently.
    from cmil_core.ingest.qc import decision_thresholds

    old = {"thresholds": {"min_blur_variance": 8.0}}
    assert decision_thresholds(old).nucleated_scope == "patch"
    assert decision_thresholds(old).min_blur_variance == 8.0
    new = {"thresholds": {"min_blur_variance": 8.0, "nucleated_scope": "field"}}
    assert decision_thresholds(new).nucleated_scope == "field"
