"""The built-in synthetic demo study, and building it at first launch.

What it holds: :mod:`.generator` (three cohorts shaped like the cMIL paper's:
clinical tables, slides, then ingest, train and score as a user would),
:mod:`._smear` (the pixels of synthetic Wright-Giemsa smears; one long drawing
routine, exempt from the module-length rule) and :mod:`.launch` (the demo
build in the dashboard server's process, with progress, before any browser).

What it may import: everything below it; only :mod:`cmil_core.commands` and
:mod:`cmil_core.cli` sit above.
"""
