"""The cMIL model: patch CNNs, patch features, MIL aggregators, train and score.

Read in this order: :mod:`.encoders` (the patch encoder: its spec,
preprocessing, fast path and extraction; the networks are in :mod:`.backbones`,
the reading of weight, TorchScript and ``.pt2`` files in :mod:`.weight_files`),
:mod:`.features` (per-slide feature files, the resumable extraction queue),
:mod:`.finetune` (weakly supervised training of the patch CNN inside each fold;
its settings in :mod:`.finetune_config`, the patches in memory, their
class-balanced draws and stain augmentation in :mod:`.patch_data`, the training
loop, early stopping and checkpoints in :mod:`.cnn_training`),
:mod:`.mil` (the aggregators' overview, factory and cross-validation; the
interface and shared machinery in :mod:`.aggregator`, the study's histogram +
bag-of-words recipe in :mod:`.histogram_mil`, gated attention in
:mod:`.attention_mil`), :mod:`.modeling` (``train`` and ``score``), :mod:`.recalibration` (score
scales), :mod:`.interpret` (heatmaps and Grad-CAM), :mod:`.controls` (the
no-learning colour control) and :mod:`.distributed` (the Ray executor of
ingest, extraction and scoring).

What it may import: the top-level modules, :mod:`cmil_core.store`,
:mod:`cmil_core.analysis`, :mod:`cmil_core.clinical` and
:mod:`cmil_core.ingest`.
"""
