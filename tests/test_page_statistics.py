"""The Survival and Discrimination pages show the PH check, the time-dependent AUC and the
calibration intercept and slope, with the numbers of cmil_core.outputs.evaluation (issue 14, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.outputs import evaluation
from cmil_core.store.model_rules import read_model_scores
from conftest import ROOT, run_app as _run
from test_report import MODEL, build_scored_store

APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("page_statistics") / "cmil.duckdb"
    build_scored_store(db, evil=False)
    return db


def _page(db: Path, monkeypatch: pytest.MonkeyPatch, page: str) -> AppTest:
    monkeypatch.setenv("CMIL_DB", str(db))
    at = _run(AppTest.from_file(APP, default_timeout=90))
    at.switch_page(page)
    return _run(at)


def _p(p: float) -> str:
    return display.p_cell(p)  # the pages' one p format


@pytest.mark.slow
def test_survival_page_shows_ph_tests_and_td_auc(store_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(store_path, monkeypatch, "pages/survival.py")
    with store_mod.open_store(store_path, read_only=True) as st:
        entries = evaluation.risk_survival(read_model_scores(st, MODEL), "os")
        cox = evaluation.clinical_cox(read_model_scores(st, MODEL), store_mod.patients_frame(st), "os", "model", factors=None)
    tables = {tuple(df.value.columns): df.value for df in at.dataframe}
    hr = tables[("Cohort", "HR high vs low (95% CI)", "p", "Proportional hazards p (cox.zph)")]
    drawn = [e for e in entries if "note" not in e]
    assert hr["Cohort"].tolist() == [e["label"] for e in drawn]
    for row, e in zip(hr.itertuples(), drawn, strict=True):
        ph = e["result"]["cox"]["ph_test"]["tests"][-1]
        assert row[4].startswith(_p(ph["p"]))
        assert row[4].endswith("⚠ not proportional") == ph["violated"]
    auc = tables[("Cohort", "12 months", "24 months", "36 months", "Mean")]
    first = next(e for e in entries if e.get("td_auc"))
    a, cases, controls = (first["td_auc"][k][0] for k in ("auc", "cases", "controls"))
    assert auc["12 months"].iloc[0] == f"{a:.3f} ({cases} / {controls})"
    coefficients = tables[("Covariate", "HR (95% CI)", "p", "Proportional hazards p (cox.zph)")]
    assert coefficients["Covariate"].tolist() == [c["name"] for c in cox["coefficients"]]
    flagged = [c["name"] for c in cox["coefficients"] if c["ph_p"] < 0.05]
    assert flagged == ["age > 18 months"]
    row = coefficients[coefficients["Covariate"] == "age > 18 months"].iloc[0]
    assert row["Proportional hazards p (cox.zph)"] == "0.025 ⚠ not proportional"
    assert any("proportional hazards doubtful for covariate 'age > 18 months'" in w.value
               for w in at.warning)


@pytest.mark.slow
def test_discrimination_page_shows_calibration_intercept_and_slope(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _page(store_path, monkeypatch, "pages/discrimination.py")
    with store_mod.open_store(store_path, read_only=True) as st:
        entries = evaluation.calibration(read_model_scores(st, MODEL))
    table = next(df.value for df in at.dataframe
                 if "Slope (95% CI)" in df.value.columns)
    assert table["Cohort"].tolist() == [e["label"] for e in entries]
    fit = entries[0]["fit"]
    assert table["Slope (95% CI)"].iloc[0] == (
        f"{fit['slope']:.2f} ({fit['slope_ci'][0]:.2f} to {fit['slope_ci'][1]:.2f})")
    assert table["Intercept (95% CI)"].iloc[0].startswith(f"{fit['intercept']:.2f} (")
    assert any("Calibration intercept (ideal 0" in c.value for c in at.caption)
