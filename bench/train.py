"""Benchmark of the CNN training step against a plain PyTorch training loop, in one run.

Run: ``.venv/bin/python bench/train.py [--patches 1024] [--px 96] [--repeat 3] [--json]``

Both sides train the same network (``--model``, smallcnn by default, plus a
linear head; the same seeded initial weights) with AdamW and binary
cross-entropy on the same uint8 patches (``--patches`` random patches of
``--px`` pixels, seed 0, in memory, half labelled 1), in batches of 64, with
the same augmentation (:func:`cmil_core.model.patch_data.augment_batch`: symmetries,
stain jitter, brightness / contrast / saturation, blur):

* ``plain``: the loop everyone writes first: each batch augmented, made a
  contiguous NCHW float32 tensor, then one forward, backward and step in
  float32, in turn (no overlap of the augmentation with the network);
* ``ours``: :func:`cmil_core.model.cnn_training.train_epoch`, the step
  :func:`~cmil_core.model.cnn_training.train_cnn` runs: channels-last network and
  batches, autocast in bf16 where the CPU computes it natively (else float32;
  ``--precision`` forces one), and the next batches augmented in a background
  thread while the network trains on the current one.

Rounds alternate plain and ours (``--repeat`` rounds); each side's best round
is reported, with the median in brackets (other work on the machine can only
slow a round down). ``ratio`` is ours / plain training patches per second.
``--json`` prints one line: ``{"train_ratio", "plain_patches_per_s",
"ours_patches_per_s", "precision", ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmil_core.model.backbones import ARCHITECTURES, build_backbone  # noqa: E402
from cmil_core.model.cnn_training import PatchClassifier, train_epoch  # noqa: E402
from cmil_core.model.encoders import available_cores, bf16_supported  # noqa: E402
from cmil_core.model.finetune_config import FinetuneConfig, autocast_dtype  # noqa: E402
from cmil_core.model.patch_data import PatchSet, augment_batch  # noqa: E402

BATCH = 64


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def plain_loop(model: torch.nn.Module, optimiser: torch.optim.Optimizer, data: PatchSet,
               config: FinetuneConfig, epoch: int) -> None:
    """The baseline: augment a batch, NCHW float32, forward, backward, step; one after the other."""
    model.train()
    labels = data.labels[data.owner].astype(np.float32)
    for i, start in enumerate(range(0, len(data), BATCH)):
        rows = np.arange(start, min(start + BATCH, len(data)))
        gen = torch.Generator().manual_seed(epoch * 100_003 + i)
        x = augment_batch(torch.from_numpy(data.pixels[rows]), config, gen).contiguous()
        y = torch.from_numpy(labels[rows])
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def _rate(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=1024)
    parser.add_argument("--px", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    config = FinetuneConfig(architecture=args.model, input_px=args.px,
                            batch_size=BATCH, precision=args.precision,
                            prefetch=args.prefetch, device="cpu")
    rng = np.random.default_rng(0)
    n = args.patches
    pixels = rng.integers(0, 256, (n, args.px, args.px, 3), dtype=np.uint8)
    owner = np.arange(n) // BATCH
    n_patients = int(owner.max()) + 1
    data = PatchSet(pixels, owner, np.arange(n), [f"P{i}" for i in range(n_patients)],
                    np.arange(n_patients) % 2)
    rows = np.arange(n)
    device = torch.device("cpu")
    amp = autocast_dtype(config, device)

    base = PatchClassifier(build_backbone(args.model, seed=0), ARCHITECTURES[args.model][1])
    plain_model = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    ours_model = copy.deepcopy(base).to(memory_format=torch.channels_last)
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-3)

    def ours(epoch: int) -> None:
        train_epoch(ours_model, ours_opt, data, rows, config, keys=(0, epoch), amp_dtype=amp)

    warm = data.subset([0, 1])  # two batches each, to warm up oneDNN's kernels
    plain_loop(plain_model, plain_opt, warm, config, 0)
    train_epoch(ours_model, ours_opt, warm, np.arange(len(warm)), config, keys=(0, 0),
                amp_dtype=amp)
    plain: list[float] = []
    mine: list[float] = []
    for r in range(1, args.repeat + 1):
        plain.append(_rate(lambda r=r: plain_loop(plain_model, plain_opt, data, config, r), n))
        mine.append(_rate(lambda r=r: ours(r), n))
    best_plain, best_ours = max(plain), max(mine)
    precision = str(amp).replace("torch.", "") if amp is not None else "float32"
    ratio = best_ours / best_plain
    if args.json:
        print(json.dumps({
            "train_ratio": round(ratio, 3), "plain_patches_per_s": round(best_plain, 1),
            "ours_patches_per_s": round(best_ours, 1), "precision": precision,
            "model": args.model, "px": args.px, "patches": n, "threads": torch.get_num_threads(),
            "bf16_native": bf16_supported(), "load_average": _loadavg(),
        }))
        return
    print(f"torch {torch.__version__}, {available_cores()} cores, threads "
          f"{torch.get_num_threads()}, native bf16: {bf16_supported()}, load average {_loadavg()}")
    print(f"{args.model} {args.px} px, {n} patches per round, batch {BATCH}, AdamW, augmentation")
    print(f"plain (fp32, NCHW, augmentation in turn): {best_plain:.1f} patches/s "
          f"[median {statistics.median(plain):.1f}]")
    print(f"ours ({precision}, channels-last, augmentation prefetched {args.prefetch} ahead): "
          f"{best_ours:.1f} patches/s [median {statistics.median(mine):.1f}]")
    medians = statistics.median(mine) / statistics.median(plain)
    print(f"train_ratio {ratio:.2f} [medians {medians:.2f}]")
    print(f"load average at the end {_loadavg()} (other work on the machine slows rounds down)")


if __name__ == "__main__":
    main()
