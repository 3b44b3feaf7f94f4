"""cmil_core.ingest.quality: patch metrics against brute force, and one synthetic patch per QC reason."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cmil_core.errors import InputError
from cmil_core.ingest.quality import (
    GLASS_OD,
    METRIC_COLUMNS,
    QC_REASONS,
    QCThresholds,
    patch_metrics,
    qc_decision,
)
from cmil_core.ingest.stains import DEFAULT_STAINS

SIZE = 224
PINK = (214, 150, 160)       # a red cell, as on the demo and BCCD smears
VIOLET = (110, 70, 170)      # a Wright-Giemsa nucleus
GLASS = (236, 236, 238)


def _smear_patch(seed: int = 0, nuclei: bool = True) -> np.ndarray:
    """A sharp smear-like patch: pink cells with pale centres on glass, optional violet nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = np.empty((SIZE, SIZE, 3), np.float64)
    img[:] = GLASS
    for _ in range(180):
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(6, 9)
        d = np.hypot(xx - cx, yy - cy) / r
        img[d < 1] = PINK
        img[d < 0.35] = (225, 190, 198)
    if nuclei:
        for _ in range(4):
            cx, cy, r = rng.uniform(20, SIZE - 20), rng.uniform(20, SIZE - 20), rng.uniform(8, 11)
            img[np.hypot(xx - cx, yy - cy) < r] = VIOLET
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _blur(patch: np.ndarray, sigma: float) -> np.ndarray:
    out = ndimage.gaussian_filter(patch.astype(np.float64), (sigma, sigma, 0))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _uniform(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (SIZE, SIZE, 3)).copy()


def _grey(batch: np.ndarray) -> np.ndarray:
    """BT.601 luma rounded to integers, as the module defines it (77, 150, 29 / 256)."""
    weights = np.array([77, 150, 29])
    return (batch.astype(np.int64) @ weights + 128) // 256


# ----------------------------------------------------------------- metrics vs brute force


def test_metric_columns_and_shapes() -> None:
    batch = np.stack([_smear_patch(i) for i in range(5)])
    metrics = patch_metrics(batch, GLASS)
    assert tuple(metrics) == METRIC_COLUMNS
    for values in metrics.values():
        assert values.shape == (5,) and values.dtype == np.float64
        assert np.all(np.isfinite(values))


def test_blur_variance_is_the_variance_of_scipys_laplacian() -> None:
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (6, 40, 56, 3), dtype=np.uint8)
    expected = [ndimage.laplace(g.astype(np.float64))[1:-1, 1:-1].var() for g in _grey(batch)]
    np.testing.assert_allclose(patch_metrics(batch)["blur_variance"], expected, rtol=1e-12)


def test_grey_metrics_match_brute_force() -> None:
    rng = np.random.default_rng(4)
    batch = rng.integers(0, 256, (7, 30, 20, 3), dtype=np.uint8)
    grey = _grey(batch).reshape(7, -1)
    metrics = patch_metrics(batch)
    np.testing.assert_allclose(metrics["mean_intensity"], grey.mean(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(metrics["dark_fraction"], (grey < 40).mean(axis=1))
    np.testing.assert_array_equal(metrics["bright_fraction"], (grey >= 250).mean(axis=1))


@pytest.mark.parametrize(
    "glass", [(255.0, 255.0, 255.0), (209.0, 212.0, 209.0), (240.0, 200.0, 120.0)]
)
def test_colour_rules_match_the_optical_density_definitions(
    glass: tuple[float, float, float],
) -> None:
    """Glass and nuclear material follow the OD definitions of the docstring (values 1..255)."""
    rng = np.random.default_rng(5)
    batch = rng.integers(1, 256, (9, 64, 64, 3), dtype=np.uint8)
    od = np.log10(np.asarray(glass) / batch.astype(np.float64))
    is_glass = np.all(od <= GLASS_OD + 1e-12, axis=-1)
    # Nuclear stain: unmix with the default stain vectors, floor, then a 3x3 opening.
    nuc, cs = np.asarray(DEFAULT_STAINS.nuclear), np.asarray(DEFAULT_STAINS.counterstain)
    rest = np.cross(nuc, cs) / np.linalg.norm(np.cross(nuc, cs))
    conc = np.maximum(od, 0.0) @ np.linalg.inv(np.stack([nuc, cs, rest]))
    is_nucleus = np.stack([
        ndimage.binary_opening(c[..., 0] >= DEFAULT_STAINS.nuclear_floor, np.ones((3, 3)))
        for c in conc
    ])
    metrics = patch_metrics(batch, glass)
    np.testing.assert_array_equal(metrics["background_fraction"], is_glass.reshape(9, -1).mean(1))
    np.testing.assert_allclose(metrics["nuclei_fraction"], is_nucleus.reshape(9, -1).mean(1),
                               atol=2 / 4096)  # float32 unmixing: a pixel at the floor may flip
    np.testing.assert_allclose(metrics["nuclear_area_um2"],
                               metrics["nuclei_fraction"] * (64 * 0.5) ** 2)


def test_metrics_do_not_depend_on_batching() -> None:
    batch = np.stack([_smear_patch(i) for i in range(11)])
    whole = patch_metrics(batch, GLASS)
    one_by_one = [patch_metrics(batch[i : i + 1], GLASS) for i in range(11)]
    for name in METRIC_COLUMNS:
        np.testing.assert_array_equal(whole[name], [m[name][0] for m in one_by_one])


def test_nuclei_fraction_sees_violet_not_pink() -> None:
    metrics = patch_metrics(np.stack([_uniform(VIOLET), _uniform(PINK), _uniform(GLASS)]), GLASS)
    np.testing.assert_array_equal(metrics["nuclei_fraction"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(metrics["background_fraction"], [0.0, 0.0, 1.0])


def test_empty_batch() -> None:
    metrics = patch_metrics(np.empty((0, 8, 8, 3), np.uint8))
    assert all(v.shape == (0,) for v in metrics.values())
    qc_pass, reasons = qc_decision(metrics, QCThresholds())
    assert qc_pass.shape == (0,) and reasons == []


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), r"\[B, H, W, 3\]"),
        (np.zeros((1, 8, 8, 4), np.uint8), r"\[B, H, W, 3\]"),
        (np.zeros((1, 2, 8, 3), np.uint8), "H, W >= 3"),
    ],
)
def test_bad_batches_raise(batch: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        patch_metrics(batch)


def test_bad_glass_raises() -> None:
    with pytest.raises(InputError, match="glass_rgb"):
        patch_metrics(np.zeros((1, 8, 8, 3), np.uint8), (0.0, 255.0, 255.0))


# ----------------------------------------------------------------- one patch per reason


def test_each_reason_from_a_synthetic_patch() -> None:
    sharp = _smear_patch(1)
    washed_out = _uniform((255, 255, 200))  # yellowish, not glass-coloured, grey 249
    washed_out[::2, ::2] = (255, 255, 160)  # texture: not "blurred" either
    pink = _smear_patch(2, nuclei=False)
    patches = {
        "sharp": sharp,
        "white": _uniform((255, 255, 255)),
        "black": _uniform((0, 0, 0)),
        "washed out": washed_out,
        "blurred": _blur(sharp, 4.0),
        "pink only": pink,
    }
    metrics = patch_metrics(np.stack(list(patches.values())), GLASS)
    qc_pass, reasons = qc_decision(metrics, QCThresholds())
    assert dict(zip(patches, reasons, strict=True)) == {
        "sharp": None,
        "white": "background",
        "black": "too dark",
        "washed out": "too bright",
        "blurred": "blurred",
        "pink only": "no nucleated cell",
    }
    assert qc_pass.tolist() == [r is None for r in reasons]
    assert set(reasons) - {None} <= set(QC_REASONS)


def test_blur_lowers_laplacian_variance_monotonically() -> None:
    sharp = _smear_patch(7)
    batch = np.stack([sharp] + [_blur(sharp, s) for s in (0.5, 1.0, 2.0, 4.0)])
    values = patch_metrics(batch, GLASS)["blur_variance"]
    assert np.all(np.diff(values) < 0)
    assert values[0] > QCThresholds().min_blur_variance > values[-1]


def test_first_failing_rule_wins_in_the_documented_order() -> None:
    """A patch failing everything gets the first reason; drop rules one by one to walk the order."""
    n = 1
    bad = {
        "background_fraction": [1.0], "mean_intensity": [10.0], "dark_fraction": [0.9],
        "bright_fraction": [0.0], "blur_variance": [0.0], "nuclei_fraction": [0.0],
        "nuclear_area_um2": [0.0],
    }
    good = {
        "background_fraction": [0.1], "mean_intensity": [150.0], "dark_fraction": [0.0],
        "bright_fraction": [0.0], "blur_variance": [500.0], "nuclei_fraction": [0.1],
        "nuclear_area_um2": [40.0],
    }
    steps = [
        ("background", ["background_fraction"]),
        ("thick smear", ["thick_fraction"]),
        ("too dark", ["mean_intensity", "dark_fraction"]),
        ("blurred", ["blur_variance"]),
        ("no nucleated cell", ["nuclear_area_um2"]),
    ]
    metrics = {k: list(v) for k, v in bad.items()}
    thick = {"bad": [0.9], "good": [0.0]}
    thick_now = thick["bad"]
    for reason, fixed in steps:
        _, reasons = qc_decision(metrics, QCThresholds(), thick_fraction=thick_now)
        assert reasons == [reason]
        for name in fixed:
            if name == "thick_fraction":
                thick_now = thick["good"]
            else:
                metrics[name] = good[name]
    qc_pass, reasons = qc_decision(metrics, QCThresholds(), thick_fraction=thick_now)
    assert reasons == [None] * n and qc_pass.tolist() == [True]
    too_bright = dict(good, mean_intensity=[250.0])
    assert qc_decision(too_bright, QCThresholds())[1] == ["too bright"]


def test_nan_metric_fails_and_thick_rule_only_when_given() -> None:
    metrics = {name: [0.5] for name in METRIC_COLUMNS}
    metrics.update(mean_intensity=[150.0], blur_variance=[np.nan], nuclear_area_um2=[40.0])
    assert qc_decision(metrics, QCThresholds())[1] == ["blurred"]
    metrics["blur_variance"] = [100.0]
    assert qc_decision(metrics, QCThresholds())[1] == [None]
    assert qc_decision(metrics, QCThresholds(), thick_fraction=[0.6])[1] == ["thick smear"]


def test_qc_decision_input_errors() -> None:
    with pytest.raises(InputError, match="lack column"):
        qc_decision({"blur_variance": [1.0]}, QCThresholds())
    metrics = {name: [0.1, 0.2] for name in METRIC_COLUMNS}
    metrics["nuclei_fraction"] = [0.1]
    with pytest.raises(InputError, match="different lengths"):
        qc_decision(metrics, QCThresholds())
    metrics["nuclei_fraction"] = [0.1, 0.1]
    with pytest.raises(InputError, match="thick_fraction has 1 values for 2"):
        qc_decision(metrics, QCThresholds(), thick_fraction=[0.0])


# ----------------------------------------------------------------- thresholds


def test_module_docstring_example() -> None:
    import doctest

    from cmil_core.ingest import quality

    result = doctest.testmod(quality, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_thresholds_round_trip_and_defaults() -> None:
    t = QCThresholds(min_blur_variance=20, max_background_fraction=0.7)
    data = t.to_dict()
    assert data["min_blur_variance"] == 20.0 and isinstance(data["min_blur_variance"], float)
    assert QCThresholds.from_dict(data) == t
    assert QCThresholds.from_dict({}) == QCThresholds()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_background_fraction": 1.5}, r"max_background_fraction=1.5 is a fraction"),
        ({"min_mean_intensity": -1}, r"min_mean_intensity=-1.0 is a grey level"),
        ({"min_mean_intensity": 200, "max_mean_intensity": 100}, "must be below"),
        ({"min_blur_variance": -3}, r"min_blur_variance=-3.0 must be >= 0"),
        ({"min_nuclear_area_um2": float("nan")}, "not a finite number"),
        ({"min_nuclear_area_um2": -1}, r"min_nuclear_area_um2=-1.0 must be >= 0"),
        ({"max_thick_fraction": True}, "not a finite number"),
    ],
)
def test_bad_thresholds_raise(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        QCThresholds(**kwargs)


def test_unknown_threshold_key_raises() -> None:
    with pytest.raises(InputError, match="unknown QC threshold"):
        QCThresholds.from_dict({"min_blur": 3.0})


def test_retired_threshold_says_what_replaced_it() -> None:
    with pytest.raises(InputError, match="min_nuclei_fraction no longer exists.*min_nuclear_area_um2"):
        QCThresholds.from_dict({"min_nuclei_fraction": 0.002})


def test_sharpness_and_nuclei_do_not_depend_on_magnification() -> None:
    """The same field at 0.125 and 0.5 um/px gives the same verdict (measured at 0.5 um/px)."""
    fine = np.stack([_smear_patch(i) for i in range(3)])  # 224 px
    small = np.stack([np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(p)
                                 .resize((56, 56), 4)) for p in fine])  # BOX = 4
    at_fine = patch_metrics(fine, GLASS, um_per_px=0.125)  # 28 um patches
    at_coarse = patch_metrics(small, GLASS, um_per_px=0.5)
    for name in ("blur_variance", "nuclear_area_um2"):
        np.testing.assert_allclose(at_fine[name], at_coarse[name], rtol=1e-9)
    assert qc_decision(at_fine, QCThresholds())[1] == qc_decision(at_coarse, QCThresholds())[1]
