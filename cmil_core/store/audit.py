"""The audit trail: who did what to the store, and when."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from cmil_core.store._base import utc_now
from cmil_core.store.connection import Store

#: What the audit table records (one row per finished action).
AUDIT_ACTIONS = ("import", "delete-cohort", "ingest", "train", "score", "delete-model",
                 "export", "restore", "qc-decision", "demo")


def record_audit(
    store: Store, who: str, action: str, *, cohort: str | None = None,
    model_id: str | None = None, details: dict[str, Any] | None = None,
) -> None:
    """Append one row to the audit trail (call it in the action's own transaction when
    there is one)."""
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; one of {', '.join(AUDIT_ACTIONS)}")
    store.cursor().execute(
        "INSERT INTO audit (happened_at, who, action, cohort, model_id, details) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [utc_now(), who or "unknown", action, cohort, model_id,
         None if details is None else json.dumps(details, default=str)],
    )


def audit_frame(store: Store, limit: int = 1000) -> pd.DataFrame:
    """The audit trail, newest first: audit_id, happened_at, who, action, cohort, model_id,
    details."""
    return store.cursor().execute(
        "SELECT * FROM audit ORDER BY audit_id DESC LIMIT ?", [int(limit)]
    ).df()
