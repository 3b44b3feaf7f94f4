"""The results store: one DuckDB file, its schema, and every read and write.

This package is the only place that writes SQL. Everything else calls the typed
functions it re-exports here with a :class:`Store` (``from cmil_core import store``;
``store.open_store(...)``), never its modules directly; the names below are the
contract, and what a module of the package holds may move between modules.

What it holds: :mod:`.connection` (opening, the process-wide registry of
database objects, :class:`Store`, the ``meta`` table; its docstring explains
opening and concurrency), :mod:`.schema` (the tables, one migration per schema
version), and one module per table family: :mod:`.cohorts` (cohorts and
patients), :mod:`.slides` (slides, patches, ingest runs, the slide viewer's
arrays), :mod:`.qc` (QC summaries and decisions), :mod:`.models` (models and
their scores), :mod:`.audit` (the audit trail) and :mod:`.integrity` (orphans
and other checks for ``cmil check`` and backups); :mod:`._base` holds their
shared helpers and errors. :mod:`.model_rules` reads a model row's rules (its
operating cutoff, its training cohorts) the same way for every caller, and a
model with its scores once (``read_model_scores``: a ``ModelScores``); it is
imported as its own module, not re-exported here.

What it may import: the standard library, duckdb, pandas, numpy and pyarrow,
:mod:`cmil_core.errors`, :mod:`cmil_core.store_folder` (the data folder's layout
beside the store file, re-exported here as :class:`StoreFolder`; a top-level
module because :mod:`cmil_core.logs` uses it too) and (inside functions) the QC rules of
:mod:`cmil_core.ingest.quality`; nothing else of :mod:`cmil_core`. Its modules import
each other's public names only (``from cmil_core.store._base import one_row``);
:mod:`.connection` reaches the schema as ``schema.SCHEMA_VERSION`` and
``schema.migrate`` so that a test can patch the migrations in one place.

The names imported ``as`` themselves (``PATCH_ID_BASE``, ``slide_patch_arrays``, ...)
are public and used elsewhere but, as before the split, not in ``__all__``.
"""

from __future__ import annotations

from cmil_core.store._base import (
    PATCH_ID_BASE as PATCH_ID_BASE,
    StoreBusyError,
    StoreError,
    StoreOutdatedError,
)
from cmil_core.store.audit import AUDIT_ACTIONS, audit_frame, record_audit
from cmil_core.store.cohorts import (
    COHORT_ROLES as COHORT_ROLES,
    CohortExistsError,
    CohortRow,
    PatientRow,
    cohort_overview,
    delete_cohort,
    import_patients,
    list_cohorts,
    patient_flow,
    patients_frame,
)
from cmil_core.store.connection import (
    Store,
    default_db_path,
    get_meta,
    open_store,
    schema_version,
    set_meta,
    store_fingerprint,
    table_counts,
    using,
)
from cmil_core.store.integrity import (
    ORPHAN_KINDS,
    delete_orphans,
    model_artifacts_frame,
    orphan_counts,
    set_model_artifact_paths,
    slide_check_frame,
    unknown_patient_slides,
)
from cmil_core.store.models import (
    RANKABLE_SCORES,
    ModelRow,
    add_model,
    delete_model,
    extreme_patches,
    get_model,
    has_model,
    list_models,
    localisation_patches,
    model_score_counts as model_score_counts,
    oof_scores_frame,
    patient_scores_frame,
    score_marks_frame,
    scored_patches_frame,
    write_oof_scores,
    write_scores,
)
from cmil_core.store.qc import (
    QC_DECISION_SOURCES,
    QC_METRICS,
    apply_qc_decision,
    cohort_tilings,
    current_qc_decisions,
    judge_metrics,
    qc_decisions_frame,
    qc_metric_histogram,
    qc_metric_ranges,
    qc_near_threshold,
    qc_patient_counts,
    qc_summary,
    qc_what_if,
)
from cmil_core.store.schema import SCHEMA_VERSION
from cmil_core.store.slides import (
    PATCH_COLUMNS as PATCH_COLUMNS,
    SLIDE_STATUSES as SLIDE_STATUSES,
    VIEWER_METRICS as VIEWER_METRICS,
    VIEWER_PATCH_COLUMNS as VIEWER_PATCH_COLUMNS,
    SlideRow,
    find_slide,
    finish_ingest_run,
    get_slide,
    ingest_runs_frame,
    list_slides,
    lookalike_regions_frame,
    mark_slide_failed,
    passed_patches,
    patches_frame,
    patient_slide_ids,
    patient_slides,
    qc_counts,
    register_slide,
    rejected_patches_frame,
    replace_lookalike_regions,
    replace_tumor_regions,
    set_slides_status,
    slide_glass_colours,
    slide_patch_arrays as slide_patch_arrays,
    slides_with_sha256,
    start_ingest_run,
    tumor_regions_frame,
    write_slide_patches,
)
from cmil_core.store_folder import StoreFolder

__all__ = [
    "AUDIT_ACTIONS",
    "ORPHAN_KINDS",
    "QC_DECISION_SOURCES",
    "QC_METRICS",
    "RANKABLE_SCORES",
    "SCHEMA_VERSION",
    "CohortExistsError",
    "CohortRow",
    "ModelRow",
    "PatientRow",
    "SlideRow",
    "Store",
    "StoreBusyError",
    "StoreError",
    "StoreFolder",
    "StoreOutdatedError",
    "add_model",
    "apply_qc_decision",
    "audit_frame",
    "cohort_overview",
    "cohort_tilings",
    "current_qc_decisions",
    "default_db_path",
    "delete_cohort",
    "delete_model",
    "delete_orphans",
    "extreme_patches",
    "find_slide",
    "finish_ingest_run",
    "get_meta",
    "get_model",
    "get_slide",
    "has_model",
    "import_patients",
    "ingest_runs_frame",
    "judge_metrics",
    "list_cohorts",
    "list_models",
    "list_slides",
    "localisation_patches",
    "lookalike_regions_frame",
    "mark_slide_failed",
    "model_artifacts_frame",
    "oof_scores_frame",
    "open_store",
    "orphan_counts",
    "passed_patches",
    "patches_frame",
    "patient_flow",
    "patient_scores_frame",
    "patient_slide_ids",
    "patient_slides",
    "patients_frame",
    "qc_counts",
    "qc_decisions_frame",
    "qc_metric_histogram",
    "qc_metric_ranges",
    "qc_near_threshold",
    "qc_patient_counts",
    "qc_summary",
    "qc_what_if",
    "record_audit",
    "register_slide",
    "rejected_patches_frame",
    "replace_lookalike_regions",
    "replace_tumor_regions",
    "schema_version",
    "score_marks_frame",
    "scored_patches_frame",
    "set_meta",
    "set_model_artifact_paths",
    "set_slides_status",
    "slide_check_frame",
    "slide_glass_colours",
    "slides_with_sha256",
    "start_ingest_run",
    "store_fingerprint",
    "table_counts",
    "tumor_regions_frame",
    "unknown_patient_slides",
    "using",
    "write_oof_scores",
    "write_scores",
    "write_slide_patches",
]
