"""Colours shared by every figure (dashboard and exports), colour-blind safe.

A cohort keeps its colour on every page and in every exported figure: the
colour follows the cohort's position in the store's cohort list (training
first), not its position in one figure.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["COHORT_COLOURS", "RISK_COLOURS", "cohort_colour"]

# Okabe-Ito (2008), training first.
COHORT_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")

# cMIL risk groups: red (high) and blue (low) of ColorBrewer's RdBu, distinct for deuteranopes.
RISK_COLOURS = {"high": "#B2182B", "low": "#2166AC"}

CHANCE_GREY = "#B0B0B0"


def cohort_colour(cohort: str, cohorts: Sequence[str] | None = None, index: int = 0) -> str:
    """The colour of ``cohort``: by its place in ``cohorts`` (the store's order), else ``index``.

    >>> cohort_colour("external_a", ["training", "external_a"])
    '#D55E00'
    """
    if cohorts is not None and cohort in cohorts:
        index = list(cohorts).index(cohort)
    return COHORT_COLOURS[index % len(COHORT_COLOURS)]
