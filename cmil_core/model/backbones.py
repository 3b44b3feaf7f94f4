"""The patch CNNs defined here: ResNet-18/34/50 (torchvision's names) and a small CNN.

Each network ends at its global average pool (no classifier): ``[B, 3, H, W]``
-> ``[B, D]``. :data:`ARCHITECTURES` names them with their embedding size;
:func:`build_backbone` makes one initialised from a seed (torchvision's
scheme), :func:`count_macs` counts what one patch costs. Loading weights into
them: :mod:`cmil_core.model.weight_files`; the encoder that runs them on
patches: :mod:`cmil_core.model.encoders` (whose docstring describes the
architectures).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cmil_core.errors import InputError

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "SmallCNN",
    "build_backbone",
    "count_macs",
]


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
    Feed it :func:`cmil_core.model.encoders.preprocess`'s tensors.
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


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r} must be an integer >= 0.")


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
