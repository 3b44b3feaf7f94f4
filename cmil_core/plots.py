"""Figure builders shared by the pages and the reports (plotly).

Every function takes plain data (already computed by :mod:`cmil_core.stats`,
:mod:`cmil_core.evaluation` or :mod:`cmil_core.survival`) and returns a
figure; none computes statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from cmil_core.palette import COHORT_COLOURS, RISK_COLOURS

__all__ = [
    "COHORT_COLOURS", "RISK_COLOURS", "calibration_figure", "decision_figure", "km_figure",
    "roc_figure",
]



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


def _p_text(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def km_figure(
    curves: pd.DataFrame,
    result: dict[str, Any],
    *,
    title: str,
    time_label: str = "months",
) -> go.Figure:
    """Kaplan-Meier step curves per group with log-log 95% bands, censor marks,
    log-rank p and hazard ratio in the title, and the number at risk under the axis.

    ``curves``: :func:`cmil_core.survival.kaplan_meier_table`; ``result``:
    :func:`cmil_core.survival.survival_analysis` of the same patients.
    """
    fig = go.Figure()
    groups = list(dict.fromkeys(curves["group"]))
    for k, group in enumerate(groups):
        part = curves[curves["group"] == group]
        colour = RISK_COLOURS.get(str(group), COHORT_COLOURS[k % len(COHORT_COLOURS)])
        fig.add_trace(go.Scatter(
            x=list(part["time"]) + list(part["time"])[::-1],
            y=list(part["ci_high"]) + list(part["ci_low"])[::-1],
            fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0, shape="hv"),
            hoverinfo="skip", showlegend=False, name=f"{group} 95% CI",
        ))
        fig.add_trace(go.Scatter(
            x=part["time"], y=part["survival"], mode="lines", line=dict(color=colour, shape="hv",
            width=2.5), name=f"{group} risk (n = {int(part['at_risk'].iloc[0])})",
            hovertemplate="%{x:.1f} " + time_label + ": %{y:.2f}<extra></extra>",
        ))
        censored = part[part["censored"] > 0]
        fig.add_trace(go.Scatter(
            x=censored["time"], y=censored["survival"], mode="markers",
            marker=dict(symbol="line-ns-open", size=9, color=colour), showlegend=False,
            hoverinfo="skip", name=f"{group} censored",
        ))
    logrank = result.get("logrank") or {}
    cox = result.get("cox") or {}
    extra = f"log-rank {_p_text(logrank.get('p'))}"
    if cox.get("hr") is not None and cox.get("ci"):
        extra += f"; HR {cox['group']} vs {cox['reference']} {cox['hr']:.2f} ({cox['ci'][0]:.2f}-{cox['ci'][1]:.2f})"
    at_risk = result.get("at_risk") or {}
    rows = [
        f"{g['group']}: " + "  ".join(str(n) for n in g["at_risk"]) for g in at_risk.get("groups", [])
    ]
    times = "  ".join(f"{t:g}" for t in at_risk.get("times", []))
    fig.update_layout(
        title=dict(text=f"{title}<br><sup>{extra}</sup>"), height=460, template="plotly_white",
        margin=dict(l=10, r=10, t=70, b=110),
        xaxis=dict(title=time_label, rangemode="tozero"),
        yaxis=dict(title="survival probability", range=[0, 1.02]),
        legend=dict(x=0.02, y=0.05, bgcolor="rgba(255,255,255,0.8)"),
    )
    if rows:
        fig.add_annotation(
            text=f"Number at risk at {times} {time_label}<br>" + "<br>".join(rows),
            xref="paper", yref="paper", x=0, y=-0.28, showarrow=False, align="left",
            font=dict(size=11, family="monospace"),
        )
    return fig


def calibration_figure(entries: Sequence[dict[str, Any]]) -> go.Figure:
    """Observed against predicted: quantile bins with Wilson CIs, and the smoothed curve, per cohort."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="ideal",
                             line=dict(color="#b0b0b0", dash="dot"), hoverinfo="skip"))
    for k, e in enumerate(entries):
        colour = COHORT_COLOURS[k % len(COHORT_COLOURS)]
        bins = e["bins"]
        fig.add_trace(go.Scatter(
            x=bins["mean_predicted"], y=bins["observed"], mode="markers",
            name=f"{e['cohort']} (Brier {e['brier']:.3f})", marker=dict(color=colour, size=9),
            error_y=dict(type="data", symmetric=False,
                         array=bins["observed_high"] - bins["observed"],
                         arrayminus=bins["observed"] - bins["observed_low"]),
        ))
        fig.add_trace(go.Scatter(x=e["smooth"]["predicted"], y=e["smooth"]["observed"],
                                 mode="lines", line=dict(color=colour), showlegend=False,
                                 hoverinfo="skip", name=f"{e['cohort']} smoothed"))
    fig.update_layout(title="Calibration", height=420, template="plotly_white",
                      xaxis=dict(title="predicted (cMIL score)", range=[0, 1]),
                      yaxis=dict(title="observed share with metastasis", range=[0, 1.02]),
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


def decision_figure(entries: Sequence[dict[str, Any]]) -> go.Figure:
    """Net benefit of the model per cohort, against treating all and treating none."""
    fig = go.Figure()
    for k, e in enumerate(entries):
        d = e["decision"]
        fig.add_trace(go.Scatter(x=d["threshold"], y=d["net_benefit_model"], mode="lines",
                                 name=e["cohort"],
                                 line=dict(color=COHORT_COLOURS[k % len(COHORT_COLOURS)])))
        fig.add_trace(go.Scatter(x=d["threshold"], y=d["net_benefit_all"], mode="lines",
                                 name=f"{e['cohort']}: treat all", line=dict(
                                     color=COHORT_COLOURS[k % len(COHORT_COLOURS)], dash="dash",
                                     width=1)))
    fig.add_hline(y=0, line=dict(color="#808080", width=1), annotation_text="treat none")
    fig.update_layout(title="Decision curve", height=420, template="plotly_white",
                      xaxis=dict(title="threshold probability", range=[0, 1]),
                      yaxis=dict(title="net benefit", range=[-0.1, 0.6]),
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig
