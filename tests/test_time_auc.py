"""Time-dependent (cumulative/dynamic, IPCW) AUC of a score for survival.

Checked against scikit-survival 0.28's ``cumulative_dynamic_auc(y, y,
estimate, times)`` (the censoring distribution from the same patients) to
1e-10, on veteran and on 150 random tables with tied times and scores, and
against the formula written out in R (tests/r/reference_stats.R, stored in
tests/data/reference/r_stats.json), e.g. veteran, risk = 100 - karno, times
30, 90, 180, 365 days: AUC 0.843, 0.827, 0.712, 0.712, mean 0.785. Live R
checks on six more data sets: tests/test_r_live.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmil_core.analysis.time_auc import cumulative_dynamic_auc, format_td_auc, td_auc
from cmil_core.cli import main
from cmil_core.errors import InputError

DATA = Path(__file__).parent / "data"
R = json.loads((DATA / "reference" / "r_stats.json").read_text())


def _sksurv(t: np.ndarray, e: np.ndarray, s: np.ndarray, times: np.ndarray):  # type: ignore[no-untyped-def]
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    from sksurv.util import Surv

    y = Surv.from_arrays(e.astype(bool), t.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sksurv_metrics.cumulative_dynamic_auc(y, y, s, times)


def test_veteran_equals_scikit_survival_and_r() -> None:
    v = pd.read_csv(DATA / "veteran.csv")
    risk = 100.0 - v["karno"].to_numpy(float)
    times = [30.0, 90.0, 180.0, 365.0]
    aucs, mean = cumulative_dynamic_auc(v["time"], v["status"], risk, times)
    ref_aucs, ref_mean = _sksurv(v["time"].to_numpy(), v["status"].to_numpy(), risk,
                                 np.array(times))
    np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-10)
    assert mean == pytest.approx(ref_mean, abs=1e-10)
    r = R["td_auc_veteran"]
    np.testing.assert_allclose(aucs, r["auc"], rtol=0, atol=1e-10)
    assert mean == pytest.approx(r["mean_auc"], abs=1e-10)
    assert [f"{a:.3f}" for a in aucs] == ["0.843", "0.827", "0.712", "0.712"]
    assert f"{mean:.3f}" == "0.785"


def test_tied_integer_risk_equals_r() -> None:
    # cox_strata.csv, risk = cmil_high + stage4 (0, 1, 2: heavy ties), times 6, 12, 24
    s = pd.read_csv(DATA / "cox_strata.csv")
    result = td_auc(s["time"], s["status"], s["cmil_high"] + s["stage4"], [6, 12, 24])
    r = R["td_auc_strata"]
    np.testing.assert_allclose(result["auc"], r["auc"], rtol=0, atol=1e-10)
    assert result["mean_auc"] == pytest.approx(r["mean_auc"], abs=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_random_tables_with_ties_equal_scikit_survival(seed: int) -> None:
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(50):
        n = int(rng.integers(8, 150))
        t = np.round(rng.exponential(10.0, n), int(rng.integers(0, 2)))  # tied times
        e = rng.random(n) < rng.uniform(0.3, 1.0)
        s = np.round(rng.normal(size=n) + 0.8 * (t < 6), int(rng.integers(0, 2)))  # tied scores
        times = np.unique(np.quantile(t, rng.uniform(0.1, 0.8, int(rng.integers(1, 5)))))
        times = times[(times >= t.min()) & (times < t.max())]
        if times.size == 0 or not ((t <= times.min()) & e).any() or (t > times.max()).sum() == 0:
            continue
        try:
            ref, ref_mean = _sksurv(t, e, s, times)
        except ValueError:  # scikit-survival refuses (G = 0 at an event time); so do we
            with pytest.raises(InputError):
                cumulative_dynamic_auc(t, e, s, times)
            continue
        ours, mean = cumulative_dynamic_auc(t, e, s, times)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)
        assert mean == pytest.approx(ref_mean, abs=1e-10, nan_ok=True)
        checked += 1
    assert checked >= 30


def test_a_perfect_score_has_auc_one_and_a_reversed_score_zero() -> None:
    t = np.arange(1.0, 21.0)
    e = np.ones(20)
    aucs, mean = cumulative_dynamic_auc(t, e, -t, [5, 10, 15])
    assert aucs.tolist() == [1.0, 1.0, 1.0] and mean == 1.0
    assert cumulative_dynamic_auc(t, e, t, [10])[0].tolist() == [0.0]


def test_times_without_cases_or_outside_follow_up_are_said_so() -> None:
    t = np.array([5.0, 6, 7, 8, 9, 10])
    e = np.array([0, 1, 1, 0, 1, 0])
    result = td_auc(t, e, [0.1, 0.9, 0.8, 0.2, 0.7, 0.3], [4, 5.5, 8, 10, 12])
    assert result["times"] == [4.0, 5.5, 8.0, 10.0, 12.0]
    assert result["auc"][0] is None and result["auc"][1] is None and result["auc"][3] is None
    assert result["auc"][2] == 1.0 and result["cases"][2] == 2 and result["controls"][2] == 2
    assert result["notes"] == [
        "t = 4: before the earliest follow-up time, no AUC",
        "t = 5.5: no cases, no AUC",
        "t = 10: at or after the last follow-up time, no AUC",
        "t = 12: at or after the last follow-up time, no AUC"]
    with pytest.raises(InputError, match="within the follow-up"):
        cumulative_dynamic_auc(t, e, t, [10])
    assert "t = 8: 1.000 (2 cases / 2 controls)" in format_td_auc(result, "cMIL")


def test_survival_command_reports_td_auc(capsys) -> None:
    args = ["survival", "--csv", str(DATA / "veteran.csv"), "--time", "time", "--event",
            "status", "--score", "karno", "--cutoff", "median", "--td-auc-times", "90,30"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["td_auc"]
    assert result["score"] == "karno" and result["times"] == [30.0, 90.0]
    # karno is higher for fitter patients: as a risk score its AUC is 1 - that of 100 - karno
    assert result["auc"] == pytest.approx([1 - a for a in R["td_auc_veteran"]["auc"][:2]],
                                          abs=1e-10)
    assert set(result) >= {"times", "auc", "cases", "controls", "mean_auc", "method", "notes"}
    assert main(args) == 0
    assert ("Time-dependent AUC of karno (cumulative/dynamic, IPCW): t = 30: 0.157 "
            "(41 cases / 95 controls)") in capsys.readouterr().out
    assert main(["survival", "--csv", str(DATA / "veteran.csv"), "--time", "time", "--event",
                 "status", "--group", "trt", "--td-auc-times", "30"]) != 0
    assert "--td-auc-times needs --score" in capsys.readouterr().err
