"""Models and their scores: the models table, patient and out-of-fold scores,
scored patches (for the patients page, the viewer and localisation checks)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from cmil_core.store._base import PATCH_ID_BASE
from cmil_core.store.connection import Store
from cmil_core.store.slides import patient_slide_ids


def list_models(store: Store) -> pd.DataFrame:
    """Models, newest first."""
    return store.cursor().execute(
        """SELECT model_id, created_at, aggregator, encoder, train_cohorts, cutoff
           FROM models ORDER BY created_at DESC, model_id DESC"""
    ).df()


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    created_at: datetime
    aggregator: str
    encoder: str
    train_cohorts: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    artifact_path: str
    cutoff: float | None


def add_model(store: Store, model: ModelRow) -> None:
    """Record a trained model (its artifacts are already on disk)."""
    with store.transaction() as cur:
        cur.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [model.model_id, model.created_at, model.aggregator, model.encoder,
             model.train_cohorts, json.dumps(model.config), json.dumps(model.metrics),
             model.artifact_path, model.cutoff],
        )


def delete_model(store: Store, model_id: str) -> None:
    """Remove a model's row and all its scores (its files are the caller's to remove)."""
    with store.transaction() as cur:
        cur.execute("DELETE FROM patch_scores WHERE model_id = ?", [model_id])
        cur.execute("DELETE FROM patient_scores WHERE model_id = ?", [model_id])
        cur.execute("DELETE FROM oof_scores WHERE model_id = ?", [model_id])
        cur.execute("DELETE FROM models WHERE model_id = ?", [model_id])


def get_model(store: Store, model_id: str) -> ModelRow | None:
    """A model's row, with config and metrics decoded; None when unknown."""
    row = store.cursor().execute(
        """SELECT model_id, created_at, aggregator, encoder, train_cohorts, config, metrics,
                  artifact_path, cutoff FROM models WHERE model_id = ?""",
        [model_id],
    ).fetchone()
    if row is None:
        return None
    values = list(row)
    values[5] = json.loads(values[5]) if values[5] else {}
    values[6] = json.loads(values[6]) if values[6] else {}
    return ModelRow(*values)


def write_scores(
    store: Store,
    model_id: str,
    cohort: str,
    patients: pd.DataFrame,
    patches: pd.DataFrame,
    *,
    qc_decision_id: int | None = None,
    tiling_mismatch: str | None = None,
) -> None:
    """Replace a model's scores for one cohort, in one transaction.

    ``patients``: patient_id, score, risk_group (and optionally score_raw). ``patches``: patch_id,
    probability, attention, attention_raw (patches of this cohort's slides).
    ``qc_decision_id``: the cohort's QC decision the scores were made on (the
    scores are stale once the cohort is decided again); ``tiling_mismatch``:
    what differed from the training cohort's tiling or QC when the user scored
    anyway (None: nothing differed).
    """
    import numpy as np
    import pyarrow as pa

    p = patients.loc[:, ["patient_id", "score", "risk_group"]].copy()
    # score_raw (optional): the final model's output before its map onto the
    # out-of-fold scale (cmil_core.model.recalibration); NULL when not given.
    p["score_raw"] = (patients["score_raw"].to_numpy(dtype=float) if "score_raw" in patients
                      else np.full(len(p), np.nan))
    p.insert(0, "cohort", cohort)
    p.insert(0, "model_id", model_id)
    p["qc_decision_id"] = pd.array([qc_decision_id] * len(p), dtype="Int32")
    p["tiling_mismatch"] = pd.array([tiling_mismatch] * len(p), dtype="string")
    # Patch scores as Arrow columns (NaN becomes NULL, as from pandas), the model id
    # a parameter rather than a text column of a million copies; stored in patch-id
    # order, i.e. slide by slide, so that reading one patient's or one slide's
    # scores skips the other row groups (_scored_arrays). bench/scale.py measures
    # this write at the study's 2.8 million patch scores.
    order = np.argsort(patches["patch_id"].to_numpy(dtype=np.int64), kind="stable")
    q = pa.table({
        "patch_id": pa.array(patches["patch_id"].to_numpy(dtype=np.int64)[order]),
        **{name: pa.array(patches[name].to_numpy(dtype=np.float64, na_value=np.nan)[order],
                          from_pandas=True)
           for name in ("probability", "attention", "attention_raw")},
    })
    try:
        with store.transaction() as cur:
            cur.execute(
                "DELETE FROM patient_scores WHERE model_id = ? AND cohort = ?", [model_id, cohort]
            )
            # The cohort's patches are those of its slides: patch_id // PATCH_ID_BASE is
            # the slide (write_slide_patches), so no join with the patches table is needed.
            cur.execute(
                f"""DELETE FROM patch_scores WHERE model_id = ?
                       AND patch_id // {PATCH_ID_BASE} IN (SELECT slide_id FROM slides
                                                           WHERE cohort = ?)""",
                [model_id, cohort],
            )
            cur.register("_p", p)
            cur.execute("INSERT INTO patient_scores BY NAME SELECT * FROM _p")
            cur.register("_q", q)
            cur.execute(
                """INSERT INTO patch_scores (model_id, patch_id, probability, attention,
                       attention_raw)
                   SELECT ?, patch_id, probability, attention, attention_raw FROM _q""",
                [model_id],
            )
    finally:  # once the transaction has ended (an aborted one accepts nothing)
        cur = store.cursor()
        cur.unregister("_p")
        cur.unregister("_q")


def patient_scores_frame(store: Store, model_id: str, cohort: str | None = None) -> pd.DataFrame:
    """A model's patient scores joined with labels and survival.

    ``score`` is on the out-of-fold scale (the cutoff's); ``score_raw`` is the
    final model's own output (NaN for scores written before it was kept).
    """
    sql = """SELECT s.cohort, s.patient_id, s.score, s.risk_group, s.score_raw, p.bm_metastasis,
                    p.os_months, p.os_event, p.efs_months, p.efs_event
             FROM patient_scores s JOIN patients p USING (cohort, patient_id)
             WHERE s.model_id = ?"""
    params: list[Any] = [model_id]
    if cohort is not None:
        sql += " AND s.cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY s.cohort, s.patient_id", params).df()


# --- out-of-fold scores (honest numbers for the training cohort) ---

def write_oof_scores(store: Store, model_id: str, cohort: str, scores: pd.DataFrame) -> None:
    """Replace a model's out-of-fold scores of its training cohort, in one transaction.

    ``scores``: patient_id, fold (0-based, the fold in which the patient was
    held out), score (from the fold model that did not see the patient).
    """
    frame = pd.DataFrame({
        "model_id": model_id, "cohort": cohort,
        "patient_id": scores["patient_id"].astype(str).to_numpy(),
        "fold": scores["fold"].to_numpy(dtype="int64"),
        "score": scores["score"].to_numpy(dtype=float),
    })
    try:
        with store.transaction() as cur:
            cur.execute("DELETE FROM oof_scores WHERE model_id = ? AND cohort = ?",
                        [model_id, cohort])
            cur.register("_o", frame)
            cur.execute("INSERT INTO oof_scores BY NAME SELECT * FROM _o")
    finally:
        store.cursor().unregister("_o")


def oof_scores_frame(store: Store, model_id: str, cohort: str | None = None) -> pd.DataFrame:
    """A model's out-of-fold training scores joined with labels and survival.

    Columns as :func:`patient_scores_frame` (``risk_group`` empty, ``score_raw``
    NaN) plus ``fold``.
    """
    sql = """SELECT o.cohort, o.patient_id, o.score, CAST(NULL AS TEXT) AS risk_group,
                    CAST(NULL AS DOUBLE) AS score_raw, p.bm_metastasis, p.os_months,
                    p.os_event, p.efs_months, p.efs_event, o.fold
             FROM oof_scores o JOIN patients p USING (cohort, patient_id)
             WHERE o.model_id = ?"""
    params: list[Any] = [model_id]
    if cohort is not None:
        sql += " AND o.cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY o.cohort, o.patient_id", params).df()


def localisation_patches(store: Store, model_id: str) -> pd.DataFrame:
    """Every scored patch of a model with its patient's label, for checks against ground truth.

    Columns: cohort, patient_id, bm_metastasis, slide_id, patch_id, x, y, size,
    probability, attention.
    """
    return store.cursor().execute(
        """SELECT s.cohort, s.patient_id, pt.bm_metastasis, p.slide_id, p.patch_id, p.x, p.y,
                  p.size, ps.probability, ps.attention
           FROM patch_scores ps JOIN patches p USING (patch_id) JOIN slides s USING (slide_id)
           JOIN patients pt ON pt.cohort = s.cohort AND pt.patient_id = s.patient_id
           WHERE ps.model_id = ?
           ORDER BY s.cohort, s.patient_id, p.patch_id""",
        [model_id],
    ).df()


# --- scored patches (patients page, viewer) ---

_SCORED_COLUMNS = ("patch_id", "slide_id", "x", "y", "size", "probability", "attention",
                   "attention_raw")


def _scored_arrays(store: Store, model_id: str, slide_ids: Sequence[int]) -> dict[str, Any]:
    """A model's scored patches of some slides as arrays (:data:`_SCORED_COLUMNS`),
    in patch-id order (slide, then grid).

    patch_id = slide_id * PATCH_ID_BASE + row, so one slide's patches form one
    contiguous id range, and both tables are written in id order, slide by
    slide (:func:`write_slide_patches`, :func:`write_scores`). Filtering both
    on the slides' id range lets DuckDB skip, by each row group's min/max,
    all but the row groups holding these slides; the two tables are read in
    one statement (one snapshot) without a join, and matched here by patch id.
    At the study's 1.4 million patches this takes about a millisecond, a
    third of a join of the tables (bench/scale.py).
    """
    import numpy as np

    ids = sorted({int(i) for i in slide_ids})
    if not ids:
        ids = [-1]  # no slide: an empty id range below
    low, high = ids[0] * PATCH_ID_BASE, (ids[-1] + 1) * PATCH_ID_BASE - 1
    # Both tables in one homogeneous result (no NULL: fetched as plain arrays):
    # _kind 1 = a score (a, b, c = probability, attention, attention_raw; NaN where
    # missing), _kind 0 = a patch (a, b, c, d = x, y, size, slide_id).
    rows = store.cursor().execute(
        """SELECT 1 AS _kind, patch_id, coalesce(probability, 'NaN') AS a,
                  coalesce(attention, 'NaN') AS b, coalesce(attention_raw, 'NaN') AS c,
                  0 AS d
           FROM patch_scores WHERE model_id = ? AND patch_id BETWEEN ? AND ?
           UNION ALL
           SELECT 0, patch_id, x, y, size, slide_id
           FROM patches WHERE patch_id BETWEEN ? AND ?""",
        [model_id, low, high, low, high],
    ).fetchnumpy()
    kind = np.asarray(rows["_kind"])
    patch_id = np.asarray(rows["patch_id"], dtype=np.int64)
    is_score = kind == 1
    if ids[-1] - ids[0] + 1 != len(ids):  # slides of others lie within the range
        wanted = np.isin(patch_id // PATCH_ID_BASE, ids)
        score_rows, patch_rows = (np.flatnonzero(is_score & wanted),
                                  np.flatnonzero(~is_score & wanted))
    else:
        score_rows, patch_rows = np.flatnonzero(is_score), np.flatnonzero(~is_score)
    # Unique on each side (primary keys); the result is sorted: patch-id order.
    common, i, j = np.intersect1d(patch_id[score_rows], patch_id[patch_rows],
                                  assume_unique=True, return_indices=True)
    score_rows, patch_rows = score_rows[i], patch_rows[j]
    a, b, c, d = (np.asarray(rows[name]) for name in "abcd")
    return {
        "patch_id": common,
        "slide_id": d[patch_rows].astype(np.int32),
        "x": a[patch_rows].astype(np.int32),
        "y": b[patch_rows].astype(np.int32),
        "size": c[patch_rows].astype(np.int32),
        "probability": a[score_rows].astype(np.float64),
        "attention": b[score_rows].astype(np.float64),
        "attention_raw": c[score_rows].astype(np.float64),
    }


def has_model(store: Store, model_id: str) -> bool:
    """Whether the store holds this model (cheaper than :func:`get_model`)."""
    row = store.cursor().execute(
        "SELECT count(*) FROM models WHERE model_id = ?", [model_id]).fetchone()
    return bool(row and row[0])


def scored_patches_frame(
    store: Store,
    model_id: str,
    *,
    slide_id: int | None = None,
    cohort: str | None = None,
    patient_id: str | None = None,
) -> pd.DataFrame:
    """A model's patch scores on one slide, or on all of one patient's slides.

    Give ``slide_id``, or ``cohort`` and ``patient_id``. Columns: patch_id,
    slide_id, x, y, size (level-0 pixels), probability, attention,
    attention_raw (NaN where the model gives none); in slide and grid order.
    """
    if slide_id is not None:
        ids = [int(slide_id)]
    else:
        if cohort is None or patient_id is None:
            raise ValueError("scored_patches_frame needs slide_id, or cohort and patient_id")
        ids = patient_slide_ids(store, cohort, patient_id)
    return pd.DataFrame(_scored_arrays(store, model_id, ids), columns=list(_SCORED_COLUMNS))


#: Per-patch scores :func:`extreme_patches` can rank by.
RANKABLE_SCORES = ("attention", "attention_raw", "probability")


def extreme_patches(
    store: Store, model_id: str, slide_ids: Sequence[int], *, by: str, k: int
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """``(top, bottom, scored)``: some slides' ``k`` highest-``by`` patches and ``k`` lowest.

    ``top``: the ``k`` scored patches of ``slide_ids`` with the highest
    ``by`` (one of :data:`RANKABLE_SCORES`), highest first; ``bottom``: the
    ``k`` lowest of the others, lowest first; ties by patch id; patches
    without a value of ``by`` (NULL or NaN) are left out. Columns as
    :func:`scored_patches_frame`. ``scored``: how many patches of those
    slides the model scored, with or without a value of ``by``.
    """
    import numpy as np

    if by not in RANKABLE_SCORES:
        raise ValueError(f"by={by!r} is not one of {', '.join(RANKABLE_SCORES)}")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    arrays = _scored_arrays(store, model_id, slide_ids)
    values, ids = arrays[by], arrays["patch_id"]
    valued = np.flatnonzero(~np.isnan(values))
    # np.lexsort sorts by its last key first: by value, ties by patch id.
    top = valued[np.lexsort((ids[valued], -values[valued]))[:k]]
    rest = np.setdiff1d(valued, top, assume_unique=True)
    bottom = rest[np.lexsort((ids[rest], values[rest]))[:k]]

    def frame(rows: Any) -> pd.DataFrame:
        return pd.DataFrame({name: arrays[name][rows] for name in _SCORED_COLUMNS})

    return frame(top), frame(bottom), len(ids)


# --- cohorts and models pages ---

def model_score_counts(store: Store) -> pd.DataFrame:
    """Patients scored per model and cohort: columns model_id, cohort, patients."""
    return store.cursor().execute(
        """SELECT model_id, cohort, count(*) AS patients FROM patient_scores
           GROUP BY model_id, cohort ORDER BY model_id, cohort"""
    ).df()


def score_marks_frame(store: Store) -> pd.DataFrame:
    """Per model and scored cohort: model_id, cohort, patients, qc_decision_id (the
    cohort's decision the scores were made on), tiling_mismatch (None: none)."""
    return store.cursor().execute(
        """SELECT model_id, cohort, count(*) AS patients,
                  max(qc_decision_id) AS qc_decision_id,
                  max(tiling_mismatch) AS tiling_mismatch
           FROM patient_scores GROUP BY model_id, cohort ORDER BY model_id, cohort"""
    ).df()
