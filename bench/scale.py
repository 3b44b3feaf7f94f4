"""The paper's scale stays interactive: 359 patients, 1,384,007 patches, in one run.

Run: ``.venv/bin/python bench/scale.py [--dir DIR] [--reuse] [--json]``

Builds a results store shaped like the cMIL study's (three cohorts, a training
centre and two external centres, 359 patients, 2 to 6 slides each, 1,384,007
patches that passed quality control plus about 10% rejected ones, all with
their quality metrics; patch scores of two models, an attention model and a
histogram model; patient scores; model rows with their config.json) through
the store functions the pipeline itself calls (``register_slide`` per slide,
``write_slide_patches`` per slide, ``write_scores`` per cohort and model),
then measures:

* ``load_seconds``: writing every patch row and every patch score (the
  ``write_slide_patches`` and ``write_scores`` calls, and closing the store,
  which folds the write-ahead log into the file). Naive: rows inserted
  one by one (``executemany`` of an ``INSERT ... VALUES``, in one transaction)
  for a sample, extrapolated to the same rows.
* ``topk_p95_ms``: 95th percentile, over 200 random patients, of
  :func:`cmil_core.viewer.patients.attention_patches` (the Patients page's gallery
  query) with ``k=32`` by attention: top (and bottom) patches with
  coordinates. Naive: the top 32 by a plain join of the patch, score and slide
  tables filtered by cohort and patient, as a full scan (an unindexed store:
  DuckDB's join filters, which turn the slides' ids into row-group ranges,
  switched off), on 20 of those patients; the plain join with them on is
  printed too.
* ``roc_ms``: :func:`cmil_core.outputs.evaluation.roc_curves` with ``band=True`` (ROC,
  DeLong CI and the 2,000-resample stratified-bootstrap band) for every cohort
  of the attention model; median of 3. Naive: the bootstrap band as a Python
  loop (sklearn ``roc_curve`` per resample) and the DeLong variance from the
  placement matrix.
* ``page_max_s``: in a separate process (AppTest, as tests/test_app.py), every
  page once cold, then every page again ("warm"), then opening a patient not
  opened before through ``?patient=``, changing the model in the sidebar with
  that patient open, and the Discrimination page under that other model; the
  slowest of the warm pages and of those three steps. Ratio: to the warm
  Report page (no store read) of the same run.
* ``rss_mb``: that process's peak resident memory (``VmHWM``); beside it
  the same figure after its imports, before any page ran.

The slides are one pyramidal TIFF (a rendered smear field repeated over
8,960 x 8,960 pixels) hard-linked under a distinct path per slide: pixels are
not the point, but thumbnails, heatmaps and patch galleries read real files.
The store is built in ``--dir`` (default: ``<tmp>/cmil-scale``);
``--reuse`` keeps a complete earlier build there (same seed and sizes) and
takes its load figures from ``build.json``, so that reruns take a minute.

Prints a table, then as its last line one JSON object with ``load_seconds,
topk_p95_ms, roc_ms, page_max_s, rss_mb, patches`` and more;
``--json`` prints only that line. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmil_core import store as store_mod  # noqa: E402
from cmil_core.ingest.quality import QC_REASONS  # noqa: E402

# The study's numbers.
PASSED_PATCHES = 1_384_007
COHORTS = (  # name, role, centre, patients: 359 in all
    ("training", "train", "Centre T", 179),
    ("external_a", "validation", "Centre A", 96),
    ("external_b", "test", "Centre B", 84),
)
REJECTED_SHARE = 0.10  # rejected patches per passed patch (they carry metrics too)
SLIDES_PER_PATIENT = (2, 6)  # inclusive
PATCH_PX = 224  # level-0 pixels
GRID = 40  # cells per side: slides are 8,960 px square
MPP = 0.25
TOPK = 32
TOPK_PATIENTS = 200
NAIVE_TOPK_PATIENTS = 20
ATTENTION_MODEL = "scale-attention"
HISTOGRAM_MODEL = "scale-histogram"
TARGETS = {"load_seconds": 10.0, "topk_p95_ms": 20.0, "roc_ms": 300.0, "page_max_s": 2.0,
           "rss_mb": 2048.0}
BUILD_VERSION = 3  # bump when the built store's content changes
MARKER = ".cmil-scale-bench"  # a folder with it may be emptied by the next build

PAGES = (
    ("Study overview", "pages/overview.py"),
    ("Cohorts", "pages/cohorts.py"),
    ("Discrimination", "pages/discrimination.py"),
    ("Survival", "pages/survival.py"),
    ("Patients", "pages/patients.py"),
    ("Report", "pages/report.py"),
    ("Models", "pages/models.py"),
    ("Audit trail", "pages/audit.py"),  # editors only; skipped where the app hides it
)
BASELINE_PAGE = "Report"


def log(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class SlidePlan:
    cohort: str
    patient_id: str
    index: int  # within the patient
    passed: int
    rejected: int


def plan_study(seed: int) -> tuple[pd.DataFrame, list[SlidePlan]]:
    """Patients (clinical table) and slides with their patch counts; exact study totals."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, _role, _centre, n in COHORTS:
        prefix = name[0].upper() if name == "training" else name[-1].upper()
        label = (rng.random(n) < 0.5).astype(int)
        burden = np.where(label == 1, rng.gamma(2.0, 1.0, n), 0.0)
        hazard = 0.01 * np.exp(0.5 * burden)
        death = rng.exponential(1.0 / hazard)
        censor = rng.uniform(12, 96, n)
        for i in range(n):
            rows.append({
                "cohort": name, "patient_id": f"{prefix}{i + 1:03d}",
                "bm_metastasis": int(label[i]),
                "os_months": float(round(min(death[i], censor[i]), 1)),
                "os_event": int(death[i] <= censor[i]),
                "efs_months": float(round(min(death[i], censor[i]) * 0.8, 1)),
                "efs_event": int(death[i] <= censor[i]),
                "age_months": int(rng.integers(2, 120)),
                "sex": str(rng.choice(["F", "M"])),
                "inss_stage": str(rng.choice(["2", "3", "4", "4S"], p=[0.15, 0.2, 0.6, 0.05])),
                "mycn": str(rng.choice(["amplified", "non-amplified"], p=[0.3, 0.7])),
                "burden": float(burden[i]),
            })
    patients = pd.DataFrame(rows)
    n_slides = rng.integers(SLIDES_PER_PATIENT[0], SLIDES_PER_PATIENT[1] + 1, len(patients))
    weights = rng.uniform(0.6, 1.4, int(n_slides.sum()))
    share = weights / weights.sum() * PASSED_PATCHES
    passed = np.floor(share).astype(int)
    passed[np.argsort(share - passed)[::-1][: PASSED_PATCHES - passed.sum()]] += 1
    rejected = rng.binomial(passed, REJECTED_SHARE)
    assert passed.sum() == PASSED_PATCHES and (passed + rejected).max() <= GRID * GRID
    plans, k = [], 0
    for p, count in zip(patients.itertuples(), n_slides):
        for j in range(int(count)):
            plans.append(SlidePlan(p.cohort, p.patient_id, j, int(passed[k]), int(rejected[k])))
            k += 1
    return patients, plans


def patch_table(plan: SlidePlan, rng: np.random.Generator) -> pd.DataFrame:
    """One slide's patch rows as the tiler returns them (PATCH_COLUMNS, grid order)."""
    n = plan.passed + plan.rejected
    cells = np.sort(rng.choice(GRID * GRID, n, replace=False))
    g_row, g_col = cells // GRID, cells % GRID
    qc_pass = np.zeros(n, dtype=bool)
    qc_pass[rng.choice(n, plan.passed, replace=False)] = True
    reasons = np.array(QC_REASONS, dtype=object)[rng.integers(0, len(QC_REASONS), n)]
    reasons[qc_pass] = None
    background = np.where(qc_pass, rng.uniform(0.0, 0.5, n), rng.uniform(0.3, 1.0, n))
    return pd.DataFrame({
        "g_col": g_col.astype(np.int32), "g_row": g_row.astype(np.int32),
        "x": (g_col * PATCH_PX).astype(np.int32), "y": (g_row * PATCH_PX).astype(np.int32),
        "size": np.full(n, PATCH_PX, dtype=np.int32), "qc_pass": qc_pass, "qc_reason": reasons,
        "foreground_fraction": 1.0 - background, "thick_fraction": rng.uniform(0, 0.3, n),
        "background_fraction": background, "mean_intensity": rng.normal(180, 15, n),
        "dark_fraction": rng.uniform(0, 0.1, n), "bright_fraction": rng.uniform(0, 0.2, n),
        "blur_variance": rng.lognormal(5, 0.5, n), "nuclei_fraction": rng.uniform(0, 0.2, n),
        "nuclear_area_um2": rng.uniform(0, 500, n),
    })


def write_slide_file(path: Path, seed: int) -> None:
    """One pyramidal TIFF of GRID * PATCH_PX pixels square: a smear field repeated."""
    from cmil_core.demo import _smear, generator as demo

    side = GRID * PATCH_PX
    field = _smear.render_field(1120, 1120, mpp=MPP, seed=seed,
                                style=demo.COHORTS[0].style)
    image = np.tile(field, (side // 1120, side // 1120, 1))
    tmp = path.with_suffix(".part")
    demo._write_pyramid_tiff(tmp, image, MPP)
    os.replace(tmp, path)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _softmax_by_group(raw: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Softmax of ``raw`` within runs of equal ``groups`` (sorted)."""
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    peak = np.maximum.reduceat(raw, starts)
    sizes = np.diff(np.r_[starts, raw.size])
    e = np.exp(raw - np.repeat(peak, sizes))
    return e / np.repeat(np.add.reduceat(e, starts), sizes)


def build(folder: Path, seed: int, quiet: bool) -> dict[str, Any]:
    """Build the store in ``folder``; returns the build's timings and counts."""
    from cmil_core.ingest.slides import file_sha256
    from cmil_core.store import ModelRow, PatientRow

    if folder.exists():
        if any(folder.iterdir()) and not (folder / MARKER).exists():
            raise SystemExit(f"{folder} holds files this benchmark did not make: "
                             "give --dir an empty or new folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("built by bench/scale.py; removed by its next build\n")
    db = folder / "cmil.duckdb"
    patients, plans = plan_study(seed)
    log(f"building {len(patients)} patients, {len(plans)} slides, "
        f"{sum(p.passed + p.rejected for p in plans):,} patch rows in {folder}", quiet)

    t0 = time.perf_counter()
    master = folder / "slide.tiff"
    write_slide_file(master, seed)
    sha = file_sha256(master)
    size_bytes = master.stat().st_size
    t_file = time.perf_counter() - t0

    rng = np.random.default_rng(seed + 1)
    tables = [patch_table(p, rng) for p in plans]
    timings: dict[str, float] = {"slide_file": t_file}
    clinical_cols = ["age_months", "sex", "inss_stage", "mycn"]
    with store_mod.open_store(db) as st:
        t0 = time.perf_counter()
        for name, role, centre, _n in COHORTS:
            part = patients[patients["cohort"] == name]
            rows = [PatientRow(r.patient_id, r.bm_metastasis, r.os_months, r.os_event,
                               r.efs_months, r.efs_event,
                               {c: getattr(r, c) for c in clinical_cols})
                    for r in part.itertuples()]
            store_mod.import_patients(st, name, rows, role=role, center=centre)
        slide_ids = []
        for plan in plans:
            path = folder / "slides" / plan.cohort / plan.patient_id / (
                f"{plan.patient_id}_{plan.index + 1}.tiff")
            _link(master, path)
            slide_ids.append(store_mod.register_slide(
                st, cohort=plan.cohort, patient_id=plan.patient_id, path=str(path), sha256=sha,
                kind="tiff", width=GRID * PATCH_PX, height=GRID * PATCH_PX, mpp=MPP,
                size_bytes=size_bytes))
        timings["register"] = time.perf_counter() - t0
        log(f"registered in {timings['register']:.1f} s; writing patches", quiet)

        runs = {name: store_mod.start_ingest_run(
            st, name, source=str(folder / "slides" / name), manifest=None,
            config={"patch_um": PATCH_PX * MPP, "bench": "scale"}) for name, *_ in COHORTS}
        t0, c0 = time.perf_counter(), time.process_time()
        for plan, slide_id, table in zip(plans, slide_ids, tables):
            store_mod.write_slide_patches(
                st, slide_id, table, tiling_key="scale", tiling={"patch_px": PATCH_PX},
                run_id=runs[plan.cohort])
        timings["write_slide_patches"] = time.perf_counter() - t0
        cpu = time.process_time() - c0
        for run_id in runs.values():
            store_mod.finish_ingest_run(st, run_id, "done", {"bench": "scale"})
        log(f"patches written in {timings['write_slide_patches']:.1f} s; writing scores", quiet)

        # Patch ids as the store assigns them: slide_id * PATCH_ID_BASE + row in grid order.
        ids = np.concatenate([
            sid * store_mod.PATCH_ID_BASE + np.flatnonzero(t["qc_pass"].to_numpy())
            for sid, t in zip(slide_ids, tables)])
        owners = np.concatenate([
            np.full(int(t["qc_pass"].sum()), i) for i, t in enumerate(tables)])
        patient_of_slide = np.array([f"{p.cohort}/{p.patient_id}" for p in plans])
        patient_key = patient_of_slide[owners]
        slide_cohort = np.array([p.cohort for p in plans])[owners]
        burden = patients.set_index(patients["cohort"] + "/" + patients["patient_id"])["burden"]
        label = patients.set_index(patients["cohort"] + "/" + patients["patient_id"])[
            "bm_metastasis"]

        score_seconds = 0.0
        # The attention model is the newer one: the sidebar's default.
        models = ((HISTOGRAM_MODEL, "histogram", 0.7, 1), (ATTENTION_MODEL, "attention", 0.9, 2))
        training = (patients["cohort"] == COHORTS[0][0]).to_numpy()
        for model_id, aggregator, signal, day in models:
            mrng = np.random.default_rng(seed + len(model_id))
            noise = mrng.normal(0, 1, len(patients))
            keys = (patients["cohort"] + "/" + patients["patient_id"]).to_numpy()
            logit = signal * 2.2 * (label.loc[keys].to_numpy() - 0.5) + noise
            score = 1.0 / (1.0 + np.exp(-logit))
            cutoff = 0.5
            folder_m = folder / "models" / model_id
            folder_m.mkdir(parents=True)
            config = {"aggregator": aggregator, "encoder": {"name": "resnet18", "input_px": 224},
                      "cutoff": cutoff, "seed": seed, "bench": "scale"}
            (folder_m / "config.json").write_text(json.dumps(config, indent=2))
            store_mod.add_model(st, ModelRow(
                model_id, datetime(2026, 1, day), aggregator, "resnet18", COHORTS[0][0], config,
                {"cv_auc": 0.9, "cv_fold_aucs": [0.9] * 5, "cv_k": 5,
                 "n_train": int(training.sum()),
                 "n_positive": int(patients["bm_metastasis"][training].sum()), "warnings": []},
                str(folder_m), cutoff))
            prob = np.clip(mrng.beta(2, 5, ids.size) + 0.3 * burden.loc[patient_key].to_numpy()
                           / (1 + burden.loc[patient_key].to_numpy()), 0, 1)
            if aggregator == "attention":
                raw = mrng.normal(0, 1, ids.size) + 2 * prob
                attention = _softmax_by_group(raw, patient_key)
            else:
                raw = attention = np.full(ids.size, np.nan)
            for name, *_ in COHORTS:
                chosen = patients["cohort"].to_numpy() == name
                pts = pd.DataFrame({
                    "patient_id": patients["patient_id"].to_numpy()[chosen],
                    "score": score[chosen],
                    "risk_group": np.where(score[chosen] >= cutoff, "high", "low"),
                })
                mask = slide_cohort == name
                patches = pd.DataFrame({"patch_id": ids[mask], "probability": prob[mask],
                                        "attention": attention[mask],
                                        "attention_raw": raw[mask]})
                t0, c0 = time.perf_counter(), time.process_time()
                store_mod.write_scores(st, model_id, name, pts, patches)
                score_seconds += time.perf_counter() - t0
                cpu += time.process_time() - c0
        timings["write_scores"] = score_seconds
        counts = store_mod.table_counts(st)
        t0, c0 = time.perf_counter(), time.process_time()
    # Closing folds the write-ahead log into the file (a checkpoint): part of the load.
    timings["close"] = time.perf_counter() - t0
    timings["load_cpu"] = cpu + time.process_time() - c0
    log(f"scores written in {score_seconds:.1f} s, store closed in {timings['close']:.1f} s",
        quiet)
    return {
        "timings": timings,
        "load_seconds": (timings["write_slide_patches"] + timings["write_scores"]
                         + timings["close"]),
        "counts": counts,
        "passed": PASSED_PATCHES,
    }


# --------------------------------------------------------------------------- naive load


def naive_load(folder: Path, rows: int, seed: int) -> dict[str, float]:
    """Seconds per row of a row-by-row insert (patches, then patch scores), in a scratch store."""
    rng = np.random.default_rng(seed)
    per = 1000
    plan = SlidePlan("c", "p", 0, per - per // 10, per // 10)
    table = pd.concat([patch_table(plan, rng) for _ in range(-(-rows // per))],
                      ignore_index=True).head(rows)
    scratch = folder / "naive.duckdb"
    for p in (scratch, Path(str(scratch) + ".wal")):
        p.unlink(missing_ok=True)
    out: dict[str, float] = {}
    with store_mod.open_store(scratch) as st:
        cols = ["patch_id", "slide_id", *store_mod.PATCH_COLUMNS]
        values = [
            (int(i), 1, *(None if isinstance(v, float) and np.isnan(v) else
                          (v.item() if hasattr(v, "item") else v) for v in row))
            for i, row in enumerate(table[list(store_mod.PATCH_COLUMNS)].itertuples(
                index=False, name=None))
        ]
        sql = f"INSERT INTO patches ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        t0 = time.perf_counter()
        with st.transaction() as cur:
            cur.executemany(sql, values)
        out["patch_row_s"] = (time.perf_counter() - t0) / len(values)
        scores = [("m", int(i), float(v), float(v), float(v)) for i, v in
                  enumerate(rng.random(len(values)))]
        t0 = time.perf_counter()
        with st.transaction() as cur:
            cur.executemany("INSERT INTO patch_scores (model_id, patch_id, probability, "
                            "attention, attention_raw) VALUES (?, ?, ?, ?, ?)", scores)
        out["score_row_s"] = (time.perf_counter() - t0) / len(scores)
    for p in (scratch, Path(str(scratch) + ".wal")):
        p.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- top-k


NAIVE_TOPK_SQL = """
    SELECT p.patch_id, p.slide_id, p.x, p.y, p.size, c.attention, c.attention_raw,
           c.probability
    FROM patch_scores c JOIN patches p ON p.patch_id = c.patch_id
         JOIN slides s ON s.slide_id = p.slide_id
    WHERE c.model_id = ? AND s.cohort = ? AND s.patient_id = ? AND c.attention IS NOT NULL
    ORDER BY c.attention DESC, p.patch_id LIMIT ?"""


def bench_topk(db: Path, seed: int) -> dict[str, Any]:
    from cmil_core.viewer.patients import attention_patches

    with store_mod.open_store(db, read_only=True) as st:
        everyone = store_mod.patient_scores_frame(st, ATTENTION_MODEL)[["cohort", "patient_id"]]
        rng = np.random.default_rng(seed)
        picked = everyone.iloc[rng.choice(len(everyone), TOPK_PATIENTS, replace=False)]
        pairs = list(zip(picked["cohort"], picked["patient_id"]))
        attention_patches(st, ATTENTION_MODEL, patient=pairs[0], k=TOPK)  # first-query costs
        ours, answers = [], {}
        for pair in pairs:
            t0 = time.perf_counter()
            top, _bottom = attention_patches(st, ATTENTION_MODEL, patient=pair, k=TOPK)
            ours.append((time.perf_counter() - t0) * 1000)
            answers[pair] = top
        agree = True
        cur = st.cursor()

        def plain(pair: tuple[str, str]) -> tuple[float, pd.DataFrame]:
            t0 = time.perf_counter()
            frame = cur.execute(NAIVE_TOPK_SQL, [ATTENTION_MODEL, *pair, TOPK]).df()
            return (time.perf_counter() - t0) * 1000, frame

        # The plain join as DuckDB runs it: its join filters turn the slides' ids
        # into min/max ranges that skip row groups (the rows are in slide order).
        joined = [plain(pair)[0] for pair in pairs[:NAIVE_TOPK_PATIENTS]]
        # Naive: the same join as a full scan (no pruning: an unindexed store).
        cur.execute("SET disabled_optimizers = 'join_filter_pushdown'")
        try:
            naive = []
            for pair in pairs[:NAIVE_TOPK_PATIENTS]:
                ms, frame = plain(pair)
                naive.append(ms)
                top = answers[pair]
                agree = agree and len(top) == TOPK and top["patch_id"].tolist() == \
                    frame["patch_id"].tolist() and top["x"].tolist() == frame["x"].tolist()
        finally:
            cur.execute("RESET disabled_optimizers")
    return {"p95_ms": float(np.percentile(ours, 95)), "median_ms": float(np.median(ours)),
            "naive_p95_ms": float(np.percentile(naive, 95)),
            "joined_p95_ms": float(np.percentile(joined, 95)), "agree": bool(agree)}


# --------------------------------------------------------------------------- ROC


def naive_band(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """AUC with the DeLong variance (placement matrix) and a bootstrap band, in plain loops."""
    from sklearn.metrics import roc_auc_score, roc_curve

    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, 101)
    ip, ineg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    sens = []
    for _ in range(n_boot):
        idx = np.r_[rng.choice(ip, ip.size), rng.choice(ineg, ineg.size)]
        fpr, tpr, _t = roc_curve(y[idx], s[idx])
        sens.append(np.interp(1 - grid, fpr, tpr))
    np.quantile(np.array(sens), [0.025, 0.5, 0.975], axis=0)
    return float(roc_auc_score(y, s)), float(var)


def bench_roc(db: Path) -> dict[str, Any]:
    from cmil_core.outputs.evaluation import roc_curves
    from cmil_core.store.model_rules import read_model_scores

    with store_mod.open_store(db, read_only=True) as st:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()  # the read of the model's scores included, as before
            curves = roc_curves(read_model_scores(st, ATTENTION_MODEL), band=True)
            times.append((time.perf_counter() - t0) * 1000)
        scores = store_mod.patient_scores_frame(st, ATTENTION_MODEL)
    t0 = time.perf_counter()
    agree = True
    for curve in curves:
        part = scores[scores["cohort"] == curve["cohort"]]
        auc, _var = naive_band(part["bm_metastasis"].to_numpy(int), part["score"].to_numpy(float),
                               curve["band"]["n_boot"], 0)
        agree = agree and abs(auc - curve["auc"]) < 1e-12
    naive_ms = (time.perf_counter() - t0) * 1000
    return {"ms": float(statistics.median(times)), "naive_ms": naive_ms, "cohorts": len(curves),
            "agree": bool(agree)}


# --------------------------------------------------------------------------- pages


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry the parent's
    peak over fork and exec)."""
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith("VmHWM:"):
            return int(text.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pages_worker(db: str, patient: str) -> None:
    """Runs in its own process: every page with AppTest; prints one JSON line."""
    os.environ["CMIL_DB"] = db
    # bench/ is on sys.path as this script's folder, and bench/pages.py would hide
    # the app's pages package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != here]
    os.chdir(ROOT)
    # The pages' imports, before the baseline:
    import plotly.graph_objects  # noqa: F401
    from streamlit import config as streamlit_config
    from streamlit.testing.v1 import AppTest

    import cmil_core.outputs.evaluation
    import cmil_core.viewer.patients  # noqa: F401

    streamlit_config.set_option("client.showErrorDetails", "full")
    rss_base = _peak_rss_mb()
    app = str(ROOT / "app.py")
    at = AppTest.from_file(app, default_timeout=300)
    problems: list[str] = []

    def run(what: str) -> float:
        t0 = time.perf_counter()
        at.run()
        seconds = time.perf_counter() - t0
        if at.exception:
            problems.append(f"{what}: {[e.value for e in at.exception][:1]}")
        return seconds

    cold: dict[str, float] = {"Study overview": run("first run")}
    if len(at.get("image")) < 18:
        problems.append(f"overview: {len(at.get('image'))} slide thumbnails, not 18")
    shown = [(title, path) for title, path in PAGES if (ROOT / path).exists()]
    skipped = []
    for title, path in shown[1:]:
        try:
            at.switch_page(path)
        except ValueError:  # not a page of this app for this user
            skipped.append(title)
            continue
        cold[title] = run(f"{title} cold")
    warm: dict[str, float] = {}
    for title, path in shown:
        if title in skipped:
            continue
        at.switch_page(path)
        warm[title] = run(f"{title} warm")
    steps: dict[str, float] = {}
    at.switch_page("pages/patients.py")
    run("patients again")
    at.query_params["patient"] = patient
    steps["Patients: open a patient (?patient=)"] = run("open patient")
    if not any(h.value.startswith("Patient ") for h in at.subheader):
        problems.append("open patient: no 'Patient ...' heading")
    if len(at.get("image")) < 3:  # the heatmap and the two galleries
        problems.append(f"open patient: {len(at.get('image'))} images, not 3")
    # The user picks the other model in the sidebar, with the patient open. AppTest
    # drops the sidebar's elements after switch_page, so its picker cannot be
    # clicked on the Patients page; instead a second session opens the same link
    # with ``?model=`` set to the other model (the picker follows it), and the
    # Patients page's run under that model (never shown before) is timed.
    current = at.query_params.get("model")
    other = next(m for m in (ATTENTION_MODEL, HISTOGRAM_MODEL) if m != current)
    at = AppTest.from_file(app, default_timeout=300)
    at.query_params["model"] = other
    at.query_params["patient"] = patient
    run("second session")
    at.switch_page("pages/patients.py")
    steps["Patients: change the model"] = run("change model")
    escaped = other.replace("-", "\\-")
    if at.query_params.get("model") != other or not any(
            other in c.value or escaped in c.value for c in at.caption):
        problems.append(f"change model: the page does not show {other!r}")
    if not any(h.value.startswith("Patient ") for h in at.subheader):
        problems.append("change model: no 'Patient ...' heading")
    at.switch_page("pages/discrimination.py")
    steps["Discrimination: the other model"] = run("discrimination, other model")
    rss = _peak_rss_mb()
    print(json.dumps({"cold": cold, "warm": warm, "steps": steps, "rss_mb": rss,
                      "rss_base_mb": rss_base, "problems": problems, "skipped": skipped}))


def bench_pages(db: Path, patient: str) -> dict[str, Any]:
    env = {**os.environ, "CMIL_DB": str(db)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--pages-worker", str(db), patient],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"pages worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- main


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "cmil-scale"),
                        help="where the store is built (default <tmp>/cmil-scale)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a complete earlier build in --dir (same seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--naive-rows", type=int, default=5000,
                        help="rows inserted one by one for the naive load figure")
    parser.add_argument("--skip-pages", action="store_true", help="no AppTest part")
    parser.add_argument("--pages-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pages_worker:
        pages_worker(*args.pages_worker)
        return 0

    quiet = args.json
    folder = Path(args.dir)
    db = folder / "cmil.duckdb"
    stamp_file = folder / "build.json"
    wanted = {"version": BUILD_VERSION, "seed": args.seed, "passed": PASSED_PATCHES}
    info = None
    if args.reuse and stamp_file.exists() and db.exists():
        saved = json.loads(stamp_file.read_text())
        if saved.get("wanted") == wanted:
            info = saved
            log(f"reusing the build in {folder} of {saved['built_at']}", quiet)
    if info is None:
        info = build(folder, args.seed, quiet)
        info["naive"] = naive_load(folder, args.naive_rows, args.seed)
        info["wanted"] = wanted
        info["built_at"] = datetime.now().isoformat(timespec="seconds")
        stamp_file.write_text(json.dumps(info, indent=2))
        reused = False
    else:
        reused = True
    # Opening once for writing applies any newer schema migration to a reused store.
    store_mod.open_store(db).close()

    counts = info["counts"]
    rows_written = counts["patches"] + counts["patch_scores"]
    naive_load_s = (counts["patches"] * info["naive"]["patch_row_s"]
                    + counts["patch_scores"] * info["naive"]["score_row_s"])
    log("top-k ...", quiet)
    topk = bench_topk(db, args.seed)
    log("ROC ...", quiet)
    roc = bench_roc(db)
    pages: dict[str, Any] | None = None
    if not args.skip_pages:
        log("pages (AppTest, separate process) ...", quiet)
        with store_mod.open_store(db, read_only=True) as st:
            listing = store_mod.patient_scores_frame(st, ATTENTION_MODEL)
        # A patient far down the list, opened for the first time in the worker.
        row = listing.iloc[len(listing) // 2]
        pages = bench_pages(db, f"{row['cohort']}/{row['patient_id']}")

    result: dict[str, Any] = {
        "load_seconds": round(info["load_seconds"], 2),
        "topk_p95_ms": round(topk["p95_ms"], 2),
        "roc_ms": round(roc["ms"], 1),
        "page_max_s": None,
        "rss_mb": None,
        "patches": int(info["passed"]),
        "patch_rows": int(counts["patches"]),
        "patch_score_rows": int(counts["patch_scores"]),
        "load_cpu_seconds": round(info["timings"]["load_cpu"], 2),
        "load_naive_ratio": round(naive_load_s / info["load_seconds"], 1),
        "topk_naive_ratio": round(topk["naive_p95_ms"] / topk["p95_ms"], 1),
        "roc_naive_ratio": round(roc["naive_ms"] / roc["ms"], 1),
        "load_reused": reused,
    }
    slowest = ""
    if pages is not None:
        timed = {**{f"{k} (warm)": v for k, v in pages["warm"].items()}, **pages["steps"]}
        slowest = max(timed, key=timed.get)  # type: ignore[arg-type]
        result["page_max_s"] = round(timed[slowest], 2)
        result["page_slowest"] = slowest
        result["page_ratio"] = round(timed[slowest] / pages["warm"][BASELINE_PAGE], 1)
        result["rss_mb"] = round(pages["rss_mb"], 0)
        result["page_problems"] = pages["problems"]
    misses = [k for k, target in TARGETS.items()
              if result[k] is not None and result[k] > target]
    result["misses"] = misses

    if not quiet:
        print(f"store {db}: {counts['patients']} patients, {counts['slides']} slides, "
              f"{counts['patches']:,} patch rows ({PASSED_PATCHES:,} passed QC), "
              f"{counts['patch_scores']:,} patch scores, 2 models; {os.cpu_count()} cores, "
              f"load average {_loadavg()}")
        t = info["timings"]
        print(f"build: slide file {t['slide_file']:.1f} s, {counts['slides']} slides registered "
              f"in {t['register']:.1f} s, write_slide_patches {t['write_slide_patches']:.2f} s, "
              f"write_scores {t['write_scores']:.2f} s, closing (checkpoint) "
              f"{t.get('close', 0.0):.2f} s"
              + (f" (reused build of {info['built_at']})" if reused else ""))
        header = f"{'measure':<14}{'ours':>12}{'naive':>12}{'ratio':>9}{'target':>10}  verdict"
        print()
        print(header)
        print("-" * len(header))

        def line(name: str, ours: float | None, naive: float | None, unit: str) -> None:
            target = TARGETS[name]
            if ours is None:
                print(f"{name:<14}{'-':>12}")
                return
            ratio = f"{naive / ours:.1f}x" if naive else "-"
            naive_text = f"{naive:.2f}{unit}" if naive else "-"
            verdict = "PASS" if ours <= target else "MISS"
            print(f"{name:<14}{ours:>10.2f}{unit}{naive_text:>12}{ratio:>9}{target:>8g}{unit}"
                  f"  {verdict}")

        line("load_seconds", info["load_seconds"], naive_load_s, " s")
        line("topk_p95_ms", topk["p95_ms"], topk["naive_p95_ms"], "ms")
        line("roc_ms", roc["ms"], roc["naive_ms"], "ms")
        if pages is not None:
            line("page_max_s", result["page_max_s"], None, " s")
            line("rss_mb", pages["rss_mb"], None, "MB")
        print("-" * len(header))
        print(f"load: {rows_written:,} rows in {counts['slides']} write_slide_patches and 6 "
              f"write_scores transactions; CPU time of this process meanwhile "
              f"{info['timings']['load_cpu']:.2f} s (wall minus CPU: waiting for a core or "
              f"the disk)")
        print(f"load: naive = one-by-one INSERT of {args.naive_rows:,} "
              f"sampled rows ({info['naive']['patch_row_s'] * 1e6:.0f} us/patch row, "
              f"{info['naive']['score_row_s'] * 1e6:.0f} us/score row), extrapolated")
        print(f"top-k: median {topk['median_ms']:.2f} ms over {TOPK_PATIENTS} patients, k={TOPK} "
              f"(top and bottom, as the Patients page); naive = a plain join of patch_scores, "
              f"patches and slides, full scan (DuckDB's join filters off), on "
              f"{NAIVE_TOPK_PATIENTS} of them; the same join with them on: p95 "
              f"{topk['joined_p95_ms']:.2f} ms; same answers: {topk['agree']}")
        print(f"roc: {roc['cohorts']} cohorts, 2000 resamples each; naive = Python loop of "
              f"sklearn roc_curve + placement-matrix DeLong; same AUCs: {roc['agree']}")
        if pages is not None:
            print()
            print(f"{'page / step':<42}{'cold s':>8}{'warm s':>8}")
            for title in pages["warm"]:
                print(f"{title:<42}{pages['cold'][title]:>8.2f}{pages['warm'][title]:>8.2f}")
            for title in pages["skipped"]:
                print(f"{title:<42}  (not a page of this app here: skipped)")
            for step, seconds in pages["steps"].items():
                print(f"{step:<42}{'':>8}{seconds:>8.2f}")
            print(f"slowest: {slowest} {result['page_max_s']:.2f} s = {result['page_ratio']}x "
                  f"the warm {BASELINE_PAGE} page; peak RSS {pages['rss_mb']:.0f} MB (after "
                  f"imports, before any page: {pages['rss_base_mb']:.0f} MB)")
            for problem in pages["problems"]:
                print(f"PROBLEM {problem}")
        print(f"targets missed: {', '.join(misses) if misses else 'none'}; "
              f"load average at the end {_loadavg()}")
    print(json.dumps(result))
    return 1 if misses or (pages and pages["problems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
