"""cmil_core.model.recalibration: the final model's scores on the out-of-fold scale, prior shift."""

from __future__ import annotations

import numpy as np
import pytest

from cmil_core.analysis.cutoffs import metrics_at_cutoff
from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.model.recalibration import ScoreMap, fit_score_map, prevalence_shift


def _overfit(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, honest (out-of-fold-like) scores, and sharper in-sample scores of the same patients."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    signal = 1.2 * y + rng.normal(0, 1, n)
    oof = 1 / (1 + np.exp(-(signal - 0.6)))
    in_sample = 1 / (1 + np.exp(-(3.0 * signal + 0.4 * rng.normal(0, 1, n) - 1.0)))
    return y, oof, in_sample


def test_quantile_map_puts_in_sample_scores_on_the_out_of_fold_distribution() -> None:
    y, oof, in_sample = _overfit()
    g = fit_score_map(in_sample, oof)
    mapped = g.apply(in_sample)
    assert g.method == "quantile-oof" and g.n == len(y)
    # On the training patients the mapped scores have the out-of-fold scores' distribution ...
    np.testing.assert_allclose(np.sort(mapped), np.sort(oof), atol=1e-4)
    # ... so a cutoff calls as many of them positive on both scales.
    for cutoff in (0.3, 0.45, 0.6):
        assert (mapped >= cutoff).sum() == (oof >= cutoff).sum()
    # Strictly increasing: the final model's ranking and AUC are kept, also outside the range.
    grid = np.linspace(0.0005, 0.9995, 2001)
    assert np.all(np.diff(g.apply(grid)) > 0)
    assert roc_auc(y, mapped) == pytest.approx(roc_auc(y, in_sample))
    # The map travels in a model's config.
    again = ScoreMap.from_dict(g.to_dict())
    np.testing.assert_array_equal(again.apply(grid), g.apply(grid))


def test_cutoff_on_out_of_fold_scores_keeps_its_operating_point_on_mapped_scores() -> None:
    """Where the final model ranks the patients as the fold models did, Se/Sp agree exactly."""
    y, oof, _ = _overfit(seed=3)
    in_sample = oof ** 0.3  # the same ranking, another scale (sharper, shifted)
    g = fit_score_map(in_sample, oof)
    cutoff = 0.42
    honest = metrics_at_cutoff(y, oof, cutoff)
    final = metrics_at_cutoff(y, g.apply(in_sample), cutoff)
    unmapped = metrics_at_cutoff(y, in_sample, cutoff)
    assert (final.sensitivity, final.specificity) == pytest.approx(
        (honest.sensitivity, honest.specificity))
    assert unmapped.specificity < honest.specificity - 0.2  # the unmapped scale moves the cutoff


def test_platt_map_is_the_identity_on_one_scale_and_refuses_a_reversed_order() -> None:
    s = np.array([0.02, 0.1, 0.3, 0.6, 0.9, 0.98])
    g = fit_score_map(s, s, method="platt-oof")
    assert (g.a, g.b) == pytest.approx((0.0, 1.0), abs=1e-6)
    reversed_ = fit_score_map(s, s[::-1], method="platt-oof")
    assert reversed_.method == "identity" and "not positive" in reversed_.note
    assert fit_score_map([0.5, 0.5, 0.5], [0.1, 0.5, 0.9]).method == "identity"
    assert ScoreMap.from_dict(None).apply([0.3]).tolist() == [0.3]
    with pytest.raises(InputError, match="not one of"):
        fit_score_map(s, s, method="isotonic")


def test_prevalence_shift_is_bayes_prior_correction() -> None:
    # A class-balanced model's 0.5 means "the training prevalence"; odds scale by the prior ratio.
    p = np.array([0.5, 0.8, 0.1, 0.0, 1.0, np.nan])
    out = prevalence_shift(p, 0.2)
    assert out[0] == pytest.approx(0.2)
    odds = 0.8 / 0.2 * (0.2 / 0.8)
    assert out[1] == pytest.approx(odds / (1 + odds))
    assert out[3] == 0.0 and out[4] == 1.0 and np.isnan(out[5])
    assert prevalence_shift([0.3], 0.5).tolist() == pytest.approx([0.3])  # balanced: unchanged
    with pytest.raises(InputError):
        prevalence_shift([0.3], 0.0)
