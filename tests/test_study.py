"""What the Study overview page shows, computed from the store."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cmil_core import store
from cmil_core.ingest.quality import QC_REASONS
from cmil_core.outputs.study import median_followup, qc_table
from cmil_core.store import PatientRow, open_store


def test_median_followup_is_reverse_kaplan_meier() -> None:
    # Censored at 50 and 20 (events at 10 and 30 count as censoring in reverse KM):
    # reverse-KM drops to 1/2 at t=50 -> median 50, not the plain median of 10..50.
    months = pd.Series([10.0, 50.0, 20.0, 30.0])
    events = pd.Series([1, 0, 0, 1])
    assert median_followup(months, events) == 50.0
    assert median_followup(pd.Series([5.0]), pd.Series([1])) is None  # all died


def _patches(n_kept: int, reasons: list[str]) -> pd.DataFrame:
    n = n_kept + len(reasons)
    return pd.DataFrame({
        "g_col": range(n), "g_row": [0] * n, "x": [224 * i for i in range(n)], "y": [0] * n,
        "size": [224] * n, "qc_pass": [True] * n_kept + [False] * len(reasons),
        "qc_reason": [None] * n_kept + reasons,
        **{c: [0.5] * n for c in store.QC_METRICS}, "foreground_fraction": [1.0] * n,
    })


def test_qc_table_counts_kept_and_each_reason_per_cohort(db_path: Path) -> None:
    with open_store(db_path) as st:
        for cohort, role in (("train", "train"), ("ext", "validation")):
            store.import_patients(st, cohort, [PatientRow("P1")], role=role, center=None)
        sid = store.register_slide(st, cohort="train", patient_id="P1", path="/t.tiff",
                                   sha256="s", kind="k", width=4000, height=224, mpp=0.5,
                                   size_bytes=1)
        store.write_slide_patches(st, sid, _patches(5, ["blurred", "blurred", "background"]),
                                  tiling_key="k", tiling={}, run_id=None)
        sid = store.register_slide(st, cohort="ext", patient_id="P1", path="/e.tiff",
                                   sha256="s", kind="k", width=4000, height=224, mpp=0.5,
                                   size_bytes=1)
        store.write_slide_patches(st, sid, _patches(1, ["too dark"]), tiling_key="k",
                                  tiling={}, run_id=None)
        table = qc_table(st).set_index("cohort")
    assert table.index.tolist() == ["train", "ext"]  # the store's order, training first
    assert table.columns.tolist() == ["patches", "kept", "kept_share", *QC_REASONS]
    assert table.loc["train", ["patches", "kept", "blurred", "background", "too dark"]].tolist() == [8, 5, 2, 1, 0]
    assert table.loc["train", "kept_share"] == pytest.approx(5 / 8)
    assert table.loc["ext", ["patches", "kept", "too dark"]].tolist() == [2, 1, 1]


def test_qc_table_of_a_store_without_patches_is_empty(db_path: Path) -> None:
    with open_store(db_path) as st:
        assert qc_table(st).empty
