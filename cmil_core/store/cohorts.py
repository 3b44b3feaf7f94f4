"""Cohorts and patients: imports, deletion, the patients table, the per-cohort
overview and the patient flow (STARD) from import to analysis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from cmil_core.errors import InputError
from cmil_core.store._base import StoreError
from cmil_core.store.connection import Store

COHORT_ROLES = ("train", "validation", "test")


class CohortExistsError(StoreError, InputError):
    """An import would overwrite a cohort's patients without ``replace``."""


@dataclass(frozen=True)
class CohortRow:
    cohort: str
    role: str
    center: str | None
    created_at: datetime
    source_file: str | None


@dataclass(frozen=True)
class PatientRow:
    """One validated patient, ready to be stored."""

    patient_id: str
    bm_metastasis: int | None = None
    os_months: float | None = None
    os_event: int | None = None
    efs_months: float | None = None
    efs_event: int | None = None
    clinical: dict[str, Any] | None = None


def list_cohorts(store: Store) -> list[CohortRow]:
    """Every cohort, training cohorts first, then by name."""
    rows = store.cursor().execute(
        """SELECT cohort, role, center, created_at, source_file FROM cohorts
           ORDER BY CASE role WHEN 'train' THEN 0 WHEN 'validation' THEN 1 ELSE 2 END, cohort"""
    ).fetchall()
    return [CohortRow(*r) for r in rows]


def import_patients(
    store: Store,
    cohort: str,
    patients: Sequence[PatientRow],
    *,
    role: str,
    center: str | None,
    source_file: str | None = None,
    replace: bool = False,
) -> int:
    """Create or update a cohort and store its patients, in one transaction.

    With ``replace`` the cohort's previous patients are removed first (their
    slides and scores stay); without it, a cohort that already has patients is
    refused. Returns the number of patients written.
    """
    if role not in COHORT_ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(COHORT_ROLES)}")
    with store.transaction() as cur:
        existing = cur.execute(
            "SELECT count(*) FROM patients WHERE cohort = ?", [cohort]
        ).fetchone()
        n_existing = int(existing[0]) if existing else 0
        if n_existing and not replace:
            raise CohortExistsError(
                f"cohort {cohort!r} already has {n_existing} patients; "
                "pass --replace to replace its clinical table"
            )
        cur.execute(
            """INSERT INTO cohorts VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (cohort) DO UPDATE SET role = excluded.role,
                   center = excluded.center, source_file = excluded.source_file""",
            [cohort, role, center, datetime.now(UTC).replace(tzinfo=None), source_file],
        )
        cur.execute("DELETE FROM patients WHERE cohort = ?", [cohort])
        if patients:
            frame = pd.DataFrame(
                {
                    "cohort": cohort,
                    "patient_id": [p.patient_id for p in patients],
                    "bm_metastasis": pd.array([p.bm_metastasis for p in patients], "Int16"),
                    "os_months": pd.array([p.os_months for p in patients], "Float64"),
                    "os_event": pd.array([p.os_event for p in patients], "Int16"),
                    "efs_months": pd.array([p.efs_months for p in patients], "Float64"),
                    "efs_event": pd.array([p.efs_event for p in patients], "Int16"),
                    "clinical": [json.dumps(p.clinical or {}, ensure_ascii=False)
                                 for p in patients],
                }
            )
            cur.register("_new_patients", frame)
            try:
                cur.execute("INSERT INTO patients SELECT * FROM _new_patients")
            finally:
                cur.unregister("_new_patients")
    return len(patients)


def delete_cohort(store: Store, cohort: str) -> None:
    """Remove a cohort with its patients, slides, patches and scores."""
    with store.transaction() as cur:
        cur.execute(
            """DELETE FROM patch_scores WHERE patch_id IN (
                   SELECT patch_id FROM patches JOIN slides USING (slide_id)
                   WHERE slides.cohort = ?)""",
            [cohort],
        )
        cur.execute(
            "DELETE FROM patches WHERE slide_id IN (SELECT slide_id FROM slides WHERE cohort = ?)",
            [cohort],
        )
        cur.execute(
            """DELETE FROM demo_tumor_regions
               WHERE slide_id IN (SELECT slide_id FROM slides WHERE cohort = ?)""",
            [cohort],
        )
        cur.execute(
            """DELETE FROM demo_lookalike_regions
               WHERE slide_id IN (SELECT slide_id FROM slides WHERE cohort = ?)""",
            [cohort],
        )
        cur.execute("DELETE FROM slides WHERE cohort = ?", [cohort])
        cur.execute("DELETE FROM ingest_runs WHERE cohort = ?", [cohort])
        cur.execute("DELETE FROM patient_scores WHERE cohort = ?", [cohort])
        cur.execute("DELETE FROM oof_scores WHERE cohort = ?", [cohort])
        cur.execute("DELETE FROM patients WHERE cohort = ?", [cohort])
        cur.execute("DELETE FROM cohorts WHERE cohort = ?", [cohort])


def patients_frame(store: Store, cohort: str | None = None) -> pd.DataFrame:
    """Patients as a DataFrame; ``clinical`` decoded into a dict per row."""
    sql = """SELECT cohort, patient_id, bm_metastasis, os_months, os_event,
                    efs_months, efs_event, clinical FROM patients"""
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    sql += " ORDER BY cohort, patient_id"
    frame = store.cursor().execute(sql, params).df()
    frame["clinical"] = [json.loads(c) if c else {} for c in frame["clinical"]]
    return frame


# --- summaries for the overview ---

def patient_flow(store: Store, model_id: str | None = None) -> pd.DataFrame:
    """Patients per cohort at each step of the flow (STARD), each step a subset of the one before.

    Columns: cohort, role, imported (clinical table), with_slides (a slide
    registered and not failed), with_passed_patches (a quality-passed patch on
    a tiled slide), scored (a score of ``model_id``: for its training cohort,
    an out-of-fold score when it has them, else the final model's), labelled
    (scored and with a bone-marrow label: the patients of the accuracy
    analysis). Without ``model_id``, scored and labelled are NULL.
    """
    return store.cursor().execute(
        """
        WITH sl AS (SELECT DISTINCT cohort, patient_id FROM slides WHERE status <> 'failed'),
             pp AS (SELECT DISTINCT s.cohort, s.patient_id FROM patches p
                    JOIN slides s USING (slide_id)
                    WHERE p.qc_pass AND s.status IN ('tiled', 'encoded')),
             oof AS (SELECT DISTINCT cohort, patient_id FROM oof_scores WHERE model_id = $1),
             sc AS (SELECT cohort, patient_id FROM patient_scores WHERE model_id = $1
                    AND cohort NOT IN (SELECT cohort FROM oof)
                    UNION SELECT cohort, patient_id FROM oof),
             flow AS (
                SELECT pt.cohort,
                       (sl.patient_id IS NOT NULL) AS has_slides,
                       (sl.patient_id IS NOT NULL AND pp.patient_id IS NOT NULL) AS has_patches,
                       (sl.patient_id IS NOT NULL AND pp.patient_id IS NOT NULL
                        AND sc.patient_id IS NOT NULL) AS is_scored,
                       pt.bm_metastasis IS NOT NULL AS has_label
                FROM patients pt
                LEFT JOIN sl USING (cohort, patient_id)
                LEFT JOIN pp USING (cohort, patient_id)
                LEFT JOIN sc USING (cohort, patient_id))
        SELECT c.cohort, c.role,
               count(f.cohort) AS imported,
               count(*) FILTER (WHERE f.has_slides) AS with_slides,
               count(*) FILTER (WHERE f.has_patches) AS with_passed_patches,
               CASE WHEN $1 IS NULL THEN NULL
                    ELSE count(*) FILTER (WHERE f.is_scored) END AS scored,
               CASE WHEN $1 IS NULL THEN NULL
                    ELSE count(*) FILTER (WHERE f.is_scored AND f.has_label) END AS labelled
        FROM cohorts c LEFT JOIN flow f USING (cohort)
        GROUP BY c.cohort, c.role
        ORDER BY CASE c.role WHEN 'train' THEN 0 WHEN 'validation' THEN 1 ELSE 2 END, c.cohort
        """,
        [model_id],
    ).df()


def cohort_overview(store: Store) -> pd.DataFrame:
    """One row per cohort: role, centre, patient, label, follow-up, slide and patch counts.

    Columns: cohort, role, center, patients, positives, negatives,
    unlabelled, os_known, os_events, slides, slides_failed, patches,
    patches_passed. Follow-up statistics that need a survival estimator are
    computed by the caller from :func:`patients_frame`.
    """
    return store.cursor().execute(
        """
        WITH p AS (
            SELECT cohort,
                   count(*) AS patients,
                   count(*) FILTER (WHERE bm_metastasis = 1) AS positives,
                   count(*) FILTER (WHERE bm_metastasis = 0) AS negatives,
                   count(*) FILTER (WHERE bm_metastasis IS NULL) AS unlabelled,
                   count(os_months) AS os_known,
                   count(*) FILTER (WHERE os_event = 1) AS os_events
            FROM patients GROUP BY cohort),
        s AS (
            SELECT cohort, count(*) AS slides,
                   count(*) FILTER (WHERE status = 'failed') AS slides_failed
            FROM slides GROUP BY cohort),
        t AS (
            SELECT slides.cohort, count(*) AS patches,
                   count(*) FILTER (WHERE qc_pass) AS patches_passed
            FROM patches JOIN slides USING (slide_id) GROUP BY slides.cohort)
        SELECT c.cohort, c.role, c.center,
               coalesce(p.patients, 0) AS patients, coalesce(p.positives, 0) AS positives,
               coalesce(p.negatives, 0) AS negatives, coalesce(p.unlabelled, 0) AS unlabelled,
               coalesce(p.os_known, 0) AS os_known, coalesce(p.os_events, 0) AS os_events,
               coalesce(s.slides, 0) AS slides, coalesce(s.slides_failed, 0) AS slides_failed,
               coalesce(t.patches, 0) AS patches, coalesce(t.patches_passed, 0) AS patches_passed
        FROM cohorts c LEFT JOIN p USING (cohort) LEFT JOIN s USING (cohort)
             LEFT JOIN t USING (cohort)
        ORDER BY CASE c.role WHEN 'train' THEN 0 WHEN 'validation' THEN 1 ELSE 2 END, c.cohort
        """
    ).df()
