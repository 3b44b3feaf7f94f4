"""Access on the pages: sign-in, roles, the audit trail and pseudonymised downloads.

The rules live in :mod:`cmil_core.ops.access`; this is the page-side glue. Sign-in is
Streamlit's own (``st.login``, OpenID Connect), switched on by an ``[auth]`` section
in .streamlit/secrets.toml; roles come from its ``[cmil.roles]`` section. Without
``[auth]`` the dashboard is one local user with editor rights. Every handler that
changes the study calls :func:`require_editor` itself: the disabled buttons are a
courtesy, not the protection. Imports :mod:`pages._text` and
:mod:`pages._store_reads` of the pages' shared code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.ops import access
from pages._store_reads import db_path
from pages._text import md

__all__ = [
    "AUDIT_PROBLEM", "PSEUDONYMISE_KEY", "AccessConfigError", "User", "access_gate",
    "ask_whom", "audit", "audited_job", "auth_providers", "can_edit", "current_user",
    "masked", "no_access_page", "pseudonymise_forced", "pseudonymise_on", "pseudonymiser",
    "require_editor", "sidebar_access", "sign_in_configured", "sign_in_page",
    "viewer_notice",
]

T = TypeVar("T")


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
    else a random one per export (see :func:`cmil_core.ops.access.make_pseudonymiser`).
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
