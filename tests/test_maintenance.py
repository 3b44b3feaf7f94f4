"""cmil_core.ops.maintenance and .backup: `check`, `backup` and `restore` on a real demo store."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from cmil_core import store
from cmil_core.cli import main
from cmil_core.demo.generator import generate_demo
from cmil_core.errors import InputError
from cmil_core.ops.backup import BACKUP_FORMAT, MANIFEST, backup_store, restore_store
from cmil_core.ops.maintenance import check_store, temporary_leftovers
from tests.conftest import is_plain_json

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: never a live process


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small demo store (slides, patches, a trained model, scores, features)."""
    db = tmp_path_factory.mktemp("demo") / "cmil.duckdb"
    generate_demo(db, size="small", seed=2, workers=1)
    return db


def _copy_store(db: Path, dest: Path) -> Path:
    """The store file with its models/ and features/ in a new folder (slides stay shared)."""
    dest.mkdir(parents=True)
    shutil.copy2(db, dest / db.name)
    for name in ("models", "features"):
        if (db.parent / name).is_dir():
            shutil.copytree(db.parent / name, dest / name)
    copy = dest / db.name
    with store.open_store(copy) as st:
        rows = store.model_artifacts_frame(st)
        store.set_model_artifact_paths(
            st, {m: str(dest / "models" / m) for m in rows["model_id"]})
    return copy


def _sql(db: Path, *statements: str) -> None:
    with store.open_store(db) as st:
        for sql in statements:
            st.cursor().execute(sql)


def _kinds(report) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {f.kind: f.severity for f in report.findings}


def _contents(db: Path) -> dict[str, pd.DataFrame]:
    """What a restore must bring back, keyed by table."""
    with store.open_store(db, read_only=True) as st:
        cur = st.cursor()
        return {
            "counts": pd.DataFrame([store.table_counts(st)]),
            "patient_scores": cur.execute(
                "SELECT * FROM patient_scores ORDER BY model_id, cohort, patient_id").df(),
            "patch_scores": cur.execute(
                "SELECT * FROM patch_scores ORDER BY model_id, patch_id").df(),
            "models": cur.execute(
                "SELECT * EXCLUDE (artifact_path) FROM models ORDER BY model_id").df(),
            "patches": cur.execute("SELECT * FROM patches ORDER BY patch_id").df(),
            "slides": cur.execute("SELECT * FROM slides ORDER BY slide_id").df(),
            "patients": cur.execute("SELECT * FROM patients ORDER BY cohort, patient_id").df(),
        }


# --------------------------------------------------------------------------- check


@pytest.mark.slow
def test_a_finished_demo_is_clean(demo_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = check_store(demo_db)
    assert report.ok and report.findings == [], report.findings
    assert report.schema_version == store.SCHEMA_VERSION
    assert report.checked["slides"] == report.checked["slide_files_hashed"] == 46
    assert report.checked["models"] == 1 and report.checked["feature_files"] == 46
    assert main(["check", "--db", str(demo_db)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("ok, 0 warnings") and "46 slides (46 hashed)" in out
    assert main(["check", "--db", str(demo_db), "--json", "--no-hash"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert is_plain_json(data)
    assert data["ok"] is True and data["problems"] == 0 and data["findings"] == []
    assert data["checked"]["slide_files_hashed"] == 0  # --no-hash


@pytest.mark.slow
def test_broken_rows_are_found_and_the_safe_ones_repaired(
        demo_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _copy_store(demo_db, tmp_path / "s")
    with store.open_store(db, read_only=True) as st:
        model = str(store.list_models(st)["model_id"].iloc[0])
        slides = store.slide_check_frame(st)
    a, b, c = (int(i) for i in slides[slides["cohort"] == "external_a"]["slide_id"][:3])
    _sql(
        db,
        # orphan rows of every kind
        "INSERT INTO patches (patch_id, slide_id, x, y, size, qc_pass) "
        "VALUES (999999999999, 99999, 0, 0, 1, true)",
        "INSERT INTO patch_scores VALUES ('no-such-model', 999999999998, 0.5, NULL, NULL)",
        f"INSERT INTO patient_scores (model_id, cohort, patient_id, score, risk_group) "
        f"VALUES ('{model}', 'ghosts', 'G1', 0.5, 'low')",
        "INSERT INTO demo_tumor_regions VALUES (99999, 0, 0, 1, 1)",
        # a tiled slide without patches, a pending one that kept its patches
        f"DELETE FROM patch_scores WHERE patch_id IN (SELECT patch_id FROM patches "
        f"WHERE slide_id = {a})",
        f"DELETE FROM patches WHERE slide_id = {a}",
        f"UPDATE slides SET status = 'pending' WHERE slide_id = {b}",
        # a slide of a patient who left the clinical table
        f"UPDATE slides SET patient_id = 'A999' WHERE slide_id = {c}",
    )
    # a model folder without a row, and leftovers of killed writers (one still "alive": ours)
    shutil.copytree(db.parent / "models" / model, db.parent / "models" / "killed-train")
    enc = next((db.parent / "features").iterdir())
    dead = enc / f".x.npz.{DEAD_PID}-0123abcd.partial"
    alive = enc / f".y.npz.{os.getpid()}-0123abcd.partial"
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")

    report = check_store(db)
    kinds = _kinds(report)
    assert {k for k, s in kinds.items() if s == "problem"} == {
        "orphan-rows", "tiled-without-patches", "untiled-with-patches",
        "unknown-patient-slides", "model-folders-without-row", "temporary-files"}
    assert kinds["temporary-files-in-use"] == "warning"
    orphans = {f.message for f in report.findings if f.kind == "orphan-rows"}
    assert orphans == {
        "1 row: patches without a slide", "1 row: patch scores without a model",
        "1 row: patch scores without a patch", "1 row: patient scores of an unknown cohort",
        "1 row: patient scores of an unknown patient", "1 row: tumour regions without a slide"}
    assert main(["check", "--db", str(db)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith(("problem: ", "warning: ")) for line in out[:-1])
    assert all("; repair: " in line for line in out[:-1])
    assert "cohort 'external_a' belong to 1 patient not in its clinical table" in "\n".join(out)
    assert "--cohort external_a" in "\n".join(out)
    assert out[-1].endswith("11 problems, 1 warning")  # six kinds of orphan rows

    assert main(["check", "--db", str(db), "--repair"]) == 1  # what needs a person remains
    out = capsys.readouterr().out
    assert "repaired: deleted models/killed-train" in out
    assert f"repaired: deleted features/{enc.name}/{dead.name}" in out
    after = check_store(db)
    assert {k for k, s in _kinds(after).items() if s == "problem"} == {
        "untiled-with-patches", "unknown-patient-slides"}
    with store.open_store(db, read_only=True) as st:
        assert set(store.orphan_counts(st).values()) == {0}
        assert store.get_slide(st, a).status == "pending"  # ingest will redo it
    assert not dead.exists() and alive.exists()  # a live writer's file is left alone
    assert not (db.parent / "models" / "killed-train").exists()


@pytest.mark.slow
def test_files_missing_changed_or_damaged(demo_db: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    db = _copy_store(demo_db, tmp_path / "s")
    with store.open_store(db, read_only=True) as st:
        model = str(store.list_models(st)["model_id"].iloc[0])
        slides = store.slide_check_frame(st)
    training = slides[slides["cohort"] == "training"]
    first, second = training.iloc[0], training.iloc[1]
    changed = tmp_path / "changed.tiff"
    shutil.copy2(first["path"], changed)
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash sees it
    changed.write_bytes(bytes(data))
    _sql(db,
         f"UPDATE slides SET path = '{changed}' WHERE slide_id = {int(first['slide_id'])}",
         f"UPDATE slides SET path = '{tmp_path / 'gone.tiff'}' "
         f"WHERE slide_id = {int(second['slide_id'])}")
    # a feature file removed, another damaged
    features = sorted((db.parent / "features").glob("*/*.npz"))
    features[0].unlink()
    features[1].write_bytes(features[1].read_bytes()[:100])

    report = check_store(db)
    kinds = _kinds(report)
    assert kinds["slide-files-changed"] == kinds["slide-files-missing"] == "problem"
    assert kinds["feature-files-missing"] == kinds["feature-files-unreadable"] == "warning"
    fast = _kinds(check_store(db, hash_files=False))
    assert "slide-files-changed" not in fast and "feature-files-unreadable" not in fast
    missing = next(f for f in report.findings if f.kind == "feature-files-missing")
    assert f"score --db {db} --model {model}" in missing.repair

    # model files: moved with the store (repairable), damaged, gone
    _sql(db, f"UPDATE models SET artifact_path = '/nowhere/{model}' WHERE model_id = '{model}'")
    assert _kinds(check_store(db))["model-files-moved"] == "problem"
    check_store(db, repair=True)
    with store.open_store(db, read_only=True) as st:
        assert store.get_model(st, model).artifact_path == str(db.parent / "models" / model)
    assert "model-files-moved" not in _kinds(check_store(db))
    weights = db.parent / "models" / model / "model.pt"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert _kinds(check_store(db))["model-files-unreadable"] == "problem"
    shutil.rmtree(db.parent / "models" / model)
    assert _kinds(check_store(db))["model-files-missing"] == "problem"


@pytest.mark.slow
def test_store_of_a_newer_program(demo_db: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    db = _copy_store(demo_db, tmp_path / "s")
    _sql(db, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    report = check_store(db)
    assert [f.kind for f in report.problems] == ["schema"] and report.schema_version is None
    assert report.problems[0].repair == "upgrade cmil_core"
    assert main(["check", "--db", str(db)]) == 1


def test_check_of_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="no store here"):
        check_store(tmp_path / "none.duckdb")
    assert main(["check", "--db", str(tmp_path / "none.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "none.duckdb").exists()


def test_an_empty_store_is_clean(db_path: Path) -> None:
    store.open_store(db_path).close()
    report = check_store(db_path)
    assert report.ok and report.findings == []
    assert temporary_leftovers(db_path) == []


# --------------------------------------------------------------------------- backup and restore


@pytest.mark.slow
def test_backup_and_restore_bring_back_the_same_store(
        demo_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "backups" / "study.zip"
    # a dashboard-like reader in another process holds the store open meanwhile
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, duckdb; con = duckdb.connect(sys.argv[1], read_only=True); "
         "print(con.execute('SELECT count(*) FROM patches').fetchone()[0], flush=True); "
         "time.sleep(120)", str(demo_db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and int(reader.stdout.readline()) > 0
        assert main(["backup", "--db", str(demo_db), "--out", str(archive)]) == 0
    finally:
        reader.kill()
        reader.wait()
        if reader.stdout is not None:
            reader.stdout.close()
    assert "study.zip: backup of" in capsys.readouterr().out
    assert [p.name for p in archive.parent.iterdir()] == ["study.zip"]  # no temporary file
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        names = set(zf.namelist())
    assert manifest["format"] == BACKUP_FORMAT and manifest["store"] == "cmil.duckdb"
    assert set(manifest["members"]) | {MANIFEST} == names
    assert "store/cmil.duckdb" in names
    assert sum(n.startswith("features/") for n in names) == 46
    assert sum(n.startswith("models/") for n in names) == 2  # model.pt, config.json
    assert not any(n.endswith((".tiff", ".jpg")) for n in names)  # slides stay where they are
    assert manifest["tables"] == _contents(demo_db)["counts"].iloc[0].to_dict()
    # an existing archive is not overwritten without --force
    assert main(["backup", "--db", str(demo_db), "--out", str(archive)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err

    target = tmp_path / "elsewhere" / "restored.duckdb"
    assert main(["restore", "--backup", str(archive), "--db", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"{target}: restored from {archive}" in out and out.strip().endswith("0 warnings")
    before, after = _contents(demo_db), _contents(target)
    for name, frame in before.items():
        pd.testing.assert_frame_equal(after[name], frame, check_exact=True, obj=name)
    with store.open_store(target, read_only=True) as st:
        (model,) = store.list_models(st)["model_id"]
        assert store.get_model(st, model).artifact_path == str(target.parent / "models" / model)
        audit = store.audit_frame(st)
    assert audit["action"].tolist() == ["restore", "demo"]  # the demo build is audited too
    assert audit["who"].iloc[0] == getpass.getuser()
    assert json.loads(audit["details"].iloc[0])["backup"] == str(archive.resolve())
    assert check_store(target).ok
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "features", "models", "restored.duckdb"]

    # A second restore must not overwrite it without --force; with --force it replaces it.
    with pytest.raises(InputError, match="a store is already there; pass --force"):
        restore_store(archive, target)
    (target.parent / "models" / "stray").mkdir()
    summary = restore_store(archive, target, force=True)
    assert summary.replaced and summary.check.ok
    assert not (target.parent / "models" / "stray").exists()
    with store.open_store(target, read_only=True) as st:
        assert store.audit_frame(st)["action"].tolist() == ["restore", "demo"]  # the backup's
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "features", "models", "restored.duckdb"]


@pytest.mark.slow
def test_backup_without_features(demo_db: Path, tmp_path: Path) -> None:
    archive = tmp_path / "lean.zip"
    summary = backup_store(demo_db, archive, features=False)
    assert not summary.features and summary.models == 1
    target = tmp_path / "r" / "cmil.duckdb"
    restored = restore_store(archive, target)
    assert restored.check.ok  # missing features are warnings: a cache, recomputed
    assert {f.kind for f in restored.check.warnings} == {
        "feature-files-missing", "encoded-without-features"}
    # a folder holding another store's models is not taken over without --force
    other = tmp_path / "other" / "second.duckdb"
    (other.parent / "models" / "someone-elses").mkdir(parents=True)
    with pytest.raises(InputError, match="already holds files of another store"):
        restore_store(archive, other)
    assert not other.exists()
    with pytest.raises(InputError, match="inside the store's models/ folder"):
        backup_store(demo_db, demo_db.parent / "models" / "b.zip")


def _flip(archive: Path, dest: Path, offset: int) -> Path:
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x01
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.slow
def test_damaged_or_hostile_archives_are_refused(
        demo_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "good.zip"
    backup_store(demo_db, archive, features=False)
    with zipfile.ZipFile(archive) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        central = zf.start_dir  # offset of the central directory
    data = archive.read_bytes()

    def inside(name: str) -> int:  # the middle of a member's compressed bytes
        info = infos[name]
        start = data.index(name.encode(), info.header_offset) + len(name)
        return start + 20 + info.compress_size // 2

    store_entry = data.index(b"PK\x01\x02", central)  # the first entry: the store file
    assert data[store_entry + 46:].startswith(b"store/cmil.duckdb")
    model = next(n for n in infos if n.endswith("model.pt"))
    cases = {
        "inside the store file": inside("store/cmil.duckdb"),
        "inside a model": inside(model),
        "inside the manifest": inside(MANIFEST),
        "in the central directory (a CRC)": store_entry + 16,
    }
    target = tmp_path / "never" / "cmil.duckdb"
    for what, offset in cases.items():
        bad = _flip(archive, tmp_path / "bad.zip", offset)
        assert main(["restore", "--backup", str(bad), "--db", str(target)]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, (what, err)
        assert "nothing was restored" in err, (what, err)
        assert not target.parent.exists(), what  # nothing written

    # a member that would land outside the store's folder, listed in the manifest
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(evil, "w") as dst:
        manifest = json.loads(src.read(MANIFEST))
        for name in src.namelist():
            if name != MANIFEST:
                dst.writestr(name, src.read(name))
        dst.writestr("models/../../escape.txt", b"x")
        manifest["members"]["models/../../escape.txt"] = {"sha256": "0" * 64, "size": 1}
        dst.writestr(MANIFEST, json.dumps(manifest))
    with pytest.raises(InputError, match="would land outside the store's folder"):
        restore_store(evil, target)
    # not a zip; a zip that is not a backup
    (tmp_path / "notes.zip").write_text("hello")
    with pytest.raises(InputError, match="not a readable zip archive"):
        restore_store(tmp_path / "notes.zip", target)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(InputError, match="not a cMIL backup"):
        restore_store(tmp_path / "other.zip", target)
    assert not target.parent.exists() and not (tmp_path / "escape.txt").exists()


def test_check_warns_when_quality_control_may_bias_the_study(
        db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cmil_core.ingest import qc
    from cmil_core.ingest.quality import QCThresholds
    from qc_helpers import BLURRED, GOOD, cohort_with_patches

    cohort_with_patches(db_path, tmp_path, "A", {
        "P1": (1, [GOOD] * 2 + [BLURRED] * 8), "P2": (0, [GOOD] * 10), "P3": (0, [BLURRED] * 3)})
    with store.open_store(db_path) as st:
        qc.apply_thresholds(st, "A", QCThresholds(), who="ann", source="ingest")
    report = check_store(db_path, hash_files=False)
    # The slide files of this made-up cohort do not exist (problems); QC gives warnings.
    assert all(not f.kind.startswith("qc-") for f in report.problems)
    found = {f.kind: f for f in report.findings if f.kind.startswith("qc-")}
    assert set(found) >= {"qc-cohort-loss", "qc-patients-without-patches", "qc-class-imbalance"}
    assert found["qc-patients-without-patches"].examples == ["P3"]
    assert all(f.severity == "warning" for f in found.values())
    main(["check", "--db", str(db_path), "--no-hash"])
    out = capsys.readouterr().out
    assert "warning: cohort 'A': quality control rejects 48% of its 23 patches" in out
    assert "repair: review the thresholds on the Quality control page" in out
