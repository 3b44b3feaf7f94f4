"""One face over whole-slide images and plain photographs.

:func:`open_slide` returns a :class:`Slide` for anything OpenSlide reads
(Aperio svs, Hamamatsu ndpi, Mirax mrxs, Leica scn, DICOM, generic tiled
TIFF...) and for plain images (jpg, png, bmp, single-level tif), which become
one-level slides: microscope photographs of smears are handled like scans.

Coordinate systems (named once, used everywhere):

* ``l0_``: level-0 pixels, the slide's full resolution. Stored patch
  coordinates are in this system.
* ``lv_``: pixels of a pyramid level ``level``; ``l0 = lv * downsample``.
* ``th_``: thumbnail pixels; ``l0 = th * (slide width / thumbnail width)``.

Resolution is ``mpp`` (microns per level-0 pixel), read from the file
(``openslide.mpp-x``; TIFF resolution tags for images) or given by the
caller. A slide with neither has ``mpp = None``; the pipeline refuses it with
a message that says to pass ``--mpp``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cmil_core.errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "Slide",
    "SlideError",
    "file_sha256",
    "open_slide",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# Suffixes only OpenSlide reads: such a file it does not recognise is damaged.
_OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
# Plain images are decoded whole: refuse anything larger (decompression bombs).
MAX_IMAGE_PIXELS = 20_000 * 20_000


class SlideError(InputError):
    """A slide file cannot be used; the message says why, for a person."""


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Levels:
    dimensions: tuple[tuple[int, int], ...]
    downsamples: tuple[float, ...]


class Slide:
    """An open slide: size, resolution, pyramid, regions and thumbnails.

    Use :func:`open_slide`; close with :meth:`close` or a ``with`` block.
    """

    def __init__(self, path: Path, kind: str, mpp: float | None, levels: _Levels,
                 osr: object | None, image: Image.Image | None) -> None:
        self.path = path
        self.kind = kind
        self.mpp = mpp
        self._levels = levels
        self._osr = osr
        self._image = image

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({self.path.name!r}, kind={self.kind!r}, {self.width}x{self.height}, "
                f"mpp={self.mpp})")

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) in level-0 pixels."""
        return self._levels.dimensions[0]

    @property
    def width(self) -> int:
        return self.dimensions[0]

    @property
    def height(self) -> int:
        return self.dimensions[1]

    @property
    def level_count(self) -> int:
        return len(self._levels.dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._levels.dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._levels.downsamples

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level still at least as fine as ``downsample`` asks.

        Pyramid downsamples are rarely exact (2.00045 for a "2x" level), so a
        level up to 0.1 % coarser than asked still counts.
        """
        best = 0
        for level, ds in enumerate(self._levels.downsamples):
            if ds <= downsample * 1.001:
                best = level
        return best

    def read_region(self, l0_x: int, l0_y: int, level: int, lv_size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (height, width, 3) of a region at ``level``.

        ``l0_x, l0_y`` is the top-left corner in level-0 pixels; ``lv_size``
        the (width, height) in pixels of that level. Outside the slide is white.
        """
        w, h = lv_size
        if w <= 0 or h <= 0:
            raise ValueError(f"invalid region size {lv_size}")
        if not 0 <= level < self.level_count:
            raise ValueError(f"invalid level {level}")
        if self._osr is not None:
            import openslide

            try:
                region = self._osr.read_region((l0_x, l0_y), level, (w, h))  # type: ignore[attr-defined]
            except openslide.OpenSlideError as exc:
                raise SlideError(f"{self.path.name}: cannot read pixels ({exc})") from exc
            rgba = np.asarray(region)
            rgb = rgba[..., :3].copy()
            # Transparent pixels lie outside the scanned area: make them white, like glass.
            alpha = rgba[..., 3]
            if not alpha.all():
                rgb[alpha == 0] = 255
            return rgb
        assert self._image is not None
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(l0_x, 0), max(l0_y, 0)
        x1, y1 = min(l0_x + w, self.width), min(l0_y + h, self.height)
        if x1 > x0 and y1 > y0:
            crop = np.asarray(self._image.crop((x0, y0, x1, y1)))
            out[y0 - l0_y : y1 - l0_y, x0 - l0_x : x1 - l0_x] = crop
        return out

    def thumbnail(self, max_size: int = 512) -> Image.Image:
        """An RGB thumbnail whose longer side is at most ``max_size`` pixels."""
        if self._osr is not None:
            import openslide

            try:
                thumb = self._osr.get_thumbnail((max_size, max_size))  # type: ignore[attr-defined]
            except openslide.OpenSlideError as exc:
                raise SlideError(f"{self.path.name}: cannot read pixels ({exc})") from exc
            rgb: Image.Image = thumb.convert("RGB")
            return rgb
        assert self._image is not None
        thumb = self._image.copy()
        thumb.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        return thumb

    def photograph(self) -> Image.Image | None:
        """A copy of a plain image as ingest reads it (RGB, upright); None for whole slides."""
        return None if self._image is None else self._image.copy()

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()  # type: ignore[attr-defined]
            self._osr = None
        if self._image is not None:
            self._image.close()
            self._image = None


def _mpp_from_openslide(props: dict[str, str]) -> float | None:
    import openslide

    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        raw = props.get(key)
        if raw:
            try:
                value = float(raw)
            except ValueError:
                continue
            if 0 < value < 1000:
                return value
    return None


# Resolutions a microscope photograph can have: 0.02 um/px (beyond a 100x oil
# objective's optics) to 5 um/px (a 2x objective). Anything else in a file's
# dpi is a screen or print default (72, 96, 300, 600 dpi) or a flatbed scan.
_PLAUSIBLE_MPP = (0.02, 5.0)


def _mpp_from_image(img: Image.Image) -> float | None:
    """mpp from TIFF resolution tags or JPEG/PNG dpi, when they are a microscope's."""
    dpi = img.info.get("dpi")
    try:
        mpp = 25_400.0 / float(dpi[0]) if dpi else None
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    if mpp is None or not _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
        return None
    return mpp


_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the turn that shows the image upright (Pillow's ImageOps.exif_transpose)
_EXIF_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}

_GREY_MODES = {"1": "1-bit", "L": "8-bit", "LA": "8-bit with alpha", "I": "32-bit",
               "F": "floating-point"}


def _greyscale(img: Image.Image, rgb: Image.Image) -> str | None:
    """Why a plain image is greyscale (its mode, or three equal channels), None when in colour.

    A monochrome camera's photograph carries no stain colour: the optical
    densities quality control measures and the colours the model learnt are
    missing, and a 16-bit one would even convert to white. Three channels
    count as equal when under 0.1 % of the darker-than-glass pixels of a small
    copy differ by more than 3 levels between channels (JPEG's rounding); a
    field that is nearly all glass is left to quality control (background).
    """
    mode = img.mode
    if mode in _GREY_MODES or mode.startswith("I;16"):
        return _GREY_MODES.get(mode, "16-bit") + f" mode {mode}"
    small = np.asarray(rgb.reduce(max(1, max(rgb.size) // 256)), dtype=np.int16)
    content = small.min(axis=2) < 220  # not glass: a blank field is quality control's to judge
    if float(content.mean()) < 0.01:
        return None
    spread = small.max(axis=2)[content] - small.min(axis=2)[content]
    if float((spread > 3).mean()) < 0.001:
        return "its red, green and blue channels are equal"
    return None


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None) -> Slide:
    """Open a whole-slide image or a photograph.

    ``mpp`` overrides the file's resolution. Raises :class:`SlideError` with a
    reason a person understands for a missing, empty, unsupported or corrupt
    file, or a decompression bomb.
    """
    p = Path(path)
    name = p.name
    if not p.exists():
        raise SlideError(f"{name}: no such file")
    if not p.is_file():
        raise SlideError(f"{name}: not a file")
    if p.stat().st_size == 0:
        raise SlideError(f"{name}: the file is empty")
    if mpp is not None and not (0 < mpp < 1000):
        raise SlideError(f"{name}: mpp {mpp} is not a plausible resolution in microns per pixel")

    import openslide

    suffix = p.suffix.lower()
    vendor = None
    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
    except openslide.OpenSlideError:
        vendor = None
    if vendor is not None and suffix not in (".jpg", ".jpeg", ".png", ".bmp"):
        try:
            osr = openslide.OpenSlide(str(p))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{name}: OpenSlide cannot open it ({exc})") from exc
        levels = _Levels(tuple(osr.level_dimensions),
                         tuple(float(d) for d in osr.level_downsamples))
        file_mpp = _mpp_from_openslide(dict(osr.properties))
        return Slide(p, f"openslide:{vendor}", mpp if mpp is not None else file_mpp, levels,
                     osr, None)

    if suffix in _OPENSLIDE_SUFFIXES:
        raise SlideError(
            f"{name}: OpenSlide cannot open it (not recognised as a {suffix} slide: the file "
            "is truncated or corrupt, or a variant OpenSlide does not read)"
        )
    if suffix not in IMAGE_SUFFIXES:
        raise SlideError(
            f"{name}: not a slide format OpenSlide reads, nor a jpg/png/bmp/tif image"
        )
    img: Image.Image | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise SlideError(
                    f"{name}: {w}x{h} pixels is too large for a plain image "
                    "(save it as a tiled pyramidal TIFF)"
                )
            file_mpp = _mpp_from_image(img)
            img.load()
    except BaseException as exc:
        if img is not None:
            img.close()  # a half-read image keeps its file open otherwise
        if isinstance(exc, SlideError):
            raise
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise SlideError(f"{name}: refused as a decompression bomb ({exc})") from exc
        if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError)):
            raise SlideError(f"{name}: not a readable image ({exc})") from exc
        raise
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    turn = _EXIF_TURNS.get(img.getexif().get(_EXIF_ORIENTATION, 1))
    if turn is not None:  # a camera held sideways: tile the field as every viewer shows it
        rgb = rgb.transpose(turn)
        w, h = rgb.size
    grey = _greyscale(img, rgb)
    if grey is not None:
        img.close()
        raise SlideError(
            f"{name}: a greyscale image ({grey}); quality control and the model read the "
            "stain's colours, so use the colour photograph (8-bit RGB)"
        )
    fmt = (img.format or suffix.lstrip(".")).lower()
    levels = _Levels(((w, h),), (1.0,))
    return Slide(p, f"image:{fmt}", mpp if mpp is not None else file_mpp, levels, None, rgb)
