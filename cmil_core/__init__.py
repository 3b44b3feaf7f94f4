"""cmil_core: the pipeline of the cMIL study, without any user interface.

Ma et al., J Transl Med 2026, doi:10.1186/s12967-026-08069-2.

Folders, in the order the data flows and each importing only those before it
(``tests/test_architecture.py`` checks it; each folder's ``__init__`` says what it
holds and may import):

- ``store/``: the DuckDB results store, the only place that writes SQL;
- ``analysis/``: statistics as R computes them (ROC, survival, calibration) and
  the display names and number formats;
- ``clinical/``: clinical tables (text, Excel, encodings, missing values) and
  cohort import;
- ``ingest/``: slide files to quality-checked patches (discovery, slides,
  stains, tiling, quality, QC decisions, the ingest pipeline);
- ``model/``: patch CNNs, feature files, CNN training, MIL aggregators,
  ``train``/``score``, interpretation, the colour control, the Ray executor;
- ``ops/``: access and audit, background jobs, ``check``/``backup``/``restore``;
- ``outputs/``: evaluation of a model, study summaries, plots, figures, the report;
- ``viewer/``: the review queue, a patient, the slide viewer's tiles and layers;
- ``demo/``: the synthetic demo study and its first-launch build;
- ``commands/``: each command's arguments and the call it makes, by family
  (data, models, analyses, store upkeep).

At the top level: ``errors``, ``progress``, ``logs``, ``store_folder`` (the
data folder's layout beside the store file) and ``_atomic`` (atomic file
writes), which every folder may use, and ``cli`` (``python -m cmil_core``,
installed as the ``cmil`` command; argument parsing only: it puts the
``commands/`` together).

Nothing in this package imports Streamlit.
"""

#: The version, written here only: pyproject.toml reads it (``[tool.setuptools.dynamic]``),
#: ``cmil --version`` prints it and model configurations record it.
__version__ = "0.1.0"
