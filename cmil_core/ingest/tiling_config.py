"""The settings of tiling, stored with each run: :class:`TilingConfig`.

Also the two rules every tiling step asks first: whether an image is a
microscope photograph tiled edge to edge (:func:`is_photograph`) and the
slide's resolution (:func:`require_mpp`). The method behind the settings is in
:mod:`cmil_core.ingest.tiling` and the modules it names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from cmil_core.errors import InputError
from cmil_core.ingest.slides import Slide

__all__ = [
    "TilingConfig",
    "is_photograph",
    "require_mpp",
]


@dataclass(frozen=True)
class TilingConfig:
    """How a slide becomes a patch grid; store :meth:`to_dict` with the run.

    ``patch_um``: side of a patch in microns (112: see :mod:`cmil_core.ingest.patch_grid`).
    ``output_px``: side in pixels the patches are resampled to (224).
    ``overlap``: fraction of a patch shared with its neighbour, in [0, 0.9].
    ``min_foreground``: share of a cell that must be smear to keep it (0.1: the
    mask only skips open glass quickly; the pixel rule "background" of
    :mod:`cmil_core.ingest.quality` makes the real call, with a stored reason).
    ``thumbnail_um``: microns per thumbnail pixel for the foreground (8).
    ``max_thumbnail_px``: cap on the thumbnail's longer side (4096).
    ``min_smear_od`` / ``max_smear_od``: floor and cap of the Otsu threshold on
    the optical density relative to glass (0.04 and 0.08). Glass noise and
    JPEG ringing stay under 0.03 at thumbnail scale; a thin smear (red cells,
    green OD about 0.2, covering half of a thumbnail pixel) gives about 0.08
    to 0.1, and Otsu lands at 0.05-0.07 on the BCCD photographs. Tissue,
    nuclei or thick areas pull Otsu far higher (0.22 on CMU-1), which would
    call a thin smear glass: hence the cap.
    ``thick_od``: mean OD relative to glass from which a thumbnail pixel is a
    thick, unreadable area (1.0: a tenth of the light passes, nearly black).
    Deliberately high: dense clusters of small round blue tumour cells must
    not be masked as "thick"; darker-than-normal patches that are still
    translucent are judged by the quality rule "too dark" instead.
    ``fov_max_mm``: a plain image (jpg, png, bmp, one-level tif) whose longer
    side is at most this many millimetres (5: a 10x objective's field is about
    2 mm, a 100x oil field 0.2 mm) is a microscope field of view, tiled edge
    to edge (:func:`is_photograph`); a larger one (a stitched whole smear) is
    treated like a scan, with the smear mask. 0 treats every image as a scan.
    """

    patch_um: float = 112.0
    output_px: int = 224
    overlap: float = 0.0
    min_foreground: float = 0.1
    thumbnail_um: float = 8.0
    max_thumbnail_px: int = 4096
    min_smear_od: float = 0.04
    max_smear_od: float = 0.08
    thick_od: float = 1.0
    fov_max_mm: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value):
                raise InputError(f"tiling setting {f.name}={value!r} is not a finite number.")
        for name in ("output_px", "max_thumbnail_px"):
            value = getattr(self, name)
            if not float(value).is_integer():
                raise InputError(
                    f"tiling setting {name}={value!r} must be a whole number of pixels."
                )
            object.__setattr__(self, name, int(value))
        for name in ("patch_um", "overlap", "min_foreground", "thumbnail_um",
                     "min_smear_od", "max_smear_od", "thick_od", "fov_max_mm"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.patch_um <= 0:
            raise InputError(f"tiling setting patch_um={self.patch_um} must be positive.")
        if not 8 <= self.output_px <= 4096:
            raise InputError(f"tiling setting output_px={self.output_px} must be in [8, 4096].")
        if not 0.0 <= self.overlap <= 0.9:
            raise InputError(f"tiling setting overlap={self.overlap} must be in [0, 0.9].")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise InputError(
                f"tiling setting min_foreground={self.min_foreground} must be in [0, 1]."
            )
        if self.fov_max_mm < 0:
            raise InputError(f"tiling setting fov_max_mm={self.fov_max_mm} must be >= 0.")
        if self.thumbnail_um <= 0:
            raise InputError(f"tiling setting thumbnail_um={self.thumbnail_um} must be positive.")
        if self.max_thumbnail_px < 16:
            raise InputError(
                f"tiling setting max_thumbnail_px={self.max_thumbnail_px} must be >= 16."
            )
        if not 0.0 < self.min_smear_od <= self.max_smear_od:
            raise InputError(
                f"tiling settings need 0 < min_smear_od <= max_smear_od, got "
                f"{self.min_smear_od} and {self.max_smear_od}."
            )
        if self.thick_od <= self.max_smear_od:
            raise InputError(
                f"tiling setting thick_od={self.thick_od} must exceed "
                f"max_smear_od={self.max_smear_od}."
            )

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return dict(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TilingConfig:
        """A config from :meth:`to_dict`'s dict; missing keys take defaults, unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown tiling setting(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(known))}."
            )
        return cls(**dict(data))

    def patch_l0_px(self, mpp: float) -> int:
        """Side of a patch in level-0 pixels at ``mpp`` microns per pixel."""
        return max(1, round(self.patch_um / mpp))


def is_photograph(slide: Slide, config: TilingConfig | None = None) -> bool:
    """A plain picture (jpg, png, bmp, one-level tif) of at most ``config.fov_max_mm``.

    Such an image is a microscope field of view the operator chose: it is
    tiled edge to edge and only quality control rejects its patches.
    """
    cfg = config if config is not None else TilingConfig()
    if not slide.kind.startswith("image:") or slide.mpp is None:
        return False
    return max(slide.width, slide.height) * float(slide.mpp) <= cfg.fov_max_mm * 1000.0


def require_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise InputError(
            f"{slide.path.name}: the file has no resolution (microns per pixel); "
            "pass --mpp (or an mpp column in the manifest)."
        )
    return float(slide.mpp)
