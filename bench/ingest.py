"""Benchmark of ingest's local executor: slides side by side in processes against one at a time.

Run: ``.venv/bin/python bench/ingest.py [--demo DIR] [--workers 2] [--repeat 1] [--json]``

``--demo DIR``: a demo study's slide folder (``data/demo`` of a store built
with ``cmil demo``; ``--size full`` for the paper's 587 slides); without it a
small demo is generated into a temporary folder first. Each of its cohorts
(training and external A: pyramidal TIFFs; external B: folders of
photographs) is ingested into a fresh store twice per round, interleaved:

* ``threads``: one slide at a time, its patches shared by ``--workers``
  threads (ingest before :mod:`cmil_core.ingest.scan_ahead`; forced here by
  giving ingest no scans);
* ``processes``: whole slides side by side in ``--workers`` worker processes,
  read ahead of the store writes (the default now).

Both must give the same patch rows (checked: the patch table's rows, sorted,
are compared). ``ratio`` is threads seconds / processes seconds, per cohort
and over all (best round of each); ``--json`` prints one line
``{"ingest_ratio", "threads_s", "processes_s", "per_cohort": {...}}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmil_core import store  # noqa: E402
from cmil_core.clinical.cohort_import import import_cohort  # noqa: E402
from cmil_core.demo.generator import COHORTS, generate_demo  # noqa: E402
from cmil_core.ingest import pipeline  # noqa: E402


def _patch_rows(db: Path, cohort: str) -> pd.DataFrame:
    with store.open_store(db, read_only=True) as st:
        frames = []
        for s in store.list_slides(st, cohort):
            patches = store.patches_frame(st, s.slide_id).drop(
                columns=["patch_id", "slide_id"], errors="ignore")
            patches.insert(0, "path", s.path)
            frames.append(patches)
    return pd.concat(frames).sort_values(["path", "y", "x"], ignore_index=True)


def _run(demo: Path, cohort: str, work: Path, workers: int, mode: str) -> tuple[float, Path]:
    db = work / f"{cohort}-{mode}-{time.monotonic_ns()}" / "cmil.duckdb"
    import_cohort(db, cohort, demo / f"{cohort}_clinical.csv", role="train")
    original = pipeline.scan_in_processes
    if mode == "threads":
        pipeline.scan_in_processes = lambda *a, **k: itertools.repeat(None)  # type: ignore
    try:
        t0 = time.perf_counter()
        pipeline.ingest(db, cohort, demo / cohort, manifest=demo / f"{cohort}_manifest.csv",
                        workers=workers)
        return time.perf_counter() - t0, db
    finally:
        pipeline.scan_in_processes = original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = args.demo
        if demo is None:
            generate_demo(work / "demo_store" / "cmil.duckdb", size="small")
            demo = work / "demo_store" / "demo"
        best: dict[str, dict[str, float]] = {}
        for cohort in (c.cohort for c in COHORTS):
            times: dict[str, list[float]] = {"threads": [], "processes": []}
            rows: dict[str, pd.DataFrame] = {}
            for _ in range(args.repeat):
                for mode in ("threads", "processes"):
                    seconds, db = _run(demo, cohort, work, args.workers, mode)
                    times[mode].append(seconds)
                    rows[mode] = _patch_rows(db, cohort)
            pd.testing.assert_frame_equal(rows["threads"], rows["processes"])
            best[cohort] = {mode: min(t) for mode, t in times.items()}
            best[cohort]["ratio"] = best[cohort]["threads"] / best[cohort]["processes"]
            best[cohort]["patches"] = len(rows["processes"])
    threads = sum(b["threads"] for b in best.values())
    processes = sum(b["processes"] for b in best.values())
    if args.json:
        print(json.dumps({"ingest_ratio": round(threads / processes, 3),
                          "threads_s": round(threads, 1), "processes_s": round(processes, 1),
                          "workers": args.workers,
                          "per_cohort": {c: {k: round(v, 2) for k, v in b.items()}
                                         for c, b in best.items()}}))
        return
    print(f"ingest of {demo}, {args.workers} workers, best of {args.repeat} round(s); "
          "the same patch rows both ways")
    for cohort, b in best.items():
        print(f"  {cohort:<11} {int(b['patches']):>7} patches  threads {b['threads']:6.1f} s  "
              f"processes {b['processes']:6.1f} s  ratio {b['ratio']:.2f}")
    print(f"ingest_ratio {threads / processes:.2f} (threads {threads:.1f} s / processes "
          f"{processes:.1f} s)")


if __name__ == "__main__":
    main()
