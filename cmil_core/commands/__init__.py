"""The command line's commands: each one's parser and the function that runs it.

What it holds, one module per family: :mod:`.data` (``demo``,
``import-cohort``, ``ingest``, ``qc``, ``export-geojson``), :mod:`.models`
(``train``, ``score``, ``evaluate``, ``report``), :mod:`.analyses` (``roc``,
``survival``, ``cox`` on a table of patients) and :mod:`.upkeep` (``check``,
``backup``, ``restore``), plus :mod:`.shared` (argument types and flags several
commands use, the progress bar, the audit line). Each family module has one
``add_<command>(sub)`` per command; :mod:`cmil_core.cli` calls them in the
order of ``--help`` and runs the command. Like the CLI, these modules only
parse arguments, call the functions that do the work and print the results.

What it may import: everything below it (the top-level modules and every other
folder, each import inside the function that runs a command, so that
``--help`` stays fast); only :mod:`cmil_core.cli` sits above.
"""
