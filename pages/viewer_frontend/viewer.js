// cMIL slide viewer: OpenSeadragon over the app's Deep Zoom tiles, patch overlays on a canvas.
// A Streamlit component without a build step: the component protocol is spoken by hand
// (componentReady -> render(args); setComponentValue on a patch click; setFrameHeight).
/* global OpenSeadragon */
"use strict";

const LAYERS = [
  // name, label, default opacity
  ["attention", "Attention", 0.45],
  ["probability", "Patch probability", 0.45],
  ["qc", "QC rejected", 0.9],
  ["regions", "Tumour regions (demo truth)", 0.9],
];
const INFERNO = ["#000004", "#160b39", "#420a68", "#6a176e", "#932667", "#bc3754",
                 "#dd513a", "#f37819", "#fca50a", "#f6d746", "#fcffa4"];
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89",
                 "#35b779", "#6ece58", "#b5de2b", "#d8e219", "#fde725"];

const state = {
  viewer: null, key: null, args: null, data: null, width: 1, height: 1,
  on: {}, alpha: {}, hover: -1, selected: null, focusNonce: null, clicks: 0,
  tilesLoaded: 0, maxLevelLoaded: -1, drawn: {}, grid: null, cell: 1,
};
window.cmilViewer = state; // for tests and for the curious

function send(type, extra) {
  window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, extra || {}), "*");
}

function hexToRgb(h) {
  return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)];
}
const INFERNO_RGB = INFERNO.map(hexToRgb);
const VIRIDIS_RGB = VIRIDIS.map(hexToRgb);
function colour(stops, v) {
  const t = Math.min(1, Math.max(0, v)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t));
  const f = t - i;
  const a = stops[i], b = stops[i + 1];
  return "rgb(" + [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * f)).join(",") + ")";
}

// ------------------------------------------------------------------ controls and legend

function buildControls(args) {
  const box = document.getElementById("controls");
  box.innerHTML = "";
  const initial = args.initial || {};
  for (const [name, label, alpha] of LAYERS) {
    const available = layerAvailable(name);
    if (!(name in state.on)) {
      state.on[name] = available && !!initial[name];
      state.alpha[name] = alpha;
    }
    if (!available) { state.on[name] = false; continue; }
    const wrap = document.createElement("span");
    wrap.className = "layer";
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.id = "on-" + name; cb.checked = state.on[name];
    cb.setAttribute("aria-label", label);
    cb.addEventListener("change", () => { state.on[name] = cb.checked; redraw(); });
    const lab = document.createElement("label");
    lab.htmlFor = cb.id; lab.textContent = label;
    const range = document.createElement("input");
    range.type = "range"; range.min = "0"; range.max = "1"; range.step = "0.05";
    range.value = String(state.alpha[name]); range.id = "alpha-" + name;
    range.title = label + " opacity"; range.setAttribute("aria-label", label + " opacity");
    range.addEventListener("input", () => { state.alpha[name] = parseFloat(range.value); redraw(); });
    wrap.append(cb, lab, range);
    box.append(wrap);
  }
  const legend = document.getElementById("legend");
  legend.innerHTML = "";
  const d = state.data;
  if (layerAvailable("attention")) {
    legend.insertAdjacentHTML("beforeend",
      "<span>" + (d.by === "attention" ? "Attention" : "Importance") +
      " rank percentile within the slide: 0 <span class='bar' style='background:linear-gradient(90deg," +
      INFERNO.join(",") + ")'></span> 1</span>");
  }
  if (layerAvailable("probability")) {
    legend.insertAdjacentHTML("beforeend",
      "<span>Patch probability: 0 <span class='bar' style='background:linear-gradient(90deg," +
      VIRIDIS.join(",") + ")'></span> 1</span>");
  }
  if (layerAvailable("qc")) {
    const seen = new Set(d.qc.filter((r) => r));
    for (const reason of seen) {
      legend.insertAdjacentHTML("beforeend", "<span><span class='chip' style='border-color:" +
        (d.qc_colours[reason] || "#999999") + "'></span>" + reason + "</span>");
    }
  }
  if (layerAvailable("regions")) {
    legend.insertAdjacentHTML("beforeend",
      "<span><span class='chip' style='border-color:#00c8ff;border-style:dashed'></span>tumour box (demo truth)</span>");
  }
}

function layerAvailable(name) {
  const d = state.data;
  if (!d) return false;
  if (name === "attention") return Array.isArray(d.percentile) && d.percentile.some((v) => v !== null);
  if (name === "probability") return Array.isArray(d.probability) && d.probability.some((v) => v !== null);
  if (name === "qc") return d.qc.some((r) => r);
  if (name === "regions") return d.regions.length > 0;
  return false;
}

// ------------------------------------------------------------------ hit testing

function buildGrid() {
  const d = state.data;
  const sizes = d.size.slice().sort((a, b) => a - b);
  state.cell = Math.max(1, sizes.length ? sizes[Math.floor(sizes.length / 2)] : 1);
  const grid = new Map();
  for (let i = 0; i < d.x.length; i++) {
    const c0 = Math.floor(d.x[i] / state.cell), c1 = Math.floor((d.x[i] + d.size[i] - 1) / state.cell);
    const r0 = Math.floor(d.y[i] / state.cell), r1 = Math.floor((d.y[i] + d.size[i] - 1) / state.cell);
    for (let c = c0; c <= c1; c++) {
      for (let r = r0; r <= r1; r++) {
        const k = c + "," + r;
        if (!grid.has(k)) grid.set(k, []);
        grid.get(k).push(i);
      }
    }
  }
  state.grid = grid;
}

function patchAt(ix, iy) {
  const d = state.data;
  if (!d || !state.grid) return -1;
  const list = state.grid.get(Math.floor(ix / state.cell) + "," + Math.floor(iy / state.cell)) || [];
  let best = -1;
  for (const i of list) {
    if (ix >= d.x[i] && ix < d.x[i] + d.size[i] && iy >= d.y[i] && iy < d.y[i] + d.size[i]) {
      // Prefer a scored patch, then the one whose centre is nearest.
      if (best < 0) { best = i; continue; }
      const scored = (j) => d.percentile && d.percentile[j] !== null;
      if (scored(i) && !scored(best)) { best = i; continue; }
      const dist = (j) => Math.hypot(ix - d.x[j] - d.size[j] / 2, iy - d.y[j] - d.size[j] / 2);
      if (scored(i) === scored(best) && dist(i) < dist(best)) best = i;
    }
  }
  return best;
}

function imagePoint(elementPoint) {
  const item = state.viewer.world.getItemAt(0);
  return item ? item.viewerElementToImageCoordinates(elementPoint) : null;
}

function fmt(v, digits) {
  return v === null || v === undefined ? "—" : Number(v).toFixed(digits);
}

// Significant digits: attention on a slide of thousands of patches is of the order of 1e-4.
function fmtSig(v, digits) {
  return v === null || v === undefined ? "—" : Number(Number(v).toPrecision(digits)).toString();
}

function describe(i) {
  const d = state.data;
  const lines = ["patch " + d.id[i] + " · level-0 (" + d.x[i] + ", " + d.y[i] + ") · " + d.size[i] + " px"];
  if (d.percentile) {
    lines.push((d.by === "attention" ? "attention" : "importance") + " percentile " +
      fmt(d.percentile[i], 3) + " · attention " + fmtSig(d.attention[i], 3) +
      " · probability " + fmt(d.probability[i], 3));
  }
  lines.push(d.qc[i] ? "QC: rejected (" + d.qc[i] + ")" : "QC: passed");
  const names = Object.keys(d.metrics);
  for (let k = 0; k < names.length; k += 2) {
    lines.push(names.slice(k, k + 2).map((n) => n + " " + fmt(d.metrics[n][i], 3)).join(" · "));
  }
  return lines.join("\n");
}

// ------------------------------------------------------------------ drawing

function redraw() {
  const v = state.viewer;
  const canvas = document.getElementById("overlay");
  const box = document.getElementById("viewer");
  const dpr = window.devicePixelRatio || 1;
  const w = box.clientWidth, h = box.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    canvas.style.width = w + "px"; canvas.style.height = h + "px";
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const drawn = { attention: 0, probability: 0, qc: 0, regions: 0 };
  state.drawn = drawn;
  const d = state.data;
  if (!v || !d || v.world.getItemCount() === 0) return;
  const item = v.world.getItemAt(0);
  const p0 = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const p1 = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(state.width, 0));
  const k = (p1.x - p0.x) / state.width;
  const visible = (sx, sy, s) => sx + s >= 0 && sy + s >= 0 && sx <= w && sy <= h;
  for (let i = 0; i < d.x.length; i++) {
    const sx = p0.x + d.x[i] * k, sy = p0.y + d.y[i] * k, s = d.size[i] * k;
    if (!visible(sx, sy, s)) continue;
    if (state.on.attention && d.percentile[i] !== null) {
      ctx.globalAlpha = state.alpha.attention;
      ctx.fillStyle = colour(INFERNO_RGB, d.percentile[i]);
      ctx.fillRect(sx, sy, s, s); drawn.attention++;
    }
    if (state.on.probability && d.probability[i] !== null) {
      ctx.globalAlpha = state.alpha.probability;
      ctx.fillStyle = colour(VIRIDIS_RGB, d.probability[i]);
      ctx.fillRect(sx, sy, s, s); drawn.probability++;
    }
    if (state.on.qc && d.qc[i]) {
      ctx.globalAlpha = state.alpha.qc;
      ctx.strokeStyle = d.qc_colours[d.qc[i]] || "#999999";
      ctx.lineWidth = Math.max(1, Math.min(3, s / 12));
      ctx.strokeRect(sx + ctx.lineWidth / 2, sy + ctx.lineWidth / 2, s - ctx.lineWidth, s - ctx.lineWidth);
      drawn.qc++;
    }
  }
  if (state.on.regions) {
    ctx.globalAlpha = state.alpha.regions;
    ctx.strokeStyle = "#00c8ff"; ctx.lineWidth = 2; ctx.setLineDash([6, 4]);
    for (const [x, y, rw, rh] of d.regions) {
      const sx = p0.x + x * k, sy = p0.y + y * k;
      if (sx + rw * k < 0 || sy + rh * k < 0 || sx > w || sy > h) continue;
      ctx.strokeRect(sx, sy, rw * k, rh * k); drawn.regions++;
    }
    ctx.setLineDash([]);
  }
  ctx.globalAlpha = 1;
  const outline = (i, colourName, width) => {
    if (i < 0 || i >= d.x.length) return;
    ctx.strokeStyle = colourName; ctx.lineWidth = width;
    ctx.strokeRect(p0.x + d.x[i] * k, p0.y + d.y[i] * k, d.size[i] * k, d.size[i] * k);
  };
  outline(state.hover, "#ffffff", 2);
  if (state.selected !== null) outline(d.id.indexOf(state.selected), "#00e5ff", 3);
}

// ------------------------------------------------------------------ the viewer

function tileBase(args) {
  if (args.tile_url) return args.tile_url;
  return window.location.protocol + "//" + window.location.hostname + ":" + args.tile_port + args.tile_path;
}

function createViewer(args) {
  const box = document.getElementById("viewer");
  box.style.height = (args.height || 560) + "px";
  const viewer = OpenSeadragon({
    element: box,
    prefixUrl: "openseadragon/images/",
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    crossOriginPolicy: "Anonymous",
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true, scrollToZoom: true },
    timeout: 60000,
  });
  // The overlay canvas and the tooltip must stay above OpenSeadragon's own canvas.
  box.append(document.getElementById("overlay"), document.getElementById("tip"));
  viewer.addHandler("update-viewport", redraw);
  viewer.addHandler("resize", redraw);
  viewer.addHandler("open", () => { applyFocus(); redraw(); });
  viewer.addHandler("tile-loaded", (e) => {
    state.tilesLoaded++;
    state.maxLevelLoaded = Math.max(state.maxLevelLoaded, e.tile.level);
  });
  viewer.addHandler("canvas-click", (e) => {
    if (!e.quick) return;
    const p = imagePoint(e.position);
    const i = p ? patchAt(p.x, p.y) : -1;
    if (i < 0) return;
    state.selected = state.data.id[i];
    state.clicks++;
    send("streamlit:setComponentValue", { value: { patch_id: state.data.id[i], n: state.clicks }, dataType: "json" });
    redraw();
  });
  const tip = document.getElementById("tip");
  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (e) => {
      const p = imagePoint(e.position);
      const i = p ? patchAt(p.x, p.y) : -1;
      if (i !== state.hover) { state.hover = i; redraw(); }
      if (i < 0) { tip.style.display = "none"; return; }
      tip.textContent = describe(i);
      tip.style.display = "block";
      const bw = box.clientWidth;
      const left = e.position.x + 14 + tip.offsetWidth > bw ? e.position.x - tip.offsetWidth - 14 : e.position.x + 14;
      tip.style.left = Math.max(0, left) + "px";
      tip.style.top = Math.max(0, e.position.y + 14) + "px";
    },
    leaveHandler: () => { tip.style.display = "none"; state.hover = -1; redraw(); },
  });
  state.viewer = viewer;
}

// A gallery's "Show on slide": centre the patch with half a patch around it (its cells fill
// the view), select it as a click would (the page then shows its Grad-CAM), and bring the
// viewer into view.
function applyFocus() {
  const f = state.args && state.args.focus;
  const v = state.viewer;
  if (!f || f.nonce === state.focusNonce || !v || v.world.getItemCount() === 0) return;
  state.focusNonce = f.nonce;
  const item = v.world.getItemAt(0);
  const margin = f.size / 2;
  const rect = item.imageToViewportRectangle(f.x - margin, f.y - margin, f.size + 2 * margin, f.size + 2 * margin);
  v.viewport.fitBounds(rect, false);
  state.focused = (state.focused || 0) + 1;
  if (f.patch_id !== undefined && f.patch_id !== null) {
    state.selected = f.patch_id;
    state.clicks++;
    send("streamlit:setComponentValue", { value: { patch_id: f.patch_id, n: state.clicks }, dataType: "json" });
  }
  try {
    if (window.frameElement) window.frameElement.scrollIntoView({ block: "center", behavior: "smooth" });
  } catch (e) { /* another origin: the page stays where it is */ }
  redraw();
}

function render(args) {
  state.args = args;
  const slide = args.slide;
  if (slide.key !== state.key) {
    state.data = args.layers;
    state.width = slide.width; state.height = slide.height;
    state.selected = null; state.hover = -1;
    buildGrid();
    buildControls(args);
    if (!state.viewer) createViewer(args);
    state.key = slide.key;
    state.tilesLoaded = 0; state.maxLevelLoaded = -1;
    const source = {
      Image: {
        xmlns: "http://schemas.microsoft.com/deepzoom/2008",
        Url: tileBase(args) + "/" + slide.key + "_files/",
        Format: "jpeg", Overlap: String(slide.overlap), TileSize: String(slide.tile_size),
        Size: { Width: String(slide.width), Height: String(slide.height) },
      },
    };
    state.viewer.open(source);
    document.getElementById("status").textContent = args.caption || "";
  } else {
    applyFocus();
  }
  if (args.selected !== undefined && args.selected !== null) state.selected = args.selected;
  redraw();
  sendHeight();
}

function sendHeight() {
  // The sum of the page's own blocks: scrollHeight would follow the iframe's height.
  const height = ["controls", "viewer", "legend", "status"]
    .reduce((sum, id) => sum + document.getElementById(id).offsetHeight, 0) + 8;
  if (height !== state.frameHeight) {
    state.frameHeight = height;
    send("streamlit:setFrameHeight", { height: height });
  }
}

window.addEventListener("message", (event) => {
  const msg = event.data;
  if (msg && msg.type === "streamlit:render") render(msg.args);
});
send("streamlit:componentReady", { apiVersion: 1 });
