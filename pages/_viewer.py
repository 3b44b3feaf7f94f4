"""The deep-zoom slide viewer as the pages use it: OpenSeadragon over the app's tile route.

* :func:`slide_viewer`: the viewer (a Streamlit component without a build
  step, ``pages/viewer_frontend``) with its overlays; returns the patch the
  user clicked;
* :func:`patch_panel`: that patch at full resolution, its Grad-CAM, scores
  and QC metrics;
* :func:`export_buttons`: GeoJSON for QuPath and the heatmap PNG at a level;
* :func:`patient_viewer` (Patients page) and :func:`quality_viewer`
  (Quality control page) put these together.

Tiles come from :class:`cmil_core.viewer.deepzoom.TileServer`, one per server
process and store (see that module for why a route of its own and how paths
are checked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

from cmil_core import store as store_mod
from cmil_core.errors import InputError
from cmil_core.viewer.deepzoom import (
    TileCache,
    TileServer,
    cache_folder,
    cache_limit_bytes,
    checked_slide_path,
)
from cmil_core.viewer.overlays import heatmap_levels, heatmap_png, slide_geojson, viewer_layers
from cmil_core.viewer.patients import MAX_PATCH_PX, overlay, patch_gradcam, read_patch
from pages import _common
from pages._common import md

FRONTEND = Path(__file__).resolve().parent / "viewer_frontend"
_component = components.declare_component("cmil_slide_viewer", path=str(FRONTEND))
VIEWER_HEIGHT = 560


@st.cache_resource(show_spinner=False)
def tile_server(db: str) -> TileServer:
    """The process's tile server for store ``db`` (cache under the store's folder)."""
    host = st.get_option("server.address") or "0.0.0.0"
    port = int(os.environ.get("CMIL_TILE_PORT", "0") or 0)
    cache = TileCache(cache_folder(db), cache_limit_bytes())
    return TileServer(cache, host=str(host), port=port).start()


def _layers(slide_id: int, model_id: str | None) -> dict[str, Any]:
    return _common.query(f"viewer_layers:{slide_id}:{model_id}",
                         lambda store: viewer_layers(store, int(slide_id), model_id))


def slide_viewer(slide_id: int, model_id: str | None, *, key: str,
                 focus: dict[str, Any] | None = None,
                 initial: dict[str, bool] | None = None) -> int | None:
    """Draw the viewer for a slide; the id of the patch last clicked on it (None: none yet).

    ``focus``: ``{"patch_id", "n"}``: a patch of this slide to zoom to and
    select (a gallery's choice; ``n`` counts the choices, so that choosing the
    same patch again zooms again). ``initial``: which overlays start switched on.
    """
    db = str(_common.db_path())
    try:
        path, slide = _common.read(lambda store: checked_slide_path(store, int(slide_id)))
        server = tile_server(db)
        tiles = server.register(path, slide.sha256)
    except InputError as exc:  # ViewerError, SlideError: a person's message
        st.warning("This slide cannot be shown in the viewer:")
        st.text(str(exc))
        return None
    layers = _layers(int(slide_id), model_id)
    focus_arg = None
    if focus is not None and focus.get("patch_id") in layers["id"]:
        i = layers["id"].index(focus["patch_id"])
        focus_arg = {"patch_id": focus["patch_id"], "x": layers["x"][i], "y": layers["y"][i],
                     "size": layers["size"][i],
                     "nonce": f"{slide_id}:{focus['patch_id']}:{focus.get('n', 0)}"}
    public = os.environ.get("CMIL_TILE_URL", "").strip()
    value = _component(
        slide={"key": tiles.key, "width": tiles.width, "height": tiles.height,
               "tile_size": tiles.tile_size, "overlap": tiles.overlap},
        layers=layers,
        tile_port=server.port,
        tile_path=server.base_path(),
        tile_url=(public.rstrip("/") + server.base_path()) if public else None,
        focus=focus_arg,
        initial=initial or {"attention": True, "regions": True},
        height=VIEWER_HEIGHT,
        caption=f"{Path(slide.path).name} · {tiles.width:,} × {tiles.height:,} px level 0"
                + (f" · {slide.mpp:.3f} µm/px" if slide.mpp else ""),
        key=key,
        default=None,
    )
    if isinstance(value, dict) and value.get("patch_id") in layers["id"]:
        return int(value["patch_id"])
    return None


# --------------------------------------------------------------------------- one patch


@st.cache_data(show_spinner=False, max_entries=64)
def _patch_images(db: str, stamp: tuple[int, int, int], model_id: str | None, path: str,
                  sha256: str | None, mpp: float | None, x: int, y: int, size: int,
                  px: int) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(full-resolution patch, Grad-CAM overlay or None, why no Grad-CAM or None)."""
    full = read_patch(path, mpp, x, y, size, min(size, MAX_PATCH_PX))
    if model_id is None:
        return full, None, None
    image = read_patch(path, mpp, x, y, size, px)
    try:
        cam = patch_gradcam(db, model_id, image,
                            model=_common.loaded_model(db, model_id, stamp))
    except InputError as exc:
        return full, None, str(exc)
    return full, overlay(image, cam, 0.45, "jet"), None


def patch_panel(slide_id: int, model_id: str | None, patch_id: int) -> None:
    """One patch beside the viewer: full resolution, Grad-CAM, scores and QC metrics."""
    layers = _layers(int(slide_id), model_id)
    if patch_id not in layers["id"]:
        return
    i = layers["id"].index(patch_id)
    x, y, size = layers["x"][i], layers["y"][i], layers["size"][i]
    slide = _common.query(f"slide:{slide_id}",
                          lambda store: store_mod.get_slide(store, int(slide_id)))
    if slide is None:
        return
    px = 224
    if model_id is not None:
        model = _common.query(f"model:{model_id}",
                              lambda store: store_mod.get_model(store, model_id))
        if model is not None:
            px = int(model.config.get("encoder", {}).get("input_px", 224))
    st.markdown(f"**Patch {patch_id}** · level-0 ({x:,}, {y:,}) · {size} px")
    db = str(_common.db_path())
    try:
        with st.spinner("Reading the patch and its Grad-CAM…"):
            full, cam, why = _patch_images(db, _common.fingerprint(), model_id, slide.path,
                                           slide.sha256, slide.mpp, x, y, size, px)
    except InputError as exc:
        st.warning("This patch cannot be read:")
        st.text(str(exc))
        return
    a, b = st.columns(2)
    a.image(full, caption=f"full resolution ({min(size, MAX_PATCH_PX)} px)", width="stretch")
    if cam is not None:
        b.image(cam, caption=f"Grad-CAM at the encoder's {px} px input: red = pixels that "
                             "pushed the patch towards tumour", width="stretch")
    elif why:
        b.caption(f"No Grad-CAM: {why}")
    rows: list[tuple[str, str]] = []
    if model_id is not None:
        by = layers.get("by", "attention")
        rows += [(f"{by} rank percentile in slide", _num(layers["percentile"][i])),
                 ("attention", "—" if layers["attention"][i] is None
                  else f"{layers['attention'][i]:.3g}"),
                 ("probability", _num(layers["probability"][i]))]
    qc = layers["qc"][i]
    rows.append(("quality control", "passed" if qc is None else f"rejected: {qc}"))
    rows += [(name.replace("_", " "), _num(values[i]))
             for name, values in layers["metrics"].items()]
    st.dataframe(pd.DataFrame(rows, columns=["Measure", "Value"]), hide_index=True,
                 width="stretch")


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


# --------------------------------------------------------------------------- exports


def export_buttons(slide_id: int, model_id: str, *, stem: str) -> None:
    """GeoJSON (QuPath detections) of the slide's patches and the heatmap PNG at a chosen level."""
    try:
        levels = _common.query(f"levels:{slide_id}",
                               lambda store: heatmap_levels(store, int(slide_id)))
    except InputError as exc:
        st.text(str(exc))
        return
    masked = _common.pseudonymise_on()

    def geojson() -> bytes:
        collection = _common.read(lambda store: slide_geojson(store, int(slide_id), model_id))
        if masked:  # pseudonymised: no patient id in the file
            for feature in collection["features"]:
                feature["properties"].get("metadata", {}).pop("patient_id", None)
        return json.dumps(collection).encode()

    row = st.container(horizontal=True, gap="small", vertical_alignment="bottom")
    row.download_button(
        "GeoJSON for QuPath", data=geojson, file_name=f"{stem}.geojson",
        mime="application/geo+json", on_click="ignore", key=f"geojson-{slide_id}",
        icon=":material/download:",
        help="Every patch as a QuPath detection (level-0 pixels) with its scores and QC "
             "metrics as measurements; same as `cmil export-geojson`.",
    )
    fits = [lv for lv in levels if lv[1] * lv[2] <= 64_000_000]
    if not fits:
        return
    level = row.selectbox(
        "Heatmap level", [lv[0] for lv in fits], index=0,
        format_func=lambda i: f"level {i}: {levels[i][1]:,} × {levels[i][2]:,} px",
        key=f"heatmap-level-{slide_id}",
    )
    row.download_button(
        "Heatmap PNG", data=lambda: _common.read(
            lambda store: heatmap_png(store, model_id, int(slide_id), int(level))),
        file_name=f"{stem}_heatmap_level{level}.png", mime="image/png", on_click="ignore",
        key=f"heatmap-png-{slide_id}", icon=":material/download:",
        help="The slide at this pyramid level with the rank-percentile heatmap (inferno).",
    )


# --------------------------------------------------------------------------- page sections


def patient_viewer(model_id: str, slide_id: int, *, focus_patch: int | None = None,
                   focus_n: int = 0) -> None:
    """The Patients page's viewer: overlays, the clicked patch beside it, exports below.

    ``focus_patch``: a gallery's patch to zoom to (its ``n``-th choice, see
    :func:`slide_viewer`); the viewer then selects it, as a click would.
    """
    st.markdown("**Slide viewer**")
    st.caption("Scroll or pinch to zoom, drag to pan; switch each overlay and its opacity above "
               "the slide. Hover a patch for its scores and QC metrics; click it to see it at full "
               "resolution with its Grad-CAM. **Show on slide** under a patch of the galleries "
               "below zooms here to it.")
    left, right = st.columns([3, 2])
    with left:
        clicked = slide_viewer(int(slide_id), model_id, key=f"viewer:{model_id}:{slide_id}",
                               focus=None if focus_patch is None
                               else {"patch_id": focus_patch, "n": focus_n})
    with right:
        if clicked is None:
            st.info("Click a patch on the slide to see it at full resolution with its Grad-CAM.")
        else:
            patch_panel(int(slide_id), model_id, clicked)
    stem = f"slide{int(slide_id)}_{model_id}"
    export_buttons(int(slide_id), model_id, stem=stem)


def quality_viewer(cohort: str) -> None:
    """The Quality control page's viewer: a slide of the cohort, its rejected patches outlined."""
    slides = _common.query(f"slides:{cohort}", lambda store: store_mod.list_slides(store, cohort))
    slides = [s for s in slides if s.status != "failed"]
    st.subheader("Rejected patches on the slide")
    if not slides:
        st.info(f"Cohort {md(cohort)} has no readable slide.")
        return
    names: dict[int, str] = {s.slide_id: f"{s.patient_id} · {Path(s.path).name}" for s in slides}
    slide_id: int = st.selectbox("Slide", list(names), format_func=lambda i: names[i],
                                 key=f"qc_view:{cohort}") or slides[0].slide_id
    st.caption("Rejected patches outlined in the colour of their reason (legend below the slide); "
               "hover a patch for its QC metrics.")
    model_id = _common.selected_model()
    left, right = st.columns([3, 2])
    with left:
        clicked = slide_viewer(int(slide_id), model_id, key=f"qc_viewer:{slide_id}",
                               initial={"qc": True, "regions": False})
    with right:
        if clicked is not None:
            patch_panel(int(slide_id), model_id, clicked)
