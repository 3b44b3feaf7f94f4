"""Small stores for the quality-control tests: patches with chosen metrics, or a tiny
photographed study ingested, trained and scored for real (seconds, not the demo's minute)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cmil_core import store
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.ingest.quality import METRIC_COLUMNS, QC_RULES, QCThresholds, qc_decision


def _good() -> dict[str, float]:
    """Metrics that pass every rule of QC_RULES under the default thresholds, well inside."""
    t = QCThresholds()
    bounds: dict[str, list[float]] = {}
    for rule in QC_RULES:
        for column, op, name in rule.conditions:
            low, high = bounds.setdefault(column, [-math.inf, math.inf])
            limit = float(getattr(t, name))
            bounds[column] = [max(low, limit), high] if op == ">=" else [low, min(high, limit)]
    out = dict.fromkeys(METRIC_COLUMNS, 0.5)
    for column, (low, high) in bounds.items():
        if math.isfinite(low) and math.isfinite(high):
            out[column] = (low + high) / 2
        elif math.isfinite(low):
            out[column] = low * 4 + 1
        else:
            out[column] = high / 2
    return out


#: The blur rule's metric and threshold (names kept out of the tests: metrics evolve).
BLUR_COLUMN, _, BLUR_THRESHOLD = next(r for r in QC_RULES if r.reason == "blurred").conditions[0]
BLUR_LIMIT = float(getattr(QCThresholds(), BLUR_THRESHOLD))
GOOD = _good()
BLURRED = {**GOOD, BLUR_COLUMN: BLUR_LIMIT / 4}


def blur(factor: float) -> dict[str, float]:
    """GOOD metrics with the blur metric at ``factor`` times the default threshold."""
    return {**GOOD, BLUR_COLUMN: BLUR_LIMIT * factor}
TILING = {"config": {"patch_um": 112.0, "overlap": 0.0, "output_px": 224},
          "metrics_version": 1}


def patch_table(metrics: list[dict[str, float]]) -> pd.DataFrame:
    """A slide's patch rows (store.PATCH_COLUMNS), judged by quality.qc_decision."""
    frame = pd.DataFrame(metrics)
    n = len(frame)
    frame["g_col"] = np.arange(n)
    frame["g_row"] = 0
    frame["x"] = np.arange(n) * 224
    frame["y"] = 0
    frame["size"] = 224
    frame["foreground_fraction"] = 1.0
    passed, reasons = qc_decision(frame, QCThresholds(), thick_fraction=frame["thick_fraction"])
    frame["qc_pass"] = passed
    frame["qc_reason"] = reasons
    return frame[list(store.PATCH_COLUMNS)]


def cohort_with_patches(db: Path, tmp: Path, cohort: str,
                        patients: dict[str, tuple[int | None, list[dict[str, float]]]],
                        tiling: dict[str, Any] | None = None, role: str = "train") -> None:
    """Import a cohort and give each patient one slide with these patches' metrics."""
    csv = tmp / f"{cohort}.csv"
    csv.write_text("patient_id,bm_metastasis\n" + "".join(
        f"{p},{'' if y is None else y}\n" for p, (y, _) in patients.items()))
    import_cohort(db, cohort, csv, role=role)
    with store.open_store(db) as st:
        for p, (_, metrics) in patients.items():
            sid = store.register_slide(st, cohort=cohort, patient_id=p,
                                       path=f"/slides/{cohort}/{p}.tiff", sha256=None,
                                       kind="tiff", width=1000, height=1000, mpp=0.5,
                                       size_bytes=1)
            store.write_slide_patches(st, sid, patch_table(metrics), tiling_key="k",
                                      tiling=tiling or TILING, run_id=None)


# --------------------------------------------------------------------------- a real tiny study


def _field(rng: np.random.Generator, positive: bool, side: int = 448) -> np.ndarray:
    """A 448 px 'photograph' at 0.5 um/px: pink red cells on pale glass, violet nuclei in
    some 112 px cells, one cell of bare glass and one defocused cell."""
    img = np.empty((side, side, 3), np.float32)
    img[:] = (226, 206, 214)
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(220):  # red cells
        cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(7, 10)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[disc] = (205, 120, 140)
    cells = [(i, j) for i in range(4) for j in range(4)]
    nucleated = cells[: (11 if positive else 8)]
    for i, j in nucleated:
        for _ in range(3):
            cx = j * 112 + rng.uniform(20, 92)
            cy = i * 112 + rng.uniform(20, 92)
            r = rng.uniform(6, 9)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[disc] = (95, 60, 150)
    img += rng.normal(0, 6, img.shape)
    img[336:448, 336:448] = (244, 244, 246)  # bare glass
    img = np.clip(img, 0, 255).astype(np.uint8)
    out = Image.fromarray(img)
    blurred = out.crop((224, 336, 336, 448)).resize((14, 14)).resize((112, 112),
                                                                       Image.Resampling.BILINEAR)
    out.paste(blurred, (224, 336))
    return np.asarray(out)


def photo_cohort(db: Path, folder: Path, cohort: str, patients: int, *, seed: int,
                 role: str = "validation") -> Path:
    """Import a cohort (half of it positive) and write one photographed field per patient;
    returns the folder of its slides (0.5 um/px, to ingest with ``--mpp 0.5``)."""
    rng = np.random.default_rng(seed)
    ids = [f"{cohort}{k:02d}" for k in range(patients)]
    csv = folder / f"{cohort}.csv"
    csv.write_text("patient_id,bm_metastasis,os_months,os_event\n" + "".join(
        f"{p},{k % 2},{10 + k},{k % 2}\n" for k, p in enumerate(ids)))
    import_cohort(db, cohort, csv, role=role)
    slides = folder / "slides" / cohort
    slides.mkdir(parents=True, exist_ok=True)
    for k, p in enumerate(ids):
        Image.fromarray(_field(rng, positive=k % 2 == 1)).save(slides / f"{p}_field.png")
    return slides


def photo_study(folder: Path, *, patients: int = 6, train: bool = True,
                cohorts: tuple[str, ...] = ("A", "B")) -> tuple[Path, str | None]:
    """Cohorts of photographed fields (one per patient, half of them positive), ingested;
    with ``train``, a model trained on the first cohort (2 folds, a few epochs) and every
    cohort scored. Returns the store and the model id."""
    from cmil_core.ingest.pipeline import ingest
    from cmil_core.ingest.tiling_config import TilingConfig
    from cmil_core.model import modeling

    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "cmil.duckdb"
    for index, cohort in enumerate(cohorts):
        slides = photo_cohort(db, folder, cohort, patients, seed=7 + index,
                              role="train" if index == 0 else "validation")
        ingest(db, cohort, slides, mpp=0.5, config=TilingConfig(patch_um=56.0), who="tester")
    model_id = None
    if train:
        model_id = modeling.train(db, cohorts[0], aggregator="attention", folds=2, seed=0,
                                  params={"max_epochs": 3, "patience": 2})
        modeling.score(db, model_id)
    return db, model_id
