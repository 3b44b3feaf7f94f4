"""cmil_core.viewer.overlays on the small demo study: viewer layers, QuPath GeoJSON, heatmap PNG, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import geojson
import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from cmil_core import store
from cmil_core.cli import main
from cmil_core.errors import InputError
from cmil_core.viewer.overlays import export_geojson, heatmap_png, slide_geojson, viewer_layers

pytestmark = pytest.mark.slow  # one small demo build (about 30 s)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("overlays") / "cmil.duckdb"
    generate_demo(db, size="small", seed=3)
    with store.open_store(db, read_only=True) as st:
        (model_id,) = store.list_models(st)["model_id"]
    return db, str(model_id)


def _slide_with_regions(db: Path) -> int:
    with store.open_store(db, read_only=True) as st:
        regions = store.tumor_regions_frame(st)
        return int(regions["slide_id"].iloc[0])


def _patches(db: Path, model_id: str, slide_id: int) -> dict[int, tuple]:
    """Each patch of the slide, read independently of the module: (x, y, size, qc_pass, attention)."""
    with store.open_store(db, read_only=True) as st:
        rows = st.cursor().execute(
            """SELECT p.patch_id, p.x, p.y, p.size, p.qc_pass, p.qc_reason, c.attention, c.probability
               FROM patches p LEFT JOIN patch_scores c
                 ON c.patch_id = p.patch_id AND c.model_id = ?
               WHERE p.slide_id = ?""", [model_id, slide_id]).fetchall()
    return {int(r[0]): r[1:] for r in rows}


def test_geojson_is_qupath_detections_that_round_trip_to_level_0(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    slide_id = _slide_with_regions(db)
    with store.open_store(db, read_only=True) as st:
        collection = slide_geojson(st, slide_id, model_id)
    # Through text and back, as a file would go to QuPath.
    loaded = geojson.loads(json.dumps(collection))
    assert loaded.is_valid and loaded["type"] == "FeatureCollection"
    truth = _patches(db, model_id, slide_id)
    detections = [f for f in loaded["features"] if f["properties"]["objectType"] == "detection"]
    assert len(detections) == len(truth)
    for feature in detections:
        props = feature["properties"]
        x, y, size, qc_pass, reason, attention, probability = truth[int(props["metadata"]["patch_id"])]
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.area == size * size
        assert polygon.bounds == (x, y, x + size, y + size)  # level-0 pixels, unchanged
        assert props["classification"]["name"] == ("cMIL patch" if qc_pass else f"QC: {reason}")
        measurements = props["measurements"]
        assert all(isinstance(v, float) for v in measurements.values())
        assert "background_fraction" in measurements and "blur_variance" in measurements
        if attention is None:
            assert "attention" not in measurements
        else:
            assert measurements["attention"] == pytest.approx(attention)
            assert measurements["probability"] == pytest.approx(probability)
            assert 0 < measurements["attention percentile"] <= 1
    # The highest attention of the slide has percentile 1.
    top = max(detections, key=lambda f: f["properties"]["measurements"].get("attention", -1))
    assert top["properties"]["measurements"]["attention percentile"] == 1.0
    # Ground-truth tumour boxes follow as annotations.
    with store.open_store(db, read_only=True) as st:
        boxes = store.tumor_regions_frame(st, slide_id)
    annotations = [shape(f["geometry"]).bounds for f in loaded["features"]
                   if f["properties"]["objectType"] == "annotation"]
    assert sorted(annotations) == sorted(
        (r.x, r.y, r.x + r.width, r.y + r.height) for r in boxes.itertuples())


def test_viewer_layers_match_the_geojson(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    slide_id = _slide_with_regions(db)
    with store.open_store(db, read_only=True) as st:
        layers = viewer_layers(st, slide_id, model_id)
        collection = slide_geojson(st, slide_id, model_id)
    detections = {int(f["properties"]["metadata"]["patch_id"]): f["properties"]
                  for f in collection["features"] if f["properties"]["objectType"] == "detection"}
    assert sorted(layers["id"]) == sorted(detections)
    for i, pid in enumerate(layers["id"]):
        m = detections[pid]["measurements"]
        if layers["percentile"][i] is None:
            assert "attention percentile" not in m
        else:
            assert layers["percentile"][i] == pytest.approx(m["attention percentile"], abs=1e-4)
        assert (layers["qc"][i] is None) == (detections[pid]["classification"]["name"] == "cMIL patch")
    assert json.loads(json.dumps(layers, allow_nan=False)) == layers  # plain JSON for the browser


def test_heatmap_png_at_a_level(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    slide_id = _slide_with_regions(db)
    with store.open_store(db, read_only=True) as st:
        slide = store.get_slide(st, slide_id)
        png = heatmap_png(st, model_id, slide_id, 1)
        with pytest.raises(InputError, match="levels 0 to"):
            heatmap_png(st, model_id, slide_id, 9)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == (slide.width // 2, slide.height // 2)
    assert np.asarray(image).shape[2] == 3


def test_cli_exports_one_file_per_slide(demo: tuple[Path, str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        slides = store.list_slides(st, "external_b")  # photographs: several per patient
    patient = str(slides[0].patient_id)
    mine = [s for s in slides if s.patient_id == patient]
    assert main(["export-geojson", "--db", str(db), "--model", model_id, "--cohort", "external_b",
                 "--patient", patient, "--out", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").glob("*.geojson"))
    assert len(files) == len(mine) > 1
    for file in files:
        assert geojson.loads(file.read_text()).is_valid
    # One slide to standard output.
    with store.open_store(db, read_only=True) as st:
        store_slides = store.list_slides(st, "training")
    training = str(store_slides[0].patient_id)
    capsys.readouterr()
    assert main(["export-geojson", "--db", str(db), "--model", model_id, "--cohort", "training",
                 "--patient", training]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["type"] == "FeatureCollection" and printed["features"]
    # Several slides need a folder; an unknown patient is named.
    assert main(["export-geojson", "--db", str(db), "--model", model_id,
                 "--cohort", "external_b", "--out", str(tmp_path / "x.geojson")]) == 2
    assert "give a folder" in capsys.readouterr().err
    assert main(["export-geojson", "--db", str(db), "--model", model_id,
                 "--cohort", "training", "--patient", "NOPE"]) == 2
    assert "'NOPE'" in capsys.readouterr().err
    with pytest.raises(InputError, match="no model"):
        export_geojson(db, "missing-model", "training")


# --------------------------------------------------------------------------- a hand-made store


def _tiny_store(db: Path) -> tuple[int, int, str]:
    """Two slides of 6 patches (the second a neighbour in id range); scores with ties and gaps."""
    from datetime import datetime

    import pandas as pd

    metrics = {m: [0.5] * 6 for m in store.VIEWER_METRICS}
    metrics["mean_intensity"] = [163.4567, 200.0, 1e-5, 0.0, 12345.678, 0.123456]
    table = pd.DataFrame({
        "g_col": range(6), "g_row": [0] * 6, "x": [224 * i for i in range(6)], "y": [0] * 6,
        "size": [224] * 6, "qc_pass": [True, True, True, True, False, False],
        "qc_reason": [None, None, None, None, "blurred", None], **metrics,
    })
    with store.open_store(db) as st:
        store.import_patients(st, "A", [store.PatientRow("P1", 1), store.PatientRow("P2", 0)],
                              role="train", center=None)
        one = store.register_slide(st, cohort="A", patient_id="P1", path=str(db.parent / "a.tiff"),
                                   sha256="a", kind="tiff", width=1344, height=224, mpp=0.5,
                                   size_bytes=1)
        two = store.register_slide(st, cohort="A", patient_id="P2", path=str(db.parent / "b.tiff"),
                                   sha256="b", kind="tiff", width=1344, height=224, mpp=0.5,
                                   size_bytes=1)
        for sid in (one, two):
            store.write_slide_patches(st, sid, table, tiling_key="k", tiling={}, run_id=None)
        store.add_model(st, store.ModelRow("m", datetime(2026, 1, 1), "attention", "resnet18", "A",
                                           {"cutoff": 0.5}, {}, str(db.parent), 0.5))
        ids = [sid * store.PATCH_ID_BASE + i for sid in (one, two) for i in range(4)]
        # Slide one: attention with a tie (2e-4 twice) and one passed patch unscored.
        attention = [2e-4, 1.23456e-4, 2e-4, None, 0.9, 0.1, 0.5, 0.2]
        store.write_scores(
            st, "m", "A",
            pd.DataFrame({"patient_id": ["P1", "P2"], "score": [0.7, 0.2],
                          "risk_group": ["high", "low"]}),
            pd.DataFrame({"patch_id": ids[:3] + ids[4:],
                          "probability": [0.25, 0.5, 0.75, 0.1, 0.2, 0.3, 0.4],
                          "attention": attention[:3] + attention[4:],
                          "attention_raw": [1.0] * 7}))
    return one, two, "m"


def test_viewer_layers_of_a_slide_read_by_its_id_range(tmp_path: Path) -> None:
    from scipy.stats import rankdata

    db = tmp_path / "cmil.duckdb"
    one, two, model_id = _tiny_store(db)
    with store.open_store(db, read_only=True) as st:
        layers = viewer_layers(st, one, model_id)
        plain = viewer_layers(st, one)
        other = viewer_layers(st, two, model_id)
        frame = slide_geojson(st, one, model_id)
    # Only this slide's patches, in grid order, though its neighbour's ids follow at once.
    assert layers["id"] == [one * store.PATCH_ID_BASE + i for i in range(6)]
    assert other["id"] == [two * store.PATCH_ID_BASE + i for i in range(6)]
    assert layers["x"] == [0, 224, 448, 672, 896, 1120] and layers["size"] == [224] * 6
    # QC: None for a passed patch, the reason, or "rejected" when none was recorded.
    assert layers["qc"] == [None, None, None, None, "blurred", "rejected"]
    # Attention keeps 4 significant digits (1e-4 is typical on large slides), not 4 decimals.
    assert layers["attention"] == [2e-4, 1.235e-4, 2e-4, None, None, None]
    assert layers["probability"] == [0.25, 0.5, 0.75, None, None, None]
    # Rank percentiles within the slide, ties averaged, as scipy's rankdata.
    expected = rankdata([2e-4, 1.23456e-4, 2e-4]) / 3
    assert layers["percentile"][:3] == pytest.approx(list(expected), abs=1e-4)
    assert layers["percentile"][3:] == [None, None, None] and layers["by"] == "attention"
    assert layers["metrics"]["mean_intensity"] == [163.5, 200.0, 1e-5, 0.0, 12350.0, 0.1235]
    assert "percentile" not in plain and plain["qc"] == layers["qc"]
    assert json.loads(json.dumps(layers, allow_nan=False)) == layers
    # The GeoJSON carries the same percentiles, unrounded.
    detections = [f["properties"]["measurements"] for f in frame["features"]
                  if f["properties"]["objectType"] == "detection"]
    assert [d.get("attention percentile") for d in detections][:3] == pytest.approx(list(expected))
    assert detections[1]["attention"] == pytest.approx(1.23456e-4)
    with store.open_store(db, read_only=True) as st, pytest.raises(InputError, match="no slide 99"):
        viewer_layers(st, 99, model_id)
