"""Integrity and maintenance queries (``cmil check``, backups): orphan rows,
slides of unknown patients, the files a model refers to."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from cmil_core.store._base import one_row
from cmil_core.store.connection import Store

#: Rows that refer to something no longer in the store, by kind: the SQL that
#: selects them (``FROM`` and ``WHERE``), shared by counting and deleting.
_ORPHANS: dict[str, tuple[str, str]] = {
    "patches without a slide": (
        "patches", "slide_id NOT IN (SELECT slide_id FROM slides)"),
    "patch scores without a model": (
        "patch_scores", "model_id NOT IN (SELECT model_id FROM models)"),
    "patch scores without a patch": (
        "patch_scores", "patch_id NOT IN (SELECT patch_id FROM patches)"),
    "patient scores without a model": (
        "patient_scores", "model_id NOT IN (SELECT model_id FROM models)"),
    "patient scores of an unknown cohort": (
        "patient_scores", "cohort NOT IN (SELECT cohort FROM cohorts)"),
    "patient scores of an unknown patient": (
        "patient_scores",
        "(cohort, patient_id) NOT IN (SELECT (cohort, patient_id) FROM patients)"),
    "out-of-fold scores without a model": (
        "oof_scores", "model_id NOT IN (SELECT model_id FROM models)"),
    "out-of-fold scores of an unknown patient": (
        "oof_scores",
        "(cohort, patient_id) NOT IN (SELECT (cohort, patient_id) FROM patients)"),
    "patients of an unknown cohort": (
        "patients", "cohort NOT IN (SELECT cohort FROM cohorts)"),
    "tumour regions without a slide": (
        "demo_tumor_regions", "slide_id NOT IN (SELECT slide_id FROM slides)"),
    "look-alike regions without a slide": (
        "demo_lookalike_regions", "slide_id NOT IN (SELECT slide_id FROM slides)"),
}


ORPHAN_KINDS = tuple(_ORPHANS)


def orphan_counts(store: Store) -> dict[str, int]:
    """How many rows of each kind of :data:`ORPHAN_KINDS` the store holds."""
    cur = store.cursor()
    return {
        kind: int(one_row(cur.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone())[0])
        for kind, (table, where) in _ORPHANS.items()
    }


def delete_orphans(store: Store, kinds: Sequence[str] = ORPHAN_KINDS) -> dict[str, int]:
    """Delete orphan rows of ``kinds``, in one transaction; returns the rows deleted per kind."""
    unknown = [k for k in kinds if k not in _ORPHANS]
    if unknown:
        raise ValueError(f"unknown orphan kinds {unknown}")
    deleted: dict[str, int] = {}
    with store.transaction() as cur:
        for kind in kinds:
            table, where = _ORPHANS[kind]
            n = cur.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()
            cur.execute(f"DELETE FROM {table} WHERE {where}")
            deleted[kind] = int(one_row(n)[0])
    return deleted


def unknown_patient_slides(store: Store) -> pd.DataFrame:
    """Slides (not failed) whose cohort or patient is not in the store.

    Columns: cohort, patient_id, slides, cohort_known.
    """
    return store.cursor().execute(
        """SELECT s.cohort, s.patient_id, count(*) AS slides,
                  s.cohort IN (SELECT cohort FROM cohorts) AS cohort_known
           FROM slides s
           WHERE s.status <> 'failed' AND (s.cohort, s.patient_id) NOT IN
                 (SELECT (cohort, patient_id) FROM patients)
           GROUP BY ALL ORDER BY s.cohort, s.patient_id"""
    ).df()


def slide_check_frame(store: Store) -> pd.DataFrame:
    """Every slide with what a consistency check needs, by cohort and path.

    Columns: slide_id, cohort, patient_id, path, sha256, size_bytes, status,
    tiling_key, patches, passed.
    """
    return store.cursor().execute(
        """SELECT s.slide_id, s.cohort, s.patient_id, s.path, s.sha256, s.size_bytes, s.status,
                  s.tiling_key, count(p.patch_id) AS patches,
                  count(p.patch_id) FILTER (WHERE p.qc_pass) AS passed
           FROM slides s LEFT JOIN patches p USING (slide_id)
           GROUP BY ALL ORDER BY s.cohort, s.path"""
    ).df()


def model_artifacts_frame(store: Store) -> pd.DataFrame:
    """Every model's files and encoder: model_id, artifact_path, encoder_key, scored cohorts.

    ``encoder_key`` comes from the stored config (None when absent);
    ``cohorts`` is the list of cohorts the model has scored.
    """
    frame = store.cursor().execute(
        """SELECT m.model_id, m.artifact_path, m.config,
                  list(DISTINCT s.cohort ORDER BY s.cohort) FILTER (WHERE s.cohort IS NOT NULL)
                      AS cohorts
           FROM models m LEFT JOIN patient_scores s USING (model_id)
           GROUP BY ALL ORDER BY m.model_id"""
    ).df()
    keys = []
    for raw in frame.pop("config"):
        try:
            keys.append(json.loads(raw).get("encoder_key") if raw else None)
        except (ValueError, AttributeError):
            keys.append(None)
    frame["encoder_key"] = keys
    frame["cohorts"] = [[] if c is None or c is pd.NA else list(c) for c in frame["cohorts"]]
    return frame


def set_model_artifact_paths(store: Store, paths: dict[str, str]) -> None:
    """Record new folders of models' files (after a restore or a move), in one transaction."""
    if not paths:
        return
    with store.transaction() as cur:
        cur.executemany(
            "UPDATE models SET artifact_path = ? WHERE model_id = ?",
            [(str(path), model_id) for model_id, path in paths.items()],
        )
