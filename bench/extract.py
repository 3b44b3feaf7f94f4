"""Benchmark of patch feature extraction against a plain PyTorch loop, in one run.

Run: ``.venv/bin/python bench/extract.py [--patches 512] [--repeat 3] [--models resnet18,smallcnn]``

Both sides embed the same random uint8 patches (``--patches`` of ``--px``
pixels, seed 0, in memory) with the same network and the same weights
(seeded initialisation: the cost of a network does not depend on its
weights):

* ``plain``: the loop everyone writes first: batches of 64, the batch made a
  contiguous NCHW float32 tensor (``permute(...).contiguous().float()``,
  ``/ 255``, ImageNet normalisation), ``torch.no_grad()``, the encoder's
  float32 eval-mode ``module``, no autocast;
* ``ours``: :func:`cmil_core.model.encoders.extract` over :meth:`Encoder.embed`:
  batch norm folded into the convolutions, channels-last, ``inference_mode``,
  bf16 autocast where the CPU has native bf16 (else float32), batches read in
  a background thread.

Rounds alternate plain and ours (``--repeat`` rounds); each side's best
round is reported, with the median in brackets, because other work on the
machine can only slow a round down. ``ratio`` is ours / plain patches per
second (the issue's target: at least 1.5 for resnet18).

How close to the machine's limit: a float32 2048 x 2048 matrix product
(best of 10) gives the CPU's float32 rate in GFLOP/s; the network's cost per
patch is counted with forward hooks (:func:`cmil_core.model.backbones.count_macs`,
2 FLOPs per multiply-add of convolutions and linear layers); cost x patches
per second is the rate achieved, printed as a fraction of the float32 matrix
rate (above 1 is possible in bf16, whose matrix rate is printed too).

``--slide`` adds an end-to-end line on a real slide
(``tests/data/fixtures/slides/CMU-1-Small-Region.svs``): the 450 patches of a
half-overlapping grid of 224 px, read with :func:`cmil_core.ingest.patch_reading.read_patch`
and embedded by smallcnn (fast path in both), (a) sequentially (read a batch,
then embed it) and (b) by :func:`cmil_core.model.features.slide_features` (two
reader threads overlapped with embedding; the file written too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmil_core.model.backbones import count_macs  # noqa: E402
from cmil_core.model.encoders import (  # noqa: E402
    Encoder,
    available_cores,
    bf16_supported,
    extract,
    load_encoder,
)

BATCH = 64
CMU = ROOT / "tests" / "data" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """Best-of-``repeat`` rate of an ``n x n`` matrix product, in GFLOP/s (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def plain_loop(encoder: Encoder, patches: npt.NDArray[np.uint8]) -> None:
    """The baseline: contiguous NCHW float32, no_grad, batch 64, the unmodified module."""
    mean = torch.tensor(encoder.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.spec.std).view(1, 3, 1, 1)
    module = encoder.module
    with torch.no_grad():
        for start in range(0, len(patches), BATCH):
            x = torch.from_numpy(patches[start : start + BATCH]).permute(0, 3, 1, 2).contiguous()
            x = (x.float() / 255.0 - mean) / std
            module(x)


def our_extraction(encoder: Encoder, patches: npt.NDArray[np.uint8]) -> None:
    batches: Iterator[npt.NDArray[np.uint8]] = (
        patches[start : start + BATCH] for start in range(0, len(patches), BATCH)
    )
    for _ in extract(encoder, batches):
        pass


def _rate(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def bench_model(name: str, patches: npt.NDArray[np.uint8], repeat: int,
                fp32_rate: float, bf16_rate: float | None) -> None:
    px = patches.shape[1]
    encoder = load_encoder(name, seed=0, input_px=px)
    n = len(patches)
    warm = patches[:BATCH]
    plain_loop(encoder, warm)
    our_extraction(encoder, warm)
    plain: list[float] = []
    ours: list[float] = []
    for _ in range(repeat):
        plain.append(_rate(lambda: plain_loop(encoder, patches), n))
        ours.append(_rate(lambda: our_extraction(encoder, patches), n))
    best_plain, best_ours = max(plain), max(ours)
    print(f"{name} plain (fp32, NCHW, no_grad, batch {BATCH}): {best_plain:.1f} patches/s "
          f"[median {statistics.median(plain):.1f}]")
    print(f"{name} ours ({encoder.spec.precision}, channels-last, inference_mode, BN folded, "
          f"extract): {best_ours:.1f} patches/s [median {statistics.median(ours):.1f}]")
    print(f"{name} ratio {best_ours / best_plain:.2f} "
          f"[medians {statistics.median(ours) / statistics.median(plain):.2f}]")
    gflop = 2.0 * count_macs(encoder.module, px) / 1e9
    achieved = gflop * best_ours
    line = (f"{name} compute {gflop:.3f} GFLOP/patch x {best_ours:.1f} patches/s = "
            f"{achieved:.0f} GFLOP/s = {achieved / fp32_rate:.2f} of the fp32 matmul rate")
    if bf16_rate is not None and encoder.spec.precision == "bf16":
        line += f" ({achieved / bf16_rate:.2f} of the bf16 matmul rate)"
    line += f"; plain loop: {gflop * best_plain / fp32_rate:.2f} of the fp32 matmul rate"
    print(line, flush=True)


def bench_slide(repeat: int) -> None:
    """End to end on CMU-1-Small-Region.svs: sequential read-then-embed vs slide_features."""
    from cmil_core.ingest.patch_reading import read_patch
    from cmil_core.ingest.slides import file_sha256, open_slide
    from cmil_core.model.features import slide_features

    if not CMU.is_file():
        print(f"slide: {CMU} not found, skipped")
        return
    encoder = load_encoder("smallcnn", seed=0)
    with open_slide(CMU) as slide:
        width, height = slide.dimensions
    size, stride = 224, 112  # half-overlapping patches: 450 of them on this small slide
    xs, ys = np.meshgrid(np.arange(0, width - size + 1, stride),
                         np.arange(0, height - size + 1, stride))
    table = pd.DataFrame({"patch_id": np.arange(xs.size), "x": xs.ravel(), "y": ys.ravel(),
                          "size": size})
    n = len(table)
    sha = file_sha256(CMU)

    def sequential() -> None:
        with open_slide(CMU) as slide:
            for start in range(0, n, BATCH):
                rows = table.iloc[start : start + BATCH]
                batch = np.stack([read_patch(slide, int(r.x), int(r.y), size, 224)
                                  for r in rows.itertuples()])
                encoder.embed(batch)

    seq: list[float] = []
    ovl: list[float] = []
    for _ in range(repeat):
        seq.append(_rate(sequential, n))
        with tempfile.TemporaryDirectory() as root:
            ovl.append(_rate(lambda: slide_features(CMU, table, encoder, root, tiling_key="bench",
                                                    slide_sha256=sha), n))
    print(f"slide CMU-1-Small-Region.svs, {n} patches of 224 px, smallcnn: read-then-embed "
          f"{max(seq):.0f} patches/s, slide_features (overlapped, written) {max(ovl):.0f} "
          f"patches/s, ratio {max(ovl) / max(seq):.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default="resnet18,smallcnn")
    parser.add_argument("--slide", action="store_true", help="add the end-to-end slide line")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {available_cores()} cores, threads "
          f"{torch.get_num_threads()}, native bf16: {bf16_supported()}, load average {_loadavg()}")
    fp32_rate = matmul_gflops(torch.float32)
    bf16_rate = matmul_gflops(torch.bfloat16) if bf16_supported() else None
    line = f"matmul fp32 2048x2048: {fp32_rate:.0f} GFLOP/s"
    if bf16_rate is not None:
        line += f" (bf16: {bf16_rate:.0f} GFLOP/s)"
    print(line, flush=True)
    patches = np.random.default_rng(0).integers(0, 256, (args.patches, args.px, args.px, 3),
                                                dtype=np.uint8)
    for name in args.models.split(","):
        bench_model(name.strip(), patches, args.repeat, fp32_rate, bf16_rate)
    if args.slide:
        bench_slide(args.repeat)
    print(f"load average at the end {_loadavg()} (other work on the machine slows rounds down)")


if __name__ == "__main__":
    main()
