"""What drove a score: slide heatmaps of patch scores, and Grad-CAM on one patch.

:func:`heatmap` paints patch scores onto a slide at thumbnail scale, never as
a full-resolution array: every patch's score is spread over its footprint in
thumbnail pixels and divided by the number of patches covering each pixel
(overlapping grids average, not add up); scores are first turned into rank
percentiles within the slide, so that a heatmap shows where a slide's
highest-scoring patches are whatever the model's scale (normalised attention,
for instance, shrinks as bags grow); pixels no scored patch covers are NaN
(background, rejected patches), to be drawn transparent.

:func:`gradcam` explains one patch under the model's patch-level classifier
(the histogram aggregator's patch head, or attention MIL's instance
classifier) through the CNN encoder: the gradient of the patch logit with
respect to the feature map that feeds the encoder's global pool (the output
of its last block: after the last block's batch norm, residual sum and ReLU,
not the raw output of the last ``Conv2d`` inside it, which the embedding
never sees as such), averaged per channel, weights that map (Selvaraju et
al., ICCV 2017); the ReLU of the weighted sum,
upsampled to the patch and scaled to [0, 1], shows which pixels pushed the
patch towards "tumour". It runs in float32, without the fast path.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import rankdata
from torch import nn

from cmil_core.errors import InputError
from cmil_core.model.aggregator import Aggregator
from cmil_core.model.encoders import Encoder, preprocess

__all__ = ["gradcam", "gradcam_layer", "heatmap"]


def heatmap(
    l0_size: tuple[int, int],
    th_size: tuple[int, int],
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    size: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    normalise: bool = True,
) -> npt.NDArray[np.float32]:
    """A ``[th_height, th_width]`` float32 map of patch scores (NaN where no patch).

    ``l0_size``: the slide's (width, height) in level-0 pixels; ``th_size``:
    the thumbnail's (width, height); ``x, y, size``: patches in level-0
    pixels; ``scores``: one per patch. With ``normalise``, scores become rank
    percentiles in (0, 1] within the slide.
    """
    xs, ys, ss = (np.asarray(a, dtype=np.float64) for a in (x, y, size))
    values = np.asarray(scores, dtype=np.float64)
    if not (xs.shape == ys.shape == ss.shape == values.shape) or xs.ndim != 1:
        raise InputError("heatmap: x, y, size and scores must be 1-D arrays of one length")
    th_w, th_h = int(th_size[0]), int(th_size[1])
    if th_w <= 0 or th_h <= 0 or l0_size[0] <= 0 or l0_size[1] <= 0:
        raise InputError(f"heatmap: sizes must be positive (slide {l0_size}, thumbnail {th_size})")
    keep = np.isfinite(values)
    xs, ys, ss, values = xs[keep], ys[keep], ss[keep], values[keep]
    if normalise and values.size:
        values = rankdata(values, method="average") / values.size
    sx, sy = th_w / l0_size[0], th_h / l0_size[1]
    total = np.zeros((th_h, th_w), dtype=np.float64)
    count = np.zeros((th_h, th_w), dtype=np.float64)
    x0 = np.clip(np.floor(xs * sx).astype(int), 0, th_w)
    y0 = np.clip(np.floor(ys * sy).astype(int), 0, th_h)
    x1 = np.clip(np.ceil((xs + ss) * sx).astype(int), 0, th_w)
    y1 = np.clip(np.ceil((ys + ss) * sy).astype(int), 0, th_h)
    for a, b, c, d, v in zip(x0, y0, x1, y1, values, strict=True):
        if c > a and d > b:
            total[b:d, a:c] += v
            count[b:d, a:c] += 1.0
    out = np.full((th_h, th_w), np.nan, dtype=np.float32)
    covered = count > 0
    out[covered] = (total[covered] / count[covered]).astype(np.float32)
    return out


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def gradcam_layer(module: nn.Module) -> nn.Module:
    """The encoder's global pool, whose *input* Grad-CAM explains (its last block's output).

    Every CNN of :mod:`cmil_core.model.encoders` ends in an adaptive pool over the
    last block's feature map (ResNet: ``layer4``; SmallCNN: the last
    conv-BN-ReLU block), so the pool's input is exactly the map the
    embedding averages.
    """
    pools = [m for m in module.modules() if isinstance(m, _GLOBAL_POOLS)]
    if not pools:
        raise InputError("Grad-CAM needs a convolutional encoder ending in a global pool "
                         "(this one has no AdaptiveAvgPool2d)")
    return pools[-1]


def gradcam(
    patch_rgb: npt.NDArray[np.uint8], encoder: Encoder, aggregator: Aggregator
) -> tuple[npt.NDArray[np.float32], float]:
    """(map ``[H, W]`` in [0, 1], patch probability) for one uint8 RGB patch ``[H, W, 3]``."""
    patch = np.asarray(patch_rgb)
    if patch.ndim != 3 or patch.shape[2] != 3 or patch.dtype != np.uint8:
        raise InputError(f"Grad-CAM needs one uint8 RGB patch [H, W, 3], not {patch.shape}")
    if encoder.spec.torchscript:
        raise InputError("Grad-CAM is not available for TorchScript encoders")
    module = encoder.module
    head = aggregator.patch_logit_module()
    layer = gradcam_layer(module)
    saved: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        feature_map = inputs[0]  # what feeds the global pool: the last block's output
        feature_map.retain_grad()
        saved["activation"] = feature_map

    handle = layer.register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            # The encoder is frozen: asking for the input gradient makes activations track it.
            x = preprocess(patch[None], encoder.spec).float().requires_grad_(True)
            embedding = module(x)
            logit = head(embedding.reshape(1, -1)).reshape(())
            module.zero_grad(set_to_none=True)
            logit.backward()
    finally:
        handle.remove()
    activation = saved["activation"]
    grad = activation.grad
    if grad is None:
        raise InputError("Grad-CAM: no gradient reached the encoder's last block")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    relu = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(relu, size=patch.shape[:2], mode="bilinear",
                                    align_corners=False)[0, 0].detach().numpy()
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    return cam.astype(np.float32), float(torch.sigmoid(logit.detach()))
