"""Slides and patches: registration, the demo's ground-truth regions, ingest runs,
the patches table, the QC-passed patches a model trains on, and the slide viewer's
arrays (:func:`slide_patch_arrays`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import pandas as pd

from cmil_core.store._base import PATCH_ID_BASE, one_row, utc_now
from cmil_core.store.connection import Store

# --- slides ---

SLIDE_STATUSES = ("pending", "tiled", "encoded", "failed")


@dataclass(frozen=True)
class SlideRow:
    slide_id: int
    cohort: str
    patient_id: str | None
    path: str
    sha256: str | None
    kind: str | None
    width: int | None
    height: int | None
    mpp: float | None
    status: str
    error: str | None
    size_bytes: int | None
    tiling_key: str | None = None


_SLIDE_COLUMNS = (
    "slide_id, cohort, patient_id, path, sha256, kind, width, height, mpp, status, error, "
    "size_bytes, tiling_key"
)


def register_slide(
    store: Store,
    *,
    cohort: str,
    patient_id: str | None,
    path: str,
    sha256: str | None,
    kind: str | None,
    width: int | None,
    height: int | None,
    mpp: float | None,
    size_bytes: int | None,
    status: str = "pending",
    error: str | None = None,
    tumor_regions: Sequence[tuple[int, int, int, int]] | None = None,
    lookalike_regions: Sequence[tuple[str, int, int, int, int]] | None = None,
) -> int:
    """Add a slide, or update the one with the same cohort and path; returns its id.

    A slide whose file changed (another sha256) goes back to ``pending`` and
    loses its patches, so the pipeline redoes it. ``tumor_regions`` (demo
    only) replaces the slide's ground-truth boxes in the same transaction, as
    ``lookalike_regions`` (demo only: ``(kind, x, y, width, height)``) does its
    benign look-alike boxes.
    """
    if status not in SLIDE_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(SLIDE_STATUSES)}")
    now = datetime.now(UTC).replace(tzinfo=None)
    with store.transaction() as cur:
        row = cur.execute(
            "SELECT slide_id, sha256 FROM slides WHERE cohort = ? AND path = ?", [cohort, path]
        ).fetchone()
        if row is None:
            new = cur.execute(
                """INSERT INTO slides (cohort, patient_id, path, sha256, kind, width, height,
                       mpp, status, error, size_bytes, registered_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING slide_id""",
                [cohort, patient_id, path, sha256, kind, width, height, mpp, status, error,
                 size_bytes, now],
            ).fetchone()
            slide_id = int(one_row(new)[0])
        else:
            slide_id = int(row[0])
            if row[1] != sha256:
                cur.execute("DELETE FROM patches WHERE slide_id = ?", [slide_id])
                cur.execute("DELETE FROM demo_tumor_regions WHERE slide_id = ?", [slide_id])
                cur.execute("DELETE FROM demo_lookalike_regions WHERE slide_id = ?", [slide_id])
            cur.execute(
                """UPDATE slides SET patient_id = ?, sha256 = ?, kind = ?, width = ?, height = ?,
                       mpp = ?, status = ?, error = ?, size_bytes = ?, registered_at = ?
                   WHERE slide_id = ?""",
                [patient_id, sha256, kind, width, height, mpp, status, error, size_bytes, now,
                 slide_id],
            )
        if tumor_regions is not None:
            _write_tumor_regions(cur, slide_id, tumor_regions)
        if lookalike_regions is not None:
            _write_lookalike_regions(cur, slide_id, lookalike_regions)
        return slide_id


def find_slide(store: Store, cohort: str, path: str) -> SlideRow | None:
    """The slide registered for ``path`` in ``cohort``, or None."""
    row = store.cursor().execute(
        f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE cohort = ? AND path = ?", [cohort, path]
    ).fetchone()
    return None if row is None else SlideRow(*row)


def slides_with_sha256(store: Store, sha256: str) -> list[SlideRow]:
    """Every slide registered with this file content (any cohort), by slide id."""
    return [
        SlideRow(*r) for r in store.cursor().execute(
            f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE sha256 = ? ORDER BY slide_id", [sha256]
        ).fetchall()
    ]


def list_slides(store: Store, cohort: str | None = None) -> list[SlideRow]:
    """Slides, by cohort, patient and path."""
    sql = f"SELECT {_SLIDE_COLUMNS} FROM slides"
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    sql += " ORDER BY cohort, patient_id, path"
    return [SlideRow(*r) for r in store.cursor().execute(sql, params).fetchall()]


def _write_tumor_regions(
    cur: duckdb.DuckDBPyConnection, slide_id: int, boxes: Sequence[tuple[int, int, int, int]]
) -> None:
    cur.execute("DELETE FROM demo_tumor_regions WHERE slide_id = ?", [slide_id])
    if boxes:
        cur.executemany(
            "INSERT INTO demo_tumor_regions VALUES (?, ?, ?, ?, ?)",
            [(slide_id, int(x), int(y), int(w), int(h)) for x, y, w, h in boxes],
        )


def replace_tumor_regions(
    store: Store, slide_id: int, boxes: Sequence[tuple[int, int, int, int]]
) -> None:
    """Set the demo's ground-truth tumour boxes (level-0 x, y, width, height) of a slide."""
    with store.transaction() as cur:
        _write_tumor_regions(cur, slide_id, boxes)


def tumor_regions_frame(store: Store, slide_id: int | None = None) -> pd.DataFrame:
    """Ground-truth tumour boxes of the demo study."""
    sql = "SELECT slide_id, x, y, width, height FROM demo_tumor_regions"
    params: list[Any] = []
    if slide_id is not None:
        sql += " WHERE slide_id = ?"
        params.append(slide_id)
    return store.cursor().execute(sql + " ORDER BY slide_id, y, x", params).df()


def _write_lookalike_regions(
    cur: duckdb.DuckDBPyConnection, slide_id: int,
    boxes: Sequence[tuple[str, int, int, int, int]],
) -> None:
    cur.execute("DELETE FROM demo_lookalike_regions WHERE slide_id = ?", [slide_id])
    if boxes:
        cur.executemany(
            "INSERT INTO demo_lookalike_regions VALUES (?, ?, ?, ?, ?, ?)",
            [(slide_id, str(k), int(x), int(y), int(w), int(h)) for k, x, y, w, h in boxes],
        )


def replace_lookalike_regions(
    store: Store, slide_id: int, boxes: Sequence[tuple[str, int, int, int, int]]
) -> None:
    """Set the demo's benign look-alike boxes ``(kind, x, y, width, height)`` of a slide."""
    with store.transaction() as cur:
        _write_lookalike_regions(cur, slide_id, boxes)


def lookalike_regions_frame(store: Store, slide_id: int | None = None) -> pd.DataFrame:
    """Ground-truth boxes of the demo's benign look-alikes: slide_id, kind, x, y, width, height."""
    sql = "SELECT slide_id, kind, x, y, width, height FROM demo_lookalike_regions"
    params: list[Any] = []
    if slide_id is not None:
        sql += " WHERE slide_id = ?"
        params.append(slide_id)
    return store.cursor().execute(sql + " ORDER BY slide_id, y, x", params).df()


def slide_glass_colours(store: Store, cohort: str) -> dict[int, tuple[float, float, float]]:
    """The glass colour (RGB) tiling estimated for each tiled slide of a cohort."""
    rows = store.cursor().execute(
        """SELECT slide_id, tiling->'$.foreground.glass_rgb' FROM slides
           WHERE cohort = ? AND tiling IS NOT NULL""",
        [cohort],
    ).fetchall()
    out: dict[int, tuple[float, float, float]] = {}
    for slide_id, raw in rows:
        values = json.loads(raw) if isinstance(raw, str) else raw
        if values and len(values) == 3:
            out[int(slide_id)] = (float(values[0]), float(values[1]), float(values[2]))
    return out


# --- patches and ingest runs ---

PATCH_COLUMNS = (
    "g_col", "g_row", "x", "y", "size", "qc_pass", "qc_reason", "foreground_fraction",
    "thick_fraction", "background_fraction", "mean_intensity", "dark_fraction",
    "bright_fraction", "blur_variance", "nuclei_fraction", "nuclear_area_um2",
)


def start_ingest_run(
    store: Store, cohort: str, *, source: str, manifest: str | None, config: dict[str, Any]
) -> int:
    """Record the start of an ingest run with its tiling and QC settings; returns its id.

    Runs of the cohort still marked ``running`` were killed (a finished or
    failed run always records its end): they become ``interrupted``.
    """
    with store.transaction() as cur:
        cur.execute(
            "UPDATE ingest_runs SET status = 'interrupted' WHERE cohort = ? AND status = 'running'",
            [cohort],
        )
        row = cur.execute(
            """INSERT INTO ingest_runs (cohort, source, manifest, config, started_at)
               VALUES (?, ?, ?, ?, ?) RETURNING run_id""",
            [cohort, source, manifest, json.dumps(config), utc_now()],
        ).fetchone()
    return int(one_row(row)[0])


def finish_ingest_run(store: Store, run_id: int, status: str, summary: dict[str, Any]) -> None:
    """Record how an ingest run ended (``done`` or ``failed``) and its counts."""
    with store.transaction() as cur:
        cur.execute(
            "UPDATE ingest_runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ?",
            [utc_now(), status, json.dumps(summary), run_id],
        )


def ingest_runs_frame(store: Store, cohort: str | None = None) -> pd.DataFrame:
    """Ingest runs, newest first, with their settings (``config``) and counts (``summary``)."""
    sql = "SELECT * FROM ingest_runs"
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY run_id DESC", params).df()


def write_slide_patches(
    store: Store,
    slide_id: int,
    patches: pd.DataFrame,
    *,
    tiling_key: str,
    tiling: dict[str, Any],
    run_id: int | None,
) -> int:
    """Replace a slide's patches and mark it ``tiled``, in one transaction.

    ``patches`` has :data:`PATCH_COLUMNS`, rows in grid order. A crash before
    the commit leaves the slide as it was, so a rerun redoes it whole.
    """
    missing = [c for c in PATCH_COLUMNS if c not in patches.columns]
    if missing:
        raise ValueError(f"patch table lacks columns {missing}")
    if len(patches) >= PATCH_ID_BASE:
        raise ValueError(f"{len(patches)} patches exceed one slide's id range")
    slide_id = int(slide_id)
    table = _patch_rows_arrow(slide_id, patches)
    # Unregistered once the transaction has ended: a failed statement aborts the
    # transaction, in which nothing (not even unregistering) runs until it is
    # rolled back.
    try:
        with store.transaction() as cur:
            cur.register("_new_patches", table)
            cur.execute("DELETE FROM patches WHERE slide_id = ?", [slide_id])
            cur.execute("INSERT INTO patches BY NAME SELECT * FROM _new_patches")
            cur.execute(
                """UPDATE slides SET status = 'tiled', error = NULL, tiling_key = ?,
                       tiling = ?, tiled_at = ?, run_id = ? WHERE slide_id = ?""",
                [tiling_key, json.dumps(tiling), utc_now(), run_id, slide_id],
            )
    finally:
        store.cursor().unregister("_new_patches")
    return int(table.num_rows)


# Arrow types of the patches table's columns (DuckDB then casts nothing).
_PATCH_ARROW_TYPES = {
    "g_col": "int32", "g_row": "int32", "x": "int32", "y": "int32", "size": "int32",
    "qc_pass": "bool", "qc_reason": "string",
}


def _patch_rows_arrow(slide_id: int, patches: pd.DataFrame) -> Any:
    """A slide's patch rows as an Arrow table: patch_id, slide_id, then :data:`PATCH_COLUMNS`.

    Built column by column from the frame's arrays, in the table's own types:
    DuckDB scans Arrow faster than a pandas frame with a text column, and
    this runs once per slide (bench/scale.py measures it at the study's
    1,432 slides).
    """
    import numpy as np
    import pyarrow as pa

    n = len(patches)
    columns: dict[str, Any] = {
        "patch_id": pa.array(slide_id * PATCH_ID_BASE + np.arange(n, dtype=np.int64)),
        "slide_id": pa.array(np.full(n, slide_id, dtype=np.int32)),
    }
    for name in PATCH_COLUMNS:
        kind = _PATCH_ARROW_TYPES.get(name, "float64")
        values = patches[name]
        if kind == "string":  # None, NaN and pd.NA become NULL
            columns[name] = pa.array(values.to_numpy(dtype=object), type=pa.string(),
                                     from_pandas=True)
        elif isinstance(values.dtype, np.dtype) and values.dtype.kind in "biuf":
            columns[name] = pa.array(values.to_numpy(), from_pandas=True).cast(kind)
        else:  # nullable pandas dtypes, objects: pandas' own conversion
            columns[name] = pa.Array.from_pandas(values).cast(kind)
    return pa.table(columns)


def mark_slide_failed(store: Store, slide_id: int, reason: str, *, run_id: int | None) -> None:
    """Mark a slide ``failed`` with a reason a person understands; drop its patches."""
    with store.transaction() as cur:
        cur.execute("DELETE FROM patches WHERE slide_id = ?", [slide_id])
        cur.execute(
            """UPDATE slides SET status = 'failed', error = ?, tiling_key = NULL, run_id = ?
               WHERE slide_id = ?""",
            [reason, run_id, slide_id],
        )


def patches_frame(store: Store, slide_id: int) -> pd.DataFrame:
    """A slide's patches with every metric, in grid order."""
    return store.cursor().execute(
        "SELECT * FROM patches WHERE slide_id = ? ORDER BY patch_id", [slide_id]
    ).df()


def qc_counts(store: Store, cohort: str | None = None, slide_id: int | None = None) -> pd.DataFrame:
    """Patches per slide and quality-control outcome.

    Columns: cohort, slide_id, patient_id, path, status, error, qc_reason
    (None for patches that passed, and for slides without patches), patches.
    """
    sql = """
        SELECT s.cohort, s.slide_id, s.patient_id, s.path, s.status, s.error,
               p.qc_reason, count(p.patch_id) AS patches
        FROM slides s LEFT JOIN patches p USING (slide_id)"""
    where: list[str] = []
    params: list[Any] = []
    if cohort is not None:
        where.append("s.cohort = ?")
        params.append(cohort)
    if slide_id is not None:
        where.append("s.slide_id = ?")
        params.append(slide_id)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " GROUP BY ALL ORDER BY s.cohort, s.patient_id, s.path, p.qc_reason NULLS FIRST"
    return store.cursor().execute(sql, params).df()


# --- what training and the pages read ---

def passed_patches(store: Store, cohort: str) -> pd.DataFrame:
    """Patches that passed quality control on the cohort's tiled slides, in slide and grid order.

    Columns: slide_id, patient_id, path, sha256, mpp, tiling_key, patch_id, x, y, size.
    """
    return store.cursor().execute(
        """SELECT s.slide_id, s.patient_id, s.path, s.sha256, s.mpp, s.tiling_key,
                  p.patch_id, p.x, p.y, p.size
           FROM patches p JOIN slides s USING (slide_id)
           WHERE s.cohort = ? AND s.status IN ('tiled', 'encoded') AND p.qc_pass
           ORDER BY s.slide_id, p.patch_id""",
        [cohort],
    ).df()


def set_slides_status(store: Store, slide_ids: Sequence[int], status: str) -> None:
    """Move slides to ``status`` (e.g. ``encoded`` once their features are on disk)."""
    if status not in SLIDE_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(SLIDE_STATUSES)}")
    if not slide_ids:
        return
    with store.transaction() as cur:
        cur.executemany(
            "UPDATE slides SET status = ? WHERE slide_id = ?", [(status, int(i)) for i in slide_ids]
        )


def get_slide(store: Store, slide_id: int) -> SlideRow | None:
    """One slide's row by id, or None."""
    row = store.cursor().execute(
        f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE slide_id = ?", [int(slide_id)]
    ).fetchone()
    return None if row is None else SlideRow(*row)


def patient_slides(store: Store, cohort: str, patient_id: str) -> list[SlideRow]:
    """A patient's slides, by path."""
    rows = store.cursor().execute(
        f"SELECT {_SLIDE_COLUMNS} FROM slides WHERE cohort = ? AND patient_id = ? ORDER BY path",
        [cohort, patient_id],
    ).fetchall()
    return [SlideRow(*r) for r in rows]


def patient_slide_ids(store: Store, cohort: str, patient_id: str) -> list[int]:
    """The ids of a patient's slides, in id order."""
    rows = store.cursor().execute(
        "SELECT slide_id FROM slides WHERE cohort = ? AND patient_id = ? ORDER BY slide_id",
        [cohort, patient_id],
    ).fetchall()
    return [int(r[0]) for r in rows]


# --- the slide viewer ---

#: Patch columns :func:`slide_patch_arrays` returns beside the QC metrics.
VIEWER_PATCH_COLUMNS = ("patch_id", "x", "y", "size", "qc_pass", "qc_reason")


#: Quality metrics the viewer shows on hover and the GeoJSON export carries.
VIEWER_METRICS = ("background_fraction", "foreground_fraction", "thick_fraction",
                  "mean_intensity", "dark_fraction", "bright_fraction", "blur_variance",
                  "nuclei_fraction", "nuclear_area_um2")


def slide_patch_arrays(store: Store, slide_id: int, model_id: str | None = None
                       ) -> dict[str, Any]:
    """One slide's patches for the slide viewer and its exports, as arrays in grid order.

    Keys: :data:`VIEWER_PATCH_COLUMNS` (``qc_reason`` an object array, None
    where there is none), :data:`VIEWER_METRICS` (float, NaN where missing)
    and, with ``model_id``, ``probability``, ``attention``, ``attention_raw``
    (float, NaN where the model did not score the patch).

    Only these columns are read, and both tables through the slide's
    patch-id range (``slide_id * PATCH_ID_BASE`` onwards, see
    :func:`_scored_arrays`), so DuckDB reads only the row groups that hold
    the slide: about 10 ms at the study's 1.5 million patch rows, where
    ``SELECT *`` by slide id, a second query for the scores and a pandas
    merge took about 4 times as long (bench/viewer.py).
    """
    import numpy as np

    low, high = int(slide_id) * PATCH_ID_BASE, (int(slide_id) + 1) * PATCH_ID_BASE - 1
    metrics = ", ".join(f"coalesce(p.{m}, 'NaN') AS {m}" for m in VIEWER_METRICS)
    params: list[Any]
    if model_id is None:
        scores, join, params = "", "", [low, high]
    else:
        scores = (", coalesce(c.probability, 'NaN') AS probability, "
                  "coalesce(c.attention, 'NaN') AS attention, "
                  "coalesce(c.attention_raw, 'NaN') AS attention_raw")
        join = ("LEFT JOIN patch_scores c ON c.patch_id = p.patch_id AND c.model_id = ? "
                "AND c.patch_id BETWEEN ? AND ?")
        params = [model_id, low, high, low, high]
    rows = store.cursor().execute(
        f"""SELECT p.patch_id, p.x, p.y, p.size, p.qc_pass, p.qc_reason, {metrics}{scores}
            FROM patches p {join}
            WHERE p.patch_id BETWEEN ? AND ? ORDER BY p.patch_id""",
        params,
    ).fetchnumpy()
    out: dict[str, Any] = {}
    for name, values in rows.items():
        if name == "qc_reason":
            reasons = np.array(np.ma.getdata(values), dtype=object)
            reasons[np.ma.getmaskarray(values)] = None
            out[name] = reasons
        elif name == "patch_id":
            out[name] = np.asarray(values, dtype=np.int64)
        elif name in ("x", "y", "size"):
            out[name] = np.asarray(values, dtype=np.int32)
        elif name == "qc_pass":
            out[name] = np.asarray(values, dtype=bool)
        else:
            out[name] = np.asarray(values, dtype=np.float64)
    return out


def rejected_patches_frame(store: Store, slide_id: int, limit: int | None = None) -> pd.DataFrame:
    """A slide's patches that failed quality control, by reason then grid order.

    Columns: patch_id, slide_id, x, y, size, qc_reason, and the quality
    metrics. ``limit`` caps the rows (None: all).
    """
    sql = """SELECT patch_id, slide_id, x, y, size, qc_reason, background_fraction,
                    thick_fraction, mean_intensity, dark_fraction, bright_fraction,
                    blur_variance, nuclei_fraction, nuclear_area_um2
             FROM patches WHERE slide_id = ? AND NOT qc_pass
             ORDER BY qc_reason, patch_id"""
    params: list[Any] = [int(slide_id)]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return store.cursor().execute(sql, params).df()
