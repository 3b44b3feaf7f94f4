"""Weakly supervised training of the patch CNN: the study's "CNN + multiple-instance learning".

The method
----------
Only the patient's label is known (marrow metastasis or not), not which of
its patches shows tumour. Following Campanella et al. (Nat Med 2019; there
with the top-k instances of each slide) and the cMIL study (Ma et al., J
Transl Med 2026, after Cao et al., Theranostics 2020), the CNN is trained as
a *patch classifier* in which **every patch carries its patient's label**.
These labels are noisy by design: most patches of a metastatic patient show
normal marrow and are labelled 1. Normal patches occur in both classes, so the
network can only push them towards the base rate, while patterns seen only in
positive patients (tumour cells: small, round, scant cytoplasm, moulding,
rosettes) are pushed towards 1. The patch probability becomes a tumour
likeness, and the pooled features before the classifier an embedding that
knows the morphology. The aggregators of :mod:`cmil_core.model.mil` then run on the
trained network's embeddings: ``histogram`` (the study's recipe: patch
probabilities -> probability histogram + bag-of-words TF-IDF -> logistic
regression) or ``attention`` (gated attention MIL).

What one training run does (:func:`~cmil_core.model.cnn_training.train_cnn`):

* **Pixels in memory.** A *patch budget* per patient
  (``patches_per_patient``, chosen at random with the seed) of its
  quality-passed patches is read once, at the small ``input_px`` (96 px by
  default: 1.2 um per pixel for the 224 px patches of 0.5 um per pixel, a
  marrow cell still 8 px across), and kept as uint8
  (:class:`~cmil_core.model.patch_data.PatchSet`).
* **Class-balanced sampling by patient.** Each epoch draws
  ``patches_per_epoch`` patches with replacement: a class with probability
  1/2, a patient of that class uniformly, a patch of that patient uniformly.
  A patient with 5,000 patches does not outvote fifty with 100, and the
  minority class weighs as much as the majority.
* **Colour and stain augmentation, in torch, on whole batches**
  (:func:`~cmil_core.model.patch_data.augment_batch`): the 8 flips and
  90-degree rotations; stain jitter in optical density (Ruifrok and
  Johnston's colour deconvolution into
  haematoxylin, eosin and DAB-like channels; each channel's density scaled
  and shifted per patch, Tellez et al. 2018, and the stain vectors themselves
  perturbed, so another centre's stain hue is seen in training); brightness,
  contrast and saturation; a slight Gaussian blur on some patches. Batches
  are prepared in a background thread while the network trains on the
  previous one.
* **Mixed precision and channels-last**: bf16 autocast on CPUs that compute
  it natively (:func:`cmil_core.model.encoders.bf16_supported`), bf16 (or fp16
  with a gradient scaler) on CUDA, float32 elsewhere; batches and weights in
  channels-last layout (oneDNN's and cuDNN's fastest). The device is chosen
  automatically (CUDA when present); the code path is the same.
* **Early stopping on patient-level AUC** of an inner, patient-stratified
  validation split of the training patients (``val_fraction``); the patient
  score is the max (MIL's standard assumption: one tumour patch makes a
  positive patient) or the mean of its patch probabilities (``pooling``);
  ties are broken by the patient-balanced validation loss; the best epoch's
  weights are kept.
* **Checkpoints** after every epoch (model, optimiser, early-stopping state,
  history), written atomically (:mod:`cmil_core._atomic`): a killed run,
  started again with the same inputs, resumes after its last finished epoch
  and ends with the same weights as an uninterrupted run (every random draw
  is derived from the seed and the epoch and batch numbers, never from a
  running state).
* **Deterministic by seed** on a CPU with a fixed thread count: the same
  seed, patches and settings give the same weights, bit for bit.

Cross-validation without leakage (:func:`cross_validate`): the patients are
split by the same patient-stratified folds as
:func:`cmil_core.model.mil.cross_validate`; in each fold a CNN is trained on that
fold's training patients only (a ``PatchSet.subset`` that holds no pixel
of the held-out patients; its own inner split for early stopping is cut from
those training patients), the fold's patients are embedded with it, the
aggregator is fitted on the training patients' bags and scores the held-out
ones. In cross-validation a patient's bag is its budget of patches; the final
model embeds every quality-passed patch through the feature files.

Start from a seeded random initialisation or from a weights file
(``weights``: torch or safetensors state dict, e.g. ImageNet weights of
ResNet-18). Its cost against a plain PyTorch training loop: see
``bench/train.py`` and the README's Models section.

Where it lives
--------------
:mod:`cmil_core.model.finetune_config` (the settings), :mod:`cmil_core.model.patch_data`
(patches in memory, class-balanced draws, augmentation),
:mod:`cmil_core.model.cnn_training` (the training loop, early stopping,
checkpoints) and this module: the trained CNN as an encoder, leak-free
cross-validation and :func:`finetune_encoder`, the whole of it for ``train``
(with the final CNN's settings, its feature files and the checkpoints' folder key).

Example::

    from cmil_core.model.cnn_training import train_cnn
    from cmil_core.model.finetune_config import FinetuneConfig
    from cmil_core.model.patch_data import PatchSet

    data = PatchSet(pixels, owner, patch_ids, patient_ids, labels)  # uint8 [N, 96, 96, 3]
    trained = train_cnn(data, FinetuneConfig(max_epochs=10), seed=0)
    trained.backbone          # the trained CNN, up to its global pool
    trained.val_auc           # patient-level AUC of the inner validation split
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from cmil_core import _atomic
from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.model import backbones, encoders, mil
from cmil_core.model.cnn_training import TrainedCNN, train_cnn
from cmil_core.model.finetune_config import FinetuneConfig, ProgressFn, resolve_device
from cmil_core.model.patch_data import PatchSet, load_patch_set

__all__ = [
    "FinetuneResult",
    "cross_validate",
    "final_cnn_config",
    "finetune_encoder",
    "run_key",
    "save_backbone",
    "trained_encoder",
    "write_feature_files",
]


# --------------------------------------------------------------------------- the trained encoder


def save_backbone(backbone: nn.Module, folder: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write a backbone's state dict as ``encoder-<sha256[:12]>.pt`` in ``folder`` (atomically).

    Returns the file and the SHA-256 of its bytes. Keys are the architecture's
    (torchvision's for the ResNets), so :func:`cmil_core.model.encoders.load_encoder`
    reads it as any other weights file.
    """
    buffer = io.BytesIO()
    state = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    torch.save(state, buffer)
    blob = buffer.getvalue()
    sha = hashlib.sha256(blob).hexdigest()
    path = Path(folder) / f"encoder-{sha[:12]}.pt"
    if not path.is_file():
        _atomic.write_bytes(path, blob)
    return path, sha


def trained_encoder(backbone: nn.Module, config: FinetuneConfig) -> encoders.Encoder:
    """An :class:`~cmil_core.model.encoders.Encoder` of a trained backbone held in memory
    (cross-validation).

    Its spec names no file; ``weights_sha256`` is the digest of the
    backbone's saved state, so its features never mix with another's. Same
    fast path (BN folded, channels-last, bf16 where native) as every encoder.
    """
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, buffer)
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    precision = "fp32" if config.precision == "fp32" else "auto"
    resolved = "bf16" if precision == "auto" and encoders.bf16_supported() else "fp32"
    spec = encoders.EncoderSpec(
        name=config.architecture, embed_dim=backbones.ARCHITECTURES[config.architecture][1],
        input_px=config.input_px, mean=config.mean, std=config.std, weights_sha256=sha,
        precision=resolved,
    )
    encoder = encoders.Encoder(copy.deepcopy(backbone), spec)
    return encoder.to("cuda") if resolve_device(config).type == "cuda" else encoder


def _bags(encoder: encoders.Encoder, data: PatchSet, patients: Sequence[int]) -> list[np.ndarray]:
    return [encoder.embed(data.pixels[data.rows_of(int(p))]) for p in patients]


# --------------------------------------------------------------------------- cross-validation


def cross_validate(
    data: PatchSet,
    aggregator: str,
    *,
    k: int = 5,
    seed: int = 0,
    config: FinetuneConfig | None = None,
    params: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    checkpoints: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
) -> tuple[mil.CVResult, list[TrainedCNN]]:
    """Patient-stratified k-fold CV of "train the CNN, embed, aggregate", leak-free.

    The folds are sklearn's ``StratifiedKFold(k, shuffle=True,
    random_state=seed)`` over ``data``'s patients, as in
    :func:`cmil_core.model.mil.cross_validate` (the frozen baseline's folds for the
    same patients). For each fold: :func:`train_cnn` on
    ``data.subset(training patients)`` (no pixel of the held-out patients),
    every patient of the fold embedded with that CNN (its budget of patches
    as the bag), the aggregator fitted on the training patients' bags and
    scoring the held-out ones. ``checkpoints``: a folder for one checkpoint
    per fold (``fold-<i>.ckpt``). Returns the CV result (out-of-fold scores,
    folds as indices into ``data.patient_ids``) and the fold CNNs.
    """
    config = config or FinetuneConfig()
    y = data.labels
    smallest = int(np.bincount(y, minlength=2).min()) if y.size else 0
    if smallest < 2:
        raise InputError(
            f"a class has {smallest} patient(s) with patches; cross-validation needs at least 2"
        )
    mil.make_aggregator(aggregator, **dict(params or {}))  # check before any work
    notes: list[str] = []
    if smallest < k:
        notes.append(f"k reduced from {k} to {smallest}: the smaller class has only "
                     f"{smallest} patients")
        k = smallest
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    oof = np.full(y.size, np.nan)
    folds: list[list[int]] = []
    fold_aucs: list[float] = []
    cnns: list[TrainedCNN] = []
    for f, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(y.size), y)):

        def fold_progress(done: int, total: int, message: str, _f: int = f) -> None:
            if progress is not None:
                share = int(90 * done / total) if total > 0 else 90
                progress(100 * _f + share, 100 * k, f"fold {_f + 1}/{k}: {message}")

        ckpt = Path(checkpoints) / f"fold-{f + 1}.ckpt" if checkpoints is not None else None
        cnn = train_cnn(data.subset(train_idx), config, seed=seed, weights=weights,
                        checkpoint=ckpt, progress=fold_progress)
        cnns.append(cnn)
        encoder = trained_encoder(cnn.backbone, config)
        model = mil.make_aggregator(aggregator, **dict(params or {}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(_bags(encoder, data, train_idx), y[train_idx], seed=seed)
        notes.extend(f"fold {f + 1}: {w.message}" for w in caught)
        predictions = model.predict(_bags(encoder, data, test_idx))
        oof[test_idx] = [p.score for p in predictions]
        folds.append(sorted(int(i) for i in test_idx))
        test_y = y[test_idx]
        fold_aucs.append(0.5 if test_y.min() == test_y.max() else roc_auc(test_y, oof[test_idx]))
        if progress is not None:
            progress(100 * (f + 1), 100 * k, f"fold {f + 1}/{k}: AUC {fold_aucs[-1]:.3f}")
    cv = mil.CVResult(auc=roc_auc(y, oof), fold_aucs=fold_aucs, oof_scores=oof, folds=folds,
                      k=k, seed=seed, warnings=notes)
    return cv, cnns


# --------------------------------------------------------------------------- all of it, for train


@dataclass(eq=False)
class FinetuneResult:
    """What :func:`finetune_encoder` gives ``train``: CV, the final CNN's encoder and its file."""

    cv: mil.CVResult
    encoder: encoders.Encoder
    weights_path: Path
    weights_sha256: str
    patient_ids: list[str]
    config: FinetuneConfig
    folds: list[TrainedCNN]
    final: TrainedCNN
    work_dir: Path
    n_patches: int
    seconds: dict[str, float]
    data: PatchSet | None = None  # the patches in memory (their pixels at config.input_px)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for the model's config."""
        return {
            "method": "weakly supervised patch CNN (every patch labelled with its patient's "
                      "label; Campanella et al. 2019), trained inside each CV fold",
            "config": self.config.to_dict(),
            "weights_sha256": self.weights_sha256,
            "patches_in_memory": self.n_patches,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "folds": [
                {**{k: v for k, v in cnn.summary().items() if k != "history"},
                 "trained_patients": cnn.trained_patients}
                for cnn in self.folds
            ],
            "final": self.final.summary(),
        }


def finetune_encoder(
    patches: pd.DataFrame,
    patients: pd.DataFrame,
    *,
    aggregator: str,
    folds: int,
    seed: int,
    work_dir: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    params: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> FinetuneResult:
    """The ``--encoder-training finetune`` part of ``train``, on one cohort's tables.

    Reads the patch budget of every labelled patient into memory
    (:func:`load_patch_set`), cross-validates (:func:`cross_validate`), trains
    the final CNN on every training patient, and writes its backbone as
    ``encoder-<sha[:12]>.pt`` in ``work_dir`` (the caller copies it into the
    model folder). Checkpoints go to ``work_dir`` too, so a killed ``train``
    started again with the same inputs resumes; the caller deletes
    ``work_dir`` once the model is saved. ``progress(stage, done, total,
    message)`` with stages ``pixels``, ``cnn cross-validation``, ``final cnn``.
    """
    config = config or FinetuneConfig()
    timings: dict[str, float] = {}

    def report(stage: str) -> ProgressFn:
        def cb(done: int, total: int, message: str = "") -> None:
            if progress is not None:
                progress(stage, done, total, message)
        return cb

    t0 = time.perf_counter()
    data = load_patch_set(patches, patients, input_px=config.input_px,
                          patches_per_patient=config.patches_per_patient, seed=seed,
                          progress=report("pixels"))
    timings["read_pixels"] = time.perf_counter() - t0
    counts = np.bincount(data.labels, minlength=2) if data.labels.size else np.zeros(2, int)
    if counts.min() < 2 or folds < 2:
        raise InputError(
            "cross-validation needs --folds >= 2 and at least 2 patients of each class with "
            f"patches (has {int(counts[1])} positive and {int(counts[0])} negative)"
        )
    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cv, fold_cnns = cross_validate(data, aggregator, k=folds, seed=seed, config=config,
                                   params=params, weights=weights, checkpoints=root,
                                   progress=report("cnn cross-validation"))
    timings["cross_validation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final_config = final_cnn_config(config, fold_cnns)
    final = train_cnn(data, final_config, seed=seed, weights=weights,
                      checkpoint=root / "final.ckpt", progress=report("final cnn"))
    timings["final_cnn"] = time.perf_counter() - t0
    path, sha = save_backbone(final.backbone, root)
    encoder = encoders.load_encoder(
        config.architecture, path, input_px=config.input_px, mean=config.mean, std=config.std,
        precision="fp32" if config.precision == "fp32" else "auto",
    )
    if resolve_device(config).type == "cuda":
        encoder = encoder.to("cuda")
    return FinetuneResult(cv, encoder, path, sha, list(data.patient_ids), config, fold_cnns,
                          final, root, len(data), timings, data)


def final_cnn_config(config: FinetuneConfig, folds: Sequence[TrainedCNN]) -> FinetuneConfig:
    """The settings of the final CNN (every training patient) after the folds' CNNs.

    ``config.final == "fold_median"``: ``max_epochs`` = the median of the
    folds' best epochs (rounded up, at least 1) and no inner validation split
    (``val_fraction=0``), so the final CNN trains on every patient for about
    as long as the folds found best; ``"early_stopping"``: ``config`` as is.
    """
    if config.final != "fold_median" or not folds:
        return config
    epochs = max(1, math.ceil(float(np.median([cnn.best_epoch for cnn in folds]))))
    return FinetuneConfig.from_params(config.to_dict(), max_epochs=epochs, val_fraction=0.0)


def write_feature_files(
    data: PatchSet | None,
    patches: pd.DataFrame,
    root: str | os.PathLike[str],
    encoder: encoders.Encoder,
) -> int:
    """Feature files of the final CNN for every slide whose passed patches are all in memory.

    ``data``: the patches the CNN trained on (:attr:`FinetuneResult.data`),
    ``patches``: the training cohort's passed patches (columns of
    :func:`cmil_core.store.passed_patches`); ``encoder``: the final CNN as
    ``train`` saves it. Those pixels are the patches as the feature files
    read them (:func:`load_patch_set`), so embedding them here spares
    reading those slides again. Slides with patches outside the
    budget are left to :func:`cmil_core.model.features.slide_features`. Returns the
    number of files written.
    """
    from cmil_core.model.features import write_slide_features

    if data is None or len(data) == 0:
        return 0
    row_of = pd.Series(np.arange(len(data)), index=data.patch_ids)
    written = 0
    for _, rows in patches.groupby("slide_id", sort=True):
        ids = rows["patch_id"].to_numpy(np.int64)
        if not np.isin(ids, data.patch_ids).all():
            continue
        first = rows.iloc[0]
        emb = encoder.embed(data.pixels[row_of.loc[ids].to_numpy()])
        write_slide_features(root, rows[["patch_id", "x", "y", "size"]], emb, encoder.spec,
                             slide_sha256=str(first["sha256"]),
                             slide_name=Path(str(first["path"])).name,
                             mpp=float(first["mpp"]), tiling_key=str(first["tiling_key"]))
        written += 1
    return written


def run_key(cohort: str, seed: int, folds: int, aggregator: str, config: FinetuneConfig,
            params: Mapping[str, Any] | None, weights_sha256: str | None) -> str:
    """A folder name for one ``train`` run's checkpoints: the same inputs, the same folder."""
    blob = json.dumps({"cohort": cohort, "seed": seed, "folds": folds, "aggregator": aggregator,
                       "config": config.to_dict(), "params": dict(params or {}),
                       "weights": weights_sha256}, sort_keys=True, default=str)
    return f"finetune-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

