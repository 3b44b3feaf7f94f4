"""The Ray executor (cmil_core.model.distributed) against the local one, on a real local Ray cluster.

One small demo study (all 46 slides, built once with the local executor) is
the reference: a local Ray cluster of 2 CPUs must give the same patch rows
(ingest), the same feature files (bit for bit: arrays and metadata but the
creation time) and the same patient and patch scores; killing an encoder
actor mid-run must not change them; a corrupt slide fails alone, with the
reason the local executor gives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.demo.generator import generate_demo
from cmil_core.errors import InputError
from cmil_core.ingest.pipeline import ingest
from cmil_core.model import distributed, features
from cmil_core.model.modeling import load_model, score
from cmil_core.progress import Progress

try:
    import ray
except ImportError:  # pragma: no cover - only where Ray is missing
    if os.environ.get("CMIL_REQUIRE_RAY") == "1":  # ./test.sh installs Ray: it must be there
        raise
    pytest.skip("Ray is not installed: pip install -r requirements-cluster.txt",
                allow_module_level=True)

pytestmark = pytest.mark.slow

SLIDE_COLUMNS = ["cohort", "patient_id", "path", "sha256", "kind", "width", "height", "mpp",
                 "status", "error", "size_bytes", "tiling_key"]


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """A local Ray cluster of 2 CPUs for this module, shut down after."""
    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # on a loaded machine a node may miss Ray's fixed 30 s start-up
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # Ray raises a bare Exception on that time-out
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo, built (ingested, trained, scored) by the local executor."""
    db = tmp_path_factory.mktemp("demo") / "cmil.duckdb"
    generate_demo(db, size="small", seed=7)
    return db


def _model_id(db: Path) -> str:
    with store.open_store(db, read_only=True) as st:
        return str(store.list_models(st)["model_id"].iloc[0])


def _copy_without_features(db: Path, folder: Path) -> Path:
    """The demo's store alone (its model files stay where they are; no feature file)."""
    folder.mkdir(parents=True)
    shutil.copy(db, folder / "cmil.duckdb")
    return folder / "cmil.duckdb"


def _slides(db: Path, cohort: str) -> pd.DataFrame:
    with store.open_store(db, read_only=True) as st:
        rows = store.list_slides(st, cohort)
        frames = []
        for s in rows:
            patches = store.patches_frame(st, s.slide_id).drop(
                columns=["patch_id", "slide_id"], errors="ignore")
            patches.insert(0, "path", s.path)
            frames.append(patches)
    slides = pd.DataFrame([{c: getattr(s, c) for c in SLIDE_COLUMNS} for s in rows])
    patches = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return slides.sort_values("path", ignore_index=True), patches.sort_values(
        ["path", "y", "x"], ignore_index=True) if len(patches) else patches


def _scores(db: Path, model_id: str, cohort: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    with store.open_store(db, read_only=True) as st:
        patients = store.patient_scores_frame(st, model_id, cohort)
        slides = {s.slide_id: s.path for s in store.list_slides(st, cohort)}
        parts = []
        for slide_id, path in sorted(slides.items()):
            frame = store.scored_patches_frame(st, model_id, slide_id=slide_id)
            frame["path"] = path
            parts.append(frame.drop(columns=["patch_id", "slide_id"]))
    return patients, pd.concat(parts, ignore_index=True)


def _assert_same_feature_files(mine: Path, reference: Path, *, same_store: bool = True) -> int:
    """Every feature file under ``mine`` equals its twin under ``reference``: arrays bit for
    bit, metadata but created_at (and patch ids, when they come from another store)."""
    files = sorted(mine.rglob("*.npz"))
    for f in files:
        a = features.load_features(f)
        b = features.load_features(reference / f.relative_to(mine))
        for name in ("features", "patch_ids", "coords") if same_store else ("features", "coords"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), (f.name, name)
        meta_a = {k: v for k, v in a.meta.items() if k != "created_at"}
        meta_b = {k: v for k, v in b.meta.items() if k != "created_at"}
        assert meta_a == meta_b, f.name
    return len(files)


def test_ray_ingest_gives_the_local_patch_rows(demo: Path, ray_cluster: Any,
                                               tmp_path: Path) -> None:
    folder = demo.parent / "demo"
    db = tmp_path / "cmil.duckdb"
    import_cohort(db, "training", folder / "training_clinical.csv", role="train")
    summary = ingest(db, "training", folder / "training",
                     manifest=folder / "training_manifest.csv", executor="ray")
    assert {s.status for s in summary.slides} == {"tiled"}
    slides_ray, patches_ray = _slides(db, "training")
    slides_local, patches_local = _slides(demo, "training")
    assert set(slides_ray.pop("status")) == {"tiled"}  # the demo's are "encoded" by now
    pd.testing.assert_frame_equal(slides_ray, slides_local.drop(columns="status"))
    assert len(patches_ray) > 100
    pd.testing.assert_frame_equal(patches_ray, patches_local)
    # A rerun on Ray skips every slide, as the local executor does.
    again = ingest(db, "training", folder / "training",
                   manifest=folder / "training_manifest.csv", executor="ray")
    assert {s.status for s in again.slides} == {"skipped"}


def test_ray_score_gives_the_local_feature_files_and_scores(demo: Path, ray_cluster: Any,
                                                           tmp_path: Path) -> None:
    model_id = _model_id(demo)
    db = _copy_without_features(demo, tmp_path / "ray")
    done = score(db, model_id, executor="ray")
    assert done == {"training": 14, "external_a": 8, "external_b": 8}
    assert _assert_same_feature_files(db.parent / "features", demo.parent / "features") == 46
    for cohort in done:
        patients_ray, patches_ray = _scores(db, model_id, cohort)
        patients_local, patches_local = _scores(demo, model_id, cohort)
        pd.testing.assert_frame_equal(patients_ray, patients_local)
        pd.testing.assert_frame_equal(patches_ray, patches_local)


def test_killing_an_encoder_actor_mid_run_changes_nothing(demo: Path, ray_cluster: Any,
                                                          tmp_path: Path) -> None:
    model_id = _model_id(demo)
    db = _copy_without_features(demo, tmp_path / "killed")
    killed: list[str] = []

    def kill_on_first_slide(event: Progress) -> None:
        if killed or not event.message.endswith("(ray)"):
            return
        for entry in ray.util.list_named_actors(all_namespaces=False):
            name = entry if isinstance(entry, str) else entry["name"]
            if name.startswith(distributed.ACTOR_PREFIX):
                ray.kill(ray.get_actor(name), no_restart=False)  # Ray restarts it
                killed.append(name)
                return

    done = score(db, model_id, ["training"], executor="ray", progress=kill_on_first_slide)
    assert killed, "no encoder actor was running to kill"
    assert done == {"training": 14}
    files = _assert_same_feature_files(db.parent / "features", demo.parent / "features")
    with store.open_store(demo, read_only=True) as st:
        assert files == len(store.list_slides(st, "training"))
    patients_ray, patches_ray = _scores(db, model_id, "training")
    patients_local, patches_local = _scores(demo, model_id, "training")
    pd.testing.assert_frame_equal(patients_ray, patients_local)
    pd.testing.assert_frame_equal(patches_ray, patches_local)


def test_a_corrupt_slide_fails_alone_as_it_does_locally(demo: Path, ray_cluster: Any,
                                                        tmp_path: Path) -> None:
    source = demo.parent / "demo"
    folder = tmp_path / "external_b"
    patients = ["B001", "B002", "B003", "B005"]  # 12 photographs, of 4 of the 8 patients
    for patient in patients:
        shutil.copytree(source / "external_b" / patient, folder / patient)
    manifest = tmp_path / "manifest.csv"
    rows = pd.read_csv(source / "external_b_manifest.csv")
    rows[rows["patient_id"].isin(patients)].to_csv(manifest, index=False)
    broken = folder / "B002" / "fov01.jpg"
    broken.write_bytes(broken.read_bytes()[:600])  # truncated: its header, few pixels
    outcomes = {}
    for executor in ("local", "ray"):
        db = tmp_path / executor / "cmil.duckdb"
        import_cohort(db, "external_b", source / "external_b_clinical.csv")
        summary = ingest(db, "external_b", folder, manifest=manifest, executor=executor)
        outcomes[executor] = {Path(s.path).name if s.status == "failed" else s.path:
                              (s.status, s.reason, s.patches, s.passed) for s in summary.slides}
    failed = {k: v for k, v in outcomes["ray"].items() if v[0] == "failed"}
    assert list(failed) == ["fov01.jpg"] and "fov01.jpg" in str(failed["fov01.jpg"][1])
    assert outcomes["ray"] == outcomes["local"]
    pd.testing.assert_frame_equal(_slides(tmp_path / "ray" / "cmil.duckdb", "external_b")[1],
                                  _slides(tmp_path / "local" / "cmil.duckdb", "external_b")[1])

    # Extraction: a slide broken after ingest fails alone; the others' files are written.
    db = tmp_path / "ray" / "cmil.duckdb"
    other = folder / "B005" / "fov02.jpg"
    other.write_bytes(b"\xff\xd8 not a photograph any more")
    encoder = load_model(demo, _model_id(demo)).encoder
    with store.open_store(db, read_only=True) as st:
        passed = store.passed_patches(st, "external_b")
    tasks = [features.SlideTask(str(rows.iloc[0]["path"]), rows[["patch_id", "x", "y", "size"]],
                                str(rows.iloc[0]["tiling_key"]), float(rows.iloc[0]["mpp"]),
                                str(rows.iloc[0]["sha256"]))
             for _, rows in passed.groupby("slide_id", sort=True)]
    root = tmp_path / "features"
    assert len(tasks) == 11
    with pytest.raises(InputError, match=r"1 of 11 slides failed .*fov02\.jpg"):
        distributed.extract_features(tasks, encoder, root)
    assert _assert_same_feature_files(root, demo.parent / "features", same_store=False) == 10


def test_path_map_rewrites_whole_prefixes() -> None:
    mapping = "/data/slides=/mnt/s;/data=/mnt/d"
    assert distributed.map_path("/data/slides/a.svs", mapping) == "/mnt/s/a.svs"
    assert distributed.map_path("/data/other/b.svs", mapping) == "/mnt/d/other/b.svs"
    assert distributed.map_path("/database/c.svs", mapping) == "/database/c.svs"
    with pytest.raises(InputError, match="CMIL_PATH_MAP"):
        distributed.parse_path_map("/data")


def test_models_page_scores_on_the_cluster_given_its_address(
        demo: Path, ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from conftest import job_runner, plain_text, rerun_until, run_app

    model_id = _model_id(demo)
    db = _copy_without_features(demo, tmp_path / "page")
    monkeypatch.setenv("CMIL_DB", str(db))
    calls: list[str | None] = []
    real = distributed.extract_features

    def spy(*args: Any, **kwargs: Any) -> int:
        calls.append(kwargs.get("address"))
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "extract_features", spy)
    address = ray_cluster.get_runtime_context().gcs_address
    st.cache_resource.clear()
    try:
        at = run_app(AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                                       default_timeout=60))
        at.switch_page("pages/models.py")
        run_app(at)
        at.multiselect(key="score_cohorts").set_value(["external_a"])
        at.text_input(key="score_ray_address").set_value(address)
        run_app(at)
        assert f"--executor ray --ray-address {address}" in at.code[-1].value
        at.button(key="score_button").click()
        run_app(at)

        def said(a: AppTest) -> str | None:
            return next((plain_text(s.value) for s in a.success
                         if plain_text(s.value).startswith("Scored with")), None)

        at = rerun_until(at, lambda a: said(a) is not None, 180,
                         describe=lambda a: [e.value for e in a.error])
        assert said(at) == f"Scored with {model_id}: external_a: 8 patients."
    finally:
        for job in list(job_runner()._jobs.values()):
            job.wait(180)
        st.cache_resource.clear()
    assert calls == [address]
    assert _assert_same_feature_files(db.parent / "features", demo.parent / "features") == 8
    patients_ray, patches_ray = _scores(db, model_id, "external_a")
    patients_local, patches_local = _scores(demo, model_id, "external_a")
    pd.testing.assert_frame_equal(patients_ray, patients_local)
    pd.testing.assert_frame_equal(patches_ray, patches_local)
