"""Text the pages show: a user's string (file, cohort, patient, path, error) made safe for
Streamlit's markdown. The lowest layer of the pages' shared code: it imports nothing of it.
"""

from __future__ import annotations

import re

__all__ = ["md"]


def md(value: object) -> str:
    """A user string (file, cohort, patient, path, error) made safe for markdown: shown as typed."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", str(value))
