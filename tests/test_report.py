"""The study report: files, numbers equal to the core functions', escaping, atomic writes."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.outputs import evaluation, figures, report
from cmil_core.store.model_rules import read_model_scores
from conftest import is_plain_json

EVIL = "ext<script>alert(1)</script>"
MODEL = "m-test"


def _cohort(rng: np.random.Generator, prefix: str, n: int, stage4: bool | None = None) -> tuple:
    """Patients and scores: metastatic patients score higher and die sooner."""
    label = (rng.random(n) < 0.45).astype(int)
    score = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.8 * label - 0.9)))
    hazard = 0.02 * np.exp(1.2 * label)
    death = rng.exponential(1.0 / hazard)
    follow = rng.uniform(12, 80, n)
    patients, clinical = [], []
    for i in range(n):
        info = {"age_months": float(rng.choice([6.0, 30.0, 60.0])),
                "inss_stage": "4" if (stage4 if stage4 is not None else rng.random() < 0.5) else "4S",
                "mycn": "amplified" if rng.random() < 0.3 else "non-amplified"}
        clinical.append(info)
        patients.append(store_mod.PatientRow(
            patient_id=f"{prefix}{i:03d}", bm_metastasis=int(label[i]),
            os_months=float(min(death[i], follow[i])), os_event=int(death[i] <= follow[i]),
            efs_months=float(min(death[i], follow[i])), efs_event=int(death[i] <= follow[i]),
            clinical=info))
    return patients, score


def build_scored_store(
    db: Path, *, evil: bool = True, stage4_validation: bool | None = None
) -> str:
    """A scored store in a second: training + two validation cohorts, one of them oddly named."""
    rng = np.random.default_rng(11)
    cohorts = [("training", "train", "T", 60, None),
               ("external_a", "validation", "A", 40, stage4_validation),
               (EVIL if evil else "external_b", "test", "B<script>", 40, stage4_validation)]
    no_patches = pd.DataFrame(columns=["patch_id", "probability", "attention", "attention_raw"])
    with store_mod.open_store(db) as st:
        store_mod.add_model(st, store_mod.ModelRow(
            model_id=MODEL, created_at=datetime(2026, 1, 2, 3, 4, 5), aggregator="attention",
            encoder="smallcnn", train_cohorts="training", config={}, metrics={},
            artifact_path=str(db.parent / "models" / MODEL), cutoff=0.5))
        for name, role, prefix, n, stage4 in cohorts:
            patients, score = _cohort(rng, prefix, n, stage4)
            store_mod.import_patients(st, name, patients, role=role, center=f"Centre {prefix}")
            frame = pd.DataFrame({"patient_id": [p.patient_id for p in patients], "score": score,
                                  "risk_group": np.where(score >= 0.5, "high", "low")})
            store_mod.write_scores(st, MODEL, name, frame, no_patches)
    return MODEL


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("report") / "cmil.duckdb"
    build_scored_store(db)
    return db


@pytest.fixture(scope="module")
def written(scored: Path) -> tuple[Path, list]:
    events: list = []
    html_path = report.write_report(scored, MODEL, scored.parent / "out", progress=events.append)
    return html_path, events


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _km_stems(db: Path) -> set[str]:
    """km_<cohort> for every cohort (and pooled entry) that risk_survival can draw."""
    with store_mod.open_store(db, read_only=True) as st:
        entries = evaluation.risk_survival(read_model_scores(st, MODEL), "os", "model")
    names = {"training": "training", "external_a": "external_a", EVIL: "ext_script_alert_1_script"}
    return {f"km_{names.get(e['cohort'], e['cohort'].replace(' ', '_'))}"
            for e in entries if "result" in e}


def test_report_folder_holds_every_file(scored: Path, written) -> None:
    html_path, events = written
    out = html_path.parent
    assert html_path == out / "report.html" and html_path.exists()
    meta = json.loads((out / "report.json").read_text())
    assert meta["generator"] == "cmil_core.outputs.report" and is_plain_json(meta)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted([*meta["files"], "report.html"])
    stems = {Path(f).stem for f in meta["files"] if f.startswith("figures/")}
    km = _km_stems(scored)
    assert {"km_training", "km_external_a", "km_ext_script_alert_1_script"} <= km
    assert stems == {"roc", "calibration", "decision", "cox_forest", *km}
    assert {Path(f).name for f in meta["files"] if f.startswith("tables/")} == {
        "cohort_overview.csv", "discrimination.csv", "roc_band.csv", "metrics_at_cutoff.csv",
        "survival_summary.csv", "survival_at_risk.csv", "cox_coefficients.csv",
        "patient_scores.csv", "patient_flow.csv", "calibration.csv", "time_dependent_auc.csv"}
    with Image.open(out / "figures" / "roc.png") as image:
        assert image.size == (920, 920)  # 4.6 in at 200 dpi
    assert events[-1].done == events[-1].total and events[-1].overall == 1.0
    assert all(0.0 <= e.overall <= 1.0 for e in events)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no leftovers


def test_numbers_equal_the_core_functions_and_the_tables(scored: Path, written) -> None:
    out = written[0].parent
    meta = json.loads((out / "report.json").read_text())
    with store_mod.open_store(scored, read_only=True) as st:
        disc = evaluation.discrimination(read_model_scores(st, MODEL))
        metrics = evaluation.metrics_table(read_model_scores(st, MODEL))
        surv = evaluation.risk_survival(read_model_scores(st, MODEL), "os", "model")
        cox = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model")
        scores = store_mod.patient_scores_frame(st, MODEL)
    table = _read(out / "tables" / "discrimination.csv")
    assert table["cohort"].tolist() == [d["cohort"] for d in disc]
    assert [d["cohort"] for d in disc] == ["training", "external_a", EVIL]
    for row, d, j in zip(table.itertuples(), disc, meta["discrimination"], strict=True):
        assert row.auc == pytest.approx(d["auc"], rel=1e-12) == j["auc"]
        assert row.ci_low == pytest.approx(d["ci_low"], rel=1e-12) == j["ci_low"]
    assert [r["legend"] for r in meta["roc"]] == [figures.auc_label(d) for d in disc]
    m = _read(out / "tables" / "metrics_at_cutoff.csv")
    np.testing.assert_allclose(m["sensitivity"], metrics["sensitivity"])
    np.testing.assert_allclose(m["sensitivity_ci_low"], [ci[0] for ci in metrics["sensitivity_ci"]])
    assert [r["tp"] for r in meta["metrics_at_cutoff"]] == m["tp"].tolist()
    assert m["tp"].tolist() == metrics["tp"].tolist()
    s = _read(out / "tables" / "survival_summary.csv")
    for entry, j in zip(surv, meta["survival"], strict=True):
        rows = s[s["cohort"] == entry["cohort"]]
        p = entry["result"]["logrank"]["p"]
        assert rows["logrank_p"].tolist() == pytest.approx([p, p], rel=1e-12)
        assert j["logrank"]["p"] == p
        assert rows["hr"].iloc[0] == pytest.approx(entry["result"]["cox"]["hr"], rel=1e-12)
    at_risk = _read(out / "tables" / "survival_at_risk.csv")
    first = surv[0]["result"]["at_risk"]
    high = at_risk[(at_risk["cohort"] == "training") & (at_risk["group"] == "high")]
    assert high["at_risk"].tolist() == first["groups"][0]["at_risk"]
    c = _read(out / "tables" / "cox_coefficients.csv")
    assert c["name"].tolist() == [r["name"] for r in cox["coefficients"]] == [
        r["name"] for r in meta["cox"]["coefficients"]]
    np.testing.assert_allclose(c["hr"], [r["hr"] for r in cox["coefficients"]], rtol=1e-12)
    patients = _read(out / "tables" / "patient_scores.csv")
    assert len(patients) == len(scores) == 140
    np.testing.assert_allclose(patients["score"], scores["score"])
    band = _read(out / "tables" / "roc_band.csv")
    assert len(band) == 3 * 101 and meta["roc"][0]["band"]["se_low"] == pytest.approx(
        band[band["cohort"] == "training"]["sensitivity_low"].tolist(), rel=1e-12)


def test_html_is_self_contained_and_escapes_user_strings(scored: Path, written) -> None:
    text = written[0].read_text()
    meta = json.loads((written[0].parent / "report.json").read_text())
    assert "<script" not in text.lower()  # the cohort and patient ids are shown, escaped
    assert "ext&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "B&lt;script&gt;000" in text  # a patient id
    for entry in meta["roc"]:
        legend = entry["legend"].replace("<", "&lt;").replace(">", "&gt;")
        assert legend in text  # e.g. "training: AUC 0.83 (0.72-0.94)", as the figure's legend
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 4 + len(_km_stems(scored))  # ROC, calibration, decision, Cox, KMs
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as image:
        assert image.format == "PNG"
    links = re.findall(r'href="([^"]+)"', text)
    assert set(meta["files"]) <= set(links)
    assert all((written[0].parent / link).exists() for link in links)


def test_zip_holds_the_folder(written) -> None:
    out = written[0].parent
    data = report.report_zip(out)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert archive.read("out/report.html") == written[0].read_bytes()
    assert sorted(names) == sorted(f"out/{p.relative_to(out).as_posix()}"
                                   for p in out.rglob("*") if p.is_file())
    with pytest.raises(InputError, match="not a cMIL report folder"):
        report.report_zip(out / "figures")


def test_refuses_a_foreign_folder_and_bad_arguments(scored: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no cMIL report"):
        report.write_report(scored, MODEL, foreign)
    assert [p.name for p in foreign.iterdir()] == ["chapter1.tex"]
    with pytest.raises(InputError, match="no model 'nope'"):
        report.write_report(scored, "nope", tmp_path / "a")
    with pytest.raises(InputError, match="endpoint 'pfs'"):
        report.write_report(scored, MODEL, tmp_path / "b", endpoint="pfs")
    with pytest.raises(InputError, match="cutoff 'best'"):
        report.write_report(scored, MODEL, tmp_path / "c", cutoff="best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


@pytest.mark.slow
def test_a_crash_leaves_no_half_report_and_a_rewrite_replaces_the_old(
    scored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report"
    first = report.write_report(scored, MODEL, out)
    before = json.loads((out / "report.json").read_text())
    (out / "figures" / "stale.png").write_bytes(b"old")
    calls = {"n": 0}
    real = figures.to_bytes

    def failing(fig, fmt):  # dies after the first figure is written
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("disk full")
        return real(fig, fmt)

    monkeypatch.setattr(figures, "to_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(scored, MODEL, out, endpoint="efs")
    assert json.loads((out / "report.json").read_text()) == before  # the old report, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    monkeypatch.setattr(figures, "to_bytes", real)
    again = report.write_report(scored, MODEL, out, endpoint="efs", cutoff="median")
    assert again == first
    meta = json.loads((out / "report.json").read_text())
    assert meta["endpoint"] == {"key": "efs", "name": "event-free survival"}
    assert meta["cutoff"]["method"] == "median" and not math.isnan(meta["cutoff"]["value"])
    assert not (out / "figures" / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.slow
def test_training_rows_are_out_of_fold_unless_in_sample_is_asked(tmp_path: Path) -> None:
    from cmil_core.analysis.roc import roc_auc

    db = tmp_path / "cmil.duckdb"
    build_scored_store(db, evil=False)
    rng = np.random.default_rng(5)
    with store_mod.open_store(db) as st:
        training = store_mod.patient_scores_frame(st, MODEL, "training")
        oof = pd.DataFrame({"patient_id": training["patient_id"], "fold": np.arange(60) % 5,
                            "score": rng.random(60)})
        store_mod.write_oof_scores(st, MODEL, "training", oof)
    y = training["bm_metastasis"].astype(int).to_numpy()
    honest = report.write_report(db, MODEL, tmp_path / "oof").parent
    table = _read(honest / "tables" / "discrimination.csv")
    first = table.iloc[0]
    assert (first["cohort"], first["scores"], first["label"]) == (
        "training", "out-of-fold", "training (out-of-fold)")
    assert first["auc"] == pytest.approx(roc_auc(y, oof["score"].to_numpy()))
    assert table.iloc[1]["scores"] == "final model"
    html = (honest / "report.html").read_text()
    assert "training (out-of-fold)" in html and "Patient flow (STARD)" in html
    flow = _read(honest / "tables" / "patient_flow.csv")
    assert flow["imported"].tolist() == [60, 40, 40]
    # This store has scores but no slides: each step counts within the one before.
    assert flow["with_slides"].tolist() == [0, 0, 0] and flow["scored"].tolist() == [0, 0, 0]
    meta = json.loads((honest / "report.json").read_text())
    assert meta["training_scores"] == "out-of-fold" and "--in-sample" not in meta["command"]

    optimistic = report.write_report(db, MODEL, tmp_path / "ins", in_sample=True).parent
    first = _read(optimistic / "tables" / "discrimination.csv").iloc[0]
    assert first["label"] == "training (in-sample)"
    assert first["auc"] == pytest.approx(roc_auc(y, training["score"].to_numpy()))
    assert "--in-sample" in json.loads((optimistic / "report.json").read_text())["command"]


def test_report_carries_ph_tests_td_auc_and_calibration_fit(scored: Path, written) -> None:
    # issue 14, item 7: beside the hazard ratios, the survival curves and the calibration plot
    out = written[0].parent
    meta = json.loads((out / "report.json").read_text())
    with store_mod.open_store(scored, read_only=True) as st:
        calibration = evaluation.calibration(read_model_scores(st, MODEL))
        surv = evaluation.risk_survival(read_model_scores(st, MODEL), "os", "model")
        cox = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model")
    table = _read(out / "tables" / "calibration.csv")
    assert table["cohort"].tolist() == [e["cohort"] for e in calibration]
    np.testing.assert_allclose(table["slope"], [e["fit"]["slope"] for e in calibration],
                               rtol=1e-12)
    assert [j["intercept_ci"] for j in meta["calibration"]] == [
        pytest.approx(e["fit"]["intercept_ci"], rel=1e-12) for e in calibration]
    td = _read(out / "tables" / "time_dependent_auc.csv")
    first = next(e for e in surv if e.get("td_auc"))
    rows = td[td["cohort"] == first["cohort"]]
    assert rows["time"].tolist() == [12.0, 24.0, 36.0]
    assert rows["auc"].tolist() == pytest.approx(first["td_auc"]["auc"], rel=1e-12)
    assert meta["survival"][0]["td_auc"]["auc"] == pytest.approx(surv[0]["td_auc"]["auc"])
    c = _read(out / "tables" / "cox_coefficients.csv")
    np.testing.assert_allclose(c["ph_p"], [r["ph_p"] for r in cox["coefficients"]], rtol=1e-12)
    s = _read(out / "tables" / "survival_summary.csv")
    global_p = surv[0]["result"]["cox"]["ph_test"]["tests"][-1]["p"]
    assert s[s["cohort"] == "training"]["hr_ph_p"].tolist() == pytest.approx([global_p] * 2)
    html_text = written[0].read_text()
    assert "Proportional hazards p (cox.zph)" in html_text
    assert "0.025 (not proportional)" in html_text  # age > 18 months in this store
    assert "Calibration slope (95% CI)" in html_text
    assert "Time-dependent AUC of the cMIL score" in html_text
