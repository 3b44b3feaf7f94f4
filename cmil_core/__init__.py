"""cmil_core: the pipeline of the cMIL study, without any user interface.

Ma et al., J Transl Med 2026, doi:10.1186/s12967-026-08069-2.

Modules, one per topic (see docs/DESIGN.md):

- ``store``: the DuckDB results store, the only place that writes SQL;
- ``tables`` and ``cohort_import``: reading and validating clinical tables;
- ``slides``, ``discovery``, ``tiling``, ``quality``, ``pipeline``: from slide
  files to quality-checked patches (``ingest``);
- ``encoders``, ``features``, ``mil``, ``modeling``, ``evaluation``: patch
  embeddings, the MIL aggregators, ``train`` and ``score``;
- ``stats``, ``survival``, ``study``: discrimination, survival and summaries;
- ``demo``: the synthetic demo study generator (``_smear`` draws its pixels);
- ``jobs``, ``progress``, ``logs``: background jobs, progress reporting and
  logging (``-v``/``-q``, the dashboard's job log file);
- ``cli``: ``python -m cmil_core`` (installed: the ``cmil`` command),
  argument parsing only.

Nothing in this package imports Streamlit.
"""

#: The version, written here only: pyproject.toml reads it (``[tool.setuptools.dynamic]``),
#: ``cmil --version`` prints it and model configurations record it.
__version__ = "0.1.0"
