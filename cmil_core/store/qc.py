"""Quality control in SQL: summaries and histograms of the stored patch metrics,
and QC decisions (re-judging stored metrics against new thresholds, recording
and applying a decision)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import duckdb
import pandas as pd

from cmil_core.errors import InputError
from cmil_core.store._base import one_row, utc_now
from cmil_core.store.audit import record_audit
from cmil_core.store.connection import Store

# --- summaries of the stored metrics ---

QC_METRICS = (
    "background_fraction", "mean_intensity", "dark_fraction", "bright_fraction",
    "blur_variance", "nuclei_fraction", "nuclear_area_um2", "thick_fraction",
)


def qc_summary(store: Store) -> pd.DataFrame:
    """Patches per cohort and quality-control outcome, computed in the database.

    Columns: cohort, qc_reason (None for patches kept), patches. Cohorts
    without patches are absent.
    """
    return store.cursor().execute(
        """SELECT s.cohort, p.qc_reason, count(*) AS patches
           FROM patches p JOIN slides s USING (slide_id)
           GROUP BY ALL ORDER BY s.cohort, p.qc_reason NULLS FIRST"""
    ).df()


def qc_metric_histogram(store: Store, metric: str, bins: int = 30) -> pd.DataFrame:
    """Histogram of one patch metric per cohort, kept and rejected patches apart.

    Bins are equal-width between the 0.5th and 99.5th percentiles over all
    patches (values outside are counted in the end bins), so that one extreme
    patch does not squash the picture; binned in the database, never loading
    the patches. Columns: cohort, bin_low, bin_high, kept, rejected.
    """
    if metric not in QC_METRICS:
        raise InputError(f"unknown quality metric {metric!r}; one of: {', '.join(QC_METRICS)}")
    if not 1 <= bins <= 1000:
        raise InputError(f"bins must be between 1 and 1000, not {bins}")
    cur = store.cursor()
    low, high = one_row(cur.execute(
        f"SELECT quantile_cont({metric}, 0.005), quantile_cont({metric}, 0.995) FROM patches"
    ).fetchone())
    if low is None or high is None:
        return pd.DataFrame(columns=["cohort", "bin_low", "bin_high", "kept", "rejected"])
    width = (high - low) / bins if high > low else 1.0
    frame = cur.execute(
        f"""SELECT s.cohort,
                   least(greatest(floor((p.{metric} - ?) / ?), 0), ?)::INTEGER AS bin,
                   count(*) FILTER (WHERE p.qc_pass) AS kept,
                   count(*) FILTER (WHERE NOT p.qc_pass) AS rejected
            FROM patches p JOIN slides s USING (slide_id)
            WHERE p.{metric} IS NOT NULL AND NOT isnan(p.{metric})
            GROUP BY ALL ORDER BY s.cohort, bin""",
        [low, width, bins - 1],
    ).df()
    frame["bin_low"] = low + frame.pop("bin") * width
    frame["bin_high"] = frame["bin_low"] + width
    return frame[["cohort", "bin_low", "bin_high", "kept", "rejected"]]


# --- QC decisions: re-judging stored metrics in SQL ---

#: Where a QC decision came from.
QC_DECISION_SOURCES = ("ingest", "dashboard", "cli")


_SQL_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _qc_literal(thresholds: dict[str, Any], name: str) -> str:
    """A threshold as an exact SQL DOUBLE (parsed from Python's round-trip repr)."""
    try:
        value = float(thresholds[name])
    except KeyError:
        raise InputError(f"QC thresholds lack {name}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"QC threshold {name}={value} is not a finite number")
    return f"CAST('{value!r}' AS DOUBLE)"


def _qc_condition(column: str, op: str, name: str, thresholds: dict[str, Any],
                  prefix: str) -> str:
    """One condition of a QC rule: true when it holds; a NULL or NaN metric fails it.

    (DuckDB orders NaN above every number, so ``NaN >= x`` is true: hence ``isnan``.)
    """
    if not _SQL_NAME.fullmatch(column) or op not in (">=", "<="):
        raise ValueError(f"bad QC rule condition {(column, op, name)!r}")
    col = f"{prefix}{column}"
    return f"coalesce(NOT isnan({col}) AND {col} {op} {_qc_literal(thresholds, name)}, false)"


def _qc_reason_sql(thresholds: dict[str, Any], prefix: str = "") -> str:
    """A SQL expression: the first failing rule's reason of
    :data:`cmil_core.ingest.quality.QC_RULES` (NULL when the patch passes every rule), built
    from the rules themselves.

    A rule with a field scope set to ``"field"`` (``nucleated_scope``) also holds for a
    patch of a photograph (``slides.tiling`` says ``"photograph": true``) when it holds for
    any patch of the same slide; the outer patch row is ``prefix`` (``patches.`` when
    empty, as in an UPDATE of ``patches``)."""
    from cmil_core.ingest.quality import NUCLEATED_SCOPES, QC_RULES

    outer = prefix or "patches."
    whens = []
    for rule in QC_RULES:
        holds = " AND ".join(_qc_condition(c, op, n, thresholds, prefix)
                             for c, op, n in rule.conditions)
        if rule.field_setting is not None:
            scope = thresholds.get(rule.field_setting, "field")
            if scope not in NUCLEATED_SCOPES:
                raise InputError(f"QC setting {rule.field_setting}={scope!r} must be one of "
                                 f"{', '.join(NUCLEATED_SCOPES)}")
            if scope == "field":
                inner = " AND ".join(_qc_condition(c, op, n, thresholds, "q.")
                                     for c, op, n in rule.conditions)
                holds = (f"({holds}) OR EXISTS (SELECT 1 FROM patches q JOIN slides k "
                         f"ON k.slide_id = q.slide_id WHERE q.slide_id = {outer}slide_id "
                         f"AND json_extract_string(k.tiling, '$.photograph') = 'true' "
                         f"AND {inner})")
        reason = rule.reason.replace("'", "''")
        whens.append(f"WHEN NOT ({holds}) THEN '{reason}'")
    return "CASE " + " ".join(whens) + " ELSE NULL END"


def _qc_columns() -> list[str]:
    from cmil_core.ingest.quality import QC_RULES

    return list(dict.fromkeys(c for rule in QC_RULES for c, _, _ in rule.conditions))


def judge_metrics(metrics: pd.DataFrame, thresholds: dict[str, Any]) -> list[str | None]:
    """The SQL rules applied to a frame of metrics (an in-memory database): the reason per
    row, None where it passes. What :func:`apply_qc_decision` computes, for any values
    (NaN included, which the store itself keeps as NULL). An integer column ``field``
    puts rows in photographs (one per label; negative: not a photograph), as
    :func:`cmil_core.ingest.quality.qc_decision`'s ``field``."""
    frame = metrics.loc[:, _qc_columns()].astype("float64")
    labels = (metrics["field"].astype("int64") if "field" in metrics.columns
              else pd.Series(-1, index=metrics.index, dtype="int64"))
    frame = frame.assign(slide_id=labels.to_numpy(), _row=range(len(frame)))
    con = duckdb.connect()
    try:
        con.register("_metrics", frame)
        con.execute("CREATE TABLE patches AS SELECT * FROM _metrics")
        con.execute("""CREATE TABLE slides AS SELECT DISTINCT slide_id,
                           '{"photograph": true}'::JSON AS tiling
                       FROM patches WHERE slide_id >= 0""")
        rows = con.execute(
            f"SELECT {_qc_reason_sql(thresholds)} AS reason FROM patches ORDER BY _row"
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def qc_what_if(store: Store, thresholds: dict[str, Any], cohort: str | None = None
               ) -> pd.DataFrame:
    """Patches per cohort and outcome under candidate ``thresholds``, computed in the
    database without writing: columns cohort, qc_reason (None: kept), patches."""
    sql = f"""SELECT s.cohort, {_qc_reason_sql(thresholds, 'p.')} AS qc_reason,
                     count(*) AS patches
              FROM patches p JOIN slides s USING (slide_id)"""
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE s.cohort = ?"
        params.append(cohort)
    sql += " GROUP BY ALL ORDER BY s.cohort, qc_reason NULLS FIRST"
    return store.cursor().execute(sql, params).df()


def qc_patient_counts(store: Store, thresholds: dict[str, Any] | None = None,
                      cohort: str | None = None) -> pd.DataFrame:
    """Per patient with patches: cohort, patient_id, bm_metastasis, patches, kept.

    ``kept`` under the stored decision (``thresholds`` None), or under candidate
    ``thresholds`` (computed in SQL, nothing written).
    """
    kept = "p.qc_pass" if thresholds is None else f"({_qc_reason_sql(thresholds, 'p.')}) IS NULL"
    sql = f"""SELECT s.cohort, s.patient_id, any_value(pt.bm_metastasis) AS bm_metastasis,
                     count(*) AS patches, count(*) FILTER (WHERE {kept}) AS kept
              FROM patches p JOIN slides s USING (slide_id)
                   LEFT JOIN patients pt ON pt.cohort = s.cohort AND pt.patient_id = s.patient_id"""
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE s.cohort = ?"
        params.append(cohort)
    sql += " GROUP BY s.cohort, s.patient_id ORDER BY s.cohort, s.patient_id"
    return store.cursor().execute(sql, params).df()


def _decision_row(row: Sequence[Any]) -> dict[str, Any]:
    keys = ("decision_id", "cohort", "decided_at", "who", "source", "thresholds", "kept",
            "rejected")
    out = dict(zip(keys, row, strict=True))
    out["thresholds"] = json.loads(out["thresholds"]) if out["thresholds"] else {}
    return out


def qc_decisions_frame(store: Store, cohort: str | None = None) -> pd.DataFrame:
    """QC decisions, newest first: decision_id, cohort, decided_at, who, source,
    thresholds (JSON text), kept, rejected."""
    sql = "SELECT * FROM qc_decisions"
    params: list[Any] = []
    if cohort is not None:
        sql += " WHERE cohort = ?"
        params.append(cohort)
    return store.cursor().execute(sql + " ORDER BY decision_id DESC", params).df()


def current_qc_decisions(store: Store) -> dict[str, dict[str, Any]]:
    """The latest QC decision of each cohort that has one, by cohort (thresholds decoded)."""
    rows = store.cursor().execute(
        """SELECT decision_id, cohort, decided_at, who, source, thresholds, kept, rejected
           FROM qc_decisions
           QUALIFY row_number() OVER (PARTITION BY cohort ORDER BY decision_id DESC) = 1
           ORDER BY cohort"""
    ).fetchall()
    return {r[1]: _decision_row(r) for r in rows}


def apply_qc_decision(
    store: Store, cohort: str, thresholds: dict[str, Any], *, who: str, source: str,
    only_if_changed: bool = False, audit: bool = True,
) -> dict[str, Any]:
    """Re-judge every patch of ``cohort`` from its stored metrics under ``thresholds``
    (SQL from :data:`cmil_core.ingest.quality.QC_RULES`), record the decision and its audit
    row, all in one transaction. Returns the decision (as :func:`current_qc_decisions`)
    with ``new``: whether a decision row was added.

    ``only_if_changed``: when the cohort's current decision has the same thresholds,
    the patches are re-judged (slides tiled since are judged alike) and its counts
    refreshed, but no new decision is recorded (nothing built on it goes stale).
    ``audit``: add a ``qc-decision`` audit row (False for ingest, whose own audit row
    names the decision).
    """
    if source not in QC_DECISION_SOURCES:
        raise ValueError(f"source {source!r} is not one of {', '.join(QC_DECISION_SOURCES)}")
    values = {k: (v if isinstance(v, str) else float(v)) for k, v in thresholds.items()}
    reason = _qc_reason_sql(values)
    in_cohort = "slide_id IN (SELECT slide_id FROM slides WHERE cohort = ?)"
    with store.transaction() as cur:
        known = cur.execute("SELECT count(*) FROM cohorts WHERE cohort = ?", [cohort]).fetchone()
        if not known or not known[0]:
            raise InputError(f"cohort '{cohort}' does not exist in {store.path}")
        cur.execute(f"UPDATE patches SET qc_reason = {reason} WHERE {in_cohort}", [cohort])
        cur.execute(f"UPDATE patches SET qc_pass = qc_reason IS NULL WHERE {in_cohort}", [cohort])
        counts = cur.execute(
            f"""SELECT count(*) FILTER (WHERE qc_pass), count(*) FILTER (WHERE NOT qc_pass)
                FROM patches WHERE {in_cohort}""", [cohort]).fetchone()
        kept, rejected = (int(counts[0]), int(counts[1])) if counts else (0, 0)
        last = cur.execute(
            """SELECT decision_id, cohort, decided_at, who, source, thresholds, kept, rejected
               FROM qc_decisions WHERE cohort = ? ORDER BY decision_id DESC LIMIT 1""",
            [cohort]).fetchone()
        previous = _decision_row(last) if last else None
        if only_if_changed and previous is not None and previous["thresholds"] == values:
            cur.execute("UPDATE qc_decisions SET kept = ?, rejected = ? WHERE decision_id = ?",
                        [kept, rejected, previous["decision_id"]])
            return {**previous, "kept": kept, "rejected": rejected, "new": False}
        row = cur.execute(
            """INSERT INTO qc_decisions (cohort, decided_at, who, source, thresholds, kept,
                                         rejected)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               RETURNING decision_id, cohort, decided_at, who, source, thresholds, kept,
                         rejected""",
            [cohort, utc_now(), who or "unknown", source, json.dumps(values, sort_keys=True), kept,
             rejected]).fetchone()
        decision = _decision_row(one_row(row))
        if audit:
            record_audit(store, who, "qc-decision", cohort=cohort, details={
                "decision_id": decision["decision_id"], "source": source,
                "thresholds": values, "kept": kept, "rejected": rejected,
                "previous_decision_id": None if previous is None else previous["decision_id"]})
    return {**decision, "new": True}


def qc_metric_ranges(store: Store, cohort: str) -> pd.DataFrame:
    """Each metric a QC rule reads, over the cohort's patches: column, low, high, p01, p99
    (NaN and NULL left out; NULL statistics when the cohort has no value)."""
    cur = store.cursor()
    rows = []
    for column in _qc_columns():
        got = cur.execute(
            f"""SELECT min({column}), max({column}), quantile_cont({column}, 0.01),
                       quantile_cont({column}, 0.99)
                FROM patches p JOIN slides s USING (slide_id)
                WHERE s.cohort = ? AND {column} IS NOT NULL AND NOT isnan({column})""",
            [cohort]).fetchone()
        rows.append((column, *(got or (None,) * 4)))
    return pd.DataFrame(rows, columns=["column", "low", "high", "p01", "p99"])


def qc_near_threshold(store: Store, cohort: str, reason: str, thresholds: dict[str, Any],
                      k: int = 6) -> pd.DataFrame:
    """Sample patches of one rejection reason near its thresholds, under ``thresholds``.

    Up to ``k`` patches rejected for ``reason`` and ``k`` kept patches, each the
    nearest to the rule's thresholds: distance is ``|metric - threshold|`` over the
    metric's standard deviation in the cohort, the smallest over the rule's
    conditions (for a rejected patch, over the conditions it fails). Columns:
    side (``rejected`` or ``kept``), distance, patch_id, slide_id, path, sha256,
    mpp, x, y, size, and the rule's metrics; nearest first.
    """
    from cmil_core.ingest.quality import QC_RULES

    rule = next((r for r in QC_RULES if r.reason == reason), None)
    if rule is None:
        raise InputError(f"unknown QC reason {reason!r}; one of "
                         f"{', '.join(r.reason for r in QC_RULES)}")
    if not 1 <= int(k) <= 100:
        raise InputError(f"k={k} must be between 1 and 100")
    columns = list(dict.fromkeys(c for c, _, _ in rule.conditions))
    spreads = ", ".join(f"stddev_pop(CASE WHEN isnan({c}) THEN NULL ELSE {c} END) AS sd_{i}"
                        for i, c in enumerate(columns))
    parts = []
    for column, op, name in rule.conditions:
        i = columns.index(column)
        gap = (f"abs({column} - {_qc_literal(thresholds, name)}) / "
               f"coalesce(nullif(sd_{i}, 0), 1)")
        holds = _qc_condition(column, op, name, thresholds, "")
        parts.append(f"CASE WHEN reason IS NULL OR NOT ({holds}) THEN {gap} END")
    distance = parts[0] if len(parts) == 1 else f"least({', '.join(parts)})"
    metric_list = ", ".join(columns)
    frame = store.cursor().execute(
        f"""WITH c AS (
                SELECT p.patch_id, p.slide_id, s.path, s.sha256, s.mpp, p.x, p.y, p.size,
                       {', '.join(f'p.{c}' for c in _qc_columns())},
                       {_qc_reason_sql(thresholds, 'p.')} AS reason
                FROM patches p JOIN slides s USING (slide_id) WHERE s.cohort = ?),
            sd AS (SELECT {spreads} FROM c),
            d AS (
                SELECT CASE WHEN reason IS NULL THEN 'kept' ELSE 'rejected' END AS side,
                       {distance} AS distance, patch_id, slide_id, path, sha256, mpp, x, y,
                       size, {metric_list}
                FROM c, sd WHERE reason IS NULL OR reason = ?)
            SELECT * FROM d
            QUALIFY row_number() OVER (PARTITION BY side
                                       ORDER BY distance ASC NULLS LAST, patch_id) <= ?
            ORDER BY side DESC, distance ASC NULLS LAST, patch_id""",
        [cohort, reason, int(k)]).df()
    return frame


def cohort_tilings(store: Store, cohort: str) -> list[dict[str, Any]]:
    """The distinct tiling records (``slides.tiling``) of a cohort's tiled slides."""
    rows = store.cursor().execute(
        """SELECT DISTINCT tiling FROM slides
           WHERE cohort = ? AND status IN ('tiled', 'encoded') AND tiling IS NOT NULL""",
        [cohort]).fetchall()
    out = []
    for (raw,) in rows:
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
