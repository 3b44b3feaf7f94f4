"""Logging set-up: the command line's ``-v``/``-q`` and the dashboard's job log file.

Every module of ``cmil_core`` logs through the standard :mod:`logging` module
with a module-level ``log = logging.getLogger(__name__)``, at the places that
matter: a job's start and end, each slide of an ingest, each cross-validation
fold of a training, and failures (with their traceback). Nothing is printed
unless a handler is attached, which happens here:

- :func:`cli_logging` (the command line): warnings on stderr by default,
  debug lines too with ``-v``, errors only with ``-q``;
- :func:`attach_file_log` (the dashboard's background jobs): a rotating file
  ``<data folder>/logs/cmil.log`` (1 MB, 5 old files kept), at INFO, where a
  failed job's traceback is written. :func:`job_log_path` names that file for
  a store.

Only the ``cmil_core`` logger is configured; other libraries' loggers are left
as they are.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import TextIOWrapper
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TextIO

from cmil_core.store_folder import StoreFolder, StoreLike

__all__ = [
    "LOG_FORMAT",
    "attach_file_log",
    "cli_logging",
    "detach_file_log",
    "job_log_path",
    "package_logger",
]

#: One line per record: when, level, which module, what.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
MAX_BYTES = 1_000_000
BACKUP_COUNT = 5

_lock = threading.Lock()


class _LogFile(RotatingFileHandler):
    """A rotating log file whose folder is made again if someone deleted it."""

    def _open(self) -> TextIOWrapper:
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None and not os.path.exists(self.baseFilename):
            self.stream.close()  # the file was deleted under us: write a new one
            self.stream = None
        super().emit(record)


def package_logger() -> logging.Logger:
    """The ``cmil_core`` logger, parent of every module's logger."""
    return logging.getLogger("cmil_core")


def job_log_path(db: StoreLike) -> Path:
    """The dashboard's log file for the store ``db``: ``logs/cmil.log`` beside it
    (:attr:`StoreFolder.log_file <cmil_core.store_folder.StoreFolder.log_file>`)."""
    return StoreFolder.of(db).log_file


def _lower_level(logger: logging.Logger, level: int) -> None:
    """Let records of ``level`` through the logger (never raise its threshold)."""
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)


def attach_file_log(path: str | os.PathLike[str], level: int = logging.INFO) -> Path:
    """Write ``cmil_core``'s records of ``level`` and above to the rotating file ``path``.

    The file and its folder are made when the first record is written (a
    page that only reads leaves the data folder as it was). Attaching the same
    file twice keeps one handler.
    Returns the file's absolute path.
    """
    target = Path(path).expanduser().resolve()
    logger = package_logger()
    with _lock:
        for handler in logger.handlers:
            if isinstance(handler, RotatingFileHandler) and Path(handler.baseFilename) == target:
                _lower_level(logger, level)
                return target
        handler = _LogFile(target, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT,
                           encoding="utf-8", delay=True)
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        _lower_level(logger, level)
    return target


def detach_file_log(path: str | os.PathLike[str]) -> None:
    """Stop writing to ``path`` (attached by :func:`attach_file_log`) and close it."""
    target = Path(path).expanduser().resolve()
    logger = package_logger()
    with _lock:
        for handler in list(logger.handlers):
            if isinstance(handler, RotatingFileHandler) and Path(handler.baseFilename) == target:
                logger.removeHandler(handler)
                handler.close()


@contextmanager
def cli_logging(verbosity: int, stream: TextIO | None = None) -> Iterator[None]:
    """Log to stderr while a command runs: ``verbosity`` -1 errors only, 0 warnings, 1 debug.

    The logger's handlers and level are restored on exit, so that running
    :func:`cmil_core.cli.main` many times in one process (the tests) leaves
    nothing behind.
    """
    level = {-1: logging.ERROR, 0: logging.WARNING}.get(verbosity, logging.DEBUG)
    logger = package_logger()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    with _lock:
        saved = (logger.level, logger.propagate)
        logger.addHandler(handler)
        _lower_level(logger, level)
        # Records are handled here; the root logger (without a handler, Python's
        # last resort prints warnings) would print them a second time.
        logger.propagate = False
    try:
        yield
    finally:
        with _lock:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
