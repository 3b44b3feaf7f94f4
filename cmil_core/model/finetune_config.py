"""The settings of the weakly supervised patch-CNN training, and what they resolve to.

:class:`FinetuneConfig` holds every setting of :mod:`cmil_core.model.finetune`
(the command line's ``--cnn-param NAME=VALUE``), checked when it is made;
:func:`resolve_device` and :func:`autocast_dtype` turn its ``device`` and
``precision`` into a torch device and an autocast dtype on this machine.
:data:`ENCODER_TRAINING` names the ways ``train`` gets its patch encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from cmil_core.errors import InputError
from cmil_core.model import backbones, encoders

__all__ = [
    "ENCODER_TRAINING",
    "FinetuneConfig",
    "ProgressFn",
    "autocast_dtype",
    "resolve_device",
]

#: How ``train`` gets its patch encoder: trained on the smears, or frozen as loaded.
ENCODER_TRAINING: tuple[str, ...] = ("finetune", "frozen")
ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, message)``."""


# name: (kind, low, high); kind "int", "float", "bool" or a tuple of choices
_FIELDS: dict[str, tuple[Any, float, float]] = {
    "architecture": (tuple(backbones.ARCHITECTURES), 0, 0),
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

    ``architecture``: a network of :data:`cmil_core.model.backbones.ARCHITECTURES`
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
    the final CNN (on every training patient) trains: ``early_stopping`` (the
    default: as in a fold, stopped on the patient-level AUC of an inner
    patient split) or ``fold_median`` (the median of the cross-validation
    folds' best epochs, on all training patients, no inner validation split).
    On the full demo (one seed) ``early_stopping`` generalised better to the
    external centres: AUC 0.862 / 0.927 against 0.837 / 0.834, and centre A's
    scores no longer all above the training cutoff (README, "The trained CNN").
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
    final: str = "early_stopping"
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
