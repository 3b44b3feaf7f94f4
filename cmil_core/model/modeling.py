"""Training a cMIL model on a cohort and scoring cohorts with it.

:func:`train` turns a training cohort's quality-passed patches into bags (one
per patient: the embeddings of all the patient's patches, from the encoder's
feature files), estimates the aggregator's performance by patient-stratified
k-fold cross-validation, fits it on the whole training cohort, fixes the
operating cutoff (Youden, on the out-of-fold scores: the cross-validated
scores are the honest ones, in-sample scores of a fitted model are
optimistic), and saves everything under ``<store folder>/models/<model_id>/``:

* ``model.pt``: the aggregator's fitted state (``torch.save``);
* ``config.json``: encoder (name, weights hash, preprocessing), tiling and
  quality settings of the training slides, aggregator parameters, seed,
  cutoff, cross-validation folds (patient ids) and AUCs, package versions.

The folder is written under a temporary name and renamed into place before
the ``models`` row is inserted, so a killed run never leaves a row without its
files (at worst a folder without a row, which ``check`` reports).

The training cohort's out-of-fold scores (with each patient's fold) go to
the store's ``oof_scores``, apart from the final model's scores: they are
the training row of every table. The final model's scores are mapped onto
the out-of-fold scale, on which the cutoff was chosen, by a monotone map
fitted on the training patients (``config["score_map"]``,
:mod:`cmil_core.model.recalibration`).

Only the training cohort's patients ever reach the aggregator's ``fit``.
:func:`score` rebuilds the exact pipeline from those files, scores any cohort,
maps the scores onto the out-of-fold scale (``score``; the model's own
output is kept as ``score_raw``),
assigns risk groups with the training cutoff (``high`` when score >= cutoff),
and stores patient and patch scores (probability and attention for every
patch that passed quality control), replacing earlier scores of that model.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cmil_core import _atomic, store as store_mod
from cmil_core.analysis.cutoffs import youden_cutoff
from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.ingest import qc as qc_mod
from cmil_core.model import backbones, encoders, features, finetune, mil, recalibration
from cmil_core.model.aggregator import Aggregator, BagPrediction
from cmil_core.model.finetune_config import ENCODER_TRAINING, FinetuneConfig
from cmil_core.progress import Progress, ProgressCallback, no_progress

__all__ = [
    "MIN_FINETUNE_PATCHES", "MIN_FINETUNE_PATIENTS", "Bags", "artifact_dir",
    "choose_encoder_training", "cohort_bags", "load_model", "score", "train",
]

log = logging.getLogger(__name__)


@dataclass
class Bags:
    """A cohort's patients as bags of patch embeddings."""

    cohort: str
    patient_ids: list[str]
    labels: list[int | None]
    bags: list[np.ndarray]
    patch_ids: list[np.ndarray]
    missing: list[str]  # patients with no quality-passed patch


def artifact_dir(db: store_mod.Store | str | os.PathLike[str], model_id: str) -> Path:
    """Where a model's files live: ``<store folder>/models/<model_id>``
    (:meth:`StoreFolder.model <cmil_core.store.StoreFolder.model>`)."""
    return store_mod.StoreFolder.of(db).model(model_id)


@dataclass
class _CohortInputs:
    """What embedding a cohort needs from the store, read in one short visit."""

    cohort: str
    patches: pd.DataFrame
    patients: pd.DataFrame
    features_root: Path


def _cohort_inputs(store: store_mod.Store, cohort: str) -> _CohortInputs:
    return _CohortInputs(cohort, store_mod.passed_patches(store, cohort),
                         store_mod.patients_frame(store, cohort),
                         store_mod.StoreFolder.of(store).features)


def _embed(
    inputs: _CohortInputs,
    encoder: encoders.Encoder,
    progress: ProgressCallback,
    stage: tuple[str, int, int],
    executor: str = "local",
    ray_address: str | None = None,
) -> tuple[Bags, list[int]]:
    """Embed (or reuse the feature files of) the patches; no store needed.

    Returns the slide ids too.
    """
    name, index, stages = stage
    by_slide = list(inputs.patches.groupby("slide_id", sort=True))
    processes = features.default_processes()
    if executor == "ray":  # the slides' files on a Ray cluster; the loop below reads them back
        from cmil_core.model.distributed import extract_features

        tasks = [features.SlideTask(
            str(rows.iloc[0]["path"]), rows[["patch_id", "x", "y", "size"]],
            str(rows.iloc[0]["tiling_key"]), float(rows.iloc[0]["mpp"]),
            str(rows.iloc[0]["sha256"])) for _, rows in by_slide]
        extract_features(
            tasks, encoder, inputs.features_root, address=ray_address,
            progress=lambda done, total, what: progress(
                Progress(name, index, stages, done, total, f"{what} (ray)")),
        )
    elif processes > 1 or torch.cuda.is_available():  # several slides at once, or on the GPU(s);
        # the loop below then reads the files back
        tasks = [features.SlideTask(
            str(rows.iloc[0]["path"]), rows[["patch_id", "x", "y", "size"]],
            str(rows.iloc[0]["tiling_key"]), float(rows.iloc[0]["mpp"]),
            str(rows.iloc[0]["sha256"])) for _, rows in by_slide]
        features.precompute(
            tasks, encoder, inputs.features_root, processes=processes,
            progress=lambda done, total, what: progress(
                Progress(name, index, stages, done, total, f"{what} ({processes} processes)")),
        )
    per_patient: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for done, (_slide_id, rows) in enumerate(by_slide):
        first = rows.iloc[0]
        progress(Progress(name, index, stages, done, len(by_slide), Path(first["path"]).name))
        ff = features.slide_features(
            first["path"], rows[["patch_id", "x", "y", "size"]], encoder, inputs.features_root,
            tiling_key=str(first["tiling_key"]), mpp=float(first["mpp"]),
            slide_sha256=str(first["sha256"]),
        )
        per_patient.setdefault(str(first["patient_id"]), []).append(
            (np.asarray(ff.features), np.asarray(ff.patch_ids))
        )
    progress(Progress(name, index, stages, len(by_slide), len(by_slide), inputs.cohort))
    ids, labels, bags, pids, missing = [], [], [], [], []
    for row in inputs.patients.itertuples():
        parts = per_patient.get(row.patient_id)
        if not parts:
            missing.append(row.patient_id)
            continue
        ids.append(row.patient_id)
        labels.append(None if pd.isna(row.bm_metastasis) else int(row.bm_metastasis))
        bags.append(np.concatenate([f for f, _ in parts]).astype(np.float32))
        pids.append(np.concatenate([p for _, p in parts]))
    return Bags(inputs.cohort, ids, labels, bags, pids, missing), [int(s) for s, _ in by_slide]


def cohort_bags(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    encoder: encoders.Encoder,
    *,
    progress: ProgressCallback = no_progress,
    stage: tuple[str, int, int] = ("features", 1, 1),
    executor: str = "local",
    ray_address: str | None = None,
) -> Bags:
    """Embed (or reuse the feature files of) a cohort's passed patches, grouped by patient.

    Given a path, the store is opened only to read the patches and, at the
    end, to mark the slides ``encoded``: not while the CNN runs, so that
    other processes (the dashboard) can read it meanwhile. ``executor``
    ``"ray"`` computes the missing feature files on a Ray cluster
    (:func:`cmil_core.model.distributed.extract_features`; ``ray_address``).
    """
    if executor not in ("local", "ray"):
        raise InputError(f"--executor {executor!r} is not one of local, ray")
    with store_mod.using(db, read_only=True) as store:
        inputs = _cohort_inputs(store, cohort)
    bags, slide_ids = _embed(inputs, encoder, progress, stage, executor, ray_address)
    with store_mod.using(db) as store:
        store_mod.set_slides_status(store, slide_ids, "encoded")
    return bags


def _versions() -> dict[str, str]:
    import duckdb
    import sklearn

    from cmil_core import __version__

    return {
        "cmil_core": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "scikit-learn": sklearn.__version__, "duckdb": duckdb.__version__,
    }


def train(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    *,
    aggregator: str = "attention",
    encoder: str = "smallcnn",
    weights: str | os.PathLike[str] | None = None,
    seed: int = 0,
    folds: int = 5,
    params: dict[str, Any] | None = None,
    progress: ProgressCallback = no_progress,
    encoder_training: str = "auto",
    cnn: FinetuneConfig | None = None,
    input_px: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> str:
    """Train a model on ``cohort``; returns the new model id (see the module docstring).

    ``encoder_training``: ``"frozen"`` embeds the patches with ``encoder`` as
    loaded (``weights``, else a seeded initialisation); ``"finetune"`` trains
    that CNN on the cohort's smears with the patients' labels, inside every
    cross-validation fold and once more on all training patients for the
    final model (:mod:`cmil_core.model.finetune`; ``cnn``: its settings;
    ``weights``: its starting point); ``"auto"`` (the default) is
    ``"finetune"`` unless the study is too small to train a CNN on or the
    encoder cannot be trained (:func:`choose_encoder_training`: then
    ``"frozen"``, and the reason is logged and kept in the model's
    ``config["encoder_training_note"]`` and ``metrics``). The trained CNN is saved in the model
    folder (``encoder-<sha256[:12]>.pt``) and is the encoder that
    :func:`score` uses. ``input_px``, ``mean``, ``std``: the encoder's
    preprocessing (default 224 px and ImageNet's when frozen, ``cnn``'s when
    fine-tuned). ``executor``, ``ray_address``: where the feature files are
    computed (:func:`cohort_bags`).
    """
    if executor not in ("local", "ray"):
        raise InputError(f"--executor {executor!r} is not one of local, ray")
    if aggregator not in ("histogram", "attention"):
        raise InputError(f"--aggregator {aggregator!r} is not histogram or attention")
    if encoder_training not in (*ENCODER_TRAINING, "auto"):
        raise InputError(f"--encoder-training {encoder_training!r} is not "
                         f"{', '.join(ENCODER_TRAINING)} or auto")
    prep: dict[str, Any] = {k: v for k, v in (("input_px", input_px), ("mean", mean),
                                             ("std", std)) if v is not None}
    requested, note = encoder_training, ""
    if encoder_training == "auto":
        with store_mod.using(db, read_only=True) as store:
            if cohort not in {c.cohort for c in store_mod.list_cohorts(store)}:
                raise InputError(f"cohort '{cohort}' does not exist in {store.path}")
            inputs = _cohort_inputs(store, cohort)
        encoder_training, note = choose_encoder_training(inputs.patches, inputs.patients,
                                                         encoder)
        if note:
            log.info("cohort %s: %s", cohort, note)  # the CLI prints the choice after training
    if encoder_training == "finetune":
        if encoder not in backbones.ARCHITECTURES:
            raise InputError(
                f"--encoder {encoder} cannot be fine-tuned (a whole program, not a state dict); "
                f"use one of {', '.join(backbones.ARCHITECTURES)}, or --encoder-training frozen"
            )
        cnn = FinetuneConfig.from_params(cnn.to_dict() if cnn else None,
                                                  architecture=encoder, **prep)
        enc = None  # the trained CNN, once trained
    else:
        cnn = None  # frozen (asked for, or chosen by the auto rule): no CNN training
        enc = encoders.load_encoder(encoder, weights, seed=seed, **prep)
    # The store is held only for each read and write, never while the CNN or
    # the aggregator runs: the dashboard and other readers keep working.
    with store_mod.using(db, read_only=True) as store:
        if cohort not in {c.cohort for c in store_mod.list_cohorts(store)}:
            raise InputError(f"cohort '{cohort}' does not exist in {store.path}")
        tiling = _tiling_settings(store, cohort)
        # What scoring compares other cohorts against (patch size, overlap, output
        # px, metrics version) and the training cohort's QC decision (stale marks).
        trained_tiling = qc_mod.training_tiling(store, cohort)
    data_folder = store_mod.StoreFolder.of(db)
    log.info("train on cohort %s: aggregator %s, encoder %s (%s), %d folds, seed %d",
             cohort, aggregator, encoder, encoder_training, folds, seed)
    stages = 3
    tuned: finetune.FinetuneResult | None = None
    if cnn is not None:  # stages: pixels, CNN cross-validation, final CNN, features, training
        stages = 5
        tuned = _finetune(db, cohort, aggregator, params, folds, seed, cnn, weights, progress)
        enc = tuned.encoder
    assert enc is not None
    data = cohort_bags(db, cohort, enc, progress=progress,
                       stage=("features", 1 if tuned is None else 4, stages),
                       executor=executor, ray_address=ray_address)
    labelled = [i for i, y in enumerate(data.labels) if y is not None]
    bags = [data.bags[i] for i in labelled]
    labels = [int(data.labels[i]) for i in labelled]  # type: ignore[arg-type]
    if len(set(labels)) < 2:
        raise InputError(
            f"cohort '{cohort}' needs patients of both classes with patches to train on "
            f"(has {sum(labels)} positive and {len(labels) - sum(labels)} negative)"
        )

    def report(stage: str, index: int) -> Any:
        def cb(done: int, total: int, message: str = "") -> None:
            progress(Progress(stage, index, stages, done, total, message))
        return cb

    smaller = min(sum(labels), len(labels) - sum(labels))
    if smaller < 2 or folds < 2:
        raise InputError(
            f"cohort '{cohort}': cross-validation needs --folds >= 2 and at least 2 patients "
            f"of each class with patches (the smaller class has {smaller})"
        )
    k = min(folds, smaller)  # stratified folds need a patient of each class in each fold
    if tuned is None:
        cv = mil.cross_validate(
            aggregator, bags, labels, k=k, seed=seed, params=params,
            progress=report("cross-validation", 2),
        )
    else:  # cross-validated with a CNN trained inside each fold (same folds, same patients)
        cv, k = tuned.cv, tuned.cv.k
        if tuned.patient_ids != [data.patient_ids[i] for i in labelled]:
            raise InputError(f"cohort '{cohort}' changed while the CNN trained; train again")
    model = mil.make_aggregator(aggregator, **(params or {})).fit(
        bags, labels, seed=seed, progress=report("training", stages)
    )
    cutoff = float(youden_cutoff(np.asarray(labels), cv.oof_scores))
    if not np.isfinite(cutoff):
        cutoff = 0.5
    # Honest numbers: the cutoff lives on the out-of-fold scale, so the final model's
    # scores are mapped onto it (fitted on the training patients' in-sample against
    # out-of-fold scores; the choice is argued in cmil_core.model.recalibration).
    in_sample = np.array([p.score for p in model.predict(bags)], dtype=float)
    score_map = recalibration.fit_score_map(in_sample, cv.oof_scores)
    oof_fold = np.zeros(len(labels), dtype=int)
    for f, held_out in enumerate(cv.folds):
        oof_fold[held_out] = f
    created = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    model_id = f"{cohort}-{aggregator}-{created:%Y%m%d-%H%M%S}"
    folder = data_folder.model(model_id)
    suffix = 1
    while folder.exists():
        suffix += 1
        model_id = f"{cohort}-{aggregator}-{created:%Y%m%d-%H%M%S}-{suffix}"
        folder = data_folder.model(model_id)
    training_ids = [data.patient_ids[i] for i in labelled]
    config = {
        "model_id": model_id,
        "aggregator": aggregator,
        "aggregator_config": model.config(),
        "encoder": enc.spec.to_dict(),
        "encoder_key": enc.spec.key,
        "train_cohort": cohort,
        "seed": seed,
        "cutoff": cutoff,
        "cutoff_method": "youden on out-of-fold training scores",
        "score_map": score_map.to_dict(),
        # Both aggregators train class-balanced: their scores read as probabilities
        # at this prior, not at the training prevalence (cmil_core.model.recalibration).
        "trained_prior": 0.5,
        "training_prevalence": float(np.mean(labels)),
        "tiling": tiling,
        "training_tiling": trained_tiling,
        "qc_decision": trained_tiling["qc_decision"],
        "cv": {
            "k": len(cv.folds), "auc": cv.auc, "fold_aucs": cv.fold_aucs,
            "folds": [[training_ids[i] for i in fold] for fold in cv.folds],
        },
        "patients": {"trained_on": len(labels), "without_patches": data.missing},
        "versions": _versions(),
    }
    config["encoder_training"] = encoder_training
    config["encoder_training_requested"] = requested
    if note:
        config["encoder_training_note"] = note
    if tuned is not None:  # the trained CNN is a file of the model folder
        config["encoder"] = {**enc.spec.to_dict(),
                             "weights": str(folder / tuned.weights_path.name)}
        config["finetune"] = tuned.summary()
    # Crash safety: the folder is filled under a temporary name and renamed
    # into place, then the row is inserted. A kill before the rename leaves
    # a stale temporary folder (removed by the next train); between rename
    # and insert, a folder without a row, which no model refers to: a rerun
    # makes a new model id, and `check` reports the folder (`--repair`
    # deletes it). There is never a row without its files.
    _atomic.remove_stale(folder.parent)
    with _atomic.new_folder(folder) as tmp:
        torch.save({"config": model.config(), "state": model.state()}, tmp / "model.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tuned is not None:
            shutil.copyfile(tuned.weights_path, tmp / tuned.weights_path.name)
    metrics = {"cv_auc": cv.auc, "cv_fold_aucs": cv.fold_aucs, "cv_k": k,
               "in_sample_auc": float(roc_auc(np.asarray(labels), in_sample)),
               "n_train": len(labels), "n_positive": int(sum(labels)),
               "warnings": list(cv.warnings)}
    metrics["encoder_training"] = encoder_training
    if note:
        metrics["encoder_training_note"] = note
    oof = pd.DataFrame({"patient_id": training_ids, "fold": oof_fold, "score": cv.oof_scores})
    with store_mod.using(db) as store:
        # Out-of-fold scores first: a kill in between leaves rows without a model,
        # which `check` reports and `check --repair` deletes, never a model without them.
        store_mod.write_oof_scores(store, model_id, cohort, oof)
        store_mod.add_model(
            store,
            store_mod.ModelRow(model_id, created, aggregator, enc.spec.name, cohort, config,
                               metrics, str(folder), cutoff),
        )
    if tuned is not None:  # saved: its checkpoints are no longer needed
        shutil.rmtree(tuned.work_dir, ignore_errors=True)
    log.info("model %s saved in %s: %d patients, cross-validated AUC %.3f, cutoff %.4f",
             model_id, folder, len(labels), cv.auc, cutoff)
    return model_id


#: ``encoder_training="auto"`` trains the CNN only when the smaller class has at
#: least this many labelled patients with quality-passed patches ...
MIN_FINETUNE_PATIENTS = 10
#: ... and at least this many quality-passed patches.
MIN_FINETUNE_PATCHES = 100


def choose_encoder_training(patches: pd.DataFrame, patients: pd.DataFrame,
                            encoder: str) -> tuple[str, str]:
    """What ``encoder_training="auto"`` does: ``("finetune", "")`` or ``("frozen", why)``.

    The rule: fine-tune (the study's method) when ``encoder`` is an
    architecture whose weights can be trained, and the smaller class has at
    least :data:`MIN_FINETUNE_PATIENTS` labelled patients with quality-passed
    patches and at least :data:`MIN_FINETUNE_PATCHES` such patches.
    Otherwise the encoder stays frozen: with a handful of patients, the inner
    validation split that stops the CNN's training early holds one or two
    patients per class, and a CNN trained on a few dozen patches learns
    noise; frozen features are the steadier choice. ``patches``:
    :func:`cmil_core.store.passed_patches`; ``patients``: ``patient_id,
    bm_metastasis``.
    """
    if encoder not in backbones.ARCHITECTURES:
        return "frozen", (f"encoder {encoder} is a whole program, not trainable weights: "
                          "used frozen (auto rule)")
    labels = patients.dropna(subset=["bm_metastasis"]).set_index("patient_id")["bm_metastasis"]
    counts = patches.groupby("patient_id").size()
    counts = counts[counts.index.isin(labels.index)]
    per_class = {c: (int((labels.loc[counts.index] == c).sum()),
                     int(counts[(labels.loc[counts.index] == c).to_numpy()].sum()))
                 for c in (0, 1)}
    few_patients = min(n for n, _ in per_class.values())
    few_patches = min(n for _, n in per_class.values())
    if few_patients >= MIN_FINETUNE_PATIENTS and few_patches >= MIN_FINETUNE_PATCHES:
        return "finetune", ""
    return "frozen", (
        f"too small to train the patch CNN on (smaller class: {few_patients} patients, "
        f"{few_patches} quality-passed patches; auto fine-tunes from "
        f"{MIN_FINETUNE_PATIENTS} patients and {MIN_FINETUNE_PATCHES} patches per class): "
        "frozen encoder (auto rule; --encoder-training finetune forces training)")


def _finetune(
    db: store_mod.Store | str | os.PathLike[str], cohort: str, aggregator: str,
    params: dict[str, Any] | None, folds: int, seed: int, cnn: FinetuneConfig,
    weights: str | os.PathLike[str] | None, progress: ProgressCallback,
) -> finetune.FinetuneResult:
    """Train the patch CNN on ``cohort`` (stages 1-3 of 5 of a fine-tuning ``train``).

    Checkpoints go to ``<store folder>/checkpoints/<run key>/``: a killed
    ``train`` run again with the same arguments resumes from them; ``train``
    deletes the folder once the model is saved.
    """
    with store_mod.using(db, read_only=True) as store:
        inputs = _cohort_inputs(store, cohort)
    index = {"pixels": 1, "cnn cross-validation": 2, "final cnn": 3}

    def report(stage: str, done: int, total: int, message: str) -> None:
        progress(Progress(stage, index[stage], 5, done, total, message))

    weights_sha = encoders.load_encoder(cnn.architecture, weights).spec.weights_sha256 \
        if weights is not None else None
    work = store_mod.StoreFolder.of(db).checkpoint(finetune.run_key(
        cohort, seed, folds, aggregator, cnn, params, weights_sha))
    result = finetune.finetune_encoder(
        inputs.patches, inputs.patients, aggregator=aggregator, folds=folds, seed=seed,
        work_dir=work, config=cnn, params=params, weights=weights, progress=report,
    )
    # The final CNN's feature files of the slides whose patches are all in memory:
    # no second read of those slides in the features stage.
    written = finetune.write_feature_files(result.data, inputs.patches, inputs.features_root,
                                           result.encoder)
    log.info("feature files of %d slides written from the patches in memory", written)
    return result


def _tiling_settings(store: store_mod.Store, cohort: str) -> list[dict[str, Any]]:
    runs = store_mod.ingest_runs_frame(store, cohort)
    return [json.loads(c) for c in runs["config"].dropna().unique()]


@dataclass
class LoadedModel:
    model_id: str
    aggregator: Aggregator
    encoder: encoders.Encoder
    cutoff: float
    config: dict[str, Any]


def load_model(db: store_mod.Store | str | os.PathLike[str], model_id: str) -> LoadedModel:
    """Rebuild a trained model (aggregator and encoder) from its files."""
    with store_mod.using(db, read_only=True) as store:
        row = store_mod.get_model(store, model_id)
    if row is None:
        raise InputError(f"no model '{model_id}' in the store (see the models list)")
    folder = Path(row.artifact_path)
    try:
        config = json.loads((folder / "config.json").read_text())
        saved = torch.load(folder / "model.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"model '{model_id}': its files in {folder} cannot be read ({exc})"
        ) from exc
    aggregator = mil.aggregator_from_state(saved["config"], saved["state"])
    spec = config["encoder"]
    trained = None  # a CNN trained by `train` lives in the model folder, wherever it moved
    if config.get("encoder_training") == "finetune" and spec.get("weights"):
        trained = folder / Path(spec["weights"]).name
    encoder = encoders.encoder_from_spec(spec, weights=trained)
    return LoadedModel(model_id, aggregator, encoder, float(config["cutoff"]), config)


def score(
    db: store_mod.Store | str | os.PathLike[str],
    model_id: str,
    cohorts: Sequence[str] | None = None,
    *,
    progress: ProgressCallback = no_progress,
    allow_tiling_mismatch: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, int]:
    """Score ``cohorts`` (default: all) with a model; returns patients scored per cohort.

    A cohort whose patch size, overlap, output size, metrics version or QC
    thresholds differ from the training cohort's is refused (InputError, before
    anything is written) unless ``allow_tiling_mismatch``; its scores then carry
    what differed (``patient_scores.tiling_mismatch``). ``executor``,
    ``ray_address``: where missing feature files are computed (:func:`cohort_bags`);
    the aggregator scores here, and this process alone writes the store.
    """
    if executor not in ("local", "ray"):
        raise InputError(f"--executor {executor!r} is not one of local, ray")
    # As in train: the store is held only to read and to write each cohort's scores.
    with store_mod.using(db, read_only=True) as store:
        model = load_model(store, model_id)
        known = [c.cohort for c in store_mod.list_cohorts(store)]
    wanted = list(cohorts) if cohorts else known
    score_map = recalibration.ScoreMap.from_dict(model.config.get("score_map"))
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise InputError(f"no cohort {', '.join(repr(c) for c in unknown)} in the store")
    trained = model.config.get("training_tiling") or {}
    with store_mod.using(db, read_only=True) as store:
        mismatch = {c: qc_mod.tiling_differences(store, trained, c) for c in wanted}
        decisions = store_mod.current_qc_decisions(store)
    refused = {c: d for c, d in mismatch.items() if d}
    if refused and not allow_tiling_mismatch:
        cohort, diffs = next(iter(refused.items()))
        train_cohort = model.config.get("train_cohort", "the training cohort")
        raise InputError(
            f"model {model_id} was trained on patches of cohort '{train_cohort}' that differ "
            f"from cohort '{cohort}': {'; '.join(diffs)}; ingest '{cohort}' again with the "
            "training settings (--patch-um, --overlap) or decide its QC with the training "
            "thresholds (qc command or Quality control page), or pass "
            "--allow-tiling-mismatch to score it anyway (its scores are then marked)")
    done: dict[str, int] = {}
    for index, cohort in enumerate(wanted, start=1):
        data = cohort_bags(db, cohort, model.encoder, progress=progress,
                           stage=(f"scoring {cohort}", index, len(wanted)),
                           executor=executor, ray_address=ray_address)
        predictions = model.aggregator.predict(data.bags) if data.bags else []
        raw = np.array([p.score for p in predictions], dtype=float)
        scores = score_map.apply(raw)  # onto the out-of-fold scale, the cutoff's
        patients = pd.DataFrame({
            "patient_id": data.patient_ids,
            "score": scores,
            "score_raw": raw,
            "risk_group": np.where(scores >= model.cutoff, "high", "low"),
        })
        patches = pd.DataFrame({
            "patch_id": np.concatenate(data.patch_ids) if data.patch_ids else [],
            "probability": _column(predictions, "probability"),
            "attention": _column(predictions, "attention"),
            "attention_raw": _column(predictions, "attention_raw"),
        })
        with store_mod.using(db) as store:
            decision = decisions.get(cohort)
            store_mod.write_scores(
                store, model_id, cohort, patients, patches,
                qc_decision_id=None if decision is None else int(decision["decision_id"]),
                tiling_mismatch="; ".join(mismatch[cohort]) or None)
        done[cohort] = len(patients)
        log.info("cohort %s scored with %s: %d patients", cohort, model_id, len(patients))
    return done


def _column(predictions: Sequence[BagPrediction], name: str) -> np.ndarray:
    """One per-patch output of every bag, end to end; NaN where an aggregator has none."""
    parts = []
    for p in predictions:
        values = getattr(p, name)
        parts.append(np.full(len(p.probability), np.nan) if values is None
                     else np.asarray(values, dtype=float))
    return np.concatenate(parts) if parts else np.array([], dtype=float)


def delete_model(db: store_mod.Store | str | os.PathLike[str], model_id: str) -> Path:
    """Remove a model: its row and scores (one transaction), then its files.

    Only ``<store folder>/models/<model_id>`` is removed, and only when it is
    a folder directly under ``models/`` (a model id is never a path). The row
    goes first: a crash in between leaves an orphan folder, never a model
    without its files. Returns the folder.
    """
    folder = artifact_dir(db, model_id)
    with store_mod.using(db) as store:
        if store_mod.get_model(store, model_id) is None:
            raise InputError(f"no model '{model_id}' in the store")
        store_mod.delete_model(store, model_id)
    if folder.is_dir() and store_mod.StoreFolder.of(db).is_model_folder(folder):
        shutil.rmtree(folder)
    return folder
