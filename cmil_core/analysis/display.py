"""Words and numbers as a clinician reads them: one table for every page, figure and report.

The store, the command line and CSV downloads keep the raw names
(``os_months``, ``lr``, ``cv_auc``); whatever a person reads on a page, in a
figure or in a report goes through this module:

- :func:`column`, :func:`parameter`, :func:`metric`: the display name of a
  table column (clinical or technical), a training parameter, a metric;
  unknown names are turned into words (``foo_bar`` -> ``Foo bar``), never shown
  raw.
- :func:`value`: a cell in words (``os_event`` 1 -> ``yes``; a slide kind
  ``openslide:generic-tiff`` -> ``scanned slide (TIFF)``).
- One number format per quantity: :func:`count` (thousands separators),
  :func:`cutoff` (always :data:`CUTOFF_DIGITS` decimals), :func:`p_value`
  (``p < 0.001`` or two significant digits), :func:`proportion` (a share with
  its Wilson 95% CI), :func:`estimate_ci` (AUC, HR and such with their CI).

>>> column("os_months"), parameter("lr"), count(9525), cutoff(0.47312), p_value(0.0341)
('OS (months)', 'Learning rate', '9,525', '0.473', 'p = 0.034')
>>> proportion(18, 24)
'0.75 (0.55-0.88)'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

__all__ = [
    "COLUMNS",
    "CUTOFF_DIGITS",
    "METRICS",
    "PARAMETERS",
    "column",
    "columns",
    "count",
    "count_share",
    "cutoff",
    "estimate_ci",
    "metric",
    "p_cell",
    "p_value",
    "parameter",
    "proportion",
    "proportion_ci",
    "renamed",
    "threshold",
    "value",
]

#: Decimals of a risk-group cutoff, everywhere it is written.
CUTOFF_DIGITS = 3

#: Table columns: clinical variables, scores, slides, patches, quality control.
COLUMNS: dict[str, str] = {
    # patients and clinical tables
    "cohort": "Cohort",
    "patient_id": "Patient",
    "center": "Centre",
    "role": "Role",
    "bm_metastasis": "BM metastasis",
    "os_months": "OS (months)",
    "os_event": "Died",
    "efs_months": "EFS (months)",
    "efs_event": "EFS event",
    "age_months": "Age (months)",
    "age": "Age",
    "sex": "Sex",
    "inss_stage": "INSS stage",
    "inrg_stage": "INRG stage",
    "mycn": "MYCN",
    "del_1p": "1p deletion",
    "aberration_11q": "11q aberration",
    "ploidy": "Ploidy",
    "histology": "Histology",
    # scores
    "score": "cMIL score",
    "score_raw": "Model output (before mapping)",
    "risk_group": "Risk group",
    "review": "Review",
    "label": "BM metastasis",
    # slides and patches
    "slide_id": "Slide",
    "name": "File",
    "path": "File",
    "kind": "Type",
    "width": "Width (px)",
    "height": "Height (px)",
    "mpp": "µm per pixel",
    "status": "Status",
    "patches": "Patches",
    "patches_kept": "Patches kept",
    "patches_rejected": "Patches rejected",
    "qc_reason": "Rejected because",
    "x": "x (px)",
    "y": "y (px)",
    "size": "Size (px)",
    "attention": "Attention",
    "attention_raw": "Raw attention",
    "probability": "Tumour probability",
    # quality-control metrics
    "background_fraction": "Background share",
    "mean_intensity": "Mean brightness (0-255)",
    "dark_fraction": "Dark share",
    "bright_fraction": "Bright share",
    "blur_variance": "Sharpness (Laplacian variance)",
    "nuclei_fraction": "Nuclei share",
    "nuclear_area_um2": "Nuclear area (µm²)",
    "thick_fraction": "Thick-smear share",
}

#: Training parameters (of the aggregators and the patch CNN).
PARAMETERS: dict[str, str] = {
    "lr": "Learning rate",
    "max_epochs": "Maximum epochs",
    "epochs": "Epochs",
    "embed_dim": "Embedding size",
    "attention_dim": "Attention size",
    "dropout": "Dropout",
    "hidden": "Hidden units",
    "n_bins": "Histogram bins",
    "C": "Inverse regularisation (C)",
    "weight_decay": "Weight decay",
    "patience": "Early-stopping patience (epochs)",
    "val_fraction": "Validation share",
    "max_train_patches": "Patches per patient in training",
    "batch_size": "Batch size",
    "seed": "Seed",
    "folds": "Cross-validation folds",
    "encoder": "Patch encoder",
    "aggregator": "Aggregator",
    "input_px": "Encoder input (px)",
}

#: Metrics of a model or a cohort.
METRICS: dict[str, str] = {
    "cv_auc": "Cross-validated AUC",
    "cv_fold_aucs": "Fold AUCs",
    "cv_k": "Cross-validation folds",
    "in_sample_auc": "In-sample AUC (optimistic)",
    "n_train": "Patients trained on",
    "n_positive": "of whom BM+",
    "auc": "AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "brier": "Brier score",
    "hr": "Hazard ratio",
    "concordance": "Concordance",
    "cutoff": "Cutoff",
}

_YES_NO_COLUMNS = ("bm_metastasis", "os_event", "efs_event", "label")
_SLIDE_KINDS = {"openslide": "scanned slide", "fov": "photograph", "image": "photograph"}


def _words(name: str) -> str:
    text = str(name).replace("_", " ").strip()
    return text[:1].upper() + text[1:] if text else text


def column(name: str) -> str:
    """A column's display name (``os_months`` -> ``OS (months)``)."""
    return COLUMNS.get(name) or METRICS.get(name) or _words(name)


def parameter(name: str) -> str:
    """A training parameter's display name (``lr`` -> ``Learning rate``)."""
    return PARAMETERS.get(name) or _words(name)


def metric(name: str) -> str:
    """A metric's display name (``cv_auc`` -> ``Cross-validated AUC``)."""
    return METRICS.get(name) or _words(name)


def threshold(name: str) -> str:
    """A quality-control threshold's display name (``max_background_fraction`` ->
    ``Highest background share``)."""
    for prefix, word in (("max_", "Highest"), ("min_", "Lowest")):
        if name.startswith(prefix):
            what = column(name[len(prefix):])
            return f"{word} {what[:1].lower()}{what[1:]}"
    return column(name)


def columns(names: Iterable[str]) -> list[str]:
    return [column(n) for n in names]


def renamed(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with display column names (for showing; CSV downloads keep the raw frame)."""
    return frame.rename(columns={c: column(str(c)) for c in frame.columns})


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def value(name: str, v: Any) -> str:
    """A cell in words: yes/no for 0/1 outcomes, slide kinds named, ``—`` when missing."""
    if _missing(v):
        return "—"
    if name in _YES_NO_COLUMNS:
        try:
            return "yes" if int(v) == 1 else "no"
        except (TypeError, ValueError):
            return str(v)
    if name == "kind":
        text = str(v)
        head, _, detail = text.partition(":")
        word = _SLIDE_KINDS.get(head, text)
        if detail:
            fmt = detail.replace("generic-", "").upper()
            return f"{word} ({fmt})"
        return word
    if name in ("os_months", "efs_months", "age_months"):
        return f"{float(v):.1f}"
    if name == "mpp":
        return f"{float(v):.3g}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) or (isinstance(v, float) and float(v).is_integer() and name in (
            "width", "height", "patches", "patches_kept", "patches_rejected")):
        return count(v)
    return str(v)


def count(n: Any) -> str:
    """A count with thousands separators: ``9,525``; ``—`` when missing."""
    return "—" if _missing(n) else f"{int(n):,}"


def count_share(part: Any, whole: Any) -> str:
    """``9,525 of 10,489 (91%)``."""
    if _missing(part) or _missing(whole):
        return "—"
    share = f" ({int(part) / int(whole):.0%})" if int(whole) else ""
    return f"{count(part)} of {count(whole)}{share}"


def cutoff(x: Any) -> str:
    """A risk-group cutoff, always with :data:`CUTOFF_DIGITS` decimals."""
    return "—" if _missing(x) else f"{float(x):.{CUTOFF_DIGITS}f}"


def p_cell(p: Any) -> str:
    """A p-value for a table cell: ``< 0.001`` or two significant digits (``0.034``, ``0.50``)."""
    if _missing(p):
        return "—"
    p = float(p)
    if p < 0.001:
        return "< 0.001"
    p = float(f"{p:.2g}")  # two significant digits (0.0999 -> 0.10, not 0.100)
    decimals = max(1, 1 - math.floor(math.log10(p)))
    return f"{p:.{decimals}f}"


def p_value(p: Any) -> str:
    """A p-value in a sentence or a figure: ``p < 0.001`` or ``p = 0.034``."""
    cell = p_cell(p)
    if cell == "—":
        return "p not estimable"
    return f"p {cell}" if cell.startswith("<") else f"p = {cell}"


def proportion_ci(v: Any, low: Any, high: Any, digits: int = 2) -> str:
    """A proportion with its 95% CI: ``0.75 (0.55-0.88)``; ``—`` when missing."""
    if _missing(v):
        return "—"
    if _missing(low) or _missing(high):
        return f"{float(v):.{digits}f}"
    return f"{float(v):.{digits}f} ({float(low):.{digits}f}-{float(high):.{digits}f})"


def proportion(k: int, n: int, digits: int = 2) -> str:
    """``k`` of ``n`` as a proportion with its Wilson 95% CI."""
    if n <= 0:
        return "—"
    from cmil_core.analysis.cutoffs import wilson_ci

    return proportion_ci(k / n, *wilson_ci(k, n), digits=digits)


def estimate_ci(v: Any, low: Any = None, high: Any = None, digits: int = 2) -> str:
    """An estimate (AUC, hazard ratio) with its 95% CI when there is one."""
    return proportion_ci(v, low, high, digits=digits)


def clinical_rows(clinical: Mapping[str, Any]) -> pd.DataFrame:
    """A patient's clinical variables as two display columns: Variable, Value."""
    return pd.DataFrame({
        "Variable": [column(k) for k in clinical],
        "Value": [value(k, v) for k, v in clinical.items()],
    })
