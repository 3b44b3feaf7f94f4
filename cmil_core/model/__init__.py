"""The cMIL model: patch CNNs, patch features, MIL aggregators, train and score.

Read in this order: :mod:`.encoders` (the patch CNNs and their weight files),
:mod:`.features` (per-slide feature files, the resumable extraction queue),
:mod:`.finetune` (weakly supervised training of the patch CNN inside each fold),
:mod:`.mil` (the aggregators: histogram + bag of words, gated attention),
:mod:`.modeling` (``train`` and ``score``), :mod:`.recalibration` (score
scales), :mod:`.interpret` (heatmaps and Grad-CAM), :mod:`.controls` (the
no-learning colour control) and :mod:`.distributed` (the Ray executor of
ingest, extraction and scoring).

What it may import: the top-level modules, :mod:`cmil_core.store`,
:mod:`cmil_core.analysis`, :mod:`cmil_core.clinical` and
:mod:`cmil_core.ingest`.
"""
