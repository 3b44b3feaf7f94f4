"""cmil_core.ingest.pipeline.ingest on real slides and photographs, bad files, reruns and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from cmil_core import store
from cmil_core.cli import main
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.demo.generator import generate_demo
from cmil_core.errors import InputError
from cmil_core.ingest.pipeline import ingest

ROOT = Path(__file__).resolve().parents[1]


def _cohort(db: Path, tmp_path: Path, name: str, patients: list[str]) -> None:
    csv = tmp_path / f"{name}.csv"
    csv.write_text("patient_id\n" + "\n".join(patients) + "\n")
    import_cohort(db, name, csv, role="train")


def _fixture_manifest(tmp_path: Path, fixtures_dir: Path, rows: list[tuple[str, str, str]]) -> Path:
    manifest = tmp_path / "manifest.csv"
    lines = ["slide_path,patient_id,mpp"]
    lines += [f"{fixtures_dir / 'slides' / f},{p},{m}" for f, p, m in rows]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _slides(db: Path, cohort: str) -> dict[str, store.SlideRow]:
    with store.open_store(db, read_only=True) as st:
        return {Path(s.path).name: s for s in store.list_slides(st, cohort)}


def _patches(db: Path) -> pd.DataFrame:
    with store.open_store(db, read_only=True) as st:
        return st.cursor().execute(
            "SELECT s.path, p.* EXCLUDE (slide_id, patch_id) FROM patches p JOIN slides s "
            "USING (slide_id) ORDER BY s.path, p.patch_id").df()


FIXTURE_ROWS = [
    ("CMU-1-Small-Region.svs", "P1", ""),
    ("tcga-no-mpp.svs", "P2", ""),
    ("boxes.tiff", "P3", ""),
    ("broken.svs", "P4", ""),
    ("unopenable.tiff", "P5", ""),
    ("unreadable.svs", "P6", ""),
]


def test_real_slides_tile_and_bad_ones_fail_alone(
    db_path: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    _cohort(db_path, tmp_path, "F", [f"P{i}" for i in range(1, 7)])
    summary = ingest(db_path, "F", fixtures_dir / "slides",
                     manifest=_fixture_manifest(tmp_path, fixtures_dir, FIXTURE_ROWS))
    slides = _slides(db_path, "F")
    cmu = slides["CMU-1-Small-Region.svs"]
    assert cmu.status == "tiled" and cmu.mpp == pytest.approx(0.499) and cmu.sha256
    assert cmu.kind == "openslide:aperio" and cmu.size_bytes == 1938955
    outcome = next(s for s in summary.slides if s.path.endswith("CMU-1-Small-Region.svs"))
    # Real rejections: neither all pass nor all fail.
    assert 30 < outcome.patches < 117 and 0 < outcome.passed < outcome.patches
    assert slides["tcga-no-mpp.svs"].status == "failed"
    assert "--mpp" in (slides["tcga-no-mpp.svs"].error or "")
    assert "not a microscope's" in (slides["boxes.tiff"].error or "")
    for name in ("broken.svs", "unopenable.tiff", "unreadable.svs"):
        assert slides[name].status == "failed" and slides[name].error.startswith(name)
    patches = _patches(db_path)
    assert set(patches["path"].map(lambda p: Path(p).name)) == {"CMU-1-Small-Region.svs"}
    assert (patches["size"] == 224).all()  # 112 um at 0.499 um/px
    assert (patches["x"] + patches["size"] <= 2220).all() and (patches["y"] + patches["size"] <= 2967).all()
    assert patches.loc[~patches["qc_pass"], "qc_reason"].notna().all()
    assert patches.loc[patches["qc_pass"], "qc_reason"].isna().all()
    with store.open_store(db_path, read_only=True) as st:
        runs = store.ingest_runs_frame(st, "F")
    assert runs["status"].tolist() == ["done"]

    # With a resolution for the slide that has none, a rerun tiles it and skips the rest.
    rows = [(f, p, "0.5" if f == "tcga-no-mpp.svs" else m) for f, p, m in FIXTURE_ROWS]
    again = ingest(db_path, "F", fixtures_dir / "slides",
                   manifest=_fixture_manifest(tmp_path, fixtures_dir, rows))
    by_name = {Path(s.path).name: s for s in again.slides}
    assert by_name["tcga-no-mpp.svs"].status == "tiled" and by_name["tcga-no-mpp.svs"].patches > 0
    assert by_name["CMU-1-Small-Region.svs"].status == "skipped"
    assert by_name["CMU-1-Small-Region.svs"].passed == outcome.passed
    assert _slides(db_path, "F")["tcga-no-mpp.svs"].mpp == 0.5


def test_photographs_in_a_zip_of_patient_folders(
    db_path: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    photos = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))
    archive = tmp_path / "centre_b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, path in enumerate(photos):
            zf.write(path, f"B{i % 10:02d}/{path.name}")
    _cohort(db_path, tmp_path, "B", [f"B{i:02d}" for i in range(10)])
    # Assumed 0.3 um/px: the BCCD images carry no resolution (see test_tiling.py).
    summary = ingest(db_path, "B", archive, mpp=0.3)
    assert len(summary.slides) == len(photos) == 40
    assert all(s.status == "tiled" and s.patches >= 1 for s in summary.slides)
    counts = summary.counts
    assert counts["passed"] > 0 and sum(counts.values()) >= 40
    slides = _slides(db_path, "B")
    assert all(s.kind == "image:jpeg" and s.mpp == 0.3 for s in slides.values())
    assert (db_path.parent / "slides" / "B" / "centre_b").is_dir()  # extracted beside the store


def test_changed_file_is_redone_and_unchanged_ones_skipped(
    db_path: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    folder = tmp_path / "photos"
    for i, path in enumerate(sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:3]):
        (folder / f"P{i}").mkdir(parents=True)
        (folder / f"P{i}" / path.name).write_bytes(path.read_bytes())
    _cohort(db_path, tmp_path, "C", ["P0", "P1", "P2"])
    ingest(db_path, "C", folder, mpp=0.3)
    before = _patches(db_path)
    changed = next((folder / "P1").glob("*.jpg"))
    Image.open(changed).rotate(180).save(changed, quality=90)
    summary = ingest(db_path, "C", folder, mpp=0.3)
    assert [s.status for s in summary.slides] == ["skipped", "tiled", "skipped"]
    after = _patches(db_path)
    assert len(after) == len(before)  # redone, not duplicated
    assert _slides(db_path, "C")[changed.name].sha256 != ""


def test_unknown_patients(db_path: Path, tmp_path: Path, fixtures_dir: Path) -> None:
    _cohort(db_path, tmp_path, "F", ["P1"])
    manifest = _fixture_manifest(tmp_path, fixtures_dir, [("CMU-1-Small-Region.svs", "NOPE", "")])
    with pytest.raises(InputError, match="manifest.csv: patient_id 'NOPE' not in cohort 'F'"):
        ingest(db_path, "F", fixtures_dir / "slides", manifest=manifest)
    with store.open_store(db_path, read_only=True) as st:
        assert store.table_counts(st)["slides"] == 0
    # Without a manifest, a file whose prefix names nobody fails alone.
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "P1_a.jpg").write_bytes((fixtures_dir / "smears/bccd/BloodImage_00000.jpg").read_bytes())
    (folder / "P9_a.jpg").write_bytes((fixtures_dir / "smears/bccd/BloodImage_00001.jpg").read_bytes())
    summary = ingest(db_path, "F", folder, mpp=0.3)
    assert [s.status for s in summary.slides] == ["tiled", "failed"]
    assert "patient 'P9' (from the prefix rule) is not in cohort 'F'" in summary.slides[1].reason


def test_ids_that_lost_their_leading_zeros_are_named(
    db_path: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    # Excel turns the ID 007 into the number 7; the slides keep "007".
    _cohort(db_path, tmp_path, "Z", ["7", "12"])
    folder = tmp_path / "z"
    folder.mkdir()
    photo = (fixtures_dir / "smears/bccd/BloodImage_00000.jpg").read_bytes()
    (folder / "007_a.jpg").write_bytes(photo)
    (folder / "0099_a.jpg").write_bytes(photo)
    summary = ingest(db_path, "Z", folder, mpp=0.3)
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in summary.slides}
    assert "the cohort has patient '7'" in reasons["007_a.jpg"]
    assert "leading zeros" in reasons["007_a.jpg"]
    assert "the cohort has" not in reasons["0099_a.jpg"]  # no such patient, zeros or not
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_path,patient_id\n{folder / '007_a.jpg'},0012\n")
    with pytest.raises(InputError, match="'0012' not in cohort 'Z'.*the cohort has patient '12'"):
        ingest(db_path, "Z", folder, manifest=manifest, mpp=0.3)


def test_one_file_is_one_slide_of_one_patient(
    db_path: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    _cohort(db_path, tmp_path, "F", ["P1", "P2"])
    folder = tmp_path / "f"
    folder.mkdir()
    photo = (fixtures_dir / "smears/bccd/BloodImage_00000.jpg").read_bytes()
    (folder / "P1_a.jpg").write_bytes(photo)
    (folder / "P1_copy.jpg").write_bytes(photo)
    (folder / "P2_a.jpg").write_bytes(photo)  # the same slide, handed over for another patient
    for _ in range(2):  # a rerun keeps the first registration as the original
        summary = ingest(db_path, "F", folder, mpp=0.3)
        outcome = {Path(s.path).name: s for s in summary.slides}
        assert outcome["P1_a.jpg"].status in ("tiled", "skipped")
        assert outcome["P1_copy.jpg"].status == outcome["P2_a.jpg"].status == "failed"
        assert "is already slide 1 (P1_a.jpg) of patient 'P1' in cohort 'F'; a copy would count" \
            in str(outcome["P1_copy.jpg"].reason)
        assert "of patient 'P1' in cohort 'F'; refused for patient 'P2' in cohort 'F'" \
            in str(outcome["P2_a.jpg"].reason)
    assert len(_patches(db_path)) == outcome["P1_a.jpg"].patches


def test_missing_cohort_and_bad_mpp(db_path: Path, tmp_path: Path, fixtures_dir: Path) -> None:
    store.open_store(db_path).close()
    with pytest.raises(InputError, match="cohort 'X' does not exist"):
        ingest(db_path, "X", fixtures_dir / "slides")
    with pytest.raises(InputError, match="--mpp -2"):
        ingest(db_path, "X", fixtures_dir / "slides", mpp=-2)


def test_cli_ingest_prints_the_summary(
    db_path: Path, tmp_path: Path, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cohort(db_path, tmp_path, "F", ["P1"])
    manifest = _fixture_manifest(tmp_path, fixtures_dir, [("CMU-1-Small-Region.svs", "P1", "")])
    code = main(["ingest", "--db", str(db_path), "--cohort", "F", "--slides",
                 str(fixtures_dir / "slides"), "--manifest", str(manifest)])
    out = capsys.readouterr().out
    assert code == 0
    assert "cohort 'F' (run 1): 1 slides: 1 tiled" in out
    assert "CMU-1-Small-Region.svs" in out and "all slides" in out
    code = main(["ingest", "--db", str(db_path), "--cohort", "Z", "--slides", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.startswith("error: cohort 'Z' does not exist")


def _tiled(db: Path) -> int:
    try:
        with store.open_store(db, read_only=True, timeout=0.2) as st:
            return int(st.cursor().execute(
                "SELECT count(*) FROM slides WHERE status = 'tiled'").fetchone()[0])
    except store.StoreError:
        return -1  # the ingest process holds the store right now


@pytest.mark.slow
def test_killed_ingest_resumes_to_the_same_patches(tmp_path: Path) -> None:
    """kill -9 in the middle of a real ingest, rerun: the same rows as an uninterrupted run."""
    reference = tmp_path / "ref" / "cmil.duckdb"
    generate_demo(reference, size="small", seed=3, workers=1)  # ingests its slides too
    folder = reference.parent / "demo"

    killed = tmp_path / "killed" / "cmil.duckdb"
    import_cohort(killed, "training", folder / "training_clinical.csv", role="train")
    command = [sys.executable, "-m", "cmil_core", "ingest", "--db", str(killed),
               "--cohort", "training", "--slides", str(folder / "training")]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _tiled(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= _tiled(killed) < 14
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "14 slides" in done.stdout and "skipped" in done.stdout
    expected = _patches(reference)
    expected = expected[expected["path"].str.contains("/training/")].reset_index(drop=True)
    pd.testing.assert_frame_equal(_patches(killed), expected)
    with store.open_store(killed, read_only=True) as st:
        runs = store.ingest_runs_frame(st, "training")
    assert runs["status"].tolist() == ["done", "interrupted"]  # newest first; the killed one


def test_new_thresholds_re_decide_the_cohort_without_tiling_again(tmp_path: Path) -> None:
    from cmil_core.ingest.pipeline import format_ingest_summary
    from cmil_core.ingest.quality import QCThresholds
    from cmil_core.ingest.tiling_config import TilingConfig
    from qc_helpers import BLUR_THRESHOLD, photo_cohort

    db = tmp_path / "cmil.duckdb"
    slides = photo_cohort(db, tmp_path, "A", 4, seed=3, role="train")
    config = TilingConfig(patch_um=56.0)
    first = ingest(db, "A", slides, mpp=0.5, config=config, who="ann")
    assert first.qc_decision is not None and first.qc_decision["new"]
    assert first.qc_decision["thresholds"] == QCThresholds().to_dict()
    assert first.to_dict()["qc_decision"]["who"] == "ann"
    keys = {s.path: s.tiling_key for s in _slides(db, "A").values()}
    total = sum(s.patches for s in first.slides)

    # The same settings again: nothing re-tiled, no new decision.
    again = ingest(db, "A", slides, mpp=0.5, config=config, who="bob")
    assert [s.status for s in again.slides] == ["skipped"] * 4
    assert not again.qc_decision["new"]  # type: ignore[index]
    assert again.qc_decision["decision_id"] == first.qc_decision["decision_id"]  # type: ignore[index]

    # Other thresholds: re-decided from the stored metrics, still not re-tiled.
    strict = QCThresholds(**{BLUR_THRESHOLD: 1e12})
    third = ingest(db, "A", slides, mpp=0.5, config=config, thresholds=strict, who="bob")
    assert [s.status for s in third.slides] == ["skipped"] * 4
    assert {s.path: s.tiling_key for s in _slides(db, "A").values()} == keys
    assert third.qc_decision["new"] and third.qc_decision["who"] == "bob"  # type: ignore[index]
    assert all(s.passed == 0 for s in third.slides)
    assert third.counts["blurred"] + sum(v for k, v in third.counts.items()
                                         if k not in ("blurred", "passed")) == total
    lost = [w for w in third.warnings if "lose every patch" in w]
    assert lost == ["cohort 'A': 4 patient(s) lose every patch to quality control and drop out "
                    "of training and scoring: A00, A01, A02, A03"]
    text = format_ingest_summary(third)
    assert f"quality control: decision {third.qc_decision['decision_id']} (new)" in text  # type: ignore[index]
    assert f"warning: {lost[0]}" in text
    assert third.to_dict()["qc_warnings"] == third.warnings

    # No thresholds given: the cohort keeps its current decision (not the defaults).
    fourth = ingest(db, "A", slides, mpp=0.5, config=config, who="ann")
    assert not fourth.qc_decision["new"]  # type: ignore[index]
    assert fourth.qc_decision["thresholds"] == strict.to_dict()  # type: ignore[index]
