"""Tests of the discrimination statistics (cmil_core.analysis.roc, roc_bootstrap, cutoffs and
the calibration curves of calibration): pROC reference values, brute force, properties, failures.

Reference values come from tests/data/reference/REFERENCE.md; each test pastes
the R call that produced its numbers. Tolerance: the digits shown, or 1e-6
where more digits are given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats as sps
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve as sk_roc_curve

from cmil_core.analysis import calibration, cutoffs, roc, roc_bootstrap
from cmil_core.errors import InputError
from conftest import is_plain_json

REFERENCE = Path(__file__).parent / "data" / "reference"


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    # Rdatasets csv/NeuroDataSets/SAHemorrhage_df.csv == pROC's aSAH (113 rows)
    return pd.read_csv(REFERENCE / "asah.csv")


@pytest.fixture(scope="module")
def asah_roc(asah: pd.DataFrame) -> dict:
    return roc.roc_analysis(asah, "outcome", ["s100b", "ndka", "wfns"], positive="Poor")


def _poor(asah: pd.DataFrame) -> np.ndarray:
    return (asah["outcome"] == "Poor").to_numpy()


# ----------------------------------------------------------------------------
# pROC reference values (REFERENCE.md)
# ----------------------------------------------------------------------------

AUC_REFERENCE = [
    # pROC: r <- roc(aSAH$outcome, aSAH$s100b); auc(r) = 0.73136856368563685;
    #       ci.auc(r) (DeLong) = 0.6301182117616227 - 0.8326189156096512
    ("s100b", 0.73136856368563685, 0.6301182117616227, 0.8326189156096512),
    # pROC: r <- roc(aSAH$outcome, aSAH$ndka); auc = 0.611957994579946;
    #       ci.auc(r) = 0.501244999271703 - 0.722670989888189
    ("ndka", 0.611957994579946, 0.501244999271703, 0.722670989888189),
    # pROC: r <- roc(aSAH$outcome, aSAH$wfns); auc = 0.8236788617886179;
    #       ci.auc(r) = 0.7485348878194529 - 0.898822835757783
    ("wfns", 0.8236788617886179, 0.7485348878194529, 0.898822835757783),
]


@pytest.mark.parametrize(("score", "auc", "low", "high"), AUC_REFERENCE)
def test_auc_and_delong_ci_match_proc(asah, score, auc, low, high):
    y = _poor(asah)
    assert roc.roc_auc(y, asah[score]) == pytest.approx(auc, abs=1e-6)
    interval = roc.delong_ci(y, asah[score])
    assert (interval.auc, interval.low, interval.high) == pytest.approx((auc, low, high), abs=1e-6)


@pytest.mark.parametrize(("score", "auc", "low", "high"), AUC_REFERENCE)
def test_roc_analysis_reports_proc_values(asah_roc, score, auc, low, high):
    row = next(r for r in asah_roc["results"] if r["score"] == score)
    assert (row["auc"], row["ci_low"], row["ci_high"]) == pytest.approx((auc, low, high), abs=1e-6)
    assert (row["n"], row["n_positive"], row["ci_method"]) == (113, 41, "delong")
    assert row["group"] is None


PAIRED_REFERENCE = [
    # pROC: roc.test(r.ndka, r.s100b)  (paired DeLong)
    #   Z = -1.39077002573558, p = 0.164295175223054,
    #   95% CI of the AUC difference -0.2876917446341914 - 0.0488706064228094
    (
        "ndka",
        "s100b",
        -1.39077002573558,
        0.164295175223054,
        (-0.2876917446341914, 0.0488706064228094),
    ),
    # pROC: roc.test(r.wfns, r.s100b)  Z = 2.20898359144091, p = 0.0271757822291882
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, None),
]


@pytest.mark.parametrize(("a", "b", "z", "p", "ci"), PAIRED_REFERENCE)
def test_paired_delong_matches_proc_roc_test(asah, a, b, z, p, ci):
    test = roc.delong_paired_test(_poor(asah), asah[a], asah[b])
    assert test.z == pytest.approx(z, abs=1e-6)
    assert test.p == pytest.approx(p, abs=1e-6)
    if ci is not None:
        assert test.diff_ci == pytest.approx(ci, abs=1e-6)


@pytest.mark.parametrize(("a", "b", "z", "p", "ci"), PAIRED_REFERENCE)
def test_roc_analysis_comparisons_match_proc(asah, a, b, z, p, ci):
    result = roc.roc_analysis(asah, "outcome", [a, b], positive="Poor")
    (row,) = result["comparisons"]
    assert (row["score_a"], row["score_b"], row["method"]) == (a, b, "delong paired")
    assert (row["z"], row["p"]) == pytest.approx((z, p), abs=1e-6)
    if ci is not None:
        assert row["diff_ci"] == pytest.approx(list(ci), abs=1e-6)


def test_youden_cutoff_matches_proc_coords(asah):
    # pROC: coords(r.s100b, "best") -> threshold 0.205, specificity 0.8055555555555556
    #       (58/72), sensitivity 0.6341463414634146 (26/41), ppv 0.65, npv 0.7945205479452054
    y = _poor(asah)
    cutoff = cutoffs.youden_cutoff(y, asah["s100b"])
    assert cutoff == pytest.approx(0.205, abs=1e-12)
    m = cutoffs.metrics_at_cutoff(y, asah["s100b"], cutoff)
    assert (m.tp, m.fn, m.tn, m.fp) == (26, 15, 58, 14)
    assert m.sensitivity == pytest.approx(0.6341463414634146, abs=1e-6)
    assert m.specificity == pytest.approx(0.8055555555555556, abs=1e-6)
    assert m.ppv == pytest.approx(0.65, abs=1e-6)
    assert m.npv == pytest.approx(0.7945205479452054, abs=1e-6)


def test_wilson_intervals_at_youden_match_reference(asah_roc):
    # Wilson 95% CI at the s100b Youden threshold (REFERENCE.md; e.g. R
    # binom::binom.confint(26, 41, method = "wilson") and (58, 72)):
    #   sensitivity 0.48121 - 0.76410; specificity 0.69967 - 0.88049
    youden = asah_roc["results"][0]["youden"]
    assert youden["threshold"] == pytest.approx(0.205)
    assert youden["sensitivity_ci"] == pytest.approx([0.48121, 0.76410], abs=5e-6)
    assert youden["specificity_ci"] == pytest.approx([0.69967, 0.88049], abs=5e-6)
    assert (youden["ppv"], youden["npv"]) == pytest.approx((0.65, 0.7945205479452054), abs=1e-6)


def test_clopper_pearson_matches_scipy_binomtest():
    # SciPy docs: binomtest(k=7, n=50, p=0.1).proportion_ci()
    #   -> ConfidenceInterval(low=0.05819170033997342, high=0.26739600249700846)
    low, high = cutoffs.clopper_pearson_ci(7, 50)
    assert (low, high) == pytest.approx((0.05819170033997342, 0.26739600249700846), abs=1e-6)


# ----------------------------------------------------------------------------
# Brute force and naive implementations
# ----------------------------------------------------------------------------


def _pairs_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC as the share of correctly ordered (positive, negative) pairs, ties 1/2."""
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _naive_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong (1988) with the full m-by-n placement matrix: the textbook form."""
    v10, v01 = [], []
    for s in scores:
        diff = s[y][:, None] - s[~y][None, :]
        psi = (diff > 0) + 0.5 * (diff == 0)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    cov = np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    return v10.mean(axis=1), cov


labels_and_scores = st.integers(min_value=2, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < len(v)),
        st.lists(st.integers(min_value=0, max_value=8), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(labels_and_scores)
def test_auc_equals_pair_count(data):
    y, s = np.array(data[0]), np.array(data[1], dtype=float)  # small integers: many ties
    assert roc.roc_auc(y, s) == pytest.approx(_pairs_auc(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_fast_delong_equals_placement_matrix(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 80))
    y = rng.random(n) < 0.4
    y[:2], y[2:4] = True, False
    scores = np.vstack([rng.integers(0, 10, n), rng.normal(size=n) + y, rng.random(n)])
    aucs, cov = roc.delong_covariance(y, list(scores))
    naive_aucs, naive_cov = _naive_delong(y, scores)
    np.testing.assert_allclose(aucs, naive_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, naive_cov, atol=1e-12)


def test_bootstrap_aucs_equal_auc_of_each_resample():
    rng = np.random.default_rng(3)
    y = rng.random(50) < 0.3
    s = rng.integers(0, 6, 50).astype(float)  # ties
    aucs = roc_bootstrap.bootstrap_aucs(y, s, n_boot=40, seed=11)
    pos_rows, neg_rows = np.flatnonzero(y), np.flatnonzero(~y)
    ((pos_idx, neg_idx),) = list(roc_bootstrap._resample_chunks(y.sum(), (~y).sum(), 40, 11))
    for b in range(40):
        rows = np.r_[pos_rows[pos_idx[b]], neg_rows[neg_idx[b]]]
        assert aucs[b] == pytest.approx(roc_auc_score(y[rows], s[rows]), abs=1e-12)


def test_bootstrap_ci_close_to_delong_ci_on_moderate_sample():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.35
    s = rng.normal(size=400) + 1.0 * y
    delong = roc.delong_ci(y, s)
    boot = roc.bootstrap_ci(y, s, n_boot=2000, seed=0)
    assert boot.auc == delong.auc
    assert (boot.low, boot.high) == pytest.approx((delong.low, delong.high), abs=0.015)
    assert boot.se == pytest.approx(delong.se, rel=0.1)


def test_bootstrap_is_seeded_and_stratified():
    y = np.r_[np.ones(30, bool), np.zeros(50, bool)]
    s = np.random.default_rng(1).normal(size=80) + y
    first = roc_bootstrap.bootstrap_aucs(y, s, 300, seed=5)
    np.testing.assert_array_equal(first, roc_bootstrap.bootstrap_aucs(y, s, 300, seed=5))
    assert not np.array_equal(first, roc_bootstrap.bootstrap_aucs(y, s, 300, seed=6))
    # more resamples than one chunk holds: the chunks join up
    big = roc_bootstrap.bootstrap_aucs(np.r_[y, y], np.r_[s, s], 3, seed=0)
    assert big.shape == (3,) and np.all((big >= 0) & (big <= 1))


def test_bootstrap_chunks_cover_every_resample(monkeypatch):
    monkeypatch.setattr(roc_bootstrap, "_CHUNK_ELEMENTS", 200)  # 80 patients -> 2 resamples a chunk
    y = np.r_[np.ones(30, bool), np.zeros(50, bool)]
    s = np.random.default_rng(1).normal(size=80) + y
    aucs = roc_bootstrap.bootstrap_aucs(y, s, 7, seed=2)
    assert aucs.shape == (7,) and np.all((aucs > 0.3) & (aucs < 1))


# ----------------------------------------------------------------------------
# ROC curve properties
# ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(labels_and_scores)
def test_roc_curve_properties(data):
    y, s = np.array(data[0]), np.array(data[1], dtype=float)
    curve = roc.roc_curve(y, s)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    assert np.all(np.diff(curve.thresholds) < 0)
    # the trapezoid area under the empirical curve is the AUC, ties included
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(roc.roc_auc(y, s), abs=1e-12)


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(4)
    y = rng.random(60) < 0.5
    s = rng.integers(0, 15, 60).astype(float)
    fpr, tpr, thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    curve = roc.roc_curve(y, s)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_array_equal(curve.thresholds, thresholds)


# ----------------------------------------------------------------------------
# Other tests, cutoffs, proportions
# ----------------------------------------------------------------------------


def test_unpaired_test_uses_the_sum_of_variances(asah):
    y = _poor(asah)
    a, b = roc.delong_ci(y, asah["wfns"]), roc.delong_ci(y[:60], asah["s100b"][:60])
    test = roc.delong_unpaired_test(y, asah["wfns"], y[:60], asah["s100b"][:60])
    z = (a.auc - b.auc) / math.hypot(a.se, b.se)
    assert test.z == pytest.approx(z, abs=1e-12)
    # pROC's delong.unpaired.test: Student t with Welch-Satterthwaite df (n = patients per cohort)
    va, vb = a.se**2, b.se**2
    df = (va + vb) ** 2 / (va**2 / (y.size - 1) + vb**2 / (60 - 1))
    assert test.df == pytest.approx(df, rel=1e-12)
    assert test.p == pytest.approx(2 * sps.t.sf(abs(z), df), abs=1e-12)
    assert test.method == "delong unpaired"


def test_cutoff_fixed_on_training_is_applied_unchanged():
    rng = np.random.default_rng(8)
    y_train, y_test = rng.random(80) < 0.4, rng.random(50) < 0.4
    s_train, s_test = rng.normal(size=80) + y_train, rng.normal(size=50) + y_test
    cutoff = cutoffs.youden_cutoff(y_train, s_train)
    m = cutoffs.metrics_at_cutoff(y_test, s_test, cutoff)
    called = s_test >= cutoff
    assert (m.tp, m.fp, m.tn, m.fn) == (
        np.sum(called & y_test),
        np.sum(called & ~y_test),
        np.sum(~called & ~y_test),
        np.sum(~called & y_test),
    )
    assert m.threshold == cutoff


def test_youden_brute_force_over_midpoints():
    rng = np.random.default_rng(2)
    for _ in range(20):
        y = rng.random(40) < 0.5
        y[:2] = [True, False]
        s = rng.integers(0, 12, 40).astype(float)
        values = np.unique(s)
        mids = (values[1:] + values[:-1]) / 2
        j = [np.mean(s[y] >= t) + np.mean(s[~y] < t) - 1 for t in mids]
        best = cutoffs.youden_cutoff(y, s)
        assert best in mids or max(j) <= 0
        if best in mids:
            assert j[list(mids).index(best)] == pytest.approx(max(j))


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.27753279986288973),  # Wilson: 0 successes keeps low = 0
        (10, 10, 0.7224672001371103, 1.0),
        (26, 41, 0.48121, 0.76410),  # REFERENCE.md, sensitivity at s100b Youden
    ],
)
def test_wilson_ci_edges(k, n, low, high):
    assert cutoffs.wilson_ci(k, n) == pytest.approx((low, high), abs=5e-6)


def test_metrics_with_nobody_called_positive_have_no_ppv():
    m = cutoffs.metrics_at_cutoff([0, 1, 1], [0.1, 0.2, 0.3], math.inf)
    d = m.to_dict()
    assert (d["ppv"], d["ppv_ci"], d["threshold"], d["sensitivity"]) == (None, None, None, 0.0)
    json.dumps(d, allow_nan=False)


# ----------------------------------------------------------------------------
# Calibration and decision curves
# ----------------------------------------------------------------------------


def test_calibration_bins_and_brier():
    rng = np.random.default_rng(5)
    p = rng.random(5000)
    y = rng.random(5000) < p  # calibrated by construction
    bins = calibration.calibration_bins(y, p, n_bins=10)
    assert len(bins) == 10 and bins["n"].sum() == 5000
    assert (bins["n"] * bins["observed"]).sum() == pytest.approx(y.sum())
    assert np.all(np.abs(bins["observed"] - bins["mean_predicted"]) < 0.06)
    assert np.all(bins["observed_low"] <= bins["observed"])
    assert np.all(bins["observed"] <= bins["observed_high"])
    assert calibration.brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_calibration_bins_keep_ties_together():
    p = np.r_[np.full(60, 0.2), np.linspace(0.3, 0.9, 40)]
    y = np.arange(100) % 3 == 0
    bins = calibration.calibration_bins(y, p, n_bins=10)
    assert bins["n"].sum() == 100 and bins["n"].iloc[0] == 60 and len(bins) < 10


def test_calibration_smooth_follows_the_diagonal_when_calibrated():
    rng = np.random.default_rng(6)
    p = rng.random(3000)
    y = rng.random(3000) < p
    curve = calibration.calibration_smooth(y, p)
    middle = curve[(curve["predicted"] > 0.2) & (curve["predicted"] < 0.8)]
    assert np.all(np.abs(middle["observed"] - middle["predicted"]) < 0.06)


def test_decision_curve_against_brute_force():
    rng = np.random.default_rng(7)
    p = rng.random(200)
    y = rng.random(200) < p
    table = calibration.decision_curve(y, p)
    assert len(table) == 99 and table["net_benefit_none"].eq(0).all()
    for _, row in table.iloc[::10].iterrows():
        t = row["threshold"]
        tp, fp = np.sum((p >= t) & y), np.sum((p >= t) & ~y)
        assert row["net_benefit_model"] == pytest.approx(tp / 200 - fp / 200 * t / (1 - t))
    prevalence = y.mean()
    at_prevalence = calibration.decision_curve(y, p, [prevalence])
    assert at_prevalence["net_benefit_all"].iloc[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: calibration.brier_score([0, 1], [0.2, 1.3]), r"must lie in \[0, 1\]"),
        (lambda: calibration.decision_curve([0, 1], [0.2, 0.3], [0.0, 0.5]), "strictly between 0 and 1"),
        (lambda: calibration.calibration_bins([0, 1], [0.2, 0.3], n_bins=0), "positive integer"),
    ],
)
def test_calibration_failures(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_calibration_accepts_a_single_class():
    assert calibration.brier_score([0, 0], [0.1, 0.3]) == pytest.approx(0.05)


# ----------------------------------------------------------------------------
# roc_analysis: the JSON contract, labels, groups, degenerate input
# ----------------------------------------------------------------------------

# docs/DESIGN.md, "JSON" / roc: the contract keys (more keys are welcome)
CONTRACT_RESULT = {
    "score", "group", "n", "n_positive", "auc", "ci_low", "ci_high", "ci_method", "youden"
}
CONTRACT_YOUDEN = {
    "threshold", "sensitivity", "specificity", "ppv", "npv", "sensitivity_ci", "specificity_ci"
}
CONTRACT_COMPARISON = {"score_a", "score_b", "group", "method", "z", "p", "diff", "diff_ci"}


def test_roc_analysis_follows_the_json_contract(asah_roc):
    assert {"results", "comparisons"} <= set(asah_roc)
    for row in asah_roc["results"]:
        assert set(row) >= CONTRACT_RESULT and set(row["youden"]) >= CONTRACT_YOUDEN
    assert len(asah_roc["comparisons"]) == 3
    for row in asah_roc["comparisons"]:
        assert set(row) >= CONTRACT_COMPARISON
    assert is_plain_json(asah_roc)
    json.dumps(asah_roc, allow_nan=False)


def test_roc_analysis_by_group_and_cutoff_group(asah):
    result = roc.roc_analysis(asah, "outcome", ["s100b", "wfns"], positive="Poor", group="gender")
    assert [(r["group"], r["score"]) for r in result["results"]] == [
        ("Female", "s100b"), ("Female", "wfns"), ("Male", "s100b"), ("Male", "wfns"),
    ]
    assert [c["group"] for c in result["comparisons"]] == ["Female", "Male"]
    women = asah[asah["gender"] == "Female"]
    assert result["results"][0]["auc"] == pytest.approx(roc.roc_auc(_poor(women), women["s100b"]))
    fixed = roc.roc_analysis(
        asah, "outcome", ["s100b"], positive="Poor", group="gender", cutoff_group="Female"
    )
    cutoff = cutoffs.youden_cutoff(_poor(women), women["s100b"])
    assert [r["youden"]["threshold"] for r in fixed["results"]] == [cutoff, cutoff]
    men = asah[asah["gender"] == "Male"]
    expected = cutoffs.metrics_at_cutoff(_poor(men), men["s100b"], cutoff).to_dict()
    assert fixed["results"][1]["youden"]["sensitivity"] == expected["sensitivity"]


def test_roc_analysis_bootstrap_is_reproducible(asah):
    def run(seed: int) -> dict:
        return roc.roc_analysis(
            asah, "outcome", ["s100b"], "Poor", ci_method="bootstrap", n_boot=500, seed=seed
        )

    first = run(1)["results"][0]
    assert first["ci_method"] == "bootstrap"
    assert first == run(1)["results"][0] and first != run(2)["results"][0]
    assert first["ci_low"] < first["auc"] < first["ci_high"]


@pytest.mark.parametrize(
    ("labels", "positive"),
    [
        ([0, 1, 0, 1, 1, 0], None),
        ([False, True, False, True, True, False], None),
        ([0.0, 1.0, 0.0, 1.0, 1.0, 0.0], None),
        (["no", " yes", "no", "yes ", "yes", "no"], "yes"),
        ([2, 7, 2, 7, 7, 2], 7),
        ([2.0, 7.0, 2.0, 7.0, 7.0, 2.0], "7"),
    ],
)
def test_label_forms(labels, positive):
    frame = pd.DataFrame({"y": labels, "s": [0.1, 0.9, 0.3, 0.4, 0.8, 0.5]})
    row = roc.roc_analysis(frame, "y", ["s"], positive=positive)["results"][0]
    assert (row["n_positive"], row["auc"]) == (3, pytest.approx(8 / 9))


def test_a_table_of_text_cells_is_read_like_numbers():
    # cmil_core.clinical.tables keeps every cell as text; blank cells are missing
    frame = pd.DataFrame(
        {"y": ["0", "1", "0", "1", "1", "0", ""], "s": ["0.1", "0.9", "0.3", "0.4", "0.8", "0.5", "1"]}
    )
    result = roc.roc_analysis(frame, "y", ["s"])
    assert result["results"][0]["auc"] == pytest.approx(8 / 9) and result["n_dropped"] == 1


def test_missing_values_are_dropped_and_counted():
    frame = pd.DataFrame(
        {
            "y": [0, 1, None, 1, 0, 1, 0],
            "s": [0.1, 0.9, 0.5, None, 0.2, 0.7, 0.8],
            "g": list("aaaaaaa"),
        }
    )
    result = roc.roc_analysis(frame, "y", ["s"], group="g")
    assert result["n_dropped"] == 2 and result["results"][0]["n"] == 5
    assert "2 rows with missing values dropped" in result["warnings"]


def test_constant_scores_give_auc_half_with_a_warning():
    frame = pd.DataFrame({"y": [0, 1, 0, 1, 0], "c": [3.0] * 5, "d": [1.0] * 5})
    result = roc.roc_analysis(frame, "y", ["c", "d"])
    row = result["results"][0]
    assert (row["auc"], row["ci_low"], row["ci_high"]) == (0.5, 0.5, 0.5)
    assert row["youden"]["threshold"] is None  # +inf: nobody is called positive
    assert any("'c' is constant" in w for w in result["warnings"])
    (comparison,) = result["comparisons"]
    assert (comparison["diff"], comparison["z"], comparison["p"]) == (0.0, None, None)
    json.dumps(result, allow_nan=False)


def test_a_single_positive_gives_an_auc_without_delong_interval():
    frame = pd.DataFrame({"y": [0, 0, 0, 1], "s": [0.1, 0.2, 0.6, 0.5]})
    result = roc.roc_analysis(frame, "y", ["s"])
    row = result["results"][0]
    assert row["auc"] == pytest.approx(2 / 3) and row["ci_low"] is None and row["ci_high"] is None
    assert any("no DeLong interval" in w for w in result["warnings"])


def test_format_roc_shows_the_numbers(asah, asah_roc):
    text = roc.format_roc(asah_roc)
    for piece in ["0.731 [0.630, 0.833]", "0.205", "0.634 [0.481, 0.764]", "0.806 [0.700, 0.880]"]:
        assert piece in text
    assert "Paired DeLong" in text and "1.391" in text


POOR = {"label": "outcome", "positive": "Poor"}
ROC_FAILURES = [
    ({"label": "nope", "scores": ["s100b"]}, r"column 'nope' not found; columns are"),
    (
        {"label": "outcome", "scores": ["s100b"], "positive": "Bad"},
        r"column 'outcome': positive value 'Bad' not found; values are 'Good', 'Poor'",
    ),
    (
        {"label": "outcome", "scores": ["s100b"]},
        r"column 'outcome' is not 0/1 \(values are 'Good', 'Poor'\)",
    ),
    ({**POOR, "scores": ["gender"]}, r"row 0, column 'gender': value 'Female' is not a number"),
    ({**POOR, "scores": []}, "no score column"),
    ({**POOR, "scores": ["s100b", "s100b"]}, "given twice"),
    ({**POOR, "scores": ["s100b"], "ci_method": "wald"}, "ci method 'wald'"),
    ({**POOR, "scores": ["s100b"], "n_boot": 0}, "positive integer"),
    ({**POOR, "scores": ["outcome"]}, "is the label"),
    ({**POOR, "scores": ["s100b"], "group": "outcome"}, "is the label"),
    (
        {**POOR, "scores": ["s100b"], "group": "gender", "cutoff_group": "Other"},
        "cutoff group 'Other' not found",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), ROC_FAILURES)
def test_roc_analysis_failures(asah, kwargs, message):
    with pytest.raises(InputError, match=message):
        roc.roc_analysis(asah, **kwargs)


def test_one_class_in_a_group_names_the_group(asah):
    frame = asah.assign(site=np.where(asah["outcome"] == "Good", "A", "B"))
    frame.loc[frame.index[:3], "site"] = "B"
    with pytest.raises(InputError, match=r"group 'A': column 'outcome' has only negative cases"):
        roc.roc_analysis(frame, "outcome", ["s100b"], positive="Poor", group="site")


def test_infinite_score_is_rejected():
    frame = pd.DataFrame({"y": [0, 1, 0, 1], "s": [0.1, np.inf, 0.2, 0.3]})
    with pytest.raises(InputError, match=r"row 1, column 's': value inf is not finite"):
        roc.roc_analysis(frame, "y", ["s"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: roc.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]), "only positive cases"),
        (lambda: roc.roc_curve([0, 0], [0.1, 0.2]), "only negative cases"),
        (lambda: roc.roc_auc([0, 1, 2], [0.1, 0.2, 0.3]), "0/1 or boolean"),
        (lambda: roc.roc_auc([0, 1], [0.1, 0.2, 0.3]), "has 2 values but y_score has 3"),
        (lambda: roc.roc_auc([0, 1], [0.1, np.nan]), "missing or infinite"),
        (lambda: roc.delong_ci([0, 1], [0.1, 0.2], level=1.5), "strictly between 0 and 1"),
        (lambda: roc.delong_covariance([0, 1, 0], [[0.1, 0.2, 0.3]]), "at least two positive"),
        (lambda: cutoffs.metrics_at_cutoff([0, 1], [0.1, 0.2], "hi"), "cutoff 'hi' is not a number"),
        (lambda: cutoffs.wilson_ci(5, 3), "0 <= k <= n"),
        (lambda: roc.bootstrap_ci([0, 1], [0.1, 0.2], n_boot=2.5), "positive integer"),
    ],
)
def test_array_function_failures(call, message):
    with pytest.raises(InputError, match=message):
        call()


# ----------------------------------------------------------------------------
# ROC confidence band (pROC's ci.se)
# ----------------------------------------------------------------------------


def _proc_se_at(curve: roc.RocCurve, sp: float) -> float:
    """pROC's coords(roc, sp, input = "specificity", ret = "sensitivity"), brute force."""
    spec = 1.0 - curve.fpr
    exact = np.isclose(spec, sp, atol=1e-9)
    if exact.any():
        return float(curve.tpr[exact].max())
    k = int(np.flatnonzero(spec > sp)[-1])  # last point above sp; the next one is below
    share = (spec[k] - sp) / (spec[k] - spec[k + 1])
    return float(curve.tpr[k] + share * (curve.tpr[k + 1] - curve.tpr[k]))


def test_roc_band_equals_brute_force_over_the_same_resamples():
    rng = np.random.default_rng(5)
    y = rng.random(40) < 0.4
    s = rng.integers(0, 8, 40).astype(float)  # ties: vertical and diagonal steps
    sp = np.arange(21) / 20.0
    band = roc_bootstrap.roc_ci_band(y, s, specificities=sp, n_boot=60, seed=4)
    pos_rows, neg_rows = np.flatnonzero(y), np.flatnonzero(~y)
    ((pos_idx, neg_idx),) = list(roc_bootstrap._resample_chunks(y.sum(), (~y).sum(), 60, 4))
    se = np.empty((60, sp.size))
    for b in range(60):
        rows = np.r_[pos_rows[pos_idx[b]], neg_rows[neg_idx[b]]]
        curve = roc.roc_curve(y[rows], s[rows])
        se[b] = [_proc_se_at(curve, v) for v in sp]
    low, median, high = np.quantile(se, [0.025, 0.5, 0.975], axis=0)
    np.testing.assert_allclose(band["se_low"], low, atol=1e-12)
    np.testing.assert_allclose(band["se_median"], median, atol=1e-12)
    np.testing.assert_allclose(band["se_high"], high, atol=1e-12)


def test_roc_band_hand_checked_tiny_case():
    # One positive (0.3), two negatives (0.1, 0.5): the negatives resample to
    # {0.1, 0.1} (p = 1/4: perfect curve, Se = 1 everywhere), {0.1, 0.5}
    # (p = 1/2: Se = 0 above Sp 0.5, 1 from Sp 0.5 down) or {0.5, 0.5}
    # (p = 1/4: Se = 0 except 1 at Sp 0).
    band = roc_bootstrap.roc_ci_band([0, 0, 1], [0.1, 0.5, 0.3],
                             specificities=[0.0, 0.25, 0.5, 0.75, 1.0], n_boot=2000, seed=1)
    assert band["specificity"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert band["se_median"] == [1.0, 1.0, 1.0, 0.0, 0.0]  # P(Se = 1) = 3/4, 3/4, 3/4, 1/4, 1/4
    assert band["se_low"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert band["se_high"] == [1.0] * 5
    # Tied scores: the curve is the diagonal, read off by linear interpolation.
    tied = roc_bootstrap.roc_ci_band([0, 1], [0.3, 0.3], specificities=[0.0, 0.3, 1.0], n_boot=50)
    assert tied["se_low"] == tied["se_high"] == pytest.approx([1.0, 0.7, 0.0])


def test_roc_band_on_asah_holds_the_observed_curve(asah):
    y, s = _poor(asah), asah["s100b"].to_numpy()
    band = roc_bootstrap.roc_ci_band(y, s)  # pROC: ci.se(roc(aSAH$outcome, aSAH$s100b), seq(0, 1, .01))
    assert band["specificity"] == pytest.approx(np.arange(101) / 100)
    assert (band["n_boot"], band["level"]) == (2000, 0.95)
    low, med, high = (np.array(band[k]) for k in ("se_low", "se_median", "se_high"))
    assert np.all(low <= med) and np.all(med <= high)
    assert (low[0], med[0], high[0]) == (1.0, 1.0, 1.0)  # Sp 0: every curve has Se 1
    observed = np.array([_proc_se_at(roc.roc_curve(y, s), v) for v in band["specificity"]])
    inside = (low - 1e-12 <= observed) & (observed <= high + 1e-12)
    assert inside.mean() >= 0.95
    assert np.all(np.diff(med) <= 1e-12)  # sensitivity falls as specificity rises
    assert is_plain_json(band)


def test_roc_band_narrows_with_more_patients_and_is_seeded(asah):
    y, s = _poor(asah), asah["s100b"].to_numpy()
    one = roc_bootstrap.roc_ci_band(y, s, n_boot=500, seed=7)
    four = roc_bootstrap.roc_ci_band(np.tile(y, 4), np.tile(s, 4), n_boot=500, seed=7)
    width = lambda b: np.mean(np.array(b["se_high"]) - np.array(b["se_low"]))  # noqa: E731
    assert width(four) < 0.65 * width(one)  # about 1/sqrt(4) = 0.5
    assert roc_bootstrap.roc_ci_band(y, s, n_boot=500, seed=7) == one
    assert roc_bootstrap.roc_ci_band(y, s, n_boot=500, seed=8) != one


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"specificities": [0.5, 1.2]}, r"within \[0, 1\]"),
        ({"specificities": []}, "non-empty"),
        ({"n_boot": 0}, "positive integer"),
        ({"level": 95}, "strictly between 0 and 1"),
    ],
)
def test_roc_band_rejects_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        roc_bootstrap.roc_ci_band([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], **kwargs)
    with pytest.raises(InputError, match="only negative cases"):
        roc_bootstrap.roc_ci_band([0, 0], [0.1, 0.2])
