"""Widgets the pages share: download buttons, the endpoint and cutoff pickers, the
in-sample switch, and messages shown once after a rerun.

Imports :mod:`pages._text` and :mod:`pages._access` (downloads are pseudonymised
there) of the pages' shared code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from pages._access import AUDIT_PROBLEM, masked
from pages._text import md

__all__ = ["FLASH", "MIME", "cutoff_picker", "downloads", "flash", "in_sample_toggle",
           "show_flash"]


MIME = {"png": "image/png", "svg": "image/svg+xml", "csv": "text/csv"}


def downloads(stem: str, figure: Callable[[], Any] | None = None,
              table: pd.DataFrame | None = None) -> None:
    """A row of download buttons: the figure as PNG and SVG (drawn on click), the table as CSV.

    ``figure`` builds the publication version (:mod:`cmil_core.outputs.figures`,
    matplotlib); it runs only when the user clicks, so pages stay fast.
    """
    from cmil_core.outputs import figures

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "figure"
    row = st.container(horizontal=True, gap="small")
    if figure is not None:
        for fmt in figures.FORMATS:
            row.download_button(
                fmt.upper(), data=lambda fmt=fmt: figures.to_bytes(figure(), fmt),
                file_name=f"{safe}.{fmt}", mime=MIME[fmt], on_click="ignore",
                key=f"download-{safe}-{fmt}", icon=":material/download:",
                help=f"Download the figure as {fmt.upper()}",
            )
    if table is not None:
        table = masked(table)  # patient ids pseudonymised when the user asked for it
        row.download_button(
            "CSV", data=table.to_csv(index=False).encode(), file_name=f"{safe}.csv",
            mime=MIME["csv"], on_click="ignore", key=f"download-{safe}-csv",
            icon=":material/download:", help="Download the numbers as CSV",
        )


def cutoff_picker(key: str) -> tuple[str, str | float]:
    """Endpoint and risk-group cutoff chosen by the user: ``(endpoint, method or number)``."""
    from cmil_core.outputs.evaluation import CUTOFF_METHODS, ENDPOINTS

    left, right = st.columns(2)
    endpoint = left.radio("Endpoint", list(ENDPOINTS), horizontal=True,
                          format_func=lambda e: ENDPOINTS[e][2], key=f"{key}_endpoint")
    choices = [*CUTOFF_METHODS, "number"]
    method = right.selectbox("Risk-group cutoff, fixed on the training cohort", choices,
                             format_func=lambda m: CUTOFF_METHODS.get(m, "a number I choose"),
                             key=f"{key}_cutoff")
    if method == "number":
        return endpoint, float(right.number_input(
            "Cutoff (score)", min_value=0.0, max_value=1.0, value=0.5, step=0.01,
            key=f"{key}_cutoff_number"))
    return endpoint, method


def in_sample_toggle(key: str) -> bool:
    """The switch that puts the final model's in-sample scores in the training row (default off).

    Off, the training cohort's row, curves and cutoff choices use its
    out-of-fold scores (:func:`cmil_core.store.model_rules.read_model_scores`).
    """
    return bool(st.toggle(
        "Training cohort: in-sample scores (optimistic) instead of out-of-fold", value=False,
        key=f"{key}_in_sample",
        help="Out-of-fold: each training patient scored by the cross-validation model that did "
             "not see them, the honest estimate. In-sample: the final model, which was fitted on "
             "these patients."))


FLASH = "flash_message"


def flash(kind: str, text: str) -> None:
    """A message (``success``, ``info``, ``warning``, ``error``) shown once, after the next
    rerun."""
    st.session_state[FLASH] = (kind, text)


def show_flash() -> None:
    message = st.session_state.pop(FLASH, None)
    if message is not None:
        kind, text = message
        getattr(st, kind)(text)
    problem = st.session_state.pop(AUDIT_PROBLEM, None)
    if problem is not None:
        st.warning(f"Done, but {md(problem)}")
