"""The training loop of the patch CNN: epochs, early stopping, checkpoints.

:func:`train_cnn` trains a :class:`PatchClassifier` (a backbone of
:mod:`cmil_core.model.backbones` and a linear head) on every patient of a
:class:`~cmil_core.model.patch_data.PatchSet` with its patient's label:
class-balanced draws, augmented batches prepared in a background thread
(:func:`train_epoch`, also timed by ``bench/train.py``), AdamW under autocast,
early stopping on the patient-level AUC of an inner validation split, and a
checkpoint after every epoch from which a killed run resumes to the same
weights. It returns a :class:`TrainedCNN`. The method, and why:
:mod:`cmil_core.model.finetune`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from cmil_core import _atomic
from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.ingest.slides import file_sha256
from cmil_core.model import backbones, weight_files
from cmil_core.model.aggregator import inner_split
from cmil_core.model.finetune_config import (
    FinetuneConfig,
    ProgressFn,
    autocast_dtype,
    resolve_device,
)
from cmil_core.model.patch_data import (
    PatchSet,
    augment_batch,
    class_balanced_draws,
    normalise,
    to_unit,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "PatchClassifier",
    "TrainedCNN",
    "train_cnn",
    "train_epoch",
]

CHECKPOINT_VERSION = 1
_EVAL_BATCH = 256


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
    backbone = weight_files.load_backbone(config.architecture, weights, seed=seed)
    dim = backbones.ARCHITECTURES[config.architecture][1]
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
            x = normalise(to_unit(torch.from_numpy(data.pixels[take]).to(device)), config)
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

    split = inner_split(data.labels, config.val_fraction,
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
