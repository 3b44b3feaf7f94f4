"""Reading a cohort's slides in worker processes on this machine, ahead of the store writes.

``ingest`` with the local executor and two or more workers reads the slides
here: each slide is hashed, opened and tiled (every quality metric of every
patch) by :func:`~cmil_core.ingest.pipeline.scan_slide` in a worker process,
at most ``window`` slides ahead, while the calling process takes each
slide's decisions and writes it to the store, in the slides' order, exactly
as it does for slides read in-process or on a Ray cluster (the same
:class:`~cmil_core.ingest.pipeline.SlideScan`). Whole slides then run side by
side instead of one at a time with their patches shared between threads:
small photographs, which give threads too little to share, are read about
twice as fast on two cores.

A worker that dies on a file (a crash inside a slide reader's C library
takes its process with it) breaks the pool; the slides in flight are then
read again one by one in a fresh pool, and the file that breaks it again
fails alone with that reason, where an in-process read would have ended the
whole ingest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cmil_core.ingest.discovery import SlideSource
from cmil_core.ingest.quality import QCThresholds
from cmil_core.ingest.tiling_config import TilingConfig
from cmil_core.workers import process_pool

__all__ = ["scan_in_processes"]


def _scan(source: SlideSource, mpp_override: float | None, config: TilingConfig,
          thresholds: QCThresholds, tiled: dict[str, tuple[Any, Any, Any]],
          patients: set[str]) -> Any:
    """A worker: one slide's share of ingest, on one thread."""
    from cmil_core.ingest.pipeline import scan_slide

    return scan_slide(source, mpp_override, config, thresholds, tiled=tiled, patients=patients,
                      workers=1)


def scan_in_processes(
    sources: Sequence[SlideSource],
    *,
    mpp_override: float | None,
    config: TilingConfig,
    thresholds: QCThresholds,
    tiled: dict[str, tuple[Any, Any, Any]],
    patients: set[str],
    workers: int,
    window: int | None = None,
    scan: Callable[..., Any] = _scan,
) -> Iterator[Any]:
    """The :class:`~cmil_core.ingest.pipeline.SlideScan` of each of ``sources``, in their order.

    ``workers`` processes, at most ``window`` slides in flight (default twice
    ``workers``); ``tiled`` and ``patients`` as for
    :func:`~cmil_core.ingest.pipeline.scan_slide`. ``scan``: what a worker
    runs per slide (a module-level function with ``_scan``'s arguments).
    Closing the iterator (or an exception in the caller) stops the workers.
    """
    from cmil_core.ingest.pipeline import SlideScan

    cap = window or 2 * workers
    args = (mpp_override, config, thresholds, tiled, patients)
    pool: ProcessPoolExecutor | None = None
    futures: dict[int, Future[Any]] = {}
    nxt = 0

    def submit_up_to(limit: int) -> None:
        nonlocal nxt, pool
        if pool is None:
            pool = process_pool(workers)
        while nxt < len(sources) and nxt < limit:
            futures[nxt] = pool.submit(scan, sources[nxt], *args)
            nxt += 1

    def alone(source: SlideSource) -> Any:
        """One slide in a pool of its own: the file that breaks it fails alone."""
        with process_pool(1) as single:
            try:
                return single.submit(scan, source, *args).result()
            except BrokenProcessPool:
                return SlideScan(read_error=(
                    f"{source.path.name}: the slide reader crashed on this file (its worker "
                    "process died); the file is damaged or in a variant the reader does not "
                    "handle"))

    try:
        submit_up_to(cap)
        for i, source in enumerate(sources):
            try:
                done = futures.pop(i).result()
            except BrokenProcessPool:
                # Which slide broke the pool is unknown: read this one alone, and the
                # others in flight in a fresh pool.
                assert pool is not None
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
                futures.clear()
                nxt = i + 1
                done = alone(source)
            submit_up_to(i + 1 + cap)
            yield done
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
