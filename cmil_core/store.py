"""The results store: one DuckDB file, its schema, and every read and write.

This is the only module that writes SQL. Everything else calls the typed
functions below with a :class:`Store`.

Opening and concurrency
-----------------------
DuckDB lets one *process* write a database file, or several processes read it;
a reader cannot open the file while another process writes it. Inside one
process, all threads must share one database object. The scheme here:

* :func:`open_store` returns a :class:`Store`, a reference to a process-wide
  database object for that file (a registry keyed by the resolved path, with a
  reference count). The file is closed, and its lock released, when the last
  reference closes. Commands hold a store for the length of their work; the
  dashboard opens one for each read (milliseconds) and for each job it runs,
  so a command-line job can run while the dashboard is open.
* Each thread gets its own cursor (:meth:`Store.cursor`); a DuckDB connection
  object must not be shared between threads.
* A read-only request while this process already writes the file reuses the
  writing object (reads then see every committed result). A write request
  while this process only reads the file waits for the readers to finish.
* When another process holds the file, opening retries for ``timeout``
  seconds, then raises :class:`StoreBusyError`, whose message names the other
  process.

Schema versions
---------------
``meta.schema_version`` records the version; :data:`_MIGRATIONS` holds one
function per version step, applied in order, each in a transaction, whenever a
store is opened for writing. A read-only open of an outdated store, or any open
of a store written by a newer program, raises :class:`StoreError`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from cmil_core.errors import CmilError, InputError

__all__ = [
    "AUDIT_ACTIONS",
    "QC_METRICS",
    "SCHEMA_VERSION",
    "CohortExistsError",
    "CohortRow",
    "ModelRow",
    "PatientRow",
    "SlideRow",
    "Store",
    "StoreBusyError",
    "StoreError",
    "StoreOutdatedError",
    "add_model",
    "audit_frame",
    "cohort_overview",
    "default_db_path",
    "delete_cohort",
    "delete_model",
    "find_slide",
    "finish_ingest_run",
    "get_meta",
    "get_model",
    "import_patients",
    "ingest_runs_frame",
    "list_cohorts",
    "list_models",
    "list_slides",
    "lookalike_regions_frame",
    "mark_slide_failed",
    "open_store",
    "passed_patches",
    "patches_frame",
    "patient_scores_frame",
    "patients_frame",
    "qc_counts",
    "qc_metric_histogram",
    "qc_summary",
    "record_audit",
    "register_slide",
    "replace_lookalike_regions",
    "replace_tumor_regions",
    "schema_version",
    "set_meta",
    "set_slides_status",
    "slide_glass_colours",
    "slides_with_sha256",
    "start_ingest_run",
    "store_fingerprint",
    "table_counts",
    "tumor_regions_frame",
    "using",
    "write_scores",
    "write_slide_patches",
]

SLIDE_STATUSES = ("pending", "tiled", "encoded", "failed")
COHORT_ROLES = ("train", "validation", "test")


class StoreError(CmilError):
    """The store cannot be used as asked (wrong version, closed, missing)."""


class StoreBusyError(StoreError):
    """Another process holds the store file."""


class StoreOutdatedError(StoreError):
    """A read-only open of a store written by an older (or newer) schema version."""


class CohortExistsError(StoreError, InputError):
    """An import would overwrite a cohort's patients without ``replace``."""


def default_db_path() -> Path:
    """The store the dashboard and commands use.

    ``$CMIL_DB`` when set, else ``cmil.duckdb`` in the data folder:
    ``$CMIL_DATA_DIR`` when set, else the project's ``data/`` (in a checkout),
    else ``data/`` in the current folder (the package installed with ``pip
    install .``, whose own folder is no place for data).
    """
    env = os.environ.get("CMIL_DB", "").strip()
    if env:
        return Path(env)
    home = os.environ.get("CMIL_DATA_DIR", "").strip()
    if home:
        base = Path(home)
    else:
        checkout = Path(__file__).resolve().parent.parent
        base = checkout / "data" if (checkout / "app.py").is_file() else Path.cwd() / "data"
    return base / "cmil.duckdb"


def store_fingerprint(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """A cheap value that changes whenever the store file changes.

    Used by the dashboard as a cache key: (mtime_ns, size) of the file and of
    its write-ahead log. ``(0, 0, 0)`` when the file does not exist.
    """
    p = Path(path)
    wal = Path(str(p) + ".wal")
    if not p.exists():
        return (0, 0, 0)
    st = p.stat()
    wal_size = wal.stat().st_size if wal.exists() else 0
    wal_mtime = wal.stat().st_mtime_ns if wal.exists() else 0
    return (max(st.st_mtime_ns, wal_mtime), st.st_size, wal_size)


# --------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------

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
    :data:`cmil_core.quality.QC_RULES`, without reading slides again.
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
    # (cmil_core.recalibration): ``score`` is on that scale, the cutoff's.
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


# One function per version step: _MIGRATIONS[k] takes a store from version k
# to version k + 1. Append; never edit a released step.
_MIGRATIONS: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def _read_version(con: duckdb.DuckDBPyConnection) -> int:
    has_meta = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
    ).fetchone()
    if not has_meta or has_meta[0] == 0:
        return 0
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    version = _read_version(con)
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
            _MIGRATIONS[step](con)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(step + 1)]
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


# --------------------------------------------------------------------------
# Opening: a process-wide registry of database objects
# --------------------------------------------------------------------------

@dataclass
class _Database:
    con: duckdb.DuckDBPyConnection
    read_only: bool
    refs: int


_registry: dict[str, _Database] = {}
_registry_cond = threading.Condition()

_LOCK_PID = re.compile(r"PID (\d+)")


def _describe_process(pid: str) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = ""
    return f"PID {pid}: {cmd[:120]}" if cmd else f"PID {pid}"


# DuckDB threads of a store opened for writing. A writer's work is many small
# transactions (one per slide, one per cohort's scores), for which handing each
# statement to a second thread costs more than it gains: on 2 cores, writing the
# study's 1.4 million patches slide by slide took a quarter less time, wall and
# CPU, on one thread (bench/scale.py). Read-only opens keep DuckDB's default (one
# thread per core) for the pages' aggregate queries.
_WRITER_THREADS = 1


def _connect(path: Path, read_only: bool, timeout: float) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            if read_only:
                return duckdb.connect(str(path), read_only=True)
            return duckdb.connect(str(path), config={"threads": _WRITER_THREADS})
        except duckdb.IOException as exc:
            text = str(exc)
            if "lock" not in text.lower():
                raise StoreError(f"{path}: cannot open the store: {text.splitlines()[0]}") from exc
            if time.monotonic() >= deadline:
                match = _LOCK_PID.search(text)
                who = _describe_process(match.group(1)) if match else "another process"
                raise StoreBusyError(
                    f"{path}: the store is in use by another process ({who}); "
                    "wait for it to finish, or stop it, and try again"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class Store:
    """A reference to an open results store; use it from any thread.

    Create with :func:`open_store`; close with :meth:`close` or a ``with``
    block. ``store.read_only`` says whether writes are allowed.
    """

    def __init__(self, path: Path, key: str, read_only: bool) -> None:
        self.path = path
        self._key = key
        self.read_only = read_only
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"Store({str(self.path)!r}, {mode})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor on the shared database object."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            with _registry_cond:
                db = _registry[self._key]
                cur = db.con.cursor()
            self._local.cursor = cur
            with self._cursors_lock:
                self._cursors.append(cur)
        return cur

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All or nothing: commit when the block ends, roll back on any exception."""
        self._require_writable()
        cur = self.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path}: the store was opened read-only")

    def close(self) -> None:
        """Release this reference; the file closes with the last one."""
        if self._closed:
            return
        self._closed = True
        with self._cursors_lock:
            for cur in self._cursors:
                with suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()
        with _registry_cond:
            db = _registry.get(self._key)
            if db is None:
                return
            db.refs -= 1
            if db.refs <= 0:
                db.con.close()
                del _registry[self._key]
                _registry_cond.notify_all()


def open_store(
    path: str | os.PathLike[str] | None = None,
    *,
    read_only: bool = False,
    timeout: float = 10.0,
) -> Store:
    """Open (and, for writing, create and migrate) the store at ``path``.

    ``path`` defaults to :func:`default_db_path`. Read-only opening of a file
    that does not exist raises :class:`StoreError`. See the module docstring
    for what happens when the file is already open.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with open_store(Path(folder) / "cmil.duckdb") as store:
    ...         schema_version(store) == SCHEMA_VERSION
    True
    """
    p = Path(path) if path is not None else default_db_path()
    p = p.expanduser()
    if read_only and not p.exists():
        raise StoreError(f"{p}: no store here yet")
    if not read_only:
        p.parent.mkdir(parents=True, exist_ok=True)
    key = str(p.resolve())
    deadline = time.monotonic() + timeout
    with _registry_cond:
        while True:
            db = _registry.get(key)
            if db is None:
                con = _connect(p, read_only, max(0.0, deadline - time.monotonic()))
                try:
                    if read_only:
                        version = _read_version(con)
                        if version != SCHEMA_VERSION:
                            raise StoreOutdatedError(
                                f"{p}: store schema version {version}, this program uses "
                                f"{SCHEMA_VERSION}; open it once for writing (any command "
                                "with --db) to upgrade it"
                            )
                    else:
                        _migrate(con, p)
                except BaseException:
                    con.close()
                    raise
                db = _Database(con=con, read_only=read_only, refs=0)
                _registry[key] = db
                break
            if read_only or not db.read_only:
                break
            # This process reads the file and a writer wants it: wait for the
            # readers (short-lived) to close, then reopen for writing.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreBusyError(
                    f"{p}: the store is open read-only in this process; try again shortly"
                )
            _registry_cond.wait(remaining)
        db.refs += 1
        return Store(p, key, read_only)


# --------------------------------------------------------------------------
# Meta
# --------------------------------------------------------------------------

@contextmanager
def using(db: Store | str | os.PathLike[str], *, read_only: bool = False) -> Iterator[Store]:
    """The store for one unit of work: the caller's own (left open), or opened and closed here."""
    if isinstance(db, Store):
        yield db
        return
    with open_store(db, read_only=read_only) as st:
        yield st


def schema_version(store: Store) -> int:
    """The schema version of an open store."""
    return _read_version(store.cursor())


def get_meta(store: Store, key: str) -> str | None:
    """A value of the ``meta`` table, or None."""
    row = store.cursor().execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def set_meta(store: Store, key: str, value: str) -> None:
    """Set a value of the ``meta`` table."""
    with store.transaction() as cur:
        cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])


def table_counts(store: Store) -> dict[str, int]:
    """Row count of every contract table, for summaries and tests."""
    cur = store.cursor()
    names = [
        "cohorts", "patients", "slides", "patches", "models",
        "patient_scores", "patch_scores", "demo_tumor_regions",
    ]
    return {n: int(_one(cur.execute(f"SELECT count(*) FROM {n}").fetchone())[0]) for n in names}


# --------------------------------------------------------------------------
# Cohorts and patients
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Slides
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SlideRow:
    slide_id: int
    cohort: str
    patient_id: str | None
    path: str
    sha256: str | None
    kind: str | None
    width: int | None
    height: int | None
    mpp: float | None
    status: str
    error: str | None
    size_bytes: int | None
    tiling_key: str | None = None


_SLIDE_COLUMNS = (
    "slide_id, cohort, patient_id, path, sha256, kind, width, height, mpp, status, error, "
    "size_bytes, tiling_key"
)


def register_slide(
    store: Store,
    *,
    cohort: str,
    patient_id: str | None,
    path: str,
    sha256: str | None,
    kind: str | None,
    width: int | None,
    height: int | None,
    mpp: float | None,
    size_bytes: int | None,
    status: str = "pending",
    error: str | None = None,
    tumor_regions: Sequence[tuple[int, int, int, int]] | None = None,
    lookalike_regions: Sequence[tuple[str, int, int, int, int]] | None = None,
) -> int:
    """Add a slide, or update the one with the same cohort and path; returns its id.

    A slide whose file changed (another sha256) goes back to ``pending`` and
    loses its patches, so the pipeline redoes it. ``tumor_regions`` (demo
    only) replaces the slide's ground-truth boxes in the same transaction, as
    ``lookalike_regions`` (demo only: ``(kind, x, y, width, height)``) does its
    benign look-alike boxes.
    """
    if status not in SLIDE_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(SLIDE_STATUSES)}")
    now = datetime.now(UTC).replace(tzinfo=None)
    with store.transaction() as cur:
        row = cur.execute(
            "SELECT slide_id, sha256 FROM slides WHERE cohort = ? AND path = ?", [cohort, path]
        ).fetchone()
        if row is None:
            new = cur.execute(
                """INSERT INTO slides (cohort, patient_id, path, sha256, kind, width, height,
                       mpp, status, error, size_bytes, registered_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING slide_id""",
                [cohort, patient_id, path, sha256, kind, width, height, mpp, status, error,
                 size_bytes, now],
            ).fetchone()
            slide_id = int(_one(new)[0])
        else:
            slide_id = int(row[0])
            if row[1] != sha256:
                cur.execute("DELETE FROM patches WHERE slide_id = ?", [slide_id])
                cur.execute("DELETE FROM demo_tumor_regions WHERE slide_id = ?", [slide_id])
                cur.execute("DELETE FROM demo_lookalike_regions WHERE slide_id = ?", [slide_id])
            cur.execute(
                """UPDATE slides SET patient_id = ?, sha256 = ?, kind = ?, width = ?, height = ?,
                       mpp = ?, status = ?, error = ?, size_bytes = ?, registered_at = ?
                   WHERE slide_id = ?""",
                [patient_id, sha256, kind, width, height, mpp, status, error, size_bytes, now,
                 slide_id],
            )
        if tumor_regions is not None:
            _write_tumor_regions(cur, slide_id, tumor_regions)
        if lookalike_regions is not None:
            _write_lookalike_regions(cur, slide_id, lookalike_regions)
        return slide_id


def find_slide(store: Store, cohort: str, path: str) -> SlideRow | None:
    """The slide registered for ``path`` in ``cohort``, or None."""
    row = store.cursor().execute(
        f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE cohort = ? AND path = ?", [cohort, path]
    ).fetchone()
    return None if row is None else SlideRow(*row)


def slides_with_sha256(store: Store, sha256: str) -> list[SlideRow]:
    """Every slide registered with this file content (any cohort), by slide id."""
    return [
        SlideRow(*r) for r in store.cursor().execute(
            f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE sha256 = ? ORDER BY slide_id", [sha256]
        ).fetchall()
    ]


def list_slides(store: Store, cohort: str | None = None) -> list[SlideRow]:
    """Slides, by cohort, patient and path."""
    sql = f"SELECT {_SLIDE_COLUMNS} FROM slides"
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    sql += " ORDER BY cohort, patient_id, path"
    return [SlideRow(*r) for r in store.cursor().execute(sql, params).fetchall()]


def _write_tumor_regions(
    cur: duckdb.DuckDBPyConnection, slide_id: int, boxes: Sequence[tuple[int, int, int, int]]
) -> None:
    cur.execute("DELETE FROM demo_tumor_regions WHERE slide_id = ?", [slide_id])
    if boxes:
        cur.executemany(
            "INSERT INTO demo_tumor_regions VALUES (?, ?, ?, ?, ?)",
            [(slide_id, int(x), int(y), int(w), int(h)) for x, y, w, h in boxes],
        )


def replace_tumor_regions(
    store: Store, slide_id: int, boxes: Sequence[tuple[int, int, int, int]]
) -> None:
    """Set the demo's ground-truth tumour boxes (level-0 x, y, width, height) of a slide."""
    with store.transaction() as cur:
        _write_tumor_regions(cur, slide_id, boxes)


def tumor_regions_frame(store: Store, slide_id: int | None = None) -> pd.DataFrame:
    """Ground-truth tumour boxes of the demo study."""
    sql = "SELECT slide_id, x, y, width, height FROM demo_tumor_regions"
    params: list[Any] = []
    if slide_id is not None:
        sql += " WHERE slide_id = ?"
        params.append(slide_id)
    return store.cursor().execute(sql + " ORDER BY slide_id, y, x", params).df()


def _write_lookalike_regions(
    cur: duckdb.DuckDBPyConnection, slide_id: int,
    boxes: Sequence[tuple[str, int, int, int, int]],
) -> None:
    cur.execute("DELETE FROM demo_lookalike_regions WHERE slide_id = ?", [slide_id])
    if boxes:
        cur.executemany(
            "INSERT INTO demo_lookalike_regions VALUES (?, ?, ?, ?, ?, ?)",
            [(slide_id, str(k), int(x), int(y), int(w), int(h)) for k, x, y, w, h in boxes],
        )


def replace_lookalike_regions(
    store: Store, slide_id: int, boxes: Sequence[tuple[str, int, int, int, int]]
) -> None:
    """Set the demo's benign look-alike boxes ``(kind, x, y, width, height)`` of a slide."""
    with store.transaction() as cur:
        _write_lookalike_regions(cur, slide_id, boxes)


def lookalike_regions_frame(store: Store, slide_id: int | None = None) -> pd.DataFrame:
    """Ground-truth boxes of the demo's benign look-alikes: slide_id, kind, x, y, width, height."""
    sql = "SELECT slide_id, kind, x, y, width, height FROM demo_lookalike_regions"
    params: list[Any] = []
    if slide_id is not None:
        sql += " WHERE slide_id = ?"
        params.append(slide_id)
    return store.cursor().execute(sql + " ORDER BY slide_id, y, x", params).df()


def slide_glass_colours(store: Store, cohort: str) -> dict[int, tuple[float, float, float]]:
    """The glass colour (RGB) tiling estimated for each tiled slide of a cohort."""
    rows = store.cursor().execute(
        """SELECT slide_id, tiling->'$.foreground.glass_rgb' FROM slides
           WHERE cohort = ? AND tiling IS NOT NULL""",
        [cohort],
    ).fetchall()
    out: dict[int, tuple[float, float, float]] = {}
    for slide_id, raw in rows:
        values = json.loads(raw) if isinstance(raw, str) else raw
        if values and len(values) == 3:
            out[int(slide_id)] = (float(values[0]), float(values[1]), float(values[2]))
    return out


# --------------------------------------------------------------------------
# Patches and ingest runs
# --------------------------------------------------------------------------

# patch_id = slide_id * PATCH_ID_BASE + row number in grid order: stable across
# reruns of the same tiling, and unique without a sequence.
PATCH_ID_BASE = 1 << 24

PATCH_COLUMNS = (
    "g_col", "g_row", "x", "y", "size", "qc_pass", "qc_reason", "foreground_fraction",
    "thick_fraction", "background_fraction", "mean_intensity", "dark_fraction",
    "bright_fraction", "blur_variance", "nuclei_fraction", "nuclear_area_um2",
)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """``fetchone()`` of a query that always returns a row (an aggregate without
    GROUP BY, an INSERT ... RETURNING): the row, typed as present."""
    assert row is not None, "the query returned no row"
    return row


def start_ingest_run(
    store: Store, cohort: str, *, source: str, manifest: str | None, config: dict[str, Any]
) -> int:
    """Record the start of an ingest run with its tiling and QC settings; returns its id.

    Runs of the cohort still marked ``running`` were killed (a finished or
    failed run always records its end): they become ``interrupted``.
    """
    with store.transaction() as cur:
        cur.execute(
            "UPDATE ingest_runs SET status = 'interrupted' WHERE cohort = ? AND status = 'running'",
            [cohort],
        )
        row = cur.execute(
            """INSERT INTO ingest_runs (cohort, source, manifest, config, started_at)
               VALUES (?, ?, ?, ?, ?) RETURNING run_id""",
            [cohort, source, manifest, json.dumps(config), _now()],
        ).fetchone()
    return int(_one(row)[0])


def finish_ingest_run(store: Store, run_id: int, status: str, summary: dict[str, Any]) -> None:
    """Record how an ingest run ended (``done`` or ``failed``) and its counts."""
    with store.transaction() as cur:
        cur.execute(
            "UPDATE ingest_runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ?",
            [_now(), status, json.dumps(summary), run_id],
        )


def ingest_runs_frame(store: Store, cohort: str | None = None) -> pd.DataFrame:
    """Ingest runs, newest first, with their settings (``config``) and counts (``summary``)."""
    sql = "SELECT * FROM ingest_runs"
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY run_id DESC", params).df()


def write_slide_patches(
    store: Store,
    slide_id: int,
    patches: pd.DataFrame,
    *,
    tiling_key: str,
    tiling: dict[str, Any],
    run_id: int | None,
) -> int:
    """Replace a slide's patches and mark it ``tiled``, in one transaction.

    ``patches`` has :data:`PATCH_COLUMNS`, rows in grid order. A crash before
    the commit leaves the slide as it was, so a rerun redoes it whole.
    """
    missing = [c for c in PATCH_COLUMNS if c not in patches.columns]
    if missing:
        raise ValueError(f"patch table lacks columns {missing}")
    if len(patches) >= PATCH_ID_BASE:
        raise ValueError(f"{len(patches)} patches exceed one slide's id range")
    slide_id = int(slide_id)
    table = _patch_rows_arrow(slide_id, patches)
    # Unregistered once the transaction has ended: a failed statement aborts the
    # transaction, in which nothing (not even unregistering) runs until it is
    # rolled back.
    try:
        with store.transaction() as cur:
            cur.register("_new_patches", table)
            cur.execute("DELETE FROM patches WHERE slide_id = ?", [slide_id])
            cur.execute("INSERT INTO patches BY NAME SELECT * FROM _new_patches")
            cur.execute(
                """UPDATE slides SET status = 'tiled', error = NULL, tiling_key = ?,
                       tiling = ?, tiled_at = ?, run_id = ? WHERE slide_id = ?""",
                [tiling_key, json.dumps(tiling), _now(), run_id, slide_id],
            )
    finally:
        store.cursor().unregister("_new_patches")
    return int(table.num_rows)


# Arrow types of the patches table's columns (DuckDB then casts nothing).
_PATCH_ARROW_TYPES = {
    "g_col": "int32", "g_row": "int32", "x": "int32", "y": "int32", "size": "int32",
    "qc_pass": "bool", "qc_reason": "string",
}


def _patch_rows_arrow(slide_id: int, patches: pd.DataFrame) -> Any:
    """A slide's patch rows as an Arrow table: patch_id, slide_id, then :data:`PATCH_COLUMNS`.

    Built column by column from the frame's arrays, in the table's own types:
    DuckDB scans Arrow faster than a pandas frame with a text column, and
    this runs once per slide (bench/scale.py measures it at the study's
    1,432 slides).
    """
    import numpy as np
    import pyarrow as pa

    n = len(patches)
    columns: dict[str, Any] = {
        "patch_id": pa.array(slide_id * PATCH_ID_BASE + np.arange(n, dtype=np.int64)),
        "slide_id": pa.array(np.full(n, slide_id, dtype=np.int32)),
    }
    for name in PATCH_COLUMNS:
        kind = _PATCH_ARROW_TYPES.get(name, "float64")
        values = patches[name]
        if kind == "string":  # None, NaN and pd.NA become NULL
            columns[name] = pa.array(values.to_numpy(dtype=object), type=pa.string(),
                                     from_pandas=True)
        elif isinstance(values.dtype, np.dtype) and values.dtype.kind in "biuf":
            columns[name] = pa.array(values.to_numpy(), from_pandas=True).cast(kind)
        else:  # nullable pandas dtypes, objects: pandas' own conversion
            columns[name] = pa.Array.from_pandas(values).cast(kind)
    return pa.table(columns)


def mark_slide_failed(store: Store, slide_id: int, reason: str, *, run_id: int | None) -> None:
    """Mark a slide ``failed`` with a reason a person understands; drop its patches."""
    with store.transaction() as cur:
        cur.execute("DELETE FROM patches WHERE slide_id = ?", [slide_id])
        cur.execute(
            """UPDATE slides SET status = 'failed', error = ?, tiling_key = NULL, run_id = ?
               WHERE slide_id = ?""",
            [reason, run_id, slide_id],
        )


def patches_frame(store: Store, slide_id: int) -> pd.DataFrame:
    """A slide's patches with every metric, in grid order."""
    return store.cursor().execute(
        "SELECT * FROM patches WHERE slide_id = ? ORDER BY patch_id", [slide_id]
    ).df()


def qc_counts(store: Store, cohort: str | None = None, slide_id: int | None = None) -> pd.DataFrame:
    """Patches per slide and quality-control outcome.

    Columns: cohort, slide_id, patient_id, path, status, error, qc_reason
    (None for patches that passed, and for slides without patches), patches.
    """
    sql = """
        SELECT s.cohort, s.slide_id, s.patient_id, s.path, s.status, s.error,
               p.qc_reason, count(p.patch_id) AS patches
        FROM slides s LEFT JOIN patches p USING (slide_id)"""
    where: list[str] = []
    params: list[Any] = []
    if cohort is not None:
        where.append("s.cohort = ?")
        params.append(cohort)
    if slide_id is not None:
        where.append("s.slide_id = ?")
        params.append(slide_id)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " GROUP BY ALL ORDER BY s.cohort, s.patient_id, s.path, p.qc_reason NULLS FIRST"
    return store.cursor().execute(sql, params).df()


# --------------------------------------------------------------------------
# Audit trail
# --------------------------------------------------------------------------

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
        [_now(), who or "unknown", action, cohort, model_id,
         None if details is None else json.dumps(details, default=str)],
    )


def audit_frame(store: Store, limit: int = 1000) -> pd.DataFrame:
    """The audit trail, newest first: audit_id, happened_at, who, action, cohort, model_id,
    details."""
    return store.cursor().execute(
        "SELECT * FROM audit ORDER BY audit_id DESC LIMIT ?", [int(limit)]
    ).df()


QC_METRICS = (
    "background_fraction", "mean_intensity", "dark_fraction", "bright_fraction",
    "blur_variance", "nuclei_fraction", "nuclear_area_um2", "thick_fraction",
)


def qc_summary(store: Store) -> pd.DataFrame:
    """Patches per cohort and quality-control outcome, computed in the database.

    Columns: cohort, qc_reason (None for patches kept), patches. Cohorts
    without patches are absent.
    """
    return store.cursor().execute(
        """SELECT s.cohort, p.qc_reason, count(*) AS patches
           FROM patches p JOIN slides s USING (slide_id)
           GROUP BY ALL ORDER BY s.cohort, p.qc_reason NULLS FIRST"""
    ).df()


def qc_metric_histogram(store: Store, metric: str, bins: int = 30) -> pd.DataFrame:
    """Histogram of one patch metric per cohort, kept and rejected patches apart.

    Bins are equal-width between the 0.5th and 99.5th percentiles over all
    patches (values outside are counted in the end bins), so that one extreme
    patch does not squash the picture; binned in the database, never loading
    the patches. Columns: cohort, bin_low, bin_high, kept, rejected.
    """
    if metric not in QC_METRICS:
        raise InputError(f"unknown quality metric {metric!r}; one of: {', '.join(QC_METRICS)}")
    if not 1 <= bins <= 1000:
        raise InputError(f"bins must be between 1 and 1000, not {bins}")
    cur = store.cursor()
    low, high = _one(cur.execute(
        f"SELECT quantile_cont({metric}, 0.005), quantile_cont({metric}, 0.995) FROM patches"
    ).fetchone())
    if low is None or high is None:
        return pd.DataFrame(columns=["cohort", "bin_low", "bin_high", "kept", "rejected"])
    width = (high - low) / bins if high > low else 1.0
    frame = cur.execute(
        f"""SELECT s.cohort,
                   least(greatest(floor((p.{metric} - ?) / ?), 0), ?)::INTEGER AS bin,
                   count(*) FILTER (WHERE p.qc_pass) AS kept,
                   count(*) FILTER (WHERE NOT p.qc_pass) AS rejected
            FROM patches p JOIN slides s USING (slide_id)
            WHERE p.{metric} IS NOT NULL AND NOT isnan(p.{metric})
            GROUP BY ALL ORDER BY s.cohort, bin""",
        [low, width, bins - 1],
    ).df()
    frame["bin_low"] = low + frame.pop("bin") * width
    frame["bin_high"] = frame["bin_low"] + width
    return frame[["cohort", "bin_low", "bin_high", "kept", "rejected"]]


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def list_models(store: Store) -> pd.DataFrame:
    """Models, newest first."""
    return store.cursor().execute(
        """SELECT model_id, created_at, aggregator, encoder, train_cohorts, cutoff
           FROM models ORDER BY created_at DESC, model_id DESC"""
    ).df()


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    created_at: datetime
    aggregator: str
    encoder: str
    train_cohorts: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    artifact_path: str
    cutoff: float | None


def add_model(store: Store, model: ModelRow) -> None:
    """Record a trained model (its artifacts are already on disk)."""
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [model.model_id, model.created_at, model.aggregator, model.encoder,
             model.train_cohorts, json.dumps(model.config), json.dumps(model.metrics),
             model.artifact_path, model.cutoff],
        )


def delete_model(store: Store, model_id: str) -> None:
    """Remove a model's row and all its scores (its files are the caller's to remove)."""
    with store.transaction() as cur:
        cur.execute("DELETE FROM patch_scores WHERE model_id = ?", [model_id])
        cur.execute("DELETE FROM patient_scores WHERE model_id = ?", [model_id])
        cur.execute("DELETE FROM oof_scores WHERE model_id = ?", [model_id])
        cur.execute("DELETE FROM models WHERE model_id = ?", [model_id])


def get_model(store: Store, model_id: str) -> ModelRow | None:
    """A model's row, with config and metrics decoded; None when unknown."""
    row = store.cursor().execute(
        """SELECT model_id, created_at, aggregator, encoder, train_cohorts, config, metrics,
                  artifact_path, cutoff FROM models WHERE model_id = ?""",
        [model_id],
    ).fetchone()
    if row is None:
        return None
    values = list(row)
    values[5] = json.loads(values[5]) if values[5] else {}
    values[6] = json.loads(values[6]) if values[6] else {}
    return ModelRow(*values)


def write_scores(
    store: Store,
    model_id: str,
    cohort: str,
    patients: pd.DataFrame,
    patches: pd.DataFrame,
    *,
    qc_decision_id: int | None = None,
    tiling_mismatch: str | None = None,
) -> None:
    """Replace a model's scores for one cohort, in one transaction.

    ``patients``: patient_id, score, risk_group (and optionally score_raw). ``patches``: patch_id,
    probability, attention, attention_raw (patches of this cohort's slides).
    ``qc_decision_id``: the cohort's QC decision the scores were made on (the
    scores are stale once the cohort is decided again); ``tiling_mismatch``:
    what differed from the training cohort's tiling or QC when the user scored
    anyway (None: nothing differed).
    """
    import numpy as np
    import pyarrow as pa

    p = patients.loc[:, ["patient_id", "score", "risk_group"]].copy()
    # score_raw (optional): the final model's output before its map onto the
    # out-of-fold scale (cmil_core.recalibration); NULL when not given.
    p["score_raw"] = (patients["score_raw"].to_numpy(dtype=float) if "score_raw" in patients
                      else np.full(len(p), np.nan))
    p.insert(0, "cohort", cohort)
    p.insert(0, "model_id", model_id)
    p["qc_decision_id"] = pd.array([qc_decision_id] * len(p), dtype="Int32")
    p["tiling_mismatch"] = pd.array([tiling_mismatch] * len(p), dtype="string")
    # Patch scores as Arrow columns (NaN becomes NULL, as from pandas), the model id
    # a parameter rather than a text column of a million copies; stored in patch-id
    # order, i.e. slide by slide, so that reading one patient's or one slide's
    # scores skips the other row groups (_scored_arrays). bench/scale.py measures
    # this write at the study's 2.8 million patch scores.
    order = np.argsort(patches["patch_id"].to_numpy(dtype=np.int64), kind="stable")
    q = pa.table({
        "patch_id": pa.array(patches["patch_id"].to_numpy(dtype=np.int64)[order]),
        **{name: pa.array(patches[name].to_numpy(dtype=np.float64, na_value=np.nan)[order],
                          from_pandas=True)
           for name in ("probability", "attention", "attention_raw")},
    })
    try:
        with store.transaction() as cur:
            cur.execute(
                "DELETE FROM patient_scores WHERE model_id = ? AND cohort = ?", [model_id, cohort]
            )
            # The cohort's patches are those of its slides: patch_id // PATCH_ID_BASE is
            # the slide (write_slide_patches), so no join with the patches table is needed.
            cur.execute(
                f"""DELETE FROM patch_scores WHERE model_id = ?
                       AND patch_id // {PATCH_ID_BASE} IN (SELECT slide_id FROM slides
                                                           WHERE cohort = ?)""",
                [model_id, cohort],
            )
            cur.register("_p", p)
            cur.execute("INSERT INTO patient_scores BY NAME SELECT * FROM _p")
            cur.register("_q", q)
            cur.execute(
                """INSERT INTO patch_scores (model_id, patch_id, probability, attention,
                       attention_raw)
                   SELECT ?, patch_id, probability, attention, attention_raw FROM _q""",
                [model_id],
            )
    finally:  # once the transaction has ended (an aborted one accepts nothing)
        cur = store.cursor()
        cur.unregister("_p")
        cur.unregister("_q")


def patient_scores_frame(store: Store, model_id: str, cohort: str | None = None) -> pd.DataFrame:
    """A model's patient scores joined with labels and survival.

    ``score`` is on the out-of-fold scale (the cutoff's); ``score_raw`` is the
    final model's own output (NaN for scores written before it was kept).
    """
    sql = """SELECT s.cohort, s.patient_id, s.score, s.risk_group, s.score_raw, p.bm_metastasis,
                    p.os_months, p.os_event, p.efs_months, p.efs_event
             FROM patient_scores s JOIN patients p USING (cohort, patient_id)
             WHERE s.model_id = ?"""
    params: list[Any] = [model_id]
    if cohort is not None:
        sql += " AND s.cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY s.cohort, s.patient_id", params).df()


# --- out-of-fold scores (honest numbers for the training cohort) ---

__all__ += ["localisation_patches", "oof_scores_frame", "patient_flow", "write_oof_scores"]


def write_oof_scores(store: Store, model_id: str, cohort: str, scores: pd.DataFrame) -> None:
    """Replace a model's out-of-fold scores of its training cohort, in one transaction.

    ``scores``: patient_id, fold (0-based, the fold in which the patient was
    held out), score (from the fold model that did not see the patient).
    """
    frame = pd.DataFrame({
        "model_id": model_id, "cohort": cohort,
        "patient_id": scores["patient_id"].astype(str).to_numpy(),
        "fold": scores["fold"].to_numpy(dtype="int64"),
        "score": scores["score"].to_numpy(dtype=float),
    })
    try:
        with store.transaction() as cur:
            cur.execute("DELETE FROM oof_scores WHERE model_id = ? AND cohort = ?",
                        [model_id, cohort])
            cur.register("_o", frame)
            cur.execute("INSERT INTO oof_scores BY NAME SELECT * FROM _o")
    finally:
        store.cursor().unregister("_o")


def oof_scores_frame(store: Store, model_id: str, cohort: str | None = None) -> pd.DataFrame:
    """A model's out-of-fold training scores joined with labels and survival.

    Columns as :func:`patient_scores_frame` (``risk_group`` empty, ``score_raw``
    NaN) plus ``fold``.
    """
    sql = """SELECT o.cohort, o.patient_id, o.score, CAST(NULL AS TEXT) AS risk_group,
                    CAST(NULL AS DOUBLE) AS score_raw, p.bm_metastasis, p.os_months,
                    p.os_event, p.efs_months, p.efs_event, o.fold
             FROM oof_scores o JOIN patients p USING (cohort, patient_id)
             WHERE o.model_id = ?"""
    params: list[Any] = [model_id]
    if cohort is not None:
        sql += " AND o.cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY o.cohort, o.patient_id", params).df()


def localisation_patches(store: Store, model_id: str) -> pd.DataFrame:
    """Every scored patch of a model with its patient's label, for checks against ground truth.

    Columns: cohort, patient_id, bm_metastasis, slide_id, patch_id, x, y, size,
    probability, attention.
    """
    return store.cursor().execute(
        """SELECT s.cohort, s.patient_id, pt.bm_metastasis, p.slide_id, p.patch_id, p.x, p.y,
                  p.size, ps.probability, ps.attention
           FROM patch_scores ps JOIN patches p USING (patch_id) JOIN slides s USING (slide_id)
           JOIN patients pt ON pt.cohort = s.cohort AND pt.patient_id = s.patient_id
           WHERE ps.model_id = ?
           ORDER BY s.cohort, s.patient_id, p.patch_id""",
        [model_id],
    ).df()


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


def passed_patches(store: Store, cohort: str) -> pd.DataFrame:
    """Patches that passed quality control on the cohort's tiled slides, in slide and grid order.

    Columns: slide_id, patient_id, path, sha256, mpp, tiling_key, patch_id, x, y, size.
    """
    return store.cursor().execute(
        """SELECT s.slide_id, s.patient_id, s.path, s.sha256, s.mpp, s.tiling_key,
                  p.patch_id, p.x, p.y, p.size
           FROM patches p JOIN slides s USING (slide_id)
           WHERE s.cohort = ? AND s.status IN ('tiled', 'encoded') AND p.qc_pass
           ORDER BY s.slide_id, p.patch_id""",
        [cohort],
    ).df()


def set_slides_status(store: Store, slide_ids: Sequence[int], status: str) -> None:
    """Move slides to ``status`` (e.g. ``encoded`` once their features are on disk)."""
    if status not in SLIDE_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(SLIDE_STATUSES)}")
    if not slide_ids:
        return
    with store.transaction() as cur:
        cur.executemany(
            "UPDATE slides SET status = ? WHERE slide_id = ?", [(status, int(i)) for i in slide_ids]
        )


# --------------------------------------------------------------------------
# Summaries for the overview
# --------------------------------------------------------------------------

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


# --- patient review (patients page) ---

__all__ += [
    "RANKABLE_SCORES",
    "extreme_patches",
    "get_slide",
    "has_model",
    "patient_slide_ids",
    "patient_slides",
    "rejected_patches_frame",
    "scored_patches_frame",
]


def get_slide(store: Store, slide_id: int) -> SlideRow | None:
    """One slide's row by id, or None."""
    row = store.cursor().execute(
        f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE slide_id = ?", [int(slide_id)]
    ).fetchone()
    return None if row is None else SlideRow(*row)


def patient_slides(store: Store, cohort: str, patient_id: str) -> list[SlideRow]:
    """A patient's slides, by path."""
    rows = store.cursor().execute(
        f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE cohort = ? AND patient_id = ? ORDER BY path",
        [cohort, patient_id],
    ).fetchall()
    return [SlideRow(*r) for r in rows]


_SCORED_COLUMNS = ("patch_id", "slide_id", "x", "y", "size", "probability", "attention",
                   "attention_raw")


def _scored_arrays(store: Store, model_id: str, slide_ids: Sequence[int]) -> dict[str, Any]:
    """A model's scored patches of some slides as arrays (:data:`_SCORED_COLUMNS`),
    in patch-id order (slide, then grid).

    patch_id = slide_id * PATCH_ID_BASE + row, so one slide's patches form one
    contiguous id range, and both tables are written in id order, slide by
    slide (:func:`write_slide_patches`, :func:`write_scores`). Filtering both
    on the slides' id range lets DuckDB skip, by each row group's min/max,
    all but the row groups holding these slides; the two tables are read in
    one statement (one snapshot) without a join, and matched here by patch id.
    At the study's 1.4 million patches this takes about a millisecond, a
    third of a join of the tables (bench/scale.py).
    """
    import numpy as np

    ids = sorted({int(i) for i in slide_ids})
    if not ids:
        ids = [-1]  # no slide: an empty id range below
    low, high = ids[0] * PATCH_ID_BASE, (ids[-1] + 1) * PATCH_ID_BASE - 1
    # Both tables in one homogeneous result (no NULL: fetched as plain arrays):
    # _kind 1 = a score (a, b, c = probability, attention, attention_raw; NaN where
    # missing), _kind 0 = a patch (a, b, c, d = x, y, size, slide_id).
    rows = store.cursor().execute(
        """SELECT 1 AS _kind, patch_id, coalesce(probability, 'NaN') AS a,
                  coalesce(attention, 'NaN') AS b, coalesce(attention_raw, 'NaN') AS c,
                  0 AS d
           FROM patch_scores WHERE model_id = ? AND patch_id BETWEEN ? AND ?
           UNION ALL
           SELECT 0, patch_id, x, y, size, slide_id
           FROM patches WHERE patch_id BETWEEN ? AND ?""",
        [model_id, low, high, low, high],
    ).fetchnumpy()
    kind = np.asarray(rows["_kind"])
    patch_id = np.asarray(rows["patch_id"], dtype=np.int64)
    is_score = kind == 1
    if ids[-1] - ids[0] + 1 != len(ids):  # slides of others lie within the range
        wanted = np.isin(patch_id // PATCH_ID_BASE, ids)
        score_rows, patch_rows = (np.flatnonzero(is_score & wanted),
                                  np.flatnonzero(~is_score & wanted))
    else:
        score_rows, patch_rows = np.flatnonzero(is_score), np.flatnonzero(~is_score)
    # Unique on each side (primary keys); the result is sorted: patch-id order.
    common, i, j = np.intersect1d(patch_id[score_rows], patch_id[patch_rows],
                                  assume_unique=True, return_indices=True)
    score_rows, patch_rows = score_rows[i], patch_rows[j]
    a, b, c, d = (np.asarray(rows[name]) for name in "abcd")
    return {
        "patch_id": common,
        "slide_id": d[patch_rows].astype(np.int32),
        "x": a[patch_rows].astype(np.int32),
        "y": b[patch_rows].astype(np.int32),
        "size": c[patch_rows].astype(np.int32),
        "probability": a[score_rows].astype(np.float64),
        "attention": b[score_rows].astype(np.float64),
        "attention_raw": c[score_rows].astype(np.float64),
    }


def patient_slide_ids(store: Store, cohort: str, patient_id: str) -> list[int]:
    """The ids of a patient's slides, in id order."""
    rows = store.cursor().execute(
        "SELECT slide_id FROM slides WHERE cohort = ? AND patient_id = ? ORDER BY slide_id",
        [cohort, patient_id],
    ).fetchall()
    return [int(r[0]) for r in rows]


def has_model(store: Store, model_id: str) -> bool:
    """Whether the store holds this model (cheaper than :func:`get_model`)."""
    row = store.cursor().execute(
        "SELECT count(*) FROM models WHERE model_id = ?", [model_id]).fetchone()
    return bool(row and row[0])


def scored_patches_frame(
    store: Store,
    model_id: str,
    *,
    slide_id: int | None = None,
    cohort: str | None = None,
    patient_id: str | None = None,
) -> pd.DataFrame:
    """A model's patch scores on one slide, or on all of one patient's slides.

    Give ``slide_id``, or ``cohort`` and ``patient_id``. Columns: patch_id,
    slide_id, x, y, size (level-0 pixels), probability, attention,
    attention_raw (NaN where the model gives none); in slide and grid order.
    """
    if slide_id is not None:
        ids = [int(slide_id)]
    else:
        if cohort is None or patient_id is None:
            raise ValueError("scored_patches_frame needs slide_id, or cohort and patient_id")
        ids = patient_slide_ids(store, cohort, patient_id)
    return pd.DataFrame(_scored_arrays(store, model_id, ids), columns=list(_SCORED_COLUMNS))


#: Patch columns :func:`slide_patch_arrays` returns beside the QC metrics.
VIEWER_PATCH_COLUMNS = ("patch_id", "x", "y", "size", "qc_pass", "qc_reason")
#: Quality metrics the viewer shows on hover and the GeoJSON export carries.
VIEWER_METRICS = ("background_fraction", "foreground_fraction", "thick_fraction",
                  "mean_intensity", "dark_fraction", "bright_fraction", "blur_variance",
                  "nuclei_fraction", "nuclear_area_um2")


def slide_patch_arrays(store: Store, slide_id: int, model_id: str | None = None
                       ) -> dict[str, Any]:
    """One slide's patches for the slide viewer and its exports, as arrays in grid order.

    Keys: :data:`VIEWER_PATCH_COLUMNS` (``qc_reason`` an object array, None
    where there is none), :data:`VIEWER_METRICS` (float, NaN where missing)
    and, with ``model_id``, ``probability``, ``attention``, ``attention_raw``
    (float, NaN where the model did not score the patch).

    Only these columns are read, and both tables through the slide's
    patch-id range (``slide_id * PATCH_ID_BASE`` onwards, see
    :func:`_scored_arrays`), so DuckDB reads only the row groups that hold
    the slide: about 10 ms at the study's 1.5 million patch rows, where
    ``SELECT *`` by slide id, a second query for the scores and a pandas
    merge took about 4 times as long (bench/viewer.py).
    """
    import numpy as np

    low, high = int(slide_id) * PATCH_ID_BASE, (int(slide_id) + 1) * PATCH_ID_BASE - 1
    metrics = ", ".join(f"coalesce(p.{m}, 'NaN') AS {m}" for m in VIEWER_METRICS)
    params: list[Any]
    if model_id is None:
        scores, join, params = "", "", [low, high]
    else:
        scores = (", coalesce(c.probability, 'NaN') AS probability, "
                  "coalesce(c.attention, 'NaN') AS attention, "
                  "coalesce(c.attention_raw, 'NaN') AS attention_raw")
        join = ("LEFT JOIN patch_scores c ON c.patch_id = p.patch_id AND c.model_id = ? "
                "AND c.patch_id BETWEEN ? AND ?")
        params = [model_id, low, high, low, high]
    rows = store.cursor().execute(
        f"""SELECT p.patch_id, p.x, p.y, p.size, p.qc_pass, p.qc_reason, {metrics}{scores}
            FROM patches p {join}
            WHERE p.patch_id BETWEEN ? AND ? ORDER BY p.patch_id""",
        params,
    ).fetchnumpy()
    out: dict[str, Any] = {}
    for name, values in rows.items():
        if name == "qc_reason":
            reasons = np.array(np.ma.getdata(values), dtype=object)
            reasons[np.ma.getmaskarray(values)] = None
            out[name] = reasons
        elif name == "patch_id":
            out[name] = np.asarray(values, dtype=np.int64)
        elif name in ("x", "y", "size"):
            out[name] = np.asarray(values, dtype=np.int32)
        elif name == "qc_pass":
            out[name] = np.asarray(values, dtype=bool)
        else:
            out[name] = np.asarray(values, dtype=np.float64)
    return out


#: Per-patch scores :func:`extreme_patches` can rank by.
RANKABLE_SCORES = ("attention", "attention_raw", "probability")


def extreme_patches(
    store: Store, model_id: str, slide_ids: Sequence[int], *, by: str, k: int
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """``(top, bottom, scored)``: some slides' ``k`` highest-``by`` patches and ``k`` lowest.

    ``top``: the ``k`` scored patches of ``slide_ids`` with the highest
    ``by`` (one of :data:`RANKABLE_SCORES`), highest first; ``bottom``: the
    ``k`` lowest of the others, lowest first; ties by patch id; patches
    without a value of ``by`` (NULL or NaN) are left out. Columns as
    :func:`scored_patches_frame`. ``scored``: how many patches of those
    slides the model scored, with or without a value of ``by``.
    """
    import numpy as np

    if by not in RANKABLE_SCORES:
        raise ValueError(f"by={by!r} is not one of {', '.join(RANKABLE_SCORES)}")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    arrays = _scored_arrays(store, model_id, slide_ids)
    values, ids = arrays[by], arrays["patch_id"]
    valued = np.flatnonzero(~np.isnan(values))
    # np.lexsort sorts by its last key first: by value, ties by patch id.
    top = valued[np.lexsort((ids[valued], -values[valued]))[:k]]
    rest = np.setdiff1d(valued, top, assume_unique=True)
    bottom = rest[np.lexsort((ids[rest], values[rest]))[:k]]

    def frame(rows: Any) -> pd.DataFrame:
        return pd.DataFrame({name: arrays[name][rows] for name in _SCORED_COLUMNS})

    return frame(top), frame(bottom), len(ids)


def rejected_patches_frame(store: Store, slide_id: int, limit: int | None = None) -> pd.DataFrame:
    """A slide's patches that failed quality control, by reason then grid order.

    Columns: patch_id, slide_id, x, y, size, qc_reason, and the quality
    metrics. ``limit`` caps the rows (None: all).
    """
    sql = """SELECT patch_id, slide_id, x, y, size, qc_reason, background_fraction,
                    thick_fraction, mean_intensity, dark_fraction, bright_fraction,
                    blur_variance, nuclei_fraction, nuclear_area_um2
             FROM patches WHERE slide_id = ? AND NOT qc_pass
             ORDER BY qc_reason, patch_id"""
    params: list[Any] = [int(slide_id)]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return store.cursor().execute(sql, params).df()


# --- cohorts and models pages ---

def model_score_counts(store: Store) -> pd.DataFrame:
    """Patients scored per model and cohort: columns model_id, cohort, patients."""
    return store.cursor().execute(
        """SELECT model_id, cohort, count(*) AS patients FROM patient_scores
           GROUP BY model_id, cohort ORDER BY model_id, cohort"""
    ).df()


# --- check and backup ---

__all__ += ["ORPHAN_KINDS", "delete_orphans", "model_artifacts_frame", "orphan_counts",
            "set_model_artifact_paths", "slide_check_frame", "unknown_patient_slides"]

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
        kind: int(_one(cur.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone())[0])
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
            deleted[kind] = int(_one(n)[0])
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


# --------------------------------------------------------------------------
# Quality-control decisions: re-judging stored metrics in SQL
# --------------------------------------------------------------------------

__all__ += ["QC_DECISION_SOURCES", "apply_qc_decision", "cohort_tilings", "current_qc_decisions",
            "judge_metrics", "qc_decisions_frame", "qc_metric_ranges", "qc_near_threshold",
            "qc_patient_counts", "qc_what_if", "score_marks_frame"]

#: Where a QC decision came from.
QC_DECISION_SOURCES = ("ingest", "dashboard", "cli")
_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _qc_literal(thresholds: dict[str, Any], name: str) -> str:
    """A threshold as an exact SQL DOUBLE (parsed from Python's round-trip repr)."""
    try:
        value = float(thresholds[name])
    except KeyError:
        raise InputError(f"QC thresholds lack {name}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"QC threshold {name}={value} is not a finite number")
    return f"CAST('{value!r}' AS DOUBLE)"


def _qc_condition(column: str, op: str, name: str, thresholds: dict[str, Any],
                  prefix: str) -> str:
    """One condition of a QC rule: true when it holds; a NULL or NaN metric fails it.

    (DuckDB orders NaN above every number, so ``NaN >= x`` is true: hence ``isnan``.)
    """
    if not _SQL_NAME.fullmatch(column) or op not in (">=", "<="):
        raise ValueError(f"bad QC rule condition {(column, op, name)!r}")
    col = f"{prefix}{column}"
    return f"coalesce(NOT isnan({col}) AND {col} {op} {_qc_literal(thresholds, name)}, false)"


def _qc_reason_sql(thresholds: dict[str, Any], prefix: str = "") -> str:
    """A SQL expression: the first failing rule's reason of :data:`cmil_core.quality.QC_RULES`
    (NULL when the patch passes every rule), built from the rules themselves.

    A rule with a field scope set to ``"field"`` (``nucleated_scope``) also holds for a
    patch of a photograph (``slides.tiling`` says ``"photograph": true``) when it holds for
    any patch of the same slide; the outer patch row is ``prefix`` (``patches.`` when
    empty, as in an UPDATE of ``patches``)."""
    from cmil_core.quality import NUCLEATED_SCOPES, QC_RULES

    outer = prefix or "patches."
    whens = []
    for rule in QC_RULES:
        holds = " AND ".join(_qc_condition(c, op, n, thresholds, prefix)
                             for c, op, n in rule.conditions)
        if rule.field_setting is not None:
            scope = thresholds.get(rule.field_setting, "field")
            if scope not in NUCLEATED_SCOPES:
                raise InputError(f"QC setting {rule.field_setting}={scope!r} must be one of "
                                 f"{', '.join(NUCLEATED_SCOPES)}")
            if scope == "field":
                inner = " AND ".join(_qc_condition(c, op, n, thresholds, "q.")
                                     for c, op, n in rule.conditions)
                holds = (f"({holds}) OR EXISTS (SELECT 1 FROM patches q JOIN slides k "
                         f"ON k.slide_id = q.slide_id WHERE q.slide_id = {outer}slide_id "
                         f"AND json_extract_string(k.tiling, '$.photograph') = 'true' "
                         f"AND {inner})")
        reason = rule.reason.replace("'", "''")
        whens.append(f"WHEN NOT ({holds}) THEN '{reason}'")
    return "CASE " + " ".join(whens) + " ELSE NULL END"


def _qc_columns() -> list[str]:
    from cmil_core.quality import QC_RULES

    return list(dict.fromkeys(c for rule in QC_RULES for c, _, _ in rule.conditions))


def judge_metrics(metrics: pd.DataFrame, thresholds: dict[str, Any]) -> list[str | None]:
    """The SQL rules applied to a frame of metrics (an in-memory database): the reason per
    row, None where it passes. What :func:`apply_qc_decision` computes, for any values
    (NaN included, which the store itself keeps as NULL). An integer column ``field``
    puts rows in photographs (one per label; negative: not a photograph), as
    :func:`cmil_core.quality.qc_decision`'s ``field``."""
    frame = metrics.loc[:, _qc_columns()].astype("float64")
    labels = (metrics["field"].astype("int64") if "field" in metrics.columns
              else pd.Series(-1, index=metrics.index, dtype="int64"))
    frame = frame.assign(slide_id=labels.to_numpy(), _row=range(len(frame)))
    con = duckdb.connect()
    try:
        con.register("_metrics", frame)
        con.execute("CREATE TABLE patches AS SELECT * FROM _metrics")
        con.execute("""CREATE TABLE slides AS SELECT DISTINCT slide_id,
                           '{"photograph": true}'::JSON AS tiling
                       FROM patches WHERE slide_id >= 0""")
        rows = con.execute(
            f"SELECT {_qc_reason_sql(thresholds)} AS reason FROM patches ORDER BY _row"
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def qc_what_if(store: Store, thresholds: dict[str, Any], cohort: str | None = None
               ) -> pd.DataFrame:
    """Patches per cohort and outcome under candidate ``thresholds``, computed in the
    database without writing: columns cohort, qc_reason (None: kept), patches."""
    sql = f"""SELECT s.cohort, {_qc_reason_sql(thresholds, 'p.')} AS qc_reason,
                     count(*) AS patches
              FROM patches p JOIN slides s USING (slide_id)"""
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE s.cohort = ?"
        params.append(cohort)
    sql += " GROUP BY ALL ORDER BY s.cohort, qc_reason NULLS FIRST"
    return store.cursor().execute(sql, params).df()


def qc_patient_counts(store: Store, thresholds: dict[str, Any] | None = None,
                      cohort: str | None = None) -> pd.DataFrame:
    """Per patient with patches: cohort, patient_id, bm_metastasis, patches, kept.

    ``kept`` under the stored decision (``thresholds`` None), or under candidate
    ``thresholds`` (computed in SQL, nothing written).
    """
    kept = "p.qc_pass" if thresholds is None else f"({_qc_reason_sql(thresholds, 'p.')}) IS NULL"
    sql = f"""SELECT s.cohort, s.patient_id, any_value(pt.bm_metastasis) AS bm_metastasis,
                     count(*) AS patches, count(*) FILTER (WHERE {kept}) AS kept
              FROM patches p JOIN slides s USING (slide_id)
                   LEFT JOIN patients pt ON pt.cohort = s.cohort AND pt.patient_id = s.patient_id"""
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE s.cohort = ?"
        params.append(cohort)
    sql += " GROUP BY s.cohort, s.patient_id ORDER BY s.cohort, s.patient_id"
    return store.cursor().execute(sql, params).df()


def _decision_row(row: Sequence[Any]) -> dict[str, Any]:
    keys = ("decision_id", "cohort", "decided_at", "who", "source", "thresholds", "kept",
            "rejected")
    out = dict(zip(keys, row, strict=True))
    out["thresholds"] = json.loads(out["thresholds"]) if out["thresholds"] else {}
    return out


def qc_decisions_frame(store: Store, cohort: str | None = None) -> pd.DataFrame:
    """QC decisions, newest first: decision_id, cohort, decided_at, who, source,
    thresholds (JSON text), kept, rejected."""
    sql = "SELECT * FROM qc_decisions"
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY decision_id DESC", params).df()


def current_qc_decisions(store: Store) -> dict[str, dict[str, Any]]:
    """The latest QC decision of each cohort that has one, by cohort (thresholds decoded)."""
    rows = store.cursor().execute(
        """SELECT decision_id, cohort, decided_at, who, source, thresholds, kept, rejected
           FROM qc_decisions
           QUALIFY row_number() OVER (PARTITION BY cohort ORDER BY decision_id DESC) = 1
           ORDER BY cohort"""
    ).fetchall()
    return {r[1]: _decision_row(r) for r in rows}


def apply_qc_decision(
    store: Store, cohort: str, thresholds: dict[str, Any], *, who: str, source: str,
    only_if_changed: bool = False, audit: bool = True,
) -> dict[str, Any]:
    """Re-judge every patch of ``cohort`` from its stored metrics under ``thresholds``
    (SQL from :data:`cmil_core.quality.QC_RULES`), record the decision and its audit
    row, all in one transaction. Returns the decision (as :func:`current_qc_decisions`)
    with ``new``: whether a decision row was added.

    ``only_if_changed``: when the cohort's current decision has the same thresholds,
    the patches are re-judged (slides tiled since are judged alike) and its counts
    refreshed, but no new decision is recorded (nothing built on it goes stale).
    ``audit``: add a ``qc-decision`` audit row (False for ingest, whose own audit row
    names the decision).
    """
    if source not in QC_DECISION_SOURCES:
        raise ValueError(f"source {source!r} is not one of {', '.join(QC_DECISION_SOURCES)}")
    values = {k: (v if isinstance(v, str) else float(v)) for k, v in thresholds.items()}
    reason = _qc_reason_sql(values)
    in_cohort = "slide_id IN (SELECT slide_id FROM slides WHERE cohort = ?)"
    with store.transaction() as cur:
        known = cur.execute("SELECT count(*) FROM cohorts WHERE cohort = ?", [cohort]).fetchone()
        if not known or not known[0]:
            raise InputError(f"cohort '{cohort}' does not exist in {store.path}")
        cur.execute(f"UPDATE patches SET qc_reason = {reason} WHERE {in_cohort}", [cohort])
        cur.execute(f"UPDATE patches SET qc_pass = qc_reason IS NULL WHERE {in_cohort}", [cohort])
        counts = cur.execute(
            f"""SELECT count(*) FILTER (WHERE qc_pass), count(*) FILTER (WHERE NOT qc_pass)
                FROM patches WHERE {in_cohort}""", [cohort]).fetchone()
        kept, rejected = (int(counts[0]), int(counts[1])) if counts else (0, 0)
        last = cur.execute(
            """SELECT decision_id, cohort, decided_at, who, source, thresholds, kept, rejected
               FROM qc_decisions WHERE cohort = ? ORDER BY decision_id DESC LIMIT 1""",
            [cohort]).fetchone()
        previous = _decision_row(last) if last else None
        if only_if_changed and previous is not None and previous["thresholds"] == values:
            cur.execute("UPDATE qc_decisions SET kept = ?, rejected = ? WHERE decision_id = ?",
                        [kept, rejected, previous["decision_id"]])
            return {**previous, "kept": kept, "rejected": rejected, "new": False}
        row = cur.execute(
            """INSERT INTO qc_decisions (cohort, decided_at, who, source, thresholds, kept,
                                         rejected)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               RETURNING decision_id, cohort, decided_at, who, source, thresholds, kept,
                         rejected""",
            [cohort, _now(), who or "unknown", source, json.dumps(values, sort_keys=True), kept,
             rejected]).fetchone()
        decision = _decision_row(_one(row))
        if audit:
            record_audit(store, who, "qc-decision", cohort=cohort, details={
                "decision_id": decision["decision_id"], "source": source,
                "thresholds": values, "kept": kept, "rejected": rejected,
                "previous_decision_id": None if previous is None else previous["decision_id"]})
    return {**decision, "new": True}


def qc_metric_ranges(store: Store, cohort: str) -> pd.DataFrame:
    """Each metric a QC rule reads, over the cohort's patches: column, low, high, p01, p99
    (NaN and NULL left out; NULL statistics when the cohort has no value)."""
    cur = store.cursor()
    rows = []
    for column in _qc_columns():
        got = cur.execute(
            f"""SELECT min({column}), max({column}), quantile_cont({column}, 0.01),
                       quantile_cont({column}, 0.99)
                FROM patches p JOIN slides s USING (slide_id)
                WHERE s.cohort = ? AND {column} IS NOT NULL AND NOT isnan({column})""",
            [cohort]).fetchone()
        rows.append((column, *(got or (None,) * 4)))
    return pd.DataFrame(rows, columns=["column", "low", "high", "p01", "p99"])


def qc_near_threshold(store: Store, cohort: str, reason: str, thresholds: dict[str, Any],
                      k: int = 6) -> pd.DataFrame:
    """Sample patches of one rejection reason near its thresholds, under ``thresholds``.

    Up to ``k`` patches rejected for ``reason`` and ``k`` kept patches, each the
    nearest to the rule's thresholds: distance is ``|metric - threshold|`` over the
    metric's standard deviation in the cohort, the smallest over the rule's
    conditions (for a rejected patch, over the conditions it fails). Columns:
    side (``rejected`` or ``kept``), distance, patch_id, slide_id, path, sha256,
    mpp, x, y, size, and the rule's metrics; nearest first.
    """
    from cmil_core.quality import QC_RULES

    rule = next((r for r in QC_RULES if r.reason == reason), None)
    if rule is None:
        raise InputError(f"unknown QC reason {reason!r}; one of "
                         f"{', '.join(r.reason for r in QC_RULES)}")
    if not 1 <= int(k) <= 100:
        raise InputError(f"k={k} must be between 1 and 100")
    columns = list(dict.fromkeys(c for c, _, _ in rule.conditions))
    spreads = ", ".join(f"stddev_pop(CASE WHEN isnan({c}) THEN NULL ELSE {c} END) AS sd_{i}"
                        for i, c in enumerate(columns))
    parts = []
    for column, op, name in rule.conditions:
        i = columns.index(column)
        gap = (f"abs({column} - {_qc_literal(thresholds, name)}) / "
               f"coalesce(nullif(sd_{i}, 0), 1)")
        holds = _qc_condition(column, op, name, thresholds, "")
        parts.append(f"CASE WHEN reason IS NULL OR NOT ({holds}) THEN {gap} END")
    distance = parts[0] if len(parts) == 1 else f"least({', '.join(parts)})"
    metric_list = ", ".join(columns)
    frame = store.cursor().execute(
        f"""WITH c AS (
                SELECT p.patch_id, p.slide_id, s.path, s.sha256, s.mpp, p.x, p.y, p.size,
                       {', '.join(f'p.{c}' for c in _qc_columns())},
                       {_qc_reason_sql(thresholds, 'p.')} AS reason
                FROM patches p JOIN slides s USING (slide_id) WHERE s.cohort = ?),
            sd AS (SELECT {spreads} FROM c),
            d AS (
                SELECT CASE WHEN reason IS NULL THEN 'kept' ELSE 'rejected' END AS side,
                       {distance} AS distance, patch_id, slide_id, path, sha256, mpp, x, y,
                       size, {metric_list}
                FROM c, sd WHERE reason IS NULL OR reason = ?)
            SELECT * FROM d
            QUALIFY row_number() OVER (PARTITION BY side
                                       ORDER BY distance ASC NULLS LAST, patch_id) <= ?
            ORDER BY side DESC, distance ASC NULLS LAST, patch_id""",
        [cohort, reason, int(k)]).df()
    return frame


def cohort_tilings(store: Store, cohort: str) -> list[dict[str, Any]]:
    """The distinct tiling records (``slides.tiling``) of a cohort's tiled slides."""
    rows = store.cursor().execute(
        """SELECT DISTINCT tiling FROM slides
           WHERE cohort = ? AND status IN ('tiled', 'encoded') AND tiling IS NOT NULL""",
        [cohort]).fetchall()
    out = []
    for (raw,) in rows:
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def score_marks_frame(store: Store) -> pd.DataFrame:
    """Per model and scored cohort: model_id, cohort, patients, qc_decision_id (the
    cohort's decision the scores were made on), tiling_mismatch (None: none)."""
    return store.cursor().execute(
        """SELECT model_id, cohort, count(*) AS patients,
                  max(qc_decision_id) AS qc_decision_id,
                  max(tiling_mismatch) AS tiling_mismatch
           FROM patient_scores GROUP BY model_id, cohort ORDER BY model_id, cohort"""
    ).df()
