"""Pixels of synthetic Wright-Giemsa (May-Grünwald-Giemsa) bone-marrow smears.

The demo study needs whole-slide images and microscope photographs that a
haematologist would take for a marrow aspirate smear, generated offline with
numpy, scipy and Pillow only. This module draws them; ``demo`` decides what is
on which slide (patients, labels, where the tumour clusters are).

The look
--------
* Pale, very slightly warm glass; a smear whose thickness varies
  (:func:`smear_density_map`): a thick body where the drop was spread, a thin
  feathered tail, bare-glass margins.
* Red cells everywhere in the smear: salmon-pink discs of about 7.5 µm with a
  paler centre (central pallor), evenly spread in a monolayer, overlapping and
  darker, with less pallor, where the smear is thick, sparse and flat where it
  is thin.
* Scattered nucleated marrow cells, in roughly normal proportions: segmented
  and band neutrophils, metamyelocytes and myelocytes with lilac granular
  cytoplasm, promyelocytes and a few blasts with blue cytoplasm, eosinophils
  with orange granules, erythroid precursors (basophilic, polychromatic and
  orthochromatic normoblasts: round, very dark compact nuclei with a rim of
  blue, grey or pink-grey cytoplasm), lymphocytes (round dark nucleus, scant
  sky-blue cytoplasm), monocytes, plasma cells and the odd megakaryocyte.
* Neuroblastoma clusters (``Cluster(kind="tumour")``): tight clumps of small
  round blue cells with hyperchromatic blue-purple nuclei of 8-10 µm, fine
  chromatin and scant cytoplasm. Neighbouring nuclei mould against each other
  (drawn as a weighted Voronoi partition with a thin pale seam), large clumps
  pile up in a second layer, a few cells drift off the edge, pale pink
  fibrillary neuropil lies between the cells and some clumps form Homer-Wright
  rosettes (a ring of cells around a neuropil core).
* Benign look-alikes, as dark as tumour (:data:`LOOKALIKE_KINDS`):
  ``"lymphoid"`` groups of round lymphocytes, each with a visible rim of
  sky-blue cytoplasm, no moulding, no neuropil; ``"erythroid"`` islands of
  normoblasts (round, very dark nuclei, grey-pink cytoplasm) around a pale
  vacuolated macrophage; ``"monocytic"`` groups of monocytes (folded nuclei,
  grey-blue vacuolated cytoplasm); ``"smudge"`` cells, crushed nuclei smeared
  into shapeless streaky chromatin, among intact lymphocytes.
  :func:`cells_for_dark_area` sizes any clump by its dark nuclear area, so
  that a look-alike is as dark as a tumour clump of the same area
  (:func:`lookalike_boxes` gives their ground truth).
* Per-centre style (:class:`CenterStyle`): stain tint, stain vectors rotated
  about the grey axis, stain strength, the
  azure/eosin balance, focus blur, scanner noise, illumination vignetting,
  optional JPEG compression and the glass colour, so that centres differ the
  way scanners and stainers do.

The method
----------
A stained smear is seen in transmitted light, so the renderer works in optical
density, where stains add up (Beer-Lambert). Every cell is a small *sprite* of
stain concentrations in four channels: haemoglobin (red cells, eosinophil
granules), nuclear azure-eosin chromatin (purple), basophilic cytoplasm
(methylene blue) and eosin (lilac granules, neuropil, plasma film). Sprites are
drawn once per ``(mpp, blur)`` with anti-aliased edges (signed distances with a
one-pixel ramp), chromatin and granule texture, then blurred by the centre's
focus blur (blurring each sprite equals blurring the image, the sum being
linear) and cached in a bank. A field is rendered by adding sprites into a
concentration canvas with numpy slicing (order does not matter: overlapping
red cells simply get darker, as on glass), then one matrix product with the
centre's stain spectra, ``exp(-OD)``, the illumination, noise and rounding.
Tumour clusters are drawn as a whole in slide coordinates (the moulding needs
all nuclei of a clump at once) and cached per ``(cluster, mpp, blur)``.

Determinism and tiles
---------------------
``render_field`` takes a slide ``seed``. Cell positions are never drawn from a
stream of random numbers: they sit on fixed lattices in *slide* microns (one
per cell population), each lattice site draws its jitter, acceptance, cell
type, variant and orientation from a counter-based hash (SplitMix64) of
``(seed, population, site column, site row)``, and acceptance depends on the
smear density at the site. Scanner noise is indexed by the global pixel, a
cluster's cells are hashed from the cluster's own fields, and pixel ``(r, c)``
of a field is global pixel ``(origin_y / mpp + r, origin_x / mpp + c)``. So the
pixels of a region depend only on ``(seed, region, mpp, style, clusters,
cellularity, smear density)``, and a slide drawn tile by tile (same seed,
``origin_um`` a multiple of ``mpp``) joins without seams: a cell near a seam is
the same cell, drawn the same way, in both tiles. The exceptions are
documented where they apply: vignetting with ``frame_um=None`` is per rendered
image, and JPEG blocks restart at each tile (seamless when tiles start on
multiples of 8 pixels).

Speed: about 0.03-0.06 s for a 1024 x 1024 field on one core (0.05-0.09 s
with JPEG or a tumour clump in it), after the first call for a given
``(mpp, blur)``, which builds the sprite bank (0.07-0.2 s, cached per process;
up to about 16 MB each, 8 kept).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from cmil_core.errors import InputError

__all__ = [
    "CLUSTER_KINDS",
    "DEFAULT_DENSITY",
    "LOOKALIKE_KINDS",
    "PRESET_STYLES",
    "CenterStyle",
    "Cluster",
    "cells_for_dark_area",
    "cluster_cell_centres",
    "lookalike_boxes",
    "render_field",
    "smear_density_map",
    "tumour_boxes",
]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

#: What ``render_field`` assumes for the smear thickness when it gets no map:
#: a good reading area, red cells in a monolayer that touch here and there.
DEFAULT_DENSITY = 0.55

#: Benign look-alikes, as dark as tumour: a lymphoid cluster, an erythroid
#: island (normoblasts around a pale macrophage), a group of monocytes, and
#: smudge cells (crushed nuclei smeared into shapeless chromatin).
LOOKALIKE_KINDS = ("lymphoid", "erythroid", "monocytic", "smudge")
CLUSTER_KINDS = ("tumour", *LOOKALIKE_KINDS)

# --------------------------------------------------------------------------
# Stains
# --------------------------------------------------------------------------
# Concentration channels of the canvas.
_HB, _NUC, _BASO, _EOS = 0, 1, 2, 3
_K = 4
# Optical density (natural log, R, G, B) of one unit of each channel. One unit
# of _HB is the rim of a red cell, of _NUC a neutrophil nucleus, of _BASO a
# lymphocyte's sky-blue cytoplasm, of _EOS a lilac-pink granular cytoplasm.
_SPECTRA = np.array(
    [
        [0.05, 0.34, 0.33],  # haemoglobin + eosin: salmon pink
        [0.95, 1.45, 0.55],  # azure-eosin chromatin: purple
        [0.40, 0.20, 0.04],  # methylene blue cytoplasm: sky blue
        [0.10, 0.26, 0.14],  # eosin: lilac pink
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class CenterStyle:
    """How one centre's staining and scanner make its images look.

    ``tint`` acts on the stains, not on the glass: the optical density of every
    stain in channel c is divided by ``tint[c]``, so a channel above 1 lets more
    of that colour through stained material (``(1.06, 0.94, 1.04)`` turns the
    purples more magenta). ``saturation`` scales all stain concentrations
    (stain strength); ``azure_eosin`` above 1 strengthens the blue/purple
    stains (nuclei, basophilic cytoplasm) and weakens the pink ones, below 1 the
    reverse. ``noise_sigma`` is Gaussian scanner noise in 0-255 units,
    ``blur_sigma_um`` a Gaussian focus blur in microns, ``vignetting`` how much
    darker the corners of a camera frame are (0.2: 20 %). A camera frame is the
    rendered image when ``frame_um`` is None (a microscope photograph); a
    number makes frames a fixed grid of that many microns on the slide (a
    scanner's stitched tiles), which keeps tiled rendering seamless.
    ``jpeg_quality`` (1-95) adds JPEG compression, None none. ``background`` is
    the colour of bare glass under this centre's illumination.
    ``stain_rotation_deg`` rotates every stain's optical-density vector about
    the grey axis by that many degrees (another stain batch or another
    camera's colour response: blue-purple chromatin turns more violet or more
    slate-blue, pink turns more orange or more magenta), which a per-channel
    tint cannot do.
    """

    name: str
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    noise_sigma: float = 3.0
    blur_sigma_um: float = 0.0
    vignetting: float = 0.0
    background: tuple[int, int, int] = (236, 232, 236)
    azure_eosin: float = 1.0
    frame_um: float | None = None
    jpeg_quality: int | None = None
    stain_rotation_deg: float = 0.0

    def __post_init__(self) -> None:
        if len(self.tint) != 3 or min(self.tint) <= 0:
            raise InputError(f"style {self.name!r}: tint must be three positive numbers.")
        if len(self.background) != 3 or not all(0 <= int(v) <= 255 for v in self.background):
            raise InputError(f"style {self.name!r}: background must be three values 0-255.")
        if self.saturation <= 0 or self.azure_eosin <= 0:
            raise InputError(f"style {self.name!r}: saturation and azure_eosin must be > 0.")
        if self.noise_sigma < 0 or self.blur_sigma_um < 0:
            raise InputError(f"style {self.name!r}: noise_sigma and blur_sigma_um must be >= 0.")
        if not 0 <= self.vignetting < 1:
            raise InputError(f"style {self.name!r}: vignetting must be in [0, 1).")
        if self.frame_um is not None and self.frame_um <= 0:
            raise InputError(f"style {self.name!r}: frame_um must be positive or None.")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            raise InputError(f"style {self.name!r}: jpeg_quality must be 1-95 or None.")


#: Four centres that look clearly different: a clean reference scanner, a
#: magenta-heavy scanner with soft focus and JPEG, a bluish microscope camera
#: with strong vignetting, and a pink-heavy stainer.
PRESET_STYLES: tuple[CenterStyle, ...] = (
    CenterStyle(
        name="centre-A",
        tint=(1.0, 1.0, 1.0),
        noise_sigma=2.0,
        vignetting=0.04,
        frame_um=500.0,
    ),
    CenterStyle(
        name="centre-B",
        tint=(1.07, 0.93, 1.05),
        saturation=1.15,
        noise_sigma=3.5,
        blur_sigma_um=0.55,
        vignetting=0.10,
        background=(240, 237, 230),
        frame_um=400.0,
        jpeg_quality=75,
    ),
    CenterStyle(
        name="centre-C",
        tint=(0.93, 1.0, 1.08),
        saturation=0.85,
        noise_sigma=4.5,
        blur_sigma_um=0.3,
        vignetting=0.22,
        background=(226, 230, 238),
        azure_eosin=1.15,
    ),
    CenterStyle(
        name="centre-D",
        tint=(1.05, 1.0, 0.95),
        saturation=1.05,
        noise_sigma=3.0,
        blur_sigma_um=0.15,
        vignetting=0.08,
        background=(238, 229, 226),
        azure_eosin=0.85,
        frame_um=600.0,
    ),
)


@dataclass(frozen=True)
class Cluster:
    """A group of cells on a slide, in slide microns.

    ``kind`` is ``"tumour"`` (a neuroblastoma clump) or ``"lymphoid"`` (a
    benign clump of lymphocytes). ``radius_um`` is the clump's extent: cells
    pack from the centre outwards in an irregular outline of that radius, a
    clump with more cells than fit piles up in further layers, one with fewer
    is smaller. The cells' layout depends only on these fields (``seed``
    varies it for otherwise equal clusters), not on the slide seed, so
    :func:`tumour_boxes` needs no seed.
    """

    x_um: float
    y_um: float
    radius_um: float
    kind: str
    n_cells: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CLUSTER_KINDS:
            raise InputError(
                f"cluster kind must be one of {', '.join(CLUSTER_KINDS)}, not {self.kind!r}."
            )
        if not self.radius_um > 0:
            raise InputError(f"cluster radius_um must be positive, not {self.radius_um}.")
        if int(self.n_cells) < 1:
            raise InputError(f"cluster n_cells must be at least 1, not {self.n_cells}.")


# --------------------------------------------------------------------------
# Counter-based hashing: random numbers as a pure function of indices
# --------------------------------------------------------------------------
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MUL1 = _U64(0xBF58476D1CE4E5B9)
_MUL2 = _U64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """SplitMix64 finaliser, elementwise (uint64 arithmetic wraps)."""
    x = x ^ (x >> _U64(30))
    x = x * _MUL1
    x = x ^ (x >> _U64(27))
    x = x * _MUL2
    return x ^ (x >> _U64(31))


def _site_uniforms(
    seed: int, stream: int, ix: NDArray[np.int64], iy: NDArray[np.int64], n: int
) -> F64:
    """``n`` uniforms in [0, 1) for each site ``(ix, iy)``; shape ``(n, sites)``."""
    base = _mix(np.array([(seed * 0x2545F4914F6CDD1D + stream) & _MASK64], dtype=np.uint64))
    h = _mix(base + ix.astype(np.int64).view(np.uint64) * _GOLDEN)
    h = _mix(h + iy.astype(np.int64).view(np.uint64) * _MUL1)
    out = np.empty((n, h.size), dtype=np.float64)
    for r in range(n):
        step = _U64(((r + 1) * 0x9E3779B97F4A7C15) & _MASK64)
        out[r] = (_mix(h + step) >> _U64(11)).astype(np.float64)
    out *= 2.0**-53
    return out


def _seed_of(seed: int | np.random.Generator) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise InputError(f"seed must be an int or a numpy Generator, not {type(seed).__name__}.")
    return int(seed) & _MASK64


# --------------------------------------------------------------------------
# Sprite drawing helpers (sprites are drawn once per (mpp, blur) and cached)
# --------------------------------------------------------------------------
class _Grid:
    """A square sprite grid in microns, the cell's centre at the middle pixel."""

    def __init__(self, half_um: float, mpp: float, rng: np.random.Generator) -> None:
        half = max(2, math.ceil(half_um / mpp))
        self.n = 2 * half + 1
        u = (np.arange(self.n, dtype=np.float64) - half) * mpp
        self.x = u[None, :]
        self.y = u[:, None]
        self.mpp = mpp
        self.rng = rng

    def soft(self, sd: F64, width_px: float = 1.0) -> F64:
        """Anti-aliased coverage of the region where the signed distance < 0."""
        return np.clip(0.5 - sd / (self.mpp * width_px), 0.0, 1.0)

    def ellipse_sd(
        self, cx: float, cy: float, a: float, b: float, theta: float = 0.0
    ) -> F64:
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = self.x - cx, self.y - cy
        u = (dx * c + dy * s) / a
        v = (-dx * s + dy * c) / b
        return (np.sqrt(u * u + v * v) - 1.0) * min(a, b)

    def blob_sd(self, cx: float, cy: float, r: float, irregular: float = 0.05) -> F64:
        """A round outline with a little low-order wobble."""
        dx, dy = self.x - cx, self.y - cy
        rho = np.sqrt(dx * dx + dy * dy)
        th = np.arctan2(dy, dx)
        wob = np.ones_like(th)
        for k in (2, 3, 5):
            wob = wob + irregular * self.rng.normal(0, 1.0 / k) * np.cos(
                k * th + self.rng.uniform(0, 2 * np.pi)
            )
        return rho - r * wob

    def capsule_sd(self, p0: tuple[float, float], p1: tuple[float, float], r: float) -> F64:
        ax, ay = p0
        bx, by = p1
        px, py = self.x - ax, self.y - ay
        vx, vy = bx - ax, by - ay
        t = np.clip((px * vx + py * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
        return np.hypot(px - t * vx, py - t * vy) - r

    def texture(self, sigma_um: float) -> F64:
        """Smooth noise of unit standard deviation with grain ``sigma_um``."""
        z = self.rng.standard_normal((self.n, self.n))
        sig = max(sigma_um / self.mpp, 0.35)
        smooth: F64 = ndimage.gaussian_filter(z, sig, mode="wrap")
        return smooth / max(float(smooth.std()), 1e-9)

    def dots(self, mask: F64, per_um2: float, radius_um: float) -> F64:
        """Granules: little blobs of peak ~1 scattered where ``mask`` > 0.5."""
        area = float((mask > 0.5).sum()) * self.mpp**2
        count = self.rng.poisson(per_um2 * area) if area > 0 else 0
        out = np.zeros((self.n, self.n))
        ys, xs = np.nonzero(mask > 0.5)
        if count and ys.size:
            pick = self.rng.integers(0, ys.size, count)
            np.add.at(out, (ys[pick], xs[pick]), 1.0)
            sig = max(radius_um / self.mpp, 0.5)
            out = ndimage.gaussian_filter(out, sig) * (2 * np.pi * sig * sig)
        return np.minimum(out, 1.6)

    def new(self) -> F64:
        return np.zeros((_K, self.n, self.n))


def _lobed_nucleus(g: _Grid, n_lobes: int, r_lobe: float, spread: float) -> F64:
    """Segmented nucleus: lobes along a curved path joined by thin strands."""
    rng = g.rng
    start = rng.uniform(0, 2 * np.pi)
    span = rng.uniform(2.2, 3.8) if n_lobes > 2 else rng.uniform(1.2, 2.0)
    arc_r = spread
    ox, oy = rng.normal(0, 0.4, 2)
    centres = []
    for i in range(n_lobes):
        a = start + span * (i / max(n_lobes - 1, 1)) + rng.normal(0, 0.15)
        centres.append((ox + arc_r * math.cos(a), oy + arc_r * math.sin(a)))
    sd = np.full((g.n, g.n), np.inf)
    for cx, cy in centres:
        rl = r_lobe * rng.uniform(0.85, 1.15)
        sd = np.minimum(
            sd, g.ellipse_sd(cx, cy, rl, rl * rng.uniform(0.7, 0.95), rng.uniform(0, np.pi))
        )
    for p0, p1 in itertools.pairwise(centres):
        sd = np.minimum(sd, g.capsule_sd(p0, p1, rng.uniform(0.3, 0.5)))
    return g.soft(sd)


def _arc_nucleus(g: _Grid, arc_r: float, half_w: float, span: float) -> F64:
    """Band nucleus: a thick C- or U-shaped tube of even width."""
    rng = g.rng
    rot = rng.uniform(0, 2 * np.pi)
    ox, oy = rng.normal(0, 0.3, 2)
    dx, dy = g.x - ox, g.y - oy
    rho = np.hypot(dx, dy)
    th = np.mod(np.arctan2(dy, dx) - rot, 2 * np.pi)
    inside = th <= span
    sd_arc = np.abs(rho - arc_r) - half_w
    ends = []
    for a in (rot, rot + span):
        ex, ey = ox + arc_r * math.cos(a), oy + arc_r * math.sin(a)
        ends.append(np.hypot(g.x - ex, g.y - ey) - half_w)
    sd = np.where(inside, sd_arc, np.minimum(ends[0], ends[1]))
    return g.soft(sd)


def _chromatin(g: _Grid, fine: float, coarse: float) -> F64:
    """Multiplicative chromatin texture: fine grain plus coarser clumps."""
    return np.clip(1.0 + fine * g.texture(0.3) + coarse * g.texture(0.7), 0.15, 2.5)


# Each builder draws one variant of a cell type: (K, n, n) concentrations.
def _cell_rbc(g: _Grid, level: float) -> F64:
    rng = g.rng
    # level 0: thick-area cell (small, little pallor); 1: thin-area (flat, big pallor)
    r = rng.normal(3.55 + 0.35 * level, 0.18)
    ecc = rng.uniform(1.0, 1.08)
    th = rng.uniform(0, np.pi)
    ox, oy = rng.uniform(-0.5, 0.5, 2) * g.mpp
    sd = g.ellipse_sd(ox, oy, r * ecc, r / ecc, th)
    disc = g.soft(sd)
    f = 1.0 - np.clip(-sd / r, 0.0, 1.0)  # 0 at the centre, 1 at the rim
    depth = 0.15 + 0.45 * level + rng.normal(0, 0.04)
    f0 = 0.18 + 0.12 * level + rng.normal(0, 0.03)
    f1 = f0 + 0.32
    # biconcave profile: a pale centre (pallor), rising smoothly to the thick rim
    profile = 1.0 - depth * (1.0 - _smoothstep((f - f0) / (f1 - f0)))
    c = g.new()
    c[_HB] = disc * profile * rng.uniform(0.92, 1.05)
    return c


def _cytoplasm(g: _Grid, r: float, irregular: float = 0.04) -> F64:
    cx, cy = g.rng.normal(0, 0.2, 2)
    return g.soft(g.blob_sd(cx, cy, r, irregular))


def _cell_neutrophil(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(5.8, 6.8))
    nuc = _lobed_nucleus(
        g, int(rng.choice([2, 3, 3, 4, 4, 5])), rng.uniform(1.7, 2.1), rng.uniform(2.5, 3.0)
    )
    c = g.new()
    c[_EOS] = cyto * 0.8 * np.clip(1 + 0.35 * g.texture(0.25), 0.3, 2)
    c[_BASO] = cyto * 0.1
    c[_NUC] = nuc * 1.05 * _chromatin(g, 0.15, 0.3)
    return c


def _cell_band(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(5.8, 6.8))
    nuc = _arc_nucleus(g, rng.uniform(2.4, 3.2), rng.uniform(1.0, 1.4), rng.uniform(2.6, 4.4))
    c = g.new()
    c[_EOS] = cyto * 0.8 * np.clip(1 + 0.35 * g.texture(0.25), 0.3, 2)
    c[_BASO] = cyto * 0.1
    c[_NUC] = nuc * 1.0 * _chromatin(g, 0.15, 0.28)
    return c


def _cell_metamyelocyte(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(6.2, 7.2))
    th = rng.uniform(0, 2 * np.pi)
    ox, oy = 0.8 * math.cos(th), 0.8 * math.sin(th)
    a, b = rng.uniform(3.3, 3.9), rng.uniform(2.5, 3.0)
    sd = g.ellipse_sd(ox, oy, a, b, th + np.pi / 2)
    # indentation on the side facing the cell centre: kidney shape
    ix, iy = ox - 3.2 * math.cos(th), oy - 3.2 * math.sin(th)
    sd = np.maximum(sd, -(np.hypot(g.x - ix, g.y - iy) - rng.uniform(1.6, 2.2)))
    c = g.new()
    c[_EOS] = cyto * 0.8 * np.clip(1 + 0.35 * g.texture(0.25), 0.3, 2)
    c[_BASO] = cyto * 0.14
    c[_NUC] = g.soft(sd) * 0.95 * _chromatin(g, 0.15, 0.25)
    return c


def _cell_myelocyte(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(6.8, 8.2))
    th = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(1.2, 2.2)
    a = rng.uniform(3.4, 4.2)
    sd = g.ellipse_sd(off * math.cos(th), off * math.sin(th), a, a * rng.uniform(0.8, 0.95), th)
    c = g.new()
    gran = g.dots(cyto, 1.2, 0.2)
    c[_EOS] = cyto * 0.7 * np.clip(1 + 0.3 * g.texture(0.25), 0.3, 2) + 0.35 * gran * cyto
    c[_BASO] = cyto * 0.25
    c[_NUC] = g.soft(sd) * 0.85 * _chromatin(g, 0.15, 0.22)
    return c


def _cell_promyelocyte(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(8.0, 9.5))
    th = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(1.0, 2.0)
    nx_, ny_ = off * math.cos(th), off * math.sin(th)
    a = rng.uniform(4.4, 5.2)
    nuc = g.soft(g.ellipse_sd(nx_, ny_, a, a * rng.uniform(0.82, 0.95), th))
    hof = g.soft(g.ellipse_sd(nx_ - 4.6 * math.cos(th), ny_ - 4.6 * math.sin(th), 2.2, 1.6, th))
    gran = g.dots(cyto, 0.9, 0.28)
    nucleolus = g.soft(g.ellipse_sd(nx_ + rng.normal(0, 1), ny_ + rng.normal(0, 1), 0.9, 0.7))
    c = g.new()
    c[_BASO] = cyto * 0.7 * (1 - 0.55 * hof)
    c[_EOS] = cyto * 0.12 + 0.6 * gran * cyto
    c[_NUC] = nuc * 0.72 * _chromatin(g, 0.2, 0.08) * (1 - 0.3 * nucleolus) + 0.45 * gran * cyto
    return c


def _cell_blast(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(6.5, 8.0))
    a = rng.uniform(4.6, 5.6)
    ox, oy = rng.normal(0, 0.6, 2)
    nuc = g.soft(g.ellipse_sd(ox, oy, a, a * rng.uniform(0.85, 0.97), rng.uniform(0, np.pi)))
    nucleolus = g.soft(g.ellipse_sd(ox + rng.normal(0, 1.2), oy + rng.normal(0, 1.2), 1.0, 0.8))
    c = g.new()
    c[_BASO] = cyto * 0.8
    c[_NUC] = nuc * 0.7 * _chromatin(g, 0.22, 0.05) * (1 - 0.35 * nucleolus)
    return c


def _cell_eosinophil(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(6.2, 7.0))
    nuc = _lobed_nucleus(g, 2, rng.uniform(1.8, 2.2), 2.7)
    gran = g.dots(cyto, 2.2, 0.28)
    c = g.new()
    c[_HB] = cyto * (0.35 + 0.9 * gran)
    c[_EOS] = cyto * 0.35
    c[_NUC] = nuc * 1.0 * _chromatin(g, 0.15, 0.25)
    return c


def _cell_ebl_basophilic(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(6.2, 7.4), 0.06)
    a = rng.uniform(4.0, 4.8)
    ox, oy = rng.normal(0, 0.4, 2)
    nuc = g.soft(g.ellipse_sd(ox, oy, a, a * rng.uniform(0.9, 1.0), 0))
    c = g.new()
    c[_BASO] = cyto * rng.uniform(1.7, 2.2)
    c[_NUC] = nuc * 1.05 * _chromatin(g, 0.2, 0.3)
    return c


def _cell_ebl_polychromatic(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(4.8, 5.8), 0.03)
    a = rng.uniform(3.0, 3.6)
    ox, oy = rng.normal(0, 0.35, 2)
    nuc = g.soft(g.ellipse_sd(ox, oy, a, a * rng.uniform(0.92, 1.0), 0))
    c = g.new()
    c[_BASO] = cyto * rng.uniform(0.45, 0.7)
    c[_HB] = cyto * rng.uniform(0.25, 0.45)
    c[_NUC] = nuc * 1.35 * _chromatin(g, 0.12, 0.45)  # "checkerboard" chromatin
    return c


def _cell_ebl_orthochromatic(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(3.9, 4.6), 0.03)
    th = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(0.3, 1.2)
    a = rng.uniform(2.1, 2.7)
    nuc = g.soft(g.ellipse_sd(off * math.cos(th), off * math.sin(th), a, a, 0))
    c = g.new()
    c[_HB] = cyto * rng.uniform(0.65, 0.85)
    c[_BASO] = cyto * rng.uniform(0.08, 0.2)
    c[_NUC] = nuc * 1.8 * _chromatin(g, 0.06, 0.08)  # pyknotic
    return c


def _cell_lymphocyte(g: _Grid, large: bool = False) -> F64:
    rng = g.rng
    r = rng.uniform(5.2, 6.2) if large else rng.uniform(4.1, 5.0)
    cyto = _cytoplasm(g, r, 0.03)
    th = rng.uniform(0, 2 * np.pi)
    a = r * rng.uniform(0.66, 0.76) if large else r * rng.uniform(0.7, 0.82)
    off = (r - a) * rng.uniform(0.2, 0.9)
    nuc = g.soft(g.ellipse_sd(off * math.cos(th), off * math.sin(th), a, a * 0.94, th))
    c = g.new()
    c[_BASO] = cyto * (rng.uniform(1.0, 1.4) if large else rng.uniform(0.9, 1.25))
    c[_NUC] = nuc * (1.05 if large else 1.3) * _chromatin(g, 0.12, 0.3)
    return c


def _cell_plasma(g: _Grid) -> F64:
    rng = g.rng
    th = rng.uniform(0, np.pi)
    a, b = rng.uniform(6.0, 7.2), rng.uniform(4.6, 5.4)
    cyto = g.soft(g.ellipse_sd(0, 0, a, b, th))
    nr = rng.uniform(2.7, 3.2)
    nx_, ny_ = (a - nr - 0.6) * math.cos(th), (a - nr - 0.6) * math.sin(th)
    nuc = g.soft(g.ellipse_sd(nx_, ny_, nr, nr * 0.95, 0))
    halo = g.soft(g.ellipse_sd(nx_ - 3.4 * math.cos(th), ny_ - 3.4 * math.sin(th), 1.8, 1.4, th))
    c = g.new()
    c[_BASO] = cyto * 1.7 * (1 - 0.6 * halo)
    c[_NUC] = nuc * 1.2 * _chromatin(g, 0.1, 0.45)  # clock-face chromatin
    return c


def _cell_monocyte(g: _Grid) -> F64:
    rng = g.rng
    cyto = _cytoplasm(g, rng.uniform(7.5, 9.0), 0.07)
    th = rng.uniform(0, 2 * np.pi)
    a, b = rng.uniform(4.2, 5.0), rng.uniform(3.2, 3.8)
    sd = g.ellipse_sd(0.6 * math.cos(th), 0.6 * math.sin(th), a, b, th + np.pi / 2)
    ix, iy = -3.0 * math.cos(th), -3.0 * math.sin(th)
    sd = np.maximum(sd, -(np.hypot(g.x - ix, g.y - iy) - rng.uniform(1.4, 2.0)))
    vac = np.zeros((g.n, g.n))
    for _ in range(int(rng.integers(0, 5))):
        v = rng.uniform(-6, 6, 2)
        vac = np.maximum(vac, g.soft(np.hypot(g.x - v[0], g.y - v[1]) - rng.uniform(0.4, 0.9)))
    c = g.new()
    c[_BASO] = cyto * 0.45 * (1 - 0.8 * vac)
    c[_EOS] = cyto * 0.14 * (1 - 0.8 * vac)
    c[_NUC] = g.soft(sd) * 0.75 * _chromatin(g, 0.25, 0.1)
    return c


def _cell_smudge(g: _Grid) -> F64:
    """A smudge (basket) cell: a crushed nucleus smeared into shapeless, streaky chromatin."""
    rng = g.rng
    r = rng.uniform(5.5, 8.0)
    th = rng.uniform(0, np.pi)
    sd = g.ellipse_sd(0, 0, r * rng.uniform(1.1, 1.5), r * rng.uniform(0.6, 0.85), th)
    sd = sd + 1.6 * g.texture(1.2)  # ragged, frayed outline
    body = np.clip(0.5 - sd / (g.mpp * 3.0), 0.0, 1.0)
    # chromatin drawn out in strands along the smearing direction
    z = ndimage.gaussian_filter(
        g.rng.standard_normal((g.n, g.n)), (0.6 / g.mpp, 1.4 / g.mpp), mode="wrap")
    z = ndimage.rotate(z, math.degrees(th), reshape=False, mode="wrap")
    z = z / max(float(z.std()), 1e-9)
    strands = np.clip(1.0 + 0.3 * z + 0.15 * g.texture(0.4), 0.2, 2.0)
    c = g.new()
    c[_NUC] = body * 1.05 * strands
    c[_BASO] = body * 0.25
    return c


def _cell_macrophage(g: _Grid) -> F64:
    """The pale, vacuolated central macrophage of an erythroid island."""
    rng = g.rng
    r = rng.uniform(11.0, 14.0)
    cyto = _cytoplasm(g, r, 0.1)
    vac = np.zeros((g.n, g.n))
    for _ in range(int(rng.integers(4, 10))):
        v = rng.uniform(-0.7 * r, 0.7 * r, 2)
        vac = np.maximum(vac, g.soft(np.hypot(g.x - v[0], g.y - v[1]) - rng.uniform(0.6, 1.6)))
    th = rng.uniform(0, 2 * np.pi)
    nuc = g.soft(g.ellipse_sd(2.0 * math.cos(th), 2.0 * math.sin(th), 4.2, 3.0, th))
    c = g.new()
    c[_EOS] = cyto * 0.3 * (1 - 0.8 * vac)
    c[_BASO] = cyto * 0.16 * (1 - 0.8 * vac)
    c[_NUC] = nuc * 0.6 * _chromatin(g, 0.2, 0.2) + 0.35 * g.dots(cyto, 0.02, 0.6) * cyto
    return c


def _cell_megakaryocyte(g: _Grid) -> F64:
    rng = g.rng
    r = rng.uniform(20.0, 30.0)
    cyto = _cytoplasm(g, r, 0.08)
    sd = np.full((g.n, g.n), np.inf)
    n_lobes = int(rng.integers(6, 12))
    for _ in range(n_lobes):
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.32) * r
        lr = rng.uniform(0.22, 0.32) * r
        sd = np.minimum(
            sd,
            g.ellipse_sd(
                dist * math.cos(ang), dist * math.sin(ang), lr, lr * rng.uniform(0.6, 0.9),
                rng.uniform(0, np.pi),
            ),
        )
    gran = np.clip(1 + 0.45 * g.texture(0.35), 0.2, 2.5)
    c = g.new()
    c[_EOS] = cyto * 0.62 * gran
    c[_BASO] = cyto * 0.18
    c[_NUC] = g.soft(sd) * 0.95 * _chromatin(g, 0.18, 0.3)
    return c


# Name, builder, half-size in µm, relative frequency among normal nucleated cells.
_NORMAL_TYPES: tuple[tuple[str, Callable[[_Grid], F64], float, float], ...] = (
    ("neutrophil", _cell_neutrophil, 7.2, 0.13),
    ("band", _cell_band, 7.2, 0.10),
    ("metamyelocyte", _cell_metamyelocyte, 7.6, 0.09),
    ("myelocyte", _cell_myelocyte, 8.6, 0.11),
    ("promyelocyte", _cell_promyelocyte, 10.0, 0.035),
    ("blast", _cell_blast, 8.5, 0.012),
    ("eosinophil", _cell_eosinophil, 7.4, 0.03),
    ("normoblast_basophilic", _cell_ebl_basophilic, 7.9, 0.03),
    ("normoblast_polychromatic", _cell_ebl_polychromatic, 6.2, 0.13),
    ("normoblast_orthochromatic", _cell_ebl_orthochromatic, 5.0, 0.09),
    ("lymphocyte", _cell_lymphocyte, 5.4, 0.14),
    ("plasma_cell", _cell_plasma, 7.6, 0.012),
    ("monocyte", _cell_monocyte, 9.6, 0.03),
)
_N_VARIANTS = 16
_N_RBC_VARIANTS = 32
_RBC_HALF_UM = 4.6
_MEGA_HALF_UM = 33.0
_SMUDGE_HALF_UM = 13.0
_MACRO_HALF_UM = 16.0


@dataclass(frozen=True)
class _Bank:
    """Cached sprites for one (mpp, blur): read-only arrays, channels first."""

    rbc: F32  # (V, n, n), haemoglobin only, sorted from thick-area to thin-area look
    rbc_half: int
    normal: tuple[tuple[F32, ...], ...]  # per _NORMAL_TYPES entry, variants (K, n, n)
    normal_r: F64  # (types, variants) cell radius in µm
    normal_cum: F64  # cumulative type frequencies
    normal_margin_um: float
    lymph_large: tuple[F32, ...]
    smudge: tuple[F32, ...]
    macrophage: tuple[F32, ...]
    mega: tuple[F32, ...]
    mega_r: F64
    mega_margin_um: float


def _radius_um(sprite: F32, mpp: float) -> float:
    covered = float((sprite.sum(axis=0) > 0.05).sum())
    return math.sqrt(covered / math.pi) * mpp


def _finish(sprite: F64, blur_px: float) -> F32:
    if blur_px > 0.05:
        sprite = ndimage.gaussian_filter(sprite, (0, blur_px, blur_px), mode="constant")
    out = np.ascontiguousarray(sprite, dtype=np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _bank(mpp: float, blur_um: float) -> _Bank:
    """Draw all sprites for one resolution and focus blur (fixed internal seed)."""
    rng = np.random.default_rng(0x5EA5)
    blur_px = blur_um / mpp
    pad = 3.0 * blur_um + 1.5 * mpp
    levels = (np.arange(_N_RBC_VARIANTS) + 0.5) / _N_RBC_VARIANTS
    rbc = np.stack(
        [_finish(_cell_rbc(_Grid(_RBC_HALF_UM + pad, mpp, rng), float(lv)), blur_px)[_HB]
         for lv in levels]
    )
    rbc.flags.writeable = False
    normal = tuple(
        tuple(_finish(build(_Grid(half + pad, mpp, rng)), blur_px) for _ in range(_N_VARIANTS))
        for _, build, half, _ in _NORMAL_TYPES
    )
    freq = np.array([f for *_, f in _NORMAL_TYPES])
    large = tuple(
        _finish(_cell_lymphocyte(_Grid(6.6 + pad, mpp, rng), large=True), blur_px)
        for _ in range(_N_VARIANTS // 2)
    )
    mega = tuple(_finish(_cell_megakaryocyte(_Grid(_MEGA_HALF_UM + pad, mpp, rng)), blur_px)
                 for _ in range(4))
    return _Bank(
        rbc=rbc,
        rbc_half=rbc.shape[1] // 2,
        normal=normal,
        normal_r=np.array([[_radius_um(v, mpp) for v in t] for t in normal]),
        normal_cum=np.cumsum(freq) / freq.sum(),
        normal_margin_um=max(h for _, _, h, _ in _NORMAL_TYPES) + pad,
        lymph_large=large,
        smudge=tuple(_finish(_cell_smudge(_Grid(_SMUDGE_HALF_UM + pad, mpp, rng)), blur_px)
                     for _ in range(_N_VARIANTS // 2)),
        macrophage=tuple(_finish(_cell_macrophage(_Grid(_MACRO_HALF_UM + pad, mpp, rng)), blur_px)
                         for _ in range(4)),
        mega=mega,
        mega_r=np.array([_radius_um(v, mpp) for v in mega]),
        mega_margin_um=_MEGA_HALF_UM + pad,
    )


# --------------------------------------------------------------------------
# Smear density
# --------------------------------------------------------------------------
def _smoothstep(x: F64) -> F64:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smear_density_map(
    width_um: float,
    height_um: float,
    rng: np.random.Generator,
    *,
    resolution_um: float = 50.0,
) -> F32:
    """A low-resolution map of smear thickness in [0, 1] for a whole slide.

    The smear is spread from left to right: a thick body starting near the
    left edge, thinning along the slide into a feathered, tongue-shaped tail,
    with streaks along the spreading direction and patches, and bare glass
    (0) along the top and bottom margins and beyond the tail. About 0.5 is a
    monolayer of red cells (the reading area), 1 a thick area of overlapping
    cells.

    Value ``[i, j]`` is the thickness at ``x = j * resolution_um``,
    ``y = i * resolution_um`` (slide microns); pass the same ``resolution_um``
    to :func:`render_field` as ``density_resolution_um`` (or pass the slide's
    size as ``slide_size_um``). The shape is
    ``(ceil(height_um / resolution_um) + 1, ceil(width_um / resolution_um) + 1)``.
    """
    if not (width_um > 0 and height_um > 0 and resolution_um > 0):
        raise InputError("smear_density_map: sizes and resolution must be positive.")
    nx = math.ceil(width_um / resolution_um) + 1
    ny = math.ceil(height_um / resolution_um) + 1
    x = np.asarray((np.arange(nx) * resolution_um / width_um)[None, :], dtype=np.float64)
    y = np.asarray((np.arange(ny) * resolution_um / height_um)[:, None], dtype=np.float64)

    def noise(shape: tuple[int, int], sig: tuple[float, float]) -> F64:
        z: F64 = ndimage.gaussian_filter(rng.standard_normal(shape), sig, mode="reflect")
        return z / max(float(z.std()), 1e-9)

    edge_noise = noise((2, nx), (0, max(1.0, 0.08 * nx)))
    top = rng.uniform(0.05, 0.12) + 0.015 * edge_noise[0][None, :]
    bottom = 1.0 - rng.uniform(0.05, 0.12) + 0.015 * edge_noise[1][None, :]
    soft_y = max(0.025, 1.5 / ny)
    lateral = _smoothstep((y - top) / soft_y) * _smoothstep((bottom - y) / soft_y)
    yc = np.clip((y - top) / np.maximum(bottom - top, 1e-6), 0, 1)  # 0..1 across the smear
    start = rng.uniform(0.02, 0.07)
    tail = rng.uniform(0.8, 0.94) - rng.uniform(0.08, 0.18) * (2 * yc - 1) ** 2
    tail = tail + 0.02 * noise((ny, 1), (max(1.0, 0.06 * ny), 0))
    along = np.clip((x - start) / np.maximum(tail - start, 1e-3), 0, 1)
    soft_x = max(0.02, 1.5 / nx)
    body = _smoothstep((x - start) / soft_x) * (1.0 - _smoothstep((x - tail) / soft_x + 1.0))
    thickness = (1.02 - 0.78 * along**1.3) * (0.82 + 0.18 * np.sin(np.pi * yc))
    streaks = noise((ny, nx), (max(0.7, 0.015 * ny), max(1.0, 0.12 * nx)))
    patches = noise((ny, nx), (max(1.0, 0.05 * ny), max(1.0, 0.05 * nx)))
    d = thickness * lateral * body * (1.0 + 0.13 * streaks + 0.12 * patches)
    dmap: F32 = np.clip(d, 0.0, 1.0).astype(np.float32)
    return dmap


def _sample_density(
    dmap: F32 | None, res: tuple[float, float], x_um: F64, y_um: F64
) -> F64:
    """Bilinear density at points (clamped at the map's edges); res = (x, y) µm."""
    if dmap is None:
        return np.full(np.shape(x_um), DEFAULT_DENSITY)
    ny, nx = dmap.shape
    fx = np.clip(x_um / res[0], 0, nx - 1)
    fy = np.clip(y_um / res[1], 0, ny - 1)
    x0 = np.minimum(fx.astype(np.int64), max(nx - 2, 0))
    y0 = np.minimum(fy.astype(np.int64), max(ny - 2, 0))
    x1 = np.minimum(x0 + 1, nx - 1)
    y1 = np.minimum(y0 + 1, ny - 1)
    tx, ty = fx - x0, fy - y0
    d = dmap.astype(np.float64)
    top = d[y0, x0] * (1 - tx) + d[y0, x1] * tx
    bot = d[y1, x0] * (1 - tx) + d[y1, x1] * tx
    out: F64 = top * (1 - ty) + bot * ty
    return out


def _interp_matrix(coords: F64, n: int) -> tuple[F64, int]:
    """Dense linear-interpolation weights onto a sub-range of ``n`` samples."""
    f = np.clip(coords, 0, n - 1)
    lo = math.floor(float(f.min()))
    hi = min(math.floor(float(f.max())) + 1, n - 1)
    m = np.zeros((f.size, hi - lo + 1))
    i0 = np.minimum(np.floor(f).astype(np.int64), hi) - lo
    i1 = np.minimum(i0 + 1, hi - lo)
    t = f - np.floor(f)
    rows = np.arange(f.size)
    np.add.at(m, (rows, i0), 1 - t)
    np.add.at(m, (rows, i1), t)
    return m, lo


def _density_field(
    dmap: F32 | None,
    res: tuple[float, float],
    gx0: int,
    gy0: int,
    w: int,
    h: int,
    mpp: float,
) -> F32 | float:
    """Density at every pixel centre of a field (separable bilinear)."""
    if dmap is None:
        return DEFAULT_DENSITY
    ny, nx = dmap.shape
    xs = np.asarray((gx0 + np.arange(w) + 0.5) * mpp / res[0], dtype=np.float64)
    ys = np.asarray((gy0 + np.arange(h) + 0.5) * mpp / res[1], dtype=np.float64)
    wx, x_lo = _interp_matrix(xs, nx)
    wy, y_lo = _interp_matrix(ys, ny)
    sub = dmap[y_lo : y_lo + wy.shape[1], x_lo : x_lo + wx.shape[1]].astype(np.float64)
    return (wy @ sub @ wx.T).astype(np.float32)


# --------------------------------------------------------------------------
# Clusters: layouts in microns (from the cluster's own fields) and tumour pixels
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    xy: F64  # (n, 2) centres in slide µm
    layer: NDArray[np.int64]  # 0 = flat on the glass, 1+ piled on top
    ra: F64  # nucleus semi-axes (µm) and orientation
    rb: F64
    theta: F64
    intensity: F64
    variant: NDArray[np.int64]  # sprite variant (lymphoid) / unused (tumour)
    orient: NDArray[np.int64]  # sprite orientation 0-7 (lymphoid)
    rosettes: F64  # (m, 3): centre x, y and core radius in µm
    footprint_um: float  # radius around the centre that the clump covers


def _cluster_rng(cluster: Cluster) -> np.random.Generator:
    raw = struct.pack(
        "<dddq8sq", cluster.x_um, cluster.y_um, cluster.radius_um, int(cluster.n_cells),
        cluster.kind.encode()[:8], int(cluster.seed),
    )
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _hex_lattice(rng: np.random.Generator, spacing: float, extent: float) -> F64:
    k = math.ceil(float(extent / spacing)) + 2
    i, j = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1))
    pts = np.stack([(i + 0.5 * (j % 2)) * spacing, j * spacing * math.sqrt(3) / 2], -1)
    pts = pts.reshape(-1, 2) + rng.uniform(-0.5, 0.5, 2) * spacing
    rot = rng.uniform(0, np.pi)
    c, s = math.cos(rot), math.sin(rot)
    out: F64 = pts @ np.array([[c, s], [-s, c]])
    return out


def _outline(rng: np.random.Generator, radius: float) -> Callable[[F64], F64]:
    amps = rng.normal(0, [0.0, 0.0, 0.16, 0.1, 0.07])
    phases = rng.uniform(0, 2 * np.pi, 5)

    def r_of(theta: F64) -> F64:
        r = np.ones_like(theta)
        for k in range(2, 5):
            r = r + amps[k] * np.cos(k * theta + phases[k])
        return radius * np.clip(r, 0.6, 1.4)

    return r_of


# Look-alike clumps: cell radius (µm), spacing / diameter, jitter, looseness.
_LOOKALIKE_GEOMETRY: dict[str, tuple[float, float, float, float]] = {
    "lymphoid": (4.6, 1.0, 0.12, 0.25),
    "erythroid": (4.4, 1.02, 0.1, 0.15),
    "monocytic": (7.6, 0.95, 0.12, 0.25),
    "smudge": (6.0, 1.05, 0.2, 0.35),
}
# Share of a look-alike clump's cells drawn as its second type (see _layout).
_LOOKALIKE_SECOND = {"lymphoid": 0.12, "erythroid": 0.4, "monocytic": 0.0, "smudge": 0.55}
_MACRO_HOLE_UM = 8.0  # the central macrophage of an erythroid island
# Nuclear stain of look-alike cells relative to the same cells scattered in
# the marrow: a clump of them is as dark as a tumour clump (calibrated with
# :func:`cells_for_dark_area`'s table).
_LOOKALIKE_NUC = {"lymphoid": 0.9, "erythroid": 0.85, "monocytic": 1.7, "smudge": 1.05}


@functools.lru_cache(maxsize=256)
def _layout(cluster: Cluster) -> _Layout:
    rng = _cluster_rng(cluster)
    n = int(cluster.n_cells)
    kind = cluster.kind
    if kind == "tumour":
        r_mean = rng.uniform(3.9, 4.7)
        spacing = 2 * r_mean * 0.86  # nuclei overlap a little: moulding
        jitter = 0.17
    else:
        # round cells, touching at most: no moulding
        r_mean, gap, jitter, _ = _LOOKALIKE_GEOMETRY[kind]
        spacing = 2 * r_mean * gap
    r_of = _outline(rng, cluster.radius_um)
    hole = _MACRO_HOLE_UM if kind == "erythroid" else 0.0
    # fill the outline on the glass first, then pile up (up to 3 more layers,
    # each a little smaller), and only then spill outwards on the glass
    n_layers = 4 if cluster.kind == "tumour" else 1
    pts, layer, score = [], [], []
    for level in range(n_layers):
        p = _hex_lattice(rng, spacing, cluster.radius_um * 1.7 + spacing)
        p = p + rng.normal(0, jitter * spacing, p.shape)
        rho = np.hypot(p[:, 0], p[:, 1])
        sc = rho / r_of(np.arctan2(p[:, 1], p[:, 0]))
        if kind != "tumour":
            sc = sc + rng.uniform(0, _LOOKALIKE_GEOMETRY[kind][3], sc.size)  # loose, gappy
        else:
            sc = sc + rng.uniform(0, 0.12, sc.size)
        if hole:
            sc = np.where(rho < hole, 99.0, sc)  # the macrophage's place
        if level == 0:
            keep = sc < 1.7
            sc = np.where(sc < 1.0, sc, 10.0 + sc)
        else:
            keep = sc < 1.0 - 0.08 * level
            sc = sc + level
        pts.append(p[keep])
        layer.append(np.full(int(keep.sum()), level))
        score.append(sc[keep])
    p_all = np.concatenate(pts)
    l_all = np.concatenate(layer)
    s_all = np.concatenate(score)

    rosettes = np.zeros((0, 3))
    if cluster.kind == "tumour" and n >= 18 and rng.random() < 0.65:
        n_ros = 1 + int(n >= 60 and rng.random() < 0.5)
        rs = []
        for _ in range(n_ros):
            ang = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0, 0.45) * min(cluster.radius_um, math.sqrt(n) * spacing * 0.5)
            core = rng.uniform(3.5, 6.5)
            cx, cy = dist * math.cos(ang), dist * math.sin(ang)
            ring_r = core + r_mean * 0.95
            m = max(6, int(2 * np.pi * ring_r / (2 * r_mean * 0.9)))
            a = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(m) / m
            ring = np.stack([cx + ring_r * np.cos(a), cy + ring_r * np.sin(a)], -1)
            away = np.hypot(p_all[:, 0] - cx, p_all[:, 1] - cy) > ring_r + r_mean * 0.8
            p_all, l_all, s_all = p_all[away], l_all[away], s_all[away]
            p_all = np.concatenate([ring, p_all])
            l_all = np.concatenate([np.zeros(m, np.int64), l_all])
            s_all = np.concatenate([np.full(m, -1.0), s_all])  # rosette cells are kept
            rs.append((cx, cy, core))
        rosettes = np.array(rs)

    order = np.argsort(s_all, kind="stable")[:n]
    if order.size < n:  # a tiny radius: pile the rest on top, spiralling out
        extra = n - order.size
        k = np.arange(extra)
        spiral = k * 2.39996
        rad = spacing * 0.6 * np.sqrt(k + 1)
        p_all = np.concatenate([p_all, np.stack([rad * np.cos(spiral), rad * np.sin(spiral)], -1)])
        l_all = np.concatenate([l_all, 1 + (k % 3)])
        order = np.concatenate([order, np.arange(p_all.shape[0] - extra, p_all.shape[0])])
    xy = p_all[order].copy()
    lay = l_all[order].astype(np.int64)
    # in a rosette, nuclei are elongated radially and pushed outwards
    theta = rng.uniform(0, np.pi, n)
    ra = r_mean * rng.uniform(0.84, 1.2, n)
    rb = ra / rng.uniform(1.0, 1.3, n)
    for rx, ry, _ in rosettes:
        d = np.hypot(xy[:, 0] - rx, xy[:, 1] - ry)
        on_ring = d < rosettes[:, 2].max() + 1.5 * r_mean
        theta[on_ring] = np.arctan2(xy[on_ring, 1] - ry, xy[on_ring, 0] - rx)
        ra[on_ring] = r_mean * rng.uniform(1.05, 1.2, int(on_ring.sum()))
        rb[on_ring] = r_mean * rng.uniform(0.75, 0.88, int(on_ring.sum()))
    if cluster.kind == "tumour" and n >= 8:  # a few cells drift off the clump
        rho = np.hypot(xy[:, 0], xy[:, 1])
        outer = np.argsort(-rho)[: max(1, n // 12)]
        push = 1 + rng.uniform(0.2, 0.9, outer.size) * spacing / np.maximum(rho[outer], 1e-6)
        xy[outer] *= push[:, None]
        lay[outer] = 0
    xy = xy + np.array([cluster.x_um, cluster.y_um])
    if cluster.kind == "tumour":
        intensity = rng.uniform(0.88, 1.12, n)
        variant = np.zeros(n, np.int64)
    else:
        intensity = np.ones(n)
        # negative variants: the kind's second cell type (1 in 8 lymphoid cells
        # is a larger, activated lymphocyte; erythroid islands mix polychromatic
        # and orthochromatic normoblasts; smudge groups keep some intact lymphocytes)
        variant = np.where(
            rng.random(n) < _LOOKALIKE_SECOND[kind],
            -1 - rng.integers(0, _N_VARIANTS // 2, n),
            rng.integers(0, _N_VARIANTS, n),
        )
    orient = rng.integers(0, 8, n)
    rosettes_abs = rosettes.copy()
    if rosettes_abs.size:
        rosettes_abs[:, :2] += np.array([cluster.x_um, cluster.y_um])
    d = np.hypot(xy[:, 0] - cluster.x_um, xy[:, 1] - cluster.y_um)
    footprint = float(np.quantile(d, 0.8)) + r_mean * 0.6 if n > 1 else r_mean
    for arr in (xy, lay, ra, rb, theta, intensity, variant, orient, rosettes_abs):
        arr.flags.writeable = False
    return _Layout(xy, lay, ra, rb, theta, intensity, variant, orient, rosettes_abs, footprint)


# Dark nuclear area (µm² with red OD >= 0.35 above the glass) that one cell of
# each kind adds to a field, measured on clumps of 6 to 80 cells (see
# tests/test_smear.py): the generator sizes clumps by dark area, so that a
# look-alike clump is as dark as a tumour clump of the same area.
_DARK_UM2_PER_CELL = {
    "tumour": 40.8, "lymphoid": 39.0, "erythroid": 21.6, "monocytic": 42.5, "smudge": 72.6,
}


def cells_for_dark_area(kind: str, area_um2: float) -> tuple[int, float]:
    """``(n_cells, radius_um)`` of a ``kind`` clump whose dark nuclear area is ``area_um2``.

    The radius lets the cells lie side by side on the glass (tumour nuclei
    moulded against each other, look-alike cells touching at most), without
    piling up.
    """
    if kind not in CLUSTER_KINDS:
        raise InputError(f"cluster kind must be one of {', '.join(CLUSTER_KINDS)}, not {kind!r}.")
    n = max(1, round(float(area_um2) / _DARK_UM2_PER_CELL[kind]))
    if kind == "tumour":
        radius = math.sqrt(n * 48.0 / (0.7 * math.pi))
    else:
        r_cell, gap, _, _ = _LOOKALIKE_GEOMETRY[kind]
        site = (2 * r_cell * gap) ** 2 * math.sqrt(3) / 2
        hole = math.pi * _MACRO_HOLE_UM**2 if kind == "erythroid" else 0.0
        radius = 1.1 * math.sqrt((n * site + hole) / math.pi)
    return n, max(radius, 3.0)


def cluster_cell_centres(cluster: Cluster) -> F64:
    """The centres (slide µm, shape ``(n_cells, 2)``) of the cells drawn for a cluster."""
    return _layout(cluster).xy


def tumour_boxes(
    clusters: Sequence[Cluster],
    mpp: float,
    *,
    image_size: tuple[int, int] | None = None,
) -> list[tuple[int, int, int, int]]:
    """Level-0 pixel boxes ``(x, y, width, height)`` around drawn tumour cells.

    One box per tumour cluster, in the order given (look-alike clusters are
    skipped), enclosing every tumour nucleus and its rim of cytoplasm at
    resolution ``mpp``. With ``image_size=(width, height)`` boxes are clipped
    to the image and boxes wholly outside it are dropped.
    """
    return [box for _, box in _boxes(clusters, mpp, ("tumour",), image_size)]


def lookalike_boxes(
    clusters: Sequence[Cluster],
    mpp: float,
    *,
    image_size: tuple[int, int] | None = None,
) -> list[tuple[str, int, int, int, int]]:
    """``(kind, x, y, width, height)`` around each benign look-alike clump
    (as :func:`tumour_boxes`)."""
    return [(kind, *box) for kind, box in _boxes(clusters, mpp, LOOKALIKE_KINDS, image_size)]


# Outer radius (µm) of a look-alike clump's cells around their centres, and
# of the erythroid island's central macrophage.
_LOOKALIKE_EXTENT = {"lymphoid": 6.8, "erythroid": 6.2, "monocytic": 9.4, "smudge": 12.5}
_MACRO_EXTENT_UM = 14.5


def _boxes(
    clusters: Sequence[Cluster], mpp: float, kinds: Sequence[str],
    image_size: tuple[int, int] | None,
) -> list[tuple[str, tuple[int, int, int, int]]]:
    if mpp <= 0:
        raise InputError(f"mpp must be positive, not {mpp}.")
    out: list[tuple[str, tuple[int, int, int, int]]] = []
    for cl in clusters:
        if cl.kind not in kinds:
            continue
        lay = _layout(cl)
        r = float(lay.ra.max()) + 1.0 if cl.kind == "tumour" else _LOOKALIKE_EXTENT[cl.kind]
        xs0, ys0 = float(lay.xy[:, 0].min()) - r, float(lay.xy[:, 1].min()) - r
        xs1, ys1 = float(lay.xy[:, 0].max()) + r, float(lay.xy[:, 1].max()) + r
        if cl.kind == "erythroid":
            m = _MACRO_EXTENT_UM
            xs0, ys0 = min(xs0, cl.x_um - m), min(ys0, cl.y_um - m)
            xs1, ys1 = max(xs1, cl.x_um + m), max(ys1, cl.y_um + m)
        x0, y0 = math.floor(xs0 / mpp), math.floor(ys0 / mpp)
        x1, y1 = math.ceil(xs1 / mpp), math.ceil(ys1 / mpp)
        if image_size is not None:
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(x1, image_size[0]), min(y1, image_size[1])
            if x1 <= x0 or y1 <= y0:
                continue
        out.append((cl.kind, (x0, y0, x1 - x0, y1 - y0)))
    return out


@functools.lru_cache(maxsize=24)
def _tumour_pixels(cluster: Cluster, mpp: float, blur_um: float) -> tuple[int, int, F32]:
    """A tumour clump's concentrations on its own global-pixel box.

    Returns ``(gx0, gy0, conc)`` with ``conc`` of shape ``(K, h, w)``. Nuclei
    are a weighted Voronoi partition of the clump (each pixel belongs to the
    nucleus it is nearest to, relative to that nucleus's size), layer by layer,
    so touching nuclei flatten against each other with a thin pale seam.
    """
    lay = _layout(cluster)
    rng = _cluster_rng(cluster)
    rmax = float(lay.ra.max())
    margin = rmax * 0.7 + 2.0 + 3 * blur_um
    gx0 = math.floor((float(lay.xy[:, 0].min()) - rmax - margin) / mpp)
    gy0 = math.floor((float(lay.xy[:, 1].min()) - rmax - margin) / mpp)
    gx1 = math.ceil((float(lay.xy[:, 0].max()) + rmax + margin) / mpp)
    gy1 = math.ceil((float(lay.xy[:, 1].max()) + rmax + margin) / mpp)
    h, w = gy1 - gy0, gx1 - gx0
    conc = np.zeros((_K, h, w))
    ys_um = (gy0 + np.arange(h) + 0.5) * mpp
    xs_um = (gx0 + np.arange(w) + 0.5) * mpp

    def tex(sig_um: tuple[float, float]) -> F64:
        z: F64 = ndimage.gaussian_filter(
            rng.standard_normal((h, w)), (max(sig_um[0] / mpp, 0.35), max(sig_um[1] / mpp, 0.35))
        )
        return z / max(float(z.std()), 1e-9)

    fine = tex((0.3, 0.3))
    clumped = tex((0.6, 0.6))
    # fibrils: the zero lines of smooth noise are thin wavy threads
    fibrils = np.exp(-((tex((0.7, 0.7)) / 0.35) ** 2))
    fibrils += 0.6 * np.exp(-((tex((0.4, 0.4)) / 0.3) ** 2))
    chrom = np.clip(1 + 0.22 * fine + 0.12 * clumped, 0.3, 2.0)
    gap_um = 0.22
    covered = np.zeros((h, w))
    for layer_id in np.unique(lay.layer):
        idx = np.nonzero(lay.layer == layer_id)[0]
        d1 = np.full((h, w), np.inf)
        d2 = np.full((h, w), np.inf)
        owner = np.full((h, w), -1, dtype=np.int64)
        for k in idx:
            cx, cy = float(lay.xy[k, 0]), float(lay.xy[k, 1])
            reach = float(lay.ra[k]) * 1.7 + 1.0
            c0 = max(0, math.floor((cx - reach) / mpp) - gx0)
            c1 = min(w, math.ceil((cx + reach) / mpp) - gx0)
            r0 = max(0, math.floor((cy - reach) / mpp) - gy0)
            r1 = min(h, math.ceil((cy + reach) / mpp) - gy0)
            dx = xs_um[None, c0:c1] - cx
            dy = ys_um[r0:r1, None] - cy
            c, s = math.cos(float(lay.theta[k])), math.sin(float(lay.theta[k]))
            u = (dx * c + dy * s) / float(lay.ra[k])
            v = (-dx * s + dy * c) / float(lay.rb[k])
            dn = np.sqrt(u * u + v * v)
            w1 = d1[r0:r1, c0:c1]
            w2 = d2[r0:r1, c0:c1]
            wo = owner[r0:r1, c0:c1]
            nearer = dn < w1
            np.copyto(w2, np.where(nearer, w1, np.minimum(w2, dn)))
            np.copyto(w1, np.where(nearer, dn, w1))
            np.copyto(wo, np.where(nearer, k, wo))
        has = owner >= 0
        own = np.where(has, owner, 0)
        r_um = np.sqrt(lay.ra[own] * lay.rb[own])
        d1f = np.where(has, d1, 9.0)
        d2f = np.where(np.isfinite(d2), d2, 9.0)
        seam = np.clip(((d2f - d1f) * r_um * 0.5 - gap_um) / mpp + 0.5, 0, 1)
        nucleus = np.clip((1 - d1f) * r_um / mpp + 0.5, 0, 1) * (0.45 + 0.55 * seam)
        cyto = np.clip(((1 - d1f) * r_um + 1.1) / mpp + 0.5, 0, 1)
        cyto *= np.clip(((d2f - d1f) * r_um * 0.5 - 0.1) / mpp + 0.5, 0, 1)
        conc[_NUC] += nucleus * lay.intensity[own] * 1.25 * chrom
        conc[_BASO] += nucleus * 0.6 + cyto * (1 - nucleus) * 0.4
        covered = np.maximum(covered, np.clip(((1.55 - d1f) * r_um) / mpp, 0, 1))
    # fibrillary neuropil between the cells and in the rosette cores
    covered = ndimage.gaussian_filter(covered, 1.0 / mpp)
    neuropil = covered * 0.3
    for cx, cy, core in lay.rosettes:
        dist = np.hypot(xs_um[None, :] - cx, ys_um[:, None] - cy)
        neuropil = neuropil + 0.6 * np.clip((core + 1.0 - dist) / mpp + 0.5, 0, 1)
    conc[_EOS] += neuropil * (0.45 + 1.1 * fibrils)
    conc[_BASO] += neuropil * 0.15
    blur_px = blur_um / mpp
    if blur_px > 0.05:
        conc = ndimage.gaussian_filter(conc, (0, blur_px, blur_px), mode="constant")
    out = conc.astype(np.float32)
    out.flags.writeable = False
    return gx0, gy0, out


# --------------------------------------------------------------------------
# Noise and illumination
# --------------------------------------------------------------------------
_NOISE_PERIODS = (251, 241)


@functools.lru_cache(maxsize=8)
def _noise_textures(seed: int) -> tuple[F32, F32]:
    """Two noise tiles of coprime periods; their sum repeats every 60491 px."""
    rng = np.random.default_rng([seed & _MASK64, 0x4E01])
    a, b = (
        (rng.standard_normal((3, p, p), dtype=np.float32) * np.float32(math.sqrt(0.5)))
        for p in _NOISE_PERIODS
    )
    a.flags.writeable = False
    b.flags.writeable = False
    return a, b


def _add_periodic(img: F32, tex: F32, scale: float, gy0: int, gx0: int) -> None:
    """``img += scale * tex`` with ``tex`` repeated over global pixels (block copies)."""
    p = tex.shape[1]
    _, h, w = img.shape
    k = np.float32(scale)
    r = 0
    while r < h:
        tr = (gy0 + r) % p
        rn = min(h - r, p - tr)
        c = 0
        while c < w:
            tc = (gx0 + c) % p
            cn = min(w - c, p - tc)
            img[:, r : r + rn, c : c + cn] += k * tex[:, tr : tr + rn, tc : tc + cn]
            c += cn
        r += rn


def _illumination(
    style: CenterStyle, gx0: int, gy0: int, w: int, h: int, mpp: float
) -> F32:
    bg = np.array(style.background, dtype=np.float32)[:, None, None]
    if style.vignetting <= 0:
        return np.broadcast_to(bg, (3, h, w))
    if style.frame_um is None:
        fx = (np.arange(w) + 0.5) / w - 0.5
        fy = (np.arange(h) + 0.5) / h - 0.5
    else:
        fpx = style.frame_um / mpp
        fx = np.mod((gx0 + np.arange(w) + 0.5) / fpx, 1.0) - 0.5
        fy = np.mod((gy0 + np.arange(h) + 0.5) / fpx, 1.0) - 0.5
    # corners (|f| = 0.5, 0.5) are `vignetting` darker than the centre
    fall = (2 * fx[None, :] ** 2 + 2 * fy[:, None] ** 2).astype(np.float32)
    return bg * (1 - np.float32(style.vignetting) * fall)[None]


def _spectra(style: CenterStyle) -> F32:
    scale = np.full(_K, style.saturation)
    scale[[_NUC, _BASO]] *= style.azure_eosin
    scale[[_HB, _EOS]] /= style.azure_eosin
    eff = _SPECTRA * scale[:, None] / np.asarray(style.tint, dtype=np.float64)[None, :]
    if style.stain_rotation_deg:
        eff = eff @ _grey_axis_rotation(style.stain_rotation_deg).T
        eff = np.maximum(eff, 0.005)
    out: F32 = eff.T.astype(np.float32)  # (3, K)
    return out


def _grey_axis_rotation(degrees: float) -> F64:
    """Rotation matrix about the grey axis (1, 1, 1) of OD space (Rodrigues)."""
    k = np.ones(3) / math.sqrt(3.0)
    a = math.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot: F64 = np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * (kx @ kx)
    return rot


# --------------------------------------------------------------------------
# Cell placement on slide lattices
# --------------------------------------------------------------------------
def _lattice(
    seed: int,
    stream: int,
    spacing: float,
    phase: tuple[float, float],
    box: tuple[float, float, float, float],
    jitter: float,
    n_uniforms: int,
) -> tuple[F64, F64, F64]:
    """Jittered lattice sites inside ``box`` (x0, y0, x1, y1 µm), in global order.

    Returns positions ``x, y`` and per-site uniforms ``(n_uniforms, sites)``.
    A site's jitter and uniforms depend only on (seed, stream, its indices).
    """
    x0, y0, x1, y1 = box
    px, py = phase
    reach = jitter * spacing
    i = np.arange(math.floor((x0 - px - reach) / spacing) - 1,
                  math.ceil((x1 - px + reach) / spacing) + 1, dtype=np.int64)
    j = np.arange(math.floor((y0 - py - reach) / spacing) - 1,
                  math.ceil((y1 - py + reach) / spacing) + 1, dtype=np.int64)
    jg, ig = np.meshgrid(j, i, indexing="ij")
    ii, jj = ig.ravel(), jg.ravel()
    u = _site_uniforms(seed, stream, ii, jj, 2 + n_uniforms)
    x = (ii + 0.5) * spacing + px + (u[0] - 0.5) * 2 * reach
    y = (jj + 0.5) * spacing + py + (u[1] - 0.5) * 2 * reach
    keep = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    return x[keep], y[keep], u[2:, keep]


def _inside_footprints(
    x: F64, y: F64, footprints: Sequence[tuple[float, float, float, float]], u: F64
) -> NDArray[np.bool_]:
    """Which points a clump displaces (probability per footprint, decided by ``u``)."""
    out = np.zeros(x.shape, dtype=bool)
    for cx, cy, r, p in footprints:
        out |= ((x - cx) ** 2 + (y - cy) ** 2 < r * r) & (u < p)
    return out


def _splat(canvas: F32, sprite: F32, row: int, col: int) -> None:
    """Add a (K, n, n) sprite centred at canvas pixel (row, col), clipped."""
    _, h, w = canvas.shape
    n = sprite.shape[1]
    half = n // 2
    r0, c0 = row - half, col - half
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + n, h), min(c0 + n, w)
    if rr1 <= rr0 or cc1 <= cc0:
        return
    canvas[:, rr0:rr1, cc0:cc1] += sprite[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]


def _oriented(sprite: F32, t: int) -> F32:
    if t & 4:
        sprite = sprite.transpose(0, 2, 1)
    if t & 1:
        sprite = sprite[:, ::-1, :]
    if t & 2:
        sprite = sprite[:, :, ::-1]
    return sprite


_TYPE_INDEX = {t[0]: i for i, t in enumerate(_NORMAL_TYPES)}


def _lookalike_sprite(bank: _Bank, kind: str, v: int) -> F32:
    """The sprite of a look-alike clump's cell of variant ``v`` (see ``_LOOKALIKE_SECOND``)."""
    normal = bank.normal
    if kind == "lymphoid":
        return bank.lymph_large[-1 - v] if v < 0 else normal[_TYPE_INDEX["lymphocyte"]][v]
    if kind == "erythroid":
        if v < 0:
            return normal[_TYPE_INDEX["normoblast_orthochromatic"]][-1 - v]
        return normal[_TYPE_INDEX["normoblast_polychromatic"]][v]
    if kind == "monocytic":
        return normal[_TYPE_INDEX["monocyte"]][v]
    return bank.smudge[-1 - v] if v < 0 else normal[_TYPE_INDEX["lymphocyte"]][v]


# streams of the hash, one per cell population
_S_RBC = 11
_S_NUCLEATED = 23
_S_MEGA = 37
_RBC_SPACING = 8.0  # µm between lattice sites of one red-cell layer
_RBC_LAYERS = ((0.0, 0.0), (4.1, 2.5), (1.9, 5.3), (6.2, 6.6))
_RBC_COVER_PER_DENSITY = 1.3  # red-cell area per smear area at density 1
_NUCLEATED_SPACING = 16.0
_NUCLEATED_RATE = 0.2  # acceptance per site at density DEFAULT_DENSITY, cellularity 1
_MEGA_SPACING = 220.0
_MEGA_RATE = 0.05


def render_field(
    width: int,
    height: int,
    *,
    mpp: float,
    seed: int | np.random.Generator,
    style: CenterStyle,
    clusters: Sequence[Cluster] = (),
    cellularity: float = 1.0,
    smear_density: NDArray[np.floating] | None = None,
    density_resolution_um: float = 50.0,
    origin_um: tuple[float, float] = (0.0, 0.0),
    slide_size_um: tuple[float, float] | None = None,
) -> NDArray[np.uint8]:
    """Render one field (or one tile of a slide) as ``uint8`` RGB ``(height, width, 3)``.

    ``mpp`` is microns per pixel (0.5 for a 20x scan, about 0.3 for a
    microscope photograph at 40x). ``seed`` identifies the slide: an int, or
    a Generator from which one 63-bit seed is drawn (then two calls give
    different slides; to render a slide in tiles, draw the seed once and pass
    the same int to every tile). ``origin_um`` is the field's top-left corner
    on the slide, in microns; it is rounded to whole pixels. ``clusters`` and
    ``smear_density`` (from :func:`smear_density_map`, sampled every
    ``density_resolution_um``; None means a uniform reading-area thickness of
    :data:`DEFAULT_DENSITY`; outside the map its nearest edge value applies)
    are in slide coordinates; only the clusters that reach the field are
    drawn. With ``slide_size_um=(width, height)`` the density map is instead
    taken to span the slide exactly (first and last samples on its edges), and
    ``density_resolution_um`` is ignored; the difference from the sampling of
    :func:`smear_density_map` is under one map cell. ``cellularity``
    multiplies the density of normal nucleated cells (1: a normocellular
    aspirate, about 200 cells per 0.25 mm² of reading area; 0: red cells only;
    it saturates near 4).
    """
    if width < 1 or height < 1:
        raise InputError(f"field size must be positive, not {width} x {height}.")
    if not mpp > 0:
        raise InputError(f"mpp must be positive, not {mpp}.")
    if cellularity < 0:
        raise InputError(f"cellularity must be >= 0, not {cellularity}.")
    if density_resolution_um <= 0:
        raise InputError("density_resolution_um must be positive.")
    dmap: F32 | None = None
    res = (float(density_resolution_um), float(density_resolution_um))
    if smear_density is not None:
        dmap = np.asarray(smear_density, dtype=np.float32)
        if dmap.ndim != 2 or min(dmap.shape) < 1:
            raise InputError("smear_density must be a non-empty 2-D array.")
        if slide_size_um is not None:
            if not (slide_size_um[0] > 0 and slide_size_um[1] > 0):
                raise InputError(f"slide_size_um must be positive, not {slide_size_um}.")
            res = (
                slide_size_um[0] / max(dmap.shape[1] - 1, 1),
                slide_size_um[1] / max(dmap.shape[0] - 1, 1),
            )
    s = _seed_of(seed)
    mpp = float(mpp)
    bank = _bank(round(mpp, 6), round(float(style.blur_sigma_um), 4))
    gx0 = round(origin_um[0] / mpp)
    gy0 = round(origin_um[1] / mpp)
    m = bank.rbc.shape[1]
    canvas = np.zeros((_K, height + 2 * m, width + 2 * m), dtype=np.float32)
    cx0, cy0 = gx0 - m, gy0 - m  # global pixel of canvas (0, 0)
    fx0, fy0 = gx0 * mpp, gy0 * mpp  # field box in µm
    fx1, fy1 = (gx0 + width) * mpp, (gy0 + height) * mpp

    # clumps that reach the field displace red cells and normal cells
    near: list[Cluster] = []
    footprints: list[tuple[float, float, float, float]] = []
    feet_nuc: list[tuple[float, float, float, float]] = []
    for cl in clusters:
        lay = _layout(cl)
        reach = float(np.hypot(lay.xy[:, 0] - cl.x_um, lay.xy[:, 1] - cl.y_um).max()) + 40.0
        if (cl.x_um + reach < fx0 or cl.x_um - reach > fx1
                or cl.y_um + reach < fy0 or cl.y_um - reach > fy1):
            continue
        near.append(cl)
        tumour = cl.kind == "tumour"
        footprints.append((cl.x_um, cl.y_um, lay.footprint_um, 0.95 if tumour else 0.3))
        feet_nuc.append((cl.x_um, cl.y_um, lay.footprint_um + 4.0, 1.0 if tumour else 0.8))

    # nucleated cells first: where they lie, red cells are pushed aside. Cells
    # are listed as far out as they can push aside a red cell that reaches the
    # field, so that neighbouring tiles agree on every red cell.
    half = bank.rbc_half
    rbc_margin = (half + 1) * mpp
    sprites: list[tuple[F32, int, int]] = []  # sprite, canvas row, canvas col
    cell_x: list[F64] = []
    cell_y: list[F64] = []
    cell_r: list[F64] = []
    if cellularity > 0:
        nm = bank.normal_margin_um + rbc_margin
        box = (fx0 - nm, fy0 - nm, fx1 + nm, fy1 + nm)
        x, y, u = _lattice(s, _S_NUCLEATED, _NUCLEATED_SPACING, (0.0, 0.0), box, 0.5, 5)
        d = _sample_density(dmap, res, x, y)
        p = _NUCLEATED_RATE * cellularity * np.clip(d / DEFAULT_DENSITY, 0, 1.6) ** 1.2
        keep = u[0] < np.minimum(p, 0.9)
        if feet_nuc:
            keep &= ~_inside_footprints(x, y, feet_nuc, u[4])
        x, y, u = x[keep], y[keep], u[:, keep]
        types = np.minimum(
            np.searchsorted(bank.normal_cum, u[1], side="right"), len(bank.normal) - 1
        )
        var = (u[2] * _N_VARIANTS).astype(np.int64)
        orient = (u[3] * 8).astype(np.int64)
        rows = np.floor(y / mpp).astype(np.int64) - cy0
        cols = np.floor(x / mpp).astype(np.int64) - cx0
        for k in range(x.size):
            spr = _oriented(bank.normal[int(types[k])][int(var[k])], int(orient[k]))
            sprites.append((spr, int(rows[k]), int(cols[k])))
        cell_x.append(x)
        cell_y.append(y)
        cell_r.append(bank.normal_r[types, var])
        # megakaryocytes: rare, large
        mm = bank.mega_margin_um + rbc_margin
        box = (fx0 - mm, fy0 - mm, fx1 + mm, fy1 + mm)
        x, y, u = _lattice(s, _S_MEGA, _MEGA_SPACING, (37.0, 91.0), box, 0.45, 4)
        d = _sample_density(dmap, res, x, y)
        p = _MEGA_RATE * cellularity * np.clip(d / DEFAULT_DENSITY, 0, 1.6)
        keep = u[0] < np.minimum(p, 0.5)
        if feet_nuc:
            keep &= ~_inside_footprints(x, y, feet_nuc, u[3])
        x, y, u = x[keep], y[keep], u[:, keep]
        mv = (u[1] * len(bank.mega)).astype(np.int64)
        for k in range(x.size):
            spr = _oriented(bank.mega[int(mv[k])], int(u[2, k] * 8))
            sprites.append((spr, math.floor(y[k] / mpp) - cy0, math.floor(x[k] / mpp) - cx0))
        cell_x.append(x)
        cell_y.append(y)
        cell_r.append(bank.mega_r[mv])
    for cl in near:
        if cl.kind == "tumour":
            continue
        lay = _layout(cl)
        nuc = np.ones((_K, 1, 1), dtype=np.float32)
        nuc[_NUC] = _LOOKALIKE_NUC[cl.kind]
        scale = None if _LOOKALIKE_NUC[cl.kind] == 1.0 else nuc
        if cl.kind == "erythroid":
            mac = bank.macrophage[int(lay.orient[0]) % len(bank.macrophage)]
            sprites.append((_oriented(mac, int(lay.orient[-1])),
                            math.floor(cl.y_um / mpp) - cy0, math.floor(cl.x_um / mpp) - cx0))
        for k in range(lay.xy.shape[0]):
            spr = _lookalike_sprite(bank, cl.kind, int(lay.variant[k]))
            if scale is not None:
                spr = spr * scale
            sprites.append((_oriented(spr, int(lay.orient[k])),
                            math.floor(lay.xy[k, 1] / mpp) - cy0,
                            math.floor(lay.xy[k, 0] / mpp) - cx0))
        cell_x.append(lay.xy[:, 0])
        cell_y.append(lay.xy[:, 1])
        cell_r.append(np.full(lay.xy.shape[0], _LOOKALIKE_GEOMETRY[cl.kind][0] + 0.5))
    all_x = np.concatenate(cell_x) if cell_x else np.zeros(0)
    all_y = np.concatenate(cell_y) if cell_y else np.zeros(0)
    all_r = np.concatenate(cell_r) if cell_r else np.zeros(0)

    # red cells: several jittered lattice layers, filled according to thickness
    box = (fx0 - rbc_margin, fy0 - rbc_margin, fx1 + rbc_margin, fy1 + rbc_margin)
    tree = cKDTree(np.stack([all_x, all_y], -1)) if all_x.size else None
    layer_cover = math.pi * 3.75**2 / _RBC_SPACING**2
    hb = canvas[_HB]
    n_var = bank.rbc.shape[0]
    n = 2 * half + 1
    for li, phase in enumerate(_RBC_LAYERS):
        x, y, u = _lattice(s, _S_RBC + 100 * li, _RBC_SPACING, phase, box, 0.3, 4)
        d = _sample_density(dmap, res, x, y)
        p_fill = np.clip(d * _RBC_COVER_PER_DENSITY / layer_cover - li, 0.0, 1.0)
        keep = u[0] < p_fill
        if footprints:
            keep &= ~_inside_footprints(x, y, footprints, u[3])
        if tree is not None and keep.any():
            # within a nucleated cell's outline a red cell is kept 1 time in 8
            dist, idx = tree.query(np.stack([x, y], -1), k=3, distance_upper_bound=45.0)
            r_near = np.where(np.isfinite(dist), all_r[np.minimum(idx, all_r.size - 1)], 0.0)
            covered = (dist < r_near + 0.5).any(axis=1)
            keep &= ~(covered & (u[2] < 0.88))
        x, y, d, uv = x[keep], y[keep], d[keep], u[1, keep]
        level = np.clip(1.15 - 1.05 * d + 0.5 * (uv - 0.5), 0.0, 0.999)
        var = (level * n_var).astype(np.int64)
        rows = np.floor(y / mpp).astype(np.int64) - cy0 - half
        cols = np.floor(x / mpp).astype(np.int64) - cx0 - half
        for r, c, v in zip(rows.tolist(), cols.tolist(), var.tolist(), strict=True):
            hb[r : r + n, c : c + n] += bank.rbc[v]

    for spr, r, c in sprites:
        _splat(canvas, spr, r, c)
    for cl in near:
        if cl.kind == "tumour":
            tx0, ty0, conc = _tumour_pixels(cl, mpp, round(float(style.blur_sigma_um), 4))
            _, th, tw = conc.shape
            r0, c0 = ty0 - cy0, tx0 - cx0
            rr0, cc0 = max(r0, 0), max(c0, 0)
            rr1, cc1 = min(r0 + th, canvas.shape[1]), min(c0 + tw, canvas.shape[2])
            if rr1 > rr0 and cc1 > cc0:
                canvas[:, rr0:rr1, cc0:cc1] += conc[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]

    # stains -> light
    conc = np.ascontiguousarray(canvas[:, m : m + height, m : m + width])
    dens = _density_field(dmap, res, gx0, gy0, width, height, mpp)
    conc[_EOS] += np.float32(0.07) * dens  # plasma / protein film of the smear
    conc[_BASO] += np.float32(0.03) * dens
    od = _spectra(style) @ conc.reshape(_K, -1)
    np.exp(-od, out=od)
    img = od.reshape(3, height, width)
    img *= _illumination(style, gx0, gy0, width, height, mpp)
    if style.noise_sigma > 0:
        ta, tb = _noise_textures(s)
        _add_periodic(img, ta, style.noise_sigma, gy0, gx0)
        _add_periodic(img, tb, style.noise_sigma, gy0, gx0)
    img += np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    rgb = np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))
    if style.jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=style.jpeg_quality, subsampling=0)
        buf.seek(0)
        with Image.open(buf) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return rgb
