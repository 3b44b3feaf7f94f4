"""Draw docs/demo_patches.jpg, the README's patch grid of the demo study.

Run: .venv/bin/python -m scripts.readme_figure
Rows 1-2: patches with tumour-cell clusters (training centre); row 3: normal
marrow; row 4: a lymphoid clump (benign look-alike) and the three centres.
Each patch is 112 um (224 px at 0.5 um/px), the size the pipeline feeds the CNN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cmil_core import _smear
from cmil_core.demo import COHORTS, SLIDE_MPP

PATCH = 224
OUT = Path(__file__).resolve().parents[1] / "docs" / "demo_patches.jpg"


def patch(style: _smear.CenterStyle, seed: int, kind: str | None) -> np.ndarray:
    half = PATCH * SLIDE_MPP / 2
    clusters = []
    if kind == "tumour":
        clusters = [_smear.Cluster(half + 6, half - 4, 34.0, "tumour", 90, seed=seed)]
    elif kind == "lymphoid":
        clusters = [_smear.Cluster(half, half, 26.0, "lymphoid", 14, seed=seed)]
    return _smear.render_field(PATCH, PATCH, mpp=SLIDE_MPP, seed=seed, style=style, clusters=clusters)


def main() -> None:
    train, centre_a, centre_b = (c.style for c in COHORTS)
    rows = [
        [patch(train, s, "tumour") for s in range(4)],
        [patch(centre_a, 10 + s, "tumour") for s in range(2)]
        + [patch(centre_b, 20 + s, "tumour") for s in range(2)],
        [patch(train, 30 + s, None) for s in range(4)],
        [patch(train, 40, "lymphoid"), patch(train, 41, None), patch(centre_a, 42, None),
         patch(centre_b, 43, None)],
    ]
    gap = 6
    size = (4 * PATCH + 3 * gap, 4 * PATCH + 3 * gap)
    canvas = Image.new("RGB", size, "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (c * (PATCH + gap), r * (PATCH + gap)))
    draw = ImageDraw.Draw(canvas)
    labels = ["lymphoid clump", "training centre", "centre A", "centre B"]
    for c, text in enumerate(labels):
        x, y = c * (PATCH + gap) + 4, 3 * (PATCH + gap) + PATCH - 16
        draw.rectangle((x - 2, y - 2, x + 7 * len(text), y + 12), fill="white")
        draw.text((x, y), text, fill="black")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(OUT, quality=88, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main()
