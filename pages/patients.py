"""Patients: the review queue, and per patient the score, slides, attention and Grad-CAM.

Links: ``?patient=<cohort>/<patient_id>&model=<model_id>`` opens a patient
under a model (patient ids are unique only within a cohort; cohort names
cannot hold ``/``, so the first slash separates them: see
:func:`cmil_core.viewer.patients.patient_ref`). Selecting a row of the list sets
``patient`` in the address bar, so the page can be bookmarked or shared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from cmil_core import store as store_mod
from cmil_core.analysis import display
from cmil_core.errors import InputError
from cmil_core.outputs.plots import colour_bar_figure
from cmil_core.viewer import attention_view
from cmil_core.viewer.patients import (
    MAX_PATCH_PX,
    attention_patches,
    importance_column,
    overlay,
    parse_patient_ref,
    patch_gradcam,
    patient_detail,
    patient_list,
    patient_ref,
    read_patch,
    read_patches,
    rejected_patches,
)
from pages import _common, _viewer
from pages._common import md

GALLERY_K = 8
GALLERY_COLUMNS = 4  # 8 patches: two full rows at any width
LIST_ROWS = 16  # rows of the patient list visible without scrolling
HEATMAP_SIDE = 1024
COLUMN_NAMES = {
    "attention": "attention", "attention_raw": "raw attention", "probability": "probability",
}


def yes_no(label: Any) -> str:
    return "unknown" if label is None or pd.isna(label) else ("yes" if int(label) == 1 else "no")


# --------------------------------------------------------------------------- cached reads
# Keyed on the store's path and fingerprint (a changed store reads again), the
# model, and the slide's content hash (pixels come from the slide file).


@st.cache_data(show_spinner=False, max_entries=16)
def heatmap_images(db: str, stamp: tuple[int, int, int], model_id: str, slide_id: int,
                   by: str, scale: str) -> tuple[np.ndarray, np.ndarray, attention_view.Spread]:
    return _common.read(lambda store: attention_view.slide_heat(
        store, model_id, slide_id, HEATMAP_SIDE, by=by, scale=scale))


def image_grid(images: list[np.ndarray], captions: list[str],
               zoom: list[tuple[int, int]] | None = None, zoom_for: str = "") -> None:
    """Images in rows of GALLERY_COLUMNS, every row full but the last.

    ``zoom``: (patch id, slide id) per image; a "Show on slide" button under
    each then zooms the slide viewer above to that patch (:func:`show_on_slide`).
    """
    for start in range(0, len(images), GALLERY_COLUMNS):
        cols = st.columns(GALLERY_COLUMNS)
        for j, (col, image, text) in enumerate(zip(cols, images[start:start + GALLERY_COLUMNS],
                                                   captions[start:start + GALLERY_COLUMNS])):
            col.image(image, caption=text, width="stretch")
            if zoom is not None:
                patch, slide = zoom[start + j]
                col.button("Show on slide", key=f"zoom:{zoom_for}:{patch}",
                           icon=":material/center_focus_strong:", width="stretch",
                           on_click=show_on_slide, args=(zoom_for, patch, slide))


def show_on_slide(patient: str, patch_id: int, slide_id: int) -> None:
    """A gallery patch's button: choose it ("Inspect a patch") and its slide; the viewer zooms."""
    st.session_state[f"patch:{patient}"] = int(patch_id)
    st.session_state[f"slide:{patient}"] = int(slide_id)
    st.session_state["viewer_focus_n"] = int(st.session_state.get("viewer_focus_n", 0)) + 1


@st.cache_data(show_spinner=False, max_entries=32)
def gallery(db: str, stamp: tuple[int, int, int], model_id: str, cohort: str, patient_id: str,
            by: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _common.read(
        lambda store: attention_patches(store, model_id, patient=(cohort, patient_id),
                                        k=GALLERY_K, by=by)
    )


@st.cache_data(show_spinner=False, max_entries=256)
def patch_pixels(path: str, sha256: str | None, mpp: float | None,
                 coords: tuple[tuple[int, int, int], ...], out_px: int) -> list[np.ndarray]:
    return read_patches(path, mpp, list(coords), out_px)


@st.cache_data(show_spinner=False, max_entries=64)
def gradcam_map(db: str, stamp: tuple[int, int, int], model_id: str, path: str,
                sha256: str | None, mpp: float | None, x: int, y: int, size: int,
                px: int) -> tuple[np.ndarray, np.ndarray]:
    image = read_patch(path, mpp, x, y, size, px)
    model = _common.loaded_model(db, model_id, stamp)
    return image, patch_gradcam(db, model_id, image, model=model)


def read_images(frame: pd.DataFrame, slides: pd.DataFrame, out_px: int) -> list[np.ndarray]:
    """The patches of ``frame`` (any slides), read from their slide files, in the frame's order."""
    images: dict[int, np.ndarray] = {}
    by_id = slides.set_index("slide_id")
    for slide_id, rows in frame.groupby("slide_id", sort=False):
        slide = by_id.loc[slide_id]
        coords = tuple((int(r.x), int(r.y), int(r.size)) for r in rows.itertuples())
        sha = None if pd.isna(slide["sha256"]) else str(slide["sha256"])
        mpp = None if pd.isna(slide["mpp"]) else float(slide["mpp"])
        for pid, img in zip(rows["patch_id"], patch_pixels(str(slide["path"]), sha, mpp, coords,
                                                           out_px), strict=True):
            images[int(pid)] = img
    return [images[int(p)] for p in frame["patch_id"]]


# --------------------------------------------------------------------------- the list


st.title("Patients")
model_id = _common.require_model()

model = _common.query(f"model:{model_id}", lambda store: store_mod.get_model(store, model_id))
listing = _common.query(f"patient_list:{model_id}", lambda store: patient_list(store, model_id))
if listing.empty:
    st.info(
        f"Model {md(model_id)} has scored no patient yet: "
        "`cmil score --db STORE --model ID`."
    )
    st.stop()

by = _common.query(f"importance:{model_id}", lambda store: importance_column(store, model_id))
n_fn = int((listing["review"] == "false negative").sum())
n_fp = int((listing["review"] == "false positive").sum())
cutoff = float(model.cutoff if model.cutoff is not None else model.config["cutoff"])
st.caption(
    f"{display.count(len(listing))} patients scored by model {md(model_id)}. Review queue first: "
    f"{n_fn} false negatives, then {n_fp} false positives at the operating cutoff "
    f"{display.cutoff(cutoff)} (fixed on the training cohort), each from the most confidently "
    "wrong; then every other patient by score. Select a row to open the patient."
)
REVIEW_NAMES = {"false negative": "false negative", "false positive": "false positive",
                "": "no review needed"}
filters = st.columns(3)
pick_cohorts = filters[0].multiselect("Cohort", list(dict.fromkeys(listing["cohort"])),
                                      key="patients_cohorts", placeholder="all cohorts")
pick_reviews = filters[1].multiselect("Review reason", list(REVIEW_NAMES),
                                      format_func=REVIEW_NAMES.get, key="patients_reviews",
                                      placeholder="all")
pick_risks = filters[2].multiselect("Risk group", sorted(set(listing["risk_group"].dropna())),
                                    key="patients_risks", placeholder="all risk groups")
keep = pd.Series(True, index=listing.index)
if pick_cohorts:
    keep &= listing["cohort"].isin(pick_cohorts)
if pick_reviews:
    keep &= listing["review"].fillna("").isin(pick_reviews)
if pick_risks:
    keep &= listing["risk_group"].isin(pick_risks)
filtered = listing[keep].reset_index(drop=True)
if len(filtered) < len(listing):
    st.caption(f"{display.count(len(filtered))} of {display.count(len(listing))} patients shown.")
shown = pd.DataFrame({
    "Review": ["⚑ " + r if r else "" for r in filtered["review"]],
    "Cohort": filtered["cohort"],
    "Patient": filtered["patient_id"],
    "cMIL score": filtered["score"],
    "BM metastasis": [yes_no(v) for v in filtered["label"]],
    "Risk group": filtered["risk_group"],
})
event = st.dataframe(
    shown, key="patient_table", on_select="rerun", selection_mode="single-row", hide_index=True,
    height=35 * (LIST_ROWS + 1) + 3, width="stretch",
    column_config={
        "Review": st.column_config.TextColumn(width="medium"),
        "cMIL score": st.column_config.NumberColumn(format="%.3f"),
    },
)
rows = list(event.selection.rows) if event is not None else []
# Apply a selection once, when it changes: a link opened later is not overridden by it.
if rows and rows != st.session_state.get("_patients_applied_rows"):
    chosen = filtered.iloc[rows[0]]
    st.query_params["patient"] = patient_ref(str(chosen["cohort"]), str(chosen["patient_id"]))
st.session_state["_patients_applied_rows"] = rows
# The list as CSV, raw column names; patient ids pseudonymised when the sidebar switch says so.
_common.downloads(f"{model_id}_patients",
                  table=filtered[["cohort", "patient_id", "score", "label", "risk_group",
                                  "review"]].rename(columns={"label": "bm_metastasis"}))

# --------------------------------------------------------------------------- one patient

wanted = st.query_params.get("patient")
if not wanted:
    st.info("Select a patient in the list above (the review queue comes first).")
    st.stop()
try:
    cohort, patient_id = parse_patient_ref(wanted)
    detail = _common.query(
        f"patient:{model_id}:{wanted}",
        lambda store: patient_detail(store, model_id, cohort, patient_id),
    )
except InputError as exc:
    st.warning("This link names no patient of the store:")
    st.text(str(exc))
    st.stop()

st.divider()
st.subheader(f"Patient {md(patient_id)} · {md(cohort)}")
metrics = st.columns(4)
if detail["score"] is None:
    metrics[0].metric("cMIL score", "—")
    metrics[1].metric("Risk group", "—")
else:
    metrics[0].metric("cMIL score", f"{detail['score']:.3f}")
    metrics[1].metric("Risk group", str(detail["risk_group"]))
metrics[2].metric("BM metastasis", yes_no(detail["label"]))
metrics[3].metric("Patches kept / rejected",
                  f"{detail['patches_kept']:,} / {detail['patches_rejected']:,}")
if detail["review"] == "false negative":
    st.warning(f"False negative: marrow metastasis, but scored below the training cutoff "
               f"({display.cutoff(detail['cutoff'])}).")
elif detail["review"] == "false positive":
    st.warning(f"False positive: no marrow metastasis, but scored at or above the training "
               f"cutoff ({display.cutoff(detail['cutoff'])}).")

left, right = st.columns([1, 2])
with left:
    st.markdown("**Clinical variables**")
    st.table(display.clinical_rows(detail["clinical"]).set_index("Variable"))

slides = detail["slides"]
if slides.empty:
    right.info("No slide is registered for this patient: ingest the cohort's slides "
               "(`cmil ingest --db STORE --cohort NAME --slides DIR`).")
    st.stop()
if detail["score"] is None:
    right.info(
        "This model did not score this patient: no patch passed quality control, or the "
        "cohort was not scored (`cmil score --db STORE --model ID`)."
    )

with right:
    slide_ids = slides["slide_id"].tolist()
    names = dict(zip(slides["slide_id"], slides["name"]))
    if len(slide_ids) > 1:
        slide_id = st.selectbox("Slide", slide_ids, format_func=lambda i: f"{i}: {names[i]}",
                                key=f"slide:{wanted}")
    else:
        slide_id = slide_ids[0]
    controls = st.columns([1, 1])
    scale = controls[0].radio(
        "Colour by", list(attention_view.SCALES), format_func=attention_view.SCALES.get,
        horizontal=True, key="heat_scale",
        help="Rank within the slide always shows hot spots, even where every patch scored "
             "alike; the absolute value shows how much the patches really differ.")
    opacity = controls[1].slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05)
    try:
        thumb, heat, spread = heatmap_images(str(_common.db_path()), _common.fingerprint(),
                                             model_id, int(slide_id), by, scale)
    except InputError as exc:
        st.warning("This slide cannot be shown:")
        st.text(str(exc))
    else:
        if spread.flat:
            st.info(
                f"No patch stands out: {spread.text}. "
                + (f"Under {attention_view.FLAT_RATIO:g}× the median is nearly flat"
                   if spread.ratio is not None else
                   f"A spread under {attention_view.FLAT_PROBABILITY_RANGE:g} is nearly flat")
                + " — the hot spots of a rank colouring mean little here.",
                icon=":material/blur_on:")
        st.image(overlay(thumb, heat, opacity, "inferno"), width="stretch")
        legend = attention_view.heat_scale(by, scale)
        st.plotly_chart(colour_bar_figure(legend.title, legend.low, legend.high, legend.ticks,
                                          legend.ticktext),
                        width="stretch", key="heat_colour_bar", theme=None,
                        config={"displayModeBar": False, "staticPlot": True})
        if np.isnan(heat).all():
            st.caption("No scored patch on this slide (none passed quality control).")
        else:
            st.caption("Glass and rejected patches stay uncoloured.")

if len(slides):  # below the heatmap's row, full width: every column shows at 1280 px
    st.markdown(f"**Slides ({len(slides)})**")
    st.table(pd.DataFrame({
        "Slide": [str(i) for i in slides["slide_id"]],
        "File": slides["name"],
        "Type": [display.value("kind", k) for k in slides["kind"]],
        "Size (px)": [f"{display.count(w)} × {display.count(h)}"
                      for w, h in zip(slides["width"], slides["height"])],
        "Patches kept / rejected": [f"{display.count(k)} / {display.count(r)}" for k, r
                                    in zip(slides["patches_kept"], slides["patches_rejected"])],
    }).set_index("Slide"))

# --------------------------------------------------------------------------- deep-zoom viewer

# A patch chosen in the galleries below ("Inspect a patch") is zoomed to (issue 16).
_viewer.patient_viewer(model_id, int(slide_id), focus_patch=st.session_state.get(f"patch:{wanted}"),
                       focus_n=int(st.session_state.get("viewer_focus_n", 0)))

# --------------------------------------------------------------------------- galleries

top, bottom = gallery(str(_common.db_path()), _common.fingerprint(), model_id, cohort,
                      patient_id, by)
several = len(slides) > 1
name = COLUMN_NAMES[by]


def captions(frame: pd.DataFrame) -> list[str]:
    return [
        f"{getattr(r, by):.3f} · ({display.count(r.x)}, {display.count(r.y)})"
        + (f" · slide {r.slide_id}" if several else "")
        for r in frame.itertuples()
    ]


if top.empty:
    st.info("No scored patch for this patient.")
else:
    px = int(model.config.get("encoder", {}).get("input_px", 224))
    st.markdown(f"**The {len(top)} patches of highest {name}**")
    try:
        image_grid(read_images(top, slides, px), captions(top),
                   list(zip(top["patch_id"].astype(int), top["slide_id"].astype(int))), wanted)
        if bottom.empty:
            st.caption(f"All of this patient's {len(top)} scored patches are shown above.")
        else:
            st.markdown(f"**The {len(bottom)} patches of lowest {name}**")
            image_grid(read_images(bottom, slides, px), captions(bottom),
                       list(zip(bottom["patch_id"].astype(int), bottom["slide_id"].astype(int))),
                       wanted)
    except InputError as exc:
        st.warning("The patches cannot be read from the slide file:")
        st.text(str(exc))
    st.caption(f"Under each patch: its {name}, then its top-left corner (x, y) in level-0 "
               "pixels of its slide; pixels read from the slide file on demand. **Show on "
               "slide** zooms the slide viewer above to the patch, with its Grad-CAM beside it.")

    both = pd.concat([top.assign(rank="high"), bottom.assign(rank="low")], ignore_index=True)
    labels = {
        int(r.patch_id): f"{r.rank} {name} {getattr(r, by):.3f} · ({r.x}, {r.y})"
        + (f" · slide {r.slide_id}" if several else "")
        for r in both.itertuples()
    }
    choice = st.selectbox("Inspect a patch", list(labels), index=None, format_func=labels.get,
                          placeholder="Choose a patch of the galleries", key=f"patch:{wanted}")
    if choice is not None:
        row = both[both["patch_id"] == choice].iloc[0]
        slide = slides[slides["slide_id"] == row["slide_id"]].iloc[0]
        path = str(slide["path"])
        sha = None if pd.isna(slide["sha256"]) else str(slide["sha256"])
        mpp = None if pd.isna(slide["mpp"]) else float(slide["mpp"])
        x, y, size = int(row["x"]), int(row["y"]), int(row["size"])
        full_px = min(size, MAX_PATCH_PX)
        show_cam = st.toggle("Grad-CAM overlay", key="gradcam")
        a, b = st.columns(2)
        try:
            (full,) = patch_pixels(path, sha, mpp, ((x, y, size),), full_px)
            a.image(full, caption=f"level-0 x {x}, y {y}, {size} × {size} px (full resolution)",
                    width="stretch")
            if show_cam:
                image, cam = gradcam_map(str(_common.db_path()), _common.fingerprint(), model_id,
                                         path, sha, mpp, x, y, size, px)
                b.image(overlay(image, cam, 0.45, "jet"),
                        caption=f"Grad-CAM at the encoder's {px} px input: red = pixels that "
                                "pushed the patch towards tumour", width="stretch")
        except InputError as exc:
            st.warning("Grad-CAM cannot be shown for this patch:" if show_cam
                       else "This patch cannot be read:")
            st.text(str(exc))

# --------------------------------------------------------------------------- rejected patches

counts = slides.set_index("slide_id")["patches_rejected"]
with st.expander(f"Rejected patches of slide {slide_id} ({int(counts.get(slide_id, 0))})"):
    rejected = _common.query(f"rejected:{slide_id}",
                             lambda store: rejected_patches(store, int(slide_id)))
    if rejected.empty:
        st.write("Quality control rejected no patch of this slide.")
    else:
        sample = rejected.groupby("qc_reason", sort=True).head(2).head(8)
        try:
            image_grid(read_images(sample, slides, 160),
                       [f"{r.qc_reason} · ({display.count(r.x)}, {display.count(r.y)})"
                        for r in sample.itertuples()])
        except InputError as exc:
            st.text(str(exc))
        st.dataframe(display.renamed(rejected.drop(columns=["slide_id"])), hide_index=True,
                     width="stretch")
        if len(rejected) < int(counts.get(slide_id, 0)):
            st.caption(f"The first {len(rejected)} rejected patches, by reason.")
