"""Every number the CLI prints, checked live against R itself (issue 19).

For each data set, ONE ``Rscript tests/r/live_check.R`` call writes R's
numbers as JSON; the tests below compare them with ``python -m cmil_core
roc/survival/cox --json`` (through :func:`cmil_core.cli.main`) and with the
statistics functions behind it. The R calls are written out in
``tests/r/live_check.R``, beside each quantity; the ones used are:

- pROC 1.18: ``roc(y, s, levels = c(0, 1), direction = "<")``, ``auc``,
  ``ci.auc(r, method = "delong")`` (clipped to [0, 1] as docs/DESIGN.md says),
  ``coords(r, "best", best.method = "youden")``, ``roc.test(r1, r2, method =
  "delong", paired = TRUE)`` and ``paired = FALSE``; Wilson intervals written
  out in R (= ``prop.test(k, n, correct = FALSE)$conf.int``);
- survival 3.5: ``survdiff(Surv(time, status) ~ group)``, ``coxph(...,
  ties = "efron")`` (coefficients, SEs, p, concordance), ``summary(survfit(...,
  conf.type = "log-log"), times = ..., extend = TRUE)``;
- maxstat 0.7: ``maxstat.test(Surv(time, status) ~ x, smethod = "LogRank",
  pmethod = "Lau92" | "Lau94" | "exactGauss", minprop = 0.1, maxprop = 0.9)``;
- survival 3.5: ``cox.zph(coxph(...))`` (the proportional-hazards score test,
  transform "km"); stats: ``glm(y ~ lp, binomial)`` and ``glm(y ~ 1, offset =
  lp, binomial)`` with ``confint.default`` (calibration slope and intercept);
  the cumulative/dynamic IPCW time-dependent AUC written out in R (no R
  package of it is installed; it is scikit-survival's definition).

Data sets: pROC's aSAH (tests/data/asah.csv), survival's veteran
(tests/data/veteran.csv; see tests/data/SOURCES.md for sources and licences)
and four generated ones (seeded numpy, written to a temporary folder):
heavy ties, few events, three groups, heavy late censoring.

Tolerance 1e-6 unless a reason is written beside the check. Without
``Rscript`` or one of its packages these tests skip with one reason; with
``CMIL_REQUIRE_R=1`` (set by ./test.sh, i.e. in CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cmil_core.analysis import maxstat, roc
from cmil_core.cli import main

DATA = Path(__file__).parent / "data"
SCRIPT = Path(__file__).parent / "r" / "live_check.R"
R_PACKAGES = ("jsonlite", "survival", "maxstat", "pROC", "mvtnorm")
TOL = 1e-6


def _r_missing() -> str | None:
    """Why R cannot run here, or None."""
    if shutil.which("Rscript") is None:
        return "Rscript not found (apt-get install r-base-core)"
    probe = "; ".join(f"if (!requireNamespace('{p}', quietly = TRUE)) cat('{p} ')"
                      for p in R_PACKAGES)
    done = subprocess.run(["Rscript", "-e", probe], capture_output=True, text=True, timeout=120)
    missing = done.stdout.split()
    if done.returncode != 0 or missing:
        return (f"R packages missing: {' '.join(missing) or done.stderr.strip()[:200]} "
                "(apt-get install r-cran-survival r-cran-maxstat r-cran-proc r-cran-jsonlite)")
    return None


@pytest.fixture(scope="module")
def r_ready() -> None:
    reason = _r_missing()
    if reason is None:
        return
    if os.environ.get("CMIL_REQUIRE_R") == "1":
        pytest.fail(f"CMIL_REQUIRE_R=1 but {reason}")
    pytest.skip(f"live R checks skipped: {reason}")


# ----------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------


def _asah(folder: Path) -> tuple[Path, dict[str, Any]]:
    frame = pd.read_csv(DATA / "asah.csv")
    frame["poor"] = (frame["outcome"] == "Poor").astype(int)
    frame["prob"] = 1.0 / (1.0 + np.exp(-0.6 * (frame["wfns"] - 3.0)))
    path = folder / "asah.csv"
    frame.to_csv(path, index=False)
    return path, {"label": "poor", "scores": ["s100b", "ndka", "wfns"],
                  "unpaired": {"score": "s100b", "split": "gender"}, "prob": "prob"}


def _veteran(folder: Path) -> tuple[Path, dict[str, Any]]:
    return DATA / "veteran.csv", {
        "time": "time", "event": "status", "group": "celltype", "score": "karno",
        "covariates": ["karno", "age", "diagtime", "trt"], "times": [30, 90, 180, 365],
        "td_auc_times": [30, 90, 180, 365]}


def _generated(kind: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    rng = np.random.default_rng({"ties": 1, "few_events": 2, "three_groups": 3,
                                 "late_censoring": 4}[kind])
    n = {"ties": 150, "few_events": 80, "three_groups": 120, "late_censoring": 160}[kind]
    x = rng.normal(size=n)
    score = np.round(x + rng.normal(scale=0.7, size=n), 2)
    group = np.where(rng.random(n) < 0.5, "arm_a", "arm_b")
    if kind == "three_groups":
        group = rng.choice(["g1", "g2", "g3"], size=n)
    hazard = np.exp(0.7 * x + 0.4 * (group == "arm_b") + 0.5 * (group == "g2")
                    + 1.0 * (group == "g3"))
    time = rng.exponential(10.0 / hazard)
    event = np.ones(n, dtype=int)
    config: dict[str, Any] = {"times": [2, 5, 10]}
    if kind == "ties":
        time = np.ceil(time / 3.0)  # integer times 1, 2, ...: many tied deaths
        score = np.round(score)  # an integer score: many tied values
        event = (rng.random(n) < 0.8).astype(int)
        config["times"] = [1, 2, 4]
    elif kind == "few_events":
        event = np.zeros(n, dtype=int)
        event[rng.choice(n, 8, replace=False)] = 1
    elif kind == "three_groups":
        event = (rng.random(n) < 0.75).astype(int)
    else:  # heavy late censoring: everyone past the 40th percentile censored, most at random
        late = time > np.quantile(time, 0.4)
        event = np.where(late & (rng.random(n) < 0.85), 0, 1)
        time = np.where(late & (event == 0), time * rng.uniform(0.6, 1.0, n), time)
        config["times"] = [1, 3, 6]
    label = (x + rng.normal(scale=1.0, size=n) > 0.3).astype(int)
    frame = pd.DataFrame({"time": np.round(time, 3), "status": event, "score": score,
                          "score2": np.round(x + rng.normal(scale=1.2, size=n), 1),
                          "group": group, "age": rng.integers(1, 15, n), "label": label})
    frame["prob"] = 1.0 / (1.0 + np.exp(-frame["score"]))  # no new draws: the data stay as they were
    path = folder / f"{kind}.csv"
    frame.to_csv(path, index=False)
    covariates = ["score", "age"] + (["group"] if kind == "three_groups" else [])
    return path, {**config, "time": "time", "event": "status", "group": "group",
                  "score": "score", "covariates": covariates, "td_auc_times": config["times"],
                  "label": "label", "scores": ["score", "score2"], "prob": "prob"}


DATASETS = ["asah", "veteran", "ties", "few_events", "three_groups", "late_censoring"]
SURVIVAL_SETS = DATASETS[1:]
ROC_SETS = ["asah", "ties", "few_events", "three_groups", "late_censoring"]


@pytest.fixture(scope="module")
def live(r_ready: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """name -> (csv path, config, R's numbers); one Rscript call per data set, on first use."""
    folder = tmp_path_factory.mktemp("r_live")
    cache: dict[str, Any] = {}

    def get(name: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        if name not in cache:
            maker = {"asah": _asah, "veteran": _veteran}.get(name)
            path, config = maker(folder) if maker else _generated(name, folder)
            config_path, out = folder / f"{name}.config.json", folder / f"{name}.r.json"
            config_path.write_text(json.dumps({**config, "csv": str(path)}))
            done = subprocess.run(["Rscript", str(SCRIPT), str(config_path), str(out)],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"Rscript failed on {name}:\n{done.stderr}"
            cache[name] = (path, config, json.loads(out.read_text()))
        return cache[name]

    return {"get": get}


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------
# ROC: pROC
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROC_SETS)
def test_roc_auc_delong_youden_wilson_and_paired_test_equal_proc(name, live, capsys):
    path, config, r = live["get"](name)
    score_args = [a for s in config["scores"] for a in ("--score", s)]
    ours = _cli(capsys, "roc", "--csv", str(path), "--label", config["label"], *score_args)
    for row, ref in zip(ours["results"], r["roc"], strict=True):
        assert row["score"] == ref["score"]
        # auc(r); ci.auc(r, method = "delong"), clipped to [0, 1]
        assert row["auc"] == pytest.approx(ref["auc"], abs=TOL)
        assert [row["ci_low"], row["ci_high"]] == pytest.approx(
            [ref["ci_low"], ref["ci_high"]], abs=TOL)
        # coords(r, "best", best.method = "youden"): threshold, Se, Sp, PPV, NPV
        y = row["youden"]
        assert y["threshold"] == pytest.approx(ref["threshold"], abs=TOL)
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            assert y[key] == pytest.approx(ref[key], abs=TOL), key
        # Wilson 95% intervals of Se and Sp (written out in R; = prop.test(correct = FALSE))
        assert y["sensitivity_ci"] == pytest.approx(ref["sensitivity_ci"], abs=TOL)
        assert y["specificity_ci"] == pytest.approx(ref["specificity_ci"], abs=TOL)
    # roc.test(r_a, r_b, method = "delong", paired = TRUE): Z, p, CI of AUC_a - AUC_b
    for row, ref in zip(ours["comparisons"], r["roc_test"], strict=True):
        assert (row["score_a"], row["score_b"]) == (ref["score_a"], ref["score_b"])
        assert row["z"] == pytest.approx(ref["z"], abs=TOL)
        assert row["p"] == pytest.approx(ref["p"], abs=TOL)
        assert row["diff_ci"] == pytest.approx(ref["diff_ci"], abs=TOL)


def test_unpaired_delong_equals_roc_test_unpaired(live):
    # roc.test(roc(Female), roc(Male), method = "delong", paired = FALSE) on aSAH's s100b
    path, _config, r = live["get"]("asah")
    frame = pd.read_csv(path)
    a, b = r["roc_unpaired"]["levels"]
    fa, fb = frame[frame["gender"] == a], frame[frame["gender"] == b]
    test = roc.delong_unpaired_test(fa["poor"].to_numpy(bool), fa["s100b"],
                                      fb["poor"].to_numpy(bool), fb["s100b"])
    assert test.z == pytest.approx(r["roc_unpaired"]["z"], abs=TOL)
    assert test.p == pytest.approx(r["roc_unpaired"]["p"], abs=TOL)


# ----------------------------------------------------------------------------
# Survival: survival and maxstat
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SURVIVAL_SETS)
def test_logrank_and_kaplan_meier_equal_survdiff_and_survfit(name, live, capsys):
    path, config, r = live["get"](name)
    times = ",".join(str(t) for t in config["times"])
    ours = _cli(capsys, "survival", "--csv", str(path), "--time", config["time"],
                "--event", config["event"], "--group", config["group"], "--times", times)
    # survdiff(Surv(time, status) ~ group): chi-square, df, p (2, 3 or 4 groups)
    assert ours["logrank"]["statistic"] == pytest.approx(r["survdiff"]["statistic"], abs=TOL)
    assert ours["logrank"]["df"] == r["survdiff"]["df"]
    assert ours["logrank"]["p"] == pytest.approx(r["survdiff"]["p"], abs=TOL)
    # summary(survfit(..., conf.type = "log-log"), times = ..., extend = TRUE)
    by_group = {g["group"]: g for g in ours["at_risk"]["groups"]}
    assert sorted(by_group) == [ref["group"] for ref in r["survfit"]]
    for ref in r["survfit"]:
        got = by_group[ref["group"]]
        assert ours["at_risk"]["times"] == pytest.approx(ref["time"])
        assert got["at_risk"] == ref["n_risk"]
        assert got["survival"] == pytest.approx(ref["surv"], abs=TOL)
        # R gives NA for the band where S(t) = 0; we give [0, 0]
        for band, low, high in zip(got["survival_ci"], ref["lower"], ref["upper"], strict=True):
            if "NA" in (low, high):  # jsonlite writes R's NA as "NA"
                assert band == [0.0, 0.0]
                continue
            assert band == pytest.approx([low, high], abs=TOL)


@pytest.mark.parametrize("name", SURVIVAL_SETS)
def test_cox_equals_coxph_efron(name, live, capsys):
    path, config, r = live["get"](name)
    ours = _cli(capsys, "cox", "--csv", str(path), "--time", config["time"],
                "--event", config["event"], "--covariates", ",".join(config["covariates"]))
    ref = r["coxph"]
    # coxph(Surv(time, status) ~ ..., ties = "efron"); R names a text level "groupg2", we "group=g2"
    assert [c["name"].replace("=", "") for c in ours["coefficients"]] == ref["name"]
    for row, coef, se, p in zip(ours["coefficients"], ref["coef"], ref["se"], ref["p"],
                                strict=True):
        assert row["coef"] == pytest.approx(coef, abs=TOL)
        assert row["se"] == pytest.approx(se, abs=TOL)
        assert row["p"] == pytest.approx(p, abs=TOL)
    # summary(coxph)$concordance[1] (Harrell's C, tied times not comparable)
    assert ours["concordance"] == pytest.approx(ref["concordance"], abs=TOL)


@pytest.mark.parametrize("name", SURVIVAL_SETS)
def test_maxstat_equals_maxstat_test(name, live, capsys):
    path, config, r = live["get"](name)
    ours = _cli(capsys, "survival", "--csv", str(path), "--time", config["time"],
                "--event", config["event"], "--score", config["score"], "--cutoff", "maxstat")
    ref, cut = r["maxstat"], ours["cutoff"]
    # maxstat.test(Surv(time, status) ~ x, smethod = "LogRank", pmethod = "Lau92",
    #              minprop = 0.1, maxprop = 0.9): M, estimated cutpoint, p
    assert cut["statistic"] == pytest.approx(ref["statistic"], abs=TOL)
    assert cut["cutpoint"] == pytest.approx(ref["estimate"], abs=TOL)
    assert cut["n_low"] == ref["n_low"]
    assert cut["p_corrected"] == pytest.approx(ref["p"]["Lau92"], abs=TOL)
    frame = pd.read_csv(path)
    args = (frame[config["time"]], frame[config["event"]], frame[config["score"]])
    test = maxstat.maxstat_test(*args)
    assert test.cuts == pytest.approx(ref["cuts"]) and test.stats == pytest.approx(
        ref["stats"], abs=TOL)
    # pmethod = "Lau94"
    assert maxstat.maxstat_test(*args, p_method="Lau94").p == pytest.approx(
        ref["p"]["Lau94"], abs=TOL)
    # pmethod = "exactGauss": with Miwa(steps = 4096) (<= 20 cuts) R is exact to ~1e-9;
    # beyond 20 cuts R can only use GenzBretz(maxpts = 2e6, abseps = 1e-6), randomised: in
    # 58 dimensions it reports an error of ~1.7e-4, and on three_groups (83 cuts) it gives
    # 3.8e-6 where our grid integral converges to 1.40987e-5 as the grid is refined (200 to
    # 3200 cells) and a Monte Carlo of the Gaussian chain gives 3e-5 +- 0.9e-5. So there we
    # allow max(2e-5, 5 x R's own error estimate): a check of R's randomised integral.
    exact = maxstat.maxstat_test(*args, p_method="exactGauss").p
    tol = TOL if ref["exact_algorithm"] == "Miwa" else max(2e-5, 5 * float(ref["exact_error"]))
    assert exact == pytest.approx(ref["p"]["exactGauss"], abs=tol)
    # the classic log-rank and Cox of the chosen groups: survdiff / coxph on x > estimate
    assert ours["logrank"]["statistic"] == pytest.approx(r["maxstat_groups"]["statistic"],
                                                         abs=TOL)
    assert ours["logrank"]["p"] == pytest.approx(r["maxstat_groups"]["p"], abs=TOL)
    assert ours["cox"]["hr"] == pytest.approx(r["maxstat_cox"]["hr"], rel=TOL)
    assert ours["cox"]["ci"] == pytest.approx(r["maxstat_cox"]["ci"], rel=TOL)
    assert ours["cox"]["p"] == pytest.approx(r["maxstat_cox"]["p"], abs=TOL)


def test_issue_19_veteran_case(live, capsys):
    # maxstat.test(Surv(time, status) ~ karno, data = veteran, smethod = "LogRank",
    #              pmethod = "Lau92", minprop = 0.1, maxprop = 0.9)
    #   M = 4.6181, p-value = 0.0001886 (the issue: 4.62 and 1.9e-4, not 6.67 and 2.5e-9)
    _, _, r = live["get"]("veteran")
    assert r["maxstat"]["statistic"] == pytest.approx(4.6181, abs=5e-5)
    assert r["maxstat"]["p"]["Lau92"] == pytest.approx(1.886e-4, abs=5e-8)
    ours = _cli(capsys, "survival", "--csv", str(DATA / "veteran.csv"), "--time", "time",
                "--event", "status", "--score", "karno", "--cutoff", "maxstat")
    assert round(ours["cutoff"]["statistic"], 2) == 4.62
    assert f"{ours['cutoff']['p_corrected']:.1e}" == "1.9e-04"


# ----------------------------------------------------------------------------
# Proportional hazards, time-dependent AUC, calibration (issue 14, item 7)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SURVIVAL_SETS)
def test_ph_test_equals_cox_zph(name, live, capsys):
    path, config, r = live["get"](name)
    ours = _cli(capsys, "cox", "--csv", str(path), "--time", config["time"],
                "--event", config["event"], "--covariates", ",".join(config["covariates"]))
    # cox.zph(coxph(Surv(time, status) ~ ..., ties = "efron"))$table: per term and GLOBAL
    ref = r["coxzph"]
    tests = ours["ph_test"]["tests"]
    assert [t["term"] for t in tests] == ref["term"]
    assert [t["df"] for t in tests] == ref["df"]
    assert [t["chisq"] for t in tests] == pytest.approx(ref["chisq"], abs=TOL)
    assert [t["p"] for t in tests] == pytest.approx(ref["p"], abs=TOL)


@pytest.mark.parametrize("name", SURVIVAL_SETS)
def test_td_auc_equals_the_ipcw_formula_in_r(name, live, capsys):
    path, config, r = live["get"](name)
    times = ",".join(str(t) for t in config["td_auc_times"])
    ours = _cli(capsys, "survival", "--csv", str(path), "--time", config["time"],
                "--event", config["event"], "--score", config["score"], "--cutoff", "median",
                "--td-auc-times", times)["td_auc"]
    ref = r["td_auc"]
    assert ours["times"] == pytest.approx(ref["times"])
    assert None not in ours["auc"]  # every chosen time has cases and controls
    assert ours["auc"] == pytest.approx(ref["auc"], abs=1e-10)
    assert ours["mean_auc"] == pytest.approx(ref["mean_auc"], abs=1e-10)


@pytest.mark.parametrize("name", ROC_SETS)
def test_calibration_intercept_and_slope_equal_glm(name, live):
    from cmil_core.analysis.calibration import calibration_fit

    path, config, r = live["get"](name)
    frame = pd.read_csv(path)
    fit = calibration_fit(frame[config["label"]].to_numpy(int), frame[config["prob"]])
    ref = r["calibration"]
    # coef(glm(y ~ lp, binomial))[2], coef(glm(y ~ 1, offset = lp, binomial))
    assert fit["slope"] == pytest.approx(ref["slope"], abs=TOL)
    assert fit["intercept"] == pytest.approx(ref["intercept"], abs=TOL)
    # confint.default: Wald intervals
    assert fit["slope_ci"] == pytest.approx(ref["slope_ci"], abs=TOL)
    assert fit["intercept_ci"] == pytest.approx(ref["intercept_ci"], abs=TOL)
