"""Words and numbers as a clinician reads them (cmil_core.analysis.display), and honest pictures
(flat attention, calibration bins, log ticks, wrapped titles): issue 18."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmil_core.analysis import display
from cmil_core.outputs import plots
from cmil_core.viewer import attention_view


@pytest.mark.parametrize(("raw", "shown"), [
    ("os_months", "OS (months)"), ("os_event", "Died"), ("inss_stage", "INSS stage"),
    ("mycn", "MYCN"), ("del_1p", "1p deletion"), ("bm_metastasis", "BM metastasis"),
    ("background_fraction", "Background share"), ("some_new_column", "Some new column"),
])
def test_column_names(raw: str, shown: str) -> None:
    assert display.column(raw) == shown


def test_parameter_and_metric_names() -> None:
    assert [display.parameter(p) for p in ("lr", "max_epochs", "embed_dim")] == [
        "Learning rate", "Maximum epochs", "Embedding size"]
    assert display.metric("cv_auc") == "Cross-validated AUC"


@pytest.mark.parametrize(("name", "raw", "shown"), [
    ("os_event", 1, "yes"), ("os_event", 0, "no"), ("os_event", None, "—"),
    ("bm_metastasis", float("nan"), "—"), ("kind", "openslide:generic-tiff", "scanned slide (TIFF)"),
    ("kind", "image:jpeg", "photograph (JPEG)"), ("os_months", 12.234, "12.2"),
    ("mycn", "amplified", "amplified"), ("patches_kept", 9525, "9,525"),
])
def test_values_in_words(name: str, raw: object, shown: str) -> None:
    assert display.value(name, raw) == shown


@pytest.mark.parametrize(("p", "shown"), [
    (0.0004, "< 0.001"), (0.001, "0.0010"), (0.0341, "0.034"), (0.0999, "0.10"),
    (0.37, "0.37"), (0.5, "0.50"), (0.996, "1.0"), (None, "—"),
])
def test_p_values_two_significant_digits(p: float | None, shown: str) -> None:
    assert display.p_cell(p) == shown


def test_one_format_per_quantity() -> None:
    assert display.p_value(0.0004) == "p < 0.001" and display.p_value(0.0341) == "p = 0.034"
    assert display.cutoff(0.47312) == display.cutoff(0.4731) == "0.473"  # always 3 decimals
    assert display.cutoff(0.5) == "0.500"
    assert display.count(10489) == "10,489"
    assert display.count_share(9525, 10489) == "9,525 of 10,489 (91%)"


def test_proportion_with_wilson_interval() -> None:
    # R: prop.test(18, 24, correct = FALSE)$conf.int (Wilson): 0.551006 0.880006
    assert display.proportion(18, 24) == "0.75 (0.55-0.88)"
    assert display.proportion_ci(0.8, None, None) == "0.80"


def test_clinical_rows_use_display_names() -> None:
    rows = display.clinical_rows({"os_months": 17.57, "os_event": 1, "inss_stage": "3",
                                  "del_1p": "no"})
    assert rows.to_dict("records") == [
        {"Variable": "OS (months)", "Value": "17.6"}, {"Variable": "Died", "Value": "yes"},
        {"Variable": "INSS stage", "Value": "3"}, {"Variable": "1p deletion", "Value": "no"}]


# --------------------------------------------------------------------------- pictures


def test_flat_attention_is_flagged() -> None:
    # The patient: attention 0.036-0.049 over 24 patches, nothing stands out.
    flat = np.linspace(0.036, 0.049, 24)
    info = attention_view.spread(flat / flat.sum(), "attention")
    assert info.flat and info.ratio is not None and info.ratio < attention_view.FLAT_RATIO
    # One patch with 5x the median attention stands out.
    peaked = np.r_[np.full(23, 1.0), 5.0]
    assert not attention_view.spread(peaked / peaked.sum(), "attention").flat
    assert attention_view.spread([0.40, 0.45, 0.47], "probability").flat
    assert not attention_view.spread([0.05, 0.45, 0.97], "probability").flat


def test_heat_scales_are_named() -> None:
    rank = attention_view.heat_scale("attention", "rank")
    assert "rank within this slide" in rank.title and rank.ticktext[0] == "lowest"
    absolute = attention_view.heat_scale("attention", "absolute")
    assert "even share" in absolute.title and "1× (even)" in absolute.ticktext
    assert attention_view.heat_scale("probability", "absolute").high == 1.0


def test_log_ticks_are_labelled_in_full_with_1() -> None:
    assert plots.log_ticks(0.75, 3.4) == [0.8, 1.0, 1.25, 1.5, 2.0, 3.0]
    ticks = plots.log_ticks(0.05, 40)
    assert 1.0 in ticks and len(ticks) <= 9
    fig = plots.forest_figure({"n": 50, "events": 20, "coefficients": [
        {"name": "a", "hr": 0.85, "ci": [0.78, 0.93], "p": 0.001},
        {"name": "b", "hr": 1.4, "ci": [0.9, 2.2], "p": 0.13}]}, title="t")
    assert list(fig.layout.xaxis.ticktext) == ["0.8", "1", "1.25", "1.5", "2"]


def _entry(cohort: str, n_per_bin: list[int]) -> dict:
    bins = pd.DataFrame({"bin": range(len(n_per_bin)), "n": n_per_bin,
                         "mean_predicted": np.linspace(0.1, 0.9, len(n_per_bin)),
                         "observed": np.linspace(0.1, 0.9, len(n_per_bin)),
                         "observed_low": 0.0, "observed_high": 1.0})
    # the kernel's support falls below MIN_SMOOTH_SUPPORT (10) above predicted 0.8
    smooth = pd.DataFrame({"predicted": np.linspace(0, 1, 11), "observed": np.linspace(0, 1, 11),
                           "support": [30.0] * 9 + [4.0, 2.0]})
    return {"cohort": cohort, "n": sum(n_per_bin), "brier": 0.2, "bins": bins, "smooth": smooth}


def test_calibration_only_where_bins_hold_enough_patients() -> None:
    entries = [_entry("big", [20] * 5), _entry("small", [5] * 5)]
    drawn, notes = plots.calibration_drawable(entries)
    assert [e["cohort"] for e in drawn] == ["big"]
    assert notes == ["small: 25 patients, 5 in its smallest bin (needs 10)"]
    fig = plots.calibration_figure(entries)
    names = [t.name for t in fig.data]
    assert not any("small" in (n or "") for n in names)
    smooth = next(t for t in fig.data if t.name == "big smoothed")
    assert min(smooth.x) >= 0.1 and max(smooth.x) <= 0.9  # not drawn beyond the bins
    drawn_y = dict(zip(np.round(smooth.x, 1), smooth.y))
    assert drawn_y[0.8] == pytest.approx(0.8)
    assert np.isnan(drawn_y[0.9])  # too few patients under the kernel: a gap, not a line


def test_long_titles_wrap() -> None:
    lines = plots.wrap_title("pooled validation: overall survival by cMIL risk group "
                             "(external_a + external_b)")
    assert len(lines) == 2 and all(len(line) <= 44 for line in lines)
