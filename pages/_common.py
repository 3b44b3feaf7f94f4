"""What every page shares: the store in use, cached reads, the sidebar, jobs.

Pages stay thin: they call these helpers and ``cmil_core``, and draw.
Reads are cached per store fingerprint, so a page reruns in milliseconds and
sees new results as soon as the store changes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.jobs import Job, JobRunner

T = TypeVar("T")

DEMO_JOB = "demo"


def db_path() -> Path:
    """The store the app shows: ``$CMIL_DB``, else ``data/cmil.duckdb``."""
    return store_mod.default_db_path()


def using_default_store() -> bool:
    return not os.environ.get("CMIL_DB", "").strip()


@st.cache_resource
def job_runner() -> JobRunner:
    """One runner per server process: jobs outlive pages and browser refreshes."""
    return JobRunner()


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(db: str, model_id: str, stamp: tuple[int, int, int]) -> Any:
    """A model's encoder and aggregator, loaded once per store state (shared by sessions)."""
    from cmil_core.modeling import load_model

    return load_model(db, model_id)


class StoreUnavailable(Exception):
    """The store cannot be read now (busy, or not there yet)."""


def read(func: Callable[[store_mod.Store], T]) -> T:
    """Run ``func`` on a short-lived read-only reference to the store."""
    path = db_path()
    try:
        with store_mod.open_store(path, read_only=True, timeout=3.0) as st_:
            return func(st_)
    except store_mod.StoreError as exc:
        raise StoreUnavailable(str(exc)) from exc


def fingerprint() -> tuple[int, int, int]:
    return store_mod.store_fingerprint(db_path())


@st.cache_data(show_spinner=False, max_entries=64)
def cached(name: str, _func: Callable[[store_mod.Store], Any], db: str, stamp: tuple[int, int, int]) -> Any:
    """Cache ``_func``'s result per query name, store path and store fingerprint."""
    return read(_func)


def query(name: str, func: Callable[[store_mod.Store], T]) -> T:
    return cached(name, func, str(db_path()), fingerprint())  # type: ignore[no-any-return]


def store_state() -> str:
    """``missing``, ``empty`` (no cohorts), ``ready`` or ``busy``."""
    if not db_path().exists():
        return "missing"
    try:
        cohorts = query("cohorts", store_mod.list_cohorts)
    except StoreUnavailable as exc:
        st.session_state["store_problem"] = str(exc)
        return "busy"
    return "ready" if cohorts else "empty"


def selected_model() -> str | None:
    """The model chosen in the sidebar (None when the store has none)."""
    value = st.session_state.get("model_id")
    return None if value is None else str(value)


def sidebar() -> str | None:
    """Draw the shared sidebar; returns the chosen model id (None when there is none)."""
    with st.sidebar:
        st.caption("Results store")
        st.code(str(db_path()), language=None)
        models = pd.DataFrame()
        if db_path().exists():
            try:
                models = query("models", store_mod.list_models)
            except StoreUnavailable:
                models = pd.DataFrame()
        if models.empty:
            st.selectbox("Model", ["No model trained yet"], disabled=True, key="model_picker_empty")
            st.caption("Train one with `python -m cmil_core train --db ... --cohort ...`.")
            return None
        ids = models["model_id"].tolist()
        wanted = st.query_params.get("model")
        index = ids.index(wanted) if wanted in ids else 0
        labels = {
            row.model_id: f"{row.model_id} · {row.aggregator} · {row.train_cohorts}"
            for row in models.itertuples()
        }
        choice = st.selectbox("Model", ids, index=index, format_func=labels.get, key="model_picker")
        st.query_params["model"] = choice
        return str(choice)


MIME = {"png": "image/png", "svg": "image/svg+xml", "csv": "text/csv"}


def downloads(stem: str, figure: Callable[[], Any] | None = None,
              table: pd.DataFrame | None = None) -> None:
    """A row of download buttons: the figure as PNG and SVG (drawn on click), the table as CSV.

    ``figure`` builds the publication version (:mod:`cmil_core.figures`,
    matplotlib); it runs only when the user clicks, so pages stay fast.
    """
    from cmil_core import figures

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "figure"
    cols = st.columns([1, 1, 1, 5] if figure is not None else [1, 7], gap="small")
    k = 0
    if figure is not None:
        for fmt in figures.FORMATS:
            cols[k].download_button(
                fmt.upper(), data=lambda fmt=fmt: figures.to_bytes(figure(), fmt),
                file_name=f"{safe}.{fmt}", mime=MIME[fmt], on_click="ignore",
                key=f"download-{safe}-{fmt}", icon=":material/download:",
            )
            k += 1
    if table is not None:
        cols[k].download_button(
            "CSV", data=table.to_csv(index=False).encode(), file_name=f"{safe}.csv",
            mime=MIME["csv"], on_click="ignore", key=f"download-{safe}-csv",
            icon=":material/download:",
        )


def cutoff_picker(key: str) -> tuple[str, str | float]:
    """Endpoint and risk-group cutoff chosen by the user: ``(endpoint, method or number)``."""
    from cmil_core.evaluation import CUTOFF_METHODS, ENDPOINTS

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


def md(value: object) -> str:
    """A user string (file, cohort, patient, path, error) made safe for markdown: shown as typed."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", str(value))


FLASH = "flash_message"


def flash(kind: str, text: str) -> None:
    """A message (``success``, ``info``, ``warning``, ``error``) shown once, after the next rerun."""
    st.session_state[FLASH] = (kind, text)


def show_flash() -> None:
    message = st.session_state.pop(FLASH, None)
    if message is not None:
        kind, text = message
        getattr(st, kind)(text)


def show_jobs(
    jobs: list[Job], label: Callable[[Job], str], finished: Callable[[Job], None], seen_key: str
) -> bool:
    """Each job's state: a live progress bar, its failure, or ``finished(job)``.

    Returns True when a job has ended since this session last looked (the
    caller reruns the page so that it shows what the job produced).
    """
    seen: dict[str, object] = st.session_state.setdefault(seen_key, {})
    ended = False
    for job in jobs:
        before = seen.get(job.name)
        seen[job.name] = "running" if job.running else job.finished_at
        ended = ended or (before == "running" and not job.running)
        if job.running:
            event = job.progress
            st.progress(0.0 if event is None else event.overall,
                        text=f"{label(job)}: " + ("starting…" if event is None else md(event.describe())))
            for line in job.finished_stages:
                st.caption(f"✓ {md(line)}")
        elif job.state == "failed":
            st.error(f"{label(job)} failed: {md(job.error)}")
        else:
            finished(job)
    return ended
