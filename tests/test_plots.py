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
