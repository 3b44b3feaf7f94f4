"""cmil_core.evaluation: ground-truth overlap and per-cohort tables agree with the statistics."""

from __future__ import annotations

import pandas as pd
import pytest

from cmil_core.evaluation import tumour_fraction


def test_tumour_fraction_is_the_area_inside_the_union_of_boxes() -> None:
    patches = pd.DataFrame({"slide_id": [1, 1, 1, 2], "x": [0, 100, 0, 0], "y": [0, 0, 100, 0],
                            "size": [100, 100, 100, 100]})
    boxes = pd.DataFrame({"slide_id": [1, 1], "x": [50, 50], "y": [0, 25],
                          "width": [100, 100], "height": [50, 50]})
    fractions = tumour_fraction(patches, boxes)
    # Patch 1: x 50-100, y 0-75 of 100x100 -> 0.375 (the boxes overlap: counted once).
    assert fractions[0] == pytest.approx(0.375)
    assert fractions[1] == pytest.approx(0.375)  # x 100-150 of the patch at 100
    assert fractions[2] == 0.0  # below the boxes
    assert fractions[3] == 0.0  # another slide has no boxes


def test_no_boxes_no_tumour() -> None:
    patches = pd.DataFrame({"slide_id": [1], "x": [0], "y": [0], "size": [10]})
    assert tumour_fraction(patches, pd.DataFrame(columns=["slide_id", "x", "y", "width", "height"])).tolist() == [0.0]
