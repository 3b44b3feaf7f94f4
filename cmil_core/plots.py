"""Figure builders shared by the pages and the reports (plotly).

Every function takes plain data (already computed by :mod:`cmil_core.stats`,
:mod:`cmil_core.evaluation` or :mod:`cmil_core.survival`) and returns a
figure; none computes statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

__all__ = ["COHORT_COLOURS", "roc_figure"]

# Calm, colour-blind-safe (Okabe-Ito) colours, training first.
COHORT_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")


def roc_figure(curves: Sequence[dict[str, Any]], *, title: str = "ROC by cohort") -> go.Figure:
    """ROC curves overlaid, one per cohort, with "AUC 0.83 (0.74-0.91)" in the legend.

    ``curves``: dicts with ``cohort, fpr, tpr, auc, ci_low, ci_high`` (as
    :func:`cmil_core.evaluation.roc_curves` gives).
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line=dict(color="#b0b0b0", dash="dot"), hoverinfo="skip"))
    for k, c in enumerate(curves):
        ci = ""
        if c.get("ci_low") is not None and c.get("ci_high") is not None:
            ci = f" ({c['ci_low']:.2f}-{c['ci_high']:.2f})"
        fig.add_trace(go.Scatter(
            x=c["fpr"], y=c["tpr"], mode="lines", line_shape="linear",
            name=f"{c['cohort']}: AUC {c['auc']:.2f}{ci}",
            line=dict(color=COHORT_COLOURS[k % len(COHORT_COLOURS)], width=2.5),
            hovertemplate="1 - specificity %{x:.2f}<br>sensitivity %{y:.2f}<extra></extra>",
        ))
    fig.update_layout(
        title=title, height=480, margin=dict(l=10, r=10, t=50, b=10),
        xaxis=dict(title="1 - specificity", range=[0, 1], constrain="domain"),
        yaxis=dict(title="sensitivity", range=[0, 1.01], scaleanchor="x", scaleratio=1),
        legend=dict(x=0.45, y=0.05, bgcolor="rgba(255,255,255,0.8)"),
        template="plotly_white",
    )
    return fig
