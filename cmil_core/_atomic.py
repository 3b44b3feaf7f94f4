"""Crash-safe writes: a temporary name in the same folder, then one rename.

Most users should not import this module: it is the rule that every file and
folder cmil_core writes (feature files, model folders, demo slides and
tables, backups, restores) follows.

A file is written under a temporary name beside its final place, flushed to
disk, then renamed over the final name with ``os.replace`` (atomic within one
file system, on POSIX and Windows). A process killed at any moment leaves the
old version or the new one, never half of one. What it can leave is the
temporary file itself, named::

    .<final name>.<writer pid>-<8 hex digits>.partial

hidden (slide discovery skips it), recognisable, and traceable to its writer.
A temporary file is *stale* when its writer process is gone (or is a zombie),
or when it is over an hour old (a process id can be reused): anyone may delete
a stale one (:func:`remove_stale`), never a fresh one, which may belong to a
writer still at work. ``python -m cmil_core check`` reports stale leftovers,
and ``check --repair`` deletes them.

Other temporary names cmil_core wrote or writes are recognised too
(:func:`is_temp_name`): ``<name>.part`` (slide uploads and zip extraction),
``.<name>.partial-<hex>`` and ``.<name>.old-<hex>`` (report folders); they
carry no process id, so only their age makes them stale.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "STALE_AFTER_S",
    "is_stale",
    "is_temp_name",
    "new_folder",
    "pid_alive",
    "remove_stale",
    "replacing",
    "temp_path",
    "write_bytes",
    "write_text",
    "writer_pid",
]

#: Age after which any temporary file is stale, whoever wrote it.
STALE_AFTER_S = 3600.0

_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})\.partial$")
_OTHERS = (
    re.compile(r"^\..+\.partial$"),  # feature files of earlier versions (mkstemp names)
    re.compile(r"^\..+\.(partial|old)-[0-9a-f]+$"),  # report folders being written or swapped
    re.compile(r"^.+\.part$"),  # uploads, zip extraction, earlier demo slides and model folders
)


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<pid>-<hex>.partial``."""
    p = Path(path)
    return p.parent / f".{p.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


def is_temp_name(name: str) -> bool:
    """Whether a file or folder name is one of our temporary names."""
    return bool(_OURS.match(name)) or any(r.match(name) for r in _OTHERS)


def writer_pid(name: str) -> int | None:
    """The process id in a temporary name of ours, or None."""
    m = _OURS.match(name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie counts as gone)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # Linux: a killed process whose parent never reaped it is a zombie
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(path: str | os.PathLike[str], max_age_s: float = STALE_AFTER_S) -> bool:
    """Whether a temporary file or folder is a leftover (see the module docstring)."""
    p = Path(path)
    pid = writer_pid(p.name)
    if pid is not None and not pid_alive(pid):
        return True
    try:
        age = time.time() - p.lstat().st_mtime
    except OSError:
        return False
    return age > max_age_s


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Delete the stale temporary files and folders in ``folder``; returns them."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*filenames, *dirnames]:
            candidate = here / name
            if is_temp_name(name) and is_stale(candidate):
                _remove(candidate)
                removed.append(candidate)
        dirnames[:] = [d for d in dirnames if not is_temp_name(d)] if recursive else []
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a file under a temporary name; on success it replaces ``path`` in one rename.

    Yields the temporary path to write. When the block ends normally the file
    is flushed to disk and renamed over ``path``; when it raises, the
    temporary file is removed and ``path`` is left as it was.

    >>> with replacing("out.csv") as tmp:    # doctest: +SKIP
    ...     frame.to_csv(tmp, index=False)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(final.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text``, atomically."""
    write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def new_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Fill a folder under a temporary name; on success it becomes ``path`` in one rename.

    ``path`` must not exist yet (a folder cannot replace a non-empty one
    atomically). When the block raises, the temporary folder is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                _fsync_file(Path(dirpath) / name)
        os.rename(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(final.parent)
