"""cmil_core.ingest.slides on real files from tests/data/fixtures, including broken ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmil_core.ingest.slides import MAX_IMAGE_PIXELS, SlideError, file_sha256, open_slide


def test_aperio_slide_with_resolution(fixtures_dir: Path) -> None:
    with open_slide(fixtures_dir / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert slide.kind == "openslide:aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        region = slide.read_region(1000, 1000, 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        thumb = slide.thumbnail(256)
        assert max(thumb.size) == 256 and thumb.mode == "RGB"


def test_slide_without_resolution_and_override(fixtures_dir: Path) -> None:
    path = fixtures_dir / "slides" / "tcga-no-mpp.svs"
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert slide.level_count == 2
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_pyramid_levels_and_best_level(fixtures_dir: Path) -> None:
    with open_slide(fixtures_dir / "slides" / "boxes.tiff") as slide:
        assert slide.level_count == 4
        assert slide.dimensions == (300, 250)
        assert slide.best_level_for_downsample(1.0) == 0
        assert slide.best_level_for_downsample(2.5) == 1
        assert slide.best_level_for_downsample(100) == 3


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken.svs", "OpenSlide cannot open it|not a slide format"),
        ("unopenable.tiff", "OpenSlide cannot open it|not a readable image"),
    ],
)
def test_files_that_fail_to_open(fixtures_dir: Path, name: str, reason: str) -> None:
    with pytest.raises(SlideError, match=rf"^{name}: ({reason})"):
        open_slide(fixtures_dir / "slides" / name)


def test_file_that_opens_but_cannot_be_read(fixtures_dir: Path) -> None:
    with (open_slide(fixtures_dir / "slides" / "unreadable.svs") as slide,
          pytest.raises(SlideError, match="unreadable.svs: cannot read pixels")):
        slide.read_region(0, 0, 0, (16, 16))


def test_smear_photograph_is_a_one_level_slide(fixtures_dir: Path) -> None:
    path = fixtures_dir / "smears" / "bccd" / "BloodImage_00000.jpg"
    with open_slide(path, mpp=0.3) as slide:
        assert slide.kind == "image:jpeg"
        assert slide.dimensions == (640, 480) and slide.level_count == 1
        assert slide.mpp == 0.3
        full = slide.read_region(0, 0, 0, (640, 480))
        assert np.array_equal(full, np.asarray(Image.open(path).convert("RGB")))
        # Outside the image is white, as with OpenSlide.
        edge = slide.read_region(600, 440, 0, (80, 80))
        assert (edge[40:, :] == 255).all() and (edge[:, 40:] == 255).all()


def _photo(fixtures_dir: Path) -> Image.Image:
    return Image.open(fixtures_dir / "smears" / "bccd" / "BloodImage_00000.jpg").convert("RGB")


@pytest.mark.parametrize("kind", ["grey8.jpg", "grey16.png", "grey_as_rgb.png"])
def test_greyscale_photographs_are_refused_with_the_reason(
    fixtures_dir: Path, tmp_path: Path, kind: str
) -> None:
    grey = _photo(fixtures_dir).convert("L")
    path = tmp_path / kind
    if kind == "grey8.jpg":
        grey.save(path)
    elif kind == "grey16.png":  # a 16-bit monochrome camera: Pillow's RGB of it is all white
        Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(path)
    else:  # three equal channels: colour in name only
        grey.convert("RGB").save(path)
    with pytest.raises(SlideError, match=f"{kind}: a greyscale image .*colour"):
        open_slide(path, mpp=0.1)


@pytest.mark.parametrize("kind", ["cmyk.jpg", "palette.png", "rgb16.tif", "rgba.png"])
def test_colour_photographs_in_other_modes_read_as_their_rgb(
    fixtures_dir: Path, tmp_path: Path, kind: str
) -> None:
    rgb = _photo(fixtures_dir)
    path = tmp_path / kind
    if kind == "cmyk.jpg":
        rgb.convert("CMYK").save(path, quality=95)
    elif kind == "palette.png":
        rgb.convert("P").save(path)
    elif kind == "rgba.png":
        rgb.convert("RGBA").save(path)
    else:
        import tifffile

        tifffile.imwrite(path, np.asarray(rgb).astype(np.uint16) * 257)
    with open_slide(path, mpp=0.1) as slide:
        region = slide.read_region(0, 0, 0, (640, 480)).astype(int)
    if kind == "rgb16.tif":  # 16 bits per channel, scaled to 8
        assert np.abs(region - np.asarray(rgb, dtype=int)).max() <= 1
    else:  # what the file holds (a palette's colours, JPEG's CMYK), as RGB
        assert np.array_equal(region, np.asarray(Image.open(path).convert("RGB"), dtype=int))
        assert np.abs(region - np.asarray(rgb, dtype=int)).mean() < 20


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_photograph_taken_sideways_is_read_upright(
    fixtures_dir: Path, tmp_path: Path, orientation: int
) -> None:
    from PIL import ImageOps

    upright = _photo(fixtures_dir)
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270}[orientation]
    stored = upright.transpose(undo)  # as the camera wrote the pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    with Image.open(path) as check:  # what every viewer shows
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(check)), np.asarray(upright))
    with open_slide(path, mpp=0.1) as slide:
        assert slide.dimensions == (640, 480)
        assert np.array_equal(slide.read_region(0, 0, 0, (640, 480)), np.asarray(upright))


@pytest.mark.parametrize(("dpi", "mpp"), [(72, None), (300, None), (600, None), (2400, None),
                                          (101_600, 0.25), (254_000, 0.1)])
def test_a_photographs_dpi_is_its_resolution_only_when_a_microscopes(
    fixtures_dir: Path, tmp_path: Path, dpi: int, mpp: float | None
) -> None:
    path = tmp_path / "field.png"  # PNG's pHYs holds a microscope's dpi; JPEG's 16 bits do not
    _photo(fixtures_dir).save(path, dpi=(dpi, dpi))
    with open_slide(path) as slide:
        assert slide.mpp == (pytest.approx(mpp, rel=1e-3) if mpp is not None else None)


def test_plain_image_without_resolution(fixtures_dir: Path) -> None:
    with open_slide(fixtures_dir / "smears" / "bccd" / "BloodImage_00001.jpg") as slide:
        assert slide.mpp is None


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.svs", b"", "the file is empty"),
        ("notes.txt", b"hello", "not a slide format OpenSlide reads"),
        ("fake.jpg", b"this is not a jpeg at all", "not a readable image"),
    ],
)
def test_bad_files_fail_with_a_reason(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SlideError, match=f"{name}: {reason}"):
        open_slide(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="nope.svs: no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="not a file"):
        open_slide(tmp_path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few kB on disk, billions of pixels decoded
    assert path.stat().st_size < 5_000_000
    with pytest.raises(SlideError, match="bomb.png: .*(too large|decompression bomb)"):
        open_slide(path)


def test_implausible_mpp_is_refused(fixtures_dir: Path) -> None:
    with pytest.raises(SlideError, match="mpp -1"):
        open_slide(fixtures_dir / "slides" / "small.svs", mpp=-1)


def test_sha256_matches_hashlib(fixtures_dir: Path) -> None:
    path = fixtures_dir / "slides" / "small.svs"
    assert file_sha256(path, chunk=100) == hashlib.sha256(path.read_bytes()).hexdigest()
