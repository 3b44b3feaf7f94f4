"""The patches the patch CNN trains on: in memory, drawn class-balanced, augmented.

:class:`PatchSet` holds a budget of every labelled patient's quality-passed
patches as uint8 pixels (:func:`load_patch_set` reads them, as the feature
files read them); :func:`class_balanced_draws` draws an epoch's patches (a
class with probability 1/2, a patient of that class uniformly, a patch of that
patient uniformly); :func:`augment_batch` applies the symmetries, the stain
jitter in optical density (Ruifrok and Johnston; Tellez et al. 2018), the
colour jitter and a slight blur to a batch in torch, then normalises it
(:func:`to_unit` and :func:`normalise`, which the evaluation of a patch
without augmentation uses too). The method: :mod:`cmil_core.model.finetune`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F

from cmil_core.errors import InputError
from cmil_core.model.finetune_config import FinetuneConfig, ProgressFn

__all__ = [
    "PatchSet",
    "augment_batch",
    "class_balanced_draws",
    "load_patch_set",
    "normalise",
    "to_unit",
]

# Ruifrok and Johnston (Anal Quant Cytol Histol 2001): optical density of
# haematoxylin, eosin and DAB per RGB channel (rows), as scikit-image's rgb_from_hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_MIN_OD_PIXEL = 1.0 / 255.0  # darkest value taken for a 0 pixel (finite optical density)


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
    :func:`cmil_core.ingest.patch_reading.read_patch` at ``input_px``, exactly as the
    feature files read them. ``workers`` threads read slides in parallel.
    """
    from cmil_core.ingest.patch_reading import map_ordered
    from cmil_core.ingest.slides import open_slide

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
        from cmil_core.ingest.patch_reading import read_patch

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


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).mul_(1.0 / 255.0)


def normalise(x: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
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
        return normalise(to_unit(batch), config)
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
    pix = to_unit(x).reshape(b, h * w, 3)
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
    return normalise(img, config)
