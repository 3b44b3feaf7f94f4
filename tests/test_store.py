"""cmil_core.store: schema, migrations, round trips, transactions, threads, locks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from cmil_core import store
from cmil_core.errors import InputError
from cmil_core.store import PatientRow, StoreBusyError, StoreError, open_store

CONTRACT = {
    "cohorts": ["cohort", "role", "center", "created_at"],
    "patients": ["cohort", "patient_id", "bm_metastasis", "os_months", "os_event",
                 "efs_months", "efs_event", "clinical"],
    "slides": ["slide_id", "cohort", "patient_id", "path", "sha256", "kind", "width",
               "height", "mpp", "status", "error"],
    "patches": ["patch_id", "slide_id", "x", "y", "size", "qc_pass", "qc_reason"],
    "models": ["model_id", "created_at", "aggregator", "encoder", "train_cohorts", "config",
               "metrics", "artifact_path"],
    "patient_scores": ["model_id", "cohort", "patient_id", "score", "risk_group"],
    "patch_scores": ["model_id", "patch_id", "probability", "attention"],
    "demo_tumor_regions": ["slide_id", "x", "y", "width", "height"],
}


def _patients() -> list[PatientRow]:
    return [
        PatientRow("P1", 1, 12.5, 1, 6.0, 1, {"age": 3, "sex": "M", "stage": "4"}),
        PatientRow("P2", 0, 40.0, 0, None, None, {"age": 1.5, "sex": "F", "note": "Orléans"}),
        PatientRow("P3"),
    ]


def test_new_store_has_the_contract_tables(db_path: Path) -> None:
    with open_store(db_path) as st:
        assert store.schema_version(st) == store.SCHEMA_VERSION == 6
        for table, columns in CONTRACT.items():
            have = [r[0] for r in st.cursor().execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                [table]).fetchall()]
            assert set(columns) <= set(have), (table, have)
        assert store.table_counts(st) == dict.fromkeys(CONTRACT, 0)


def test_patients_round_trip(db_path: Path) -> None:
    with open_store(db_path) as st:
        n = store.import_patients(st, "A", _patients(), role="validation", center="Centre A",
                                  source_file="a.csv")
        assert n == 3
    with open_store(db_path, read_only=True) as st:
        frame = store.patients_frame(st).set_index("patient_id")
        (cohort,) = store.list_cohorts(st)
    assert cohort.cohort == "A" and cohort.role == "validation" and cohort.center == "Centre A"
    assert frame.loc["P1", "bm_metastasis"] == 1
    assert frame.loc["P1", "os_months"] == 12.5
    assert frame.loc["P2", "clinical"] == {"age": 1.5, "sex": "F", "note": "Orléans"}
    assert frame.loc["P3", "clinical"] == {}
    assert frame["efs_months"].isna().tolist() == [False, True, True]


def test_failed_import_rolls_back_everything(db_path: Path) -> None:
    with open_store(db_path) as st:
        store.import_patients(st, "A", _patients(), role="train", center=None)
        bad = [PatientRow("Q1", 1), PatientRow("Q2", 5)]  # 5 breaks the CHECK constraint
        with pytest.raises(duckdb.Error):
            store.import_patients(st, "A", bad, role="test", center="new", replace=True)
        assert store.patients_frame(st)["patient_id"].tolist() == ["P1", "P2", "P3"]
        assert store.list_cohorts(st)[0].role == "train"


def test_roles_are_checked(db_path: Path) -> None:
    with open_store(db_path) as st, pytest.raises(ValueError, match="role 'training'"):
        store.import_patients(st, "A", _patients(), role="training", center=None)


def test_slides_register_update_and_changed_file(db_path: Path) -> None:
    with open_store(db_path) as st:
        kw = dict(cohort="A", patient_id="P1", path="/x/P1_a.tiff", kind="openslide:generic-tiff",
                  width=100, height=80, mpp=0.5, size_bytes=1234)
        sid = store.register_slide(st, sha256="aaa", tumor_regions=[(1, 2, 3, 4)], **kw)
        assert store.register_slide(st, sha256="aaa", **kw) == sid  # same file: same id
        st.cursor().execute(
            "INSERT INTO patches (patch_id, slide_id, x, y, size, qc_pass) "
            "VALUES (1, ?, 0, 0, 224, true)", [sid])
        assert store.table_counts(st)["patches"] == 1
        assert store.tumor_regions_frame(st, sid)[["x", "y", "width", "height"]].values.tolist() == [[1, 2, 3, 4]]
        # The file changed: its patches and ground truth go, the slide is pending again.
        assert store.register_slide(st, sha256="bbb", **kw) == sid
        counts = store.table_counts(st)
        assert counts["patches"] == 0 and counts["demo_tumor_regions"] == 0
        (slide,) = store.list_slides(st)
        assert slide.sha256 == "bbb" and slide.status == "pending" and slide.size_bytes == 1234
        with pytest.raises(ValueError, match="status 'done'"):
            store.register_slide(st, sha256="c", status="done", **kw)


def test_delete_cohort_removes_its_rows_only(db_path: Path) -> None:
    with open_store(db_path) as st:
        for c in ("A", "B"):
            store.import_patients(st, c, _patients(), role="validation", center=None)
            store.register_slide(st, cohort=c, patient_id="P1", path=f"/{c}.tiff", sha256="s",
                                 kind="k", width=1, height=1, mpp=0.5, size_bytes=1,
                                 tumor_regions=[(0, 0, 1, 1)])
        store.delete_cohort(st, "A")
        assert [c.cohort for c in store.list_cohorts(st)] == ["B"]
        counts = store.table_counts(st)
        assert counts["patients"] == 3 and counts["slides"] == 1 and counts["demo_tumor_regions"] == 1


def test_meta_values(db_path: Path) -> None:
    with open_store(db_path) as st:
        assert store.get_meta(st, "demo") is None
        store.set_meta(st, "demo", '{"size": "small"}')
        assert store.get_meta(st, "demo") == '{"size": "small"}'


def test_forward_migration_keeps_data(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(db_path) as st:
        store.import_patients(st, "A", _patients(), role="train", center=None)
    current = store.SCHEMA_VERSION

    def add_column(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("ALTER TABLE patients ADD COLUMN note TEXT DEFAULT 'migrated'")

    monkeypatch.setattr(store.schema, "MIGRATIONS", (*store.schema.MIGRATIONS, add_column))
    monkeypatch.setattr(store.schema, "SCHEMA_VERSION", current + 1)
    with pytest.raises(StoreError, match=f"schema version {current}, this program uses {current + 1}"):
        open_store(db_path, read_only=True)
    with open_store(db_path) as st:
        assert store.schema_version(st) == current + 1
        notes = st.cursor().execute("SELECT DISTINCT note FROM patients").fetchall()
        assert notes == [("migrated",)]
        assert len(store.patients_frame(st)) == 3


def test_version_1_store_is_upgraded_in_place(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before ingest existed (schema 1) gains its tables and columns."""
    with monkeypatch.context() as m:
        m.setattr(store.schema, "MIGRATIONS", store.schema.MIGRATIONS[:1])
        m.setattr(store.schema, "SCHEMA_VERSION", 1)
        with open_store(db_path) as st:
            store.import_patients(st, "A", _patients(), role="train", center=None)
            store.register_slide(st, cohort="A", patient_id="P1", path="/a.tiff", sha256="s",
                                 kind="k", width=1, height=1, mpp=0.5, size_bytes=1)
            assert store.schema_version(st) == 1
    with open_store(db_path) as st:
        assert store.schema_version(st) == store.SCHEMA_VERSION
        assert len(store.patients_frame(st)) == 3
        (slide,) = store.list_slides(st)
        assert slide.tiling_key is None and slide.status == "pending"
        assert store.ingest_runs_frame(st).empty


def test_store_from_a_newer_program_is_refused(db_path: Path) -> None:
    with open_store(db_path) as st:
        store.set_meta(st, "schema_version", "99")
    with pytest.raises(StoreError, match="schema version 99 was written by a newer cmil_core"):
        open_store(db_path)


def test_read_only_open_of_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store here yet"):
        open_store(tmp_path / "none.duckdb", read_only=True)


def test_read_only_store_refuses_writes(db_path: Path) -> None:
    open_store(db_path).close()
    with open_store(db_path, read_only=True) as st, pytest.raises(StoreError, match="read-only"):
        store.set_meta(st, "x", "y")


def test_one_database_object_per_process(db_path: Path) -> None:
    a = open_store(db_path)
    b = open_store(db_path, read_only=True)  # reuses the writer: sees its commits
    store.import_patients(a, "A", _patients(), role="train", center=None)
    assert len(store.patients_frame(b)) == 3
    assert b.read_only and not a.read_only
    a.close()
    assert len(store.patients_frame(b)) == 3  # still open: b holds a reference
    b.close()
    assert str(db_path.resolve()) not in store.connection._registry


def test_writer_waits_for_readers_in_the_same_process(db_path: Path) -> None:
    open_store(db_path).close()
    reader = open_store(db_path, read_only=True)
    threading.Timer(0.3, reader.close).start()
    started = time.monotonic()
    with open_store(db_path, timeout=5) as writer:
        assert not writer.read_only
        assert time.monotonic() - started >= 0.25


def test_threads_share_the_store_safely(db_path: Path) -> None:
    """Eight reader threads and one writer thread, each with its own cursor."""
    with open_store(db_path) as st:
        store.import_patients(st, "A", _patients(), role="train", center=None)
        errors: list[BaseException] = []
        seen: list[int] = []

        def reader() -> None:
            try:
                for _ in range(30):
                    n = len(store.patients_frame(st))
                    seen.append(n)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)

        def writer() -> None:
            try:
                for i in range(10):
                    store.import_patients(
                        st, f"W{i}", [PatientRow(f"X{i}")], role="test", center=None)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(8)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert min(seen) >= 3 and max(seen) <= 13
        assert store.table_counts(st)["patients"] == 13


def test_another_process_holding_the_store_gives_a_clear_error(db_path: Path) -> None:
    open_store(db_path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time\n"
         f"c = duckdb.connect({str(db_path)!r})\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreBusyError, match=rf"in use by another process \(PID {holder.pid}"):
            open_store(db_path, read_only=True, timeout=0.3)
    finally:
        holder.communicate("")
    with open_store(db_path, read_only=True, timeout=2):
        pass


def test_default_path_follows_cmil_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CMIL_DB", str(tmp_path / "x.duckdb"))
    assert store.default_db_path() == tmp_path / "x.duckdb"
    monkeypatch.delenv("CMIL_DB")
    monkeypatch.delenv("CMIL_DATA_DIR", raising=False)
    assert store.default_db_path().parts[-2:] == ("data", "cmil.duckdb")


def test_fingerprint_changes_with_writes(db_path: Path) -> None:
    assert store.store_fingerprint(db_path) == (0, 0, 0)
    with open_store(db_path) as st:
        first = store.store_fingerprint(db_path)
        store.import_patients(st, "A", _patients(), role="train", center=None)
        st.cursor().execute("CHECKPOINT")
    assert store.store_fingerprint(db_path) != first


def test_data_dir_moves_the_default_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CMIL_DB", raising=False)
    monkeypatch.setenv("CMIL_DATA_DIR", str(tmp_path))
    assert store.default_db_path() == tmp_path / "cmil.duckdb"


def _patch_table(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "g_col": range(n), "g_row": [0] * n, "x": [224 * i for i in range(n)], "y": [0] * n,
        "size": [224] * n, "qc_pass": [i % 2 == 0 for i in range(n)],
        "qc_reason": [None if i % 2 == 0 else "blurred" for i in range(n)],
        **{c: [0.5] * n for c in ("foreground_fraction", "thick_fraction", "background_fraction",
                                  "mean_intensity", "dark_fraction", "bright_fraction",
                                  "blur_variance", "nuclei_fraction", "nuclear_area_um2")},
    })


def test_slide_patches_replace_and_failures(db_path: Path) -> None:
    with open_store(db_path) as st:
        sid = store.register_slide(st, cohort="A", patient_id="P1", path="/a.tiff", sha256="s",
                                   kind="k", width=1000, height=224, mpp=0.5, size_bytes=1)
        run = store.start_ingest_run(st, "A", source="/slides", manifest=None, config={"k": 1})
        assert store.write_slide_patches(st, sid, _patch_table(4), tiling_key="key1",
                                         tiling={"grid": 1}, run_id=run) == 4
        frame = store.patches_frame(st, sid)
        assert frame["patch_id"].tolist() == [sid * store.PATCH_ID_BASE + i for i in range(4)]
        assert frame["qc_reason"].tolist()[:2] == [None, "blurred"]
        assert store.find_slide(st, "A", "/a.tiff").tiling_key == "key1"  # type: ignore[union-attr]
        # Rewriting replaces, never duplicates.
        store.write_slide_patches(st, sid, _patch_table(3), tiling_key="key2", tiling={},
                                  run_id=run)
        assert store.table_counts(st)["patches"] == 3
        counts = store.qc_counts(st, "A")
        assert dict(zip(counts["qc_reason"], counts["patches"])) == {None: 2, "blurred": 1}
        store.mark_slide_failed(st, sid, "a.tiff: cannot read pixels", run_id=run)
        slide = store.find_slide(st, "A", "/a.tiff")
        assert slide is not None and slide.status == "failed" and slide.tiling_key is None
        assert store.table_counts(st)["patches"] == 0
        store.finish_ingest_run(st, run, "done", {"slides": 1})
        runs = store.ingest_runs_frame(st, "A")
        assert runs["status"].tolist() == ["done"] and json.loads(runs["config"][0]) == {"k": 1}
        with pytest.raises(ValueError, match="lacks columns"):
            store.write_slide_patches(st, sid, _patch_table(2).drop(columns=["x"]),
                                      tiling_key="k", tiling={}, run_id=None)


def test_models_and_scores_round_trip(db_path: Path) -> None:
    from datetime import datetime

    with open_store(db_path) as st:
        store.import_patients(st, "A", _patients(), role="train", center=None)
        sid = store.register_slide(st, cohort="A", patient_id="P1", path="/a.tiff", sha256="s",
                                   kind="k", width=1000, height=224, mpp=0.5, size_bytes=1)
        store.write_slide_patches(st, sid, _patch_table(4), tiling_key="k", tiling={}, run_id=None)
        passed = store.passed_patches(st, "A")
        assert passed["patch_id"].tolist() == [sid * store.PATCH_ID_BASE + i for i in (0, 2)]
        model = store.ModelRow("m1", datetime(2026, 1, 1), "attention", "smallcnn", "A",
                               {"seed": 0}, {"cv_auc": 0.9}, "/models/m1", 0.42)
        store.add_model(st, model)
        assert store.get_model(st, "m1") == model
        assert store.get_model(st, "nope") is None
        patients = pd.DataFrame({"patient_id": ["P1", "P2"], "score": [0.9, 0.1],
                                 "risk_group": ["high", "low"]})
        patches = pd.DataFrame({"patch_id": passed["patch_id"], "probability": [0.8, 0.2],
                                "attention": [0.7, 0.3], "attention_raw": [1.0, 0.1]})
        for _ in range(2):  # rescoring replaces, never duplicates
            store.write_scores(st, "m1", "A", patients, patches)
        counts = store.table_counts(st)
        assert counts["patient_scores"] == 2 and counts["patch_scores"] == 2
        scores = store.patient_scores_frame(st, "m1")
        assert scores[["patient_id", "score", "risk_group", "bm_metastasis"]].values.tolist() == [
            ["P1", 0.9, "high", 1], ["P2", 0.1, "low", 0]]
        store.add_model(st, store.ModelRow("m2", datetime(2026, 1, 2), "histogram", "smallcnn",
                                           "A", {}, {}, "/models/m2", 0.5))
        store.write_scores(st, "m2", "A", patients, patches)
        store.delete_model(st, "m2")
        assert store.get_model(st, "m2") is None and store.get_model(st, "m1") is not None
        counts = store.table_counts(st)
        assert counts["patient_scores"] == 2 and counts["patch_scores"] == 2  # m1's only
        store.set_slides_status(st, [sid], "encoded")
        assert store.list_slides(st)[0].status == "encoded"
        assert len(store.passed_patches(st, "A")) == 2  # encoded slides still count


def test_qc_summary_and_metric_histogram_per_cohort(db_path: Path) -> None:
    with open_store(db_path) as st:
        for cohort, n in (("A", 6), ("B", 3)):
            sid = store.register_slide(st, cohort=cohort, patient_id="P1", path=f"/{cohort}.tiff",
                                       sha256="s", kind="k", width=2000, height=224, mpp=0.5,
                                       size_bytes=1)
            table = _patch_table(n)
            table["blur_variance"] = [10.0 * (i + 1) for i in range(n)]  # 10, 20, ...
            store.write_slide_patches(st, sid, table, tiling_key="k", tiling={}, run_id=None)
        summary = store.qc_summary(st)
        got = {(r.cohort, r.qc_reason): r.patches for r in summary.itertuples()}
        # _patch_table keeps even rows and rejects odd ones as "blurred".
        assert got == {("A", None): 3, ("A", "blurred"): 3, ("B", None): 2, ("B", "blurred"): 1}
        hist = store.qc_metric_histogram(st, "blur_variance", bins=5)
        # Every patch is counted once, in its cohort, as kept or rejected.
        totals = hist.groupby("cohort")[["kept", "rejected"]].sum()
        assert totals.loc["A"].tolist() == [3, 3] and totals.loc["B"].tolist() == [2, 1]
        assert (hist["bin_high"] > hist["bin_low"]).all()
        # Bins lie between the 0.5th and 99.5th percentiles of all 9 values (10..60).
        assert hist["bin_low"].min() == pytest.approx(np.quantile([10, 20, 30, 40, 50, 60, 10, 20, 30], 0.005))
        with pytest.raises(InputError, match="unknown quality metric"):
            store.qc_metric_histogram(st, "x; DROP TABLE patches", bins=5)


def test_audit_trail_records_actions_newest_first(db_path: Path) -> None:
    with open_store(db_path) as st:
        store.record_audit(st, "ana@example.org", "import", cohort="A", details={"patients": 3})
        store.record_audit(st, "ben", "train", model_id="m1")
        with pytest.raises(ValueError, match="unknown audit action"):
            store.record_audit(st, "ben", "peek")
        trail = store.audit_frame(st)
    assert trail["action"].tolist() == ["train", "import"]
    assert trail["who"].tolist() == ["ben", "ana@example.org"]
    assert trail["cohort"].tolist()[1] == "A" and json.loads(trail["details"][1]) == {"patients": 3}


# --- reading one patient's patches at scale (bench/scale.py) ---


def _scored_study(st: store.Store, seed: int = 0) -> dict[int, str]:
    """Slides 1, 3 of P1 and 2 of P2 (non-adjacent ids), scored by model m with ties and
    missing values, scores written in a shuffled order; returns slide_id -> patient."""
    from datetime import datetime

    rng = np.random.default_rng(seed)
    owners = {}
    for path, patient in (("/1.tiff", "P1"), ("/2.tiff", "P2"), ("/3.tiff", "P1")):
        sid = store.register_slide(st, cohort="A", patient_id=patient, path=path, sha256=path,
                                   kind="k", width=9000, height=224, mpp=0.5, size_bytes=1)
        store.write_slide_patches(st, sid, _patch_table(30), tiling_key="k", tiling={},
                                  run_id=None)
        owners[sid] = patient
    store.add_model(st, store.ModelRow("m", datetime(2026, 1, 1), "attention", "smallcnn", "A",
                                       {}, {}, "/models/m", 0.5))
    ids = store.passed_patches(st, "A")["patch_id"].to_numpy()
    attention = rng.choice([0.1, 0.2, 0.3, 0.5], ids.size)  # many ties
    attention[rng.choice(ids.size, 5, replace=False)] = np.nan
    order = rng.permutation(ids.size)
    patches = pd.DataFrame({"patch_id": ids[order], "probability": rng.random(ids.size)[order],
                            "attention": attention[order], "attention_raw": attention[order]})
    patients = pd.DataFrame({"patient_id": ["P1", "P2"], "score": [0.7, 0.2],
                             "risk_group": ["high", "low"]})
    store.write_scores(st, "m", "A", patients, patches)
    return owners


def _brute_force(frame: pd.DataFrame, by: str, k: int) -> tuple[list[int], list[int]]:
    """Top k by (by desc, patch id), then the k lowest (by asc, patch id) of the rest."""
    valued = frame[frame[by].notna()]
    top = valued.sort_values([by, "patch_id"], ascending=[False, True]).head(k)
    rest = valued[~valued["patch_id"].isin(top["patch_id"])]
    bottom = rest.sort_values([by, "patch_id"], ascending=[True, True]).head(k)
    return top["patch_id"].tolist(), bottom["patch_id"].tolist()


@pytest.mark.parametrize("k", [1, 3, 7, 15, 16, 40])
def test_extreme_patches_equal_a_brute_force_ranking(db_path: Path, k: int) -> None:
    with open_store(db_path) as st:
        owners = _scored_study(st)
        p1 = [s for s, p in owners.items() if p == "P1"]
        everything = store.scored_patches_frame(st, "m", cohort="A", patient_id="P1")
        assert set(everything["slide_id"]) == set(p1)  # not P2's slide in between
        for by in ("attention", "probability"):
            top, bottom, scored = store.extreme_patches(st, "m", p1, by=by, k=k)
            want_top, want_bottom = _brute_force(everything, by, k)
            assert top["patch_id"].tolist() == want_top
            assert bottom["patch_id"].tolist() == want_bottom
            assert scored == len(everything) == 30  # 15 kept patches on each of 2 slides
            assert list(top.columns) == list(everything.columns)
            row = everything.set_index("patch_id").loc[top["patch_id"].iloc[0]]
            assert top[["slide_id", "x", "y", "size"]].iloc[0].tolist() == [
                row["slide_id"], row["x"], row["y"], row["size"]]
        one = store.extreme_patches(st, "m", [p1[1]], by="attention", k=k)[0]
        assert set(one["slide_id"]) <= {p1[1]}


def test_extreme_patches_without_values_or_scores(db_path: Path) -> None:
    with open_store(db_path) as st:
        owners = _scored_study(st)
        p2 = [s for s, p in owners.items() if p == "P2"]
        ids = store.scored_patches_frame(st, "m", slide_id=p2[0])["patch_id"]
        none = pd.DataFrame({"patch_id": ids, "probability": 0.5, "attention": np.nan,
                             "attention_raw": np.nan})
        store.write_scores(st, "m", "A", pd.DataFrame(
            {"patient_id": ["P2"], "score": [0.2], "risk_group": ["low"]}), none)
        top, bottom, scored = store.extreme_patches(st, "m", p2, by="attention", k=4)
        assert top.empty and bottom.empty and scored == len(ids) > 0  # scored, no attention
        assert store.extreme_patches(st, "m", p2, by="probability", k=4)[0].shape[0] == 4
        assert store.extreme_patches(st, "other", p2, by="attention", k=4)[2] == 0
        assert store.extreme_patches(st, "m", [], by="attention", k=4)[2] == 0
        with pytest.raises(ValueError, match="entropy"):
            store.extreme_patches(st, "m", p2, by="entropy", k=4)


def test_slide_patches_accept_missing_reasons_of_any_kind(db_path: Path) -> None:
    with open_store(db_path) as st:
        sid = store.register_slide(st, cohort="A", patient_id="P1", path="/a.tiff", sha256="s",
                                   kind="k", width=1000, height=224, mpp=0.5, size_bytes=1)
        for reasons in ([None, None, None], [np.nan, np.nan, np.nan],
                        pd.array(["blurred", pd.NA, None], dtype="string")):
            table = _patch_table(3)
            table["qc_reason"] = reasons
            table["x"] = table["x"].astype("Int32")
            store.write_slide_patches(st, sid, table, tiling_key="k", tiling={}, run_id=None)
            frame = store.patches_frame(st, sid)
            assert frame["qc_reason"].isna().sum() == sum(pd.isna(r) for r in reasons)
            assert frame["x"].tolist() == [0, 224, 448]


def test_slide_patches_write_is_all_or_nothing(db_path: Path) -> None:
    with open_store(db_path) as st:
        sid = store.register_slide(st, cohort="A", patient_id="P1", path="/a.tiff", sha256="s",
                                   kind="k", width=1000, height=224, mpp=0.5, size_bytes=1)
        store.write_slide_patches(st, sid, _patch_table(3), tiling_key="k1", tiling={},
                                  run_id=None)
        bad = _patch_table(4)
        bad["x"] = pd.array([0, None, 448, 672], dtype="Int32")  # x is NOT NULL
        with pytest.raises(duckdb.ConstraintException):
            store.write_slide_patches(st, sid, bad, tiling_key="k2", tiling={}, run_id=None)
        # The failed write deleted nothing and changed nothing.
        assert len(store.patches_frame(st, sid)) == 3
        assert store.find_slide(st, "A", "/a.tiff").tiling_key == "k1"  # type: ignore[union-attr]
        assert store.write_slide_patches(st, sid, _patch_table(0), tiling_key="k3", tiling={},
                                         run_id=None) == 0
        assert store.patches_frame(st, sid).empty
        assert store.find_slide(st, "A", "/a.tiff").status == "tiled"  # type: ignore[union-attr]


def test_scores_write_is_all_or_nothing(db_path: Path) -> None:
    from datetime import datetime

    with open_store(db_path) as st:
        store.import_patients(st, "A", _patients(), role="train", center=None)
        sid = store.register_slide(st, cohort="A", patient_id="P1", path="/a.tiff", sha256="s",
                                   kind="k", width=1000, height=224, mpp=0.5, size_bytes=1)
        store.write_slide_patches(st, sid, _patch_table(4), tiling_key="k", tiling={}, run_id=None)
        store.add_model(st, store.ModelRow("m1", datetime(2026, 1, 1), "attention", "smallcnn",
                                           "A", {}, {}, "/models/m1", 0.5))
        ids = store.passed_patches(st, "A")["patch_id"]
        patients = pd.DataFrame({"patient_id": ["P1"], "score": [0.9], "risk_group": ["high"]})
        patches = pd.DataFrame({"patch_id": ids, "probability": [0.8, 0.2],
                                "attention": [0.7, 0.3], "attention_raw": [1.0, 0.1]})
        store.write_scores(st, "m1", "A", patients, patches)
        twice = pd.concat([patches, patches])  # the same patch twice: the key refuses it
        with pytest.raises(duckdb.ConstraintException):
            store.write_scores(st, "m1", "A", patients.assign(score=0.1), twice)
        kept = store.scored_patches_frame(st, "m1", slide_id=sid)
        assert kept["probability"].tolist() == [0.8, 0.2]
        assert store.patient_scores_frame(st, "m1")["score"].tolist() == [0.9]
        # Nullable columns from pandas: missing values are stored as NULL and read as NaN.
        store.write_scores(st, "m1", "A", patients, patches.assign(
            attention=pd.array([0.5, None], dtype="Float64")))
        assert store.scored_patches_frame(st, "m1", slide_id=sid)["attention"].isna().tolist() \
            == [False, True]


def test_writers_run_duckdb_on_one_thread(db_path: Path) -> None:
    """Many small write transactions: one thread is quicker (bench/scale.py); readers keep all."""
    with open_store(db_path) as st:
        assert st.cursor().execute("SELECT current_setting('threads')").fetchone() == (1,)
    with open_store(db_path, read_only=True) as st:
        threads = st.cursor().execute("SELECT current_setting('threads')").fetchone()
    assert threads is not None and threads[0] >= 1
