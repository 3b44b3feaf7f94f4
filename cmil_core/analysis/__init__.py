"""Statistics, pure and checked against R: what the numbers are.

What it holds: :mod:`.stats` (ROC, AUC with DeLong and bootstrap intervals,
tests, cutoffs), :mod:`.survival` (Kaplan-Meier, log-rank, Cox models,
risk-group cutoffs), :mod:`.proportional_hazards` (R's ``cox.zph``),
:mod:`.time_auc` (time-dependent AUC), :mod:`.calibration` (intercept and
slope), :mod:`.display` (the names and number formats every page, figure and
report uses); :mod:`._checks` and :mod:`._formatting` are the input checks and
text/JSON formatting these modules share.

What it may import: numpy, pandas, scipy, lifelines and scikit-survival, and
:mod:`cmil_core.errors`; nothing else of :mod:`cmil_core`. These modules know
no store, slide or model: they take arrays and tables, so the tests compare
them number for number with R (``tests/r/``).
"""
