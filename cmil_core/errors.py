"""The package's exceptions.

Every error a user can cause by handing us bad input is an ``InputError``
(a ``ValueError``): its message is one line, fit to print after ``error:``,
naming the file, row and column where that applies.
"""

from __future__ import annotations

import unicodedata

__all__ = ["CmilError", "InputError", "shown"]

# Unicode categories of characters that are invisible or break a line.
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


class CmilError(Exception):
    """Base class of the errors raised by cmil_core."""


class InputError(CmilError, ValueError):
    """Bad input from a user: a file, a table, an argument.

    The message is a complete sentence for a person, without a traceback.
    """


def shown(text: str, limit: int = 40) -> str:
    """``text`` for a one-line message: control characters escaped, cut after ``limit``.

    >>> shown("P\\n1"), shown("x" * 50, 10)
    ('P\\\\n1', 'xxxxxxxxxx… (50 characters)')
    """
    out = "".join(
        ch if unicodedata.category(ch) not in _INVISIBLE else ascii(ch)[1:-1] for ch in text
    )
    return out if len(out) <= limit else f"{out[:limit]}… ({len(text)} characters)"
