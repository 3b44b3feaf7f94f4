"""Calibration intercept and slope (logistic recalibration) with Wald 95% CIs.

Reference values: tests/data/reference/r_stats.json, written by
``Rscript tests/r/reference_stats.R`` (R 4.2.2)::

    a <- read.csv("tests/data/asah.csv"); y <- a$outcome == "Poor"
    lp <- qlogis(plogis(0.6 * (a$wfns - 3)))
    confint.default(glm(y ~ lp, family = binomial))  # slope 1.392 (0.875, 1.909)
    confint.default(glm(y ~ 1, offset = lp, family = binomial))  # -0.388 (-0.812, 0.036)

Live checks against R's glm on five more data sets: tests/test_r_live.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmil_core.analysis.calibration import calibration_fit, format_calibration_fit
from cmil_core.errors import InputError

DATA = Path(__file__).parent / "data"
R = json.loads((DATA / "reference" / "r_stats.json").read_text())


def _asah() -> tuple[np.ndarray, np.ndarray]:
    a = pd.read_csv(DATA / "asah.csv")
    y = (a["outcome"] == "Poor").astype(int).to_numpy()
    p = 1.0 / (1.0 + np.exp(-0.6 * (a["wfns"].to_numpy(float) - 3.0)))
    return y, p


def test_asah_equals_r_glm() -> None:
    y, p = _asah()
    fit = calibration_fit(y, p)
    ref = R["calibration_asah"]
    assert fit["slope"] == pytest.approx(ref["slope"], abs=1e-8)
    assert fit["intercept"] == pytest.approx(ref["intercept"], abs=1e-8)
    # SEs and CIs to 1e-6: R's glm takes the SE from the weights of its second-to-last
    # iteration (a step of ~1e-7 before convergence); ours are at the converged estimate
    assert fit["slope_se"] == pytest.approx(ref["slope_se"], abs=1e-6)
    assert fit["intercept_se"] == pytest.approx(ref["intercept_se"], abs=1e-6)
    assert fit["slope_ci"] == pytest.approx(ref["slope_ci"], abs=1e-6)
    assert fit["intercept_ci"] == pytest.approx(ref["intercept_ci"], abs=1e-6)
    # to the printed digits
    assert format_calibration_fit(fit) == (
        "calibration intercept -0.39 [-0.81, 0.04] (ideal 0), "
        "slope 1.39 [0.87, 1.91] (ideal 1)")
    assert fit["n"] == 113 and fit["events"] == 41 and fit["note"] is None


def test_recalibrated_probabilities_are_perfectly_calibrated() -> None:
    # refitting on the model's own recalibrated log-odds gives intercept 0 and slope 1
    y, p = _asah()
    first = calibration_fit(y, p)
    lp = np.log(p / (1 - p))
    recalibrated = 1 / (1 + np.exp(-(first["slope"] * lp + (np.log(y.mean() / (1 - y.mean()))))))
    again = calibration_fit(y, recalibrated)
    assert again["slope"] == pytest.approx(1.0, abs=1e-8)
    # and shifting the log-odds by the intercept leaves nothing to correct
    shifted = 1 / (1 + np.exp(-(lp + first["intercept"])))
    assert calibration_fit(y, shifted)["intercept"] == pytest.approx(0.0, abs=1e-8)


def test_degenerate_inputs_are_decided() -> None:
    one_class = calibration_fit([0, 0, 0], [0.1, 0.2, 0.8])
    assert one_class["slope"] is None and one_class["intercept"] is None
    assert one_class["note"] == "a single outcome class: no calibration intercept or slope"
    separated = calibration_fit([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert separated["slope"] is None and separated["intercept"] == pytest.approx(0.0, abs=1e-12)
    assert "separate the outcomes" in separated["note"]
    assert format_calibration_fit(one_class).startswith("calibration: a single outcome class")
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        calibration_fit([0, 1], [0.0, 0.5])
    with pytest.raises(InputError, match="0/1"):
        calibration_fit([0, 2], [0.3, 0.5])
    with pytest.raises(InputError, match="same"):
        calibration_fit([0, 1, 1], [0.3, 0.5])
