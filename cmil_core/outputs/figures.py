"""Static figures for papers and reports (matplotlib), from the same inputs as :mod:`plots`.

The dashboard draws with plotly (:mod:`cmil_core.outputs.plots`); these functions
draw the same results as publication figures, for PNG and SVG downloads and
for the report (:mod:`cmil_core.outputs.report`). Each takes plain data already
computed by the statistics of :mod:`cmil_core.analysis` or by
:mod:`cmil_core.outputs.evaluation` and returns a :class:`matplotlib.figure.Figure`;
none computes statistics.

Figures are built on :class:`~matplotlib.figure.Figure` with an Agg canvas,
never through ``pyplot``, so nothing global is touched and figures can be
drawn from several threads (Streamlit) at once. Sizes are a paper's (one
column about 3.5 in, two columns about 7 in) and no text is smaller than
8 pt at that size. Colours come from :mod:`cmil_core.outputs.palette`: a cohort keeps
its colour in every figure, the risk groups are red (high) and blue (low).

>>> fig = forest({"coefficients": [{"name": "age", "hr": 2.0, "ci": [1.2, 3.3], "p": 0.01}],
...               "n": 40, "events": 12}, title="Cox model")
>>> to_bytes(fig, "png")[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from matplotlib.typing import LegendLocType

from cmil_core.analysis import display
from cmil_core.analysis.calibration import MIN_SMOOTH_SUPPORT
from cmil_core.errors import InputError
from cmil_core.outputs.palette import CHANCE_GREY, COHORT_COLOURS, RISK_COLOURS, cohort_colour

__all__ = [
    "FORMATS", "at_risk_texts", "auc_label", "calibration", "decision", "forest", "forest_texts",
    "hr_label", "km", "roc", "to_bytes",
]

FORMATS = ("png", "svg")
PNG_DPI = 200

# Font sizes in points, at the figure's own size (never below 8).
_TEXT = 9.0
_SMALL = 8.0
_TITLE = 10.0


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Axes) -> None:
    ax.tick_params(labelsize=_TEXT, direction="out", length=3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.xaxis.label.set_fontsize(_TEXT)
    ax.yaxis.label.set_fontsize(_TEXT)


def _title(ax: Axes, title: str, subtitle: str | None = None) -> None:
    if subtitle:
        ax.set_title(f"{title}\n{subtitle}", fontsize=_TITLE, loc="left")
    else:
        ax.set_title(title, fontsize=_TITLE, loc="left")


def _legend(ax: Axes, loc: LegendLocType, title: str | None = None) -> None:
    legend = ax.legend(loc=loc, fontsize=_SMALL, frameon=True, framealpha=0.85,
                       edgecolor="none", title=title, title_fontsize=_SMALL)
    legend.set_in_layout(True)


def _p_text(p: float | None) -> str:
    return display.p_value(p)


def auc_label(curve: dict[str, Any]) -> str:
    """The legend text of a ROC curve: "external_a: AUC 0.95 (0.90-0.99)" (as the dashboard's)."""
    ci = ""
    if curve.get("ci_low") is not None and curve.get("ci_high") is not None:
        ci = f" ({curve['ci_low']:.2f}-{curve['ci_high']:.2f})"
    return f"{curve.get('label', curve['cohort'])}: AUC {curve['auc']:.2f}{ci}"


def hr_label(row: dict[str, Any]) -> str:
    """"HR 2.10 (1.30-3.40), p = 0.002" for a Cox coefficient (or "HR not estimable")."""
    if row.get("hr") is None:
        return "HR not estimable"
    if not _has_ci(row):
        return f"HR {row['hr']:.3g} (CI not estimable), {_p_text(row.get('p'))}"
    low, high = row["ci"]
    return f"HR {row['hr']:.2f} ({low:.2f}-{high:.2f}), {_p_text(row.get('p'))}"


def _has_ci(row: dict[str, Any]) -> bool:
    """A hazard ratio with a finite, positive 95% CI (not the case under separation)."""
    ci = row.get("ci") or [None, None]
    values = [row.get("hr"), *ci]
    return all(v is not None and math.isfinite(v) and v > 0 for v in values)


# ----------------------------------------------------------------------------
# Discrimination
# ----------------------------------------------------------------------------


def roc(
    curves: Sequence[dict[str, Any]],
    *,
    cohorts: Sequence[str] | None = None,
    title: str = "ROC by cohort",
) -> Figure:
    """ROC curves per cohort on square axes, with the chance diagonal.

    ``curves``: dicts with ``cohort, fpr, tpr, auc, ci_low, ci_high`` (as
    :func:`cmil_core.outputs.evaluation.roc_curves` gives) and optionally ``band``,
    a :func:`cmil_core.analysis.roc_bootstrap.roc_ci_band` dict, drawn shaded as sensitivity
    against 1 - specificity. The legend reads "cohort: AUC 0.83 (0.74-0.91)".
    ``cohorts`` is the store's cohort order, which fixes each cohort's colour.
    """
    fig = _figure(4.6, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color=CHANCE_GREY, linewidth=1.0, zorder=1)
    banded = False
    for k, c in enumerate(curves):
        colour = cohort_colour(str(c["cohort"]), cohorts, index=k)
        band = c.get("band")
        if band:
            x = 1.0 - np.asarray(band["specificity"], dtype=float)
            ax.fill_between(x, band["se_low"], band["se_high"], color=colour, alpha=0.15,
                            linewidth=0, zorder=2)
            banded = True
        ax.plot(c["fpr"], c["tpr"], color=colour, linewidth=1.8, label=auc_label(c), zorder=3)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    _style(ax)
    _title(ax, title)
    if curves:
        _legend(ax, "lower right",
                "AUC (95% CI); shaded: 95% CI of sensitivity" if banded else "AUC (95% CI)")
    return fig


def calibration(entries: Sequence[dict[str, Any]], *, cohorts: Sequence[str] | None = None,
                title: str = "Calibration") -> Figure:
    """Observed against predicted per cohort: quantile bins with Wilson CIs and the smoothed curve.

    ``entries``: :func:`cmil_core.outputs.evaluation.calibration`. Legend: "cohort (Brier 0.123)".
    The curve is left out where it rests on under
    :data:`~cmil_core.analysis.calibration.MIN_SMOOTH_SUPPORT` patients.
    """
    fig = _figure(4.6, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color=CHANCE_GREY, linewidth=1.0)
    for k, e in enumerate(entries):
        colour = cohort_colour(str(e["cohort"]), cohorts, index=k)
        bins = pd.DataFrame(e["bins"])
        observed = bins["observed"].to_numpy(dtype=float)
        errors = np.vstack([observed - bins["observed_low"].to_numpy(dtype=float),
                            bins["observed_high"].to_numpy(dtype=float) - observed])
        ax.errorbar(bins["mean_predicted"], observed, yerr=np.clip(errors, 0, None), fmt="o",
                    color=colour, markersize=4.5, capsize=2.5, linewidth=1.0,
                    label=f"{e.get('label', e['cohort'])} (Brier {e['brier']:.3f})")
        smooth = pd.DataFrame(e["smooth"])
        if "support" in smooth:  # as on the page: a gap where a few patients decide the curve
            smooth = smooth.assign(observed=smooth["observed"].where(
                smooth["support"] >= MIN_SMOOTH_SUPPORT))
        ax.plot(smooth["predicted"], smooth["observed"], color=colour, linewidth=1.4)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.03)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted (cMIL score)")
    ax.set_ylabel("observed share with metastasis")
    _style(ax)
    _title(ax, title, "bins: Wilson 95% CI; lines: kernel-smoothed")
    if entries:
        _legend(ax, "upper left")
    return fig


def decision(entries: Sequence[dict[str, Any]], *, cohorts: Sequence[str] | None = None,
             title: str = "Decision curve") -> Figure:
    """Net benefit of acting on the score per cohort, against treating all (dashed) and none.

    ``entries``: :func:`cmil_core.outputs.evaluation.calibration` (its ``decision`` tables).
    """
    fig = _figure(5.2, 4.0)
    ax = fig.add_subplot()
    top = 0.05
    for k, e in enumerate(entries):
        colour = cohort_colour(str(e["cohort"]), cohorts, index=k)
        d = pd.DataFrame(e["decision"])
        ax.plot(d["threshold"], d["net_benefit_model"], color=colour, linewidth=1.6,
                label=str(e.get("label", e["cohort"])))
        ax.plot(d["threshold"], d["net_benefit_all"], color=colour, linewidth=0.9,
                linestyle="--", label=f"{e['cohort']}: treat all")
        top = max(top, float(d["net_benefit_model"].max()), float(d["net_benefit_all"].max()))
    ax.axhline(0.0, color="#808080", linewidth=0.9, label="treat none")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.1 * top - 0.02, top * 1.1 + 0.01)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    _style(ax)
    _title(ax, title)
    _legend(ax, "upper right")
    return fig


# ----------------------------------------------------------------------------
# Survival
# ----------------------------------------------------------------------------


def _group_colour(group: str, k: int) -> str:
    return RISK_COLOURS.get(group, COHORT_COLOURS[k % len(COHORT_COLOURS)])


def km(
    curves: pd.DataFrame,
    result: dict[str, Any],
    *,
    title: str,
    time_label: str = "months",
) -> Figure:
    """Kaplan-Meier step curves per group, number at risk under the plot.

    ``curves``: :func:`cmil_core.analysis.survival.kaplan_meier_table` (log-log 95%
    bands, drawn as shaded steps; censored times marked "+"); ``result``:
    :func:`cmil_core.analysis.survival.survival_analysis` of the same patients, whose
    log-rank p and hazard ratio are written on the plot and whose
    ``at_risk`` table is drawn under it. The table is a second axes sharing
    the x axis (as lifelines' ``add_at_risk_counts``): its columns sit at the
    x ticks, which are the at-risk times.
    """
    at_risk = result.get("at_risk") or {"times": [], "groups": []}
    groups = list(dict.fromkeys(str(g) for g in curves["group"]))
    table_rows = list(at_risk.get("groups", []))
    fig = _figure(6.4, 4.3 + 0.22 * len(table_rows))
    grid = fig.add_gridspec(2, 1, height_ratios=[4.0, 0.45 + 0.3 * max(len(table_rows), 1)])
    ax = fig.add_subplot(grid[0])
    colours = {g: _group_colour(g, k) for k, g in enumerate(groups)}
    for group in groups:
        part = curves[curves["group"].astype(str) == group]
        time = part["time"].to_numpy(dtype=float)
        colour = colours[group]
        ax.fill_between(time, part["ci_low"].to_numpy(dtype=float),
                        part["ci_high"].to_numpy(dtype=float), step="post", color=colour,
                        alpha=0.15, linewidth=0)
        n = int(part["at_risk"].iloc[0]) if len(part) else 0
        name = f"{group} risk" if group in RISK_COLOURS else group
        ax.step(time, part["survival"].to_numpy(dtype=float), where="post", color=colour,
                linewidth=1.8, label=f"{name} (n = {n})")
        censored = part[part["censored"] > 0]
        ax.plot(censored["time"], censored["survival"], linestyle="none", marker="+",
                markersize=7, markeredgewidth=1.2, color=colour)
    times = [float(t) for t in at_risk.get("times", [])]
    right = max([float(curves["time"].max()) if len(curves) else 1.0, *times, 1e-9])
    ax.set_xlim(0, right * 1.03)
    ax.set_ylim(0, 1.03)
    if times:
        ax.xaxis.set_major_locator(FixedLocator(times))
    ax.set_ylabel("survival probability")
    ax.set_xlabel(time_label)
    _style(ax)
    _title(ax, title)
    # Legend and statistics in the right margin: nothing covers the curves.
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=_SMALL,
                       frameon=False, borderaxespad=0.0, title="95% CI shaded; + censored",
                       title_fontsize=_SMALL)
    legend.set_in_layout(True)
    legend.get_title().set_horizontalalignment("left")
    logrank = result.get("logrank") or {}
    lines = [f"log-rank {_p_text(logrank.get('p'))}"]
    cox = result.get("cox") or {}
    if cox:
        lines.append(f"{cox.get('group')} vs {cox.get('reference')}:\n{hr_label(cox)}")
    ax.text(1.02, 0.0, "\n".join(lines), transform=ax.transAxes, fontsize=_TEXT,
            ha="left", va="bottom", gid="km-stats")

    table = fig.add_subplot(grid[1], sharex=ax)
    table.set_ylim(len(table_rows) - 0.5, -0.5)
    table.set_yticks(range(len(table_rows)))
    table.set_yticklabels([str(g["group"]) for g in table_rows])
    for k, (row, label) in enumerate(zip(table_rows, table.get_yticklabels(), strict=True)):
        colour = colours.get(str(row["group"]), _group_colour(str(row["group"]), k))
        label.set_color(colour)
        for t, n in zip(times, row["at_risk"], strict=True):
            table.text(t, k, str(n), ha="center", va="center", fontsize=_TEXT, color=colour,
                       gid="at-risk")
    table.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    table.tick_params(axis="y", length=0, labelsize=_TEXT, pad=14)
    for spine in table.spines.values():
        spine.set_visible(False)
    table.set_title("Number at risk", fontsize=_TEXT, loc="left")
    table.yaxis.set_minor_locator(NullLocator())
    return fig


def at_risk_texts(fig: Figure) -> list[tuple[float, float, str]]:
    """The at-risk numbers of a :func:`km` figure as (x in data units, row, text)."""
    table = fig.axes[1]
    return [(float(t.get_position()[0]), float(t.get_position()[1]), t.get_text())
            for t in table.texts if t.get_gid() == "at-risk"]


def forest(cox_result: dict[str, Any], *, title: str = "Cox proportional-hazards model",
           labels: dict[str, str] | None = None) -> Figure:
    """Hazard ratios with 95% CIs on a log axis, a line at 1, and per row a text such as
    "HR 2.10 (1.30-3.40), p = 0.002".

    ``cox_result``: :func:`cmil_core.analysis.cox.cox_analysis` (``coefficients``
    [{name, hr, ci, p}], ``n``, ``events``, ``references``). Rows keep the
    model's order, top to bottom; ``labels`` renames covariates for display.
    """
    rows = list(cox_result.get("coefficients", []))
    labels = labels or {}
    fig = _figure(6.4, 1.3 + 0.42 * max(len(rows), 1))
    ax = fig.add_subplot()
    values = [1.0]
    for k, row in enumerate(rows):
        if _has_ci(row):
            low, high = row["ci"]
            ax.plot([low, high], [k, k], color="#333333", linewidth=1.4, solid_capstyle="butt")
            ax.plot([row["hr"]], [k], marker="s", markersize=6, color="#0072B2", linestyle="none")
            values += [float(row["hr"]), float(low), float(high)]
        ax.annotate(hr_label(row), xy=(1.0, k), xycoords=("axes fraction", "data"),
                    xytext=(8, 0), textcoords="offset points", ha="left", va="center",
                    fontsize=_TEXT, gid="hr-text", annotation_clip=False)
    ax.axvline(1.0, color="#808080", linewidth=0.9, linestyle="--")
    ax.set_xscale("log")
    low, high = min(values), max(values)
    ax.set_xlim(low / 1.35, high * 1.35)
    lo, hi = low / 1.35, high * 1.35
    steps = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
    shown = [t for t in steps if lo <= t <= hi]
    if len(shown) > 7:  # a wide range: powers of ten only
        shown = [t for t in (0.001, 0.01, 0.1, 1, 10, 100, 1000) if lo <= t <= hi]
    if len(shown) < 3:  # a narrow range: four round ticks spread over it
        shown = sorted({float(f"{t:.2g}") for t in np.geomspace(low / 1.2, high * 1.2, 4)})
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([labels.get(str(r["name"]), str(r["name"])) for r in rows])
    ax.set_xlabel("hazard ratio (95% CI, log scale)")
    _style(ax)
    subtitle = f"n = {cox_result.get('n', '?')} patients, {cox_result.get('events', '?')} events"
    refs = cox_result.get("references") or {}
    if refs:
        subtitle += "; reference: " + ", ".join(f"{k} = {v}" for k, v in refs.items())
    _title(ax, title, subtitle)
    return fig


def forest_texts(fig: Figure) -> list[str]:
    """The per-row HR texts of a :func:`forest` figure, top to bottom."""
    return [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "hr-text"]


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def to_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure as PNG (200 dpi) or SVG (text kept as text, ``svg.fonttype: none``).

    The figure keeps its size: a 4.6 in wide figure is 920 px wide in PNG.
    SVG output carries no date, so the same figure gives the same bytes.
    """
    if fmt not in FORMATS:
        raise InputError(f"figure format {fmt!r} is not one of {', '.join(FORMATS)}")
    buffer = io.BytesIO()
    if fmt == "png":
        fig.savefig(buffer, format="png", dpi=PNG_DPI, metadata={"Software": None})
    else:
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cmil"}):
            fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()
