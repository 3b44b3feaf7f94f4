"""What a study holds, per cohort: the numbers of the Study overview page.

:func:`study_overview` joins the store's counts with follow-up statistics:
median follow-up by the reverse Kaplan-Meier method (Schemper & Smith 1996:
the Kaplan-Meier estimate with censoring as the event, which does not count
early deaths as short follow-up), and the number of deaths.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter

from cmil_core import store as store_mod
from cmil_core.ingest.quality import QC_REASONS

__all__ = ["median_followup", "qc_table", "study_overview"]


def median_followup(months: pd.Series, event: pd.Series) -> float | None:
    """Median follow-up (reverse Kaplan-Meier), in the unit of ``months``; None if unknown.

    >>> median_followup(pd.Series([10.0, 20.0, 30.0]), pd.Series([0, 0, 0]))
    20.0
    """
    known = months.notna() & event.notna()
    if not known.any():
        return None
    t = months[known].astype(float).to_numpy()
    censored = 1 - event[known].astype(int).to_numpy()
    if censored.sum() == 0:
        return None  # everyone died: follow-up is complete, the reverse KM is undefined
    kmf = KaplanMeierFitter().fit(t, event_observed=censored)
    value = float(kmf.median_survival_time_)
    return value if math.isfinite(value) else None


def study_overview(store: store_mod.Store) -> pd.DataFrame:
    """One row per cohort: the store's counts plus ``followup_median`` (months) and
    ``positive_share``."""
    counts = store_mod.cohort_overview(store)
    patients = store_mod.patients_frame(store)
    followup = []
    for cohort in counts["cohort"]:
        rows = patients[patients["cohort"] == cohort]
        followup.append(median_followup(rows["os_months"], rows["os_event"]))
    counts["followup_median"] = pd.array(followup, dtype="Float64")
    labelled = counts["positives"] + counts["negatives"]
    counts["positive_share"] = np.where(
        labelled > 0, counts["positives"] / labelled.where(labelled > 0, 1), np.nan)
    return counts


def qc_table(store: store_mod.Store) -> pd.DataFrame:
    """Quality control per cohort: patches, kept (with share), and rejected by reason.

    One row per cohort with patches; columns ``cohort, patches, kept,
    kept_share`` and one column per rejection reason in the order the rules
    are checked (:data:`cmil_core.ingest.quality.QC_REASONS`), then any other reason
    found in the store.
    """
    summary = store_mod.qc_summary(store)
    if summary.empty:
        return pd.DataFrame(columns=["cohort", "patches", "kept", "kept_share", *QC_REASONS])
    summary["reason"] = summary["qc_reason"].astype(object).where(
        summary["qc_reason"].notna(), "kept")
    wide = summary.pivot_table(index="cohort", columns="reason", values="patches",
                               aggfunc="sum", fill_value=0)
    order = [c.cohort for c in store_mod.list_cohorts(store) if c.cohort in wide.index]
    wide = wide.reindex(order)
    extra = sorted(set(wide.columns) - {"kept", *QC_REASONS})
    for column in ("kept", *QC_REASONS):
        if column not in wide.columns:
            wide[column] = 0
    out = wide[["kept", *QC_REASONS, *extra]].astype(int)
    out.insert(0, "patches", out.sum(axis=1))
    out.insert(2, "kept_share", out["kept"] / out["patches"])
    out = out.reset_index()
    out.columns.name = None
    return out
