"""The command line: ``python -m cmil_core COMMAND ...``.

This module only parses arguments and prints results; the work is done by the
functions of the other modules. Exit status: 0 success; 2 bad input or
arguments, with one line ``error: ...`` on stderr naming the file, row and
column where that applies; 1 any other failure (such as a store in use by
another process), also as one ``error:`` line. Set ``CMIL_DEBUG=1`` to see
tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import NoReturn

from cmil_core.errors import CmilError, InputError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with DESIGN.md's one-line ``error:`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _add_db(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--db", required=required, metavar="PATH",
        help="results store (DuckDB file); default $CMIL_DB or data/cmil.duckdb",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from cmil_core.demo import generate_demo, summary_dict
    from cmil_core.progress import TerminalProgress

    summary = generate_demo(
        args.db, size=args.size, seed=args.seed, folder=args.out,
        progress=TerminalProgress(), force=args.force,
    )
    if args.json:
        print(json.dumps(summary_dict(summary), indent=2))
    elif summary.skipped:
        print(f"demo ({summary.size}, seed {summary.seed}) already in {summary.db}; "
              "pass --force to rebuild it")
    else:
        cohorts = ", ".join(f"{c} {n}" for c, n in summary.patients.items())
        print(f"demo study ({summary.size}, seed {summary.seed}) in {summary.db}")
        print(f"  patients: {cohorts}")
        print(f"  slides: {summary.slides} ({summary.generated} generated, {summary.reused} kept) "
              f"under {summary.folder}")
        print(f"  ground-truth tumour regions: {summary.tumour_regions}")
    return 0


def _cmd_import_cohort(args: argparse.Namespace) -> int:
    from cmil_core.cohort_import import import_cohort

    result = import_cohort(
        args.db, args.cohort, args.csv, role=args.role, center=args.center,
        replace=args.replace, dry_run=args.dry_run,
    )
    if args.json:
        data = asdict(result)
        data.pop("rows")
        print(json.dumps({**data, "dry_run": args.dry_run}, indent=2))
        return 0
    verb = "valid, not imported (dry run)" if args.dry_run else f"imported into {args.db}"
    print(f"{result.source}: {result.patients} patients {verb} as cohort '{result.cohort}'")
    print(f"  bone-marrow metastasis: {result.positives} positive, {result.negatives} negative, "
          f"{result.unlabelled} unknown")
    mapped = ", ".join(f"{k} <- '{v}'" for k, v in result.columns.items())
    print(f"  columns: {mapped}")
    if result.clinical_columns:
        print(f"  kept as clinical variables: {', '.join(result.clinical_columns)}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m cmil_core",
        description="cMIL: bone-marrow cytology multiple-instance learning for neuroblastoma.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="generate the synthetic demo study into a store")
    _add_db(p)
    p.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: about 30 patients (tests); full: the paper's 359")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same study)")
    p.add_argument("--out", metavar="DIR", help="folder for the demo's files; default <store folder>/demo")
    p.add_argument("--force", action="store_true", help="rebuild even if the store holds this demo")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("import-cohort", help="validate and import a clinical table, all or nothing")
    _add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="cohort name, e.g. A")
    p.add_argument("--csv", required=True, metavar="FILE",
                   help="clinical table (comma, semicolon or tab separated)")
    p.add_argument("--role", choices=["train", "validation", "test"], default="validation")
    p.add_argument("--center", metavar="TEXT", help="centre that contributed the cohort")
    p.add_argument("--replace", action="store_true",
                   help="replace the clinical table of an existing cohort")
    p.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_import_cohort)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CmilError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if os.environ.get("CMIL_DEBUG"):
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
