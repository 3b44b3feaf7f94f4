"""The MIL aggregator interface and the machinery both aggregators share.

:class:`Aggregator` is what every aggregator of :mod:`cmil_core.model.mil` is:
``fit`` on the training bags, ``predict`` one :class:`BagPrediction` per bag,
``config`` and ``state`` to save, ``from_state`` to rebuild. Its subclasses
are :class:`~cmil_core.model.histogram_mil.HistogramMIL` and
:class:`~cmil_core.model.attention_mil.AttentionMIL`; the problem they solve
and the conventions they keep (scores, leakage, determinism, bad input) are in
:mod:`cmil_core.model.mil`.

Also here, used by both aggregators and by :func:`cmil_core.model.mil.cross_validate`:
the input checks at the edge (:func:`check_bags`, :func:`check_labels`,
:func:`check_seed`, :func:`check_param`), the deterministic torch session
(:func:`torch_session`: one thread, deterministic algorithms, a forked seeded
RNG, under one lock for the whole process), the training cohort's input
standardisation (:func:`feature_moments`, :class:`Standardise`), the inner
patient-stratified validation split (:func:`inner_split`, also used by
:mod:`cmil_core.model.cnn_training`) and early stopping
(:class:`EarlyStopping`, :func:`safe_auc`).
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError

__all__ = [
    "STATE_VERSION",
    "Aggregator",
    "BagPrediction",
    "EarlyStopping",
    "FloatArray",
    "ProgressFn",
    "Standardise",
    "check_bags",
    "check_labels",
    "check_param",
    "check_seed",
    "feature_moments",
    "inner_split",
    "safe_auc",
    "to_numpy",
    "to_tensor",
    "torch_session",
]

FloatArray = npt.NDArray[np.float32]
ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, message)``; :func:`cmil_core.progress.stage_reporter` makes one."""

STATE_VERSION = 1
_LOCK = threading.RLock()


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BagPrediction:
    """One patient's prediction.

    Attributes
    ----------
    score:
        Patient-level score in [0, 1] (the "cMIL score"); higher = metastasis
        more likely. A probability only as far as the model is calibrated on
        the training cohort; use it for ranking and fixed cutoffs.
    probability:
        ``[n_patches]`` per-patch probability in [0, 1], in the bag's row
        order: the patch classifier's output (histogram) or the attention
        model's classifier applied to each patch alone (attention).
    attention:
        ``[n_patches]`` attention weights, softmax within the bag (they sum to
        1), or ``None`` for the histogram aggregator.
    attention_raw:
        ``[n_patches]`` pre-softmax attention logits, comparable across
        patients (normalised weights shrink as bags grow), or ``None``.
    """

    score: float
    probability: FloatArray
    attention: FloatArray | None = None
    attention_raw: FloatArray | None = None

    @property
    def importance(self) -> FloatArray:
        """The per-patch importance to show: attention when there is one, else probability."""
        return self.attention if self.attention is not None else self.probability


# ----------------------------------------------------------------------------
# Input checks (the edge)
# ----------------------------------------------------------------------------


def check_bags(bags: Sequence[Any], n_features: int | None = None) -> list[np.ndarray]:
    """Check bags once; return them as 2-D float arrays (no copy when already so).

    float16 and float32 are kept as they are (converted to float32 a batch at a
    time, so a cohort of float16 features is not doubled in memory); other
    numeric types become float32.
    """
    if isinstance(bags, np.ndarray) and bags.ndim == 2:
        raise InputError("bags must be a sequence of 2-D arrays (one per patient), not one array")
    try:
        count = len(bags)
    except TypeError:
        raise InputError("bags must be a sequence of 2-D arrays (one per patient)") from None
    if count == 0:
        raise InputError("no bags given: need at least one patient's patch embeddings")
    checked: list[np.ndarray] = []
    first_d = n_features
    for i, bag in enumerate(bags):
        try:
            arr = np.asarray(bag)
        except (TypeError, ValueError):
            raise InputError(f"bag {i} is not an array of numbers") from None
        if arr.dtype not in (np.float16, np.float32):
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
                raise InputError(f"bag {i} has dtype {arr.dtype}; expected float embeddings")
            if np.issubdtype(arr.dtype, np.complexfloating):
                raise InputError(f"bag {i} has complex values; expected real embeddings")
            arr = arr.astype(np.float32)
        if arr.ndim != 2:
            raise InputError(
                f"bag {i} must be 2-D [n_patches, n_features], got shape {tuple(arr.shape)}"
            )
        if arr.shape[0] == 0:
            raise InputError(f"bag {i} is empty: every patient needs at least one patch")
        if arr.shape[1] == 0:
            raise InputError(f"bag {i} has 0 features per patch")
        if first_d is None:
            first_d = arr.shape[1]
        elif arr.shape[1] != first_d:
            where = "the model was fitted on" if n_features is not None else "bag 0 has"
            raise InputError(f"bag {i} has {arr.shape[1]} features per patch but {where} {first_d}")
        if not np.isfinite(arr).all():
            raise InputError(f"bag {i} contains NaN or infinite values")
        checked.append(arr)
    return checked


def check_labels(labels: Sequence[Any], n_bags: int) -> npt.NDArray[np.int64]:
    """Labels as int64 0/1, one per bag, both classes present."""
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError):
        raise InputError("labels must be a sequence of 0/1 values") from None
    if y.ndim != 1:
        raise InputError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if y.size != n_bags:
        raise InputError(f"{n_bags} bags but {y.size} labels")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number):
            raise InputError(f"labels must be 0/1, got dtype {y.dtype}")
        bad = ~np.isin(y, [0, 1])
        if bad.any():
            first = int(np.argmax(bad))
            raise InputError(f"labels must be 0 or 1; label {first} is {y[first].item()!r}")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        kind = "negative (0)" if n_pos == 0 else "positive (1)"
        raise InputError(f"all {y.size} labels are {kind}; training needs both classes")
    return y


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_param(name: str, value: Any, kind: str, low: float, high: float) -> Any:
    """One hyper-parameter: an int or float in [low, high]."""
    if isinstance(value, bool):
        raise InputError(f"{name}={value!r} must be a number")
    if kind == "int":
        if not isinstance(value, (int, np.integer)):
            raise InputError(f"{name}={value!r} must be an integer")
        value = int(value)
    else:
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise InputError(f"{name}={value!r} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"{name}={value!r} must be finite")
    if not low <= value <= high:
        raise InputError(f"{name}={value!r} must lie in [{low:g}, {high:g}]")
    return value


# ----------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------


@contextmanager
def torch_session(seed: int | None) -> Iterator[None]:
    """Deterministic torch: one thread, deterministic algorithms, a forked seeded RNG.

    Restores the caller's thread count, determinism flag and RNG state on exit.
    """
    with _LOCK:
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def feature_moments(bags: Sequence[np.ndarray]) -> tuple[FloatArray, FloatArray]:
    """Per-feature mean and standard deviation over every patch of ``bags`` (float64 sums).

    Embeddings of a CNN after ReLU and pooling are non-negative with very
    different scales per channel; standardising them lets one learning rate,
    one weight decay and one noise level suit every encoder. Features with no
    spread get scale 1 (they stay constant, centred at 0).
    """
    d = bags[0].shape[1]
    total = np.zeros(d, dtype=np.float64)
    total_sq = np.zeros(d, dtype=np.float64)
    n = 0
    for bag in bags:
        b = bag.astype(np.float64)
        total += b.sum(axis=0)
        total_sq += np.square(b).sum(axis=0)
        n += b.shape[0]
    mean = total / n
    var = np.maximum(total_sq / n - np.square(mean), 0.0)
    std = np.sqrt(var)
    std[std < 1e-6 * max(1.0, float(np.abs(mean).max()))] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def inner_split(
    y: npt.NDArray[np.int64], fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """Patient-stratified (train, validation) indices for early stopping.

    Each class gives ``round(fraction * n_class)`` patients to validation (at
    least one, and at least one stays in training). Returns ``None`` when a
    class has fewer than two patients or ``fraction`` is 0: then there is no
    validation set and training runs the full ``max_epochs``.
    """
    if fraction <= 0:
        return None
    train: list[int] = []
    val: list[int] = []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        if idx.size < 2:
            return None
        idx = rng.permutation(idx)
        n_val = min(idx.size - 1, max(1, round(float(fraction * idx.size))))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def to_tensor(array: npt.ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A torch tensor copy of a numpy array (states hold tensors, never numpy)."""
    return torch.tensor(np.asarray(array), dtype=dtype)


def to_numpy(value: Any, dtype: type = np.float64) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(dtype)
    return np.asarray(value, dtype=dtype)


class EarlyStopping:
    """Keeps the best model by (validation AUC, then lower validation loss), with patience.

    Validation sets of a few dozen patients give AUCs on a coarse grid, often
    1.0 early on; breaking ties by the loss keeps training while the model
    still gets more confident on the same ranking.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_key: tuple[float, float] | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, auc: float, loss: float, module: nn.Module) -> bool:
        """Record an epoch; return True when training should stop."""
        key = (round(auc, 12), -loss)
        if self.best_key is None or key > self.best_key:
            self.best_key = key
            self.best_epoch = epoch
            self.best_state = copy.deepcopy(module.state_dict())
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def safe_auc(y: npt.NDArray[np.int64], scores: npt.ArrayLike) -> float:
    """AUC, or 0.5 when ``y`` holds one class only (cannot happen with a stratified split)."""
    if y.min() == y.max():
        return 0.5
    return roc_auc(y, np.asarray(scores, dtype=np.float64))


# ----------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------


class Aggregator(ABC):
    """A MIL aggregator: bags of patch embeddings in, patient scores out.

    Subclasses declare their hyper-parameters in ``PARAMS`` as
    ``name: (default, kind, low, high)``; the constructor checks them and
    :meth:`config` returns them (plus ``"aggregator": name``) as plain JSON.
    After :meth:`fit`, ``n_features_`` and ``history_`` (one record per epoch)
    are set, and :meth:`summary` gives a JSON-ready account of the fit.
    """

    name: ClassVar[str]
    PARAMS: ClassVar[dict[str, tuple[Any, str, float, float]]]

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise InputError(
                f"unknown parameter {unknown[0]!r} for the {self.name} aggregator; "
                f"expected one of {', '.join(sorted(self.PARAMS))}"
            )
        self.params: dict[str, Any] = {}
        for key, (default, kind, low, high) in self.PARAMS.items():
            self.params[key] = check_param(key, params.get(key, default), kind, low, high)
        self.n_features_: int | None = None
        self.history_: list[dict[str, Any]] = []
        self.fit_info_: dict[str, Any] = {}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.params.items() if v != self.PARAMS[k][0]}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        fitted = "" if self.n_features_ is None else f" fitted on D={self.n_features_}"
        return f"{type(self).__name__}({args}){fitted}"

    # -- public API ---------------------------------------------------------

    def fit(
        self,
        bags: Sequence[np.ndarray],
        labels: Sequence[int],
        *,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> Self:
        """Train on these bags (the training cohort only) and return ``self``.

        ``progress(done, total, message)`` is called once per epoch and once at
        the end (``done == total``).
        """
        checked = check_bags(bags)
        y = check_labels(labels, len(checked))
        seed = check_seed(seed)
        report: ProgressFn = progress if progress is not None else (lambda d, t, m: None)
        rng = np.random.default_rng(seed)
        split = inner_split(y, float(self.params["val_fraction"]), rng)
        if split is None and self.params["val_fraction"] > 0:
            warnings.warn(
                "a class has fewer than 2 patients: no inner validation set, so no early "
                f"stopping; training runs all {self.params['max_epochs']} epochs",
                UserWarning,
                stacklevel=2,
            )
        self.history_ = []
        self.n_features_ = int(checked[0].shape[1])
        try:
            with torch_session(seed):
                self._fit(checked, y, split, rng, report)
        except BaseException:
            self.n_features_ = None  # a failed or interrupted fit leaves no half-fitted model
            raise
        self.fit_info_ = {
            "seed": seed,
            "n_bags": len(checked),
            "n_positive": int(y.sum()),
            "n_patches": int(sum(b.shape[0] for b in checked)),
            "n_features": self.n_features_,
            "n_validation": 0 if split is None else int(split[1].size),
            **self.fit_info_,
        }
        return self

    # The training cohort's embedding moments, set by ``fit`` (both aggregators
    # standardise their input with them).
    _mean: FloatArray | None = None
    _std: FloatArray | None = None

    def _standardise(self, x: np.ndarray) -> torch.Tensor:
        """(x - mean) / std with the training moments, as a float32 tensor."""
        if self._mean is None or self._std is None:
            raise InputError(f"the {self.name} aggregator is not fitted")
        return torch.from_numpy((x.astype(np.float32) - self._mean) / self._std)

    def patch_logit_module(self) -> nn.Module:
        """A differentiable module: raw embeddings ``[n, D]`` (float32) -> per-patch logits ``[n]``.

        The patch-level classifier of a fitted aggregator, with its input
        standardisation, for gradient-based explanations (Grad-CAM through
        the encoder): the histogram's patch head, or attention MIL's instance
        classifier applied to each patch's embedding on its own.
        """
        raise NotImplementedError

    def predict(self, bags: Sequence[np.ndarray]) -> list[BagPrediction]:
        """Score every bag on its own; one :class:`BagPrediction` per bag, in order."""
        if self.n_features_ is None:
            raise InputError(f"the {self.name} aggregator is not fitted: call fit or from_state")
        checked = check_bags(bags, self.n_features_)
        with torch_session(None):
            return self._predict(checked)

    def config(self) -> dict[str, Any]:
        """Every hyper-parameter, as plain JSON, plus ``"aggregator"``: the name."""
        return {"aggregator": self.name, **self.params}

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted model.

        Only torch tensors, ``int``/``float``/``str``, lists and dicts, so that
        ``torch.load(path, weights_only=True)`` (the safe loader) reads it back.
        """
        if self.n_features_ is None:
            raise InputError(f"the {self.name} aggregator is not fitted: nothing to save")
        return {
            "version": STATE_VERSION,
            "aggregator": self.name,
            "n_features": self.n_features_,
            "fit": copy.deepcopy(self.fit_info_),
            "history": copy.deepcopy(self.history_),
            **self._state(),
        }

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state: Mapping[str, Any]) -> Self:
        """Rebuild a fitted aggregator from :meth:`config` and :meth:`state`."""
        params = dict(config)
        name = params.pop("aggregator", cls.name)
        if name != cls.name or state.get("aggregator", cls.name) != cls.name:
            raise InputError(
                f"config is for the {name!r} aggregator, state for {state.get('aggregator')!r}; "
                f"{cls.__name__} needs {cls.name!r}"
            )
        if state.get("version") != STATE_VERSION:
            raise InputError(
                f"saved state version {state.get('version')!r} is not {STATE_VERSION}; retrain"
            )
        model = cls(**params)
        model.n_features_ = int(state["n_features"])
        model.fit_info_ = dict(state.get("fit", {}))
        model.history_ = list(state.get("history", []))
        model._load_state(state)
        return model

    def summary(self) -> dict[str, Any]:
        """JSON-ready account of the fit: seed, sizes, best epoch, validation AUC."""
        return {"aggregator": self.name, **copy.deepcopy(self.fit_info_)}

    # -- for subclasses -----------------------------------------------------

    @abstractmethod
    def _fit(
        self,
        bags: list[np.ndarray],
        y: npt.NDArray[np.int64],
        split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None,
        rng: np.random.Generator,
        report: ProgressFn,
    ) -> None: ...

    @abstractmethod
    def _predict(self, bags: list[np.ndarray]) -> list[BagPrediction]: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None: ...


# ----------------------------------------------------------------------------
# Input standardisation as a module (for gradients through a fitted head)
# ----------------------------------------------------------------------------


class Standardise(nn.Module):
    """(x - mean) / std with the training cohort's embedding moments."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
