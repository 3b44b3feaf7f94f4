"""Backups and restores of a store: ``backup`` and ``restore``.

The store's consistency check (run after every restore) is
:mod:`cmil_core.ops.maintenance`.

Backups
-------
``backup --db DB --out FILE`` (:func:`backup_store`) writes one zip archive:

* ``store/<name>.duckdb`` (and its ``.wal`` when there is one): the store
  file, copied while the store is open read-only in this process. DuckDB's
  file lock lets other readers (the dashboard) go on, and keeps writers of
  other processes out until the copy is done, so the copy is a consistent
  state without stopping the dashboard; a command that writes meanwhile waits
  for the lock (ingest, which opens the store per slide) or makes the backup
  wait (train and score hold it to the end). The models' folders are copied
  under the same lock, so every model row has its files;
* ``models/<model_id>/...``, ``reports/...`` and, unless ``--no-features``,
  ``features/...`` (a cache: restored stores recompute missing features);
* ``MANIFEST.json``: format, source, schema version, table counts, and the
  SHA-256 and size of every member.

Slides are not included: the store refers to them by path (copy them
yourself, at the same paths, to move a study to another machine). The
archive is written under a temporary name and renamed into place.

``restore --backup FILE --db DB`` (:func:`restore_store`) verifies every
member against the manifest before writing anything (a damaged archive is
refused, nothing written), extracts into a temporary folder beside ``DB``,
points the models at their restored folders, records the restore in the
audit trail, then moves the store, ``models/``, ``reports/`` (and
``features/`` when the backup has them) into place, and checks the result.
An existing store is replaced only with ``--force``; what it replaces is
moved aside first and deleted last, so a crash mid-restore loses nothing (a
second ``restore --force`` finishes the job; ``check`` lists the leftovers).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cmil_core import _atomic, store as store_mod
from cmil_core.errors import InputError
from cmil_core.ops.maintenance import READ_CHUNK, CheckReport, check_store

__all__ = [
    "ARTIFACT_FOLDERS",
    "BACKUP_FORMAT",
    "BACKUP_FORMAT_VERSION",
    "MANIFEST",
    "BackupSummary",
    "RestoreSummary",
    "backup_store",
    "restore_store",
]

BACKUP_FORMAT = "cmil-backup"
BACKUP_FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
#: Folders beside the store that hold its artifacts (all of them go in a backup).
ARTIFACT_FOLDERS = store_mod.StoreFolder.ARTIFACT_FOLDERS


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        return "unknown"


# --------------------------------------------------------------------------
# backup
# --------------------------------------------------------------------------

@dataclass
class BackupSummary:
    archive: str
    db: str
    members: int
    bytes: int
    models: int
    features: bool
    tables: dict[str, int]


def _files_under(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, in a stable order, skipping temporary names and links."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _atomic.is_temp_name(d))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not _atomic.is_temp_name(name) and p.is_file() and not p.is_symlink():
                yield p


def _add(archive: zipfile.ZipFile, source: Path, name: str,
         members: dict[str, dict[str, Any]]) -> None:
    """Copy a file into the archive, hashing it on the way."""
    info = zipfile.ZipInfo.from_file(source, name)
    info.compress_type = zipfile.ZIP_DEFLATED
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as src, archive.open(info, "w", force_zip64=True) as dst:
        while block := src.read(READ_CHUNK):
            digest.update(block)
            dst.write(block)
            size += len(block)
    members[name] = {"sha256": digest.hexdigest(), "size": size}


def backup_store(
    db: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    features: bool = True,
    force: bool = False,
    timeout: float = 60.0,
) -> BackupSummary:
    """Write a backup archive of the store ``db`` and its artifacts to ``out``.

    See the module docstring for what goes in and why the copy is
    consistent. ``features``: include the feature files (a cache, often the
    bulk). ``force``: replace an existing ``out``. ``timeout``: seconds to
    wait for a command that writes the store to finish.

    The lock keeps out writers of *other* processes: call it from a process
    that is not writing the same store meanwhile (the command line is not).
    """
    path = Path(db).expanduser()
    target = Path(out).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no store here (no such file)")
    if target.exists() and not force:
        raise InputError(f"{target}: already exists; pass --force to replace it")
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give the archive's file name")
    data = store_mod.StoreFolder.of(path)
    root = data.root
    resolved = target.resolve()
    for artifacts in data.artifact_folders:
        if resolved.is_relative_to(artifacts.resolve()):
            raise InputError(
                f"{target}: inside the store's {artifacts.name}/ folder; write it elsewhere")
    members: dict[str, dict[str, Any]] = {}
    with _atomic.replacing(target) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        # The store file and the models, while no other process can write.
        with store_mod.open_store(path, read_only=True, timeout=timeout) as st:
            version = store_mod.schema_version(st)
            tables = store_mod.table_counts(st)
            models = store_mod.model_artifacts_frame(st)
            _add(zf, path, f"store/{path.name}", members)
            wal = Path(str(path) + ".wal")
            if wal.is_file():
                _add(zf, wal, f"store/{path.name}.wal", members)
            saved = 0
            for row in models.itertuples():
                folder = Path(row.artifact_path) if isinstance(row.artifact_path, str) else None
                if folder is None or not folder.is_dir():
                    continue  # check reports it; the row is kept
                for f in _files_under(folder):
                    _add(zf, f, f"models/{row.model_id}/{f.relative_to(folder).as_posix()}",
                         members)
                saved += 1
        # Caches and exports: immutable once written (each file is replaced whole).
        for name in ("features", "reports") if features else ("reports",):
            for f in _files_under(root / name):
                _add(zf, f, f"{name}/{f.relative_to(root / name).as_posix()}", members)
        manifest = {
            "format": BACKUP_FORMAT,
            "format_version": BACKUP_FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "created_by": _user(),
            "source": str(path.resolve()),
            "store": path.name,
            "schema_version": version,
            "tables": tables,
            "models": sorted(str(m) for m in models["model_id"]),
            "features": features,
            "members": members,
        }
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    total = sum(m["size"] for m in members.values())
    return BackupSummary(str(target), str(path), len(members), total, saved, features, tables)


# --------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------

@dataclass
class RestoreSummary:
    db: str
    backup: str
    created_at: str
    source: str
    members: int
    models: int
    features: bool
    replaced: bool
    check: CheckReport


def _damaged(backup: Path, why: str) -> InputError:
    return InputError(f"{backup}: {why}; nothing was restored")


def _member_target(name: str) -> PurePosixPath:
    """A member's path in the restored folder; refuses names that could escape it."""
    p = PurePosixPath(name)
    if (p.is_absolute() or ".." in p.parts or not p.parts or "\\" in name
            or p.parts[0] not in ("store", *ARTIFACT_FOLDERS) or len(p.parts) < 2):
        raise ValueError(name)
    return p


def _read_manifest(backup: Path, zf: zipfile.ZipFile) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except KeyError:
        raise _damaged(backup, f"no {MANIFEST}: not a cMIL backup") from None
    except (ValueError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise _damaged(backup, f"{MANIFEST} is damaged ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
        raise _damaged(backup, "not a cMIL backup (its manifest is of another format)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BACKUP_FORMAT_VERSION:
        raise _damaged(backup, f"backup format version {version!r}; this program reads up to "
                               f"{BACKUP_FORMAT_VERSION}: upgrade cmil_core")
    members = manifest.get("members")
    store_name = manifest.get("store")
    if not isinstance(members, dict) or not isinstance(store_name, str):
        raise _damaged(backup, "its manifest lists no members")
    names = set(zf.namelist()) - {MANIFEST}
    if names != set(members):
        extra = sorted(names - set(members))[:3]
        absent = sorted(set(members) - names)[:3]
        raise _damaged(backup, "its members differ from its manifest"
                       + (f" (not listed: {', '.join(extra)})" if extra else "")
                       + (f" (missing: {', '.join(absent)})" if absent else ""))
    for name in members:
        try:
            _member_target(name)
        except ValueError:
            raise _damaged(backup, f"member {name!r} would land outside the store's folder") \
                from None
    if f"store/{store_name}" not in members:
        raise _damaged(backup, f"the store file store/{store_name} is missing")
    return manifest


def _copy_member(backup: Path, zf: zipfile.ZipFile, name: str, expected: dict[str, Any],
                 dest: Path | None) -> None:
    """Read a member (writing it to ``dest`` when given), checking its SHA-256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        with zf.open(name) as src:
            out = dest.open("wb") if dest is not None else None
            try:
                while block := src.read(READ_CHUNK):
                    digest.update(block)
                    size += len(block)
                    if out is not None:
                        out.write(block)
            finally:
                if out is not None:
                    out.close()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _damaged(backup, f"member {name} is damaged ({exc})") from exc
    if digest.hexdigest() != expected.get("sha256") or size != expected.get("size"):
        raise _damaged(backup, f"member {name} is damaged (its SHA-256 differs from the manifest)")


def restore_store(
    backup: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    force: bool = False,
    hash_files: bool = True,
    who: str | None = None,
) -> RestoreSummary:
    """Restore a backup archive as the store ``db`` (see the module docstring).

    ``force``: replace an existing store (and its models/, reports/ and, when
    the backup has them, features/). ``hash_files``: passed to the final
    :func:`check_store`. ``who``: recorded in the audit trail (default: the
    operating-system user).
    """
    source = Path(backup).expanduser()
    path = Path(db).expanduser()
    if not source.is_file():
        raise InputError(f"{source}: no such backup file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the store's file name (e.g. cmil.duckdb)")
    exists = path.exists()
    if exists and not force:
        raise InputError(f"{path}: a store is already there; pass --force to replace it "
                         "(what it holds is lost)")
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _damaged(source, f"not a readable zip archive ({exc})") from exc
    with zf:
        manifest = _read_manifest(source, zf)
        members: dict[str, dict[str, Any]] = manifest["members"]
        # Pass 1: verify every member before writing anything.
        for name in sorted(members):
            _copy_member(source, zf, name, members[name], None)
        root = store_mod.StoreFolder.of(path).root
        has_features = any(n.startswith("features/") for n in members)
        if not exists and not force:
            for name in ("models", "reports", *(("features",) if has_features else ())):
                folder = root / name
                if folder.is_dir() and any(folder.iterdir()):
                    raise InputError(
                        f"{folder}: already holds files of another store; restore into an "
                        "empty folder, or pass --force to replace them")
        if exists:
            # Refuse while another process uses the store about to be replaced.
            try:
                store_mod.open_store(path).close()
            except store_mod.StoreBusyError:
                raise
            except store_mod.StoreError:
                pass  # unreadable or of another version: replaced all the same
        root.mkdir(parents=True, exist_ok=True)
        # Pass 2: extract into a temporary folder beside the store, checking again.
        staging = _atomic.temp_path(root / f"{path.name}.restore")
        staging.mkdir()
        try:
            store_name = manifest["store"]
            for name in sorted(members):
                rel = _member_target(name)
                if rel.parts[0] == "store":
                    tail = rel.name[len(store_name):] if rel.name.startswith(store_name) else None
                    if tail not in ("", ".wal"):
                        raise _damaged(source, f"unexpected store member {name}")
                    dest = staging / (path.name + tail)
                else:
                    dest = staging.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(source, zf, name, members[name], dest)
            restored = _finish_staging(staging, path, root, manifest, source, who)
            replaced = _swap_into_place(staging, path, root, has_features)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    report = check_store(path, hash_files=hash_files)
    return RestoreSummary(
        str(path), str(source), str(manifest.get("created_at", "")),
        str(manifest.get("source", "")), len(members), restored, has_features, replaced, report,
    )


def _finish_staging(staging: Path, path: Path, root: Path, manifest: dict[str, Any],
                    source: Path, who: str | None) -> int:
    """Point the restored models at their final folders and record the restore."""
    with store_mod.open_store(staging / path.name) as st:
        models = store_mod.model_artifacts_frame(st)
        final = store_mod.StoreFolder.of(path)
        staged = store_mod.StoreFolder.of(staging / path.name)
        paths = {str(m): str(final.model(str(m))) for m in models["model_id"]
                 if staged.model(str(m)).is_dir()}
        store_mod.set_model_artifact_paths(st, paths)
        store_mod.record_audit(
            st, who or _user(), "restore",
            details={"backup": str(source.resolve()),
                     "backup_created_at": manifest.get("created_at"),
                     "source": manifest.get("source"), "members": len(manifest["members"]),
                     "features": manifest.get("features")},
        )
    return len(paths)


def _swap_into_place(staging: Path, path: Path, root: Path, has_features: bool) -> bool:
    """Move what is replaced aside, the restored files in, then delete what was replaced.

    Returns whether something was replaced. On an error midway, the restored
    files go back to ``staging`` and the previous ones back in place.
    """
    names = [path.name, "models", "reports", *(("features",) if has_features else ())]
    aside = _atomic.temp_path(root / f"{path.name}.replaced")
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in [*names, path.name + ".wal"]:
            current = root / name
            if current.exists() or current.is_symlink():
                aside.mkdir(exist_ok=True)
                os.rename(current, aside / name)
                moved_out.append(name)
        for name in names:
            if (staging / name).exists():
                os.rename(staging / name, root / name)
                moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.rename(root / name, staging / name)
        for name in reversed(moved_out):
            os.rename(aside / name, root / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return bool(moved_out)
