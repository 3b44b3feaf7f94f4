"""cmil_core.plots: figures carry the numbers they are given, and nothing else."""

from __future__ import annotations

from cmil_core.plots import roc_figure


def test_roc_figure_legend_and_axes() -> None:
    curves = [
        {"cohort": "training", "fpr": [0, 0.2, 1], "tpr": [0, 0.8, 1], "auc": 0.9,
         "ci_low": 0.81, "ci_high": 0.99},
        {"cohort": "external_a", "fpr": [0, 1], "tpr": [0, 1], "auc": 0.5,
         "ci_low": None, "ci_high": None},
    ]
    fig = roc_figure(curves)
    names = [t.name for t in fig.data]
    assert names == ["chance", "training: AUC 0.90 (0.81-0.99)", "external_a: AUC 0.50"]
    assert list(fig.data[1].x) == [0, 0.2, 1] and list(fig.data[1].y) == [0, 0.8, 1]
    assert fig.layout.xaxis.title.text == "1 - specificity"
    assert fig.layout.yaxis.title.text == "sensitivity"


def test_km_figure_shows_the_test_results_and_numbers_at_risk() -> None:
    import pandas as pd
    from lifelines.datasets import load_g3

    from cmil_core.plots import km_figure
    from cmil_core.survival import kaplan_meier_table, survival_analysis

    g3 = load_g3()
    curves = kaplan_meier_table(g3, "time", "event", "group")
    result = survival_analysis(g3, "time", "event", group="group", at_risk_times=[0, 20, 40])
    fig = km_figure(curves, result, title="g3")
    title = fig.layout.title.text
    assert title.startswith("g3") and "log-rank p = 0.014" in title  # survdiff p = 0.0138
    assert "HR RIT vs Control" in title
    lines = [t for t in fig.data if t.mode == "lines"]
    assert {t.name for t in lines} == {"Control risk (n = 6)", "RIT risk (n = 11)"}
    note = fig.layout.annotations[0].text
    assert "Number at risk at 0  20  40 months" in note and "RIT: 11  11  9" in note
    assert isinstance(curves, pd.DataFrame)


def test_calibration_and_decision_figures_plot_what_they_are_given() -> None:
    import numpy as np

    from cmil_core.plots import calibration_figure, decision_figure
    from cmil_core.stats import brier_score, calibration_bins, calibration_smooth, decision_curve

    rng = np.random.default_rng(0)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(int)
    entry = {"cohort": "A", "n": 200, "brier": brier_score(y, p), "bins": calibration_bins(y, p, 5),
             "smooth": calibration_smooth(y, p), "decision": decision_curve(y, p)}
    cal = calibration_figure([entry])
    markers = [t for t in cal.data if t.mode == "markers"]
    assert markers[0].name == f"A (Brier {entry['brier']:.3f})"
    assert list(markers[0].y) == list(entry["bins"]["observed"])
    dec = decision_figure([entry])
    assert [t.name for t in dec.data] == ["A", "A: treat all"]
    assert list(dec.data[0].y) == list(entry["decision"]["net_benefit_model"])
