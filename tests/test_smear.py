"""Tests of the synthetic smear renderer: what a user of the demo would check."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from cmil_core.demo._smear import (
    LOOKALIKE_KINDS,
    PRESET_STYLES,
    CenterStyle,
    Cluster,
    cells_for_dark_area,
    cluster_cell_centres,
    lookalike_boxes,
    render_field,
    smear_density_map,
    tumour_boxes,
)
from cmil_core.errors import InputError

PLAIN = CenterStyle(name="plain", tint=(1.0, 1.0, 1.0), noise_sigma=3.0)
STYLE_A, STYLE_B, STYLE_C, _ = PRESET_STYLES


def dark_blue(img: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Hyperchromatic blue-purple nucleus pixels."""
    a = img.astype(np.int32)
    return (a.mean(axis=-1) < 110) & (a[..., 2] > a[..., 1] + 25)


def sky_blue(img: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pale sky-blue cytoplasm pixels (lymphocytes)."""
    a = img.astype(np.int32)
    return (a[..., 2] > a[..., 0] + 25) & (a[..., 1] > a[..., 0]) & (a.mean(axis=-1) > 140)


def test_shape_and_dtype() -> None:
    img = render_field(200, 150, mpp=0.5, seed=1, style=PLAIN)
    assert img.shape == (150, 200, 3)
    assert img.dtype == np.uint8
    assert img.flags.c_contiguous


def test_same_seed_same_bytes_and_different_seed_differs() -> None:
    clusters = [Cluster(60.0, 60.0, 25.0, "tumour", 30)]
    kw: dict[str, Any] = dict(mpp=0.5, style=STYLE_B, clusters=clusters)
    a = render_field(256, 256, seed=42, **kw)
    b = render_field(256, 256, seed=42, **kw)
    c = render_field(256, 256, seed=43, **kw)
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5
    # a Generator in the same state gives the same slide
    g1 = render_field(128, 128, mpp=0.5, seed=np.random.default_rng(7), style=PLAIN)
    g2 = render_field(128, 128, mpp=0.5, seed=np.random.default_rng(7), style=PLAIN)
    assert g1.tobytes() == g2.tobytes()


def test_tiles_join_seamlessly() -> None:
    mpp = 0.5
    dmap = smear_density_map(1200.0, 1200.0, np.random.default_rng(0))
    # clusters straddling the seams, a style with noise, blur, vignetting on a
    # slide-fixed frame grid and JPEG
    clusters = [
        Cluster(256.0, 240.0, 30.0, "tumour", 45, seed=1),
        Cluster(150.0, 260.0, 20.0, "lymphoid", 15),
        Cluster(256.0, 400.0, 15.0, "tumour", 12),
    ]
    origin = (100.0, 150.0)
    kw: dict[str, Any] = dict(
        mpp=mpp, seed=99, style=STYLE_B, clusters=clusters, smear_density=dmap
    )
    whole = render_field(1024, 1024, origin_um=origin, **kw)
    tiled = np.zeros_like(whole)
    for ty in (0, 512):
        for tx in (0, 512):
            tiled[ty : ty + 512, tx : tx + 512] = render_field(
                512, 512, origin_um=(origin[0] + tx * mpp, origin[1] + ty * mpp), **kw
            )
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3
    # and the seams actually have cells on them
    assert dark_blue(whole[:, 500:524]).any()


def test_tumour_cluster_is_dense_small_round_blue_cells() -> None:
    mpp = 0.5
    clusters = [Cluster(128.0, 128.0, 30.0, "tumour", 40, seed=3)]
    normal = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A)
    tumour = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A, clusters=clusters)
    (x, y, w, h), = tumour_boxes(clusters, mpp)
    in_box = dark_blue(tumour[y : y + h, x : x + w]).mean()
    baseline = dark_blue(normal).mean()
    assert in_box > 0.3
    assert in_box > 8 * baseline
    # the clump is darker and bluer than the same place without it
    t_mean = tumour[y : y + h, x : x + w].reshape(-1, 3).mean(axis=0)
    n_mean = normal[y : y + h, x : x + w].reshape(-1, 3).mean(axis=0)
    assert t_mean.sum() < n_mean.sum() - 100
    assert t_mean[2] - t_mean[0] > n_mean[2] - n_mean[0] + 20


def test_lymphoid_clumps_are_present_but_look_different() -> None:
    mpp = 0.5
    t_cl = [Cluster(128.0, 128.0, 30.0, "tumour", 40, seed=3)]
    l_cl = [Cluster(128.0, 128.0, 30.0, "lymphoid", 30, seed=3)]
    normal = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A)
    tumour = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A, clusters=t_cl)
    lymph = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A, clusters=l_cl)
    assert tumour_boxes(l_cl, mpp) == []  # look-alikes are not tumour ground truth
    (tx, ty, tw, th), = tumour_boxes(t_cl, mpp)
    xy = cluster_cell_centres(l_cl[0]) / mpp
    assert xy.shape == (30, 2)
    (lx0, ly0), (lx1, ly1) = (xy.min(0) - 10).astype(int), (xy.max(0) + 10).astype(int)
    t_box = tumour[ty : ty + th, tx : tx + tw]
    l_box = lymph[ly0:ly1, lx0:lx1]
    # present: many more nuclei than in a normal field ...
    assert dark_blue(l_box).mean() > 5 * dark_blue(normal).mean()
    # ... but less cohesive than tumour, with visible sky-blue cytoplasm
    assert dark_blue(l_box).mean() < 0.8 * dark_blue(t_box).mean()
    assert sky_blue(l_box).mean() > 2 * sky_blue(t_box).mean() + 0.02


def test_centres_look_different() -> None:
    means = [
        render_field(256, 256, mpp=0.5, seed=11, style=s).reshape(-1, 3).mean(axis=0)
        for s in PRESET_STYLES
    ]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 3, (i, j)
    # same field, different focus: the blurred centre has less fine detail
    sharp = render_field(256, 256, mpp=0.5, seed=11, style=PLAIN).astype(float)
    soft = render_field(
        256, 256, mpp=0.5, seed=11,
        style=CenterStyle(name="soft", tint=(1.0, 1.0, 1.0), noise_sigma=0.0, blur_sigma_um=1.0),
    ).astype(float)

    def detail(a: NDArray[np.float64]) -> float:
        return float(np.abs(np.diff(a.mean(axis=-1), axis=1)).mean())

    assert detail(soft) < 0.7 * detail(sharp)


def test_vignetting_darkens_corners() -> None:
    style = CenterStyle(name="v", tint=(1.0, 1.0, 1.0), noise_sigma=0.0, vignetting=0.2)
    glass = np.zeros((4, 4), dtype=np.float32)
    img = render_field(256, 256, mpp=0.5, seed=1, style=style, smear_density=glass).astype(float)
    centre = img[112:144, 112:144].mean()
    corner = img[:16, :16].mean()
    assert corner < centre * 0.87


def test_bare_glass_is_background() -> None:
    glass = np.zeros((8, 8), dtype=np.float32)
    for style in (PLAIN, STYLE_C):
        img = render_field(256, 256, mpp=0.5, seed=3, style=style, smear_density=glass)
        # the glass colour, give or take the noise and the vignetting
        bg = np.asarray(style.background, dtype=float)
        tol = 4 * style.noise_sigma + 2
        lo, hi = bg * (1 - style.vignetting) - tol, bg + tol
        near = np.all((img >= lo) & (img <= hi), axis=-1)
        assert near.mean() > 0.98
    # the density map's own margins are bare glass
    dmap = smear_density_map(3000.0, 1500.0, np.random.default_rng(1))
    res = 50.0
    assert dmap[0].max() < 0.05 and dmap[-1].max() < 0.05
    img = render_field(256, 128, mpp=0.5, seed=3, style=PLAIN, smear_density=dmap,
                       origin_um=(1000.0, 0.0))
    near = np.abs(img.astype(float) - np.asarray(PLAIN.background, dtype=float)).max(-1) <= 14
    assert near.mean() > 0.9
    # the same map stretched over the slide by its size: margins are still glass
    img = render_field(256, 128, mpp=0.5, seed=3, style=PLAIN, smear_density=dmap,
                       origin_um=(1000.0, 0.0), slide_size_um=(3000.0, 1500.0))
    near = np.abs(img.astype(float) - np.asarray(PLAIN.background, dtype=float)).max(-1) <= 14
    assert near.mean() > 0.9
    assert dmap.shape == (int(np.ceil(1500 / res)) + 1, int(np.ceil(3000 / res)) + 1)


def test_density_map_is_a_smear() -> None:
    dmap = smear_density_map(4000.0, 2000.0, np.random.default_rng(2))
    assert dmap.dtype == np.float32
    assert dmap.min() >= 0.0 and dmap.max() <= 1.0
    mid = dmap[dmap.shape[0] // 3 : 2 * dmap.shape[0] // 3]
    ncol = mid.shape[1]
    thick = mid[:, ncol // 10 : ncol // 4].mean()
    thin = mid[:, int(ncol * 0.6) : int(ncol * 0.75)].mean()
    assert thick > 0.6
    assert thin < thick - 0.15
    assert mid[:, -1].max() < 0.05  # beyond the feathered tail: glass
    # thick areas have more red cells than thin ones
    img_thick = render_field(256, 256, mpp=0.5, seed=1, style=PLAIN, smear_density=dmap,
                             origin_um=(600.0, 900.0), cellularity=0.0)
    img_thin = render_field(256, 256, mpp=0.5, seed=1, style=PLAIN, smear_density=dmap,
                            origin_um=(2600.0, 900.0), cellularity=0.0)
    assert img_thick.mean() < img_thin.mean() - 5


def test_tumour_boxes_enclose_the_cluster() -> None:
    mpp = 0.5
    cl = Cluster(150.0, 100.0, 25.0, "tumour", 35, seed=8)
    img = render_field(600, 400, mpp=mpp, seed=2, style=PLAIN, clusters=[cl], cellularity=0.0)
    (x, y, w, h), = tumour_boxes([cl], mpp, image_size=(600, 400))
    assert x >= 0 and y >= 0 and x + w <= 600 and y + h <= 400
    assert x <= cl.x_um / mpp <= x + w and y <= cl.y_um / mpp <= y + h
    assert w < 2 * (cl.radius_um * 1.5 + 15) / mpp and h < 2 * (cl.radius_um * 1.5 + 15) / mpp
    dark = dark_blue(img)
    inside = dark[y : y + h, x : x + w].sum()
    assert inside > 0.98 * dark.sum()  # every tumour nucleus is in the box
    # same box in slide pixels at another resolution, and clipping to the image
    (x3, _y3, w3, _h3), = tumour_boxes([cl], 0.25)
    assert abs(x3 - 2 * x) <= 2 and abs(w3 - 2 * w) <= 3
    (cx, cy, cw, ch), = tumour_boxes([Cluster(5.0, 5.0, 10.0, "tumour", 10)], 0.5,
                                     image_size=(100, 100))
    assert cx == 0 and cy == 0 and cw > 0 and ch > 0
    assert tumour_boxes([Cluster(5e4, 5e4, 10.0, "tumour", 10)], 0.5, image_size=(100, 100)) == []


def test_cellularity_and_cluster_size() -> None:
    empty = render_field(256, 256, mpp=0.5, seed=4, style=PLAIN, cellularity=0.0)
    busy = render_field(256, 256, mpp=0.5, seed=4, style=PLAIN, cellularity=3.0)
    assert dark_blue(empty).mean() < 0.001
    assert dark_blue(busy).mean() > dark_blue(
        render_field(256, 256, mpp=0.5, seed=4, style=PLAIN)
    ).mean()
    assert len(cluster_cell_centres(Cluster(0.0, 0.0, 40.0, "tumour", 123))) == 123
    assert len(cluster_cell_centres(Cluster(0.0, 0.0, 3.0, "tumour", 50))) == 50


def test_bad_input_is_refused() -> None:
    with pytest.raises(InputError):
        Cluster(0.0, 0.0, 10.0, "blast", 5)
    with pytest.raises(InputError):
        Cluster(0.0, 0.0, 10.0, "tumour", 0)
    with pytest.raises(InputError):
        CenterStyle(name="x", tint=(1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        CenterStyle(name="x", tint=(1.0, 1.0, 1.0), vignetting=1.5)
    with pytest.raises(InputError):
        render_field(10, 10, mpp=0.0, seed=1, style=PLAIN)
    with pytest.raises(InputError):
        render_field(10, 10, mpp=0.5, seed=1.5, style=PLAIN)  # type: ignore[arg-type]


def _dark_nuclear_um2(style: CenterStyle, clusters: list[Cluster], red_od: float,
                      mpp: float = 0.5, seed: int = 5) -> float:
    """Area (µm²) of pixels with red OD >= red_od above the glass that the clusters add."""
    limit = style.background[0] * 10.0 ** (-red_od)
    kw: dict[str, Any] = dict(mpp=mpp, seed=seed, style=style)
    with_ = render_field(512, 512, clusters=clusters, **kw)[..., 0] <= limit
    without = render_field(512, 512, **kw)[..., 0] <= limit
    return float(with_.sum() - without.sum()) * mpp * mpp


@pytest.mark.parametrize("area", [500.0, 1500.0, 3500.0])
def test_lookalikes_are_as_dark_as_tumour(area: float) -> None:
    """Sized by dark area, every look-alike clump is about as dark as a tumour clump."""
    for red_od in (0.35, 0.5):
        darkness = {}
        for kind in ("tumour", *LOOKALIKE_KINDS):
            n, radius = cells_for_dark_area(kind, area)
            darkness[kind] = np.mean([
                _dark_nuclear_um2(PLAIN, [Cluster(128.0, 128.0, radius, kind, n, seed=s)], red_od)
                for s in range(2)
            ])
        tumour = darkness.pop("tumour")
        if red_od == 0.35:  # the calibration threshold: close to the asked-for area
            assert tumour == pytest.approx(area, rel=0.25)
        for kind, value in darkness.items():
            assert value == pytest.approx(tumour, rel=0.35), (kind, red_od, darkness, tumour)


def test_lookalike_boxes_cover_the_painted_cells() -> None:
    mpp = 0.5
    for kind in LOOKALIKE_KINDS:
        n, radius = cells_for_dark_area(kind, 1500.0)
        cl = Cluster(150.0, 100.0, radius, kind, n, seed=2)
        img = render_field(600, 400, mpp=mpp, seed=2, style=PLAIN, clusters=[cl], cellularity=0.0)
        assert tumour_boxes([cl], mpp) == []  # look-alikes are not tumour ground truth
        ((k, x, y, w, h),) = lookalike_boxes([cl], mpp, image_size=(600, 400))
        assert k == kind
        stained = img.astype(int)[..., 0] <= PLAIN.background[0] * 10 ** -0.35
        assert stained.sum() > 1000
        assert stained[y : y + h, x : x + w].sum() > 0.98 * stained.sum(), kind
        # and the box is not much larger than the clump
        assert w * h * mpp * mpp < 6 * math.pi * radius**2 + 1500
    tumour = Cluster(150.0, 100.0, 20.0, "tumour", 20, seed=1)
    assert lookalike_boxes([tumour], mpp) == []


def test_tumour_and_lookalikes_differ_in_shape_not_darkness() -> None:
    """Moulded tumour nuclei with scant cytoplasm; round look-alike cells with their own cytoplasm."""
    mpp = 0.5
    n_t, r_t = cells_for_dark_area("tumour", 2000.0)
    n_l, r_l = cells_for_dark_area("lymphoid", 2000.0)
    t_cl = [Cluster(128.0, 128.0, r_t, "tumour", n_t, seed=3)]
    l_cl = [Cluster(128.0, 128.0, r_l, "lymphoid", n_l, seed=3)]
    tumour = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A, clusters=t_cl)
    lymph = render_field(512, 512, mpp=mpp, seed=5, style=STYLE_A, clusters=l_cl)
    ((tx, ty, tw, th),) = tumour_boxes(t_cl, mpp)
    ((_, lx, ly, lw, lh),) = lookalike_boxes(l_cl, mpp)
    t_box, l_box = tumour[ty : ty + th, tx : tx + tw], lymph[ly : ly + lh, lx : lx + lw]
    # lymphocytes keep a visible rim of sky-blue cytoplasm, tumour cells hardly any
    assert sky_blue(l_box).sum() > 3 * sky_blue(t_box).sum()
    # while the whole fields hold about as much dark nuclear material
    limit = STYLE_A.background[0] * 10 ** -0.35
    t_dark = int((tumour[..., 0] <= limit).sum())
    l_dark = int((lymph[..., 0] <= limit).sum())
    assert l_dark == pytest.approx(t_dark, rel=0.3)


def test_rotated_stain_vectors_change_hue_not_darkness() -> None:
    base = CenterStyle(name="r0", noise_sigma=0.0)
    turned = CenterStyle(name="r1", noise_sigma=0.0, stain_rotation_deg=20.0)
    clusters = [Cluster(64.0, 64.0, 25.0, "tumour", 30, seed=1)]
    a = render_field(256, 256, mpp=0.5, seed=3, style=base, clusters=clusters).astype(float)
    b = render_field(256, 256, mpp=0.5, seed=3, style=turned, clusters=clusters).astype(float)
    od_a = -np.log((a + 0.5) / np.asarray(base.background, float))
    od_b = -np.log((b + 0.5) / np.asarray(base.background, float))
    stained = od_a.sum(-1) > 0.5
    # a rotation about the grey axis keeps the total optical density ...
    assert od_b.sum(-1)[stained].mean() == pytest.approx(od_a.sum(-1)[stained].mean(), rel=0.08)
    # ... but moves the colour: the channels' shares of it change
    share_a = (od_a[stained] / od_a[stained].sum(-1, keepdims=True)).mean(0)
    share_b = (od_b[stained] / od_b[stained].sum(-1, keepdims=True)).mean(0)
    assert np.abs(share_a - share_b).max() > 0.04
