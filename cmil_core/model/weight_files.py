"""Reading weight files: state dicts (torch, safetensors), TorchScript and ``.pt2`` programs.

Nothing is ever downloaded. :func:`load_weights` loads a state dict file
(``torch.save`` or ``safetensors``, recognised by its header; optionally
wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, with a ``module.``
prefix) into one of :data:`cmil_core.model.backbones.ARCHITECTURES` with
strict key and shape checks; :func:`load_torchscript` and :func:`load_export`
read a whole foreign network and probe its embedding size on blank patches;
:func:`load_backbone` gives a trainable network from a weights file, else
seeded; :func:`state_digest` hashes a module's parameters. A file that does
not fit raises :class:`~cmil_core.errors.InputError` naming the file and the
first missing and unexpected keys. :func:`cmil_core.model.encoders.load_encoder`
uses all of them.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmil_core.errors import InputError
from cmil_core.model.backbones import ARCHITECTURES, build_backbone

__all__ = [
    "load_backbone",
    "load_export",
    "load_torchscript",
    "load_weights",
    "state_digest",
]

# Wrappers and prefixes that training code puts around a state dict.
_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.",)
# Classifier heads: present in torchvision files, not part of an encoder.
_HEAD_PREFIXES = ("fc.",)
_SHOW_KEYS = 3  # keys quoted in an error message


def state_digest(module: nn.Module) -> str:
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


def load_weights(module: nn.Module, path: Path, name: str) -> None:
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


def load_export(path: Path, input_px: int) -> tuple[nn.Module, int]:
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


def load_torchscript(path: Path, input_px: int) -> tuple[nn.Module, int]:
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


def load_backbone(
    name: str, weights: str | os.PathLike[str] | None = None, *, seed: int = 0,
) -> nn.Module:
    """A trainable network of architecture ``name``: from a weights file, else seeded.

    ``weights``: a state dict file (torch or safetensors; the checks of
    :func:`cmil_core.model.encoders.load_encoder`). The module is in train mode
    with gradients on: the starting point of :mod:`cmil_core.model.finetune`.
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
    load_weights(module, path, name)
    return module.train().requires_grad_(True)
