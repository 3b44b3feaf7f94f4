"""A white-cell MIL study built from real white-cell images, run through the real pipeline.

Run: ``PYTHONPATH=. .venv/bin/python bench/wbc_mil.py --fixtures DIR [--stain rapid]
[--marker L] [--cells shared|disjoint] [--encoder-training default frozen finetune]
[--json]``

The case of issue 12: real white-cell images of a rapid Romanowsky-type stain
(yellowish background, brownish-violet nuclei), every patch one nucleated white
cell, positive patients holding a few cells of one type. Quality control must
keep at least 90 % of the patches, and the default ``train`` must reach a
held-out AUC of at least 0.85.

The study is made from the labelled Chulalongkorn white cells
(``DIR/real/chula_wbc/images/*.jpg`` with YOLO boxes in ``yolo_labels/``;
github.com/singgihbekti/WBC_Dataset, MIT; class from the file-name prefix: N
neutrophil, E eosinophil, B basophil, L lymphocyte, M monocyte):

* every cell image is a 200 px square (16 um at 0.08 um/px) around a labelled
  cell, cut from the field after a random rotation (any angle; the field
  around the cell fills the corners), a random flip, a shift of up to 8 px and
  a small stain jitter (optical density of each channel scaled by about 5 %,
  one jitter per patient and a smaller one per cell), saved as JPEG;
* ``--stain rapid`` (default): every image through the same yellowish
  rapid-stain transform as the tests (glass RGB 235, 225, 165; nuclei absorb
  blue too); ``--stain photographed``: as photographed;
* a patient is a bag of 10 to 16 cells of the other classes (patient-specific
  proportions); a positive patient also holds 2 to 4 cells of the ``--marker``
  class (default L, lymphocytes: the small round cells most like a
  neuroblastoma cell);
* ``--train-patients`` (default 40) patients form cohort ``wbc_train`` (role
  train), ``--test-patients`` (default 24) the held-out cohort ``wbc_test``
  (role validation), half of each positive; ``--cells disjoint`` draws the
  held-out patients' cells from source cells the training patients never see
  (one of the three per class; ``shared``, the default, draws both from all).

Then, as a user would, through ``python -m cmil_core``: ``import-cohort`` both
cohorts, ``ingest --mpp 0.08 --patch-um 16`` both, and for each
``--encoder-training`` variant (``default``: the flag not given) ``train`` on
``wbc_train``, ``score`` and ``evaluate --json``. Printed: the share of
patches kept (and the rejections by reason) and, per variant, the held-out
AUC (``wbc_test``) and the training cohort's out-of-fold AUC. ``--json``
prints one line. Not a test (minutes of CPU): it reads ``--fixtures``, which
tests must not.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmil_core import store  # noqa: E402

MPP = 0.08          # microns per pixel of the Chulalongkorn fields (red cells ~95 px = 7.6 um)
SIDE = 200          # cell image side in pixels: 16 um
REGION = 320        # region cut around a cell before rotation (holds SIDE at any angle)
CLASSES = {"N": "neutrophil", "E": "eosinophil", "B": "basophil", "L": "lymphocyte",
           "M": "monocyte"}


def _glass(rgb: np.ndarray) -> np.ndarray:
    flat = rgb.reshape(-1, 3).astype(np.float64)
    bright = flat.sum(axis=1)
    return np.median(flat[bright >= np.percentile(bright, 90)], axis=0)


class Cell:
    """One labelled white cell: the region around it and its field's glass colour."""

    def __init__(self, path: Path, label_file: Path) -> None:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        _, cx, cy, _, _ = map(float, label_file.read_text().split()[:5])
        x0 = int(min(max(cx * w - REGION / 2, 0), w - REGION))
        y0 = int(min(max(cy * h - REGION / 2, 0), h - REGION))
        self.name = path.stem
        self.kind = path.stem[0]
        self.region = rgb[y0:y0 + REGION, x0:x0 + REGION].copy()
        self.glass = _glass(rgb)

    def draw(self, rng: np.random.Generator, jitter: np.ndarray, rapid: bool) -> np.ndarray:
        """A new view of the cell: rotated, flipped, shifted, stain-jittered (and restained)."""
        img = Image.fromarray(self.region).rotate(float(rng.uniform(0, 360)),
                                                  resample=Image.Resampling.BICUBIC)
        dx, dy = rng.integers(-8, 9, 2)
        left = (REGION - SIDE) // 2 + int(dx)
        top = (REGION - SIDE) // 2 + int(dy)
        rgb = np.asarray(img.crop((left, top, left + SIDE, top + SIDE)))
        if rng.random() < 0.5:
            rgb = rgb[:, ::-1]
        od = np.log10(self.glass / np.maximum(rgb.astype(np.float64), 1.0))
        od = np.maximum(od, 0.0) * (jitter * (1.0 + rng.normal(0.0, 0.02, 3)))
        if rapid:  # a yellowish rapid stain: nuclei absorb blue as well (brownish-violet)
            od[..., 2] += 0.6 * od[..., 0]
            glass = np.array([235.0, 225.0, 165.0])
        else:
            glass = self.glass
        return np.clip(glass * 10.0 ** -od, 0, 255).round().astype(np.uint8)


def load_cells(fixtures: Path) -> list[Cell]:
    root = fixtures / "real" / "chula_wbc"
    images = sorted((root / "images").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no white-cell images in {root / 'images'}: pass --fixtures DIR with "
                         "real/chula_wbc/images and real/chula_wbc/yolo_labels")
    return [Cell(p, root / "yolo_labels" / f"{p.stem}.txt") for p in images]


def write_cohort(folder: Path, cohort: str, prefix: str, n: int, cells: list[Cell],
                 marker: str, rapid: bool, rng: np.random.Generator) -> Path:
    """Patients of one cohort as folders of cell images, and its clinical table."""
    others = sorted({c.kind for c in cells} - {marker})
    by_kind = {k: [c for c in cells if c.kind == k] for k in {c.kind for c in cells}}
    rows = []
    for i in range(n):
        pid = f"{prefix}{i:03d}"
        positive = i % 2 == 1
        weights = rng.dirichlet(np.ones(len(others)))
        kinds = list(rng.choice(others, size=int(rng.integers(10, 17)), p=weights))
        if positive:
            kinds += [marker] * int(rng.integers(2, 5))
        rng.shuffle(kinds)
        jitter = 1.0 + rng.normal(0.0, 0.05, 3)
        out = folder / "slides" / cohort / pid
        out.mkdir(parents=True, exist_ok=True)
        for j, kind in enumerate(kinds):
            cell = by_kind[kind][int(rng.integers(len(by_kind[kind])))]
            Image.fromarray(cell.draw(rng, jitter, rapid)).save(out / f"cell_{j:02d}.jpg",
                                                                quality=92)
        rows.append({"patient_id": pid, "bm_metastasis": int(positive)})
    table = folder / f"{cohort}.csv"
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["patient_id", "bm_metastasis"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def cmil(*args: str) -> str:
    """Run ``python -m cmil_core ARGS`` as a user would; its standard output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cmil_core", "-q", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"cmil {' '.join(args[:1])} failed ({done.returncode}):\n"
                         f"{done.stderr[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "data" / "fixtures",
                        help="folder with real/chula_wbc/{images,yolo_labels}")
    parser.add_argument("--stain", choices=("rapid", "photographed"), default="rapid")
    parser.add_argument("--marker", choices=sorted(CLASSES), default="L",
                        help="the class a few cells of which make a patient positive")
    parser.add_argument("--cells", choices=("shared", "disjoint"), default="shared",
                        help="disjoint: held-out patients' cells come from source cells the "
                             "training patients never see")
    parser.add_argument("--train-patients", type=int, default=40)
    parser.add_argument("--test-patients", type=int, default=24)
    parser.add_argument("--encoder-training", nargs="+", default=["default"],
                        choices=("default", "auto", "frozen", "finetune"),
                        help="train variants (default: the flag not given)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="build the study here and keep it; a study "
                        "already there (its cmil.duckdb) is reused: only the training runs")
    parser.add_argument("--json", action="store_true", help="one JSON object on one line")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    cells = load_cells(args.fixtures)
    if args.cells == "disjoint":
        train_cells, test_cells = [], []
        for kind in sorted({c.kind for c in cells}):
            mine = [c for c in cells if c.kind == kind]
            test_cells.append(mine[-1])
            train_cells.extend(mine[:-1] or mine)
    else:
        train_cells = test_cells = cells
    rapid = args.stain == "rapid"
    with tempfile.TemporaryDirectory(prefix="cmil-wbc-mil-") as tmp_name:
        folder = args.keep or Path(tmp_name)
        folder.mkdir(parents=True, exist_ok=True)
        db = str(folder / "cmil.duckdb")
        started = time.perf_counter()
        built = Path(db).exists()
        for cohort, prefix, n, pool, role in () if built else (
                ("wbc_train", "T", args.train_patients, train_cells, "train"),
                ("wbc_test", "V", args.test_patients, test_cells, "validation")):
            table = write_cohort(folder, cohort, prefix, n, pool, args.marker, rapid, rng)
            cmil("import-cohort", "--db", db, "--cohort", cohort, "--csv", str(table),
                 "--role", role)
            cmil("ingest", "--db", db, "--cohort", cohort,
                 "--slides", str(folder / "slides" / cohort), "--mpp", str(MPP),
                 "--patch-um", f"{SIDE * MPP:g}")
        with store.open_store(db, read_only=True) as st:
            summary = store.qc_summary(st)
        patches = int(summary["patches"].sum())
        kept = int(summary.loc[summary["qc_reason"].isna(), "patches"].sum())
        rejected: dict[str, int] = {}
        for r, v in zip(summary["qc_reason"], summary["patches"], strict=True):
            if isinstance(r, str):
                rejected[r] = rejected.get(r, 0) + int(v)
        result: dict[str, object] = {
            "stain": args.stain, "marker": CLASSES[args.marker], "cells": args.cells,
            "patients": args.train_patients + args.test_patients, "patches": patches,
            "kept": kept, "kept_share": round(kept / max(patches, 1), 4),
            "rejected": rejected, "models": {},
        }
        build_s = time.perf_counter() - started
        for variant in args.encoder_training:
            t0 = time.perf_counter()
            flags = [] if variant == "default" else ["--encoder-training", variant]
            model_id = cmil("train", "--db", db, "--cohort", "wbc_train", "--seed",
                            str(args.seed), *flags).strip().splitlines()[-1]
            cmil("score", "--db", db, "--model", model_id)
            rows = json.loads(cmil("evaluate", "--db", db, "--model", model_id, "--json"))
            aucs = {r["cohort"]: r.get("auc") for r in rows["cohorts"]}
            with store.open_store(db, read_only=True) as st:
                row = store.get_model(st, model_id)
            trained = (row.metrics or {}).get("encoder_training", "frozen") if row else None
            result["models"][variant] = {  # type: ignore[index]
                "model_id": model_id, "encoder_training": trained,
                "heldout_auc": aucs.get("wbc_test"),
                "train_oof_auc": aucs.get("wbc_train"),
                "seconds": round(time.perf_counter() - t0, 1)}
        result["build_seconds"] = round(build_s, 1)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"white-cell MIL study: {result['patients']} patients, stain {args.stain}, marker "
          f"{result['marker']}, cells {args.cells}")
    print(f"patches {patches}, kept {kept} ({kept / max(patches, 1):.1%}); rejected: "
          + (", ".join(f"{k} {v}" for k, v in rejected.items()) or "none"))
    for variant, m in result["models"].items():  # type: ignore[attr-defined]
        print(f"train ({variant}, patch CNN {m['encoder_training']}): held-out AUC "
              f"{m['heldout_auc']}, training out-of-fold AUC {m['train_oof_auc']} "
              f"({m['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
