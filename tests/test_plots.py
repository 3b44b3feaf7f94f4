"""cmil_core.outputs.plots: figures carry the numbers they are given, and nothing else."""

from __future__ import annotations

import pandas as pd

from cmil_core.outputs.plots import roc_figure


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

    from cmil_core.analysis.survival import kaplan_meier_table, survival_analysis
    from cmil_core.outputs.plots import km_figure

    g3 = load_g3()
    curves = kaplan_meier_table(g3, "time", "event", "group")
    result = survival_analysis(g3, "time", "event", group="group", at_risk_times=[0, 20, 40])
    fig = km_figure(curves, result, title="g3")
    title = fig.layout.title.text
    assert title.startswith("g3") and "log-rank p = 0.014" in title  # survdiff p = 0.0138
    assert "HR RIT vs Control" in title
    lines = [t for t in fig.data if t.mode == "lines"]
    assert {t.name for t in lines} == {"Control risk (n = 6)", "RIT risk (n = 11)"}
    # The at-risk table: each group's counts sit at the x-axis ticks they belong to.
    rows = {t.name: t for t in fig.data if t.mode == "text"}
    assert list(rows["RIT at risk"].x) == [0, 20, 40] == list(fig.layout.xaxis2.tickvals)
    assert list(rows["RIT at risk"].text) == ["11", "11", "9"]
    assert rows["RIT at risk"].xaxis == "x2" and fig.layout.xaxis.matches == "x2"  # shared axis
    expected = {g["group"]: [str(n) for n in g["at_risk"]] for g in result["at_risk"]["groups"]}
    assert {name.removesuffix(" at risk"): list(t.text) for name, t in rows.items()} == expected
    assert isinstance(curves, pd.DataFrame)


def test_calibration_and_decision_figures_plot_what_they_are_given() -> None:
    import numpy as np

    from cmil_core.analysis.calibration import (
        brier_score,
        calibration_bins,
        calibration_smooth,
        decision_curve,
    )
    from cmil_core.outputs.plots import calibration_figure, decision_figure

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


def test_roc_band_is_drawn_and_colours_follow_the_store_order() -> None:
    from cmil_core.outputs.palette import COHORT_COLOURS

    band = {"specificity": [0.0, 0.5, 1.0], "se_low": [1.0, 0.6, 0.0], "se_high": [1.0, 0.9, 0.3]}
    curves = [{"cohort": "ext", "fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1], "auc": 0.7,
               "ci_low": 0.6, "ci_high": 0.8, "band": band}]
    fig = roc_figure(curves, cohorts=["train", "ext"])
    shaded = next(t for t in fig.data if t.name == "ext 95% CI band")
    # Upper edge along 1 - specificity, then the lower edge back.
    assert list(shaded.x) == [1.0, 0.5, 0.0, 0.0, 0.5, 1.0]
    assert list(shaded.y) == [1.0, 0.9, 0.3, 0.0, 0.6, 1.0]
    line = next(t for t in fig.data if t.name == "ext: AUC 0.70 (0.60-0.80)")
    # "ext" is the store's second cohort: it keeps the second colour even when drawn alone.
    assert line.line.color == COHORT_COLOURS[1] and shaded.fillcolor == COHORT_COLOURS[1]


def test_forest_figure_has_one_row_per_coefficient_with_its_hazard_ratio() -> None:
    from lifelines.datasets import load_rossi

    from cmil_core.analysis.cox import cox_analysis
    from cmil_core.outputs.plots import forest_figure

    result = cox_analysis(load_rossi(), "week", "arrest", ["fin", "age", "prio"])
    fig = forest_figure(result, title="rossi")
    (points,) = fig.data
    assert list(points.x) == [r["hr"] for r in result["coefficients"]]
    fin = next(r for r in result["coefficients"] if r["name"] == "fin")
    # R coxph on rossi, fin+age+prio (Efron): coef(fin) = -0.347, HR 0.71.
    assert f"fin  ·  HR {fin['hr']:.2f} ({fin['ci'][0]:.2f}-{fin['ci'][1]:.2f})" in points.y[0]
    assert fig.layout.xaxis.type == "log" and "n = 432, events = 114" in fig.layout.title.text


def test_qc_histogram_shows_shares_per_cohort() -> None:
    from cmil_core.outputs.plots import qc_histogram_figure

    hist = pd.DataFrame({"cohort": ["a", "a", "b"], "bin_low": [0.0, 1.0, 0.0],
                         "bin_high": [1.0, 2.0, 1.0], "kept": [3, 1, 2], "rejected": [0, 4, 0]})
    fig = qc_histogram_figure(hist, "blur_variance", cohorts=["a", "b"])
    traces = {t.name: t for t in fig.data}
    assert list(traces["a"].y) == [0.375, 0.625]  # 3 of 8 patches, 5 of 8
    # the rejected share of each bin, on its own axis: 0 of 3, 4 of 5
    assert list(traces["a: rejected"].y) == [0.0, 0.8]
    assert traces["a: rejected"].yaxis == "y2" and list(fig.layout.yaxis2.range) == [-0.03, 1.03]
    assert list(traces["b"].y) == [1.0]


def test_forest_figure_lists_a_separated_covariate_instead_of_drawing_it() -> None:
    from cmil_core.outputs.plots import forest_figure

    result = {"n": 16, "events": 10, "coefficients": [
        {"name": "cMIL high risk", "coef": 0.62, "se": 0.68, "hr": 1.85, "ci": [0.49, 7.05], "p": 0.37},
        {"name": "age > 18 months", "coef": 17.3, "se": 3469.0, "hr": 3.3e7, "ci": [0.0, None], "p": 0.996},
    ]}
    fig = forest_figure(result, title="t")
    assert list(fig.data[0].y) == ["cMIL high risk  ·  HR 1.85 (0.49-7.05), p = 0.37"]
    assert "age > 18 months" in fig.layout.annotations[-1].text


def test_km_figure_says_when_the_hazard_ratio_cannot_be_estimated() -> None:
    from lifelines.datasets import load_g3

    from cmil_core.analysis.survival import kaplan_meier_table, survival_analysis
    from cmil_core.outputs.plots import km_figure

    g3 = load_g3()
    curves = kaplan_meier_table(g3, "time", "event", "group")
    result = survival_analysis(g3, "time", "event", group="group")
    result["cox"] = {**result["cox"], "ci": [None, None]}  # as lifelines gives under separation
    title = km_figure(curves, result, title="g3").layout.title.text
    assert "HR RIT vs Control not estimable" in title


def test_the_heatmap_colour_bar_carries_the_images_colours_itself() -> None:
    """The bar's colours are explicit stops, inferno's black first: no page theme replaces them."""
    from cmil_core.outputs.plots import colour_bar_figure

    fig = colour_bar_figure("Attention rank within the slide", 0.0, 1.0, [0, 0.5, 1],
                            ["lowest", "median", "highest"])
    stops = [tuple(s) for s in fig.data[0].colorscale]
    assert stops[0] == (0.0, "#000004") and stops[-1] == (1.0, "#fcffa4")
    assert fig.data[0].colorbar.title.text == "Attention rank within the slide"


def test_the_smoothed_calibration_curve_is_not_drawn_where_a_few_patients_decide_it() -> None:
    """Scores crowded near 0 and one positive alone at 0.4 (external B's shape): the kernel
    curve jumps to 1 there; the figure leaves that stretch out instead of drawing a swing."""
    import numpy as np

    from cmil_core.analysis.calibration import (
        MIN_SMOOTH_SUPPORT,
        brier_score,
        calibration_bins,
        calibration_smooth,
    )
    from cmil_core.outputs.plots import calibration_figure

    rng = np.random.default_rng(4)
    p = np.r_[rng.uniform(0.0, 0.15, 70), 0.4, rng.uniform(0.8, 1.0, 25)]
    y = np.r_[rng.random(70) < 0.1, True, np.ones(25, bool)].astype(int)
    smooth = calibration_smooth(y, p, bandwidth=0.01)  # a narrow kernel, as on crowded scores
    near = smooth[(smooth["predicted"] - 0.4).abs() < 0.005]
    assert near["observed"].max() > 0.95 and near["support"].max() < 2  # one patient decides
    assert smooth["support"].max() > 10  # the crowd near 0
    entry = {"cohort": "external_b", "n": len(y), "brier": brier_score(y, p),
             "bins": calibration_bins(y, p, n_bins=5), "smooth": smooth}
    fig = calibration_figure([entry])
    curve = next(t for t in fig.data if t.name == "external_b smoothed")
    drawn = {round(x, 3): v for x, v in zip(curve.x, curve.y)}
    assert all(v is None or np.isnan(v) for x, v in drawn.items() if abs(x - 0.4) < 0.005)
    assert any(v is not None and not np.isnan(v) for v in drawn.values())
    assert MIN_SMOOTH_SUPPORT == 10
