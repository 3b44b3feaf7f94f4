"""Figure builders shared by the pages and the reports (plotly).

Every function takes plain data (already computed by the statistics of
:mod:`cmil_core.analysis` or by :mod:`cmil_core.outputs.evaluation`) and returns a
figure; none computes statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cmil_core.analysis import display
from cmil_core.analysis.calibration import MIN_SMOOTH_SUPPORT
from cmil_core.outputs.palette import CHANCE_GREY, COHORT_COLOURS, RISK_COLOURS, cohort_colour

__all__ = [
    "MIN_CALIBRATION_BIN", "calibration_drawable", "calibration_figure", "colour_bar_figure",
    "decision_figure", "forest_figure", "km_figure", "log_ticks", "qc_histogram_figure",
    "roc_figure", "wrap_title",
]

#: A cohort's calibration is drawn only when each of its score bins holds this many patients.
MIN_CALIBRATION_BIN = 10



def roc_figure(
    curves: Sequence[dict[str, Any]],
    *,
    cohorts: Sequence[str] | None = None,
    title: str = "ROC by cohort",
) -> go.Figure:
    """ROC curves overlaid, one per cohort, with "AUC 0.83 (0.74-0.91)" in the legend.

    ``curves``: dicts with ``cohort, fpr, tpr, auc, ci_low, ci_high`` (as
    :func:`cmil_core.outputs.evaluation.roc_curves` gives) and, optionally, ``band``
    (:func:`cmil_core.analysis.roc_bootstrap.roc_ci_band`: the bootstrap 95% CI of the
    sensitivity at each specificity), drawn shaded. ``cohorts``: the store's
    cohort order, which fixes each cohort's colour on every page.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line=dict(color=CHANCE_GREY, dash="dot"), hoverinfo="skip"))
    for k, c in enumerate(curves):
        colour = cohort_colour(c["cohort"], cohorts, k)
        band = c.get("band")
        if band:
            fpr = [1.0 - sp for sp in band["specificity"]]
            fig.add_trace(go.Scatter(
                x=fpr + fpr[::-1], y=list(band["se_high"]) + list(band["se_low"])[::-1],
                fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0),
                hoverinfo="skip", showlegend=False, name=f"{c['cohort']} 95% CI band",
            ))
        ci = ""
        if c.get("ci_low") is not None and c.get("ci_high") is not None:
            ci = f" ({c['ci_low']:.2f}-{c['ci_high']:.2f})"
        fig.add_trace(go.Scatter(
            x=c["fpr"], y=c["tpr"], mode="lines", line_shape="linear",
            name=f"{c.get('label', c['cohort'])}: AUC {c['auc']:.2f}{ci}",
            line=dict(color=colour, width=2.5),
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
    return display.p_value(p)


def km_figure(
    curves: pd.DataFrame,
    result: dict[str, Any],
    *,
    title: str,
    time_label: str = "months",
) -> go.Figure:
    """Kaplan-Meier step curves per group with log-log 95% bands, censor marks,
    log-rank p and hazard ratio in the title, and the number at risk under the axis.

    ``curves``: :func:`cmil_core.analysis.survival.kaplan_meier_table`; ``result``:
    :func:`cmil_core.analysis.survival.survival_analysis` of the same patients.
    """
    at_risk = result.get("at_risk") or {}
    risk_rows = at_risk.get("groups", [])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        row_heights=[0.78, 0.22])
    groups = list(dict.fromkeys(curves["group"]))
    colours = {}
    for k, group in enumerate(groups):
        part = curves[curves["group"] == group]
        colour = colours[str(group)] = RISK_COLOURS.get(
            str(group), COHORT_COLOURS[k % len(COHORT_COLOURS)])
        fig.add_trace(go.Scatter(
            x=list(part["time"]) + list(part["time"])[::-1],
            y=list(part["ci_high"]) + list(part["ci_low"])[::-1],
            fill="toself", fillcolor=colour, opacity=0.15, line=dict(width=0, shape="hv"),
            hoverinfo="skip", showlegend=False, name=f"{group} 95% CI",
        ), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=part["time"], y=part["survival"], mode="lines", line=dict(color=colour, shape="hv",
            width=2.5), name=f"{group} risk (n = {int(part['at_risk'].iloc[0])})",
            hovertemplate="%{x:.1f} " + time_label + ": %{y:.2f}<extra></extra>",
        ), row=1, col=1)
        censored = part[part["censored"] > 0]
        fig.add_trace(go.Scatter(
            x=censored["time"], y=censored["survival"], mode="markers",
            marker=dict(symbol="line-ns-open", size=9, color=colour), showlegend=False,
            hoverinfo="skip", name=f"{group} censored",
        ), row=1, col=1)
    # The number-at-risk table: one text row per group, each number placed at its
    # time on the shared x-axis, so it sits exactly under the tick it belongs to.
    times = list(at_risk.get("times", []))
    labels = []
    for g in risk_rows:
        label = f"{g['group']}"
        labels.append(label)
        fig.add_trace(go.Scatter(
            x=times, y=[label] * len(times), mode="text", text=[str(n) for n in g["at_risk"]],
            textfont=dict(color=colours.get(str(g["group"]), "#333333"), size=12),
            showlegend=False, hoverinfo="skip", name=f"{g['group']} at risk",
        ), row=2, col=1)
    logrank = result.get("logrank") or {}
    cox = result.get("cox") or {}
    extra = f"log-rank {_p_text(logrank.get('p'))}"
    if cox.get("hr") is not None:
        extra += f"; HR {cox['group']} vs {cox['reference']} " + (
            f"{cox['hr']:.2f} ({cox['ci'][0]:.2f}-{cox['ci'][1]:.2f})" if _estimable(cox)
            else "not estimable (too few events in a group)")
    lines = wrap_title(title)
    fig.update_layout(
        title=dict(text="<br>".join(lines) + f"<br><sup>{extra}</sup>"),
        height=500 + 22 * len(lines), template="plotly_white",
        margin=dict(l=10, r=10, t=50 + 22 * len(lines), b=10),
        legend=dict(x=0.02, y=0.3, bgcolor="rgba(255,255,255,0.8)"),
    )
    fig.update_yaxes(title="survival probability", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title="at risk", type="category", categoryorder="array",
                     categoryarray=labels[::-1], showgrid=False, row=2, col=1)
    # A little room left of 0 so the first column of at-risk numbers is not cut in half.
    end = max([float(curves["time"].max()) if len(curves) else 0.0, *times, 1.0])
    fig.update_xaxes(range=[-0.05 * end, 1.03 * end], row=1, col=1)
    fig.update_xaxes(title=time_label, tickvals=times or None, row=2, col=1)
    if times:
        fig.update_xaxes(tickvals=times, row=1, col=1)
    return fig


def wrap_title(title: str, width: int = 44) -> list[str]:
    """A figure title as lines of at most ``width`` characters (broken at spaces): a title
    wider than a half-width plot is cut off by plotly, never wrapped."""
    lines: list[str] = []
    for word in title.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def calibration_figure(
    entries: Sequence[dict[str, Any]], *, cohorts: Sequence[str] | None = None
) -> go.Figure:
    """Observed against predicted: quantile bins with Wilson CIs, and the smoothed curve,
    per cohort.

    Only cohorts whose every bin holds :data:`MIN_CALIBRATION_BIN` patients
    are drawn (:func:`calibration_drawable`; say which are left out), and the
    smoothed curve only over the range of scores the bins cover and where at
    least :data:`~cmil_core.analysis.calibration.MIN_SMOOTH_SUPPORT` patients'
    worth of kernel weight lie (a gap elsewhere): a kernel curve resting on one
    or two patients swings from 0 to 1 and reads as a broken model.
    """
    entries, _ = calibration_drawable(entries)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="ideal",
                             line=dict(color=CHANCE_GREY, dash="dot"), hoverinfo="skip"))
    for k, e in enumerate(entries):
        colour = cohort_colour(e["cohort"], cohorts, k)
        bins = e["bins"]
        fig.add_trace(go.Scatter(
            x=bins["mean_predicted"], y=bins["observed"], mode="markers",
            name=f"{e.get('label', e['cohort'])} (Brier {e['brier']:.3f})",
            marker=dict(color=colour, size=9),
            error_y=dict(type="data", symmetric=False,
                         array=bins["observed_high"] - bins["observed"],
                         arrayminus=bins["observed"] - bins["observed_low"]),
        ))
        smooth = e["smooth"]
        inside = ((smooth["predicted"] >= float(bins["mean_predicted"].min()))
                  & (smooth["predicted"] <= float(bins["mean_predicted"].max())))
        smooth = smooth[inside]
        supported = smooth["observed"].where(smooth["support"] >= MIN_SMOOTH_SUPPORT)
        fig.add_trace(go.Scatter(x=smooth["predicted"], y=supported, connectgaps=False,
                                 mode="lines", line=dict(color=colour), showlegend=False,
                                 hoverinfo="skip", name=f"{e['cohort']} smoothed"))
    fig.update_layout(title="Calibration", height=460, template="plotly_white",
                      legend=dict(orientation="h", y=-0.18, yanchor="top"),
                      xaxis=dict(title="predicted (cMIL score)", range=[0, 1]),
                      yaxis=dict(title="observed share with metastasis", range=[0, 1.02]),
                      margin=dict(l=10, r=10, t=50, b=90))
    return fig


def calibration_drawable(
    entries: Sequence[dict[str, Any]], min_bin: int = MIN_CALIBRATION_BIN,
) -> tuple[list[dict[str, Any]], list[str]]:
    """``(drawn, notes)``: the cohorts whose every calibration bin holds ``min_bin`` patients,
    and for each other one why it is not drawn."""
    drawn, notes = [], []
    for e in entries:
        bins = e["bins"]
        smallest = int(bins["n"].min()) if len(bins) else 0
        if len(bins) and smallest >= min_bin:
            drawn.append(e)
        else:
            notes.append(f"{e.get('label', e['cohort'])}: {display.count(e.get('n'))} patients, "
                         f"{smallest} in its smallest bin (needs {min_bin})")
    return drawn, notes


def decision_figure(
    entries: Sequence[dict[str, Any]], *, cohorts: Sequence[str] | None = None
) -> go.Figure:
    """Net benefit of the model per cohort, against treating all and treating none."""
    fig = go.Figure()
    for k, e in enumerate(entries):
        d = e["decision"]
        colour = cohort_colour(e["cohort"], cohorts, k)
        fig.add_trace(go.Scatter(x=d["threshold"], y=d["net_benefit_model"], mode="lines",
                                 name=e.get("label", e["cohort"]), line=dict(color=colour)))
        fig.add_trace(go.Scatter(x=d["threshold"], y=d["net_benefit_all"], mode="lines",
                                 name=f"{e['cohort']}: treat all",
                                 line=dict(color=colour, dash="dash", width=1)))
    fig.add_hline(y=0, line=dict(color="#808080", width=1), annotation_text="treat none")
    fig.update_layout(title="Decision curve", height=420, template="plotly_white",
                      xaxis=dict(title="threshold probability", range=[0, 1]),
                      yaxis=dict(title="net benefit", range=[-0.1, 0.6]),
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


def qc_histogram_figure(
    hist: pd.DataFrame, metric: str, *, cohorts: Sequence[str] | None = None
) -> go.Figure:
    """Distribution of one quality metric per cohort, and where its patches are rejected.

    ``hist``: :func:`cmil_core.store.qc_metric_histogram`. Top panel: the share
    of the cohort's patches in each bin (shares, not counts, so that cohorts of
    different sizes compare: a stain or scanner shift between centres shows as
    a shifted curve). Bottom panel: the share of each bin's patches that quality
    control rejected (by any rule), on its own 0-100 % axis, so that a few
    percent of rejected patches do not lie flat on the top panel's floor; a bin
    without patches is left blank.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.62, 0.38])
    order = list(dict.fromkeys(hist["cohort"]))
    if cohorts is not None:
        order = [c for c in cohorts if c in order] + [c for c in order if c not in cohorts]
    for k, cohort in enumerate(order):
        part = hist[hist["cohort"] == cohort]
        colour = cohort_colour(str(cohort), cohorts, k)
        in_bin = part["kept"] + part["rejected"]
        total = float(in_bin.sum()) or 1.0
        middle = (part["bin_low"] + part["bin_high"]) / 2
        fig.add_trace(go.Scatter(
            x=middle, y=in_bin / total, mode="lines", legendgroup=str(cohort),
            line=dict(color=colour, shape="hvh", width=2), name=str(cohort),
            hovertemplate="%{x:.3g}: %{y:.1%} of the patches<extra></extra>",
        ), row=1, col=1)
        rejected = (part["rejected"] / in_bin.where(in_bin > 0)).astype(float)
        fig.add_trace(go.Scatter(
            x=middle, y=rejected, mode="lines+markers", legendgroup=str(cohort),
            line=dict(color=colour, width=1.5), marker=dict(size=4), showlegend=False,
            name=f"{cohort}: rejected", connectgaps=False,
            hovertemplate="%{x:.3g}: %{y:.0%} of this bin rejected<extra></extra>",
        ), row=2, col=1)
    name = display.column(metric)
    fig.update_layout(title=f"{name} per cohort", height=420,
                      template="plotly_white", margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", y=-0.18))
    fig.update_yaxes(title_text="share of patches", tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="rejected", tickformat=".0%", range=[-0.03, 1.03], row=2, col=1)
    fig.update_xaxes(title_text=name, row=2, col=1)
    return fig


def _translucent(colour: str, alpha: float = 0.25) -> str:
    """``#rrggbb`` as an rgba() fill."""
    c = colour.lstrip("#")
    if len(c) != 6:
        return colour
    r, g, b = (int(c[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _estimable(row: dict[str, Any]) -> bool:
    """A hazard ratio with a finite, positive CI (not a separated covariate)."""
    ci = row.get("ci") or [None, None]
    values = [row.get("hr"), *ci]
    return all(v is not None and 0 < v < 1e6 for v in values)


def _hr_text(row: dict[str, Any]) -> str:
    if not _estimable(row):
        return "HR not estimable"
    ci = row["ci"]
    return f"HR {row['hr']:.2f} ({ci[0]:.2f}-{ci[1]:.2f}), {_p_text(row.get('p'))}"


def forest_figure(result: dict[str, Any], *, title: str) -> go.Figure:
    """Hazard ratios with 95% CIs on a log axis, one row per Cox coefficient.

    ``result``: :func:`cmil_core.analysis.cox.cox_analysis`; each row is labelled
    with its name and "HR 2.10 (1.30-3.40), p = 0.002". Coefficients without a
    finite CI (separation) are listed under the plot instead of drawn.
    """
    coefficients = result.get("coefficients", [])
    rows = [r for r in coefficients if _estimable(r)]
    dropped = [r["name"] for r in coefficients if not _estimable(r)]
    labels = [f"{r['name']}  ·  {_hr_text(r)}" for r in rows]
    ticks = log_ticks(min([r["ci"][0] for r in rows] or [1.0]),
                      max([r["ci"][1] for r in rows] or [1.0]))
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[r["hr"] for r in rows], y=labels, mode="markers", name="hazard ratio",
        marker=dict(symbol="square", size=11, color="#333333"),
        error_x=dict(type="data", symmetric=False,
                     array=[r["ci"][1] - r["hr"] for r in rows],
                     arrayminus=[r["hr"] - r["ci"][0] for r in rows], color="#333333"),
        showlegend=False, hovertemplate="%{y}<extra></extra>",
    ))
    fig.add_vline(x=1, line=dict(color="#808080", dash="dash", width=1))
    if dropped:
        # Usually separation: every event on one side of a binary covariate.
        fig.add_annotation(text="not estimable (no events on one side?): " + ", ".join(dropped),
                           xref="paper", yref="paper", x=0, y=-0.25, showarrow=False,
                           align="left", font=dict(size=11))
    fig.update_layout(
        title=dict(text=f"{title}<br><sup>n = {result.get('n')}, events = {result.get('events')}; "
                        f"Cox proportional hazards, Efron ties</sup>"),
        height=140 + 45 * len(rows), template="plotly_white", margin=dict(l=10, r=10, t=70, b=10),
        xaxis=dict(title="hazard ratio (log scale)", type="log", tickmode="array",
                   tickvals=ticks, ticktext=[f"{t:g}" for t in ticks]),
        yaxis=dict(autorange="reversed", automargin=True),
    )
    return fig


_LOG_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0,
              20.0, 50.0, 100.0)


def log_ticks(low: float, high: float, most: int = 9) -> list[float]:
    """Ticks of a log axis from ``low`` to ``high``: readable numbers, 1 always among them.

    Plotly's own log ticks label 0.8 and 0.9 as "8" and "9" (minor digits);
    these are labelled in full.
    """
    low, high = min(low, 1.0), max(high, 1.0)
    ticks = [t for t in _LOG_TICKS if low / 1.05 <= t <= high * 1.05]
    if len(ticks) > most:  # a wide range: the 1-2-5 series
        ticks = [t for t in ticks if f"{t:g}".strip("0.").lstrip("0") in ("1", "2", "5")]
    while len(ticks) > most:  # thin out, keeping 1
        ticks = [t for k, t in enumerate(ticks) if t == 1.0 or k % 2 == 0]
    return ticks or [1.0]


def colour_bar_figure(title: str, low: float, high: float, ticks: Sequence[float],
                      ticktext: Sequence[str], colorscale: str = "Inferno") -> go.Figure:
    """A horizontal colour bar alone, naming its scale: the legend of an image heatmap.

    The scale is passed as explicit colour stops (not its name), so that no theme
    of the page drawing it can swap the colours the image itself uses.
    """
    stops = plotly.colors.get_colorscale(colorscale)
    fig = go.Figure(go.Heatmap(
        z=[[low, high]], x=[low, high], y=[0], zmin=low, zmax=high, colorscale=stops,
        showscale=True, hoverinfo="skip", opacity=0,
        colorbar=dict(orientation="h", thickness=14, len=1.0, x=0.5, xanchor="center",
                      y=0.0, yanchor="bottom", tickvals=list(ticks), ticktext=list(ticktext),
                      title=dict(text=title, side="top")),
    ))
    fig.update_layout(height=95, margin=dict(l=10, r=10, t=5, b=5), template="plotly_white",
                      xaxis=dict(visible=False), yaxis=dict(visible=False),
                      plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)")
    return fig
