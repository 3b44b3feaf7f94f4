"""cmil_core: the pipeline of the cMIL study, without any user interface.

Ma et al., "cMIL: ...", J Transl Med 2026, doi:10.1186/s12967-026-08069-2.

Modules, one per topic (see DESIGN.md):

- ``store``: the DuckDB results store, the only place that writes SQL;
- ``cohort_import``: validation and import of clinical tables;
- ``tables``: reading delimited text tables (delimiter, encoding, decimal comma);
- ``demo``: the synthetic demo study generator (``_smear`` draws its pixels);
- ``stats`` and ``survival``: discrimination and survival statistics;
- ``progress``: progress reporting shared by the command line and the pages;
- ``cli``: ``python -m cmil_core``, argument parsing only.

Nothing in this package imports Streamlit.
"""

__version__ = "0.1.0"
