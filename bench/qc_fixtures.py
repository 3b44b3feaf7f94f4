"""Patches kept and rejected by reason on real smear fixtures, per set and magnification.

Run: ``.venv/bin/python bench/qc_fixtures.py [--fixtures DIR] [--nucleated-scope
field|patch] [--json]`` (``patch``: photographs judged patch by patch, as before
the field scope; the default ``field`` is the product's default).

Sets (each skipped when its folder is missing):

* ``bccd``: the BCCD photographs (``smears/bccd``, Wright/Giemsa-type
  peripheral blood, 100x oil, about 0.1 um/px), 32 um patches, at their true
  resolution and area-averaged to 0.25 and 0.5 um/px;
* ``chula``: the Chulalongkorn WBC fields (``real/chula_wbc``, another camera
  and Romanowsky-type stain, about 0.08 um/px), 32 um patches, likewise;
* ``chula cells``: each labelled white cell cut out as a 200 px square (16 um),
  one patch per image: every patch holds a nucleated cell, so every
  rejection is a false one; as photographed, with the stain's hue rotated by
  -30 and +30 degrees (optical density about the grey axis), and as a
  yellowish rapid stain (brownish-violet nuclei);
* ``cmu1``: CMU-1-Small-Region.svs (Aperio H&E, 0.499 um/px), 112 um patches;
* the same three photograph sets with a 2 um Gaussian blur (what a defocused
  field gives: everything should be rejected).

Not a test: it prints what quality control does to real data, so that a
change to it can be judged (before/after) on the same images. By default it
reads the fixtures copied into the repository (``tests/data/fixtures``: 40
BCCD photographs and CMU-1; sources and licences in its ``SOURCES.md``). The
Chulalongkorn sets need the upstream data set (github.com/singgihbekti/WBC_Dataset,
MIT): pass ``--fixtures DIR`` with its images in ``DIR/real/chula_wbc/images``
and their YOLO boxes in ``DIR/real/chula_wbc/yolo_labels``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmil_core.ingest.quality import QCThresholds  # noqa: E402
from cmil_core.ingest.slides import open_slide  # noqa: E402
from cmil_core.ingest.tiling import tile_slide  # noqa: E402
from cmil_core.ingest.tiling_config import TilingConfig  # noqa: E402

THRESHOLDS = [QCThresholds()]  # set by --nucleated-scope


def _tile(path: Path, mpp: float | None, patch_um: float) -> Counter[str]:
    with open_slide(path, mpp=mpp) as slide:
        table = tile_slide(slide, TilingConfig(patch_um=patch_um), THRESHOLDS[0], workers=0)
    return Counter(r if isinstance(r, str) else "kept" for r in table["qc_reason"].tolist())


def _variant(rgb: np.ndarray, factor: float, blur_um: float, mpp: float) -> np.ndarray:
    if factor != 1.0:
        h, w = rgb.shape[:2]
        rgb = np.asarray(Image.fromarray(rgb).resize((round(w / factor), round(h / factor)),
                                                     Image.Resampling.BOX))
    if blur_um:
        sigma = blur_um / (mpp * factor)
        rgb = np.clip(ndimage.gaussian_filter(rgb.astype(np.float64), (sigma, sigma, 0)), 0, 255)
        rgb = rgb.round().astype(np.uint8)
    return rgb


def _photo_set(files: list[Path], mpp: float, patch_um: float, factor: float, blur_um: float,
               tmp: Path) -> Counter[str]:
    total: Counter[str] = Counter()
    for f in files:
        rgb = _variant(np.asarray(Image.open(f).convert("RGB")), factor, blur_um, mpp)
        out = tmp / "field.png"
        Image.fromarray(rgb).save(out)
        try:
            total += _tile(out, mpp * factor, patch_um)
        except ValueError as exc:  # InputError: e.g. smaller than one patch
            total["error: " + str(exc).split(":")[-1].strip()[:60]] += 1
    return total


def _glass(rgb: np.ndarray) -> np.ndarray:
    flat = rgb.reshape(-1, 3).astype(np.float64)
    bright = flat.sum(axis=1)
    return np.median(flat[bright >= np.percentile(bright, 90)], axis=0)


def _restain(rgb: np.ndarray, stain: str) -> np.ndarray:
    """The same cells under another stain: OD rotated about the grey axis, or a rapid stain."""
    if stain == "as photographed":
        return rgb
    glass = _glass(rgb)
    od = np.log10(glass / np.maximum(rgb.astype(np.float64), 1.0))
    if stain == "rapid (yellowish)":
        od[..., 2] += 0.6 * np.maximum(od[..., 0], 0.0)
        return np.clip(np.array([235.0, 225.0, 165.0]) * 10.0 ** -od, 0, 255).astype(np.uint8)
    t = np.radians(float(stain.split()[1]))
    k = np.ones(3) / np.sqrt(3.0)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
    return np.clip(glass * 10.0 ** -np.maximum(od @ rot.T, 0.0), 0, 255).astype(np.uint8)


STAINS = ("as photographed", "hue -30", "hue +30", "rapid (yellowish)")


def _cells(root: Path, tmp: Path, stain: str = "as photographed") -> Counter[str]:
    total: Counter[str] = Counter()
    for f in sorted((root / "images").glob("*.jpg")):
        rgb = np.asarray(Image.open(f).convert("RGB"))
        h, w = rgb.shape[:2]
        label = (root / "yolo_labels" / f"{f.stem}.txt").read_text()
        _, cx, cy, _, _ = map(float, label.split()[:5])
        side = 200
        x0 = int(min(max(cx * w - side / 2, 0), w - side))
        y0 = int(min(max(cy * h - side / 2, 0), h - side))
        out = tmp / "cell.png"
        Image.fromarray(_restain(rgb[y0 : y0 + side, x0 : x0 + side], stain)).save(out)
        total += _tile(out, 0.08, 16.0)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "data" / "fixtures")
    parser.add_argument("--json", action="store_true", help="one JSON object on one line")
    parser.add_argument("--nucleated-scope", choices=("field", "patch"), default="field",
                        help="QC setting nucleated_scope (default: field)")
    args = parser.parse_args()
    THRESHOLDS[0] = QCThresholds(nucleated_scope=args.nucleated_scope)
    fx = args.fixtures
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="cmil-qc-fixtures-") as tmp_name:
        tmp = Path(tmp_name)
        photo_sets = [("bccd", sorted((fx / "smears" / "bccd").glob("*.jpg")), 0.1),
                      ("chula", sorted((fx / "real" / "chula_wbc" / "images").glob("*.jpg")), 0.08)]
        for name, files, mpp in photo_sets:
            if not files:
                continue
            for factor in (1.0, 2.5, 5.0):
                for blur in (0.0, 2.0):
                    counts = _photo_set(files, mpp, 32.0, factor, blur, tmp)
                    label = f"{name} {len(files)} photos @{mpp * factor:.2f} um/px, 32 um"
                    rows.append({"set": label + (", blurred 2 um" if blur else ""),
                                 "counts": dict(counts)})
        chula = fx / "real" / "chula_wbc"
        if (chula / "yolo_labels").is_dir():
            for stain in STAINS:
                rows.append({"set": f"chula cells: 15 single white cells @0.08 um/px, 16 um, "
                                    f"stain {stain}",
                             "counts": dict(_cells(chula, tmp, stain))})
        cmu1 = fx / "slides" / "CMU-1-Small-Region.svs"
        if cmu1.exists():
            rows.append({"set": "cmu1 @0.50 um/px, 112 um",
                         "counts": dict(_tile(cmu1, None, 112.0))})
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        counts = row["counts"]
        assert isinstance(counts, dict)
        n = sum(counts.values())
        kept = counts.get("kept", 0)
        rest = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "kept")
        print(f"{row['set']}: {n} patches, kept {kept} ({kept / max(n, 1):.0%}); {rest or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
