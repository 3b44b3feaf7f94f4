"""What every page shares: the store in use, cached reads, the sidebar, jobs.

Pages stay thin: they call these helpers and ``cmil_core``, and draw.
Reads are cached per store fingerprint, so a page reruns in milliseconds and
sees new results as soon as the store changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from cmil_core import access, launch
from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.jobs import Job, JobRunner, shared_runner
from cmil_core.logs import job_log_path

T = TypeVar("T")

DEMO_JOB = launch.DEMO_JOB  # the demo build, started here or by run.sh (cmil_core.launch)


def db_path() -> Path:
    """The store the app shows: ``$CMIL_DB``, else ``data/cmil.duckdb``."""
    return store_mod.default_db_path()


def using_default_store() -> bool:
    return not os.environ.get("CMIL_DB", "").strip()


@st.cache_resource
def job_runner() -> JobRunner:
    """One runner per server process: jobs outlive pages and browser refreshes.

    The process-wide runner, which the server's start-up (run.sh: the demo
    build of a first launch, :mod:`cmil_core.launch`) uses too; a job still
    running there (the demo build) shows on the pages. Clearing Streamlit's
    resource cache forgets the jobs that have ended.
    """
    runner = shared_runner()
    runner.forget_finished()
    # The jobs' log (a failed job's traceback): <data folder>/logs/cmil.log.
    runner.log_to(job_log_path(db_path()))
    return runner


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
        try:
            with store_mod.open_store(path, read_only=True, timeout=3.0) as st_:
                return func(st_)
        except store_mod.StoreOutdatedError:
            # A store of an older version of this program: upgrade it in place
            # once (forward migrations, one transaction each), then read.
            store_mod.open_store(path, timeout=3.0).close()
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
            f"these are the results as they were at {time.strftime('%H:%M:%S', time.localtime(since))}. "
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
                "(or `python -m cmil_core train --db STORE --cohort TRAINING`), then score "
                "the cohorts with it.")
        st.stop()
    model_marks(model_id)
    return model_id


def stale_marks() -> dict[str, pd.DataFrame]:
    """Models and scores on an older QC decision, and scores despite a tiling mismatch."""
    from cmil_core import qc

    return query("qc_stale", qc.stale_marks)


def model_marks(model_id: str) -> None:
    """Warn, visibly, when this model or its scores are stale or carry a tiling mismatch."""
    from cmil_core import qc

    for note in qc.model_notes(stale_marks(), model_id):
        st.warning(md(note), icon=":material/history:")


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
            st.caption("Train one with `python -m cmil_core train --db ... --cohort ...`.")
            return None
        ids = models["model_id"].tolist()
        from cmil_core.patients import model_from_link

        index, notice = model_from_link(st.query_params.get("model"), ids)
        if notice:
            st.warning(md(notice))
        try:
            marks = stale_marks()["models"]
            stale = set(marks.loc[marks["stale"], "model_id"])
        except StoreUnavailable:
            stale = set()
        labels = {
            row.model_id: f"{row.model_id} · {row.aggregator} · {row.train_cohorts}"
            + (" · stale" if row.model_id in stale else "")
            for row in models.itertuples()
        }
        # The browser keeps a keyed widget's shown label while its value stands: a new key
        # when the stale marks change, so that " · stale" appears (and goes) at once.
        marked = ",".join(sorted(stale))
        key = "model_picker" + (f"_{hashlib.sha1(marked.encode()).hexdigest()[:8]}"
                                if marked else "")
        choice = st.selectbox("Model", ids, index=index, format_func=labels.get, key=key)
        # The picker cuts a long label: the whole of it, wrapped, under it.
        st.caption(md(labels.get(choice, choice)))
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


def in_sample_toggle(key: str) -> bool:
    """The switch that puts the final model's in-sample scores in the training row (default off).

    Off, the training cohort's row, curves and cutoff choices use its
    out-of-fold scores (:func:`cmil_core.evaluation.scores_frame`).
    """
    return bool(st.toggle(
        "Training cohort: in-sample scores (optimistic) instead of out-of-fold", value=False,
        key=f"{key}_in_sample",
        help="Out-of-fold: each training patient scored by the cross-validation model that did "
             "not see them, the honest estimate. In-sample: the final model, which was fitted on "
             "these patients."))


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
    problem = st.session_state.pop(AUDIT_PROBLEM, None)
    if problem is not None:
        st.warning(f"Done, but {md(problem)}")


def show_job_log(job: Job) -> None:
    """For editors, where a failed job's traceback is: the log file's path."""
    if job.details is None or job.log_path is None or not can_edit():
        return
    st.caption(f"Details (the traceback) are in the log file `{job.log_path}`.")


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
            show_job_log(job)
        else:
            finished(job)
    return ended


# ---------------------------------------------------------------------------
# Access: sign-in, roles, audit, pseudonymised downloads
# ---------------------------------------------------------------------------
# The rules live in cmil_core.access; this is the page-side glue. Sign-in is
# Streamlit's own (st.login, OpenID Connect), switched on by an [auth] section
# in .streamlit/secrets.toml; roles come from its [cmil.roles] section. Without
# [auth] the dashboard is one local user with editor rights, as before.
# Every handler that changes the study calls require_editor() itself: the
# disabled buttons are a courtesy, not the protection.

AUDIT_PROBLEM = "audit_problem"
PSEUDONYMISE_KEY = "pseudonymise_exports"
_NO_SECRETS = "no-secrets-found"
_VERBS = {
    "import": "import cohorts", "delete-cohort": "delete cohorts", "ingest": "ingest slides",
    "train": "train models", "score": "score cohorts", "delete-model": "delete models",
    "demo": "build the demo study", "qc-decision": "decide quality control",
}


class AccessConfigError(Exception):
    """secrets.toml exists but cannot be used: sign-in fails closed (nobody gets in)."""


@dataclass(frozen=True)
class User:
    """Who is looking: ``who`` is what the audit trail records (the e-mail, or ``local``)."""

    who: str
    role: str | None  # "editor", "viewer", or None: no access
    signed_in: bool
    name: str | None = None
    verified: bool = True


def _secrets() -> Mapping[str, Any] | None:
    """``st.secrets``, or None when there is no secrets file; a broken one raises."""
    try:
        st.secrets.keys()  # parses the file(s)
    except FileNotFoundError as exc:  # StreamlitSecretNotFoundError
        if getattr(exc, "error_id", None) == _NO_SECRETS:
            return None
        raise AccessConfigError(f"secrets.toml cannot be read: {exc}") from exc
    return st.secrets


def _section(*keys: str) -> Mapping[str, Any]:
    """A section of secrets.toml as a plain mapping ({} when absent)."""
    node: Any = _secrets() or {}
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return {}
        node = node[key]
    if not isinstance(node, Mapping):
        raise AccessConfigError(f"[{'.'.join(keys)}] in secrets.toml must be a table")
    return node


def sign_in_configured() -> bool:
    """Whether secrets.toml has an ``[auth]`` section (then everyone must sign in)."""
    secrets = _secrets()
    return secrets is not None and "auth" in secrets


def current_user() -> User:
    """The user of this session, with their role (raises AccessConfigError on bad config)."""
    if not sign_in_configured():
        return User(who=access.LOCAL_USER, role=access.EDITOR, signed_in=False)
    info = st.user.to_dict()
    if not info.get("is_logged_in"):
        return User(who="", role=None, signed_in=False)
    email = access.identity_email(info)
    try:
        roles = access.RoleConfig.from_mapping(_section("cmil", "roles"))
    except ValueError as exc:
        raise AccessConfigError(str(exc)) from exc
    name = info.get("name")
    return User(who=email or str(info.get("email") or info.get("sub") or "unknown"),
                role=access.role_of(email, roles), signed_in=True,
                name=name if isinstance(name, str) else None, verified=email is not None)


def can_edit() -> bool:
    """Whether this session may import, ingest, train, score and delete."""
    try:
        return access.can_edit(current_user().role)
    except AccessConfigError:
        return False


def require_editor(action: str, *, cohort: str | None = None, model_id: str | None = None) -> bool:
    """The server-side check of a write: True for an editor; else says why, audits the refusal."""
    try:
        user = current_user()
    except AccessConfigError as exc:
        st.error(f"Refused: {md(exc)}")
        return False
    if access.can_edit(user.role):
        return True
    st.error(f"Refused: only editors may {_VERBS.get(action, action)}. You are signed in as "
             f"{md(user.who or 'nobody')} ({user.role or 'no role'}). {ask_whom()}")
    if action in store_mod.AUDIT_ACTIONS:
        access.record(db_path(), user.who or "anonymous", action, cohort=cohort,
                      model_id=model_id, details={"outcome": "denied", "role": user.role})
    return False


def ask_whom() -> str:
    """Whom to ask for a role: ``[cmil] contact`` in secrets.toml, else the dashboard's admin."""
    try:
        contact = _section("cmil").get("contact")
    except AccessConfigError:
        contact = None
    who = (md(contact) if isinstance(contact, str) and contact.strip()
           else "the person who runs this dashboard")
    return f"Ask {who} to add your address to the editors in its secrets.toml."


def viewer_notice() -> bool:
    """On a page with write controls: tell a viewer why they are disabled. True for editors."""
    if can_edit():
        return True
    st.info("You are a **viewer**: you see every cohort and model here, but the controls that "
            "change the study are disabled. " + ask_whom(), icon=":material/visibility:")
    return False


def audit(action: str, *, cohort: str | None = None, model_id: str | None = None,
          details: Mapping[str, Any] | None = None) -> None:
    """Record a finished action of this user; a failure to record is shown after the next rerun."""
    try:
        who = current_user().who or "anonymous"
    except AccessConfigError:
        who = "unknown"
    problem = access.record(db_path(), who, action, cohort=cohort, model_id=model_id,
                            details={**(details or {}), "via": "dashboard"})
    if problem is not None:
        st.session_state[AUDIT_PROBLEM] = problem


def audited_job(func: Callable[..., T], action: str,
                rows: Callable[[T], Any]) -> Callable[..., T]:
    """``func`` for the job runner, recording its audit rows (as this user) when it finishes."""
    who = current_user().who or "anonymous"

    def with_via(result: T) -> list[access.AuditRow]:
        return [(c, m, {**(d or {}), "via": "dashboard"}) for c, m, d in rows(result)]

    return access.audited(func, str(db_path()), who, action, with_via)


# --- pseudonymised downloads -------------------------------------------------

def pseudonymise_forced() -> bool:
    """``[cmil] pseudonymise_viewers = true``: a viewer's downloads are always pseudonymised."""
    try:
        forced = bool(_section("cmil").get("pseudonymise_viewers", False))
        return forced and current_user().role == access.VIEWER
    except AccessConfigError:
        return True


def pseudonymise_on() -> bool:
    return pseudonymise_forced() or bool(st.session_state.get(PSEUDONYMISE_KEY, False))


def pseudonymiser(on: bool | None = None) -> access.Pseudonymiser | None:
    """The pseudonymiser of this session's exports, or None when ids are shown as they are.

    ``on``: None follows the sidebar switch (and ``pseudonymise_viewers``).
    The salt: ``[cmil] pseudonym_salt`` in secrets.toml, else ``$CMIL_PSEUDONYM_SALT``,
    else a random one per export (see :func:`cmil_core.access.make_pseudonymiser`).
    Raises :class:`~cmil_core.errors.InputError` for a configured salt that is too short.
    """
    if not (pseudonymise_on() if on is None else on or pseudonymise_forced()):
        return None
    salt = _section("cmil").get("pseudonym_salt")
    return access.make_pseudonymiser(str(salt) if salt is not None else None)


def masked(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its patient id columns pseudonymised when that is on."""
    try:
        masker = pseudonymiser()
    except InputError as exc:  # a configured salt that is too short: never leak, refuse
        st.error(md(exc))
        return table.drop(columns=[c for c in ("patient_id", "Patient") if c in table.columns])
    if masker is None:
        return table
    return masker.frame(table, columns=("patient_id", "Patient"))


def sidebar_access() -> None:
    """The sidebar's user line, sign-out button and the pseudonymise switch."""
    with st.sidebar:
        user = current_user()
        if user.signed_in:
            st.caption(f"Signed in as {md(user.who)} · {user.role or 'no role'}")
            st.button("Sign out", on_click=st.logout, key="sign_out", icon=":material/logout:")
        text = ("CSV downloads and reports replace each patient id by a salted hash "
                "(HMAC-SHA256); the pages still show the ids.")
        if pseudonymise_forced():
            st.toggle("Pseudonymise patient ids in exports", value=True, disabled=True,
                      key="pseudonymise_forced", help=text + " Always on for viewers here.")
        else:
            st.toggle("Pseudonymise patient ids in exports", key=PSEUDONYMISE_KEY, help=text)


# --- pages shown instead of the study ------------------------------------------

def _login(provider: str) -> None:
    from streamlit.errors import StreamlitAuthError

    try:
        st.login(provider)
    except StreamlitAuthError as exc:
        st.session_state["login_problem"] = str(exc)


def auth_providers() -> list[str]:
    """The OpenID Connect providers of ``[auth]``: ``default`` and/or named sub-sections."""
    auth = _section("auth")
    named = [k for k, v in auth.items() if isinstance(v, Mapping)]
    return (["default"] if "client_id" in auth else []) + named


def sign_in_page() -> None:
    st.title("Sign in")
    st.write("This cMIL dashboard holds patient data: sign in with your institution's account "
             "to see it.")
    problem = st.session_state.pop("login_problem", None)
    if problem:
        st.error(f"Sign-in is misconfigured: {md(problem)}")
    providers = auth_providers()
    if not providers:
        st.error("Sign-in is switched on ([auth] in secrets.toml) but no identity provider is "
                 "configured there (client_id, client_secret, server_metadata_url).")
    for provider in providers:
        label = "Sign in" if provider == "default" else f"Sign in with {provider}"
        st.button(label, type="primary", on_click=_login, args=(provider,),
                  key=f"login_{provider}", icon=":material/login:")


def no_access_page() -> None:
    user = current_user()
    st.title("No access yet")
    if not user.verified:
        st.write(f"You are signed in as {md(user.who)}, but your identity provider did not "
                 "give a verified e-mail address, so no role can be given to you.")
    else:
        st.write(f"You are signed in as **{md(user.who)}**, but this address is neither an "
                 "editor nor a viewer of this dashboard.")
    st.write(ask_whom().replace("editors", "editors or viewers"))
    st.button("Sign out", on_click=st.logout, key="sign_out_denied")


def access_gate() -> bool:
    """Draw the sign-in, no-access or misconfigured page in place of the study; True if drawn."""
    page: Any
    try:
        user = current_user()
    except AccessConfigError as exc:
        problem = str(exc)

        def access_misconfigured() -> None:
            st.title("Access is misconfigured")
            st.error(md(problem))
            st.write("Nobody can sign in until the dashboard's secrets.toml is fixed.")

        page = st.Page(access_misconfigured, title="Access misconfigured", icon="⛔")
    else:
        if user.role is not None:
            return False
        page = (st.Page(no_access_page, title="No access", icon="⛔") if user.signed_in
                else st.Page(sign_in_page, title="Sign in", icon="🔒"))
    st.navigation([page], position="hidden").run()
    return True
