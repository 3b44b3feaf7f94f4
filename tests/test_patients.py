"""cmil_core.viewer.patients on the small demo study: the review queue, one patient, patches, pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image

from cmil_core import store
from cmil_core.errors import InputError
from cmil_core.ingest.quality import QC_REASONS
from cmil_core.viewer.patients import (
    attention_patches,
    importance_column,
    overlay,
    parse_patient_ref,
    patch_gradcam,
    patient_detail,
    patient_list,
    patient_ref,
    read_patch,
    read_patches,
    rejected_patches,
    slide_heatmap,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The small scored demo store (about 30 s to build) and its model id."""
    from cmil_core.demo.generator import generate_demo

    db = tmp_path_factory.mktemp("patients") / "cmil.duckdb"
    generate_demo(db, size="small", seed=2)
    with store.open_store(db, read_only=True) as st:
        (model_id,) = store.list_models(st)["model_id"]
    return db, str(model_id)


def _patch_scores(db: Path, model_id: str) -> pd.DataFrame:
    """Every scored patch with its slide and patient, read independently of the module."""
    with store.open_store(db, read_only=True) as st:
        return st.cursor().execute(
            """SELECT s.cohort, s.patient_id, p.slide_id, p.patch_id, p.x, p.y, p.size,
                      c.attention, c.probability
               FROM patch_scores c JOIN patches p USING (patch_id) JOIN slides s USING (slide_id)
               WHERE c.model_id = ?""", [model_id]).df()


# --------------------------------------------------------------------------- names (fast)


@pytest.mark.parametrize(("cohort", "patient_id"), [
    ("training", "T001"), ("external_b", "B/07"), ("c", "id with spaces"),
])
def test_patient_ref_round_trips(cohort: str, patient_id: str) -> None:
    text = patient_ref(cohort, patient_id)
    assert text == f"{cohort}/{patient_id}"
    assert parse_patient_ref(text) == (cohort, patient_id)


@pytest.mark.parametrize("text", ["T001", "/T001", "training/", ""])
def test_parse_patient_ref_refuses_incomplete_names(text: str) -> None:
    with pytest.raises(InputError, match="<cohort>/<patient_id>"):
        parse_patient_ref(text)


def test_patient_ref_refuses_a_cohort_with_a_slash() -> None:
    with pytest.raises(InputError, match="a/b"):
        patient_ref("a/b", "P1")


# --------------------------------------------------------------------------- overlay (fast)


def test_overlay_blends_the_colormap_and_leaves_nan_pixels() -> None:
    import matplotlib

    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    heat = np.array([[0.0, 1.0, np.nan], [0.5, np.nan, 0.25]])
    cmap = matplotlib.colormaps["viridis"]
    out = overlay(image, heat, opacity=0.4, colormap="viridis")
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[0, 2] == 100).all() and (out[1, 1] == 100).all()
    expected = np.rint(0.6 * 100 + 0.4 * np.asarray(cmap(1.0)[:3]) * 255)
    assert np.array_equal(out[0, 1], expected.astype(np.uint8))
    assert np.array_equal(overlay(image, heat, opacity=0.0), image)
    full = overlay(image, heat, opacity=1.0, colormap="viridis")
    assert np.array_equal(full[1, 0], np.rint(np.asarray(cmap(0.5)[:3]) * 255).astype(np.uint8))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"heat": np.zeros((3, 3))}, "differ in size"),
    ({"opacity": 1.5}, "opacity=1.5"),
    ({"colormap": "no-such-map"}, "no-such-map"),
])
def test_overlay_refuses_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"image": np.zeros((2, 3, 3), np.uint8), "heat": np.zeros((2, 3))}
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        overlay(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the list


@pytest.mark.slow
def test_review_queue_is_exactly_the_misclassified_patients(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        cutoff = store.get_model(st, model_id).cutoff  # type: ignore[union-attr]
        scores = store.patient_scores_frame(st, model_id)
        listing = patient_list(st, model_id)
    assert len(listing) == len(scores) == 30
    assert set(zip(listing["cohort"], listing["patient_id"])) == set(
        zip(scores["cohort"], scores["patient_id"]))
    fn = {(r.cohort, r.patient_id) for r in scores.itertuples()
          if r.bm_metastasis == 1 and r.score < cutoff}
    fp = {(r.cohort, r.patient_id) for r in scores.itertuples()
          if r.bm_metastasis == 0 and r.score >= cutoff}
    assert fn  # the demo's model misses some metastatic patients
    flagged = listing[listing["review"] != ""]
    assert {(r.cohort, r.patient_id) for r in flagged.itertuples()
            if r.review == "false negative"} == fn
    assert {(r.cohort, r.patient_id) for r in flagged.itertuples()
            if r.review == "false positive"} == fp
    # Risk groups: high exactly when score >= the training cutoff.
    assert (listing["risk_group"] == np.where(listing["score"] >= cutoff, "high", "low")).all()
    merged = listing.merge(scores, on=["cohort", "patient_id"])
    assert np.allclose(merged["score_x"], merged["score_y"])
    assert (merged["label"].astype(int) == merged["bm_metastasis"].astype(int)).all()
    assert np.allclose(listing["margin"], listing["score"] - cutoff)


@pytest.mark.slow
def test_list_order_queue_first_then_by_score(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        listing = patient_list(st, model_id)
    n_fn = int((listing["review"] == "false negative").sum())
    n_fp = int((listing["review"] == "false positive").sum())
    reviews = listing["review"].tolist()
    assert reviews == ["false negative"] * n_fn + ["false positive"] * n_fp + [""] * (
        len(listing) - n_fn - n_fp)
    fn_margin = listing["margin"].abs().iloc[:n_fn].to_numpy()
    assert (np.diff(fn_margin) <= 0).all()  # most confidently wrong first
    rest = listing["score"].iloc[n_fn + n_fp:].to_numpy()
    assert (np.diff(rest) <= 0).all()


@pytest.mark.slow
def test_unknown_model_is_refused(demo: tuple[Path, str]) -> None:
    db, _ = demo
    with store.open_store(db, read_only=True) as st, pytest.raises(InputError, match="nope"):
        patient_list(st, "nope")


# --------------------------------------------------------------------------- one patient


@pytest.mark.slow
def test_patient_detail_matches_the_store(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        detail = patient_detail(st, model_id, "external_b", "B002")
        scores = store.patient_scores_frame(st, model_id, "external_b").set_index("patient_id")
        patients = store.patients_frame(st, "external_b").set_index("patient_id")
        slides = [s for s in store.list_slides(st, "external_b") if s.patient_id == "B002"]
        counts = store.qc_counts(st, "external_b")
    counts = counts[counts["patient_id"] == "B002"]
    assert detail["score"] == pytest.approx(scores.loc["B002", "score"])
    assert detail["risk_group"] == scores.loc["B002", "risk_group"]
    assert detail["label"] == int(patients.loc["B002", "bm_metastasis"])
    clinical = patients.loc["B002", "clinical"]
    assert set(clinical) <= set(detail["clinical"])
    assert all(detail["clinical"][k] == v for k, v in clinical.items())
    assert detail["clinical"]["os_months"] == pytest.approx(patients.loc["B002", "os_months"])
    assert len(slides) == 3  # external centre B: three field-of-view photographs
    assert sorted(detail["slides"]["slide_id"]) == sorted(s.slide_id for s in slides)
    assert detail["slides"]["kind"].str.startswith("image:").all()
    assert detail["patches_kept"] == int(counts.loc[counts["qc_reason"].isna(), "patches"].sum())
    rejected = int(counts.loc[counts["qc_reason"].notna(), "patches"].sum())
    assert detail["patches_rejected"] == rejected
    json.dumps(detail["clinical"])  # plain values, no numpy scalars


@pytest.mark.slow
def test_unknown_patient_is_named_in_the_error(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        with pytest.raises(InputError, match="'Z999'.*'training'"):
            patient_detail(st, model_id, "training", "Z999")
        with pytest.raises(InputError, match="'A001'.*'training'"):
            patient_detail(st, model_id, "training", "A001")  # exists in another cohort only


@pytest.mark.slow
def test_top_patches_are_the_patients_highest_attention(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    scored = _patch_scores(db, model_id)
    with store.open_store(db, read_only=True) as st:
        assert importance_column(st, model_id) == "attention"
        for cohort, patient_id in (("training", "T009"), ("external_a", "A002")):
            top, bottom = attention_patches(st, model_id, patient=(cohort, patient_id), k=8)
            mine = scored[(scored["cohort"] == cohort) & (scored["patient_id"] == patient_id)]
            assert len(mine) >= 16 and len(top) == len(bottom) == 8
            assert top["patch_id"].iloc[0] == mine.loc[mine["attention"].idxmax(), "patch_id"]
            assert bottom["patch_id"].iloc[0] == mine.loc[mine["attention"].idxmin(), "patch_id"]
            assert np.allclose(top["attention"], np.sort(mine["attention"].to_numpy())[::-1][:8])
            assert np.allclose(bottom["attention"], np.sort(mine["attention"].to_numpy())[:8])
            assert list(top.columns) == ["patch_id", "slide_id", "x", "y", "size",
                                         "probability", "attention", "attention_raw"]
            row = mine.set_index("patch_id").loc[top["patch_id"].iloc[0]]
            assert (top[["x", "y", "size"]].iloc[0].tolist()
                    == [row["x"], row["y"], row["size"]])


@pytest.mark.slow
def test_attention_patches_of_one_slide_and_small_bags(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    scored = _patch_scores(db, model_id)
    with store.open_store(db, read_only=True) as st:
        slide = store.patient_slides(st, "external_b", "B002")[0]
        top, bottom = attention_patches(st, model_id, slide_id=slide.slide_id, k=8)
        on_slide = scored[scored["slide_id"] == slide.slide_id]
        # Fewer patches than 2 k: the two sets split them without overlap.
        assert set(top["patch_id"]) | set(bottom["patch_id"]) == set(on_slide["patch_id"])
        assert not set(top["patch_id"]) & set(bottom["patch_id"])
        by_prob, _ = attention_patches(st, model_id, slide_id=slide.slide_id, k=1,
                                       by="probability")
        assert by_prob["probability"].iloc[0] == on_slide["probability"].max()
        for kwargs, message in (
            ({"patient": ("training", "T001"), "slide_id": slide.slide_id}, "not both"),
            ({}, "not both"),
            ({"slide_id": 99999}, "no slide 99999"),
            ({"slide_id": slide.slide_id, "k": 0}, "k=0"),
            ({"slide_id": slide.slide_id, "by": "entropy"}, "entropy"),
        ):
            with pytest.raises(InputError, match=message):
                attention_patches(st, model_id, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pixels


@pytest.mark.slow
def test_read_patch_gives_the_slide_files_pixels(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        top, _ = attention_patches(st, model_id, patient=("training", "T009"), k=2)
        tiff = store.get_slide(st, int(top["slide_id"].iloc[0]))
        fov = store.patient_slides(st, "external_b", "B002")[0]
        fov_patch = store.scored_patches_frame(st, model_id, slide_id=fov.slide_id).iloc[0]
    assert tiff is not None and tiff.kind and tiff.kind.startswith("openslide")
    x, y, size = (int(v) for v in top[["x", "y", "size"]].iloc[0])
    got = read_patch(tiff.path, tiff.mpp, x, y, size, out_px=size)
    with openslide.OpenSlide(tiff.path) as osr:
        want = np.asarray(osr.read_region((x, y), 0, (size, size)).convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    assert np.array_equal(got, want)
    # A field-of-view photograph at full resolution: its own pixels, cropped.
    x, y, size = int(fov_patch["x"]), int(fov_patch["y"]), int(fov_patch["size"])
    got = read_patch(fov.path, fov.mpp, x, y, size, out_px=size)
    with Image.open(fov.path) as img:
        want = np.asarray(img.convert("RGB").crop((x, y, x + size, y + size)))
    assert np.array_equal(got, want)
    # Resampled to the encoder's 224 px, as a patch of the gallery.
    small = read_patches(fov.path, fov.mpp, [(x, y, size)], 224)[0]
    assert small.shape == (224, 224, 3)
    assert abs(float(small.mean()) - float(want.mean())) < 2.0
    with pytest.raises(InputError, match="no such file"):
        read_patch(str(Path(fov.path).with_name("missing.jpg")), 0.5, 0, 0, 10)


@pytest.mark.slow
def test_slide_heatmap_is_nan_outside_scored_patches(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        top, _ = attention_patches(st, model_id, patient=("training", "T009"), k=1)
        slide = store.get_slide(st, int(top["slide_id"].iloc[0]))
        assert slide is not None and slide.width and slide.height
        thumb, heat = slide_heatmap(st, model_id, slide.slide_id, max_side=512)
        scored = store.scored_patches_frame(st, model_id, slide_id=slide.slide_id)
        rejected = rejected_patches(st, slide.slide_id)
    assert thumb.dtype == np.uint8 and thumb.shape[2] == 3 and max(thumb.shape[:2]) == 512
    assert heat.shape == thumb.shape[:2] and heat.dtype == np.float32
    sx, sy = thumb.shape[1] / slide.width, thumb.shape[0] / slide.height

    def centre(x: int, y: int, size: int) -> float:
        return float(heat[int((y + size / 2) * sy), int((x + size / 2) * sx)])

    assert all(0 < centre(r.x, r.y, r.size) <= 1 for r in scored.itertuples())
    assert centre(*(int(v) for v in top[["x", "y", "size"]].iloc[0])) == 1.0  # top rank
    assert len(rejected) > 0
    assert all(np.isnan(centre(r.x, r.y, r.size)) for r in rejected.itertuples())
    assert np.isnan(heat[0, 0])  # the slide's margin holds no patch
    assert np.isfinite(heat).sum() > 0.3 * heat.size


@pytest.mark.slow
def test_rejected_patches_carry_their_reasons(demo: tuple[Path, str]) -> None:
    db, _ = demo
    with store.open_store(db, read_only=True) as st:
        counts = store.qc_counts(st)
        slide_id = int(counts.loc[counts["qc_reason"].notna(), "slide_id"].iloc[0])
        everything = store.patches_frame(st, slide_id)
        rejected = rejected_patches(st, slide_id)
        first = rejected_patches(st, slide_id, limit=1)
        with pytest.raises(InputError, match="no slide 424242"):
            rejected_patches(st, 424242)
    want = everything[~everything["qc_pass"]]
    assert sorted(rejected["patch_id"]) == sorted(want["patch_id"])
    assert set(rejected["qc_reason"]) <= set(QC_REASONS)
    merged = rejected.merge(want, on="patch_id", suffixes=("", "_t"))
    assert (merged["qc_reason"] == merged["qc_reason_t"]).all()
    where = merged[["x", "y", "size"]].to_numpy()
    assert (where == merged[["x_t", "y_t", "size_t"]].to_numpy()).all()
    assert len(first) == 1 and first["patch_id"].iloc[0] == rejected["patch_id"].iloc[0]


@pytest.mark.slow
def test_patch_gradcam_maps_the_patch(demo: tuple[Path, str]) -> None:
    db, model_id = demo
    with store.open_store(db, read_only=True) as st:
        top, _ = attention_patches(st, model_id, patient=("training", "T009"), k=1)
        slide = store.get_slide(st, int(top["slide_id"].iloc[0]))
    assert slide is not None
    image = read_patch(slide.path, slide.mpp, *(int(v) for v in top[["x", "y", "size"]].iloc[0]))
    cam = patch_gradcam(db, model_id, image)
    assert cam.shape == (224, 224) and cam.dtype == np.float32
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert overlay(image, cam, 0.5).shape == image.shape
    with pytest.raises(InputError, match="RGB uint8"):
        patch_gradcam(db, model_id, image[..., 0])
    with pytest.raises(InputError, match="no model 'missing'"):
        patch_gradcam(db, "missing", image)
