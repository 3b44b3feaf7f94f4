"""The store's schema, as one migration function per version step.

Schema versions
---------------
``meta.schema_version`` records the version; :data:`MIGRATIONS` holds one
function per version step, applied in order, each in a transaction, whenever a
store is opened for writing. A read-only open of an outdated store, or any open
of a store written by a newer program, raises :class:`StoreError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb

from cmil_core.store._base import StoreError


def _migration_1(con: duckdb.DuckDBPyConnection) -> None:
    """The tables of docs/DESIGN.md's minimum contract."""
    con.execute(
        """
        CREATE TABLE cohorts (
            cohort TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('train', 'validation', 'test')),
            center TEXT,
            created_at TIMESTAMP NOT NULL,
            source_file TEXT
        )"""
    )
    con.execute(
        """
        CREATE TABLE patients (
            cohort TEXT NOT NULL,
            patient_id TEXT NOT NULL,
            bm_metastasis SMALLINT CHECK (bm_metastasis IN (0, 1)),
            os_months DOUBLE CHECK (os_months >= 0),
            os_event SMALLINT CHECK (os_event IN (0, 1)),
            efs_months DOUBLE CHECK (efs_months >= 0),
            efs_event SMALLINT CHECK (efs_event IN (0, 1)),
            clinical JSON,
            PRIMARY KEY (cohort, patient_id)
        )"""
    )
    con.execute("CREATE SEQUENCE slide_id_seq START 1")
    con.execute(
        """
        CREATE TABLE slides (
            slide_id INTEGER PRIMARY KEY DEFAULT nextval('slide_id_seq'),
            cohort TEXT NOT NULL,
            patient_id TEXT,
            path TEXT NOT NULL,
            sha256 TEXT,
            kind TEXT,
            width INTEGER,
            height INTEGER,
            mpp DOUBLE,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'tiled', 'encoded', 'failed')),
            error TEXT,
            size_bytes BIGINT,
            registered_at TIMESTAMP,
            UNIQUE (cohort, path)
        )"""
    )
    con.execute(
        """
        CREATE TABLE patches (
            patch_id BIGINT PRIMARY KEY,
            slide_id INTEGER NOT NULL,
            x INTEGER NOT NULL,
            y INTEGER NOT NULL,
            size INTEGER NOT NULL,
            qc_pass BOOLEAN NOT NULL,
            qc_reason TEXT,
            background_fraction DOUBLE,
            blur_variance DOUBLE,
            mean_intensity DOUBLE,
            nuclei_fraction DOUBLE
        )"""
    )
    con.execute(
        """
        CREATE TABLE models (
            model_id TEXT PRIMARY KEY,
            created_at TIMESTAMP NOT NULL,
            aggregator TEXT,
            encoder TEXT,
            train_cohorts TEXT,
            config JSON,
            metrics JSON,
            artifact_path TEXT
        )"""
    )
    con.execute(
        """
        CREATE TABLE patient_scores (
            model_id TEXT NOT NULL,
            cohort TEXT NOT NULL,
            patient_id TEXT NOT NULL,
            score DOUBLE CHECK (score BETWEEN 0 AND 1),
            risk_group TEXT,
            PRIMARY KEY (model_id, cohort, patient_id)
        )"""
    )
    con.execute(
        """
        CREATE TABLE patch_scores (
            model_id TEXT NOT NULL,
            patch_id BIGINT NOT NULL,
            probability DOUBLE,
            attention DOUBLE,
            PRIMARY KEY (model_id, patch_id)
        )"""
    )
    con.execute(
        """
        CREATE TABLE demo_tumor_regions (
            slide_id INTEGER NOT NULL,
            x INTEGER NOT NULL,
            y INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL
        )"""
    )


def _migration_2(con: duckdb.DuckDBPyConnection) -> None:
    """Ingest: grid indices and all quality metrics per patch, tiling state per slide, runs."""
    for column, kind in (
        ("g_col", "INTEGER"), ("g_row", "INTEGER"), ("foreground_fraction", "DOUBLE"),
        ("thick_fraction", "DOUBLE"), ("dark_fraction", "DOUBLE"), ("bright_fraction", "DOUBLE"),
    ):
        con.execute(f"ALTER TABLE patches ADD COLUMN {column} {kind}")
    for column, kind in (
        ("tiling_key", "TEXT"), ("tiling", "JSON"), ("tiled_at", "TIMESTAMP"),
        ("run_id", "INTEGER"),
    ):
        con.execute(f"ALTER TABLE slides ADD COLUMN {column} {kind}")
    con.execute("CREATE SEQUENCE run_id_seq START 1")
    con.execute(
        """
        CREATE TABLE ingest_runs (
            run_id INTEGER PRIMARY KEY DEFAULT nextval('run_id_seq'),
            cohort TEXT NOT NULL,
            source TEXT,
            manifest TEXT,
            config JSON,
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            status TEXT NOT NULL DEFAULT 'running',
            summary JSON
        )"""
    )


def _migration_3(con: duckdb.DuckDBPyConnection) -> None:
    """Scoring: raw attention logits beside the normalised attention, and a model's cutoff."""
    con.execute("ALTER TABLE patch_scores ADD COLUMN attention_raw DOUBLE")
    con.execute("ALTER TABLE models ADD COLUMN cutoff DOUBLE")


def _migration_4(con: duckdb.DuckDBPyConnection) -> None:
    """Access: an audit trail of what changed the study or left it (who, when, what, which)."""
    con.execute("CREATE SEQUENCE audit_id_seq START 1")
    con.execute(
        """
        CREATE TABLE audit (
            audit_id BIGINT PRIMARY KEY DEFAULT nextval('audit_id_seq'),
            happened_at TIMESTAMP NOT NULL,
            who TEXT NOT NULL,
            action TEXT NOT NULL,
            cohort TEXT,
            model_id TEXT,
            details JSON
        )"""
    )


def _migration_5(con: duckdb.DuckDBPyConnection) -> None:
    """Quality control as a versioned decision per cohort (who, when, which thresholds).

    Patches keep their metrics; a decision re-judges them in SQL from
    :data:`cmil_core.ingest.quality.QC_RULES`, without reading slides again.
    """
    con.execute("CREATE SEQUENCE qc_decision_id_seq START 1")
    con.execute(
        """
        CREATE TABLE qc_decisions (
            decision_id INTEGER PRIMARY KEY DEFAULT nextval('qc_decision_id_seq'),
            cohort TEXT NOT NULL,
            decided_at TIMESTAMP NOT NULL,
            who TEXT NOT NULL,
            source TEXT NOT NULL,
            thresholds JSON NOT NULL,
            kept BIGINT,
            rejected BIGINT
        )"""
    )
    # Which decision of the scored cohort a model's scores were made on (stale once
    # the cohort's QC is decided again), and, when the user scored a cohort whose
    # tiling or QC differ from the training cohort's, what differed.
    con.execute("ALTER TABLE patient_scores ADD COLUMN qc_decision_id INTEGER")
    con.execute("ALTER TABLE patient_scores ADD COLUMN tiling_mismatch TEXT")
    # Metrics version 2: nuclear-stain material in square microns (the QC rule's column).
    con.execute("ALTER TABLE patches ADD COLUMN nuclear_area_um2 DOUBLE")


def _migration_6(con: duckdb.DuckDBPyConnection) -> None:
    """Honest numbers: the training cohort's out-of-fold scores, apart from the final model's."""
    con.execute(
        """
        CREATE TABLE oof_scores (
            model_id TEXT NOT NULL,
            cohort TEXT NOT NULL,
            patient_id TEXT NOT NULL,
            fold INTEGER NOT NULL,
            score DOUBLE NOT NULL,
            PRIMARY KEY (model_id, cohort, patient_id)
        )"""
    )
    # The final model's own output before it is mapped onto the out-of-fold scale
    # (cmil_core.model.recalibration): ``score`` is on that scale, the cutoff's.
    con.execute("ALTER TABLE patient_scores ADD COLUMN score_raw DOUBLE")
    # The demo's benign look-alikes (lymphoid clusters, erythroid islands,
    # monocytes, smudge cells) as ground truth too, for false positives.
    con.execute(
        """
        CREATE TABLE demo_lookalike_regions (
            slide_id INTEGER NOT NULL,
            kind TEXT NOT NULL,
            x INTEGER NOT NULL,
            y INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL
        )"""
    )


# One function per version step: MIGRATIONS[k] takes a store from version k
# to version k + 1. Append; never edit a released step.
MIGRATIONS: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
)


SCHEMA_VERSION = len(MIGRATIONS)


def read_version(con: duckdb.DuckDBPyConnection) -> int:
    has_meta = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
    ).fetchone()
    if not has_meta or has_meta[0] == 0:
        return 0
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    version = read_version(con)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version} was written by a newer cmil_core "
            f"(this one knows up to {SCHEMA_VERSION}); upgrade the program"
        )
    for step in range(version, SCHEMA_VERSION):
        con.execute("BEGIN TRANSACTION")
        try:
            if step == 0:
                con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            MIGRATIONS[step](con)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(step + 1)]
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
