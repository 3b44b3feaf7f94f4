"""Running the tool for a team: access, background jobs, store upkeep.

What it holds: :mod:`.access` (users, roles, the audit trail's writer,
shareable patient ids), :mod:`.jobs` (long work in a background thread with
readable progress), :mod:`.maintenance` (``check``: the store's consistency
and its repairs) and :mod:`.backup` (``backup``, ``restore``).

What it may import: the top-level modules, :mod:`cmil_core.store` and the
pipeline folders below it (:mod:`cmil_core.analysis`, :mod:`cmil_core.clinical`,
:mod:`cmil_core.ingest`, :mod:`cmil_core.model`).
"""
