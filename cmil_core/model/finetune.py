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

What one training run does (:func:`train_cnn`):

* **Pixels in memory.** A *patch budget* per patient
  (``patches_per_patient``, chosen at random with the seed) of its
  quality-passed patches is read once, at the small ``input_px`` (96 px by
  default: 1.2 um per pixel for the 224 px patches of 0.5 um per pixel, a
  marrow cell still 8 px across), and kept as uint8 (:class:`PatchSet`).
* **Class-balanced sampling by patient.** Each epoch draws
  ``patches_per_epoch`` patches with replacement: a class with probability
  1/2, a patient of that class uniformly, a patch of that patient uniformly.
  A patient with 5,000 patches does not outvote fifty with 100, and the
  minority class weighs as much as the majority.
* **Colour and stain augmentation, in torch, on whole batches**
  (:func:`augment_batch`): the 8 flips and 90-degree rotations; stain jitter
  in optical density (Ruifrok and Johnston's colour deconvolution into
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
fold's training patients only (a :meth:`PatchSet.subset` that holds no pixel
of the held-out patients; its own inner split for early stopping is cut from
those training patients), the fold's patients are embedded with it, the
aggregator is fitted on the training patients' bags and scores the held-out
ones. In cross-validation a patient's bag is its budget of patches; the final
model embeds every quality-passed patch through the feature files.

Start from a seeded random initialisation or from a weights file
(``weights``: torch or safetensors state dict, e.g. ImageNet weights of
ResNet-18). Its cost against a plain PyTorch training loop: see
``bench/train.py`` and the README's Models section.

Example::

    from cmil_core.model.finetune import FinetuneConfig, PatchSet, train_cnn

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
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from cmil_core import _atomic
from cmil_core.analysis.stats import roc_auc
from cmil_core.errors import InputError
from cmil_core.ingest.slides import file_sha256
from cmil_core.model import encoders, mil

__all__ = [
    "CHECKPOINT_VERSION",
    "ENCODER_TRAINING",
    "FinetuneConfig",
    "FinetuneResult",
    "PatchClassifier",
    "PatchSet",
    "TrainedCNN",
    "augment_batch",
    "autocast_dtype",
    "class_balanced_draws",
    "cross_validate",
    "final_cnn_config",
    "finetune_encoder",
    "load_patch_set",
    "resolve_device",
    "run_key",
    "save_backbone",
    "train_cnn",
    "train_epoch",
    "trained_encoder",
    "write_feature_files",
]

#: How ``train`` gets its patch encoder: trained on the smears, or frozen as loaded.
ENCODER_TRAINING: tuple[str, ...] = ("finetune", "frozen")
CHECKPOINT_VERSION = 1
ProgressFn = Callable[[int, int, str], None]

# Ruifrok and Johnston (Anal Quant Cytol Histol 2001): optical density of
# haematoxylin, eosin and DAB per RGB channel (rows), as scikit-image's rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_MIN_OD_PIXEL = 1.0 / 255.0  # darkest value taken for a 0 pixel (finite optical density)
_EVAL_BATCH = 256


# --------------------------------------------------------------------------- settings


# name: (kind, low, high); kind "int", "float", "bool" or a tuple of choices
_FIELDS: dict[str, tuple[Any, float, float]] = {
    "architecture": (tuple(encoders.ARCHITECTURES), 0, 0),
    "input_px": ("int", 32, 1024),
    "patches_per_patient": ("int", 1, 1_000_000),
    "batch_size": ("int", 2, 4096),
    "patches_per_epoch": ("int", 2, 100_000_000),
    "max_epochs": ("int", 1, 10_000),
    "patience": ("int", 1, 10_000),
    "lr": ("float", 1e-7, 1.0),
    "weight_decay": ("float", 0.0, 1.0),
    "val_fraction": ("float", 0.0, 0.5),
    "pooling": (("max", "mean"), 0, 0),
    "augment": ("bool", 0, 0),
    "stain_sigma": ("float", 0.0, 1.0),
    "stain_bias": ("float", 0.0, 1.0),
    "stain_vector_sigma": ("float", 0.0, 1.0),
    "brightness": ("float", 0.0, 0.9),
    "contrast": ("float", 0.0, 0.9),
    "saturation": ("float", 0.0, 0.9),
    "blur_probability": ("float", 0.0, 1.0),
    "precision": (("auto", "bf16", "fp16", "fp32"), 0, 0),
    "device": (("auto", "cpu", "cuda"), 0, 0),
    "prefetch": ("int", 0, 64),
    "final": (("fold_median", "early_stopping"), 0, 0),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of the weakly supervised CNN training (defaults sized for two CPU cores).

    ``architecture``: a network of :data:`cmil_core.model.encoders.ARCHITECTURES`
    (``smallcnn``: 0.02 GMAC per 96 px patch). ``input_px``: side of the
    patches as the network sees them. ``patches_per_patient``: the budget of
    patches per patient kept in memory and trained on. ``patches_per_epoch``:
    class-balanced draws per epoch (an epoch costs the same whatever the
    cohort's size). ``max_epochs``, ``patience``, ``val_fraction``,
    ``pooling``: early stopping on the patient-level AUC (``max`` or ``mean``
    of patch probabilities) of an inner validation split. ``lr``,
    ``weight_decay``: AdamW. ``augment`` and the strengths
    ``stain_sigma`` (scale of each stain's density: 1 +- sigma),
    ``stain_bias`` (added density), ``stain_vector_sigma`` (jitter of the
    stain vectors), ``brightness``, ``contrast``, ``saturation`` (factors 1
    +- value) and ``blur_probability`` (share of patches blurred with a
    Gaussian of sigma 0.3-1.0 px). ``precision``: ``auto`` = bf16 where the
    hardware has it (fp16 with loss scaling on CUDA without bf16), else
    float32. ``device``: ``auto`` = CUDA when present. ``prefetch``: batches
    augmented ahead in a background thread (0: in turn). ``final``: how long
    the final CNN (on every training patient) trains: ``fold_median`` (the
    median of the cross-validation folds' best epochs, on all training
    patients, no inner validation split: no patient is held back and no
    epoch is spent past the best) or ``early_stopping`` (as in a fold).
    ``mean``, ``std``: input normalisation (ImageNet's, what pretrained
    weights expect).
    """

    architecture: str = "smallcnn"
    input_px: int = 96
    patches_per_patient: int = 64
    batch_size: int = 64
    # 1,536 / 12 / 4: on the full demo the CNN's validation AUC swings from epoch
    # to epoch, and 1,024 / 8 / 2 stopped before it learned (external AUC 0.78 /
    # 0.75, no better than frozen); these reached 0.84 / 0.83 (README, issue 13).
    patches_per_epoch: int = 1536
    max_epochs: int = 12
    patience: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    pooling: str = "max"
    augment: bool = True
    stain_sigma: float = 0.05
    stain_bias: float = 0.03
    stain_vector_sigma: float = 0.03
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    blur_probability: float = 0.2
    precision: str = "auto"
    device: str = "auto"
    prefetch: int = 2
    final: str = "fold_median"
    mean: tuple[float, float, float] = encoders.IMAGENET_MEAN
    std: tuple[float, float, float] = encoders.IMAGENET_STD

    def __post_init__(self) -> None:
        for name, (kind, low, high) in _FIELDS.items():
            value = getattr(self, name)
            if isinstance(kind, tuple):
                if value not in kind:
                    raise InputError(f"{name}={value!r} must be one of {', '.join(kind)}.")
            elif kind == "bool":
                if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
                    raise InputError(f"{name}={value!r} must be true or false (1 or 0).")
                object.__setattr__(self, name, bool(value))
            else:
                ok = isinstance(value, (int, np.integer)) if kind == "int" else isinstance(
                    value, (int, float, np.integer, np.floating))
                if isinstance(value, bool) or not ok or not math.isfinite(float(value)):
                    a_kind = "an integer" if kind == "int" else "a number"
                    raise InputError(f"{name}={value!r} must be {a_kind}.")
                if not low <= value <= high:
                    raise InputError(f"{name}={value!r} must lie in [{low:g}, {high:g}].")
                object.__setattr__(self, name, int(value) if kind == "int" else float(value))
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                triple = ()
            if len(triple) != 3 or not all(map(math.isfinite, triple)) or (
                    name == "std" and min(triple) <= 0):
                raise InputError(f"{name}={value!r} must be three finite numbers"
                                 f"{' above 0' if name == 'std' else ''}.")
            object.__setattr__(self, name, triple)

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any] | None = None, **overrides: Any
    ) -> FinetuneConfig:
        """A config from ``NAME=VALUE`` settings (the command line's ``--cnn-param``);
        unknown names raise."""
        values = {**dict(params or {}), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(
                f"unknown CNN training setting {unknown[0]!r}; expected one of "
                f"{', '.join(sorted(known))}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


def resolve_device(config: FinetuneConfig) -> torch.device:
    """``cuda`` when the config says so or says ``auto`` and a GPU is present, else ``cpu``."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' but torch sees no CUDA device.")
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``config.precision`` on ``device`` (None: float32 throughout).

    ``auto``: bf16 on a CUDA GPU that has it, else fp16 (with loss scaling);
    bf16 on a CPU that computes it natively (AVX-512 BF16 or AMX), else
    float32: emulated bf16 is several times slower than float32.
    """
    if config.precision == "fp32":
        return None
    if device.type == "cuda":
        if config.precision == "fp16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if config.precision == "fp16":
        raise InputError("precision='fp16' needs a CUDA device; on a CPU use bf16 or fp32.")
    if config.precision == "bf16" or encoders.bf16_supported():
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class PatchSet:
    """Patches of labelled patients, in memory: what the CNN trains on.

    ``pixels``: uint8 ``[N, px, px, 3]``; ``owner``: int64 ``[N]``, the
    index in ``patient_ids`` of each patch's patient; ``patch_ids``: int64
    ``[N]`` (``patches.patch_id``); ``patient_ids`` and ``labels`` (0/1,
    int64): one per patient, every patient with at least one patch.
    """

    pixels: npt.NDArray[np.uint8]
    owner: npt.NDArray[np.int64]
    patch_ids: npt.NDArray[np.int64]
    patient_ids: list[str]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        px = self.pixels
        if px.dtype != np.uint8 or px.ndim != 4 or px.shape[3] != 3 or px.shape[1] != px.shape[2]:
            raise InputError(f"pixels must be uint8 [N, px, px, 3], got {px.dtype} {px.shape}.")
        n, m = px.shape[0], len(self.patient_ids)
        object.__setattr__(self, "owner", np.asarray(self.owner, dtype=np.int64))
        object.__setattr__(self, "patch_ids", np.asarray(self.patch_ids, dtype=np.int64))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        if self.owner.shape != (n,) or self.patch_ids.shape != (n,) or self.labels.shape != (m,):
            raise InputError(f"{n} patches and {m} patients: owner, patch_ids and labels disagree.")
        if n and (self.owner.min() < 0 or self.owner.max() >= m):
            raise InputError("owner holds an index outside the patient list.")
        if not np.isin(self.labels, (0, 1)).all():
            raise InputError("labels must be 0 or 1.")
        counts = np.bincount(self.owner, minlength=m)
        if m and counts.min() == 0:
            raise InputError(f"patient {self.patient_ids[int(np.argmin(counts))]} has no patch.")

    def __len__(self) -> int:
        return int(self.owner.size)

    @property
    def input_px(self) -> int:
        return int(self.pixels.shape[1])

    def rows_of(self, patient: int) -> npt.NDArray[np.int64]:
        """Row indices of one patient's patches."""
        return np.flatnonzero(self.owner == patient)

    def subset(self, patients: Sequence[int]) -> PatchSet:
        """A new set holding only ``patients`` (indices, kept in that order), pixels copied."""
        order = [int(i) for i in patients]
        remap = np.full(len(self.patient_ids), -1, dtype=np.int64)
        remap[order] = np.arange(len(order))
        keep = np.flatnonzero(remap[self.owner] >= 0)
        return PatchSet(self.pixels[keep], remap[self.owner[keep]], self.patch_ids[keep],
                        [self.patient_ids[i] for i in order], self.labels[order])

    def fingerprint(self) -> str:
        """SHA-256 of patients, labels, patch ids and pixels: what a checkpoint was trained on."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.patient_ids, self.labels.tolist()]).encode())
        for array in (self.owner, self.patch_ids, self.pixels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def load_patch_set(
    patches: pd.DataFrame,
    patients: pd.DataFrame,
    *,
    input_px: int,
    patches_per_patient: int,
    seed: int,
    workers: int = 2,
    progress: ProgressFn | None = None,
) -> PatchSet:
    """Read a budget of every labelled patient's quality-passed patches into memory.

    ``patches``: columns ``slide_id, patient_id, path, mpp, patch_id, x, y,
    size`` (:func:`cmil_core.store.passed_patches`); ``patients``: columns
    ``patient_id, bm_metastasis`` (patients without a label or without a
    patch are left out; the others keep the table's order). Each patient
    gives at most ``patches_per_patient`` patches, chosen at random with
    ``seed`` (sorted back into slide order); each is read with
    :func:`cmil_core.ingest.tiling.read_patch` at ``input_px``, exactly as the
    feature files read them. ``workers`` threads read slides in parallel.
    """
    from cmil_core.ingest.slides import open_slide
    from cmil_core.ingest.tiling import map_ordered

    need = {"slide_id", "patient_id", "path", "mpp", "patch_id", "x", "y", "size"}
    missing = sorted(need - set(patches.columns))
    if missing:
        raise InputError(f"the patch table lacks column(s) {', '.join(missing)}.")
    rng = np.random.default_rng([seed, 7])
    by_patient = {str(k): rows for k, rows in patches.groupby("patient_id", sort=False)}
    ids: list[str] = []
    labels: list[int] = []
    chosen: list[pd.DataFrame] = []
    for row in patients.itertuples():
        rows = by_patient.get(str(row.patient_id))
        if rows is None or pd.isna(row.bm_metastasis):
            continue
        if len(rows) > patches_per_patient:
            pick = np.sort(rng.choice(len(rows), patches_per_patient, replace=False))
            rows = rows.iloc[pick]
        chosen.append(rows.assign(_owner=len(ids)))
        ids.append(str(row.patient_id))
        labels.append(int(row.bm_metastasis))
    if not chosen:
        return PatchSet(np.empty((0, input_px, input_px, 3), np.uint8), np.empty(0, np.int64),
                        np.empty(0, np.int64), [], np.empty(0, np.int64))
    table = pd.concat(chosen, ignore_index=True)
    pixels = np.empty((len(table), input_px, input_px, 3), dtype=np.uint8)
    slides = list(table.groupby("slide_id", sort=True))

    def read(item: tuple[Any, pd.DataFrame]) -> int:
        from cmil_core.ingest.tiling import read_patch

        rows = item[1]
        first = rows.iloc[0]
        with open_slide(first["path"], mpp=float(first["mpp"])) as slide:
            for index, x, y, size in zip(rows.index, rows["x"], rows["y"], rows["size"],
                                         strict=True):
                pixels[index] = read_patch(slide, int(x), int(y), int(size), input_px)
        return len(rows)

    done = 0
    for count in map_ordered(read, slides, workers if workers > 1 else 0):
        done += count
        if progress is not None:
            progress(done, len(table), "patches read into memory")
    return PatchSet(pixels, table["_owner"].to_numpy(np.int64),
                    table["patch_id"].to_numpy(np.int64), ids, np.asarray(labels, np.int64))


def class_balanced_draws(
    owner: npt.NDArray[np.int64], labels: npt.NDArray[np.int64], n: int, rng: np.random.Generator,
) -> npt.NDArray[np.int64]:
    """``n`` patch rows drawn with replacement: class 1/2, patient uniform in class, patch uniform.

    ``owner``: the patient index of each candidate row; ``labels``: one per
    patient index (patients without a row in ``owner`` are never drawn).
    Returns positions in ``owner``. A patch of patient ``i`` (class ``c``,
    ``n_i`` patches) is drawn with probability ``1 / (2 * n_patients_in_c *
    n_i)``; with one class present, that class takes every draw.
    """
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=labels.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = [np.flatnonzero((labels == c) & (counts > 0)) for c in (0, 1)]
    present = [c for c in (0, 1) if members[c].size]
    cls = rng.integers(0, 2, n) if len(present) == 2 else np.full(n, present[0])
    out = np.empty(n, dtype=np.int64)
    for c in present:
        where = np.flatnonzero(cls == c)
        patient = members[c][rng.integers(0, members[c].size, where.size)]
        offset = np.floor(rng.random(where.size) * counts[patient]).astype(np.int64)
        out[where] = order[starts[patient] + offset]
    return out


# --------------------------------------------------------------------------- augmentation


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).mul_(1.0 / 255.0)


def _normalise(x: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    """float ``[B, H, W, 3]`` in [0, 1] -> normalised ``[B, 3, H, W]`` channels-last view."""
    mean = torch.tensor(config.mean, device=x.device)
    std = torch.tensor(config.std, device=x.device)
    return ((x - mean) / std).permute(0, 3, 1, 2)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], spread: float) -> torch.Tensor:
    """Uniform in [1 - spread, 1 + spread]."""
    return 1.0 + spread * (2.0 * torch.rand(shape, generator=gen) - 1.0)


def augment_batch(
    batch: torch.Tensor, config: FinetuneConfig, generator: torch.Generator,
) -> torch.Tensor:
    """Augment and normalise uint8 patches ``[B, H, W, 3]``: float32 ``[B, 3, H, W]``,
    channels-last.

    In order, each patch independently (random numbers from ``generator``,
    on the CPU, so a seed gives the same batch on any device):

    1. one of the 8 symmetries of the square (flips and 90-degree turns):
       a smear has no up or down;
    2. stain jitter in optical density ``OD = -log(I)``: deconvolved into
       haematoxylin, eosin and DAB densities with Ruifrok and Johnston's
       vectors, each density scaled by ``1 +- stain_sigma`` and shifted by
       ``+- stain_bias``, recomposed with stain vectors jittered by
       ``stain_vector_sigma`` (another centre's stain hue);
    3. brightness, contrast (around the patch's mean grey) and saturation
       (around each pixel's grey), each a factor ``1 +- value``;
    4. with probability ``blur_probability``, a 3 x 3 Gaussian blur (one
       sigma in [0.3, 1.0] px per batch; reflected borders);
    5. clipped to [0, 1] and normalised with ``mean`` and ``std``.

    With ``config.augment`` false only step 5 runs.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
        raise InputError(f"augment_batch takes uint8 [B, H, W, 3], got {batch.dtype} "
                         f"{tuple(batch.shape)}.")
    device = batch.device
    if not config.augment or batch.shape[0] == 0:
        return _normalise(_to_unit(batch), config)
    b, h, w, _ = batch.shape
    gen = generator

    # 1. symmetries of the square, on uint8 (cheap): group the batch by transform
    turn = torch.randint(0, 4, (b,), generator=gen)
    flip = torch.randint(0, 2, (b,), generator=gen)
    x = batch.clone()
    for k in range(4):
        for f in range(2):
            idx = torch.nonzero((turn == k) & (flip == f)).flatten().to(device)
            if idx.numel() == 0 or (k == 0 and f == 0):
                continue
            part = x.index_select(0, idx)
            if f:
                part = part.flip(2)
            if k:
                part = torch.rot90(part, k, dims=(1, 2))
            x.index_copy_(0, idx, part.contiguous())

    # 2. stain jitter in optical density
    pix = _to_unit(x).reshape(b, h * w, 3)
    od = -torch.log(pix.clamp_(min=_MIN_OD_PIXEL))
    hed = od @ _HED_FROM_RGB.to(device)
    alpha = _uniform(gen, (b, 1, 3), config.stain_sigma).to(device)
    beta = (config.stain_bias * (2.0 * torch.rand((b, 1, 3), generator=gen) - 1.0)).to(device)
    vectors = _RGB_FROM_HED + config.stain_vector_sigma * torch.randn((b, 3, 3), generator=gen)
    vectors = vectors.clamp_(min=0.0).to(device)
    od = torch.bmm(hed * alpha + beta, vectors)
    pix = torch.exp(-od.clamp_(min=0.0))

    # 3. brightness, contrast, saturation
    bright = _uniform(gen, (b, 1, 1), config.brightness).to(device)
    contrast = _uniform(gen, (b, 1, 1), config.contrast).to(device)
    saturation = _uniform(gen, (b, 1, 1), config.saturation).to(device)
    pix = pix * bright
    grey = pix @ _LUMA.to(device)
    mean_grey = grey.mean(dim=1, keepdim=True).unsqueeze(2)
    pix = (pix - mean_grey) * contrast + mean_grey
    grey = (pix @ _LUMA.to(device)).unsqueeze(2)
    pix = grey + (pix - grey) * saturation
    pix = pix.clamp_(0.0, 1.0)

    # 4. slight blur on some patches (depthwise 3 x 3 Gaussian)
    chosen = torch.rand((b,), generator=gen) < config.blur_probability
    sigma = float(0.3 + 0.7 * torch.rand((), generator=gen))
    img = pix.reshape(b, h, w, 3)
    if bool(chosen.any()):
        taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2.0 * sigma * sigma))
        taps = taps / taps.sum()
        kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 3, 3).contiguous().to(device)
        idx = torch.nonzero(chosen).flatten().to(device)
        part = img.index_select(0, idx).permute(0, 3, 1, 2)
        part = F.conv2d(F.pad(part, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)
        img = img.index_copy(0, idx, part.permute(0, 2, 3, 1).contiguous())
    return _normalise(img, config)


# --------------------------------------------------------------------------- the network


class PatchClassifier(nn.Module):
    """A backbone (CNN up to its global pool) and a linear head: patch -> logit of metastasis."""

    def __init__(self, backbone: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone(x)).squeeze(1)
        return logits


def _new_classifier(config: FinetuneConfig, seed: int,
                    weights: str | os.PathLike[str] | None) -> PatchClassifier:
    backbone = encoders.load_backbone(config.architecture, weights, seed=seed)
    dim = encoders.ARCHITECTURES[config.architecture][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PatchClassifier(backbone, dim)
    return model


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from integers (e.g. seed, epoch, batch)."""
    digest = hashlib.sha256(json.dumps(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _prefetched(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``items`` produced up to ``depth`` ahead in a background thread (0: in this thread)."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((True, item), timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((True, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            slots.put((False, exc))

    thread = threading.Thread(target=produce, name="cmil-finetune-batches", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _batches(
    data: PatchSet, rows: npt.NDArray[np.int64], config: FinetuneConfig, keys: tuple[int, ...],
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Augmented batches ``(x, y)`` of ``rows``, each from its own seeded generator."""
    labels = data.labels[data.owner].astype(np.float32)
    for i, start in enumerate(range(0, rows.size, config.batch_size)):
        take = rows[start : start + config.batch_size]
        if take.size < 2:  # batch norm needs two patches
            continue
        raw = torch.from_numpy(data.pixels[take])
        if device.type == "cuda":
            raw = raw.pin_memory().to(device, non_blocking=True)
        x = augment_batch(raw, config, _generator(*keys, i))
        y = torch.from_numpy(labels[take]).to(device)
        yield x.contiguous(memory_format=torch.channels_last), y


def train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    data: PatchSet,
    rows: npt.NDArray[np.int64],
    config: FinetuneConfig,
    *,
    keys: tuple[int, ...],
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, int]:
    """One pass over the patches ``rows`` of ``data``, in batches; returns (mean loss, patches).

    The training step of :func:`train_cnn` (and of ``bench/train.py``):
    batches of ``config.batch_size`` are augmented (:func:`augment_batch`,
    random numbers seeded from ``keys`` and the batch number) up to
    ``config.prefetch`` batches ahead in a background thread, while the
    network (channels-last) takes a step of AdamW on the binary cross-entropy
    of the current one under autocast when ``amp_dtype`` is given (with a
    gradient scaler for fp16). A batch of one patch is skipped (batch norm).
    """
    device = next(model.parameters()).device
    batches = _prefetched(_batches(data, rows, config, keys, device), config.prefetch)
    model.train()
    device_type = device.type
    total, seen = 0.0, 0
    for x, y in batches:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimiser.zero_grad(set_to_none=True)
        if scaler is not None:
            torch.autograd.backward(scaler.scale(loss))  # .backward() is untyped
            scaler.step(optimiser)
            scaler.update()
        else:
            torch.autograd.backward(loss)
            optimiser.step()
        total += float(loss.detach()) * x.shape[0]
        seen += int(x.shape[0])
    return (total / seen if seen else float("nan")), seen


def _patch_probabilities(
    model: PatchClassifier, data: PatchSet, rows: npt.NDArray[np.int64],
    config: FinetuneConfig, amp_dtype: torch.dtype | None,
) -> npt.NDArray[np.float64]:
    device = next(model.parameters()).device
    model.eval()
    out = np.empty(rows.size, dtype=np.float64)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                enabled=amp_dtype is not None):
        for start in range(0, rows.size, _EVAL_BATCH):
            take = rows[start : start + _EVAL_BATCH]
            x = _normalise(_to_unit(torch.from_numpy(data.pixels[take]).to(device)), config)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            out[start : start + take.size] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def _validate(model: PatchClassifier, data: PatchSet, patients: npt.NDArray[np.int64],
              config: FinetuneConfig, amp_dtype: torch.dtype | None) -> tuple[float, float]:
    """Patient-level AUC (max or mean of patch probabilities) and patient-balanced BCE."""
    rows = np.flatnonzero(np.isin(data.owner, patients))
    q = np.clip(_patch_probabilities(model, data, rows, config, amp_dtype), 1e-7, 1 - 1e-7)
    owner = data.owner[rows]
    scores, losses = np.empty(patients.size), np.empty(patients.size)
    y = data.labels[patients]
    for j, p in enumerate(patients):
        mine = q[owner == p]
        scores[j] = mine.max() if config.pooling == "max" else mine.mean()
        losses[j] = -np.mean(np.log(mine) if y[j] == 1 else np.log1p(-mine))
    loss = 0.5 * (losses[y == 1].mean() + losses[y == 0].mean())
    auc = 0.5 if y.min() == y.max() else roc_auc(y, scores)
    return float(auc), float(loss)


@dataclass(eq=False)
class TrainedCNN:
    """The result of :func:`train_cnn`.

    ``model``: the patch classifier at its best epoch (eval mode, on the CPU);
    ``backbone``: its CNN up to the global pool (what becomes the encoder);
    ``history``: one record per epoch (``train_loss``, ``val_auc``,
    ``val_loss``, ``seconds``, ``patches``); ``best_epoch``; ``val_auc`` (of the
    best epoch, None without a validation split); ``trained_patients`` and
    ``validation_patients``: the patient ids whose patches the network was
    trained on and early-stopped on; ``resumed_from``: the last finished
    epoch found in a checkpoint (0: a fresh start).
    """

    model: PatchClassifier
    config: FinetuneConfig
    history: list[dict[str, Any]]
    best_epoch: int
    val_auc: float | None
    trained_patients: list[str]
    validation_patients: list[str]
    resumed_from: int = 0
    patches_per_second: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def summary(self) -> dict[str, Any]:
        """JSON-ready account of the training (for a model's config)."""
        return {"best_epoch": self.best_epoch, "epochs_run": len(self.history),
                "val_auc": self.val_auc, "n_trained_patients": len(self.trained_patients),
                "n_validation_patients": len(self.validation_patients),
                "resumed_from": self.resumed_from,
                "patches_per_second": round(self.patches_per_second, 1),
                "history": self.history, **self.info}


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_cnn(
    data: PatchSet,
    config: FinetuneConfig | None = None,
    *,
    seed: int = 0,
    weights: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
) -> TrainedCNN:
    """Train the patch CNN on every patient of ``data`` with its patient's label (module docstring).

    ``weights``: the starting weights (a state dict file of
    ``config.architecture``), else a seeded random initialisation.
    ``checkpoint``: a file written after every epoch; when it exists and was
    made by the same inputs (data, settings, seed, starting weights), training
    resumes after its last epoch (a finished run returns at once). A
    checkpoint of other inputs is ignored and overwritten.
    ``progress(done, total, message)`` after every epoch.

    The inner validation patients (``config.val_fraction`` of each class,
    at least one) are cut from ``data``'s patients with the seed; with fewer
    than two patients in a class there is no validation and the last epoch is kept.
    """
    config = config or FinetuneConfig()
    if len(data) == 0:
        raise InputError("no patches to train the CNN on.")
    if data.input_px != config.input_px:
        raise InputError(f"patches of {data.input_px} px but input_px={config.input_px}.")
    if np.unique(data.labels).size < 2:
        raise InputError("the CNN needs patients of both classes to train on.")
    device = resolve_device(config)
    amp_dtype = autocast_dtype(config, device)
    weights_sha = file_sha256(Path(weights)) if weights is not None else None
    fingerprint = hashlib.sha256(json.dumps({
        "data": data.fingerprint(), "config": config.to_dict(), "seed": seed,
        "weights": weights_sha, "version": CHECKPOINT_VERSION, "torch": torch.__version__,
        "device": device.type,
    }, sort_keys=True).encode()).hexdigest()

    split = mil.inner_split(data.labels, config.val_fraction,
                            np.random.default_rng([seed, 11]))
    train_patients, val_patients = split if split is not None else (
        np.arange(len(data.patient_ids)), np.empty(0, np.int64))
    train_rows = np.flatnonzero(np.isin(data.owner, train_patients))

    model = _new_classifier(config, seed, weights).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"key": None, "epoch": 0, "state": None, "bad": 0}
    start_epoch, resumed_from, finished = 1, 0, False

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.is_file():
        saved = _read_checkpoint(ckpt_path)
        if saved is not None and saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimiser.load_state_dict(saved["optimizer"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            history = list(saved["history"])
            best = {"key": tuple(saved["best_key"]) if saved["best_key"] is not None else None,
                    "epoch": int(saved["best_epoch"]), "state": saved["best_state"],
                    "bad": int(saved["bad_epochs"])}
            resumed_from = int(saved["epoch"])
            start_epoch = resumed_from + 1
            finished = bool(saved["finished"])

    total_seconds, total_patches = 0.0, 0
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.max_epochs + 1):
        if finished:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch, 3])
        rows_train = train_rows[class_balanced_draws(
            data.owner[train_rows], data.labels, config.patches_per_epoch, rng)]
        loss, seen = train_epoch(model, optimiser, data, rows_train, config, keys=(seed, epoch),
                                 amp_dtype=amp_dtype, scaler=scaler)
        train_seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"epoch": epoch, "train_loss": round(loss, 6), "patches": seen}
        stop = False
        if split is not None:
            auc, val_loss = _validate(model, data, val_patients, config, amp_dtype)
            record.update(val_auc=auc, val_loss=round(val_loss, 6))
            key = (round(auc, 12), -val_loss)
            if best["key"] is None or key > best["key"]:
                best = {"key": key, "epoch": epoch, "state": _state_copy(model), "bad": 0}
            else:
                best["bad"] += 1
                stop = best["bad"] >= config.patience
        else:
            best = {"key": None, "epoch": epoch, "state": None, "bad": 0}
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        total_seconds += train_seconds
        total_patches += seen
        finished = stop or epoch == config.max_epochs
        if ckpt_path is not None:
            _write_checkpoint(ckpt_path, {
                "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "epoch": epoch,
                "model": _state_copy(model), "optimizer": optimiser.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "history": history, "best_key": list(best["key"]) if best["key"] else None,
                "best_epoch": best["epoch"], "best_state": best["state"],
                "bad_epochs": best["bad"], "finished": finished,
            })
        if progress is not None:
            text = f"epoch {epoch}: loss {loss:.3f}"
            if "val_auc" in record:
                text += f", validation AUC {record['val_auc']:.3f}"
            progress(epoch, config.max_epochs, text)
        if stop:
            break

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model = model.to("cpu").eval()
    model = model.to(memory_format=torch.contiguous_format)
    return TrainedCNN(
        model=model, config=config, history=history, best_epoch=int(best["epoch"]),
        val_auc=float(best["key"][0]) if best["key"] is not None else None,
        trained_patients=[data.patient_ids[i] for i in train_patients],
        validation_patients=[data.patient_ids[i] for i in val_patients],
        resumed_from=resumed_from,
        patches_per_second=total_patches / total_seconds if total_seconds > 0 else 0.0,
        info={"device": device.type, "precision": str(amp_dtype).replace("torch.", "")
              if amp_dtype is not None else "float32",
              "started_from": weights_sha or f"seed {seed}"},
    )


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic.write_bytes(path, buffer.getvalue())


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents, or None when it cannot be read (then training starts afresh)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - truncated or foreign file: any error means "unusable"
        return None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        return None
    return state


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
        name=config.architecture, embed_dim=encoders.ARCHITECTURES[config.architecture][1],
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

