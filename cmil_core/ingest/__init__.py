"""From slide files to quality-checked patches: the ``ingest`` command.

Read in the order the data flows: :mod:`.discovery` (finding a cohort's slides
and whose they are), :mod:`.slides` (one face over whole-slide files and
photographs), :mod:`.stains` (stain vectors, the nuclear channel),
:mod:`.tiling_config` (the tiling settings), :mod:`.patch_reading` (pixels
read at a physical size with bounded memory), :mod:`.foreground` (where the
smear is), :mod:`.patch_grid` (the patch grid at a physical size, its cells
read in strips), :mod:`.tiling` (the tiling step: glass, stains and patch
metrics of every cell), :mod:`.quality` (the metrics' pass/fail rules), :mod:`.qc` (thresholds and
decisions as the user's choice) and :mod:`.pipeline` (the resumable stage that
ties them together and writes each slide in one transaction).

What it may import: the top-level modules, :mod:`cmil_core.store`,
:mod:`cmil_core.analysis` and :mod:`cmil_core.clinical`. Two imports run
upwards, inside :func:`.pipeline.ingest` only: the Ray executor
(:mod:`cmil_core.model.distributed`, when ``--executor ray`` is asked for) and
the audit user (:mod:`cmil_core.ops.access`); ``tests/test_architecture.py``
lists them.
"""
