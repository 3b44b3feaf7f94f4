"""Worker processes that end with the process that started them.

:func:`process_pool` is the one way the pipeline runs work in other processes
on this machine (the demo's slide renderer, ingest's slide readers): a
``ProcessPoolExecutor`` that starts its workers with ``spawn`` (the dashboard
and the demo hold threads and an open store, and ``fork`` would copy their
locks) and gives each worker a watcher thread that ends it when its parent
is gone, so that a ``kill -9`` of the parent leaves no orphan waiting for
work forever.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["exit_with_parent", "process_pool"]


def exit_with_parent(parent: int) -> None:
    """Worker initialiser: end this worker (exit status 1) when process ``parent`` is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that end with this one."""
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent, initargs=(os.getpid(),),
    )
