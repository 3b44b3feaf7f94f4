"""The statistics commands on a table of patients: ``roc``, ``survival`` and ``cox``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from cmil_core.commands.shared import Subparsers, add_table_flags
from cmil_core.errors import InputError

__all__ = [
    "add_cox",
    "add_roc",
    "add_survival",
]


_T = TypeVar("_T")


def _print_result(
    result: dict[str, Any], as_json: bool, formatter: Callable[[dict[str, Any]], str]
) -> int:
    if as_json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        print(formatter(result))
    return 0


def _naming_file(path: str, func: Callable[[], _T]) -> _T:
    """Run an analysis of the table ``path``; its input errors name the file first."""
    name = os.path.basename(path)
    try:
        return func()
    except InputError as exc:
        if str(exc).startswith(name):
            raise
        raise InputError(f"{name}: {exc}") from exc


def _cmd_roc(args: argparse.Namespace) -> int:
    from cmil_core.analysis.roc import format_roc, roc_analysis
    from cmil_core.clinical.missing import prepare, read_raw

    raw = read_raw(args.csv, encoding=args.encoding, sheet=args.sheet)
    prepared = _naming_file(args.csv, lambda: prepare(
        raw, numeric=[args.label, *args.score], groups=[args.group],
        drop_missing=args.drop_missing))
    result = _naming_file(args.csv, lambda: roc_analysis(
        prepared.frame, args.label, args.score, positive=args.positive, group=args.group,
        ci_method=args.ci, n_boot=args.n_boot, seed=args.seed, cutoff_group=args.cutoff_group,
    ))
    return _print_result(prepared.annotate(result), args.json, format_roc)


def add_roc(sub: Subparsers) -> None:
    """The ``roc`` command's parser; it runs :func:`_cmd_roc`."""
    p = sub.add_parser("roc", help="ROC, AUC with 95%% CI, Youden cutoff metrics, DeLong tests")
    p.add_argument("--csv", required=True, metavar="FILE", help="one row per patient")
    p.add_argument("--label", required=True, metavar="COL", help="true class column")
    p.add_argument("--positive", metavar="VALUE",
                   help="label value of the positive class (default: the label is 0/1)")
    p.add_argument("--score", required=True, action="append", metavar="COL",
                   help="score column, higher = more likely positive (repeat to compare)")
    p.add_argument("--group", metavar="COL", help="analyse each value of this column apart")
    add_table_flags(p, drop_missing=True)
    p.add_argument("--cutoff-group", metavar="VALUE",
                   help="fix the Youden cutoff on this group (training) and apply it to all")
    p.add_argument("--ci", choices=["delong", "bootstrap"], default="delong")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print JSON (docs/DESIGN.md keys)")
    p.set_defaults(func=_cmd_roc)


def _cutoff(text: str) -> str | float:
    if text in ("median", "youden", "maxstat"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not median, youden, maxstat or a number"
        ) from None


def _times(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a list of numbers like 12,24,36") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}': give non-negative times like 12,24,36")
    return sorted(values)


def _cmd_survival(args: argparse.Namespace) -> int:
    from cmil_core.analysis.survival import format_survival, survival_analysis
    from cmil_core.clinical.missing import prepare, read_raw

    if args.score is not None and args.cutoff is None:
        raise InputError("--score needs --cutoff median|youden|maxstat|NUMBER")
    if args.td_auc_times is not None and args.score is None:
        raise InputError("--td-auc-times needs --score (the AUC is of a score)")
    raw = read_raw(args.csv, encoding=args.encoding, sheet=args.sheet)
    prepared = _naming_file(args.csv, lambda: prepare(
        raw, numeric=[args.time, args.event, args.score, args.label], groups=[args.group],
        drop_missing=args.drop_missing))
    frame = prepared.frame
    result = _naming_file(args.csv, lambda: survival_analysis(
        frame, args.time, args.event, group=args.group, score=args.score, cutoff=args.cutoff,
        label=args.label, positive=args.positive, at_risk_times=args.times,
        min_share=args.min_share, p_method=args.maxstat_p, n_perm=args.n_perm, seed=args.seed,
        td_auc_times=args.td_auc_times,
    ))
    return _print_result(prepared.annotate(result), args.json, format_survival)


def add_survival(sub: Subparsers) -> None:
    """The ``survival`` command's parser; it runs :func:`_cmd_survival`."""
    p = sub.add_parser("survival", help="Kaplan-Meier, log-rank and Cox HR by group or risk group")
    p.add_argument("--csv", required=True, metavar="FILE")
    p.add_argument("--time", required=True, metavar="COL", help="follow-up time column")
    p.add_argument("--event", required=True, metavar="COL",
                   help="event column (1 event, 0 censored)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--group", metavar="COL", help="compare the groups of this column")
    how.add_argument("--score", metavar="COL", help="split patients by this score at --cutoff")
    add_table_flags(p, drop_missing=True)
    p.add_argument("--cutoff", type=_cutoff, metavar="median|youden|maxstat|NUMBER")
    p.add_argument("--label", metavar="COL", help="binary label column, for --cutoff youden")
    p.add_argument("--positive", metavar="VALUE", help="positive value of --label")
    p.add_argument("--times", type=_times, metavar="T1,T2,...",
                   help="times for the number at risk and S(t) (default: round steps)")
    p.add_argument("--min-share", type=float, default=0.1, metavar="X",
                   help="maxstat: least share of patients in each group (R minprop; default 0.1)")
    p.add_argument("--maxstat-p", default="Lau92", metavar="Lau92|Lau94|exactGauss|condMC",
                   help="maxstat: search-corrected p method, as R maxstat's pmethod "
                        "(default Lau92; condMC: seeded Monte Carlo permutations)")
    p.add_argument("--n-perm", type=int, default=10_000, metavar="B",
                   help="maxstat condMC: number of permutations (default 10000, as R)")
    p.add_argument("--seed", type=int, default=0, help="maxstat condMC: permutation seed")
    p.add_argument("--td-auc-times", type=_times, metavar="T1,T2,...",
                   help="with --score: time-dependent AUC of the score at these times "
                        "(cumulative/dynamic, IPCW; e.g. 12,24,36)")
    p.add_argument("--json", action="store_true", help="print JSON (docs/DESIGN.md keys)")
    p.set_defaults(func=_cmd_survival)


def _cmd_cox(args: argparse.Namespace) -> int:
    from cmil_core.analysis.cox import cox_analysis, format_cox
    from cmil_core.clinical.missing import prepare, read_raw

    covariates = [c.strip() for c in args.covariates.split(",") if c.strip()]
    raw = read_raw(args.csv, encoding=args.encoding, sheet=args.sheet)
    prepared = _naming_file(args.csv, lambda: prepare(
        raw, numeric=[args.time, args.event], auto=covariates))
    frame = prepared.frame
    result = _naming_file(args.csv, lambda: cox_analysis(frame, args.time, args.event, covariates))
    return _print_result(prepared.annotate(result), args.json, format_cox)


def add_cox(sub: Subparsers) -> None:
    """The ``cox`` command's parser; it runs :func:`_cmd_cox`."""
    p = sub.add_parser("cox", help="multivariable Cox model (Efron ties), HRs, concordance")
    p.add_argument("--csv", required=True, metavar="FILE")
    p.add_argument("--time", required=True, metavar="COL")
    p.add_argument("--event", required=True, metavar="COL")
    p.add_argument("--covariates", required=True, metavar="A,B,...",
                   help="comma-separated columns; text columns are coded against a reference")
    add_table_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON (docs/DESIGN.md keys)")
    p.set_defaults(func=_cmd_cox)
