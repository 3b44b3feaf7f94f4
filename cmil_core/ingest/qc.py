"""Quality control as the user's decision: thresholds, decisions, bias warnings, stale marks.

Thresholds
----------
The thresholds of :class:`cmil_core.ingest.quality.QCThresholds` come, in this order
of precedence, from one flag per threshold (``--min-blur-variance 8``), a file
(``--qc FILE``: TOML, or JSON when the name ends in ``.json``), the cohort's
current decision, and the defaults (:func:`resolve_thresholds`). A file holds
the thresholds as top-level keys (or under one ``[qc]`` table); an unknown key
or a bad value is refused with the file and key named. Every threshold is a
number but one setting, ``nucleated_scope`` (``"field"`` or ``"patch"``,
``--nucleated-scope``): whether a photograph is judged "no nucleated cell" as a
whole field or patch by patch (:mod:`cmil_core.ingest.quality`).

Decisions
---------
Patches keep their quality metrics; a *decision* re-judges a cohort's patches
from them, in SQL, under :data:`cmil_core.ingest.quality.QC_RULES`
(:func:`cmil_core.store.apply_qc_decision`), and is recorded as a numbered row
of ``qc_decisions`` (who, when, where from, which thresholds, patches kept and
rejected) with an audit row. Re-deciding reads no slide. :func:`what_if`
counts the outcome of candidate thresholds without writing (the Quality
control page's live counts).

Stale marks
-----------
A model records its training cohort's decision (``config["qc_decision"]``);
scores record the scored cohort's decision (``patient_scores.qc_decision_id``).
Once a cohort is decided again, what was built on the older decision is stale
until rebuilt (:func:`stale_marks`). Feature files never go stale: they are
keyed by slide and tiling, and cover any subset of a slide's patches
(:func:`cmil_core.model.features.slide_features`).

Bias warnings
-------------
:func:`qc_warnings`: a cohort that loses more than 30 % of its patches, a
patient who loses every patch (listed by name), and a share of patches kept
that differs between label classes (``bm_metastasis`` 1 vs 0) by more than 10
points: quality control that removes, or leaks, the label.

Tiling compatibility
--------------------
:func:`training_tiling` is what a model remembers of its training cohort
(physical patch size, overlap, output pixels, metrics version, QC decision);
:func:`tiling_differences` lists what differs in a cohort to be scored.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.ingest.quality import NUCLEATED_SCOPES, NUMERIC_THRESHOLDS, QC_REASONS, QCThresholds
from cmil_core.store.model_rules import training_cohorts

__all__ = [
    "MAX_CLASS_GAP",
    "MAX_COHORT_LOSS",
    "QC_FIELDS",
    "SETTING_FIELDS",
    "THRESHOLD_FIELDS",
    "QCWarning",
    "apply_thresholds",
    "cohort_thresholds",
    "decision_thresholds",
    "flag_name",
    "format_qc",
    "format_thresholds",
    "load_thresholds_file",
    "model_notes",
    "qc_status",
    "qc_warnings",
    "resolve_thresholds",
    "stale_marks",
    "threshold_range",
    "tiling_differences",
    "training_tiling",
    "warnings_from_counts",
    "what_if",
]

#: Names of the numeric thresholds, in the dataclass's order (one flag and slider each).
THRESHOLD_FIELDS: tuple[str, ...] = NUMERIC_THRESHOLDS
#: Names of the QC settings that are words, not numbers, with their allowed values.
SETTING_FIELDS: dict[str, tuple[str, ...]] = {"nucleated_scope": NUCLEATED_SCOPES}
#: Every field of :class:`~cmil_core.ingest.quality.QCThresholds` (what a decision records).
QC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(QCThresholds))
#: A cohort losing more than this share of its patches is warned about.
MAX_COHORT_LOSS = 0.30
#: Kept shares of the two label classes differing by more than this are warned about.
MAX_CLASS_GAP = 0.10
# Shares exactly at a limit (6 of 20 is 30 %) are not over it, whatever the rounding.
_TOLERANCE = 1e-9


def flag_name(name: str) -> str:
    """``min_blur_variance`` -> ``--min-blur-variance``."""
    return "--" + name.replace("_", "-")


def format_thresholds(thresholds: Mapping[str, Any], sep: str = "=") -> str:
    """``max_dark_fraction=0.5, ..., nucleated_scope=field``: numbers as ``:g``, words as is."""
    return ", ".join(f"{k}{sep}{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{k}{sep}{v}" for k, v in thresholds.items())


# --------------------------------------------------------------------------- thresholds


def load_thresholds_file(path: str | os.PathLike[str]) -> dict[str, float | str]:
    """The thresholds a ``--qc`` file sets (TOML, or JSON for ``*.json``), checked one by one.

    Raises :class:`InputError` naming the file (and the key) when it cannot be
    read, is not TOML/JSON, holds an unknown key or a value that is not a number.
    """
    p = Path(path)
    name = p.name
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{name}: no such QC thresholds file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot be read ({exc})") from None
    try:
        data: Any = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise InputError(f"{name}: not valid {kind} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{name}: expected a table of thresholds (key = number)")
    if set(data) == {"qc"} and isinstance(data["qc"], dict):
        data = data["qc"]
    out: dict[str, float | str] = {}
    for key, value in data.items():
        if key in SETTING_FIELDS:
            if value not in SETTING_FIELDS[key]:
                raise InputError(f"{name}: key '{key}': {value!r} is not one of "
                                 f"{', '.join(repr(v) for v in SETTING_FIELDS[key])}")
            out[key] = str(value)
            continue
        if key not in THRESHOLD_FIELDS:
            raise InputError(f"{name}: unknown QC threshold '{key}'; the thresholds are "
                             f"{', '.join(QC_FIELDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise InputError(f"{name}: key '{key}': {value!r} is not a finite number")
        out[key] = float(value)
    try:
        QCThresholds.from_dict(out)
    except InputError as exc:
        bad = next((k for k in out if k in str(exc)), None)
        where = f"key '{bad}': " if bad else ""
        raise InputError(f"{name}: {where}{exc}") from None
    return out


def cohort_thresholds(store: store_mod.Store, cohort: str) -> QCThresholds | None:
    """The thresholds of the cohort's current decision (None: never decided)."""
    decision = store_mod.current_qc_decisions(store).get(cohort)
    return None if decision is None else decision_thresholds(decision)


def decision_thresholds(decision: Mapping[str, Any]) -> QCThresholds:
    """The thresholds a recorded decision (a row of ``qc_decisions``) was made with."""
    known = {k: v for k, v in decision["thresholds"].items() if k in QC_FIELDS}
    # A decision recorded before photographs could be judged by field was decided patch
    # by patch: re-deciding it keeps that, so an old cohort's outcome never changes
    # silently (the user opts in with --nucleated-scope field or on the QC page).
    known.setdefault("nucleated_scope", "patch")
    return QCThresholds.from_dict(known)


def resolve_thresholds(
    file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, float | str | None] | None = None,
    base: QCThresholds | None = None,
) -> QCThresholds | None:
    """Thresholds from ``base`` (default: the defaults), then ``file``, then ``overrides``
    (None values ignored). Returns None when neither a file nor an override is given
    (the caller then keeps the cohort's current decision)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(QC_FIELDS))
    if unknown:
        raise InputError(f"unknown QC threshold(s) {', '.join(unknown)}")
    if file is None and not given:
        return None
    values = (base or QCThresholds()).to_dict()
    if file is not None:
        values.update(load_thresholds_file(file))
    values.update({k: (v if k in SETTING_FIELDS else float(v)) for k, v in given.items()})
    try:
        return QCThresholds.from_dict(values)
    except InputError as exc:
        flags = [flag_name(k) for k in given if k in str(exc)]
        raise InputError(f"{flags[0] if flags else 'QC thresholds'}: {exc}") from None


# --------------------------------------------------------------------------- decisions


def apply_thresholds(
    db: store_mod.Store | str | os.PathLike[str], cohort: str, thresholds: QCThresholds, *,
    who: str, source: str = "cli", only_if_changed: bool = False,
) -> dict[str, Any]:
    """Re-decide ``cohort``'s QC under ``thresholds`` (see the module docstring); returns
    the decision: decision_id, decided_at, who, source, thresholds, kept, rejected, new."""
    with store_mod.using(db) as store:
        return store_mod.apply_qc_decision(store, cohort, thresholds.to_dict(), who=who,
                                           source=source, only_if_changed=only_if_changed)


def what_if(store: store_mod.Store, cohort: str, thresholds: QCThresholds) -> dict[str, Any]:
    """Counts under candidate thresholds, nothing written: ``{"patches", "kept",
    "rejected": {reason: n} (every reason, in rule order), "warnings": [...]}``."""
    frame = store_mod.qc_what_if(store, thresholds.to_dict(), cohort)
    rejected = dict.fromkeys(QC_REASONS, 0)
    kept = 0
    for row in frame.itertuples():
        if row.qc_reason is None or pd.isna(row.qc_reason):
            kept += int(row.patches)
        else:
            rejected[str(row.qc_reason)] = rejected.get(str(row.qc_reason), 0) + int(row.patches)
    counts = store_mod.qc_patient_counts(store, thresholds.to_dict(), cohort)
    return {"patches": kept + sum(rejected.values()), "kept": kept, "rejected": rejected,
            "warnings": [w.message for w in warnings_from_counts(counts)]}


# --------------------------------------------------------------------------- bias warnings


@dataclass(frozen=True)
class QCWarning:
    """One way quality control may bias the study (see the module docstring)."""

    kind: str  # "cohort-loss", "patients-without-patches", "class-imbalance"
    cohort: str
    message: str
    patients: list[str] = field(default_factory=list)
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _share(n: float, d: float) -> float:
    return n / d if d else math.nan


def warnings_from_counts(counts: pd.DataFrame) -> list[QCWarning]:
    """The bias warnings of per-patient counts (cohort, patient_id, bm_metastasis,
    patches, kept), as :func:`cmil_core.store.qc_patient_counts` gives them."""
    out: list[QCWarning] = []
    for cohort, rows in counts.groupby("cohort", sort=True):
        total, kept = int(rows["patches"].sum()), int(rows["kept"].sum())
        if total == 0:
            continue
        lost = (total - kept) / total
        if lost > MAX_COHORT_LOSS + _TOLERANCE:
            out.append(QCWarning(
                "cohort-loss", str(cohort),
                f"cohort '{cohort}': quality control rejects {lost:.0%} of its {total} patches "
                f"(more than {MAX_COHORT_LOSS:.0%}); check the thresholds against this "
                "cohort's metrics (Quality control page)", value=lost))
        empty = sorted(str(p) for p in rows.loc[(rows["patches"] > 0) & (rows["kept"] == 0),
                                                 "patient_id"])
        if empty:
            out.append(QCWarning(
                "patients-without-patches", str(cohort),
                f"cohort '{cohort}': {len(empty)} patient(s) lose every patch to quality "
                f"control and drop out of training and scoring: {', '.join(empty)}",
                patients=empty))
        labels = pd.to_numeric(rows["bm_metastasis"], errors="coerce")
        pos, neg = rows[labels == 1], rows[labels == 0]
        share_pos = _share(float(pos["kept"].sum()), float(pos["patches"].sum()))
        share_neg = _share(float(neg["kept"].sum()), float(neg["patches"].sum()))
        if math.isfinite(share_pos) and math.isfinite(share_neg):
            gap = share_pos - share_neg
            if abs(gap) > MAX_CLASS_GAP + _TOLERANCE:
                out.append(QCWarning(
                    "class-imbalance", str(cohort),
                    f"cohort '{cohort}': quality control keeps {share_pos:.0%} of the patches "
                    f"of patients with bone-marrow metastasis and {share_neg:.0%} of those "
                    f"without ({abs(gap) * 100:.0f} points apart, more than "
                    f"{MAX_CLASS_GAP * 100:.0f}): the decision depends on the label and may "
                    "leak or remove it", value=gap))
    return out


def qc_warnings(store: store_mod.Store, cohort: str | None = None) -> list[QCWarning]:
    """The bias warnings of the store's current QC (one cohort, or every cohort)."""
    return warnings_from_counts(store_mod.qc_patient_counts(store, None, cohort))


# --------------------------------------------------------------------------- stale marks


def stale_marks(store: store_mod.Store) -> dict[str, pd.DataFrame]:
    """What was built on an older QC decision, and scores made despite a tiling mismatch.

    ``models``: model_id, train_cohort, decision_id (the training cohort's decision
    it was trained on; None for models older than decisions), current_decision_id,
    stale. ``scores``: model_id, cohort, patients, decision_id, current_decision_id,
    stale, tiling_mismatch. Stale: the cohort has a decision now and it is not the
    one recorded.
    """
    current = {c: d["decision_id"] for c, d in store_mod.current_qc_decisions(store).items()}
    models = []
    for model_id in store_mod.list_models(store)["model_id"]:
        row = store_mod.get_model(store, str(model_id))
        if row is None:
            continue
        decision = (row.config.get("qc_decision") or {}) if isinstance(row.config, dict) else {}
        cohort = decision.get("cohort") or ",".join(training_cohorts(row))
        used = decision.get("decision_id")
        now = current.get(cohort)
        models.append({"model_id": row.model_id, "train_cohort": cohort, "decision_id": used,
                       "current_decision_id": now,
                       "stale": now is not None and used != now})
    scores = store_mod.score_marks_frame(store)
    decisions = [None if pd.isna(v) else int(v) for v in scores["qc_decision_id"]]
    now_ids = [current.get(c) for c in scores["cohort"]]
    scores = scores.assign(
        decision_id=pd.array(decisions, dtype="Int64"),
        current_decision_id=pd.array(now_ids, dtype="Int64"),
        stale=[n is not None and d != n for d, n in zip(decisions, now_ids, strict=True)],
        tiling_mismatch=[None if pd.isna(v) else str(v) for v in scores["tiling_mismatch"]],
    ).drop(columns=["qc_decision_id"])
    model_frame = pd.DataFrame(models, columns=["model_id", "train_cohort", "decision_id",
                                                "current_decision_id", "stale"])
    return {"models": model_frame, "scores": scores}


def model_notes(marks: dict[str, pd.DataFrame], model_id: str) -> list[str]:
    """Sentences for a page or report about one model: stale, stale scores, mismatches."""
    notes = []
    models = marks["models"]
    row = models[models["model_id"] == model_id]
    if len(row) and bool(row["stale"].iloc[0]):
        r = row.iloc[0]
        before = "before QC decisions were recorded" if r["decision_id"] is None or pd.isna(
            r["decision_id"]) else f"on QC decision {int(r['decision_id'])}"
        notes.append(f"Model {model_id} is stale: it was trained {before} of cohort "
                     f"'{r['train_cohort']}', whose quality control is now decision "
                     f"{int(r['current_decision_id'])}; train it again to use the new decision.")
    scores = marks["scores"]
    mine = scores[scores["model_id"] == model_id]
    stale = mine[mine["stale"]]
    if len(stale):
        names = ", ".join(f"'{c}'" for c in stale["cohort"])
        notes.append(f"Scores of cohort(s) {names} by {model_id} are stale: made on an older "
                     "QC decision of the cohort; score again to refresh them.")
    for r in mine[mine["tiling_mismatch"].notna()].itertuples():
        notes.append(f"Cohort '{r.cohort}' was scored by {model_id} despite a tiling or QC "
                     f"mismatch with the training cohort ({r.tiling_mismatch}).")
    return notes


# --------------------------------------------------------------------------- tiling


def _tiling_values(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Distinct patch_um, overlap, output_px and metrics_version over slide tiling records."""
    out: dict[str, set[Any]] = {"patch_um": set(), "overlap": set(), "output_px": set(),
                                "metrics_version": set()}
    for rec in records:
        config = rec.get("config") or {}
        for key in ("patch_um", "overlap", "output_px"):
            if config.get(key) is not None:
                out[key].add(round(float(config[key]), 6))
        if rec.get("metrics_version") is not None:
            out["metrics_version"].add(int(rec["metrics_version"]))
    return {k: sorted(v) for k, v in out.items()}


def training_tiling(store: store_mod.Store, cohort: str) -> dict[str, Any]:
    """What a model remembers of its training cohort's patches: ``patch_um``,
    ``overlap``, ``output_px``, ``metrics_version`` (lists of the distinct values
    over its slides) and ``qc_decision`` (decision_id, thresholds)."""
    values = _tiling_values(store_mod.cohort_tilings(store, cohort))
    decision = store_mod.current_qc_decisions(store).get(cohort)
    return {
        **values,
        "qc_decision": None if decision is None else {
            "cohort": cohort, "decision_id": decision["decision_id"],
            "thresholds": decision["thresholds"]},
    }


def _fmt(values: list[Any]) -> str:
    return " and ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "none"


def tiling_differences(store: store_mod.Store, trained: Mapping[str, Any], cohort: str
                       ) -> list[str]:
    """What differs between a model's training tiling (:func:`training_tiling`, as in its
    config) and ``cohort``'s: patch size, overlap, output size, metrics version, QC
    thresholds. Empty when nothing differs, or when the model predates this record."""
    if not trained:
        return []
    here = training_tiling(store, cohort)
    out = []
    names = {"patch_um": "patch size (µm)", "overlap": "overlap", "output_px": "output px",
             "metrics_version": "quality metrics version"}
    for key, label in names.items():
        a, b = list(trained.get(key) or []), here[key]
        if a and b and a != b:
            out.append(f"{label} {_fmt(a)} in training, {_fmt(b)} in '{cohort}'")
    mine = (trained.get("qc_decision") or {}).get("thresholds")
    theirs = (here.get("qc_decision") or {}).get("thresholds")
    if mine and theirs and mine != theirs:
        default = QCThresholds().to_dict()  # decisions older than a setting had its default
        changed = [f"{k} {mine.get(k, default[k])} vs {theirs.get(k, default[k])}"
                   for k in QC_FIELDS if mine.get(k, default[k]) != theirs.get(k, default[k])]
        if changed:
            out.append("QC thresholds " + ", ".join(changed) + f" (training vs '{cohort}')")
    return out


# --------------------------------------------------------------------------- the qc command


def qc_status(store: store_mod.Store, cohort: str, thresholds: QCThresholds | None,
              applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """A cohort's QC for the ``qc`` command: the current decision and its counts, the
    counts under ``thresholds`` (None: the current ones, else the defaults), their bias
    warnings, and what is stale. JSON-ready."""
    decision = store_mod.current_qc_decisions(store).get(cohort)
    current = cohort_thresholds(store, cohort)
    candidate = thresholds or current or QCThresholds()
    now = what_if(store, cohort, current or QCThresholds()) if decision is not None else None
    then = what_if(store, cohort, candidate)
    marks = stale_marks(store)
    models = marks["models"]
    scores = marks["scores"]
    return {
        "cohort": cohort,
        "applied": applied is not None,
        "decision": None if decision is None else {
            k: (str(v) if k == "decided_at" else v) for k, v in decision.items()},
        "current": now,
        "thresholds": candidate.to_dict(),
        "candidate": then,
        "stale_models": [str(m) for m in models.loc[models["stale"]
                                                    & (models["train_cohort"] == cohort),
                                                    "model_id"]],
        "stale_scores": [str(m) for m in scores.loc[scores["stale"]
                                                    & (scores["cohort"] == cohort),
                                                    "model_id"]],
    }


def format_qc(result: dict[str, Any]) -> str:
    """:func:`qc_status` for a terminal."""
    lines = []
    d = result["decision"]
    cohort = result["cohort"]
    if d is None:
        lines.append(f"cohort '{cohort}': no QC decision yet (ingest records one)")
    else:
        verb = "applied" if result["applied"] else "current"
        lines.append(f"cohort '{cohort}': {verb} decision {d['decision_id']} ({d['source']}, "
                     f"{d['who']}, {d['decided_at']})")
    lines.append("thresholds: " + format_thresholds(result["thresholds"]))
    rows = [("kept", "kept")] + [(r, f"rejected: {r}") for r in QC_REASONS]
    now, then = result["current"], result["candidate"]
    width = max(len(label) for _, label in rows)
    head = f"{'':<{width}}  {'now':>9}  {'these':>9}" if now and not result["applied"] else \
        f"{'':<{width}}  {'patches':>9}"
    lines.append(head)
    for key, label in rows:
        b = then["kept"] if key == "kept" else then["rejected"].get(key, 0)
        if now and not result["applied"]:
            a = now["kept"] if key == "kept" else now["rejected"].get(key, 0)
            lines.append(f"{label:<{width}}  {a:>9}  {b:>9}")
        else:
            lines.append(f"{label:<{width}}  {b:>9}")
    lines.extend(f"warning: {w}" for w in then["warnings"])
    if result["stale_models"]:
        lines.append("stale models (trained on an older decision): "
                     + ", ".join(result["stale_models"]))
    if result["stale_scores"]:
        lines.append(f"stale scores of '{cohort}' by: " + ", ".join(result["stale_scores"]))
    if not result["applied"]:
        lines.append("nothing written; add --apply to record these thresholds as a decision")
    return "\n".join(lines)


# --------------------------------------------------------------------------- page helpers


def threshold_range(name: str, value: float, ranges: pd.DataFrame) -> tuple[float, float, float]:
    """``(low, high, step)`` of a slider for threshold ``name``: the range of the metrics
    its rule reads in the cohort (``ranges`` of :func:`cmil_core.store.qc_metric_ranges`),
    widened to hold ``value`` and the default, on a grid of about a hundred steps."""
    from cmil_core.ingest.quality import QC_RULES

    columns = {c for rule in QC_RULES for c, _, n in rule.conditions if n == name}
    rows = ranges[ranges["column"].isin(columns)]
    default = float(getattr(QCThresholds(), name))
    points = [float(value), default]
    points += [float(v) for v in pd.concat([rows["low"], rows["high"]]).dropna()]
    low, high = min(points), max(points)
    if high <= low:
        high = low + 1.0
    exponent = math.floor(math.log10((high - low) / 100))
    step = 10.0 ** exponent
    digits = max(0, -exponent)  # e.g. 182.7, not 182.70000000000002
    low = round(math.floor(low / step) * step, digits)
    high = round(math.ceil(high / step) * step, digits)
    return float(low), float(high), float(round(step, digits))
