"""cmil_core.model.interpret: heatmaps at thumbnail scale and Grad-CAM through the encoder."""

from __future__ import annotations

import numpy as np
import pytest

from cmil_core.errors import InputError
from cmil_core.model.encoders import load_encoder
from cmil_core.model.interpret import gradcam, heatmap
from cmil_core.model.mil import make_aggregator


def test_heatmap_spreads_averages_and_masks() -> None:
    # Slide 1000 x 500 level-0 px drawn at 100 x 50: 10 l0 px per thumbnail px.
    x, y, size = [0, 200, 250], [0, 0, 0], [200, 200, 200]
    out = heatmap((1000, 500), (100, 50), x, y, size, [0.1, 0.9, 0.5])
    assert out.shape == (50, 100) and out.dtype == np.float32
    # Rank percentiles: 0.1 -> 1/3, 0.5 -> 2/3, 0.9 -> 1.
    assert out[5, 5] == pytest.approx(1 / 3)
    assert out[5, 22] == pytest.approx(1.0)  # only the second patch
    assert out[5, 30] == pytest.approx((1.0 + 2 / 3) / 2)  # overlap: the mean
    assert np.isnan(out[30, 5]) and np.isnan(out[5, 80])  # no patch: background
    raw = heatmap((1000, 500), (100, 50), x, y, size, [0.1, 0.9, 0.5], normalise=False)
    assert raw[5, 5] == pytest.approx(0.1)


def test_heatmap_ignores_missing_scores_and_checks_shapes() -> None:
    out = heatmap((100, 100), (10, 10), [0, 50], [0, 50], [50, 50], [np.nan, 1.0])
    assert np.isnan(out[0, 0]) and out[9, 9] == pytest.approx(1.0)
    with pytest.raises(InputError, match="one length"):
        heatmap((100, 100), (10, 10), [0], [0, 1], [5], [1.0])
    with pytest.raises(InputError, match="positive"):
        heatmap((100, 100), (0, 10), [0], [0], [5], [1.0])


def _patches(n: int, tumour: bool, rng: np.random.Generator) -> np.ndarray:
    """Pink smear-like patches; 'tumour' ones carry dark blue blobs."""
    out = np.full((n, 64, 64, 3), (235, 190, 200), dtype=np.uint8)
    out = (out + rng.integers(-10, 10, out.shape)).clip(0, 255).astype(np.uint8)
    if tumour:
        out[:, 20:44, 20:44] = (60, 40, 140)
    return out


@pytest.mark.parametrize("aggregator", ["attention", "histogram"])
def test_gradcam_explains_a_patch_under_the_patch_classifier(aggregator: str) -> None:
    rng = np.random.default_rng(0)
    encoder = load_encoder("smallcnn", seed=0, input_px=64, precision="fp32")
    bags, labels = [], []
    for i in range(24):
        positive = i % 2 == 0
        normal = _patches(8, False, rng)
        tumour = _patches(3, True, rng) if positive else _patches(3, False, rng)
        bags.append(encoder.embed(np.concatenate([normal, tumour])))
        labels.append(int(positive))
    model = make_aggregator(aggregator).fit(bags, labels, seed=0)
    patch = _patches(1, True, rng)[0]
    cam, probability = gradcam(patch, encoder, model)
    assert cam.shape == (64, 64) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0.0 and cam.max() <= 1.0
    # Its probability is the model's own patch probability for that patch.
    expected = model.predict([encoder.embed(patch[None])])[0].probability[0]
    assert probability == pytest.approx(float(expected), abs=1e-4)
    assert probability > 0.5  # a tumour-like patch


def test_gradcam_refuses_bad_patches() -> None:
    encoder = load_encoder("smallcnn", seed=0, input_px=64, precision="fp32")
    model = make_aggregator("attention")
    with pytest.raises(InputError, match="uint8 RGB patch"):
        gradcam(np.zeros((64, 64), dtype=np.uint8), encoder, model)
    with pytest.raises(InputError, match="not fitted"):
        gradcam(np.zeros((64, 64, 3), dtype=np.uint8), encoder, model)


def _reference_cam(module, head, x, feature_map_of, size: int) -> np.ndarray:
    """Grad-CAM written out by hand over the map ``feature_map_of`` returns for ``x``."""
    import torch

    with torch.enable_grad():
        fmap, embedding = feature_map_of(x)
        fmap.retain_grad()
        logit = head(embedding.reshape(1, -1)).reshape(())
        logit.backward()
    cam = torch.relu((fmap.grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear",
                                          align_corners=False)[0, 0].detach().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_gradcam_explains_the_last_block_output_that_feeds_the_pool(name: str) -> None:
    """Grad-CAM weights the map the embedding averages (last block after BN, residual and ReLU),
    not the raw output of the last Conv2d inside that block."""
    import torch

    from cmil_core.model.encoders import preprocess
    from cmil_core.model.interpret import gradcam_layer

    rng = np.random.default_rng(1)
    encoder = load_encoder(name, seed=0, input_px=64, precision="fp32")
    module = encoder.module
    # Non-trivial batch-norm statistics, so that BN is not the identity a fresh network has;
    # drawn from a seeded generator (the global one depends on what ran before: with some
    # draws the last block's output is all zero after ReLU and Grad-CAM is empty).
    torch.manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    bags, labels = [], []
    for i in range(16):
        bags.append(encoder.embed(_patches(6, i % 2 == 0, rng)))
        labels.append(i % 2)
    model = make_aggregator("attention", max_epochs=3).fit(bags, labels, seed=0)
    head = model.patch_logit_module()
    patch = _patches(1, True, rng)[0]
    x = preprocess(patch[None], encoder.spec).float()

    assert isinstance(gradcam_layer(module), torch.nn.AdaptiveAvgPool2d)
    if name == "smallcnn":
        last_block, last_conv = module.blocks, module.blocks[-1].conv
    else:
        last_block, last_conv = module.layer4, module.layer4[-1].conv2

    def block_output(inp):
        fmap = {}
        hook = last_block.register_forward_hook(lambda _m, _i, out: fmap.setdefault("f", out))
        try:
            embedding = module(inp)
        finally:
            hook.remove()
        return fmap["f"], embedding

    def conv_output(inp):
        fmap = {}
        hook = last_conv.register_forward_hook(lambda _m, _i, out: fmap.setdefault("f", out))
        try:
            embedding = module(inp)
        finally:
            hook.remove()
        return fmap["f"], embedding

    # The block's output is what the pool averages into the embedding.
    with torch.no_grad():
        fmap, embedding = block_output(x)
        np.testing.assert_allclose(fmap.mean(dim=(2, 3)).numpy(), embedding.numpy(), rtol=1e-5,
                                   atol=1e-6)
    expected = _reference_cam(module, head, x.clone().requires_grad_(True), block_output, 64)
    old_way = _reference_cam(module, head, x.clone().requires_grad_(True), conv_output, 64)
    cam, _ = gradcam(patch, encoder, model)
    np.testing.assert_allclose(cam, expected, atol=1e-5)
    assert np.abs(cam - old_way).max() > 0.05  # the last Conv2d's map is another explanation
