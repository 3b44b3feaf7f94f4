"""What a study produces for readers: evaluations, summaries, figures, the report.

What it holds: :mod:`.evaluation` (discrimination, calibration and survival
of one model, per cohort: pure functions of the model's scores read once,
:class:`cmil_core.store.model_rules.ModelScores`), :mod:`.localisation`
(patch scores against the demo's ground truth), :mod:`.study` (the Study overview's
numbers), :mod:`.plots` (plotly figures for the pages), :mod:`.figures`
(matplotlib figures for papers), :mod:`.palette` (colours) and :mod:`.report`
(the study report folder).

What it may import: everything below it: the top-level modules,
:mod:`cmil_core.store`, :mod:`cmil_core.analysis`, :mod:`cmil_core.clinical`,
:mod:`cmil_core.ingest`, :mod:`cmil_core.model` and :mod:`cmil_core.ops`.
"""
