"""The package's exceptions.

Every error a user can cause by handing us bad input is an ``InputError``
(a ``ValueError``): its message is one line, fit to print after ``error:``,
naming the file, row and column where that applies.
"""

from __future__ import annotations

__all__ = ["CmilError", "InputError"]


class CmilError(Exception):
    """Base class of the errors raised by cmil_core."""


class InputError(CmilError, ValueError):
    """Bad input from a user: a file, a table, an argument.

    The message is a complete sentence for a person, without a traceback.
    """
