"""Text and JSON formatting shared by the statistics modules (:mod:`cmil_core.analysis.roc`,
:mod:`cmil_core.analysis.survival`, :mod:`cmil_core.analysis.cox` and the others).

Most users should not import this module. JSON results hold plain floats or
None, never NaN or infinity (:func:`json_float`); terminal output uses
fixed-width tables (:func:`text_table`) and the house's number formats: three
decimals, intervals as "0.731 [0.630, 0.833]", p values below 0.001 as
"<0.001". Names here are public *within* this private module.

>>> fmt_ci(0.7314, (0.6301, 0.8326))
'0.731 [0.630, 0.833]'
>>> p_text(0.0002)
'p < 0.001'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fmt", "fmt_ci", "fmt_p", "json_float", "json_pair", "p_text", "text_table"]


def json_float(value: float | None) -> float | None:
    """A plain float, or None for None, NaN and +-inf (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_pair(pair: Sequence[float | None]) -> list[float | None]:
    """Two values (an interval) through :func:`json_float`."""
    return [json_float(pair[0]), json_float(pair[1])]


def fmt(value: float | None, digits: int = 3) -> str:
    """"0.731" (``digits`` decimals), or "-" for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Sequence[float | None] | None, digits: int = 3) -> str:
    """"0.731 [0.630, 0.833]"; the value alone without an interval, "-" for None."""
    if value is None:
        return "-"
    if ci is None or ci[0] is None or ci[1] is None:
        return fmt(value, digits)
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_p(p: float | None) -> str:
    """A p value for a table cell: "0.014", "<0.001", or "-" for None."""
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_text(p: float | None) -> str:
    """"p = 0.014" or "p < 0.001" for a sentence."""
    if p is None:
        return "p = -"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Fixed-width text table: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
