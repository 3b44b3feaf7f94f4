"""Clinical tables as hospitals keep them, and a cohort made from one.

What it holds: :mod:`.tables` (text and Excel tables, encodings, one frame of
text cells), :mod:`.workbook` (``.xlsx`` sheets with openpyxl), :mod:`.missing`
(missing values by what a column is used for, and the rows they cost) and
:mod:`.cohort_import` (validate a table and import it as a cohort, all or
nothing).

What it may import: the top-level modules (:mod:`cmil_core.errors`, ...),
:mod:`cmil_core.store` and :mod:`cmil_core.analysis`.
"""
