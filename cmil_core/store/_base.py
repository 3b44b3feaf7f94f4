"""Helpers shared by the store's modules: its errors, the patch-id base, a UTC clock,
and the typed ``fetchone()`` of a query that always returns a row.

Private to :mod:`cmil_core.store`; imports nothing of the store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cmil_core.errors import CmilError


class StoreError(CmilError):
    """The store cannot be used as asked (wrong version, closed, missing)."""


class StoreBusyError(StoreError):
    """Another process holds the store file."""


class StoreOutdatedError(StoreError):
    """A read-only open of a store written by an older (or newer) schema version."""


# patch_id = slide_id * PATCH_ID_BASE + row number in grid order: stable across
# reruns of the same tiling, and unique without a sequence.
PATCH_ID_BASE = 1 << 24


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def one_row(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """``fetchone()`` of a query that always returns a row (an aggregate without
    GROUP BY, an INSERT ... RETURNING): the row, typed as present."""
    assert row is not None, "the query returned no row"
    return row
