"""CNN patch encoders: a patch in, an embedding vector out.

An *encoder* maps a batch of RGB patches, uint8 ``[B, H, W, 3]`` as
:func:`cmil_core.ingest.patch_reading.read_patch` returns them, to float32 embeddings
``[B, D]``: the pooled output of a convolutional network, before any
classifier. The multiple-instance aggregators (:mod:`cmil_core.model.mil`) work on
these vectors; :mod:`cmil_core.model.features` stores them per slide.

Architectures
-------------
``resnet18``, ``resnet34`` (512-d) and ``resnet50`` (2048-d)
    The ResNets of He et al. (CVPR 2016), defined here with torchvision's
    module and parameter names (``conv1, bn1, layer1..layer4`` of
    ``BasicBlock`` / ``Bottleneck`` with ``conv1, bn1, conv2, bn2, (conv3,
    bn3), downsample.0, downsample.1``), stride on the 3x3 convolution of the
    bottleneck ("ResNet v1.5", as torchvision). A torchvision ``state_dict``
    file therefore loads as is (torchvision itself cannot be installed next to
    the CPU build of torch). The classifier ``fc`` is dropped: the encoder ends
    at the global average pool.
``smallcnn`` (128-d)
    Six 3x3 convolution blocks (batch norm, ReLU; widths 16-32-64-64-128-128,
    four of them with stride 2) and a global average pool: about 0.11 GMAC per
    224 px patch against ResNet-18's 1.8, thousands of patches per second on
    two cores. For the demo and for quick experiments.
``torchscript``
    Any TorchScript module (``torch.jit.save`` of a traced or scripted model)
    that maps float ``[B, 3, H, W]`` to ``[B, D]``: the way to bring any other
    network, including pathology foundation models exported by their users.
    (torch 2.13 deprecates TorchScript in favour of ``torch.export``; its
    files still load, and the deprecation warning is silenced here.)
``export``
    A ``torch.export`` program saved with ``torch.export.save`` (``.pt2``),
    loaded with ``torch.export.load``: the successor of TorchScript, and
    the way to bring a pathology foundation model (UNI, Virchow, CONCH...)
    that its user exported. It must map float ``[B, 3, H, W]`` to ``[B, D]``
    with a dynamic batch dimension (``dynamic_shapes=({0:
    torch.export.Dim("batch")},)``); a program exported for one batch size
    is refused. Give ``input_px``, ``mean`` and ``std`` as the model was
    trained (``--input-px``, ``--mean``, ``--std`` on the command line).

Weights come only from local files (nothing is ever downloaded):
:func:`load_encoder` accepts a ``state_dict`` saved with ``torch.save``
(``.pth`` / ``.pt``) or in the ``safetensors`` format (recognised by its
header, whatever the file's name; no code is executed on loading it),
optionally wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` (torch
files) and with a ``module.`` prefix (``DataParallel``). Keys must
match the architecture exactly, the classifier head ``fc.*`` excepted; a file
that does not fit raises :class:`~cmil_core.errors.InputError` naming the file
and the first missing and unexpected keys.

Without a weights file a network is initialised from ``seed`` (torchvision's
scheme: Kaiming-normal convolutions, batch norm as the identity).
**Random-initialisation features are only a baseline**: random convolutions
do capture colour and texture statistics, enough for the synthetic demo, but
real studies need ImageNet-pretrained, self-supervised or trained weights.
The digest of the seeded parameters is recorded in the spec, so a change of
torch's random number generator can never silently mix two sets of weights.

Preprocessing and the spec
--------------------------
Every patch is resized to ``input_px`` (bilinear with antialiasing, only when
its size differs), scaled to [0, 1] and normalised per channel with ``mean``
and ``std`` (ImageNet's by default, what torchvision's weights expect).
:class:`EncoderSpec` records all of it, with the weights' SHA-256 or the seed,
and :attr:`EncoderSpec.key` hashes everything that changes the features:
feature files are named by it and reused only when it matches.

The fast path
-------------
:meth:`Encoder.embed` runs a copy of the network prepared for inference:

1. batch norm folded into the preceding convolution (exact algebra in eval
   mode; for the architectures defined here);
2. ``channels_last`` memory format: a ``[B, H, W, 3]`` uint8 batch *is* a
   channels-last ``[B, 3, H, W]`` tensor, so no transpose is ever copied, and
   oneDNN's convolutions run fastest in that layout;
3. ``torch.inference_mode`` (no autograd bookkeeping at all);
4. bfloat16 autocast where the CPU computes it natively (AVX-512 BF16 or
   AMX; :func:`bf16_supported`): convolutions and matrix products in bf16,
   accumulated in float32. ``precision="fp32"`` switches it off. bf16 keeps
   8 bits of mantissa: on 24 crops of real smear photographs (BCCD, seeded
   weights), the bf16 embeddings of smallcnn and ResNet-18/34/50 have a
   cosine similarity of at least 0.99997 to the float32 ones, at least 0.988
   after subtracting the mean embedding, and their pairwise distances
   correlate at 0.9999 (tests/test_encoders.py checks 0.99, 0.95 and 0.999).
   The precision is part of the spec and of its key.
5. torch's intra-op threads set to the cores this process may use.

On the two-core AVX-512 BF16 machine of docs/DESIGN.md (``bench/extract.py``,
best of 3 rounds of 512 patches of 224 px): ResNet-18 168 patches/s against
49 for a plain float32 ``no_grad`` NCHW loop (3.4 times; 608 GFLOP/s, 73 %
of this CPU's bf16 matrix-product rate), smallcnn 1,590 against 366.
:func:`extract` overlaps the reading of the next batches (in a background
thread, at most ``prefetch`` batches ahead) with the computation of the
current one.

Where it lives
--------------
:mod:`cmil_core.model.backbones` (the networks, their initialisation and
cost), :mod:`cmil_core.model.weight_files` (reading weights, TorchScript
and ``.pt2`` files) and this module: the spec, preprocessing, the fast path,
:func:`load_encoder` and :func:`encoder_from_spec`, and :func:`extract`.

Example::

    from cmil_core.model.encoders import extract, load_encoder

    encoder = load_encoder("resnet18", "resnet18-f37072fd.pth")
    encoder.spec.key                         # 'resnet18-...', names feature folders
    for embeddings in extract(encoder, batches):   # batches: uint8 [B, H, W, 3]
        ...                                  # float32 [B, 512]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cmil_core.errors import InputError
from cmil_core.ingest.slides import file_sha256
from cmil_core.model.backbones import ARCHITECTURES, build_backbone
from cmil_core.model.weight_files import (
    load_export,
    load_torchscript,
    load_weights,
    state_digest,
)

__all__ = [
    "ENCODERS_VERSION",
    "ENCODER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderSpec",
    "Precision",
    "available_cores",
    "bf16_supported",
    "encoder_from_spec",
    "extract",
    "load_encoder",
    "preprocess",
    "set_threads",
]

#: Bump when a change of this module, :mod:`.backbones` or :mod:`.weight_files` changes
#: the features of an unchanged spec (architecture, preprocessing, initialisation): it is
#: part of every key.
ENCODERS_VERSION = 1
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Precision = Literal["auto", "bf16", "fp32"]

_MIN_INPUT_PX, _MAX_INPUT_PX = 32, 2048

#: Every name :func:`load_encoder` accepts.
ENCODER_NAMES: tuple[str, ...] = (*ARCHITECTURES, "torchscript", "export")
# Networks brought as whole programs (not state dicts): never rewritten by the fast path.
_FOREIGN = ("torchscript", "export")


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that defines an encoder's features; stored with every feature file.

    ``name``: one of :data:`ENCODER_NAMES`. ``embed_dim``: size of an embedding.
    ``input_px``: side patches are resized to. ``mean``, ``std``: per-channel
    normalisation of [0, 1] pixel values. ``weights``: the weights file as
    given (informative only: moving the file changes nothing);
    ``weights_sha256``: its SHA-256, or ``None`` for a seeded initialisation,
    which ``seed`` and ``init_sha256`` (digest of the initialised parameters)
    then describe. ``torchscript``: the module is a TorchScript file.
    ``precision``: ``"bf16"`` or ``"fp32"``, the arithmetic of the fast path.
    ``version``: :data:`ENCODERS_VERSION` of the code that made it.
    """

    name: str
    embed_dim: int
    input_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int | None = None
    init_sha256: str | None = None
    torchscript: bool = False
    precision: str = "fp32"
    version: int = ENCODERS_VERSION

    def __post_init__(self) -> None:
        if self.name not in ENCODER_NAMES:
            raise InputError(
                f"unknown encoder {self.name!r}; expected one of {', '.join(ENCODER_NAMES)}."
            )
        _check_input_px(self.input_px)
        for label in ("mean", "std"):
            value = getattr(self, label)
            try:
                triple = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                triple = ()
            if len(triple) != 3 or not all(np.isfinite(triple)):
                raise InputError(f"encoder {label}={value!r} must be three finite numbers.")
            if label == "std" and min(triple) <= 0:
                raise InputError(f"encoder std={value!r} must be positive.")
            object.__setattr__(self, label, triple)
        if self.precision not in ("bf16", "fp32"):
            raise InputError(f"encoder precision={self.precision!r} must be 'bf16' or 'fp32'.")
        if self.weights_sha256 is None and self.seed is None:
            raise InputError(f"encoder {self.name}: a spec needs a weights_sha256 or a seed.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists); :meth:`from_dict` reads it back."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderSpec:
        """A spec from :meth:`to_dict`'s dict (e.g. a model's config); unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown encoder setting(s) {', '.join(unknown)}.")
        values = dict(data)
        for label in ("mean", "std"):
            if label in values:
                values[label] = tuple(values[label])
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise InputError(f"incomplete encoder spec: {exc}.") from exc

    @property
    def key(self) -> str:
        """``<name>-<12 hex digits>``: a hash of everything that changes the features.

        The weights' path is left out (a moved file gives the same features);
        their SHA-256, the seed and the parameters' digest, the preprocessing,
        the precision and :data:`ENCODERS_VERSION` are in.
        """
        data = self.to_dict()
        data.pop("weights")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


# --------------------------------------------------------------------------- checks and platform


def _check_input_px(input_px: int) -> None:
    if (isinstance(input_px, bool) or not isinstance(input_px, int)
            or not _MIN_INPUT_PX <= input_px <= _MAX_INPUT_PX):
        raise InputError(
            f"input_px={input_px!r} must be a whole number of pixels in "
            f"[{_MIN_INPUT_PX}, {_MAX_INPUT_PX}]."
        )


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX) through oneDNN.

    Elsewhere bf16 still works, emulated, but slower than float32: the
    ``"auto"`` precision then chooses float32.
    """
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]  # unannotated in torch
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


_threads_lock = threading.Lock()
_threads_set = False


def _use_all_cores() -> None:
    """Set torch's intra-op threads to :func:`available_cores`, once per process."""
    global _threads_set
    with _threads_lock:
        if not _threads_set:
            torch.set_num_threads(available_cores())
            _threads_set = True


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads in this process (a worker sharing the cores with others)."""
    global _threads_set
    with _threads_lock:
        torch.set_num_threads(max(1, int(n)))
        _threads_set = True


# --------------------------------------------------------------------------- preprocessing


def _check_batch(batch: object) -> npt.NDArray[np.uint8]:
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 \
            or batch.shape[3] != 3:
        what = (f"{batch.dtype} array of shape {batch.shape}" if isinstance(batch, np.ndarray)
                else type(batch).__name__)
        raise InputError(f"an encoder takes uint8 patches [B, H, W, 3], got a {what}.")
    return batch


def preprocess(batch: npt.NDArray[np.uint8], spec: EncoderSpec,
               device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised float32 ``[B, 3, input_px, input_px]``, channels-last.

    ``x = (pixel / 255 - mean) / std`` per channel, after a bilinear
    (antialiased) resize to ``spec.input_px`` when the patches have another
    size. The result is a channels-last view of the batch's own layout: no
    transpose is copied. ``device`` (a GPU): the uint8 batch is copied there
    first (a quarter of float32's bytes) and normalised there.
    """
    arr = _check_batch(batch)
    x = torch.from_numpy(np.ascontiguousarray(arr))
    if device is not None and torch.device(device).type != "cpu":
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2)  # channels-last view
    x = x.to(torch.float32, memory_format=torch.channels_last)
    px = spec.input_px
    if x.shape[2:] != (px, px) and x.shape[0] > 0:
        x = F.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        x = x.contiguous(memory_format=torch.channels_last)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std)
    return x.mul_(scale).sub_(mean / std)


# --------------------------------------------------------------------------- fast path


def _fuse_bn(module: nn.Module) -> None:
    """Fold every (conv, batch norm) pair of this module's architectures, in place.

    Pairs: attributes ``convN``/``bnN`` of one module (ResNet stem and
    blocks), ``conv``/``bn`` (SmallCNN blocks), and ``downsample.0/1``. The
    batch norm becomes an identity; the convolution gains a bias. Exact in
    eval mode up to float rounding.
    """
    for sub in list(module.modules()):
        pairs = [(f"conv{i}", f"bn{i}") for i in ("", "1", "2", "3")]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(sub, conv_name, None), getattr(sub, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(sub, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(sub, bn_name, nn.Identity())
        if (isinstance(sub, nn.Sequential) and len(sub) == 2
                and isinstance(sub[0], nn.Conv2d) and isinstance(sub[1], nn.BatchNorm2d)):
            sub[0] = fuse_conv_bn_eval(sub[0], sub[1])
            sub[1] = nn.Identity()


def _fast_module(module: nn.Module, torchscript: bool) -> nn.Module:
    """An inference copy of ``module``: BN folded, channels-last weights, frozen."""
    if torchscript:
        return module  # foreign graph: only the input's layout and autocast apply
    fast: nn.Module = copy.deepcopy(module).eval()
    _fuse_bn(fast)
    fast = fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fast.requires_grad_(False)
    return fast


class Encoder:
    """An eval-mode network and its :class:`EncoderSpec`; :meth:`embed` turns patches into vectors.

    Make one with :func:`load_encoder` or :func:`encoder_from_spec`. ``module``
    is the network as loaded (float32, eval mode, parameters frozen), the one
    a plain PyTorch loop would run; :meth:`embed` runs an inference copy of it
    (see the module docstring), made on first use. Treat ``module`` as
    read-only: to train, start from
    :func:`~cmil_core.model.backbones.build_backbone`. ``batch_size``:
    patches per forward pass inside :meth:`embed` (bounds memory).
    """

    def __init__(
        self, module: nn.Module, spec: EncoderSpec, *, batch_size: int = 64, device: str = "cpu"
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer.")
        self.device = torch.device(device)
        self.module = module.eval()
        for param in self.module.parameters():  # ScriptModules lack requires_grad_()
            param.requires_grad_(False)
        self.spec = spec
        self.batch_size = batch_size
        self._fast: nn.Module | None = None
        self._fast_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Encoder({self.spec.key!r}, embed_dim={self.spec.embed_dim}, {self.spec.precision})"

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def with_precision(self, precision: Precision) -> Encoder:
        """The same network with another arithmetic (``"bf16"``, ``"fp32"`` or ``"auto"``).

        Shares ``module`` and its inference copy; the spec (and key) change.
        """
        twin = Encoder(self.module, replace(self.spec, precision=_resolve_precision(precision)),
                       batch_size=self.batch_size, device=str(self.device))
        twin._fast = self._fast
        return twin

    def fast_module(self) -> nn.Module:
        """The inference copy :meth:`embed` runs (built on first call)."""
        with self._fast_lock:
            if self._fast is None:
                foreign = self.spec.torchscript or self.spec.name in _FOREIGN
                self._fast = _fast_module(self.module, foreign).to(self.device)
            return self._fast

    def to(self, device: str) -> Encoder:
        """The same network running on ``device`` (``"cpu"``, ``"cuda:0"``, ...); same spec.

        On a GPU, ``bf16`` runs under CUDA autocast; features agree with the
        CPU's to float rounding, not bit for bit.
        """
        return Encoder(self.module, self.spec, batch_size=self.batch_size, device=device)

    def embed(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Embeddings float32 ``[B, embed_dim]`` of uint8 patches ``[B, H, W, 3]``.

        Rows follow the batch's order; any ``H, W`` (resized to ``input_px``).
        Runs in chunks of ``batch_size`` on the fast path.
        """
        arr = _check_batch(batch)
        _use_all_cores()
        fast = self.fast_module()
        out = np.empty((arr.shape[0], self.spec.embed_dim), dtype=np.float32)
        bf16 = self.spec.precision == "bf16"
        kind = self.device.type
        with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, arr.shape[0], self.batch_size):
                chunk = arr[start : start + self.batch_size]
                # On a GPU the uint8 patches go over, and are normalised there.
                y = fast(preprocess(chunk, self.spec, self.device))
                if not isinstance(y, torch.Tensor) or tuple(y.shape) != (
                    chunk.shape[0], self.spec.embed_dim,
                ):
                    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise InputError(
                        f"encoder {self.spec.key} returned {got} for {chunk.shape[0]} patches; "
                        f"expected [{chunk.shape[0]}, {self.spec.embed_dim}]."
                    )
                out[start : start + chunk.shape[0]] = y.float().cpu().numpy()
        return out


# --------------------------------------------------------------------------- loading


def _resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise InputError(f"precision={precision!r} must be 'auto', 'bf16' or 'fp32'.")
    return precision


def load_encoder(
    name: str = "smallcnn",
    weights: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    input_px: int = 224,
    precision: Precision = "auto",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    batch_size: int = 64,
) -> Encoder:
    """An :class:`Encoder` named ``name`` (:data:`ENCODER_NAMES`), ready to :meth:`~Encoder.embed`.

    ``weights``: a local file: a state dict for the architectures defined
    here (torch or safetensors format, torchvision's key names; see the
    module docstring), the TorchScript file for ``"torchscript"`` or the
    ``.pt2`` program for ``"export"`` (required for those two). Without one, the network is
    initialised from ``seed`` (a baseline only). ``precision``: ``"auto"``
    uses bf16 where the CPU has it natively (:func:`bf16_supported`).
    ``mean``, ``std``: normalisation the weights were trained with.

    Raises :class:`~cmil_core.errors.InputError` for an unknown name, a
    missing or unreadable file, or weights that do not fit the architecture.
    """
    if name not in ENCODER_NAMES:
        raise InputError(f"unknown encoder {name!r}; expected one of {', '.join(ENCODER_NAMES)}.")
    _check_input_px(input_px)
    resolved = _resolve_precision(precision)
    path: Path | None = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"{path}: no such weights file.")
    if name == "torchscript":
        if path is None:
            raise InputError("encoder 'torchscript' needs a weights file (the TorchScript module).")
        module, embed_dim = load_torchscript(path, input_px)
        spec = EncoderSpec(name=name, embed_dim=embed_dim, input_px=input_px, mean=mean, std=std,
                           weights=str(path), weights_sha256=file_sha256(path), torchscript=True,
                           precision=resolved)
        return Encoder(module, spec, batch_size=batch_size)
    if name == "export":
        if path is None:
            raise InputError("encoder 'export' needs a weights file (the .pt2 program).")
        module, embed_dim = load_export(path, input_px)
        spec = EncoderSpec(name=name, embed_dim=embed_dim, input_px=input_px, mean=mean, std=std,
                           weights=str(path), weights_sha256=file_sha256(path),
                           precision=resolved)
        return Encoder(module, spec, batch_size=batch_size)
    if path is None:
        module = build_backbone(name, seed=seed)
        spec = EncoderSpec(name=name, embed_dim=ARCHITECTURES[name][1], input_px=input_px,
                           mean=mean, std=std, seed=seed, init_sha256=state_digest(module),
                           precision=resolved)
    else:
        module = ARCHITECTURES[name][0]()
        load_weights(module, path, name)
        spec = EncoderSpec(name=name, embed_dim=ARCHITECTURES[name][1], input_px=input_px,
                           mean=mean, std=std, weights=str(path),
                           weights_sha256=file_sha256(path), precision=resolved)
    return Encoder(module, spec, batch_size=batch_size)


def encoder_from_spec(
    spec: EncoderSpec | Mapping[str, Any],
    *,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
) -> Encoder:
    """Rebuild the encoder a spec describes (e.g. from a saved model's config), exactly.

    ``weights`` overrides the spec's file path (the file may have moved); its
    SHA-256 must equal the spec's. A seeded spec is rebuilt from its seed and
    its parameters' digest checked. The returned encoder's spec equals the
    given one (same :attr:`~EncoderSpec.key`), or an
    :class:`~cmil_core.errors.InputError` says what differs.
    """
    target = spec if isinstance(spec, EncoderSpec) else EncoderSpec.from_dict(spec)
    if target.weights_sha256 is None:
        assert target.seed is not None  # __post_init__ guarantees one of the two
        encoder = load_encoder(target.name, seed=target.seed, input_px=target.input_px,
                               precision=target.precision,  # type: ignore[arg-type]
                               mean=target.mean, std=target.std, batch_size=batch_size)
        if target.init_sha256 is not None and encoder.spec.init_sha256 != target.init_sha256:
            raise InputError(
                f"encoder {target.name} seed {target.seed}: this torch ({torch.__version__}) "
                "initialises other weights than the spec's; features would differ."
            )
    else:
        source = weights if weights is not None else target.weights
        if source is None:
            raise InputError(f"encoder {target.key}: the spec names no weights file; pass one.")
        encoder = load_encoder(target.name, source, input_px=target.input_px,
                               precision=target.precision,  # type: ignore[arg-type]
                               mean=target.mean, std=target.std, batch_size=batch_size)
        found = encoder.spec.weights_sha256 or ""
        if found != target.weights_sha256:
            raise InputError(
                f"{Path(source).name}: SHA-256 {found[:16]}... differs from the spec's "
                f"{target.weights_sha256[:16]}...: not the same weights."
            )
    kept_path = target.weights if weights is None else encoder.spec.weights
    rebuilt = replace(encoder.spec, weights=kept_path)
    if rebuilt.key != target.key:
        raise InputError(f"encoder {target.key}: rebuilt as {rebuilt.key}; the specs differ.")
    encoder.spec = rebuilt
    return encoder


# --------------------------------------------------------------------------- extraction


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def extract(
    encoder: Encoder, batches: Iterable[npt.NDArray[np.uint8]], *, prefetch: int = 2,
) -> Iterator[npt.NDArray[np.float32]]:
    """Embed every batch of ``batches``, in order, reading ahead in a background thread.

    The iterable is consumed in one thread (decoding: OpenSlide, PIL and
    numpy release the GIL) at most ``prefetch`` batches ahead of the
    computation, so reading the next batches overlaps embedding this one and
    memory stays bounded. An exception raised while reading is raised here;
    closing this generator early stops the reader (it finishes the batch in
    hand) and closes ``batches`` if it is a generator.
    """
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise InputError(f"prefetch={prefetch!r} must be a positive integer.")
    slots: queue.Queue[object] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(batches)
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()

    reader = threading.Thread(target=produce, name="cmil-extract-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield encoder.embed(item)  # type: ignore[arg-type]
    finally:
        stop.set()
        reader.join()
