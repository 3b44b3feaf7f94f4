"""The proportional-hazards check of every Cox model: R's cox.zph score test.

Reference values: tests/data/reference/r_stats.json, written by
``Rscript tests/r/reference_stats.R`` (R 4.2.2, survival 3.5.3), e.g.::

    fit <- coxph(Surv(time, status) ~ karno + age + diagtime + trt + celltype,
                 data = veteran, ties = "efron")
    cox.zph(fit)            # transform = "km"
    #          chisq df       p
    # karno   12.976  1 0.00032
    # ...
    # GLOBAL  29.808  7 0.00010

Live checks against R on six more data sets are in tests/test_r_live.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cmil_core.analysis.cox import cox_analysis, format_cox
from cmil_core.analysis.proportional_hazards import format_zph, zph_test
from cmil_core.analysis.survival import format_survival, survival_analysis
from cmil_core.cli import main
from cmil_core.errors import InputError

DATA = Path(__file__).parent / "data"
R = json.loads((DATA / "reference" / "r_stats.json").read_text())
VETERAN = ["karno", "age", "diagtime", "trt", "celltype"]


def _as_r(tests: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {"term": [t["term"] for t in tests], "chisq": [t["chisq"] for t in tests],
            "df": [t["df"] for t in tests], "p": [t["p"] for t in tests]}


def _check(ours: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    got = _as_r(ours)
    assert got["term"] == ref["term"] and got["df"] == ref["df"]
    assert got["chisq"] == pytest.approx(ref["chisq"], rel=1e-6, abs=1e-9)
    assert got["p"] == pytest.approx(ref["p"], rel=1e-6, abs=1e-9)


def test_cox_model_carries_cox_zph_of_veteran() -> None:
    # cox.zph(coxph(Surv(time, status) ~ karno + age + diagtime + trt + celltype)): km
    result = cox_analysis(pd.read_csv(DATA / "veteran.csv"), "time", "status", VETERAN)
    ph = result["ph_test"]
    assert ph["transform"] == "km"
    _check(ph["tests"], R["zph_veteran"]["km"])
    # to R's printed digits: karno 12.976, p 0.00032; celltype df 3; GLOBAL 29.81, p 1.0e-4
    rows = {t["term"]: t for t in ph["tests"]}
    assert f"{rows['karno']['chisq']:.3f}" == "12.976" and f"{rows['karno']['p']:.2g}" == "0.00032"
    assert rows["celltype"]["df"] == 3 and f"{rows['GLOBAL']['p']:.2g}" == "0.0001"
    assert [t["violated"] for t in ph["tests"]] == [True, False, False, False, True, True]
    # each coefficient row carries its term's p (the three celltype dummies share one)
    by_name = {c["name"]: c["ph_p"] for c in result["coefficients"]}
    assert by_name["karno"] == rows["karno"]["p"]
    assert {by_name[f"celltype={lv}"] for lv in ("large", "smallcell", "squamous")} == {
        rows["celltype"]["p"]}
    # a warning per violated term, and one for the whole model
    ph_notes = [w for w in result["warnings"] if w.startswith("proportional hazards doubtful")]
    assert len(ph_notes) == 3 and "'karno'" in ph_notes[0] and "p < 0.001" in ph_notes[0]
    assert "the model as a whole" in ph_notes[2]


@pytest.mark.parametrize("transform", ["rank", "identity"])
def test_other_time_transforms_equal_r(transform: str) -> None:
    # cox.zph(fit, transform = "rank" | "identity")
    frame = pd.read_csv(DATA / "veteran.csv")
    fit = cox_analysis(frame, "time", "status", VETERAN)
    design = pd.get_dummies(frame[VETERAN], columns=["celltype"], drop_first=True, dtype=float)
    design.columns = [c.replace("celltype_", "celltype=") for c in design.columns]
    beta = [next(c["coef"] for c in fit["coefficients"] if c["name"] == n) for n in design]
    terms = {"karno": [0], "age": [1], "diagtime": [2], "trt": [3], "celltype": [4, 5, 6]}
    ours = zph_test(frame["time"], frame["status"], design.to_numpy(), beta, terms,
                    transform=transform)
    _check(ours["tests"], R["zph_veteran"][transform])


def test_stratified_cox_model_equals_cox_zph_with_strata() -> None:
    # cox.zph(coxph(Surv(time, status) ~ cmil_high + ... + strata(centre)))
    result = cox_analysis(pd.read_csv(DATA / "cox_strata.csv"), "time", "status",
                          ["cmil_high", "age_over_18", "stage4", "mycn_amp"], strata="centre")
    _check(result["ph_test"]["tests"], R["zph_strata"]["km"])
    # age_over_18: p = 0.038 < 0.05, flagged; GLOBAL p = 0.33 not
    rows = {t["term"]: t for t in result["ph_test"]["tests"]}
    assert f"{rows['age_over_18']['p']:.3f}" == "0.038" and rows["age_over_18"]["violated"]
    assert not rows["GLOBAL"]["violated"]


def test_two_group_hazard_ratio_of_a_cutoff_carries_its_check(capsys) -> None:
    # survival --score karno --cutoff median: HR high vs low, cox.zph of I(karno >= 60)
    assert main(["survival", "--csv", str(DATA / "veteran.csv"), "--time", "time", "--event",
                 "status", "--score", "karno", "--cutoff", "median", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ref = R["zph_karno_median"]["km"]
    ph = result["cox"]["ph_test"]["tests"]
    assert [t["chisq"] for t in ph] == pytest.approx(ref["chisq"], rel=1e-6)
    assert [t["p"] for t in ph] == pytest.approx(ref["p"], rel=1e-6)
    assert any("proportional hazards doubtful for the HR high vs low" in w
               for w in result["warnings"])
    text = format_survival(survival_analysis(pd.read_csv(DATA / "veteran.csv"), "time",
                                             "status", score="karno", cutoff="median"))
    assert "proportional hazards (Schoenfeld, cox.zph km): p < 0.001 - violated" in text


def test_cox_command_prints_a_ph_column_and_the_global_test(capsys) -> None:
    assert main(["cox", "--csv", str(DATA / "veteran.csv"), "--time", "time", "--event",
                 "status", "--covariates", ",".join(VETERAN)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("covariate"))
    assert header.split() == ["covariate", "coef", "HR", "[95%", "CI]", "p", "PH", "p"]
    assert "GLOBAL chi2 = 29.81 (df 7), p < 0.001 (violated)" in text
    assert "age chi2 = 1.88 (df 1), p = 0.171" in text
    assert main(["cox", "--csv", str(DATA / "veteran.csv"), "--time", "time", "--event",
                 "status", "--covariates", "karno", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["ph_test"]) == {"transform", "alpha", "tests"}
    assert set(result["ph_test"]["tests"][0]) == {"term", "chisq", "df", "p", "violated"}
    assert result["coefficients"][0]["ph_p"] == result["ph_test"]["tests"][0]["p"]


def test_a_proportional_model_passes() -> None:
    # exponential times with a constant HR of 2: proportional by construction
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, 400).astype(float)
    time = rng.exponential(1.0 / np.exp(np.log(2.0) * x))
    frame = pd.DataFrame({"t": time, "e": 1, "x": x})
    result = cox_analysis(frame, "t", "e", ["x"])
    assert not any(t["violated"] for t in result["ph_test"]["tests"])
    assert not [w for w in result["warnings"] if "proportional" in w]
    assert "x chi2 =" in format_cox(result)


def test_crossing_hazards_are_flagged() -> None:
    # group 1 dies early or very late, group 0 in between: the HR changes with time
    rng = np.random.default_rng(4)
    x = np.repeat([0.0, 1.0], 150)
    early = rng.random(300) < 0.5
    time = np.where(x == 1, np.where(early, rng.uniform(0, 1, 300), rng.uniform(4, 6, 300)),
                    rng.uniform(1.5, 3.5, 300))
    result = cox_analysis(pd.DataFrame({"t": time, "e": 1, "x": x}), "t", "e", ["x"])
    assert result["ph_test"]["tests"][0]["p"] < 1e-6
    assert result["ph_test"]["tests"][0]["violated"]


def test_ph_test_refuses_what_it_cannot_test() -> None:
    with pytest.raises(InputError, match="at least one event"):
        zph_test([1.0, 2.0], [0, 0], [[0.0], [1.0]], [0.1], {"x": [0]})
    with pytest.raises(InputError, match="transform"):
        zph_test([1.0, 2.0], [1, 1], [[0.0], [1.0]], [0.1], {"x": [0]}, transform="loglog")
    with pytest.raises(InputError, match="above 0"):
        zph_test([0.0, 2.0], [1, 1], [[0.0], [1.0]], [0.1], {"x": [0]}, transform="log")
    assert format_zph(None) == ""
