"""The data folder's layout (cmil_core.store_folder.StoreFolder): what a user finds
beside the store file, and every module naming the same paths."""
from __future__ import annotations

from pathlib import Path

import pytest

from cmil_core import logs, store as store_mod
from cmil_core.demo.generator import default_demo_dir
from cmil_core.ingest.discovery import upload_folder
from cmil_core.model.modeling import artifact_dir
from cmil_core.store import StoreFolder
from cmil_core.viewer.deepzoom import cache_folder


@pytest.mark.slow
def test_the_small_demo_lays_out_its_data_folder_as_documented(small_demo_store: Path) -> None:
    folder = StoreFolder.of(small_demo_store)
    assert folder.root == small_demo_store.resolve().parent
    # What a user sees beside the store after `cmil demo --size small` (the store is shared by
    # other tests, which may open the viewer or write reports: those folders are the layout's too).
    documented = {f.name for f in (folder.models, folder.features, folder.checkpoints,
                                   folder.reports, folder.uploads, folder.slides, folder.demo,
                                   folder.tile_cache, folder.logs)}
    present = {p.name for p in folder.root.iterdir() if p.is_dir()}
    assert {"demo", "features", "models"} <= present <= documented, present - documented
    assert folder.demo.is_dir() and (folder.demo / "training_clinical.csv").is_file()
    with store_mod.open_store(small_demo_store, read_only=True) as store:
        models = [store_mod.get_model(store, str(m))
                  for m in store_mod.list_models(store)["model_id"]]
        assert StoreFolder.of(store) == folder
    assert len(models) >= 1
    for model in models:
        assert model is not None
        assert Path(model.artifact_path) == folder.model(model.model_id)
        assert (folder.model(model.model_id) / "config.json").is_file()
        assert folder.is_model_folder(folder.model(model.model_id))
    assert {p.name for p in folder.models.iterdir()} == {m.model_id for m in models if m}
    # features/<encoder key>/ holds one file per slide
    keys = [p for p in folder.features.iterdir() if p.is_dir()]
    assert len(keys) == 1 and keys[0].name.startswith("smallcnn-")
    assert any(keys[0].glob("*.npz"))


def test_a_store_named_as_text_path_or_open_store_has_one_folder(tmp_path: Path) -> None:
    db = tmp_path / "study" / "cmil.duckdb"
    with store_mod.open_store(db) as store:
        from_store = StoreFolder.of(store)
    assert StoreFolder.of(str(db)) == StoreFolder.of(db) == from_store
    assert from_store.store_file == db.resolve()
    assert from_store.root == (tmp_path / "study").resolve()


def test_relative_and_home_paths_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = StoreFolder.of("data/cmil.duckdb")
    assert relative.root == (tmp_path / "data").resolve() and relative.root.is_absolute()
    assert StoreFolder.of("data/../data/cmil.duckdb") == relative
    monkeypatch.setenv("HOME", str(tmp_path))
    assert StoreFolder.of("~/data/cmil.duckdb") == relative


def test_the_layout_beside_the_store(tmp_path: Path) -> None:
    folder = StoreFolder.of(tmp_path / "cmil.duckdb")
    root = tmp_path.resolve()
    assert folder.models == root / "models"
    assert folder.model("training-abmil-1") == root / "models" / "training-abmil-1"
    assert folder.features == root / "features"
    assert folder.checkpoint("abc123") == root / "checkpoints" / "abc123"
    assert folder.report("cnn/abmil 2", "20260101-120000") == (
        root / "reports" / "cnn_abmil_2-20260101-120000")
    assert folder.uploads == root / "uploads"
    assert folder.extracted("training", "batch1") == root / "slides" / "training" / "batch1"
    assert folder.demo == root / "demo"
    assert folder.tile_cache == root / "tile_cache"
    assert folder.log_file == root / "logs" / "cmil.log"
    # a backup copies the store and these
    assert folder.artifact_folders == (root / "models", root / "features", root / "reports")
    assert not any(tmp_path.iterdir())  # asking for paths creates nothing


def test_a_model_folder_is_one_directly_under_models(tmp_path: Path) -> None:
    folder = StoreFolder.of(tmp_path / "cmil.duckdb")
    assert folder.is_model_folder(folder.model("m1"))
    assert not folder.is_model_folder(folder.models)
    assert not folder.is_model_folder(folder.model("m1") / "inner")
    assert not folder.is_model_folder(folder.features / "m1")


def test_every_module_names_the_same_paths(tmp_path: Path) -> None:
    db = tmp_path / "cmil.duckdb"
    folder = StoreFolder.of(db)
    assert artifact_dir(db, "m1") == folder.model("m1")
    assert upload_folder(db, "training") == folder.uploads / "training"
    assert logs.job_log_path(db) == folder.log_file
    assert default_demo_dir(db) == folder.demo
    assert cache_folder(db) == folder.tile_cache
