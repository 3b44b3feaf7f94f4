"""cmil_core.ingest.scan_ahead: slides read side by side in worker processes, same results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.ingest import pipeline, scan_ahead
from cmil_core.ingest.discovery import discover_slides
from cmil_core.ingest.pipeline import ingest, scan_slide
from cmil_core.ingest.quality import QCThresholds
from cmil_core.ingest.tiling_config import TilingConfig

CONFIG = TilingConfig(patch_um=32)


def _photographs(fixtures_dir: Path, folder: Path, n: int = 6) -> list[str]:
    """``n`` BCCD photographs as P1_a.jpg ... and a truncated one (P9_bad.jpg)."""
    folder.mkdir(parents=True)
    photos = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:n]
    for i, photo in enumerate(photos, start=1):
        (folder / f"P{i}_a.jpg").write_bytes(photo.read_bytes())
    (folder / "P9_bad.jpg").write_bytes(photos[0].read_bytes()[:2000])
    return [f"P{i}" for i in range(1, n + 1)] + ["P9"]


def _rows(db: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with store.open_store(db, read_only=True) as st:
        slides = store.list_slides(st, "C")
        frames = []
        for s in slides:
            patches = store.patches_frame(st, s.slide_id).drop(
                columns=["patch_id", "slide_id"], errors="ignore")
            patches.insert(0, "path", Path(s.path).name)
            frames.append(patches)
    table = pd.DataFrame([{"path": Path(s.path).name, "status": s.status, "sha256": s.sha256,
                           "reason": s.error, "width": s.width, "mpp": s.mpp}
                          for s in slides]).sort_values("path", ignore_index=True)
    return table, pd.concat(frames).sort_values(["path", "y", "x"], ignore_index=True)


def test_slides_read_in_processes_give_the_rows_of_slides_read_one_by_one(
    tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    patients = _photographs(fixtures_dir, folder)
    csv = tmp_path / "c.csv"
    csv.write_text("patient_id\n" + "\n".join(patients) + "\n")
    calls: list[int] = []

    def counted(sources: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["workers"])
        return scan_ahead.scan_in_processes(sources, **kwargs)

    monkeypatch.setattr(pipeline, "scan_in_processes", counted)
    results = {}
    for workers in (1, 2):
        db = tmp_path / f"w{workers}" / "cmil.duckdb"
        import_cohort(db, "C", csv, role="train")
        summary = ingest(db, "C", folder, mpp=0.1, config=CONFIG, workers=workers)
        assert [s.status for s in summary.slides].count("tiled") == 6
        bad = next(s for s in summary.slides if s.path.endswith("P9_bad.jpg"))
        assert bad.status == "failed" and "not a readable image" in (bad.reason or "")
        results[workers] = _rows(db)
    assert calls == [2]  # one worker: in-process; two: side by side in processes
    pd.testing.assert_frame_equal(results[1][0], results[2][0])
    assert len(results[2][1]) == 24
    pd.testing.assert_frame_equal(results[1][1], results[2][1])


def _crash_on_bad(source: Any, *args: Any) -> Any:
    """A worker that dies (as a crash inside a C library would) on the file named crash.jpg."""
    if source.path.name == "P3_crash.jpg":
        os._exit(1)
    return scan_ahead._scan(source, *args)


def test_a_file_that_kills_its_worker_fails_alone(tmp_path: Path, fixtures_dir: Path) -> None:
    folder = tmp_path / "photos"
    _photographs(fixtures_dir, folder, n=5)
    (folder / "P9_bad.jpg").unlink()
    (folder / "P3_a.jpg").rename(folder / "P3_crash.jpg")
    _, sources = discover_slides(folder)
    thresholds = QCThresholds()
    scans = list(scan_ahead.scan_in_processes(
        sources, mpp_override=0.1, config=CONFIG, thresholds=thresholds, tiled={},
        patients={f"P{i}" for i in range(1, 6)}, workers=2, window=3, scan=_crash_on_bad))
    names = [s.path.name for s in sources]
    crashed = scans[names.index("P3_crash.jpg")]
    assert crashed.table is None and "the slide reader crashed on this file" in crashed.read_error
    for source, scan in zip(sources, scans, strict=True):
        if source.path.name == "P3_crash.jpg":
            continue
        assert scan.read_error is None
        alone = scan_slide(source, 0.1, CONFIG, thresholds, workers=1)
        pd.testing.assert_frame_equal(scan.table, alone.table)
