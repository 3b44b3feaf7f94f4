"""cmil_core.demo.generator: the synthetic study is complete, readable, deterministic and resumable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest

from cmil_core import store
from cmil_core.analysis.roc import roc_auc
from cmil_core.cli import main
from cmil_core.demo import _smear
from cmil_core.demo.generator import (
    COHORTS,
    SIZES,
    _half_size,
    _render,
    _SlideJob,
    demo_status,
    generate_demo,
    simulate_patients,
)
from cmil_core.errors import InputError
from cmil_core.model.controls import colour_control, dark_share
from cmil_core.progress import Progress


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "demo.json"
    }


def _store_rows(db: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    with store.open_store(db, read_only=True) as st:
        patients = store.patients_frame(st)
        slides = pd.DataFrame([s.__dict__ for s in store.list_slides(st)])
        regions = store.tumor_regions_frame(st).merge(
            slides[["slide_id", "path"]], on="slide_id")
    return patients, slides.drop(columns=["slide_id"]), regions.drop(columns=["slide_id"])


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("demo") / "cmil.duckdb"
    events: list[Progress] = []
    generate_demo(db, size="small", seed=7, progress=events.append)
    assert events[-1].index == events[-1].stages and events[-1].fraction == 1.0
    return db


def test_small_demo_fills_every_table_it_can(small_demo: Path) -> None:
    spec = SIZES["small"]
    with store.open_store(small_demo, read_only=True) as st:
        counts = store.table_counts(st)
        cohorts = store.list_cohorts(st)
        status = demo_status(st)
    assert [(c.cohort, c.role) for c in cohorts] == [
        ("training", "train"), ("external_a", "validation"), ("external_b", "test")]
    assert counts["patients"] == sum(spec.patients) == 30
    n_wsi = spec.patients[0] + spec.patients[1]
    assert counts["slides"] == n_wsi + spec.patients[2] * spec.fov_count
    assert counts["demo_tumor_regions"] > 0
    assert status is not None and status["complete"] and status["seed"] == 7
    # The demo ingests its own slides: every slide tiled, most patches pass QC, some do not.
    with store.open_store(small_demo, read_only=True) as st:
        slides = store.list_slides(st)
        overview = store.cohort_overview(st)
        runs = store.ingest_runs_frame(st)
    # Tiled, then encoded by the demo's model (a slide with no passed patch stays tiled).
    assert {s.status for s in slides} <= {"tiled", "encoded"}
    assert sum(s.status == "encoded" for s in slides) > 40
    assert (overview["patches"] > 0).all()
    passed, total = overview["patches_passed"].sum(), overview["patches"].sum()
    assert 0.5 < passed / total < 1.0
    assert sorted(runs["cohort"]) == ["external_a", "external_b", "training"]


def test_scanned_slides_are_pyramidal_tiffs_openslide_reads(small_demo: Path) -> None:
    _, slides, _ = _store_rows(small_demo)
    wsi = slides[slides["cohort"] != "external_b"]
    assert len(wsi) == 22
    for row in wsi.itertuples():
        osr = openslide.OpenSlide(row.path)
        assert osr.level_count > 1
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert osr.dimensions == (row.width, row.height) == SIZES["small"].slide_px
        assert row.kind == "openslide:generic-tiff"
        assert Path(row.path).name.startswith(f"{row.patient_id}_")  # docs/DESIGN.md's file-name rule
        osr.close()


def test_pyramid_levels_are_2x2_means_rounded_half_to_even() -> None:
    block = np.array([[10, 11, 12, 13, 200], [10, 11, 13, 13, 200], [0, 0, 0, 0, 0]], np.uint8)
    half = _half_size(np.repeat(block[:, :, None], 3, axis=2))
    assert half.shape == (1, 2, 3)  # the odd last row and column are dropped
    assert half[0, :, 0].tolist() == [10, 13]  # means 10.5 -> 10 (even) and 12.75 -> 13
    image = np.random.default_rng(7).integers(0, 256, (33, 17, 3), dtype=np.uint8)
    expected = image[:32, :16].reshape(16, 2, 8, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    assert np.array_equal(_half_size(image), expected)  # the pyramid the demo slides were made with


def test_centre_b_is_folders_of_photographs_with_a_manifest(small_demo: Path) -> None:
    _, slides, _ = _store_rows(small_demo)
    fov = slides[slides["cohort"] == "external_b"]
    assert set(fov["kind"]) == {"image:jpeg"}
    assert (fov["mpp"] == 0.3).all()
    for row in fov.itertuples():
        assert Path(row.path).parent.name == row.patient_id  # docs/DESIGN.md's folder rule
    manifest = pd.read_csv(small_demo.parent / "demo" / "external_b_manifest.csv")
    assert list(manifest.columns) == ["slide_path", "patient_id", "mpp"]
    assert len(manifest) == len(fov)


def test_tumour_regions_lie_on_metastatic_patients_slides(small_demo: Path) -> None:
    patients, slides, regions = _store_rows(small_demo)
    merged = regions.merge(slides, on="path", suffixes=("_box", "_slide")).merge(
        patients[["cohort", "patient_id", "bm_metastasis"]], on=["cohort", "patient_id"])
    assert (merged["bm_metastasis"] == 1).all()
    assert (merged["x"] >= 0).all() and (merged["y"] >= 0).all()
    inside = (merged["x"] + merged["width_box"] <= merged["width_slide"]) & (
        merged["y"] + merged["height_box"] <= merged["height_slide"])
    assert inside.all()
    # Every metastatic patient of the scanned cohorts has tumour on the slide.
    wsi_pos = patients[(patients["cohort"] != "external_b") & (patients["bm_metastasis"] == 1)]
    with_regions = set(zip(merged["cohort"], merged["patient_id"]))
    assert set(zip(wsi_pos["cohort"], wsi_pos["patient_id"])) <= with_regions


def test_tumour_boxes_are_dark_blue_in_the_pixels(small_demo: Path) -> None:
    _, _, regions = _store_rows(small_demo)
    region = regions.iloc[0]
    osr = openslide.OpenSlide(region["path"])
    box = np.asarray(osr.read_region((int(region.x), int(region.y)), 0,
                                     (int(region.width), int(region.height))))[..., :3].astype(int)
    blue_purple = (box[..., 2] > box[..., 1] + 40) & (box.sum(-1) < 450)
    assert blue_purple.mean() > 0.25


def test_same_seed_same_bytes_other_seed_other_study(small_demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again" / "cmil.duckdb"
    generate_demo(again, size="small", seed=7, workers=1)  # other process layout, same bytes
    assert _digests(small_demo.parent / "demo") == _digests(again.parent / "demo")
    first, second = _store_rows(small_demo), _store_rows(again)
    pd.testing.assert_frame_equal(first[0], second[0])
    other = tmp_path / "other" / "cmil.duckdb"
    generate_demo(other, size="small", seed=8, workers=1)
    # Another seed in the same store replaces the demo, its model included.
    generate_demo(again, size="small", seed=8, workers=1)
    with store.open_store(again, read_only=True) as st:
        assert len(store.list_models(st)) == 1
        assert store.table_counts(st)["patients"] == 30
    a = (small_demo.parent / "demo" / "training_clinical.csv").read_bytes()
    b = (other.parent / "demo" / "training_clinical.csv").read_bytes()
    assert a != b


def test_finished_demo_is_not_redone(small_demo: Path) -> None:
    summary = generate_demo(small_demo, size="small", seed=7)
    assert summary.skipped


def test_interrupted_demo_resumes_to_the_same_study(tmp_path: Path, small_demo: Path) -> None:
    db = tmp_path / "cmil.duckdb"

    class Killed(Exception):
        pass

    def kill_after_ten(event: Progress) -> None:
        if event.stage == "slides" and event.done >= 10:
            raise Killed

    with pytest.raises(Killed):
        generate_demo(db, size="small", seed=7, progress=kill_after_ten, workers=1)
    with store.open_store(db, read_only=True) as st:
        status = demo_status(st)
        assert status is not None and not status["complete"]
        assert 10 <= store.table_counts(st)["slides"] < 46
    summary = generate_demo(db, size="small", seed=7, workers=1)
    assert summary.reused >= 10 and summary.generated + summary.reused == 46
    with store.open_store(small_demo, read_only=True) as st:
        full_overview = store.cohort_overview(st)
    assert summary.patches == int(full_overview["patches"].sum())
    assert summary.patches_passed == int(full_overview["patches_passed"].sum())
    resumed, full = _store_rows(db), _store_rows(small_demo)
    pd.testing.assert_frame_equal(resumed[0], full[0])
    key = ["cohort", "patient_id", "sha256", "width", "height", "mpp", "status"]
    pd.testing.assert_frame_equal(
        resumed[1][key].sort_values(key).reset_index(drop=True),
        full[1][key].sort_values(key).reset_index(drop=True))
    assert len(resumed[2]) == len(full[2])


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="--size 'huge'"):
        generate_demo("/tmp/unused.duckdb", size="huge")
    with pytest.raises(InputError, match="--seed -1"):
        generate_demo("/tmp/unused.duckdb", seed=-1)


def test_simulated_clinical_data_is_plausible() -> None:
    rng = np.random.default_rng(0)
    patients = pd.DataFrame([p.__dict__ for p in simulate_patients(rng, 3000, "X")])
    met = patients["bm_metastasis"] == 1
    assert 0.4 < met.mean() < 0.5
    assert (patients.loc[met, "inss_stage"] == "4").all()
    assert patients.loc[met, "burden"].min() > 0 and (patients.loc[~met, "burden"] == 0).all()
    amp = patients["mycn"] == "amplified"
    assert amp[met].mean() > 2 * amp[~met].mean()
    assert patients.loc[amp, "del_1p"].eq("yes").mean() > patients.loc[~amp, "del_1p"].eq("yes").mean()
    assert patients.loc[met, "age_months"].median() > patients.loc[~met, "age_months"].median()
    # Metastasis and burden shorten survival; event-free survival never exceeds overall.
    assert patients.loc[met, "os_event"].mean() > patients.loc[~met, "os_event"].mean() + 0.15
    assert (patients["efs_months"] <= patients["os_months"] + 1e-9).all()
    assert ((patients["os_months"] >= 0) & (patients["os_months"] <= 96)).all()


def test_three_centres_look_different() -> None:
    assert len({c.style for c in COHORTS}) == 3
    # not only a tint: other stain vectors and another glass colour at each centre
    assert len({c.style.stain_rotation_deg for c in COHORTS}) == 3
    assert len({c.style.background for c in COHORTS}) == 3


def test_dark_clumps_are_distributed_alike_in_both_classes() -> None:
    """A metastatic patient's dark clumps are partly tumour; their number is not a clue."""
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(3)
    patients = pd.DataFrame([p.__dict__ for p in simulate_patients(rng, 4000, "X")])
    met = patients["bm_metastasis"] == 1
    dark = patients["burden"] + patients["lookalike_clumps"]
    assert ks_2samp(dark[met], dark[~met]).pvalue > 0.01
    assert (patients.loc[met, "burden"] > 0).all()
    # look-alikes in both classes
    assert (patients.loc[~met, "lookalike_clumps"] > 0).all()
    assert patients.loc[met, "lookalike_clumps"].mean() > 0.5


def test_lookalike_regions_are_ground_truth_in_both_classes(small_demo: Path) -> None:
    with store.open_store(small_demo, read_only=True) as st:
        looks = store.lookalike_regions_frame(st)
        slides = pd.DataFrame([s.__dict__ for s in store.list_slides(st)])
        patients = store.patients_frame(st)
    merged = looks.merge(slides[["slide_id", "cohort", "patient_id", "width", "height"]],
                         on="slide_id", suffixes=("", "_slide")).merge(
        patients[["cohort", "patient_id", "bm_metastasis"]], on=["cohort", "patient_id"])
    assert set(merged["bm_metastasis"]) == {0, 1}
    assert set(merged["kind"]) <= set(_smear.LOOKALIKE_KINDS)
    assert merged["kind"].nunique() >= 3
    assert ((merged["x"] >= 0) & (merged["x"] + merged["width"] <= merged["width_slide"])).all()


def test_evaluate_prints_the_colour_control_beside_the_model(
    small_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with store.open_store(small_demo, read_only=True) as st:
        model = str(store.list_models(st)["model_id"].iloc[0])
        control = colour_control(st)
    assert [r["cohort"] for r in control] == ["training", "external_a", "external_b"]
    assert all(0.0 <= r["auc"] <= 1.0 for r in control if "auc" in r)
    assert main(["evaluate", "--db", str(small_demo), "--model", model]) == 0
    out = capsys.readouterr().out
    assert "colour-only control" in out and "(model " in out
    assert main(["evaluate", "--db", str(small_demo), "--model", model, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["cohort"] for r in data["colour_control"]] == [r["cohort"] for r in control]


def test_dark_share_counts_pixels_that_absorb_red() -> None:
    glass = (240.0, 236.0, 232.0)
    patch = np.full((1, 10, 10, 3), 240, np.uint8)
    patch[0, :5, :, 0] = 100  # red OD log10(240/100) = 0.38: dark nuclear material
    patch[0, 5:6, :, 0] = 120  # OD 0.30: below the threshold
    assert dark_share(patch, glass)[0] == pytest.approx(0.5)
    assert dark_share(patch, glass, red_od=0.25)[0] == pytest.approx(0.6)


@pytest.mark.slow
def test_colour_rule_cannot_tell_metastasis_in_rendered_slides() -> None:
    """40 patients' slides rendered: max dark share per patient does not separate the classes."""
    patients = simulate_patients(np.random.default_rng(11), 40, "T")
    style = COHORTS[0].style
    scores, labels = [], []
    for i, p in enumerate(patients):
        job = _SlideJob(0, p, "unused", "wsi", 1024, 1024, 0.5, 500 + i, p.burden,
                        p.lookalike_clumps, p.dispersed)
        image, tumour, _ = _render(job, style)
        if p.bm_metastasis:
            assert tumour  # every metastatic slide shows tumour
        tiles = image.reshape(4, 256, 4, 256, 3).swapaxes(1, 2).reshape(16, 256, 256, 3)
        tissue = (tiles.astype(int).sum(-1) < 600).mean((1, 2)) > 0.3  # not bare glass
        scores.append(float(dark_share(tiles[tissue], style.background).max()))
        labels.append(p.bm_metastasis)
    assert 0 < sum(labels) < len(labels)
    assert 0.25 <= roc_auc(labels, scores) <= 0.75
