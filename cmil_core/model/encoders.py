"""CNN patch encoders: a patch in, an embedding vector out.

An *encoder* maps a batch of RGB patches, uint8 ``[B, H, W, 3]`` as
:func:`cmil_core.ingest.tiling.read_patch` returns them, to float32 embeddings
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
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
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

__all__ = [
    "ARCHITECTURES",
    "ENCODERS_VERSION",
    "ENCODER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "Bottleneck",
    "Encoder",
    "EncoderSpec",
    "Precision",
    "ResNet",
    "SmallCNN",
    "available_cores",
    "bf16_supported",
    "build_backbone",
    "count_macs",
    "encoder_from_spec",
    "extract",
    "load_backbone",
    "load_encoder",
    "preprocess",
    "set_threads",
]

#: Bump when a change of this module changes the features of an unchanged spec
#: (architecture, preprocessing, initialisation): it is part of every key.
ENCODERS_VERSION = 1
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Precision = Literal["auto", "bf16", "fp32"]

# Wrappers and prefixes that training code puts around a state dict.
_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.",)
# Classifier heads: present in torchvision files, not part of an encoder.
_HEAD_PREFIXES = ("fc.",)
_MIN_INPUT_PX, _MAX_INPUT_PX = 32, 2048
_SHOW_KEYS = 3  # keys quoted in an error message


# --------------------------------------------------------------------------- architectures


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34), torchvision's names."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1: nn.Module = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2: nn.Module = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        y: torch.Tensor = self.relu(out + identity)
        return y


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 convolutions and a shortcut (ResNet-50), torchvision's names."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1: nn.Module = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2: nn.Module = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3: nn.Module = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        y: torch.Tensor = self.relu(out + identity)
        return y


class ResNet(nn.Module):
    """A ResNet up to its global average pool: ``[B, 3, H, W] -> [B, 512 * expansion]``.

    Parameter names are torchvision's, without ``fc`` (no classifier).
    ``H, W >= 32``: the network downsamples by 32.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...]) -> None:
        super().__init__()
        self._in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = 512 * block.expansion

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self._in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._in_ch, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self._in_ch, planes, stride, downsample)]
        self._in_ch = planes * block.expansion
        layers.extend(block(self._in_ch, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class _ConvBlock(nn.Module):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv = _conv3x3(in_ch, out_ch, stride)
        self.bn: nn.Module = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.relu(self.bn(self.conv(x)))
        return y


class SmallCNN(nn.Module):
    """A small, fast CNN: six conv-BN-ReLU blocks and a global average pool -> 128-d.

    Widths 16, 32, 64, 64, 128, 128 with strides 2, 2, 2, 1, 2, 1: the
    receptive field at the last block is 99 px (about 50 um at 0.5 um/px,
    a few marrow cells), the output grid of a 224 px patch 14 x 14. The
    narrow, strided first blocks keep the memory traffic at full resolution
    low, which is what limits small networks on a CPU. 0.11 GMAC per 224 px patch.
    """

    WIDTHS: tuple[int, ...] = (16, 32, 64, 64, 128, 128)
    STRIDES: tuple[int, ...] = (2, 2, 2, 1, 2, 1)

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = 3
        for width, stride in zip(self.WIDTHS, self.STRIDES, strict=True):
            blocks.append(_ConvBlock(in_ch, width, stride))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.blocks(x)), 1)


#: Architectures defined here: name -> (constructor, embedding size).
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (lambda: ResNet(BasicBlock, (2, 2, 2, 2)), 512),
    "resnet34": (lambda: ResNet(BasicBlock, (3, 4, 6, 3)), 512),
    "resnet50": (lambda: ResNet(Bottleneck, (3, 4, 6, 3)), 2048),
    "smallcnn": (SmallCNN, 128),
}
#: Every name :func:`load_encoder` accepts.
ENCODER_NAMES: tuple[str, ...] = (*ARCHITECTURES, "torchscript", "export")
# Networks brought as whole programs (not state dicts): never rewritten by the fast path.
_FOREIGN = ("torchscript", "export")


def _init_weights(module: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal convolutions (fan out), BN as identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(name: str, *, seed: int = 0) -> nn.Module:
    """A fresh network of architecture ``name``, initialised from ``seed``, in train mode.

    For training or fine-tuning (e.g. a patch classifier: add a head on the
    ``embed_dim``-sized output). The global random state is left untouched:
    the same seed gives the same parameters, bit for bit, on one torch version.
    Feed it :func:`preprocess`'s tensors.
    """
    if name not in ARCHITECTURES:
        raise InputError(
            f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}."
        )
    _check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = ARCHITECTURES[name][0]()
        _init_weights(module)
    return module


def load_backbone(
    name: str, weights: str | os.PathLike[str] | None = None, *, seed: int = 0,
) -> nn.Module:
    """A trainable network of architecture ``name``: from a weights file, else seeded.

    ``weights``: a state dict file (torch or safetensors; the checks of
    :func:`load_encoder`). The module is in train mode with gradients on: the
    starting point of :mod:`cmil_core.model.finetune`.
    """
    if name not in ARCHITECTURES:
        raise InputError(
            f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}."
        )
    if weights is None:
        return build_backbone(name, seed=seed)
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"{path}: no such weights file.")
    module = ARCHITECTURES[name][0]()
    _load_state(module, path, name)
    return module.train().requires_grad_(True)


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


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r} must be an integer >= 0.")


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
    read-only: to train, start from :func:`build_backbone`. ``batch_size``:
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


def _state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _keys_text(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f" (+{len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else "")


def _is_safetensors(path: Path) -> bool:
    """Whether a file starts like ``safetensors``: an 8-byte little-endian header size,
    then ``{``."""
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= size - 8


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{path.name}: not a readable safetensors file ({_first_line(exc)})."
        ) from exc


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped and without ``module.`` prefixes."""
    if path.suffix.lower() == ".safetensors" or _is_safetensors(path):
        obj: Any = _read_safetensors(path)
        if not obj:
            raise InputError(f"{path.name}: the safetensors file holds no tensors.")
        return _strip_prefixes({str(k): v for k, v in obj.items()})
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors of many types: all mean "unreadable"
        raise InputError(
            f"{path.name}: not a readable PyTorch weights file ({_first_line(exc)}); "
            "a TorchScript file needs the encoder name 'torchscript', a .pt2 program 'export'."
        ) from exc
    for wrapper in _WRAPPER_KEYS:
        if (isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping)
                and not all(isinstance(v, torch.Tensor) for v in obj.values())):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(
            f"{path.name}: holds no state dict (a mapping of parameter names to tensors)."
        )
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InputError(
            f"{path.name}: not a state dict: entries {_keys_text(not_tensors)} are not tensors."
        )
    return _strip_prefixes({str(k): v for k, v in obj.items()})


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        while all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_state(module: nn.Module, path: Path, name: str) -> None:
    """Load a weights file into ``module`` with strict key and shape checks."""
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(_HEAD_PREFIXES)}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_keys_text(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_keys_text(unexpected)}")
        raise InputError(f"{path.name}: weights do not fit {name}: {'; '.join(parts)}.")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise InputError(
                f"{path.name}: weights do not fit {name}: {key} has shape "
                f"{tuple(tensor.shape)} in the file, {tuple(expected[key].shape)} in {name}."
            )
    for key, tensor in expected.items():  # old files lack the batch norm counters
        state.setdefault(key, tensor)
    module.load_state_dict(state, strict=True)


def _probe_embedding(module: nn.Module, path: Path, input_px: int, what: str) -> int:
    """Embedding size of a foreign network, probed on blank patches (batches of 1 and 2)."""
    dim: int | None = None
    for batch in (1, 2):
        probe = torch.zeros(batch, 3, input_px, input_px)
        try:
            with torch.inference_mode():
                y = module(probe)
        except Exception as exc:  # a foreign network may fail in any way
            hint = (" (export it with a dynamic batch dimension: dynamic_shapes="
                    "({0: torch.export.Dim('batch')},))" if what == "torch.export program"
                    and batch == 2 else "")
            raise InputError(
                f"{path.name}: the {what} fails on a [{batch}, 3, {input_px}, {input_px}] "
                f"input ({_first_line(exc)}){hint}."
            ) from exc
        is_embedding = (isinstance(y, torch.Tensor) and y.ndim == 2 and y.shape[0] == batch
                        and y.is_floating_point())
        if not is_embedding:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(
                f"{path.name}: the {what} maps [{batch}, 3, {input_px}, {input_px}] to {got}; "
                "an encoder must return float [B, D]."
            )
        dim = int(y.shape[1])
    assert dim is not None
    return dim


class _ExportedProgram(nn.Module):
    """A ``torch.export`` program as a module. Its train/eval behaviour was fixed when it was
    exported (its module refuses ``eval()``), so switching modes here leaves it alone."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> _ExportedProgram:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)  # type: ignore[no-any-return]


def _load_export(path: Path, input_px: int) -> tuple[nn.Module, int]:
    """A ``torch.export`` program (``.pt2``) as a module, and its embedding size."""
    try:
        program = torch.export.load(str(path))
        module: nn.Module = _ExportedProgram(program.module())
    except Exception as exc:  # zip, pickle and graph errors of many types: all mean "unreadable"
        raise InputError(
            f"{path.name}: not a readable torch.export program ({_first_line(exc)}); "
            "save one with torch.export.save."
        ) from exc
    return module, _probe_embedding(module, path, input_px, "torch.export program")


def _load_torchscript(path: Path, input_px: int) -> tuple[nn.Module, int]:
    """A TorchScript module and its embedding size, probed on one blank patch."""
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            # torch.jit.load carries no annotations (and has no typed alternative)
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch raises RuntimeError and friends for anything unreadable
        raise InputError(
            f"{path.name}: not a readable TorchScript file ({_first_line(exc)})."
        ) from exc
    module.eval()
    probe = torch.zeros(1, 3, input_px, input_px)
    try:
        with torch.inference_mode():
            y = module(probe)
    except Exception as exc:  # a foreign network may fail in any way
        raise InputError(
            f"{path.name}: the TorchScript module fails on a [1, 3, {input_px}, {input_px}] "
            f"input ({_first_line(exc)})."
        ) from exc
    is_embedding = (isinstance(y, torch.Tensor) and y.ndim == 2 and y.shape[0] == 1
                    and y.is_floating_point())
    if not is_embedding:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(
            f"{path.name}: the TorchScript module maps [1, 3, {input_px}, {input_px}] to {got}; "
            "an encoder must return float [B, D]."
        )
    return module, int(y.shape[1])


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
        module, embed_dim = _load_torchscript(path, input_px)
        spec = EncoderSpec(name=name, embed_dim=embed_dim, input_px=input_px, mean=mean, std=std,
                           weights=str(path), weights_sha256=file_sha256(path), torchscript=True,
                           precision=resolved)
        return Encoder(module, spec, batch_size=batch_size)
    if name == "export":
        if path is None:
            raise InputError("encoder 'export' needs a weights file (the .pt2 program).")
        module, embed_dim = _load_export(path, input_px)
        spec = EncoderSpec(name=name, embed_dim=embed_dim, input_px=input_px, mean=mean, std=std,
                           weights=str(path), weights_sha256=file_sha256(path),
                           precision=resolved)
        return Encoder(module, spec, batch_size=batch_size)
    if path is None:
        module = build_backbone(name, seed=seed)
        spec = EncoderSpec(name=name, embed_dim=ARCHITECTURES[name][1], input_px=input_px,
                           mean=mean, std=std, seed=seed, init_sha256=_state_digest(module),
                           precision=resolved)
    else:
        module = ARCHITECTURES[name][0]()
        _load_state(module, path, name)
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


# --------------------------------------------------------------------------- cost


def count_macs(module: nn.Module, input_px: int = 224) -> int:
    """Multiply-accumulates of one ``input_px`` patch through the convolutions and linear layers.

    Counted with forward hooks on one blank patch: a convolution costs
    ``output elements x in_channels / groups x kernel area``, a linear layer
    ``in x out``. Batch norm, activations and pooling are left out (the usual
    convention: torchvision's 1.81 "GFLOPS" for ResNet-18 are these MACs).
    Twice the MACs are the floating-point operations.
    """
    total = 0

    def conv_hook(m: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        k = m.kernel_size[0] * m.kernel_size[1]
        total += int(out.numel()) * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += int(out.numel()) * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    try:
        module.eval()
        with torch.inference_mode():
            module(torch.zeros(1, 3, input_px, input_px))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return total
