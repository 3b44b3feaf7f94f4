"""Publication figures (matplotlib): what they show equals the results they are given."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_g3, load_rossi
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from cmil_core.analysis import calibration, cox, display, roc, roc_bootstrap, survival
from cmil_core.errors import InputError
from cmil_core.outputs import figures
from cmil_core.outputs.palette import RISK_COLOURS, cohort_colour

ASAH = Path(__file__).resolve().parent / "data" / "reference" / "asah.csv"
COHORTS = ["training", "external_a", "ext <b>&"]


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    return pd.read_csv(ASAH)


def _curve(cohort: str, y: np.ndarray, s: np.ndarray, band: bool = True) -> dict:
    """What cmil_core.outputs.evaluation.roc_curves gives per cohort (plus the band)."""
    c = roc.roc_curve(y, s)
    ci = roc.delong_ci(y, s)
    out = {"cohort": cohort, "fpr": c.fpr.tolist(), "tpr": c.tpr.tolist(),
           "auc": roc.roc_auc(y, s), "ci_low": ci.low, "ci_high": ci.high}
    if band:
        out["band"] = roc_bootstrap.roc_ci_band(y, s, n_boot=300)
    return out


@pytest.fixture(scope="module")
def roc_curves(asah: pd.DataFrame) -> list[dict]:
    # aSAH as three "cohorts": one score each (pROC: s100b AUC 0.7314, ndka 0.6119, wfns 0.8237)
    y = (asah["outcome"] == "Poor").to_numpy()
    return [_curve(name, y, asah[col].to_numpy(float), band=(col != "wfns"))
            for name, col in zip(COHORTS, ["s100b", "ndka", "wfns"], strict=True)]


@pytest.fixture(scope="module")
def g3_km() -> tuple[pd.DataFrame, dict]:
    g3 = load_g3()
    return (survival.kaplan_meier_table(g3, "time", "event", "group"),
            survival.survival_analysis(g3, "time", "event", group="group"))


@pytest.fixture(scope="module")
def rossi_cox() -> dict:
    return cox.cox_analysis(load_rossi(), "week", "arrest", ["fin", "age", "prio", "race"])


def _calibration_entries(asah: pd.DataFrame) -> list[dict]:
    y = (asah["outcome"] == "Poor").to_numpy()
    p = asah["s100b"].to_numpy(float).clip(0, 1)
    entries = []
    for name, rows in (("training", slice(0, 60)), ("external_a", slice(60, None))):
        entries.append({"cohort": name, "n": len(y[rows]),
                        "brier": calibration.brier_score(y[rows], p[rows]),
                        "bins": calibration.calibration_bins(y[rows], p[rows], n_bins=5),
                        "smooth": calibration.calibration_smooth(y[rows], p[rows]),
                        "decision": calibration.decision_curve(y[rows], p[rows])})
    return entries


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_roc_legend_lines_band_and_colours(roc_curves: list[dict]) -> None:
    fig = figures.roc(roc_curves, cohorts=COHORTS)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "training: AUC 0.73 (0.63-0.83)"  # pROC ci.auc(s100b): 0.6301-0.8326
    assert legend == [
        f"{c['cohort']}: AUC {c['auc']:.2f} ({c['ci_low']:.2f}-{c['ci_high']:.2f})"
        for c in roc_curves
    ]
    assert "shaded" in ax.get_legend().get_title().get_text()
    lines = [line for line in ax.get_lines() if line.get_label() in legend]
    for line, c in zip(lines, roc_curves, strict=True):
        np.testing.assert_allclose(line.get_xdata(), c["fpr"])
        np.testing.assert_allclose(line.get_ydata(), c["tpr"])
        assert mcolors.to_hex(line.get_color()) == cohort_colour(c["cohort"], COHORTS).lower()
    bands = [p for p in ax.collections if isinstance(p, PolyCollection)]
    assert len(bands) == 2  # wfns was given without a band
    # The band spans 1 - specificity from 0 to 1 between se_low and se_high.
    vertices = bands[0].get_paths()[0].vertices
    band = roc_curves[0]["band"]
    assert vertices[:, 0].min() == pytest.approx(0.0) and vertices[:, 0].max() == pytest.approx(1.0)
    assert vertices[:, 1].min() == pytest.approx(min(band["se_low"]))
    assert vertices[:, 1].max() == pytest.approx(max(band["se_high"]))
    diagonal = ax.get_lines()[0]
    assert list(diagonal.get_xdata()) == [0, 1] == list(diagonal.get_ydata())
    assert ax.get_aspect() == 1.0  # square


def test_km_at_risk_table_equals_result_and_sits_at_the_ticks(g3_km) -> None:
    curves, result = g3_km
    fig = figures.km(curves, result, title="g3 by group")
    fig.canvas.draw()
    ax, table = fig.axes
    times = result["at_risk"]["times"]
    assert list(ax.get_xticks()) == times  # columns of the table = x ticks
    cells = figures.at_risk_texts(fig)
    expected = [(t, float(k), str(n)) for k, g in enumerate(result["at_risk"]["groups"])
                for t, n in zip(times, g["at_risk"], strict=True)]
    assert sorted(cells) == sorted(expected)
    assert [c[2] for c in cells if c[1] == 0] == ["6", "4", "2", "0"]  # Control: 6 at 0, 4 at 20...
    # aligned on the page, not only in data units: same display x as the tick marks
    tick_x = {t: ax.transData.transform((t, 0))[0] for t in times}
    for text in table.texts:
        if text.get_gid() == "at-risk":
            x = table.transData.transform(text.get_position())[0]
            assert x == pytest.approx(tick_x[text.get_position()[0]], abs=0.01)
    assert [t.get_text() for t in table.get_yticklabels()] == ["Control", "RIT"]


def test_km_curves_censor_marks_and_statistics(g3_km) -> None:
    curves, result = g3_km
    fig = figures.km(curves, result, title="g3 by group")
    ax = fig.axes[0]
    steps = {line.get_label(): line for line in ax.get_lines() if "(n = " in line.get_label()}
    assert list(steps) == ["Control (n = 6)", "RIT (n = 11)"]
    control = curves[curves["group"] == "Control"]
    np.testing.assert_allclose(steps["Control (n = 6)"].get_ydata(), control["survival"])
    assert steps["Control (n = 6)"].get_drawstyle() == "steps-post"
    marks = [line for line in ax.get_lines() if line.get_marker() == "+"]
    assert sum(len(m.get_xdata()) for m in marks) == int((curves["censored"] > 0).sum())
    stats_text = next(t.get_text() for t in ax.texts if t.get_gid() == "km-stats")
    # survdiff(Surv(time, event) ~ group, g3): chisq 6.06, p = 0.0138
    assert stats_text.startswith(f"log-rank p = {result['logrank']['p']:.3f}")
    assert "0.014" in stats_text
    cox = result["cox"]
    assert f"{cox['hr']:.2f} ({cox['ci'][0]:.2f}-{cox['ci'][1]:.2f})" in stats_text
    bands = [p for p in ax.collections if isinstance(p, PolyCollection)]
    assert len(bands) == 2


def test_km_risk_groups_take_the_risk_colours() -> None:
    frame = pd.DataFrame({"t": [1, 2, 3, 4, 5, 6, 7, 8], "e": [1, 1, 0, 1, 0, 1, 0, 0],
                          "risk": ["high"] * 4 + ["low"] * 4})
    fig = figures.km(survival.kaplan_meier_table(frame, "t", "e", "risk"),
                     survival.survival_analysis(frame, "t", "e", group="risk"), title="risk")
    steps = [line for line in fig.axes[0].get_lines() if "risk (n = 4)" in line.get_label()]
    assert [mcolors.to_hex(s.get_color()) for s in steps] == [
        RISK_COLOURS["high"].lower(), RISK_COLOURS["low"].lower()]


def test_forest_rows_equal_the_coefficients(rossi_cox: dict) -> None:
    fig = figures.forest(rossi_cox, title="Rossi")
    ax = fig.axes[0]
    names = [c["name"] for c in rossi_cox["coefficients"]]
    assert [t.get_text() for t in ax.get_yticklabels()] == names == ["fin", "age", "prio", "race"]
    # coxph(Surv(week, arrest) ~ fin + age + prio + race, rossi): exp(coef) age 0.934, p = 0.0014
    texts = figures.forest_texts(fig)
    assert texts[1] == "HR 0.93 (0.90-0.97), p = 0.0013"  # two significant digits
    assert texts[2] == "HR 1.11 (1.05-1.17), p < 0.001"
    for text, c in zip(texts, rossi_cox["coefficients"], strict=True):
        p = display.p_value(c["p"])
        assert text == f"HR {c['hr']:.2f} ({c['ci'][0]:.2f}-{c['ci'][1]:.2f}), {p}"
    assert ax.get_xscale() == "log"
    markers = [line for line in ax.get_lines() if line.get_marker() == "s"]
    hrs = [c["hr"] for c in rossi_cox["coefficients"]]
    assert [float(m.get_xdata()[0]) for m in markers] == hrs
    assert [float(m.get_ydata()[0]) for m in markers] == [0.0, 1.0, 2.0, 3.0]  # top to bottom
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.get_lines())  # the line at 1
    assert "n = 432 patients, 114 events" in ax.get_title(loc="left")


def test_forest_shows_a_non_estimable_interval_as_text() -> None:
    result = {"n": 16, "events": 10, "coefficients": [
        {"name": "cMIL high risk", "hr": 1.47, "ci": [0.31, 6.97], "p": 0.626},
        {"name": "age > 18 months", "hr": 3.0e7, "ci": [0.0, None], "p": 0.996},
        {"name": "MYCN amplified", "hr": None, "ci": None, "p": None}]}
    fig = figures.forest(result, title="separation")
    assert figures.forest_texts(fig) == [
        "HR 1.47 (0.31-6.97), p = 0.63", "HR 3e+07 (CI not estimable), p = 1.0",
        "HR not estimable"]
    low, high = fig.axes[0].get_xlim()
    assert low < 0.31 and 6.97 < high < 100  # the separated row does not stretch the axis


def test_calibration_and_decision_legends(asah: pd.DataFrame) -> None:
    entries = _calibration_entries(asah)
    cal = figures.calibration(entries, cohorts=COHORTS)
    legend = [t.get_text() for t in cal.axes[0].get_legend().get_texts()]
    assert legend == [f"{e['cohort']} (Brier {e['brier']:.3f})" for e in entries]
    dec = figures.decision(entries, cohorts=COHORTS)
    legend = [t.get_text() for t in dec.axes[0].get_legend().get_texts()]
    assert legend == ["training", "training: treat all", "external_a", "external_a: treat all",
                      "treat none"]
    model_line = dec.axes[0].get_lines()[0]
    np.testing.assert_allclose(model_line.get_ydata(), entries[0]["decision"]["net_benefit_model"])


def test_every_text_is_at_least_8_points(roc_curves, g3_km, rossi_cox, asah) -> None:
    entries = _calibration_entries(asah)
    for fig in (figures.roc(roc_curves), figures.km(*g3_km, title="g3"),
                figures.forest(rossi_cox), figures.calibration(entries),
                figures.decision(entries)):
        fig.canvas.draw()
        sizes = {t.get_text(): t.get_fontsize() for t in _texts(fig)}
        assert sizes and min(sizes.values()) >= 8, sizes
        width, height = fig.get_size_inches()
        assert 3.4 <= width <= 7.2 and height <= 9  # one or two paper columns


def test_png_export_has_the_figure_size_at_200_dpi(rossi_cox: dict) -> None:
    fig = figures.forest(rossi_cox)
    data = figures.to_bytes(fig, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = fig.get_size_inches()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size == (round(width * 200), round(height * 200))


def test_svg_export_keeps_text_as_text(roc_curves: list[dict]) -> None:
    data = figures.to_bytes(figures.roc(roc_curves, cohorts=COHORTS), "svg")
    root = ET.fromstring(data)  # well-formed XML, the cohort name "ext <b>&" escaped
    assert root.tag.endswith("svg")
    texts = ["".join(t.itertext()) for t in root.iter() if t.tag.endswith("}text")]
    expected = f"ext <b>&: AUC {roc_curves[2]['auc']:.2f} ({roc_curves[2]['ci_low']:.2f}-" \
               f"{roc_curves[2]['ci_high']:.2f})"
    assert expected in texts
    assert "training: AUC 0.73 (0.63-0.83)" in texts
    assert figures.to_bytes(figures.roc(roc_curves, cohorts=COHORTS), "svg") == data  # no date


def test_unknown_format_is_refused(rossi_cox: dict) -> None:
    with pytest.raises(InputError, match="'pdf' is not one of png, svg"):
        figures.to_bytes(figures.forest(rossi_cox), "pdf")
