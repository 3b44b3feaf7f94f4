"""cmil_core.ingest.tiling on real slides and photographs from tests/data/fixtures, and on synthetic images.

The BCCD photographs (640 x 480 Wright-Giemsa blood smears) carry no
resolution; these tests assume 0.3 um per pixel, a 40x objective on a
typical microscope camera. (Judging by their red cells, about 100 px across
for 7.5 um, they were taken at higher magnification, nearer 0.08 um/px; at
that scale a 640 x 480 photograph is smaller than one 112 um patch.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cmil_core.errors import InputError
from cmil_core.ingest import foreground, patch_grid
from cmil_core.ingest.foreground import detect_foreground
from cmil_core.ingest.patch_grid import iter_patch_batches, make_grid
from cmil_core.ingest.patch_reading import read_patch
from cmil_core.ingest.quality import METRIC_COLUMNS, QC_REASONS, QCThresholds
from cmil_core.ingest.slides import Slide, SlideError, open_slide
from cmil_core.ingest.tiling import TILE_COLUMNS, tile_slide
from cmil_core.ingest.tiling_config import TilingConfig

BCCD_MPP = 0.3
GLASS = (236, 236, 238)


def _slides(fixtures_dir: Path) -> Path:
    return fixtures_dir / "slides"


def _bccd(fixtures_dir: Path) -> list[Path]:
    paths = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))
    if not paths:
        pytest.skip("BCCD photographs not found")
    return paths


def _spy_reads(slide: Slide) -> list[tuple[int, int, int, int, int]]:
    """Record (level, l0_x, l0_y, width, height) of every read_region call on ``slide``."""
    calls: list[tuple[int, int, int, int, int]] = []
    original = slide.read_region

    def spy(l0_x: int, l0_y: int, level: int, lv_size: tuple[int, int]) -> np.ndarray:
        calls.append((level, l0_x, l0_y, lv_size[0], lv_size[1]))
        return original(l0_x, l0_y, level, lv_size)

    slide.read_region = spy  # type: ignore[method-assign]
    return calls


Box = tuple[int, int, int, int]


def _smear_image(height: int, width: int, seed: int, dark_box: Box | None = None,
                 smear_box: Box | None = None) -> np.ndarray:
    """Glass with a smear of pink cells and violet nuclei in ``smear_box`` (x0, y0, x1, y1),
    optionally a nearly opaque clump in ``dark_box``."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float64)
    img[:] = GLASS
    x0, y0, x1, y1 = smear_box if smear_box is not None else (0, 0, width, height)
    n_cells = int((x1 - x0) * (y1 - y0) / 250)  # red cells cover about 55 %
    for k in range(n_cells):
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        nucleus = k % 40 == 0
        r = rng.uniform(8, 11) if nucleus else rng.uniform(6, 9)
        colour = (110, 70, 170) if nucleus else (214, 150, 160)
        xa, xb = int(max(cx - r, 0)), int(min(cx + r + 1, width))
        ya, yb = int(max(cy - r, 0)), int(min(cy + r + 1, height))
        yy, xx = np.mgrid[ya:yb, xa:xb]
        img[ya:yb, xa:xb][np.hypot(xx - cx, yy - cy) < r] = colour
    if dark_box is not None:
        a, b, c, d = dark_box
        img[b:d, a:c] = (12, 6, 20)  # mean optical density about 1.3: nearly opaque
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------- real slides


def test_cmu1_gives_sensible_patches(fixtures_dir: Path) -> None:
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        frame = tile_slide(slide, TilingConfig(), QCThresholds())
        width, height, mpp = slide.width, slide.height, slide.mpp
    assert list(frame.columns) == list(TILE_COLUMNS)
    size = round(112 / 0.499)
    assert size == 224 and mpp == pytest.approx(0.499)
    n_cols, n_rows = width // size, height // size  # 9 x 13 cells of 224 px
    assert 40 <= len(frame) < n_cols * n_rows  # tissue covers about half the region
    # Coordinates: inside the slide, on a centred grid of whole cells.
    assert (frame["size"] == size).all()
    assert frame["x"].min() >= 0 and (frame["x"] + size).max() <= width
    assert frame["y"].min() >= 0 and (frame["y"] + size).max() <= height
    np.testing.assert_array_equal(frame["x"], (width - n_cols * size) // 2 + frame["g_col"] * size)
    np.testing.assert_array_equal(frame["y"], (height - n_rows * size) // 2 + frame["g_row"] * size)
    assert not frame.duplicated(["g_col", "g_row"]).any()
    # Real rejections, neither all pass nor all fail.
    passed = int(frame["qc_pass"].sum())
    assert len(frame) // 2 < passed < len(frame)
    assert (frame["qc_reason"].isna() == frame["qc_pass"]).all()
    assert set(frame["qc_reason"].dropna()) <= set(QC_REASONS)
    assert "background" in set(frame["qc_reason"].dropna())
    for name in METRIC_COLUMNS:
        assert np.isfinite(frame[name]).all(), name
    assert frame["blur_variance"].median() > 100  # an in-focus 20x scan
    assert frame["foreground_fraction"].between(0.1, 1.0).all()
    # What the caller stores with the run, JSON-ready.
    info = json.loads(json.dumps(frame.attrs["tiling"]))
    assert info["config"] == TilingConfig().to_dict()
    assert info["thresholds"] == QCThresholds().to_dict()
    assert info["grid"]["size"] == size and info["grid"]["kept"] == len(frame)
    assert info["grid"]["n_cols"] == n_cols and info["foreground"]["smear_od"] > 0


def test_cmu1_foreground_finds_the_tissue(fixtures_dir: Path) -> None:
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        fg = detect_foreground(slide)
    assert fg.l0_per_th == pytest.approx(8 / 0.499)
    assert fg.smear.shape == fg.thick.shape == fg.thumbnail.shape[:2] == (186, 139)
    assert 0.25 < fg.smear_fraction < 0.55  # the strip of skin in the middle
    assert not fg.thick.any()
    assert all(240 <= v <= 250 for v in fg.glass_rgb)  # Aperio glass, not the white outside
    assert fg.smear_od == pytest.approx(TilingConfig().max_smear_od)  # Otsu (0.22) capped
    assert set(json.loads(json.dumps(fg.thresholds()))) == {
        "l0_per_th", "glass_rgb", "otsu_od", "smear_od", "thick_od"}


def test_reads_stay_small_on_a_single_level_slide(fixtures_dir: Path) -> None:
    """Level 0 is never read whole: every read is a strip of at most about 1 Mpx."""
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        calls = _spy_reads(slide)
        tile_slide(slide, TilingConfig(), QCThresholds())
        area = slide.width * slide.height
    assert len(calls) > 10
    assert max(w * h for _, _, _, w, h in calls) < area / 5


def test_pyramid_reads_use_a_level_above_zero(fixtures_dir: Path) -> None:
    # boxes.tiff claims 353 um/px; give it 1 um/px so that a 64 um patch is 64 px,
    # read at 16 px output: a downsample of 4 (level 1, 2x, is the best: level 2 is 4.016x).
    config = TilingConfig(patch_um=64, output_px=16)
    with open_slide(_slides(fixtures_dir) / "boxes.tiff", mpp=1.0) as slide:
        assert slide.level_count == 4
        fg = detect_foreground(slide, config)
        grid = make_grid(slide, config, fg)
        assert len(grid) > 0
        calls = _spy_reads(slide)
        batches = list(iter_patch_batches(slide, grid, batch_size=4))
        patch_levels = {level for level, *_ in calls}
        assert patch_levels == {1}
        for idx, batch in batches:
            assert batch.shape == (idx.size, 16, 16, 3)
            for i, patch in zip(idx, batch, strict=True):
                np.testing.assert_array_equal(
                    patch, read_patch(slide, int(grid.x[i]), int(grid.y[i]), grid.size, 16))
        calls.clear()
        detect_foreground(slide, TilingConfig(patch_um=64, output_px=16, thumbnail_um=8.0))
        assert calls[0][0] == 2  # the thumbnail (8 l0 px per pixel) from level 2
        # Saturated primaries absorb two channels almost fully: "thick" by the OD rule.
        frame = tile_slide(slide, config, QCThresholds())
    assert fg.glass_rgb == (255.0, 255.0, 255.0)
    assert "thick smear" in set(frame["qc_reason"])


def test_slide_without_mpp_needs_the_option(fixtures_dir: Path) -> None:
    path = _slides(fixtures_dir) / "tcga-no-mpp.svs"
    with open_slide(path) as slide:
        with pytest.raises(InputError, match=r"^tcga-no-mpp.svs: .*pass --mpp"):
            tile_slide(slide, TilingConfig(), QCThresholds())
        with pytest.raises(InputError, match="--mpp"):
            detect_foreground(slide)
    with open_slide(path, mpp=0.25) as slide:
        calls = _spy_reads(slide)
        frame = tile_slide(slide, TilingConfig(), QCThresholds())
    assert len(frame) > 20
    assert (frame["size"] == 448).all()
    assert {level for level, *_ in calls} == {1}  # thumbnail and patches from the 2x level


def test_unreadable_pixels_propagate_the_slide_error(fixtures_dir: Path) -> None:
    with (
        open_slide(_slides(fixtures_dir) / "unreadable.svs") as slide,
        pytest.raises(SlideError, match="unreadable.svs: cannot read pixels"),
    ):
        tile_slide(slide, TilingConfig(patch_um=4.0, output_px=8), QCThresholds())


def test_slide_smaller_than_a_patch(fixtures_dir: Path) -> None:
    with open_slide(_slides(fixtures_dir) / "small.svs") as slide:
        message = (r"^small.svs: 16x16 px at 0.499 um/px \(7.984 x 7.984 um\) is smaller than one "
                   r"112 um patch \(224 px\); pass --patch-um 7.9 or less")
        with pytest.raises(InputError, match=message):
            tile_slide(slide, TilingConfig(), QCThresholds())


def test_bccd_photographs(fixtures_dir: Path) -> None:
    frames = []
    for path in _bccd(fixtures_dir):
        with open_slide(path, mpp=BCCD_MPP) as slide:
            frame = tile_slide(slide, TilingConfig(), QCThresholds())
            fg = detect_foreground(slide)
        assert len(frame) >= 1, path.name
        assert (frame["size"] == round(112 / BCCD_MPP)).all()
        assert all(185 <= v <= 215 for v in fg.glass_rgb), (path.name, fg.glass_rgb)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    # A photograph is a field of view: 640 x 480 is covered by 2 x 2 cells of 373 px.
    assert len(table) == 4 * len(frames)
    assert set(table["x"]) == {0, 640 - 373} and set(table["y"]) == {0, 480 - 373}
    # Plausible values for a pale blood film photographed on grey glass.
    assert table["background_fraction"].between(0.2, 0.85).all()
    assert table["mean_intensity"].between(150, 215).all()
    assert (table["dark_fraction"] < 0.01).all()
    assert table["blur_variance"].between(8, 400).all()  # at 0.5 um/px: in focus (threshold 4)
    # Each photograph centres a white cell: some patch of each holds nuclear material.
    per_photo = table["nuclear_area_um2"].to_numpy().reshape(len(frames), 4).max(axis=1)
    assert (per_photo >= 20).all()
    assert table["qc_pass"].sum() >= 0.75 * len(table)  # not all failing


# ----------------------------------------------------------------- synthetic slides

# The synthetic smears below are PNGs: read them as scans (smear mask, glass
# dropped), not as microscope fields (tiled edge to edge).
SCAN = TilingConfig(fov_max_mm=0)


def _png(tmp_path: Path, image: np.ndarray, name: str = "smear.png") -> Path:
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return path


def test_thick_area_is_flagged_and_rejected(tmp_path: Path) -> None:
    image = _smear_image(1344, 1344, seed=1, dark_box=(0, 0, 672, 672))
    with open_slide(_png(tmp_path, image), mpp=0.5) as slide:
        fg = detect_foreground(slide, SCAN)
        frame = tile_slide(slide, SCAN, QCThresholds())
    assert fg.thick[: 672 // 16 - 2, : 672 // 16 - 2].all()
    assert not fg.thick[672 // 16 + 2 :, :].any()
    assert len(frame) == 36  # 6 x 6 cells of 224 px, all smear
    dark = (frame["x"] < 672) & (frame["y"] < 672)
    assert (frame.loc[dark, "thick_fraction"] > 0.9).all()
    assert (frame.loc[dark, "qc_reason"] == "thick smear").all()
    assert (frame.loc[~dark, "thick_fraction"] == 0).all()
    assert frame.loc[~dark, "qc_pass"].mean() > 0.8


def test_glass_only_slide_gives_no_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = np.clip(rng.normal(236, 2.0, (900, 900, 3)), 0, 255).astype(np.uint8)
    with open_slide(_png(tmp_path, image), mpp=0.5) as slide:
        fg = detect_foreground(slide, SCAN)
        frame = tile_slide(slide, SCAN, QCThresholds())
    assert fg.smear_od == SCAN.min_smear_od  # the floor, not Otsu's split of noise
    assert not fg.smear.any()
    assert frame.empty and list(frame.columns) == list(TILE_COLUMNS)


def test_mask_keeps_the_smear_and_drops_the_glass(tmp_path: Path) -> None:
    image = _smear_image(1120, 1568, seed=3, smear_box=(0, 0, 784, 1120))  # left half smear
    with open_slide(_png(tmp_path, image), mpp=0.5) as slide:
        frame = tile_slide(slide, SCAN, QCThresholds())
    assert len(frame) == 5 * 4  # rows 5, columns 0-3 of 7
    assert frame["g_col"].max() == 3
    assert frame["qc_pass"].all()


def test_overlap_halves_the_stride(fixtures_dir: Path) -> None:
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        fg = detect_foreground(slide, SCAN)
        plain = make_grid(slide, SCAN, fg)
        half = make_grid(slide, TilingConfig(overlap=0.5), fg)
    assert half.stride == 112 and plain.stride == plain.size == half.size == 224
    assert (half.n_cols, half.n_rows) == ((2220 - 224) // 112 + 1, (2967 - 224) // 112 + 1)
    assert len(half) > 3 * len(plain)
    np.testing.assert_array_equal(half.x, half.l0_origin[0] + half.g_col * 112)


# ----------------------------------------------------------------- reading patches


def test_patches_equal_a_direct_read(fixtures_dir: Path) -> None:
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        fg = detect_foreground(slide, SCAN)
        grid = make_grid(slide, SCAN, fg)
        idx, batch = next(iter_patch_batches(slide, grid, batch_size=5))
        for i, patch in zip(idx, batch, strict=True):
            x, y = int(grid.x[i]), int(grid.y[i])
            np.testing.assert_array_equal(patch, slide.read_region(x, y, 0, (224, 224)))
        # 224 um = 449 px, resampled to 224 px with PIL's BOX filter.
        big = make_grid(slide, TilingConfig(patch_um=224.0), fg)
        assert big.size == 449
        idx, batch = next(iter_patch_batches(slide, big, batch_size=3, workers=0))
        for i, patch in zip(idx, batch, strict=True):
            x, y = int(big.x[i]), int(big.y[i])
            direct = Image.fromarray(slide.read_region(x, y, 0, (449, 449))).resize(
                (224, 224), Image.Resampling.BOX)
            np.testing.assert_array_equal(patch, np.asarray(direct))


def test_batches_cover_the_grid_in_order(fixtures_dir: Path) -> None:
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        grid = make_grid(slide, SCAN, detect_foreground(slide, SCAN))
        seen = [idx for idx, batch in iter_patch_batches(slide, grid, batch_size=8)]
        assert all(i.size <= 8 for i in seen)
        np.testing.assert_array_equal(np.concatenate(seen), np.arange(len(grid)))
        gen = iter_patch_batches(slide, grid, batch_size=4)
        next(gen)
        gen.close()  # stopping early shuts the thread pool down


def test_tile_slide_is_deterministic(fixtures_dir: Path) -> None:
    path = _slides(fixtures_dir) / "CMU-1-Small-Region.svs"
    with open_slide(path) as slide:
        first = tile_slide(slide, SCAN, QCThresholds())
        other = tile_slide(slide, SCAN, QCThresholds(), batch_size=7, workers=0)
    with open_slide(path) as slide:
        again = tile_slide(slide, SCAN, QCThresholds(), workers=3)
    pd.testing.assert_frame_equal(first, other)
    pd.testing.assert_frame_equal(first, again)


def test_progress_reports_patch_counts(fixtures_dir: Path) -> None:
    events: list[tuple[int, int]] = []

    def report(done: int, total: int) -> None:
        events.append((done, total))

    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        frame = tile_slide(slide, SCAN, QCThresholds(), report, batch_size=16)
    n = len(frame)
    assert events[0] == (0, n) and events[-1] == (n, n)
    assert [d for d, _ in events] == sorted(d for d, _ in events)
    assert len(events) == 1 + -(-n // 16)


# ----------------------------------------------------------------- helpers and settings


def test_box_fractions_match_a_brute_force_count() -> None:
    """Area-weighted cover of squares at fractional positions, against an 8x upsampled mask."""
    rng = np.random.default_rng(4)
    mask = rng.random((20, 30)) < 0.4
    fine = np.kron(mask, np.ones((8, 8), dtype=bool))
    side = 3.25
    for gy in rng.integers(-40, 20 * 8 + 8, 12) / 8:  # multiples of 1/8, some off the edges
        x0 = rng.integers(-40, 30 * 8 + 8, 20) / 8
        got = patch_grid._box_fractions(mask, x0, float(gy), side)
        for gx, value in zip(x0, got, strict=True):
            fx, fy, n = int(gx * 8), int(gy * 8), int(side * 8)
            window = fine[max(fy, 0) : max(fy + n, 0), max(fx, 0) : max(fx + n, 0)]
            assert value == pytest.approx(window.sum() / n**2, abs=1e-12)


def test_mask_cleaning_in_strips_equals_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    mask = rng.random((150, 70)) < 0.45
    whole = foreground._clean(mask, 2)
    monkeypatch.setattr(foreground, "_OD_STRIP_PIXELS", 700)  # strips of 8 rows
    np.testing.assert_array_equal(foreground._clean(mask, 2), whole)
    # Reference: scipy on the whole mask padded far wider than the operations reach.
    padded = np.pad(mask, 20, mode="edge")
    ref = ndimage.binary_opening(ndimage.binary_closing(padded, foreground._disk(2)), np.ones((3, 3)))
    np.testing.assert_array_equal(whole, ref[20:-20, 20:-20])


def test_config_round_trip_and_json() -> None:
    config = TilingConfig(patch_um=56, output_px=112.0, overlap=0.25)
    data = config.to_dict()
    assert data["output_px"] == 112 and isinstance(data["output_px"], int)
    assert TilingConfig.from_dict(json.loads(json.dumps(data))) == config
    assert config.patch_l0_px(0.25) == 224


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap": 0.95}, r"overlap=0.95 must be in \[0, 0.9\]"),
        ({"patch_um": 0}, "patch_um=0.0 must be positive"),
        ({"output_px": 100.5}, "whole number"),
        ({"output_px": 4}, r"output_px=4 must be in \[8, 4096\]"),
        ({"min_foreground": -0.1}, "min_foreground"),
        ({"min_smear_od": 0.3}, "min_smear_od <= max_smear_od"),
        ({"thick_od": 0.05}, "must exceed max_smear_od"),
        ({"thumbnail_um": float("inf")}, "not a finite number"),
    ],
)
def test_bad_config_raises(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        TilingConfig(**kwargs)


def test_unknown_config_key_and_bad_batching(fixtures_dir: Path) -> None:
    with pytest.raises(InputError, match="unknown tiling setting"):
        TilingConfig.from_dict({"patch_size": 224})
    with open_slide(_slides(fixtures_dir) / "CMU-1-Small-Region.svs") as slide:
        with pytest.raises(InputError, match="batch_size=0"):
            tile_slide(slide, SCAN, QCThresholds(), batch_size=0)
        with pytest.raises(InputError, match="workers=-1"):
            tile_slide(slide, SCAN, QCThresholds(), workers=-1)
        grid = make_grid(slide, SCAN, detect_foreground(slide, SCAN))
        with pytest.raises(InputError, match="batch_size=0"):
            iter_patch_batches(slide, grid, batch_size=0)  # checked eagerly, not at next()


def test_a_resolution_no_microscope_has_is_refused(fixtures_dir: Path) -> None:
    # boxes.tiff carries TIFF resolution tags worth 352 um/px: a patch would be 1 pixel.
    with open_slide(fixtures_dir / "slides" / "boxes.tiff") as slide:
        assert slide.mpp is not None and slide.mpp > 300
        with pytest.raises(InputError, match=r"boxes.tiff: at 352.* um/px a 112 um patch is only 1 px"):
            tile_slide(slide, SCAN, QCThresholds())
