"""The synthetic demo study: three cohorts shaped like the cMIL paper's.

``python -m cmil_core demo [--size small|full] [--seed N]`` writes, under the
demo folder (``data/demo`` beside the default store):

* a training centre and external centre A scanned as tiled pyramidal TIFF
  (0.5 um per pixel, JPEG tiles, a resolution OpenSlide reads), one slide per
  patient named ``<patient>_slide1.tiff``;
* external centre B photographed through the microscope: one folder of
  field-of-view JPEGs per patient (``<patient>/fov01.jpg``...) with a manifest
  giving their resolution, as many centres work;
* one clinical CSV per cohort, imported through the same validation as a
  user's table; ground-truth tumour boxes go to ``demo_tumor_regions``.

How the patients are simulated (:func:`simulate_patients`): about 45 % have
marrow metastasis. Every patient has dark clumps on the smear, their expected
number log-normal and the same in both classes; in a metastatic patient a
share of them (30-100 %, the tumour burden) are tumour clumps (small round
blue cells, moulding, rosettes), the rest benign look-alikes as dark as
tumour (lymphoid clusters, erythroid islands, monocytes, smudge cells), which
are all a negative patient's clumps. Each clump's dark nuclear area is drawn
from one log-normal distribution whatever its kind
(:func:`cmil_core.demo._smear.cells_for_dark_area` turns it into cells), and
dispersed single cells or pairs are tumour in metastatic patients (at least
one on every scanned slide) and look-alike cells otherwise: darkness does not
tell metastasis, shape and arrangement do. Look-alike boxes go to
``demo_lookalike_regions``.
Clinical variables follow neuroblastoma's usual associations (metastasis with
INSS stage 4, older age, MYCN amplification; 1p deletion with MYCN; 11q
aberration without it). Overall and event-free survival follow exponential
hazards that rise with tumour burden, MYCN and age over 18 months, with
uniform administrative censoring, so a good cMIL score carries prognostic
signal. Each centre has its own stain vectors (rotated about the grey axis),
stain strength, glass colour, scanner noise and focus, so external validation
is harder than training, as in the paper.

Everything is a deterministic function of ``--seed`` (the same seed gives the
same bytes). The generator resumes: finished slides are kept, a killed run
restarts where it stopped, and a finished demo is not redone. Every file is
written under a temporary name and renamed into place (:mod:`cmil_core._atomic`);
a rerun removes the temporary files a killed run left, and the slide-rendering
worker processes end with the process that started them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from cmil_core import _atomic, store as store_mod
from cmil_core.clinical.cohort_import import import_cohort
from cmil_core.demo import _smear
from cmil_core.errors import InputError
from cmil_core.ingest.pipeline import ingest
from cmil_core.ingest.slides import file_sha256, open_slide
from cmil_core.model.modeling import score, train
from cmil_core.ops.access import cli_user
from cmil_core.progress import Progress, ProgressCallback, no_progress, stage_reporter
from cmil_core.store.model_rules import split_cohorts
from cmil_core.workers import process_pool

__all__ = [
    "DEMO_VERSION",
    "SIZES",
    "DemoCohort",
    "DemoPatient",
    "DemoSize",
    "DemoSummary",
    "default_demo_dir",
    "demo_status",
    "generate_demo",
    "simulate_patients",
]

# Bump when the generator's output changes, so old demo folders are redone.
# 2: the demo also ingests its slides (patches with quality control).
# 3: and trains and scores a model.
# 4: benign look-alikes as dark as tumour in both classes (sized by dark area),
#    dispersed single tumour cells, rotated stain vectors per centre.
# 5: the demo's model trains its patch CNN (train's default, encoder_training
#    "auto": the full demo fine-tunes, the small one is below the auto rule's
#    size and keeps the encoder frozen). The slides are the same as version 4's.
# 6: the final CNN stops early on an inner patient split (FinetuneConfig.final), as the
#    folds' CNNs do; slides and cross-validation as in version 5.
DEMO_VERSION = 6
# Models the demo trains on its training centre, then scores every cohort with.
DEMO_AGGREGATORS: tuple[str, ...] = ("attention",)
_META_KEY = "demo"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is."""

    patients: tuple[int, int, int]  # training, external A, external B
    slide_px: tuple[int, int]  # level-0 width, height of a scanned slide
    fov_count: int  # photographs per patient in external B
    fov_px: tuple[int, int]


SIZES: dict[str, DemoSize] = {
    # About 30 patients: for tests and a first look (well under a minute).
    "small": DemoSize(
        patients=(14, 8, 8), slide_px=(1536, 1536), fov_count=3, fov_px=(960, 720)
    ),
    # The paper's 359 patients.
    "full": DemoSize(
        patients=(189, 94, 76), slide_px=(2048, 2048), fov_count=4, fov_px=(1280, 960)
    ),
}

SLIDE_MPP = 0.5  # scanned at 20x
FOV_MPP = 0.3  # photographed with a 40x objective


@dataclass(frozen=True)
class DemoCohort:
    cohort: str
    role: str
    center: str
    prefix: str
    kind: str  # "wsi" or "fov"
    style: _smear.CenterStyle


COHORTS: tuple[DemoCohort, ...] = (
    DemoCohort(
        "training", "train", "Training centre", "T", "wsi",
        _smear.CenterStyle(name="training", tint=(1.0, 1.0, 1.0), noise_sigma=2.5),
    ),
    # External centres: another stain batch and scanner (stain vectors rotated
    # about the grey axis, stronger or weaker staining, other glass colour).
    DemoCohort(
        "external_a", "validation", "External centre A", "A", "wsi",
        _smear.CenterStyle(
            name="centre A", tint=(1.04, 0.97, 1.0), saturation=1.12, noise_sigma=4.0,
            blur_sigma_um=0.35, vignetting=0.05, frame_um=512.0, background=(243, 238, 226),
            stain_rotation_deg=14.0,
        ),
    ),
    DemoCohort(
        "external_b", "test", "External centre B (microscope photographs)", "B", "fov",
        _smear.CenterStyle(
            name="centre B", tint=(0.97, 0.98, 1.04), saturation=0.88, noise_sigma=5.0,
            blur_sigma_um=0.5, vignetting=0.18, background=(222, 228, 236),
            stain_rotation_deg=-16.0,
        ),
    ),
)


@dataclass(frozen=True)
class DemoPatient:
    patient_id: str
    bm_metastasis: int
    burden: float  # expected number of tumour clumps on a slide
    lookalike_clumps: float  # expected number of benign look-alike clumps on a slide
    dispersed: float  # expected number of dispersed cells or pairs (tumour if metastatic)
    age_months: float
    sex: str
    inss_stage: str
    mycn: str
    del_1p: str
    aberration_11q: str
    os_months: float
    os_event: int
    efs_months: float
    efs_event: int


@dataclass
class DemoSummary:
    db: str
    folder: str
    size: str
    seed: int
    patients: dict[str, int]
    slides: int
    generated: int
    reused: int
    tumour_regions: int
    patches: int = 0
    patches_passed: int = 0
    skipped: bool = False
    details: dict[str, object] = field(default_factory=dict)
    patients_scored: int = 0  # distinct patients with a score of the demo's models


def default_demo_dir(db: str | os.PathLike[str]) -> Path:
    """Where the demo's files go for a store: ``<store folder>/demo``."""
    return store_mod.StoreFolder.of(db).demo


# --------------------------------------------------------------------------
# Patients
# --------------------------------------------------------------------------

def simulate_patients(rng: np.random.Generator, n: int, prefix: str) -> list[DemoPatient]:
    """Clinical variables and outcomes for ``n`` patients (see the module docstring)."""
    out: list[DemoPatient] = []
    for i in range(n):
        met = int(rng.random() < 0.45)
        # Dark clumps per slide: the same distribution in both classes. In a
        # metastatic patient a share of them is tumour (the burden), the rest
        # benign look-alikes; a negative patient's are all look-alikes.
        dark_clumps = float(np.clip(rng.lognormal(mean=math.log(4.0), sigma=0.8), 0.8, 30.0))
        burden = dark_clumps * float(rng.uniform(0.3, 1.0)) if met else 0.0
        lookalike = dark_clumps - burden
        dispersed = float(rng.uniform(2.0, 8.0))
        age = float(np.clip(rng.lognormal(math.log(40 if met else 18), 0.7), 0.5, 180))
        sex = "M" if rng.random() < 0.55 else "F"
        if met:
            stage = "4"
        else:
            stage = str(rng.choice(["1", "2", "3", "4", "4S"], p=[0.25, 0.2, 0.25, 0.15, 0.15]))
        mycn_amp = rng.random() < (0.38 if met else 0.12)
        del_1p = rng.random() < (0.6 if mycn_amp else 0.15)
        ab_11q = (not mycn_amp) and rng.random() < (0.4 if met else 0.2)
        # Exponential hazards (per month); burden enters on a log scale.
        lin = (
            0.9 * met + 0.55 * math.log1p(burden) + 0.8 * mycn_amp
            + 0.45 * (age > 18) + 0.25 * ab_11q
        )
        os_true = rng.exponential(1.0 / (0.006 * math.exp(lin)))
        efs_true = min(os_true, rng.exponential(1.0 / (0.012 * math.exp(lin))))
        follow_up = rng.uniform(12.0, 96.0)
        os_m = min(os_true, follow_up)
        efs_m = min(efs_true, follow_up)
        out.append(
            DemoPatient(
                patient_id=f"{prefix}{i + 1:03d}",
                bm_metastasis=met,
                burden=burden,
                lookalike_clumps=lookalike,
                dispersed=dispersed,
                age_months=round(age, 1),
                sex=sex,
                inss_stage=stage,
                mycn="amplified" if mycn_amp else "non-amplified",
                del_1p="yes" if del_1p else "no",
                aberration_11q="yes" if ab_11q else "no",
                os_months=round(os_m, 2),
                os_event=int(os_true <= follow_up),
                efs_months=round(efs_m, 2),
                efs_event=int(efs_true <= follow_up),
            )
        )
    return out


def _clinical_frame(patients: Sequence[DemoPatient]) -> pd.DataFrame:
    rows = []
    for p in patients:
        rows.append(
            {
                "patient_id": p.patient_id,
                "bm_metastasis": p.bm_metastasis,
                "os_months": p.os_months,
                "os_event": p.os_event,
                "efs_months": p.efs_months,
                "efs_event": p.efs_event,
                "age_months": p.age_months,
                "sex": p.sex,
                "inss_stage": p.inss_stage,
                "mycn": p.mycn,
                "del_1p": p.del_1p,
                "aberration_11q": p.aberration_11q,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# Slides (run in worker processes: pure functions of their arguments)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _SlideJob:
    cohort_index: int
    patient: DemoPatient
    path: str
    kind: str  # "wsi" or "fov"
    width: int
    height: int
    mpp: float
    seed: int
    burden: float  # expected tumour clumps on this image
    lookalike: float  # expected look-alike clumps on this image
    dispersed: float  # expected dispersed single cells or pairs on this image


def _place_clusters(
    rng: np.random.Generator, job: _SlideJob, density: np.ndarray | None
) -> list[_smear.Cluster]:
    width_um, height_um = job.width * job.mpp, job.height * job.mpp
    clusters: list[_smear.Cluster] = []

    def position(margin: float) -> tuple[float, float]:
        for _ in range(50):
            x = rng.uniform(margin, width_um - margin)
            y = rng.uniform(margin, height_um - margin)
            if density is None:
                return x, y
            gy = min(int(y / height_um * density.shape[0]), density.shape[0] - 1)
            gx = min(int(x / width_um * density.shape[1]), density.shape[1] - 1)
            if density[gy, gx] > 0.35:
                return x, y
        return x, y

    met = bool(job.patient.bm_metastasis)
    n_tumour = int(rng.poisson(job.burden)) if job.burden > 0 else 0
    n_look = int(rng.poisson(job.lookalike)) if job.lookalike > 0 else 0
    kinds = ["tumour"] * n_tumour + [
        str(k) for k in rng.choice(_smear.LOOKALIKE_KINDS, size=n_look, p=_LOOKALIKE_MIX)
    ]
    for kind in kinds:
        # Every clump's dark nuclear area comes from one distribution, whatever
        # its kind: darkness says nothing about tumour.
        area = float(np.clip(rng.lognormal(math.log(1200.0), 0.7), 120.0, 6000.0))
        n_cells, radius = _smear.cells_for_dark_area(kind, area)
        radius *= float(rng.uniform(0.95, 1.1))
        x, y = position(radius + 5)
        clusters.append(_smear.Cluster(x, y, radius, kind, n_cells))
    # Dispersed single cells and pairs: tumour cells in a metastatic patient
    # (every metastatic slide shows some), look-alike cells otherwise.
    n_single = int(rng.poisson(job.dispersed))
    if met and job.kind == "wsi":
        n_single = max(n_single, 1)
    for _ in range(n_single):
        kind = "tumour" if met else str(rng.choice(("lymphoid", "erythroid", "smudge")))
        n_cells = int(rng.integers(1, 3))
        _, radius = _smear.cells_for_dark_area(kind, n_cells * 40.0)
        x, y = position(radius + 5)
        clusters.append(_smear.Cluster(x, y, radius, kind, n_cells))
    return clusters


# Look-alike kinds, in _smear.LOOKALIKE_KINDS order: lymphoid, erythroid, monocytic, smudge.
_LOOKALIKE_MIX = (0.3, 0.3, 0.2, 0.2)

Boxes = list[tuple[int, int, int, int]]
LookalikeBoxes = list[tuple[str, int, int, int, int]]


def _render(job: _SlideJob, style: _smear.CenterStyle) -> tuple[np.ndarray, Boxes, LookalikeBoxes]:
    rng = np.random.default_rng(job.seed)
    width_um, height_um = job.width * job.mpp, job.height * job.mpp
    density = (
        _smear.smear_density_map(width_um, height_um, rng) if job.kind == "wsi" else None
    )
    clusters = _place_clusters(rng, job, density)
    render_seed = int(rng.integers(2**31))
    image = np.empty((job.height, job.width, 3), dtype=np.uint8)
    tile = 1024
    for y0 in range(0, job.height, tile):
        for x0 in range(0, job.width, tile):
            w, h = min(tile, job.width - x0), min(tile, job.height - y0)
            image[y0 : y0 + h, x0 : x0 + w] = _smear.render_field(
                w, h, mpp=job.mpp, seed=render_seed, style=style, clusters=clusters,
                smear_density=density, origin_um=(x0 * job.mpp, y0 * job.mpp),
                slide_size_um=(width_um, height_um),
            )
    size = (job.width, job.height)
    return (image, _smear.tumour_boxes(clusters, job.mpp, image_size=size),
            _smear.lookalike_boxes(clusters, job.mpp, image_size=size))


def _write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float) -> None:
    """Tiled pyramidal TIFF (JPEG tiles, resolution tags) that OpenSlide opens."""
    per_cm = 10_000.0 / mpp
    with tifffile.TiffWriter(path) as tif:
        level = image
        first = True
        while True:
            tif.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subfiletype=0 if first else 1,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                software="cmil_core demo",
                metadata=None,
            )
            first = False
            if max(level.shape[:2]) <= 512:
                break
            level = _half_size(level)
            per_cm /= 2.0


def _half_size(image: np.ndarray) -> np.ndarray:
    """The mean of each 2 x 2 block, rounded half to even (an odd last row or column is dropped).

    Sums four strided views in float32, which holds these sums exactly: the
    same numbers as ``reshape(...).mean(axis=(1, 3)).round()``, 4-6 times faster
    (the pyramid of a 2048-px demo slide spent a quarter of its time in that mean).
    """
    h2, w2 = image.shape[0] // 2, image.shape[1] // 2
    block = image[: h2 * 2, : w2 * 2].astype(np.float32)
    total: np.ndarray = block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2]
    total += block[1::2, 1::2]
    return np.rint(total * np.float32(0.25)).astype(np.uint8)


def _make_slide(job: _SlideJob) -> tuple[str, Boxes, LookalikeBoxes]:
    """Render and write one slide file atomically; returns its path, tumour and look-alike boxes."""
    style = COHORTS[job.cohort_index].style
    image, boxes, lookalikes = _render(job, style)
    with _atomic.replacing(job.path) as tmp:
        if job.kind == "wsi":
            _write_pyramid_tiff(tmp, image, job.mpp)
        else:
            Image.fromarray(image).save(tmp, format="JPEG", quality=92)
    return job.path, boxes, lookalikes


# --------------------------------------------------------------------------
# The whole demo
# --------------------------------------------------------------------------

def _slide_jobs(
    folder: Path, size: DemoSize, seed: int, patients: dict[str, list[DemoPatient]]
) -> list[_SlideJob]:
    jobs: list[_SlideJob] = []
    for ci, cohort in enumerate(COHORTS):
        for pi, patient in enumerate(patients[cohort.cohort]):
            base = np.random.SeedSequence([seed, 1, ci, pi])
            if cohort.kind == "wsi":
                w, h = size.slide_px
                jobs.append(
                    _SlideJob(
                        ci, patient,
                        str(folder / cohort.cohort / f"{patient.patient_id}_slide1.tiff"),
                        "wsi", w, h, SLIDE_MPP, int(base.generate_state(1)[0]),
                        patient.burden, patient.lookalike_clumps, patient.dispersed,
                    )
                )
            else:
                w, h = size.fov_px
                # Photographs sample the smear: spread the burden over them, and
                # scale it by the area of a photograph relative to a scanned slide.
                area = (w * FOV_MPP * h * FOV_MPP) / (
                    size.slide_px[0] * SLIDE_MPP * size.slide_px[1] * SLIDE_MPP
                )
                states = base.generate_state(size.fov_count)
                for k in range(size.fov_count):
                    jobs.append(
                        _SlideJob(
                            ci, patient,
                            str(folder / cohort.cohort / patient.patient_id
                                / f"fov{k + 1:02d}.jpg"),
                            "fov", w, h, FOV_MPP, int(states[k]),
                            patient.burden * area * 4.0, patient.lookalike_clumps * area * 4.0,
                            patient.dispersed * area * 4.0,
                        )
                    )
    return jobs


def demo_status(store: store_mod.Store) -> dict[str, object] | None:
    """What demo a store holds: ``{"size", "seed", "version", "complete", ...}``, or None."""
    raw = store_mod.get_meta(store, _META_KEY)
    return None if raw is None else dict(json.loads(raw))


def _prepare_folder(folder: Path, stamp: dict[str, object]) -> None:
    """Make ``folder`` hold only files of this demo (size, seed, version)."""
    stamp_file = folder / "demo.json"
    if folder.exists():
        try:
            old = json.loads(stamp_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != stamp:
            for cohort in COHORTS:
                shutil.rmtree(folder / cohort.cohort, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic.remove_stale(folder, recursive=True)  # leftovers of a killed run
    _atomic.write_text(stamp_file, json.dumps(stamp, indent=2))


def generate_demo(
    db: str | os.PathLike[str] | None = None,
    *,
    size: str = "small",
    seed: int = 0,
    folder: str | os.PathLike[str] | None = None,
    progress: ProgressCallback = no_progress,
    workers: int | None = None,
    force: bool = False,
    who: str | None = None,
    via: str = "cli",
) -> DemoSummary:
    """Generate the demo study into the store ``db`` (default store when None).

    Stages, reported to ``progress``: clinical tables, slides, patches (the
    same ``ingest`` a user runs, with each cohort's manifest), training (the
    same ``train`` with its defaults, on the training centre: the patch CNN is
    trained inside each cross-validation fold on the full demo; the small
    demo's 14 training patients are below ``train``'s auto rule, so its
    encoder stays frozen) and scoring of every cohort. A
    store that
    already holds the same finished demo is left as it is (``skipped``),
    unless ``force``.

    A finished build is one row of the audit trail (action ``demo``, by
    ``who``, default the operating-system user; ``via`` says from where:
    ``cli``, ``dashboard`` or ``run.sh``); a skipped one adds none.
    """
    if size not in SIZES:
        raise InputError(f"--size {size!r} is not one of {', '.join(SIZES)}")
    if seed < 0:
        raise InputError(f"--seed {seed} must be a non-negative integer")
    spec = SIZES[size]
    db_path = Path(db) if db is not None else store_mod.default_db_path()
    out_dir = Path(folder) if folder is not None else default_demo_dir(db_path)
    stamp: dict[str, object] = {"size": size, "seed": seed, "version": DEMO_VERSION}
    stages = 5

    with store_mod.open_store(db_path) as store:
        status = demo_status(store)
        if (
            not force
            and status is not None
            and status.get("complete")
            and all(status.get(k) == v for k, v in stamp.items())
        ):
            counts = store_mod.table_counts(store)
            return DemoSummary(
                str(db_path), str(out_dir), size, seed, {}, counts["slides"], 0,
                counts["slides"], counts["demo_tumor_regions"], *_patch_totals(store),
                skipped=True, patients_scored=_patients_scored(store),
            )
        if status is not None and any(status.get(k) != v for k, v in stamp.items()):
            # Another demo (size or seed) lives here: remove its models and cohorts first.
            demo_cohorts = {c.cohort for c in COHORTS}
            for row in store_mod.list_models(store).itertuples():
                if set(split_cohorts(row.train_cohorts)) & demo_cohorts:
                    store_mod.delete_model(store, row.model_id)
            for cohort in COHORTS:
                store_mod.delete_cohort(store, cohort.cohort)
        store_mod.set_meta(store, _META_KEY, json.dumps({**stamp, "complete": False}))
        _prepare_folder(out_dir, stamp)

        # Stage 1: clinical tables, imported through the user's validation path.
        report = stage_reporter(progress, stage="clinical tables", index=1, stages=stages)
        patients: dict[str, list[DemoPatient]] = {}
        for ci, cohort in enumerate(COHORTS):
            report(ci, len(COHORTS), cohort.cohort)
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0, ci]))
            patients[cohort.cohort] = simulate_patients(rng, spec.patients[ci], cohort.prefix)
            csv_path = out_dir / f"{cohort.cohort}_clinical.csv"
            with _atomic.replacing(csv_path) as tmp:
                _clinical_frame(patients[cohort.cohort]).to_csv(tmp, index=False)
            import_cohort(
                store, cohort.cohort, csv_path, role=cohort.role, center=cohort.center,
                replace=True,
            )
        report(len(COHORTS), len(COHORTS), "imported")

        # Stage 2: slides, rendered in worker processes, registered here.
        jobs = _slide_jobs(out_dir, spec, seed, patients)
        _write_manifests(out_dir, jobs)
        report = stage_reporter(progress, stage="slides", index=2, stages=stages)
        registered = {
            s.path: s for s in store_mod.list_slides(store) if s.cohort in patients
        }
        todo: list[_SlideJob] = []
        reused = 0
        for job in jobs:
            known = registered.get(job.path)
            if known is not None and Path(job.path).exists() and known.sha256 is not None:
                reused += 1
            else:
                todo.append(job)
        done = reused
        report(done, len(jobs), "resuming" if reused else "")
        n_boxes = 0
        for path, boxes, lookalikes in _run_jobs(todo, workers):
            job = next(j for j in todo if j.path == path)
            _register_demo_slide(store, job, boxes, lookalikes)
            n_boxes += len(boxes)
            done += 1
            report(done, len(jobs), Path(path).name)
        # Stage 3: patches, through the same ingest a user runs.
        offset = 0

        def patch_progress(event: Progress) -> None:
            progress(Progress("patches", 3, stages, offset + event.done, len(jobs), event.message))

        for cohort in COHORTS:
            ingest(
                store, cohort.cohort, out_dir / cohort.cohort,
                manifest=out_dir / f"{cohort.cohort}_manifest.csv", progress=patch_progress,
            )
            offset += sum(1 for j in jobs if COHORTS[j.cohort_index] is cohort)
        # Stages 4 and 5: train on the training centre, score every cohort.
        models = store_mod.list_models(store)
        trained = {
            row.aggregator: row.model_id for row in models.itertuples()
            if split_cohorts(row.train_cohorts) == (COHORTS[0].cohort,)
        }
        patch_cnn: dict[str, str] = {}
        for aggregator in DEMO_AGGREGATORS:
            model_id = trained.get(aggregator)
            if model_id is None:
                model_id = train(
                    store, COHORTS[0].cohort, aggregator=aggregator, seed=seed,
                    progress=_as_stage(progress, "training", 4, stages),
                )
            score(store, model_id, progress=_as_stage(progress, "scoring", 5, stages))
            row = store_mod.get_model(store, model_id)
            metrics = row.metrics if row is not None else {}
            patch_cnn[model_id] = " ".join(
                [str(metrics.get("encoder_training", "frozen"))]
                + ([f"({metrics['encoder_training_note']})"]
                   if metrics.get("encoder_training_note") else []))
        _atomic.remove_stale(out_dir, recursive=True)
        store_mod.set_meta(
            store, _META_KEY,
            json.dumps(
                {**stamp, "complete": True,
                 "completed_at": datetime.now(UTC).isoformat(timespec="seconds")}
            ),
        )
        counts = store_mod.table_counts(store)
        totals = _patch_totals(store)
        scored = _patients_scored(store)
        store_mod.record_audit(
            store, who or cli_user(), "demo",
            details={"size": size, "seed": seed, "patients": sum(len(p) for p in patients.values()),
                     "slides": len(jobs), "patients_scored": scored, "via": via},
        )
    return DemoSummary(
        str(db_path), str(out_dir), size, seed,
        {c: len(p) for c, p in patients.items()}, len(jobs), len(todo), reused,
        counts["demo_tumor_regions"], *totals, patients_scored=scored,
        details={"patch_cnn": patch_cnn},
    )


def _patients_scored(store: store_mod.Store) -> int:
    """Distinct patients of the demo's cohorts scored by any of its models."""
    counts = store_mod.model_score_counts(store)
    demo = {c.cohort for c in COHORTS}
    counts = counts[counts["cohort"].isin(demo)]
    return int(counts.groupby("cohort")["patients"].max().sum()) if len(counts) else 0


def _as_stage(progress: ProgressCallback, name: str, index: int, stages: int) -> ProgressCallback:
    """Show a sub-job's events as stage ``index`` of the demo."""

    def forward(event: Progress) -> None:
        progress(Progress(f"{name} ({event.stage})", index, stages, event.done, event.total,
                          event.message))

    return forward


def _patch_totals(store: store_mod.Store) -> tuple[int, int]:
    overview = store_mod.cohort_overview(store)
    return int(overview["patches"].sum()), int(overview["patches_passed"].sum())


def _run_jobs(todo: list[_SlideJob], workers: int | None):  # type: ignore[no-untyped-def]
    """Yield (path, tumour boxes, look-alike boxes) as slides finish, in worker processes."""
    n = workers if workers is not None else min(2, os.cpu_count() or 1)
    if n <= 1 or len(todo) < 4:
        for job in todo:
            yield _make_slide(job)
        return
    with process_pool(n) as pool:  # spawned: the dashboard process has threads
        yield from pool.map(_make_slide, todo, chunksize=1)


def _register_demo_slide(
    store: store_mod.Store, job: _SlideJob, boxes: Boxes, lookalikes: LookalikeBoxes
) -> None:
    cohort = COHORTS[job.cohort_index]
    with open_slide(job.path, mpp=job.mpp if job.kind == "fov" else None) as slide:
        store_mod.register_slide(
            store,
            cohort=cohort.cohort,
            patient_id=job.patient.patient_id,
            path=job.path,
            sha256=file_sha256(job.path),
            kind=slide.kind,
            width=slide.width,
            height=slide.height,
            mpp=slide.mpp,
            size_bytes=Path(job.path).stat().st_size,
            tumor_regions=boxes,
            lookalike_regions=lookalikes,
        )


def _write_manifests(folder: Path, jobs: Sequence[_SlideJob]) -> None:
    """A manifest per cohort (slide_path, patient_id, mpp), as a user would give ``ingest``."""
    for ci, cohort in enumerate(COHORTS):
        rows = [
            {
                "slide_path": str(Path(j.path).relative_to(folder / cohort.cohort)),
                "patient_id": j.patient.patient_id,
                "mpp": j.mpp,
            }
            for j in jobs
            if j.cohort_index == ci
        ]
        with _atomic.replacing(folder / f"{cohort.cohort}_manifest.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def summary_dict(summary: DemoSummary) -> dict[str, object]:
    """The summary as plain data (for JSON output)."""
    return asdict(summary)
