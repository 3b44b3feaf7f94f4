"""Statistics, pure and checked against R: what the numbers are.

What it holds. Discrimination: :mod:`.roc` (the ROC curve, AUC with DeLong
and bootstrap intervals, DeLong tests, the table-level ROC analysis),
:mod:`.roc_bootstrap` (stratified resamples of the AUC, the ROC confidence
band), :mod:`.cutoffs` (Youden cutoff, Se/Sp/PPV/NPV, Wilson and exact
intervals), :mod:`.calibration` (calibration curves, intercept and slope,
Brier score, decision curves). Survival: :mod:`.survival_data` (the checked
time and event columns), :mod:`.survival` (Kaplan-Meier, log-rank, the
table-level survival analysis), :mod:`.cox` (Cox models),
:mod:`.risk_groups` (risk-group cutoffs), :mod:`.maxstat` (the maximally
selected log-rank statistic), :mod:`.proportional_hazards` (R's
``cox.zph``), :mod:`.time_auc` (time-dependent AUC). And :mod:`.display`
(the names and number formats every page, figure and report uses);
:mod:`._checks` and :mod:`._formatting` are the input checks and text/JSON
formatting these modules share.

What it may import: numpy, pandas, scipy, lifelines and scikit-survival, and
:mod:`cmil_core.errors`; nothing else of :mod:`cmil_core`. These modules know
no store, slide or model: they take arrays and tables, so the tests compare
them number for number with R (``tests/r/``).
"""
