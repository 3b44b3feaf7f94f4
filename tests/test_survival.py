"""Tests of the survival statistics (cmil_core.analysis.survival, survival_data, cox, maxstat,
risk_groups): R reference values, brute force, properties, failures.

Reference values come from tests/data/reference/REFERENCE.md (R survival, via
lifelines' own tests and docs); each test pastes the R call. Tolerance: the
digits shown, or 1e-6 where more digits are given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_g3, load_rossi
from scipy import stats as sps

from cmil_core.analysis import cutoffs, maxstat, risk_groups, survival, survival_data
from cmil_core.analysis.cox import cox_analysis, format_cox
from cmil_core.errors import InputError
from conftest import is_plain_json

ROSSI_COVARIATES = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


@pytest.fixture(scope="module")
def g3() -> pd.DataFrame:
    return load_g3()


@pytest.fixture(scope="module")
def rossi() -> pd.DataFrame:
    return load_rossi()


# ----------------------------------------------------------------------------
# R reference values (REFERENCE.md)
# ----------------------------------------------------------------------------


def test_g3_logrank_matches_survdiff(g3):
    # R: survdiff(Surv(time, event) ~ group, data = g3)  -> chi2 = 6.0629, p = 0.0138
    #    (lifelines tests/test_statistics.py)
    result = survival.survival_analysis(g3, "time", "event", group="group")
    assert result["logrank"]["statistic"] == pytest.approx(6.0629, abs=5e-5)
    assert result["logrank"]["p"] == pytest.approx(0.0138, abs=5e-5)
    assert result["logrank"]["df"] == 1
    assert survival.logrank(g3, "time", "event", "group") == result["logrank"]


@pytest.mark.parametrize(("t", "s"), [(25, 0.909), (53, 0.779)])
def test_g3_kaplan_meier_rit(g3, t, s):
    # R: summary(survfit(Surv(time, event) ~ 1, data = subset(g3, group == "RIT")),
    #    times = c(25, 53))$surv -> 0.909, 0.779   (lifelines tests, from R)
    fit = survival.kaplan_meier(g3, "time", "event", "group")["RIT"]
    assert float(fit.survival_function_at_times(t).iloc[0]) == pytest.approx(s, abs=5e-4)


@pytest.mark.parametrize(
    ("t", "s", "low", "high"),
    [
        (9, 0.833, 0.2731, 0.975),
        (19, 0.667, 0.1946, 0.904),
        (32, 0.5, 0.1109, 0.804),
        (34, 0.333, 0.0461, 0.676),
    ],
)
def test_g3_kaplan_meier_other_with_log_log_ci(g3, t, s, low, high):
    # R: survfit(Surv(time, event) ~ 1, data = subset(g3, group != "RIT"),
    #    conf.type = "log-log") at t = 9, 19, 32, 34:
    #    surv 0.833 0.667 0.5 0.333; lower 0.2731 0.1946 0.1109 0.0461;
    #    upper 0.975 0.904 0.804 0.676   (lifelines tests)
    table = survival.kaplan_meier_table(g3, "time", "event", "group")
    row = table[(table["group"] == "Control") & (table["time"] == t)].iloc[0]
    assert row["survival"] == pytest.approx(s, abs=5e-4)
    assert row["ci_low"] == pytest.approx(low, abs=5e-5)
    assert row["ci_high"] == pytest.approx(high, abs=5e-4)


ROSSI_COEFS = [-0.3794222, -0.0574377, 0.3138998, -0.1497957, -0.4337039, -0.0848711, 0.0914971]


def test_rossi_cox_matches_coxph(rossi):
    # R: coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio,
    #          data = rossi, ties = "efron")
    #    coef = -0.3794222 -0.0574377 0.3138998 -0.1497957 -0.4337039 -0.0848711 0.0914971
    #    (lifelines test_estimation.py); n = 432, events = 114, concordance 0.64 (lifelines docs)
    result = cox_analysis(rossi, "week", "arrest", ROSSI_COVARIATES)
    names = [c["name"] for c in result["coefficients"]]
    coefs = [c["coef"] for c in result["coefficients"]]
    assert names == ROSSI_COVARIATES
    assert coefs == pytest.approx(ROSSI_COEFS, abs=1e-6)
    assert (result["n"], result["events"], round(result["concordance"], 2)) == (432, 114, 0.64)
    for c in result["coefficients"]:
        assert c["hr"] == pytest.approx(math.exp(c["coef"]))
        assert c["ci"][0] < c["hr"] < c["ci"][1]
    assert is_plain_json(result) and result["references"] == {}
    # R: cox.zph(fit) (survival 3.5.3, transform "km"), as R prints it:
    #          chisq df     p
    #   age     5.9740  1 0.015
    #   wexp    4.2246  1 0.040
    #   GLOBAL 17.6944  7 0.013    (fin 0.803, race 0.150, mar 0.315, paro 0.892, prio 0.471)
    tests = {t["term"]: t for t in result["ph_test"]["tests"]}
    assert [f"{tests[k]['chisq']:.4f}" for k in ("age", "wexp", "GLOBAL")] == [
        "5.9740", "4.2246", "17.6944"]
    assert [f"{tests[k]['p']:.3f}" for k in [*ROSSI_COVARIATES, "GLOBAL"]] == [
        "0.803", "0.015", "0.150", "0.040", "0.315", "0.892", "0.471", "0.013"]
    assert [w.split(" (")[0] for w in result["warnings"]] == [
        "proportional hazards doubtful for covariate 'age'",
        "proportional hazards doubtful for covariate 'wexp'",
        "proportional hazards doubtful for the model as a whole"]


# ----------------------------------------------------------------------------
# Kaplan-Meier, medians, at-risk counts
# ----------------------------------------------------------------------------


def test_median_and_its_interval(g3):
    # median: first time with S(t) <= 0.5; its CI: where the log-log band crosses 0.5
    result = survival.survival_analysis(g3, "time", "event", group="group")
    control, rit = result["groups"]
    assert (control["group"], control["n"], control["events"]) == ("Control", 6, 4)
    assert control["median"] == 32.0 or control["median"] == 34.0
    table = survival.kaplan_meier_table(g3, "time", "event", "group")
    ctl = table[table["group"] == "Control"]
    assert control["median"] == ctl.loc[ctl["survival"] <= 0.5, "time"].min()
    assert control["median_ci"][0] == ctl.loc[ctl["ci_low"] <= 0.5, "time"].min()
    assert control["median_ci"][1] is None  # upper band never reaches 0.5
    assert rit["median"] is None  # "not reached"


def test_at_risk_counts_are_patients_still_followed(g3):
    times = [0, 10, 25, 53, 100]
    table = survival.number_at_risk(g3, "time", "event", "group", times)
    for name in ["Control", "RIT"]:
        followed = g3.loc[g3["group"] == name, "time"]
        assert table.loc[name].tolist() == [int((followed >= t).sum()) for t in times]
    result = survival.survival_analysis(g3, "time", "event", group="group", at_risk_times=times)
    assert result["at_risk"]["times"] == [float(t) for t in times]
    assert result["at_risk"]["groups"][1]["at_risk"] == table.loc["RIT"].tolist()


def test_default_at_risk_times_are_round_steps(rossi):
    result = survival.survival_analysis(rossi, "week", "arrest", score="prio", cutoff=3)
    assert result["at_risk"]["times"] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


# ----------------------------------------------------------------------------
# Vectorised split log-rank and maxstat
# ----------------------------------------------------------------------------


VETERAN = Path(__file__).parent / "data" / "veteran.csv"
# R 4.2.2, survival 3.5.3, maxstat 0.7.25 (tests/data/veteran.csv is survival::veteran):
#   m <- maxstat.test(Surv(time, status) ~ karno, data = veteran, smethod = "LogRank",
#                     pmethod = "Lau92", minprop = 0.1, maxprop = 0.9)
#   m$statistic 4.61806159115936; m$estimate 40; m$p.value 0.0001885616602637 (issue 19: 4.62, 1.9e-4)
#   m$cuts  30 40 50 60 70 75
#   m$stats 3.82786925779404 4.61806159115936 4.41712623295870 4.45736585888086
#           3.22009591457919 3.38459330077064
#   pmethod = "Lau94": 1.9162706028506e-05
#   pmethod = "exactGauss", algorithm = Miwa(steps = 4096) (exact up to quadrature, passed on to
#   mvtnorm::pmvnorm): 2.0383344799146e-05
R_VETERAN_STATS = [3.82786925779404, 4.61806159115936, 4.41712623295870, 4.45736585888086,
                   3.22009591457919, 3.38459330077064]


def test_maxstat_on_veteran_is_r_maxstat_test():
    frame = pd.read_csv(VETERAN)
    assert len(frame) == 137 and frame["status"].sum() == 128
    cut = risk_groups.risk_cutoff(frame, "karno", "maxstat", time="time", event="status")
    assert cut.statistic == pytest.approx(4.61806159115936, abs=1e-9)
    assert cut.p == pytest.approx(0.0001885616602637, rel=1e-9)
    assert cut.cutpoint == 40 and cut.value == 45.0  # R: karno <= 40 is low; we: >= 45 is high
    assert (cut.n_low, cut.n_high, cut.p_method) == (38, 99, "Lau92")
    test = maxstat.maxstat_test(frame["time"], frame["status"], frame["karno"])
    assert test.cuts.tolist() == [30, 40, 50, 60, 70, 75]
    assert test.stats == pytest.approx(R_VETERAN_STATS, abs=1e-9)
    lau94 = maxstat.maxstat_test(frame["time"], frame["status"], frame["karno"], p_method="Lau94")
    assert lau94.p == pytest.approx(1.9162706028506e-05, rel=1e-9)
    exact = maxstat.maxstat_test(frame["time"], frame["status"], frame["karno"],
                                  p_method="exactGauss")
    assert exact.p == pytest.approx(2.0383344799146e-05, abs=1e-9)


def test_maxstat_cli_json_and_text_name_the_statistic_and_the_split(capsys):
    from cmil_core.cli import main

    args = ["survival", "--csv", str(VETERAN), "--time", "time", "--event", "status",
            "--score", "karno", "--cutoff", "maxstat"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cut = out["cutoff"]
    assert {"method", "value"} <= set(cut) and cut["method"] == "maxstat"
    assert cut["statistic"] == pytest.approx(4.61806159115936, abs=1e-9)
    assert cut["p_corrected"] == pytest.approx(0.0001885616602637, rel=1e-9)
    assert (cut["cutpoint"], cut["n_low"], cut["n_high"]) == (40.0, 38, 99)
    assert cut["p_method"] == "Lau92" and "LogRank" in cut["r_call"]
    # the classic log-rank test of the chosen groups stays what it is, and says so
    assert "not corrected" in out["logrank"]["test"] and out["logrank"]["df"] == 1
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "M = 4.618" in text and "p = 0.00019 by Lau92" in text and "38 low / 99 high" in text
    assert "Log-rank of the chosen groups (not corrected for the cutoff search)" in text


def test_logrank_scores_are_exactranktests_cscores():
    # R exactRankTests::cscores(Surv(c(1, 2, 2, 3, 4), c(1, 1, 0, 1, 0)), type = "LogRank")
    #   0.800000000000000 0.466666666666667 -0.533333333333333 -0.033333333333333 -1.033333333333333
    # i.e. a = delta - cumsum(delta / (N - r + 1)) up to the largest rank r of each time.
    got = maxstat.logrank_scores([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    assert got == pytest.approx([0.8, 1 - (0.2 + 1 / 3), -(0.2 + 1 / 3), 1 - (0.2 + 1 / 3 + 0.5),
                                 -(0.2 + 1 / 3 + 0.5)], abs=1e-12)


def test_maxstat_is_the_largest_standardised_score_statistic(rossi):
    # Brute force over the cuts, straight from Hothorn and Lausen (2003), eq. (1)-(3).
    cut = risk_groups.risk_cutoff(rossi, "age", "maxstat", time="week", event="arrest")
    ages = rossi["age"].to_numpy(dtype=float)
    a = maxstat.logrank_scores(rossi["week"], rossi["arrest"])
    n, best = ages.size, (0.0, None)
    for c in np.unique(ages):
        low = ages <= c
        m = int(low.sum())
        if m < max(1, math.floor(n * 0.1)) or m > math.floor(n * 0.9):
            continue
        e = m / n * a.sum()
        v = m * (n - m) / (n**2 * (n - 1)) * (n * (a**2).sum() - a.sum() ** 2)
        z = abs((a[low].sum() - e) / math.sqrt(v))
        if z > best[0] + 1e-12:
            best = (z, c)
    assert cut.statistic == pytest.approx(best[0], abs=1e-12) and cut.cutpoint == best[1]
    assert cut.method == "maxstat" and cut.p_method == "Lau92" and cut.n == 432
    share = (ages >= cut.value).mean()
    assert 0.1 <= share <= 0.9
    # the search-corrected p is larger than the naive p of the best standardised statistic
    assert cut.p > 2 * sps.norm.sf(cut.statistic)


@pytest.mark.parametrize("b", [0.5, 1.5, 2.5, 3.0902, 4.0])
def test_lausen92_is_r_maxstat_formula(b):
    # R maxstat:::pLausen92(b, minprop = 0.1, maxprop = 0.9):
    #   if (b < 1) 1 else max(4*dnorm(b)/b + dnorm(b)*(b - 1/b)*log((0.9*0.9)/(0.1*0.1)), 0)
    db = sps.norm.pdf(b)
    r = 1.0 if b < 1 else max(4 * db / b + db * (b - 1 / b) * math.log(0.81 / 0.01), 0.0)
    assert maxstat._lausen92_p(b, 0.1) == pytest.approx(min(r, 1.0), abs=1e-12)


def test_maxstat_permutation_p_is_seeded(rossi):
    def run(seed: int) -> risk_groups.RiskCutoff:
        return risk_groups.risk_cutoff(
            rossi, "prio", "maxstat", time="week", event="arrest",
            p_method="permutation", n_perm=200, seed=seed,
        )  # fmt: skip

    first = run(0)
    assert first.p == run(0).p and 0 < first.p <= 1
    assert first.p_method == "condMC" and first.value == run(1).value


@pytest.mark.parametrize("bad", ["Lau93", "", "HL"])
def test_maxstat_p_method_names(bad):
    assert maxstat.maxstat_p_method("lausen92") == "Lau92"
    assert maxstat.maxstat_p_method("EXACTGAUSS") == "exactGauss"
    with pytest.raises(InputError, match="maxstat p method .* is not one of Lau92, Lau94"):
        maxstat.maxstat_p_method(bad)


def test_maxstat_correction_holds_its_size_on_noise():
    # Under no association, the naive p of the best split is < 0.05 about half
    # the time; the search-corrected (Lau92) p should be < 0.05 at most ~5%.
    rng = np.random.default_rng(0)
    corrected, naive = [], []
    for _ in range(200):
        frame = pd.DataFrame(
            {
                "t": rng.exponential(10, 200),
                "e": (rng.random(200) < 0.7).astype(int),
                "s": rng.random(200),
            }
        )
        cut = risk_groups.risk_cutoff(frame, "s", "maxstat", time="t", event="e")
        corrected.append(cut.p)
        naive.append(2 * sps.norm.sf(cut.statistic))
    assert np.mean(np.array(naive) < 0.05) > 0.3
    assert np.mean(np.array(corrected) < 0.05) <= 0.07


# ----------------------------------------------------------------------------
# Cutoff methods and risk groups
# ----------------------------------------------------------------------------


def test_cutoff_methods(rossi):
    median = risk_groups.risk_cutoff(rossi, "age", "median")
    assert median.value == float(np.median(rossi["age"])) and median.method == "median"
    assert risk_groups.risk_cutoff(rossi, "age", 30).to_dict()["method"] == "fixed"
    assert risk_groups.risk_cutoff(rossi, "age", " 30.5 ").value == 30.5
    youden = risk_groups.risk_cutoff(rossi, "prio", "youden", label="arrest")
    assert youden.value == cutoffs.youden_cutoff(rossi["arrest"].to_numpy(bool), rossi["prio"])
    assert risk_groups.risk_groups([1, 2, 3], 2).tolist() == ["low", "high", "high"]


def test_cutoff_from_training_frame_is_applied_unchanged(rossi):
    train, test = rossi.iloc[:200], rossi.iloc[200:]
    result = survival.survival_analysis(
        test, "week", "arrest", score="age", cutoff="median", train=train
    )
    assert result["cutoff"]["value"] == float(np.median(train["age"]))
    high = int((test["age"] >= np.median(train["age"])).sum())
    assert {g["group"]: g["n"] for g in result["groups"]} == {"high": high, "low": 232 - high}
    assert not any("same patients" in w for w in result["warnings"])


@pytest.mark.parametrize("cutoff", ["median", "youden", "maxstat"])
def test_cutoff_chosen_on_the_same_patients_is_flagged(rossi, cutoff):
    result = survival.survival_analysis(
        rossi, "week", "arrest", score="prio", cutoff=cutoff, label="arrest"
    )
    assert any("chosen on the same patients" in w for w in result["warnings"])
    assert result["cutoff"]["method"] == cutoff and result["cox"]["reference"] == "low"
    assert is_plain_json(result)


def test_two_group_cox_equals_indicator_model(g3):
    result = survival.survival_analysis(g3, "time", "event", group="group")
    design = pd.DataFrame(
        {"rit": (g3["group"] == "RIT").astype(float), "t": g3["time"], "e": g3["event"]}
    )
    fitter = CoxPHFitter().fit(design, "t", "e")
    assert result["cox"]["reference"] == "Control" and result["cox"]["group"] == "RIT"
    assert result["cox"]["hr"] == pytest.approx(float(np.exp(fitter.params_["rit"])))
    assert result["cox"]["p"] == pytest.approx(float(fitter.summary.loc["rit", "p"]))


def test_categorical_covariates_are_one_hot_against_first_level(g3):
    result = cox_analysis(g3, "time", "event", ["group", "age", "sex"])
    assert result["references"] == {"group": "Control", "sex": "Female"}
    assert [c["name"] for c in result["coefficients"]] == ["group=RIT", "age", "sex=Male"]
    design = pd.DataFrame(
        {
            "group=RIT": (g3["group"] == "RIT").astype(float),
            "age": g3["age"].astype(float),
            "sex=Male": (g3["sex"] == "Male").astype(float),
            "t": g3["time"],
            "e": g3["event"],
        }
    )
    # converged as tightly as R's coxph, as cox_analysis is (lifelines' default stops ~1e-5 early)
    tight = {"precision": 1e-12, "r_precision": 1e-16, "step_size": 0.95, "max_steps": 500}
    fitter = CoxPHFitter().fit(design, "t", "e", fit_options=tight)
    assert [c["coef"] for c in result["coefficients"]] == pytest.approx(fitter.params_.tolist())
    assert "reference of 'group': 'Control'" in format_cox(result)


def test_pairwise_logrank_with_holm(rossi):
    bands = pd.cut(rossi["age"], [0, 20, 25, 100], labels=["a", "b", "c"]).astype(str)
    frame = rossi.assign(band=bands)
    result = survival.survival_analysis(frame, "week", "arrest", group="band")
    assert result["cox"] is None and result["logrank"]["df"] == 2
    rows = result["pairwise"]
    assert [(r["group_a"], r["group_b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    ps = sorted(r["p"] for r in rows)
    holm = sorted(r["p_holm"] for r in rows)
    assert holm[0] == pytest.approx(min(1, 3 * ps[0]))
    assert all(h >= p for h, p in zip(holm, ps, strict=True))
    assert survival.pairwise_logrank(frame, "week", "arrest", "band") == rows


# ----------------------------------------------------------------------------
# Degenerate input and failures
# ----------------------------------------------------------------------------


def test_group_without_events_keeps_its_curve_and_has_no_hazard_ratio():
    frame = pd.DataFrame(
        {"t": [1, 2, 3, 4, 5, 6, 7, 8], "e": [1, 1, 1, 0, 0, 0, 0, 0], "g": list("aaaabbbb")}
    )
    result = survival.survival_analysis(frame, "t", "e", group="g")
    quiet = result["groups"][1]
    assert (quiet["group"], quiet["events"], quiet["median"]) == ("b", 0, None)
    assert result["cox"]["hr"] is None and result["cox"]["ci"] is None
    assert any("no events" in w for w in result["warnings"])
    assert "not estimable" in survival.format_survival(result)
    json.dumps(result, allow_nan=False)


def test_complete_separation_is_reported_as_warnings_not_errors():
    frame = pd.DataFrame({"t": np.arange(1.0, 9.0), "e": [1] * 8, "x": np.arange(8.0, 0.0, -1)})
    result = cox_analysis(frame, "t", "e", ["x"])
    assert any("Cox model" in w for w in result["warnings"])
    json.dumps(result, allow_nan=False)


def test_missing_rows_are_dropped_and_counted(g3):
    frame = g3.astype({"time": float}).copy()
    frame.loc[frame.index[:2], "time"] = np.nan
    frame.loc[frame.index[5], "group"] = None
    result = survival.survival_analysis(frame, "time", "event", group="group")
    assert result["n_dropped"] == 3 and sum(g["n"] for g in result["groups"]) == 14
    assert "3 rows with missing values dropped" in result["warnings"]


@pytest.mark.parametrize(
    "events",
    [[1, 0, 1, 0], [True, False, True, False], [1.0, 0.0, 1.0, 0.0], ["1", "0", "true", "False"]],
)
def test_event_forms_are_accepted(events):
    frame = pd.DataFrame({"t": [1.0, 2.0, 3.0, 4.0], "e": events})
    data, dropped = survival_data.check_survival_data(frame, "t", "e")
    assert data["__event__"].tolist() == [1, 0, 1, 0] and dropped == 0


def test_a_table_of_text_cells_is_read_like_numbers(g3):
    text = g3.astype(str)
    text.loc[text.index[0], "time"] = " "
    result = survival.survival_analysis(text, "time", "event", group="group")
    assert result["n_dropped"] == 1 and sum(g["n"] for g in result["groups"]) == 16


def test_tiny_groups_are_analysed():
    frame = pd.DataFrame({"t": [1.0, 2.0, 3.0], "e": [1, 1, 0], "g": ["a", "b", "b"]})
    result = survival.survival_analysis(frame, "t", "e", group="g")
    assert [g["n"] for g in result["groups"]] == [1, 2] and result["logrank"]["p"] is not None


TE = {"time": "time", "event": "event"}
SURVIVAL_FAILURES = [
    (dict(time="nope", event="event", group="group"), r"column 'nope' not found"),
    (dict(time="time", event="time", group="group"), "both the time and the event"),
    (
        {"time": "sex", "event": "event", "group": "group"},
        r"row 0, column 'sex': value 'Female' is not a number",
    ),
    (dict(time="time", event="age", group="group"), r"column 'age': events must be 0/1"),
    (dict(time="time", event="event"), "either a group column or a score column"),
    (dict(time="time", event="event", group="group", score="age", cutoff="median"), "not both"),
    (dict(time="time", event="event", score="age"), "a score needs a cutoff"),
    (dict(time="time", event="event", group="group", cutoff="median"), "not to a group column"),
    (dict(time="time", event="event", score="age", cutoff="best"), "cutoff 'best' is not a number"),
    (dict(time="time", event="event", score="age", cutoff="youden"), "needs a label column"),
    ({**TE, "score": "age", "cutoff": 1000}, r"needs two or more groups; found only 'low'"),
    ({**TE, "group": "histology"}, r"column 'histology': the log-rank test needs two or more"),
    (dict(time="time", event="event", score="age", cutoff="inf"), "not a finite number"),
]


@pytest.mark.parametrize(("kwargs", "message"), SURVIVAL_FAILURES)
def test_survival_analysis_failures(g3, kwargs, message):
    with pytest.raises(InputError, match=message):
        survival.survival_analysis(g3, **kwargs)


def test_negative_time_names_column_and_row():
    frame = pd.DataFrame({"t": [1.0, -2.0], "e": [1, 0], "g": ["a", "b"]})
    with pytest.raises(InputError, match=r"row 1, column 't': time -2 is negative"):
        survival.survival_analysis(frame, "t", "e", group="g")


def test_no_events_at_all_is_an_input_error():
    frame = pd.DataFrame({"t": [1.0, 2.0, 3.0, 4.0], "e": [0, 0, 0, 0], "g": list("abab")})
    with pytest.raises(InputError, match="no events"):
        survival.survival_analysis(frame, "t", "e", group="g")
    with pytest.raises(InputError, match="column 'e' has no events"):
        cox_analysis(frame.assign(x=[1.0, 2.0, 4.0, 3.0]), "t", "e", ["x"])


@pytest.mark.parametrize(
    ("covariates", "message"),
    [
        ([], "no covariates"),
        (["nope"], "column 'nope' not found"),
        (["histology"], r"covariate 'histology' has a single level 'Grade3'"),
        (["one"], r"covariate 'one' is constant"),
        (["event"], "already the time or the event column"),
    ],
)
def test_cox_failures(g3, covariates, message):
    with pytest.raises(InputError, match=message):
        cox_analysis(g3.assign(one=1.0), "time", "event", covariates)


def test_maxstat_without_room_for_ten_percent_groups():
    frame = pd.DataFrame({"t": [1.0, 2.0, 3.0, 4.0], "e": [1, 1, 0, 1], "s": [0.0, 0.0, 0.0, 1.0]})
    with pytest.raises(InputError, match=r"no cutoff leaves 30% of the 4 patients"):
        risk_groups.risk_cutoff(frame, "s", "maxstat", time="t", event="e", min_share=0.3)


def test_text_output(g3, rossi):
    text = survival.format_survival(survival.survival_analysis(g3, "time", "event", group="group"))
    assert "chi2 = 6.063, df = 1, p = 0.014" in text and "34.0 [9.0, NR]" in text
    maxstat = survival.survival_analysis(rossi, "week", "arrest", score="prio", cutoff="maxstat")
    text = survival.format_survival(maxstat)
    assert "maxstat cutoff" in text and "search-corrected" in text and "note:" in text
    cox = format_cox(cox_analysis(rossi, "week", "arrest", ROSSI_COVARIATES))
    assert "n = 432, events = 114, concordance = 0.640" in cox and "-0.3794" in cox


# R survival 3.5.3: Rscript tests/data/cox_strata.R (coxph(Surv(time, status) ~ cmil_high +
# age_over_18 + stage4 + mycn_amp + strata(centre), ties = "efron") on tests/data/cox_strata.csv).
R_COX_STRATA = {
    "cmil_high": (0.8816875100704, 0.291083125632, 1.365028172100, 4.27250348982, 0.00245373827853),
    "age_over_18": (0.1871001934906, 0.298980262280, 0.671064277728, 2.16645185538,
                    0.53144976231301),
    "stage4": (-0.0450982052136, 0.284005272843, 0.547858459267, 1.66786088967, 0.87383153146360),
    "mycn_amp": (-0.1345467305144, 0.293755192629, 0.491498530936, 1.55457604302,
                 0.64693568264747),
}
R_COX_STRATA_CONCORDANCE = 0.620854826824


def test_cox_stratified_by_centre_matches_r_survival() -> None:
    from pathlib import Path

    frame = pd.read_csv(Path(__file__).parent / "data" / "cox_strata.csv")
    result = cox_analysis(frame, "time", "status", list(R_COX_STRATA), strata="centre")
    assert result["n"] == 80 and result["events"] == 57
    assert result["strata"] == {"column": "centre", "levels": [
        {"level": "Centre A", "n": 40, "events": 28}, {"level": "Centre B", "n": 40, "events": 29}]}
    for row in result["coefficients"]:
        coef, se, low, high, p = R_COX_STRATA[row["name"]]
        assert row["coef"] == pytest.approx(coef, abs=1e-6)
        assert row["se"] == pytest.approx(se, rel=1e-6)
        assert row["hr"] == pytest.approx(math.exp(coef), rel=1e-6)
        assert row["ci"] == pytest.approx([low, high], rel=1e-6)
        assert row["p"] == pytest.approx(p, rel=1e-5)
    # Concordance within strata, as R's summary(coxph)$concordance.
    assert result["concordance"] == pytest.approx(R_COX_STRATA_CONCORDANCE, abs=1e-9)
    # Unstratified, the same data give other estimates: the strata are really used.
    plain = cox_analysis(frame, "time", "status", list(R_COX_STRATA))
    assert plain["coefficients"][0]["coef"] != pytest.approx(R_COX_STRATA["cmil_high"][0], abs=1e-3)
    with pytest.raises(InputError, match="both a covariate and the strata"):
        cox_analysis(frame, "time", "status", ["cmil_high", "centre"], strata="centre")
