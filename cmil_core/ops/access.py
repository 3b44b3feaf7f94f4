"""Who may do what, who did what, and patient ids fit to share.

Three small concerns, free of Streamlit so that the command line, the pages
and the tests use them as they are:

Roles
    A signed-in identity (an e-mail address from the OpenID Connect provider)
    is an *editor* (may import, ingest, train, score, delete), a *viewer*
    (sees everything, changes nothing) or nobody (no access). The mapping is
    configuration, the ``[cmil.roles]`` section of ``.streamlit/secrets.toml``::

        [cmil.roles]
        editors = ["alice@hospital.org"]
        viewers = ["bob@partner.edu"]
        editor_domains = []               # every address @ these domains
        viewer_domains = ["hospital.org"]

    :func:`role_of` decides; the explicit lists win over the domain rules, so
    a listed viewer stays a viewer inside an editor domain. Domains match
    exactly (``hospital.org`` does not admit ``lab.hospital.org`` nor
    ``evil-hospital.org``). Addresses compare case-insensitively.
    Without sign-in configured, the dashboard runs as one local user,
    :data:`LOCAL_USER`, with editor rights.

Audit
    :func:`record` appends one row to the store's ``audit`` table and never
    fails the action it records; :func:`audited` wraps a background job so
    that its row is written when it finishes. :func:`cli_user` is who a
    command-line run is (the operating-system user).

Pseudonyms
    :func:`pseudonym` is ``"PSN-"`` and the first 16 hex digits of
    HMAC-SHA256(salt, patient id): the same id and salt give the same
    pseudonym, and without the salt the id cannot be recovered by hashing
    guesses. :func:`make_pseudonymiser` takes the salt from configuration
    (``[cmil] pseudonym_salt``) or ``$CMIL_PSEUDONYM_SALT``; with neither it
    draws a random salt for that one export and keeps it nowhere, so its
    pseudonyms cannot be linked to any other export (nor back to patients).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError

__all__ = [
    "EDITOR",
    "LOCAL_USER",
    "MIN_SALT_LENGTH",
    "PSEUDONYM_SALT_ENV",
    "VIEWER",
    "Pseudonymiser",
    "RoleConfig",
    "audited",
    "can_edit",
    "cli_user",
    "identity_email",
    "make_pseudonymiser",
    "pseudonym",
    "record",
    "role_of",
]

T = TypeVar("T")

EDITOR = "editor"
VIEWER = "viewer"
#: Who the dashboard's user is when no sign-in is configured (one local user, an editor).
LOCAL_USER = "local"

_ROLE_KEYS = ("editors", "viewers", "editor_domains", "viewer_domains")
_EMAIL = re.compile(r"^[^@\s]+@([^@\s]+\.[^@\s]+)$")


# ----------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleConfig:
    """Who is an editor or a viewer: addresses and whole domains, all lower case."""

    editors: frozenset[str] = frozenset()
    viewers: frozenset[str] = frozenset()
    editor_domains: frozenset[str] = frozenset()
    viewer_domains: frozenset[str] = frozenset()

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> RoleConfig:
        """Parse the ``[cmil.roles]`` section; None or empty means nobody has a role.

        Raises ``ValueError`` for an unknown key (a typo would lock people out
        silently) or a value that is not a list of strings.
        """
        if not section:
            return cls()
        unknown = sorted(set(section) - set(_ROLE_KEYS))
        if unknown:
            raise ValueError(
                f"[cmil.roles] has unknown key {unknown[0]!r}; expected {', '.join(_ROLE_KEYS)}"
            )
        values: dict[str, frozenset[str]] = {}
        for key in _ROLE_KEYS:
            raw = section.get(key, [])
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, Iterable) or any(not isinstance(v, str) for v in raw):
                raise ValueError(f"[cmil.roles] {key} must be a list of strings, not {raw!r}")
            if key.endswith("_domains"):
                values[key] = frozenset(v.strip().lower().lstrip("@") for v in raw if v.strip())
            else:
                values[key] = frozenset(v.strip().lower() for v in raw if v.strip())
        return cls(**values)

    @property
    def empty(self) -> bool:
        return not (self.editors or self.viewers or self.editor_domains or self.viewer_domains)


def identity_email(user: Mapping[str, Any]) -> str | None:
    """The e-mail address of a signed-in user (``st.user``), or None when it cannot be trusted.

    None when the claim is missing or not an address, or when the provider
    says it is unverified (``email_verified`` false).
    """
    email = user.get("email")
    if not isinstance(email, str) or _EMAIL.match(email.strip()) is None:
        return None
    verified = user.get("email_verified", True)
    if verified is False or (isinstance(verified, str) and verified.lower() == "false"):
        return None
    return email.strip().lower()


def role_of(email: str | None, config: RoleConfig) -> str | None:
    """``"editor"``, ``"viewer"`` or None (no access) for a signed-in address."""
    if not email:
        return None
    address = email.strip().lower()
    match = _EMAIL.match(address)
    if match is None:
        return None
    domain = match.group(1)
    if address in config.editors:
        return EDITOR
    if address in config.viewers:
        return VIEWER
    if domain in config.editor_domains:
        return EDITOR
    if domain in config.viewer_domains:
        return VIEWER
    return None


def can_edit(role: str | None) -> bool:
    """Whether ``role`` may import, ingest, train, score and delete."""
    return role == EDITOR


# ----------------------------------------------------------------------------
# Audit
# ----------------------------------------------------------------------------


def cli_user() -> str:
    """Who runs a command: the operating-system user (``"unknown"`` when it has no name)."""
    try:
        return getpass.getuser() or "unknown"
    except (OSError, KeyError, ImportError):  # no passwd entry and no $USER (containers)
        return "unknown"


def record(
    db: str | os.PathLike[str] | store_mod.Store, who: str, action: str, *,
    cohort: str | None = None, model_id: str | None = None,
    details: Mapping[str, Any] | None = None, timeout: float = 10.0,
) -> str | None:
    """Append one audit row; returns None, or why it could not be written.

    The action it records has already happened: a store that cannot be
    opened now is reported to the caller, never raised.
    """
    try:
        if isinstance(db, store_mod.Store):
            store_mod.record_audit(db, who, action, cohort=cohort, model_id=model_id,
                                   details=None if details is None else dict(details))
            return None
        with store_mod.open_store(db, timeout=timeout) as store:
            store_mod.record_audit(store, who, action, cohort=cohort, model_id=model_id,
                                   details=None if details is None else dict(details))
    except (store_mod.StoreError, OSError) as exc:
        return f"the audit row could not be written: {exc}"
    return None


#: One audit row of a finished job: (cohort, model_id, details).
AuditRow = tuple[str | None, str | None, dict[str, Any] | None]


def audited(
    func: Callable[..., T], db: str | os.PathLike[str], who: str, action: str,
    rows: Callable[[T], Iterable[AuditRow]],
) -> Callable[..., T]:
    """``func``, recording ``rows(result)`` in the audit trail when it returns.

    For background jobs: the row is written by the job's own thread once the
    work is done, whether or not anyone is still watching the page.
    """

    def run(*args: Any, **kwargs: Any) -> T:
        result = func(*args, **kwargs)
        for cohort, model_id, details in rows(result):
            record(db, who, action, cohort=cohort, model_id=model_id, details=details)
        return result

    run.__name__ = getattr(func, "__name__", "audited")
    return run


def ingest_details(summary: Any) -> dict[str, Any]:
    """What an ingest audit row keeps of a :class:`~cmil_core.ingest.pipeline.IngestSummary`."""
    data = summary.to_dict()
    return {"run_id": data.get("run_id"), "source": data.get("folder"),
            "slides": len(data.get("slides", [])), "status_counts": data.get("status_counts"),
            "patches_passed": (data.get("patch_counts") or {}).get("passed"),
            "qc_decision_id": (data.get("qc_decision") or {}).get("decision_id"),
            "qc_warnings": data.get("qc_warnings") or []}


# ----------------------------------------------------------------------------
# Pseudonyms
# ----------------------------------------------------------------------------

PSEUDONYM_SALT_ENV = "CMIL_PSEUDONYM_SALT"
#: A configured salt shorter than this is refused: patient ids are few and guessable,
#: so the salt is the whole of the protection.
MIN_SALT_LENGTH = 16
PSEUDONYM_PREFIX = "PSN-"


def pseudonym(patient_id: object, salt: str | bytes) -> str:
    """``"PSN-"`` + 16 hex digits of HMAC-SHA256(salt, id): stable per id and salt.

    >>> pseudonym("P001", "a salt of sixteen+ chars")
    'PSN-2ad6fb86b434ace1'
    """
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    digest = hmac.new(key, str(patient_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:16]


@dataclass
class Pseudonymiser:
    """Maps patient ids to pseudonyms with one salt; ``source`` says where the salt came from."""

    salt: bytes = field(repr=False)
    source: str  # "configured" or "random"

    def __call__(self, patient_id: object) -> str:
        return pseudonym(patient_id, self.salt)

    def frame(self, frame: pd.DataFrame, columns: Iterable[str] = ("patient_id",)) -> pd.DataFrame:
        """A copy of ``frame`` with the id columns replaced (missing ids stay missing).

        Rows are re-sorted by the pseudonym within each cohort when there is a
        ``cohort`` column, so their order no longer tells the ids' order.
        """
        out = frame.copy()
        mapped = [c for c in columns if c in out.columns]
        for column in mapped:
            out[column] = [v if v is None or (isinstance(v, float) and v != v) else self(v)
                           for v in out[column]]
        if mapped:
            keys = (["cohort"] if "cohort" in out.columns else []) + [mapped[0]]
            out = out.sort_values(keys, kind="stable").reset_index(drop=True)
        return out

    def describe(self) -> str:
        if self.source == "configured":
            return ("HMAC-SHA256 with the team's configured salt: the same patient has the same "
                    "pseudonym in every export made with it")
        return ("HMAC-SHA256 with a random salt drawn for this export and not kept: pseudonyms "
                "cannot be linked to other exports or back to patients")


def make_pseudonymiser(
    configured: str | None = None, environ: Mapping[str, str] | None = None
) -> Pseudonymiser:
    """The salt of an export: ``configured``, else ``$CMIL_PSEUDONYM_SALT``, else random.

    Raises :class:`InputError` for a configured salt shorter than
    :data:`MIN_SALT_LENGTH` characters.
    """
    env = os.environ if environ is None else environ
    for name, value in (("[cmil] pseudonym_salt", configured),
                        (f"${PSEUDONYM_SALT_ENV}", env.get(PSEUDONYM_SALT_ENV))):
        if value is None or not str(value).strip():
            continue
        if len(str(value)) < MIN_SALT_LENGTH:
            raise InputError(
                f"{name} is {len(str(value))} characters; a pseudonym salt needs at least "
                f"{MIN_SALT_LENGTH} (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return Pseudonymiser(str(value).encode("utf-8"), "configured")
    return Pseudonymiser(secrets.token_bytes(32), "random")
