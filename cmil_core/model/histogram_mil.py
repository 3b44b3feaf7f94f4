"""Histogram MIL, the cMIL study's recipe: patch classifier -> histogram + TF-IDF -> regression.

:class:`HistogramMIL` (``"histogram"``; Ma et al., J Transl Med 2026, after
Cao et al., Theranostics 2020): a patch classifier trained with every patch
carrying its patient's label, patient features from the distribution of that
patient's patch probabilities (a probability histogram and a bag-of-words
TF-IDF), then a logistic regression. The class docstring gives the method
and its defaults; the interface is :class:`cmil_core.model.aggregator.Aggregator`,
the overview :mod:`cmil_core.model.mil`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.nn import functional as F

from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.model.aggregator import (
    Aggregator,
    BagPrediction,
    EarlyStopping,
    FloatArray,
    ProgressFn,
    Standardise,
    check_bags,
    feature_moments,
    safe_auc,
    to_numpy,
    to_tensor,
    torch_session,
)

__all__ = ["HistogramMIL"]

_PREDICT_CHUNK = 16384  # patches per forward pass at prediction time


class _PatchHead(nn.Module):
    """D -> hidden -> 1 patch classifier on standardised embeddings."""

    def __init__(self, n_features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x).squeeze(-1)
        return logits


class HistogramMIL(Aggregator):
    """cMIL's aggregator: patch classifier -> probability histogram + TF-IDF -> logistic regression.

    Three stages, every learned piece fitted on the bags given to :meth:`fit`:

    (a) **Patch classifier.** A small MLP head (``D -> hidden -> 1``, ReLU,
        dropout) on standardised frozen embeddings, trained with binary
        cross-entropy where every patch carries its patient's label. These
        labels are noisy by design: most patches of a metastatic patient are
        normal marrow labelled 1. Because normal patches appear in both
        classes, the head can only push them towards the base rate, while
        tumour-like patches, seen only in positive patients, are pushed
        towards 1: the probability becomes a tumour-likeness score.

        *Class-balanced sampling*: each epoch draws ``patches_per_epoch``
        patches with replacement so that each class carries half the weight
        and, within a class, each patient the same weight whatever its bag
        size (a patch of patient i is drawn with probability
        ``1 / (2 * n_patients_in_class * n_patches_i)``): a 5,000-patch
        patient does not outvote fifty 100-patch ones.

        *Augmentation*: on frozen embeddings only feature-space augmentation is
        possible: Gaussian noise (``noise_std`` standard deviations of each
        feature) and dropout on the input features (``input_dropout``). The
        stain and colour augmentation of the study (so that the classifier
        survives another centre's staining) acts on pixels, *before* the
        encoder, and is **not** done here; with a frozen encoder, stain
        robustness must come from the encoder or from stain normalisation
        upstream.

        *Early stopping* on the **patient-level** AUC of an inner,
        patient-stratified validation split of the training bags
        (``val_fraction``; patient score = mean patch probability), ties broken
        by the validation loss, with ``patience`` epochs; the best epoch's
        weights are kept.

    (b) **Patient features** from the patient's patch probabilities ``p``:
        the normalised histogram of ``p`` over ``n_bins`` equal bins of [0, 1]
        (fractions that sum to 1: bag size drops out), and a TF-IDF
        bag-of-words where each patch is the "word" ``p`` rounded to
        ``1/word_levels`` (``word_levels + 1`` words; rounding half up). TF-IDF
        (sklearn's ``TfidfTransformer``: smooth idf, l2 norm) is fitted on the
        training patients only; it down-weights words that every patient has
        (the many near-base-rate normal patches) and up-weights words that few
        have (confident tumour patches). The two views overlap (both count
        probabilities in tenths, offset by half a bin); the study used both.
        The features are standardised (training mean and SD).

    (c) **Logistic regression** (sklearn, ``C``, ``class_weight="balanced"``,
        lbfgs) on those features: the patient score is its probability.

    **Cross-fitting** (``crossfit_folds``, default 5; a departure from the
    study, which fitted (b) and (c) on the head's in-sample probabilities).
    The head has *seen* the training patches: with patient labels on every
    patch it partly memorises them, so a training patient's histogram is far
    more extreme than a new patient's (on planted-signal bags the in-sample
    regression reached training AUC 0.999 and held-out AUC 0.90-0.93). So the
    patient features of each training patient come from a head that did not
    see that patient: the patients are split into ``crossfit_folds``
    stratified folds, and a head trained on the other folds (for the main
    head's best epoch count, on about the same number of patients) gives the
    fold's probabilities. TF-IDF and the regression are fitted on these
    out-of-fold features, which are distributed like the main head's
    features on new patients (held-out AUC 0.94-0.95 on the same bags). The
    extra heads are used only during ``fit`` and are not saved. Set
    ``crossfit_folds=0`` for the study's original in-sample fit.

    Per-patch importance is the patch probability (``attention`` is None).

    Parameters (defaults, and why)
    ------------------------------
    hidden=64, dropout=0.25:
        a small head; frozen embeddings already carry the morphology, and a
        wide head memorises the noisy patch labels faster.
    input_dropout=0.1, noise_std=0.1:
        feature-space augmentation (in SDs of standardised features).
    lr=1e-3, weight_decay=1e-4, batch_size=256:
        Adam defaults that suit a two-layer head.
    patches_per_epoch=8192:
        an "epoch" is a fixed number of class-balanced draws, so an epoch
        costs the same for 50 or 1,000,000 patches.
    max_epochs=40, patience=8, val_fraction=0.2:
        early stopping on patient AUC; 20% of the training patients validate.
    n_bins=10, word_levels=10:
        histogram of tenths and words rounded to 0.1, as in the study.
    C=1.0:
        fixed ridge penalty of the regression on standardised features; the
        features are few (``n_bins + word_levels + 1``) but patients are too.
    crossfit_folds=5:
        out-of-fold patient features for the regression (above); 0 = in-sample.

    References: Ma et al., J Transl Med 2026 (cMIL); Cao et al., Theranostics
    2020;10:11080 (patch likelihood histogram and bag-of-words TF-IDF
    features); Campanella et al., Nat Med 2019 (patch-level weak labels).
    """

    name = "histogram"
    PARAMS: ClassVar[dict[str, tuple[Any, str, float, float]]] = {
        "hidden": (64, "int", 1, 4096),
        "dropout": (0.25, "float", 0.0, 0.95),
        "input_dropout": (0.1, "float", 0.0, 0.95),
        "noise_std": (0.1, "float", 0.0, 10.0),
        "lr": (1e-3, "float", 1e-6, 1.0),
        "weight_decay": (1e-4, "float", 0.0, 1.0),
        "batch_size": (256, "int", 1, 65536),
        "patches_per_epoch": (8192, "int", 1, 10_000_000),
        "max_epochs": (40, "int", 1, 10_000),
        "patience": (8, "int", 1, 10_000),
        "val_fraction": (0.2, "float", 0.0, 0.5),
        "n_bins": (10, "int", 2, 1000),
        "word_levels": (10, "int", 1, 1000),
        "C": (1.0, "float", 1e-6, 1e6),
        "crossfit_folds": (5, "int", 0, 100),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["crossfit_folds"] == 1:
            raise InputError("crossfit_folds=1 is not a split; use 0 (in-sample) or 2 or more")
        self._head: _PatchHead | None = None
        self._mean: FloatArray | None = None
        self._std: FloatArray | None = None
        self._idf: npt.NDArray[np.float64] | None = None
        self._feat_mean: npt.NDArray[np.float64] | None = None
        self._feat_std: npt.NDArray[np.float64] | None = None
        self._coef: npt.NDArray[np.float64] | None = None
        self._intercept: float = 0.0

    # -- stage (a) ------------------------------------------------------------

    def patch_logit_module(self) -> nn.Module:
        if self._head is None or self._mean is None or self._std is None:
            raise InputError("the histogram aggregator is not fitted")
        head = copy.deepcopy(self._head).eval()
        return nn.Sequential(Standardise(self._mean, self._std), head)

    def _patch_probabilities(self, bag: np.ndarray, head: _PatchHead | None = None) -> FloatArray:
        """Probabilities of every patch of one bag under ``head`` (default: the fitted one)."""
        head = head if head is not None else self._head
        assert head is not None
        head.eval()
        out = np.empty(bag.shape[0], dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, bag.shape[0], _PREDICT_CHUNK):
                x = self._standardise(bag[start : start + _PREDICT_CHUNK])
                out[start : start + x.shape[0]] = torch.sigmoid(head(x)).numpy()
        return out

    def _fit(
        self,
        bags: list[np.ndarray],
        y: npt.NDArray[np.int64],
        split: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None,
        rng: np.random.Generator,
        report: ProgressFn,
    ) -> None:
        p = self.params
        self._mean, self._std = feature_moments(bags)
        train_idx, val_idx = split if split is not None else (np.arange(len(bags)), None)
        n_cross = int(p["crossfit_folds"])
        smallest = int(np.bincount(y, minlength=2).min())
        if n_cross >= 2:
            n_cross = min(n_cross, smallest) if smallest >= 2 else 0
        total_steps = p["max_epochs"] + n_cross + 1

        # (a) the patch classifier, early-stopped on the inner validation patients
        head, stopper = self._train_head(
            bags, y, train_idx, val_idx, p["max_epochs"], rng, report, total_steps
        )
        self._head = head
        best_epoch = stopper.best_epoch if val_idx is not None else len(self.history_)
        self.fit_info_ = {
            "epochs_run": len(self.history_),
            "best_epoch": best_epoch,
            "stopped_early": len(self.history_) < p["max_epochs"],
            "val_auc": stopper.best_key[0] if stopper.best_key is not None else None,
            "crossfit_folds": n_cross,
        }

        # Patch probabilities of every training patient for (b) and (c): out-of-fold
        # (cross-fitted) when n_cross >= 2, else in-sample as in the study.
        if n_cross >= 2:
            probabilities: list[FloatArray] = [np.empty(0, np.float32)] * len(bags)
            folds = StratifiedKFold(n_cross, shuffle=True, random_state=int(rng.integers(2**31)))
            for f, (fit_idx, out_idx) in enumerate(folds.split(np.zeros(len(y)), y)):
                fold_head, _ = self._train_head(
                    bags, y, fit_idx, None, max(1, best_epoch), rng, None, total_steps
                )
                for i in out_idx:
                    probabilities[i] = self._patch_probabilities(bags[i], fold_head)
                done = p["max_epochs"] + f + 1
                report(done, total_steps, f"cross-fitted patient features {f + 1}/{n_cross}")
        else:
            probabilities = [self._patch_probabilities(b) for b in bags]

        # (b) patient features and (c) the logistic regression
        report(total_steps - 1, total_steps, "patient model: histogram + TF-IDF + regression")
        counts = np.stack([self._word_counts(q) for q in probabilities])
        tfidf = TfidfTransformer(norm="l2", use_idf=True, smooth_idf=True, sublinear_tf=False)
        tfidf.fit(counts)
        self._idf = np.asarray(tfidf.idf_, dtype=np.float64)
        raw = np.stack([self._raw_features(q) for q in probabilities])
        self._feat_mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        self._feat_std = np.where(std > 1e-12, std, 1.0)
        features = (raw - self._feat_mean) / self._feat_std
        regression = LogisticRegression(
            C=p["C"], class_weight="balanced", solver="lbfgs", max_iter=5000
        )
        regression.fit(features, y)
        self._coef = np.asarray(regression.coef_[0], dtype=np.float64)
        self._intercept = float(regression.intercept_[0])
        self.fit_info_["train_auc"] = roc_auc(y, self._regression_scores(raw))
        report(total_steps, total_steps, "done")

    def _train_head(
        self,
        bags: list[np.ndarray],
        y: npt.NDArray[np.int64],
        train_idx: npt.NDArray[np.int64],
        val_idx: npt.NDArray[np.int64] | None,
        epochs: int,
        rng: np.random.Generator,
        report: ProgressFn | None,
        total_steps: int,
    ) -> tuple[_PatchHead, EarlyStopping]:
        """Train one patch head on ``train_idx`` bags; early-stop on ``val_idx`` when given.

        With ``report`` (the main head) every epoch goes to ``history_``.
        """
        p = self.params
        # Class-balanced sampling: a patch of patient i is drawn with probability
        # 1 / (2 * n_patients_in_class * n_patches_i).
        train_bags = [bags[i] for i in train_idx]
        train_y = y[train_idx]
        sizes = np.array([b.shape[0] for b in train_bags], dtype=np.int64)
        patients_per_class = np.bincount(train_y, minlength=2).astype(np.float64)
        bag_weight = 1.0 / (2.0 * patients_per_class[train_y] * sizes)
        cdf = np.cumsum(np.repeat(bag_weight, sizes))
        cdf /= cdf[-1]
        row_label = np.repeat(train_y, sizes).astype(np.float32)
        pool = np.concatenate(train_bags, axis=0)  # keeps float16 when the bags are float16

        head = _PatchHead(self.n_features_ or 0, p["hidden"], p["dropout"])
        optimiser = torch.optim.Adam(head.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        stopper = EarlyStopping(p["patience"])
        for epoch in range(1, epochs + 1):
            head.train()
            draw = np.searchsorted(cdf, rng.random(p["patches_per_epoch"]), side="right")
            draw = np.minimum(draw, pool.shape[0] - 1)
            losses = []
            for start in range(0, draw.size, p["batch_size"]):
                rows = draw[start : start + p["batch_size"]]
                x = self._standardise(pool[rows])
                if p["noise_std"] > 0:
                    x = x + p["noise_std"] * torch.randn_like(x)
                if p["input_dropout"] > 0:
                    x = F.dropout(x, p["input_dropout"], training=True)
                target = torch.from_numpy(row_label[rows])
                loss = F.binary_cross_entropy_with_logits(head(x), target)
                optimiser.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)  # loss.backward(), which is untyped
                optimiser.step()
                losses.append(float(loss.detach()))
            if report is None:
                continue
            record: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses))}
            self.history_.append(record)
            if val_idx is None:
                report(epoch, total_steps, f"epoch {epoch}")
                continue
            auc, val_loss = self._validate([bags[i] for i in val_idx], y[val_idx], head)
            record.update(val_auc=auc, val_loss=val_loss)
            report(epoch, total_steps, f"epoch {epoch}: validation AUC {auc:.3f}")
            if stopper.update(epoch, auc, val_loss, head):
                break
        if stopper.best_state is not None:
            head.load_state_dict(stopper.best_state)
        return head, stopper

    def _validate(
        self, bags: list[np.ndarray], y: npt.NDArray[np.int64], head: _PatchHead
    ) -> tuple[float, float]:
        """Patient AUC of mean patch probability; class- and patient-balanced patch BCE."""
        means = np.empty(len(bags))
        losses = np.empty(len(bags))
        for i, bag in enumerate(bags):
            q = np.clip(self._patch_probabilities(bag, head).astype(np.float64), 1e-7, 1 - 1e-7)
            means[i] = q.mean()
            losses[i] = -np.mean(np.log(q) if y[i] == 1 else np.log1p(-q))
        loss = 0.5 * (losses[y == 1].mean() + losses[y == 0].mean())
        return safe_auc(y, means), float(loss)

    # -- stage (b) ------------------------------------------------------------

    def _word_counts(self, q: FloatArray) -> npt.NDArray[np.float64]:
        levels = self.params["word_levels"]
        words = np.floor(q.astype(np.float64) * levels + 0.5).astype(np.int64)
        return np.bincount(np.clip(words, 0, levels), minlength=levels + 1).astype(np.float64)

    def _raw_features(self, q: FloatArray) -> npt.NDArray[np.float64]:
        """Histogram fractions then TF-IDF (training idf, l2-normalised) of one bag."""
        assert self._idf is not None
        hist, _ = np.histogram(q.astype(np.float64), bins=self.params["n_bins"], range=(0.0, 1.0))
        hist = hist / q.size
        tf = self._word_counts(q) * self._idf
        norm = np.sqrt(np.sum(tf * tf))
        return np.concatenate([hist, tf / norm if norm > 0 else tf])

    # -- stage (c) ------------------------------------------------------------

    def _regression_scores(self, raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        assert self._coef is not None and self._feat_mean is not None
        assert self._feat_std is not None
        eta = ((raw - self._feat_mean) / self._feat_std) @ self._coef + self._intercept
        return 1.0 / (1.0 + np.exp(-np.clip(eta, -700.0, 700.0)))

    def patient_features(self, bags: Sequence[np.ndarray]) -> npt.NDArray[np.float64]:
        """``[n_bags, n_bins + word_levels + 1]`` patient features (before standardising).

        Columns: histogram fractions of bins ``[i/n_bins, (i+1)/n_bins)``, then
        TF-IDF weights of the words 0, 1/word_levels, ..., 1.
        """
        if self.n_features_ is None:
            raise InputError("the histogram aggregator is not fitted: call fit or from_state")
        checked = check_bags(bags, self.n_features_)
        with torch_session(None):
            return np.stack([self._raw_features(self._patch_probabilities(b)) for b in checked])

    def _predict(self, bags: list[np.ndarray]) -> list[BagPrediction]:
        out = []
        for bag in bags:
            q = self._patch_probabilities(bag)
            score = float(self._regression_scores(self._raw_features(q)[None, :])[0])
            out.append(BagPrediction(score=score, probability=q))
        return out

    # -- persistence ----------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        assert self._head is not None and self._mean is not None and self._std is not None
        assert self._idf is not None and self._coef is not None
        assert self._feat_mean is not None and self._feat_std is not None
        return {
            "patch_head": {k: v.detach().clone() for k, v in self._head.state_dict().items()},
            "input_mean": to_tensor(self._mean, torch.float32),
            "input_std": to_tensor(self._std, torch.float32),
            "tfidf_idf": to_tensor(self._idf),
            "feature_mean": to_tensor(self._feat_mean),
            "feature_std": to_tensor(self._feat_std),
            "lr_coef": to_tensor(self._coef),
            "lr_intercept": self._intercept,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        try:
            head = _PatchHead(self.n_features_ or 0, self.params["hidden"], self.params["dropout"])
            head.load_state_dict(state["patch_head"])
            self._head = head
            self._mean = to_numpy(state["input_mean"], np.float32)
            self._std = to_numpy(state["input_std"], np.float32)
            self._idf = to_numpy(state["tfidf_idf"])
            self._feat_mean = to_numpy(state["feature_mean"])
            self._feat_std = to_numpy(state["feature_std"])
            self._coef = to_numpy(state["lr_coef"])
            self._intercept = float(state["lr_intercept"])
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"saved histogram state does not match its config: {exc}") from None
