"""The pages' store: which one, read-only references, cached reads, the chosen model.

Reads are cached per store fingerprint, so a page reruns in milliseconds and
sees new results as soon as the store changes; while another process writes,
the last finished result is served and the page says so (:func:`stale_notice`).
The sidebar's model picker is here too: the model is chosen from the store.
Imports :mod:`pages._text` of the pages' shared code.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from pages._text import md

__all__ = [
    "STALE", "StoreUnavailable", "cached", "db_path", "fingerprint", "loaded_model",
    "model_marks", "query", "read", "require_model", "selected_model", "sidebar",
    "stale_marks", "stale_notice", "store_state", "using_default_store",
]

T = TypeVar("T")


def db_path() -> Path:
    """The store the app shows: ``$CMIL_DB``, else ``data/cmil.duckdb``."""
    return store_mod.default_db_path()


def using_default_store() -> bool:
    return not os.environ.get("CMIL_DB", "").strip()


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(db: str, model_id: str, stamp: tuple[int, int, int]) -> Any:
    """A model's encoder and aggregator, loaded once per store state (shared by sessions)."""
    from cmil_core.model.modeling import load_model

    return load_model(db, model_id)


class StoreUnavailable(Exception):
    """The store cannot be read now (busy, or not there yet)."""


def read(func: Callable[[store_mod.Store], T]) -> T:
    """Run ``func`` on a short-lived read-only reference to the store."""
    path = db_path()
    try:
        try:
            with store_mod.open_store(path, read_only=True, timeout=3.0) as store:
                return func(store)
        except store_mod.StoreOutdatedError:
            # A store of an older version of this program: upgrade it in place
            # once (forward migrations, one transaction each), then read.
            store_mod.open_store(path, timeout=3.0).close()
            with store_mod.open_store(path, read_only=True, timeout=3.0) as store:
                return func(store)
    except store_mod.StoreError as exc:
        raise StoreUnavailable(str(exc)) from exc


def fingerprint() -> tuple[int, int, int]:
    return store_mod.store_fingerprint(db_path())


@st.cache_data(show_spinner=False, max_entries=64)
def cached(
    name: str, _func: Callable[[store_mod.Store], Any], db: str, stamp: tuple[int, int, int]
) -> Any:
    """Cache ``_func``'s result per query name, store path and store fingerprint."""
    return read(_func)


@st.cache_resource
def _last_good() -> dict[tuple[str, str], tuple[float, Any]]:
    """The last result of each query, per store: served while another process writes."""
    return {}


STALE = "store_stale_since"


def query(name: str, func: Callable[[store_mod.Store], T]) -> T:
    """``func`` on the store, cached until the store changes.

    While another process holds the store for writing (a command-line job
    between two short transactions), the last finished result of the same
    query is served instead and the page says so (:func:`stale_notice`):
    readers keep working and see only finished results. With no earlier
    result, :class:`StoreUnavailable` propagates (the app shows its busy page).
    """
    db = str(db_path())
    try:
        value = cached(name, func, db, fingerprint())
    except StoreUnavailable:
        last = _last_good().get((db, name))
        if last is None:
            raise
        st.session_state[STALE] = last[0]
        return last[1]  # type: ignore[no-any-return]
    _last_good()[(db, name)] = (time.time(), value)
    return value  # type: ignore[no-any-return]


def stale_notice() -> None:
    """Say, once per run, that results come from before a write still in progress."""
    since = st.session_state.pop(STALE, None)
    if since is not None:
        st.info(
            "Another process is writing to the store right now (a command-line job): "
            "these are the results as they were at "
            f"{time.strftime('%H:%M:%S', time.localtime(since))}. "
            "The page shows the new ones once that write is finished.",
            icon=":material/history:",
        )


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


def require_model() -> str:
    """The chosen model's id; without one, say how to get one and stop the page.

    A model or scores built on an older QC decision, or scores made despite a
    tiling mismatch, are said at the top of the page (:func:`model_marks`).
    """
    model_id = selected_model()
    if model_id is None:
        st.info("No model yet: train one on the Models page "
                "(or `cmil train --db STORE --cohort TRAINING`), then score "
                "the cohorts with it.")
        st.stop()
    model_marks(model_id)
    return model_id


def stale_marks() -> dict[str, pd.DataFrame]:
    """Models and scores on an older QC decision, and scores despite a tiling mismatch."""
    from cmil_core.ingest import qc

    return query("qc_stale", qc.stale_marks)


def model_marks(model_id: str) -> None:
    """Warn, visibly, when this model or its scores are stale or carry a tiling mismatch."""
    from cmil_core.ingest import qc

    for note in qc.model_notes(stale_marks(), model_id):
        st.warning(md(note), icon=":material/history:")


def _when(created: object) -> str:
    """A model's training time as the picker shows it: ``3 Dec 14:52``."""
    moment = pd.Timestamp(created)
    return "?" if pd.isna(moment) else f"{moment.day} {moment:%b %H:%M}"


def sidebar() -> str | None:
    """Draw the shared sidebar; returns the chosen model id (None when there is none)."""
    with st.sidebar:
        st.caption("Results store")
        st.code(str(db_path()), language=None, wrap_lines=True)  # a long path wraps, never cut
        models = pd.DataFrame()
        if db_path().exists():
            try:
                models = query("models", store_mod.list_models)
            except StoreUnavailable:
                models = pd.DataFrame()
        if models.empty:
            st.selectbox("Model", ["No model trained yet"], disabled=True, key="model_picker_empty")
            st.caption("Train one with `cmil train --db ... --cohort ...`.")
            return None
        ids = models["model_id"].tolist()
        from cmil_core.viewer.patients import model_from_link

        index, notice = model_from_link(st.query_params.get("model"), ids)
        if notice:
            st.warning(md(notice))
        try:
            marks = stale_marks()["models"]
            stale = set(marks.loc[marks["stale"], "model_id"])
        except StoreUnavailable:
            stale = set()
        # The picker is as wide as the sidebar: a short label (the recipe and when it was
        # trained) that it never cuts; the whole of it, id first, wrapped under it.
        labels = {
            row.model_id: f"{row.model_id} · {row.aggregator} · {row.train_cohorts}"
            + (" · stale" if row.model_id in stale else "")
            for row in models.itertuples()
        }
        short = {
            row.model_id: f"{row.aggregator}, {_when(row.created_at)}"
            + (" · stale" if row.model_id in stale else "")
            for row in models.itertuples()
        }
        # The browser keeps a keyed widget's shown label while its value stands: a new key
        # when the stale marks change, so that " · stale" appears (and goes) at once.
        marked = ",".join(sorted(stale))
        key = "model_picker" + (f"_{hashlib.sha1(marked.encode()).hexdigest()[:8]}"
                                if marked else "")
        choice = st.selectbox("Model", ids, index=index, format_func=short.get, key=key)
        st.caption(md(labels.get(choice, choice)))
        st.query_params["model"] = choice
        return str(choice)
