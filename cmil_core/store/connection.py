"""Opening the store: the process-wide registry of database objects, :class:`Store`,
:func:`open_store`, :func:`using` and the ``meta`` table.

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
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import duckdb

from cmil_core.store import schema
from cmil_core.store._base import StoreBusyError, StoreError, StoreOutdatedError, one_row


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
        checkout = Path(__file__).resolve().parents[2]  # cmil_core/store/connection.py
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
    ...         schema_version(store) == schema.SCHEMA_VERSION
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
                        version = schema.read_version(con)
                        if version != schema.SCHEMA_VERSION:
                            raise StoreOutdatedError(
                                f"{p}: store schema version {version}, this program uses "
                                f"{schema.SCHEMA_VERSION}; open it once for writing (any command "
                                "with --db) to upgrade it"
                            )
                    else:
                        schema.migrate(con, p)
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


@contextmanager
def using(db: Store | str | os.PathLike[str], *, read_only: bool = False) -> Iterator[Store]:
    """The store for one unit of work: the caller's own (left open), or opened and closed here."""
    if isinstance(db, Store):
        yield db
        return
    with open_store(db, read_only=read_only) as store:
        yield store


def schema_version(store: Store) -> int:
    """The schema version of an open store."""
    return schema.read_version(store.cursor())


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
    return {n: int(one_row(cur.execute(f"SELECT count(*) FROM {n}").fetchone())[0]) for n in names}
