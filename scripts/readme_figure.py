"""Draw docs/demo_patches.jpg, the README's patch grid of the demo study.

Run: .venv/bin/python -m scripts.readme_figure
Row 1: tumour clumps (small round blue cells, moulding, a rosette) at the
training centre; row 2: a single dispersed tumour cell, then the benign
look-alikes, as dark as tumour (lymphoid cluster, erythroid island, monocytes,
smudge cells... the last one in row 3); row 3: normal marrow at the three
centres (other stain vectors and glass). Each patch is 112 um (224 px at
0.5 um/px), the size the pipeline feeds the CNN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cmil_core.demo import _smear
from cmil_core.demo.generator import COHORTS, SLIDE_MPP

PATCH = 224
OUT = Path(__file__).resolve().parents[1] / "docs" / "demo_patches.jpg"


def patch(style: _smear.CenterStyle, seed: int, kind: str | None, area: float = 2200.0,
          n_cells: int | None = None) -> np.ndarray:
    half = PATCH * SLIDE_MPP / 2
    clusters = []
    if kind is not None:
        n, radius = _smear.cells_for_dark_area(kind, area)
        clusters = [_smear.Cluster(half, half, radius, kind, n_cells or n, seed=seed)]
    return _smear.render_field(PATCH, PATCH, mpp=SLIDE_MPP, seed=seed, style=style,
                               clusters=clusters)


def main() -> None:
    train, centre_a, centre_b = (c.style for c in COHORTS)
    rows = [
        [("tumour clump", patch(train, s, "tumour", 2600.0)) for s in (1, 2, 3, 5)],
        [("single tumour cells", patch(train, 7, "tumour", 80.0)),
         ("lymphoid cluster", patch(train, 8, "lymphoid")),
         ("erythroid island", patch(train, 9, "erythroid")),
         ("monocytes", patch(train, 10, "monocytic"))],
        [("smudge cells", patch(train, 11, "smudge")),
         ("training centre", patch(train, 12, None)),
         ("centre A", patch(centre_a, 13, "tumour", 1500.0)),
         ("centre B", patch(centre_b, 14, "tumour", 1500.0))],
    ]
    gap = 6
    size = (4 * PATCH + 3 * gap, len(rows) * PATCH + (len(rows) - 1) * gap)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (text, tile) in enumerate(row):
            x, y = c * (PATCH + gap), r * (PATCH + gap)
            canvas.paste(Image.fromarray(tile), (x, y))
            draw.rectangle((x + 2, y + PATCH - 18, x + 8 + 6 * len(text), y + PATCH - 4),
                           fill="white")
            draw.text((x + 4, y + PATCH - 17), text, fill="black")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(OUT, quality=88, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main()
