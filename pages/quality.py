"""Quality control: a cohort's thresholds as sliders with live counts, patches near each
threshold, and Apply (editors), which records a new QC decision and marks what is stale.

Every number comes from cmil_core: the live counts are re-decided in SQL from the stored
metrics (:func:`cmil_core.ingest.qc.what_if`, nothing written), the patches near a threshold
from :func:`cmil_core.store.qc_near_threshold`, their pixels read from the slides.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.errors import InputError
from cmil_core.ingest import qc
from cmil_core.ingest.quality import QC_REASONS, QC_RULES, QCThresholds
from cmil_core.outputs.study import qc_table
from cmil_core.viewer.patients import read_patches
from pages import _common, _viewer
from pages._common import flash, md, show_flash

GALLERY_K = 6
GALLERY_PX = 128


@st.cache_data(show_spinner=False, max_entries=256)
def patch_pixels(path: str, sha256: str | None, mpp: float | None,
                 coords: tuple[tuple[int, int, int], ...], out_px: int) -> list[np.ndarray]:
    return read_patches(path, mpp, list(coords), out_px)


def images(frame: pd.DataFrame) -> list[np.ndarray]:
    """The patches of ``frame`` read from their slides (each slide opened once), in order."""
    found: dict[int, np.ndarray] = {}
    for _, rows in frame.groupby("slide_id", sort=False):
        first = rows.iloc[0]
        coords = tuple((int(r.x), int(r.y), int(r.size)) for r in rows.itertuples())
        sha = None if pd.isna(first["sha256"]) else str(first["sha256"])
        mpp = None if pd.isna(first["mpp"]) else float(first["mpp"])
        for pid, img in zip(rows["patch_id"], patch_pixels(str(first["path"]), sha, mpp, coords,
                                                           GALLERY_PX), strict=True):
            found[int(pid)] = img
    return [found[int(p)] for p in frame["patch_id"]]


def caption(row: pd.Series, columns: list[str]) -> str:
    return " · ".join(f"{c.replace('_', ' ')} {row[c]:.3g}" for c in columns)


st.title("Quality control")
show_flash()
editing = _common.viewer_notice()
table = _common.query("qc", qc_table)
if table.empty:
    st.info("No patches yet: ingest slides on the Cohorts page (or `cmil "
            "ingest`); their quality control is decided here.")
    st.stop()
names = table["cohort"].tolist()
cohort = st.selectbox("Cohort", names, key="qc_cohort")
decisions = _common.query("qc_decisions", store_mod.current_qc_decisions)
decision = decisions.get(cohort)
current = qc.decision_thresholds(decision) if decision else QCThresholds()
if decision is None:
    st.caption(f"Cohort {md(cohort)} has no recorded QC decision yet (its patches were judged "
               "with the default thresholds); applying records the first one.")
else:
    st.caption(
        f"Current decision **{decision['decision_id']}** of {md(cohort)}: made "
        f"{decision['decided_at']:%Y-%m-%d %H:%M} UTC by {md(decision['who'])} "
        f"({md(decision['source'])}); {decision['kept']:,} patches kept, "
        f"{decision['rejected']:,} rejected."
    )

# --------------------------------------------------------------------------- thresholds
st.subheader("Thresholds")
st.caption(
    "Move a threshold to see, live, how many of this cohort's patches quality control would "
    "keep and reject, and why: re-decided in the database from the stored metrics, without "
    "reading slides and without changing anything until you apply. Each rejected patch counts "
    "under the first rule it fails, in this order: " + ", ".join(QC_REASONS) + "."
)
ranges = _common.query(f"qc_ranges:{cohort}",
                       lambda store: store_mod.qc_metric_ranges(store, cohort))
values: dict[str, float] = {}
columns = st.columns(2)
for i, name in enumerate(qc.THRESHOLD_FIELDS):
    value = float(getattr(current, name))
    low, high, step = qc.threshold_range(name, value, ranges)
    reads = ", ".join(sorted({c for r in QC_RULES for c, _, n in r.conditions if n == name}))
    values[name] = columns[i % 2].slider(
        display.threshold(name), min_value=low, max_value=high, value=value, step=step,
        key=f"qc_{cohort}_{name}", format="%g",
        help=f"`{name}` (default {getattr(QCThresholds(), name):g}; the rule reads {reads}). "
             f"Same as `{qc.flag_name(name)}` on the command line.",
    )
SCOPE_LABELS = {"field": "by photograph (a field with a nucleated cell keeps all its patches)",
                "patch": "patch by patch"}
scope = st.radio(
    "Judge \"no nucleated cell\" in photographs", list(qc.SETTING_FIELDS["nucleated_scope"]),
    index=list(qc.SETTING_FIELDS["nucleated_scope"]).index(current.nucleated_scope),
    format_func=SCOPE_LABELS.get, horizontal=True, key=f"qc_{cohort}_nucleated_scope",
    help="`nucleated_scope`: a photograph is a field the operator chose; by photograph, its "
         "patches of red cells only are kept when another patch of it holds a nucleated cell, "
         "and a photograph of red cells only is rejected. Whole-slide files are always judged "
         f"patch by patch. Same as `{qc.flag_name('nucleated_scope')}` on the command line.")
try:
    candidate: QCThresholds | None = QCThresholds(**values, nucleated_scope=str(scope))
except InputError as exc:
    candidate = None
    st.error(f"These thresholds cannot be used: {md(exc)}")

if candidate is not None:
    key = json.dumps(candidate.to_dict(), sort_keys=True)
    now = _common.query(f"qc_whatif:{cohort}:{json.dumps(current.to_dict(), sort_keys=True)}",
                        lambda store: qc.what_if(store, cohort, current))
    then = _common.query(f"qc_whatif:{cohort}:{key}",
                         lambda store: qc.what_if(store, cohort, candidate))
    st.markdown(f"**Patches of {md(cohort)} under these thresholds** "
                f"(change from the current decision):")
    cells = st.columns(1 + len(QC_REASONS))
    kept_share = then["kept"] / then["patches"] if then["patches"] else 0.0
    cells[0].metric("Kept", f"{then['kept']:,}", delta=then["kept"] - now["kept"] or None,
                    help=f"{kept_share:.0%} of {then['patches']:,} patches")
    for cell, reason in zip(cells[1:], QC_REASONS):
        cell.metric(f"Rejected: {reason}", f"{then['rejected'][reason]:,}",
                    delta=(then["rejected"][reason] - now["rejected"][reason]) or None,
                    delta_color="inverse")
    for warning in then["warnings"]:
        st.warning(md(warning), icon=":material/warning:")
    changed = candidate != current or decision is None
    if st.button("Apply these thresholds", type="primary",
                 disabled=not editing or not changed, key="qc_apply",
                 help="Records a new QC decision for this cohort (who, when, thresholds) and "
                      "re-judges its patches; models and scores built on the old decision "
                      "become stale until rebuilt.") and \
            _common.require_editor("qc-decision", cohort=cohort):
        try:
            made = qc.apply_thresholds(_common.db_path(), cohort, candidate,
                                       who=_common.current_user().who or "anonymous",
                                       source="dashboard")
        except (InputError, store_mod.StoreError) as exc:
            st.error(f"Nothing was changed: {md(exc)}")
        else:
            flash("success", f"Recorded QC decision {made['decision_id']} for {md(cohort)}: "
                             f"{made['kept']:,} patches kept, {made['rejected']:,} rejected.")
            st.rerun()
    if not changed:
        st.caption("These are the current thresholds: move one to apply a new decision.")

# --------------------------------------------------------------------------- stale marks
st.subheader("Built on an older decision")
marks = _common.query("qc_stale", qc.stale_marks)
models = marks["models"]
scores = marks["scores"]
stale_models = models[models["stale"]]
stale_scores = scores[scores["stale"]]
if stale_models.empty and stale_scores.empty:
    st.caption("Nothing is stale: every model and every score was made on its cohort's "
               "current QC decision.")
else:
    rows = [{"What": "model (stale)", "Model": r.model_id, "Cohort": r.train_cohort,
             "Built on decision": "—" if pd.isna(r.decision_id) else int(r.decision_id),
             "Current decision": int(r.current_decision_id),
             "To refresh": "train again on the cohort (Models page)"}
            for r in stale_models.itertuples()]
    rows += [{"What": "scores (stale)", "Model": r.model_id, "Cohort": r.cohort,
              "Built on decision": "—" if pd.isna(r.decision_id) else int(r.decision_id),
              "Current decision": int(r.current_decision_id),
              "To refresh": "score the cohort again (Models page)"}
             for r in stale_scores.itertuples()]
    st.warning(f"{len(stale_models)} model(s) and the scores of {len(stale_scores)} "
               "model-cohort pair(s) were built on an older QC decision: they are stale "
               "until rebuilt.", icon=":material/history:")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

# --------------------------------------------------------------------------- galleries
st.subheader("Patches near each threshold")
st.caption(
    f"For each rejection reason, up to {GALLERY_K} patches these thresholds reject for it and "
    f"{GALLERY_K} they keep, each the nearest to the rule's thresholds (in standard deviations "
    "of the metric in this cohort): the patches a small move of the threshold would flip."
)
if candidate is not None:
    key = json.dumps(candidate.to_dict(), sort_keys=True)
    for tab, rule in zip(st.tabs(list(QC_REASONS)), QC_RULES):
        with tab:
            near = _common.query(
                f"qc_near:{cohort}:{rule.reason}:{key}",
                lambda store, r=rule.reason: store_mod.qc_near_threshold(
                    store, cohort, r, candidate.to_dict(), k=GALLERY_K))
            metrics = list(dict.fromkeys(c for c, _, _ in rule.conditions))
            for side, label in (("rejected", f"Rejected as {rule.reason}"), ("kept", "Kept")):
                part = near[near["side"] == side]
                st.markdown(f"**{label}** ({len(part)} shown)")
                if part.empty:
                    st.caption("None.")
                    continue
                try:
                    st.image(images(part), width=GALLERY_PX,
                             caption=[caption(r, metrics) for _, r in part.iterrows()])
                except InputError as exc:  # a slide file moved or unreadable
                    st.caption(f"The patches cannot be read: {md(exc)}")

# The deep-zoom viewer on one slide of the cohort, rejected patches outlined (issue 16).
_viewer.quality_viewer(cohort)
