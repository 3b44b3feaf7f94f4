"""The command line: ``python -m cmil_core COMMAND ...``.

This module only parses arguments and prints results; the work is done by the
functions of the other modules. Each command's parser and the function that
runs it live in :mod:`cmil_core.commands`, one module per family (data, models,
analyses, store upkeep); this module puts them together in the order of
``--help``, adds the global flags, and runs the command asked for.

Exit status: 0 success; 2 bad input or arguments, with one line ``error:
...`` on stderr naming the file, row and column where that applies; 1 any
other failure (such as a store in use by another process), also as one
``error:`` line. Set ``CMIL_DEBUG=1`` (or pass
``-v``) to see tracebacks.

Global flags, before or after the command: ``-v``/``--verbose`` prints the
debug log of ``cmil_core`` on stderr (each slide, each fold...); ``-q``/
``--quiet`` prints no progress bar and no warnings, only errors and the
results. ``--version`` prints the version. Installed, the same entry point is
the ``cmil`` command (``cmil demo``, ``cmil train`` ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from cmil_core import __version__
from cmil_core.commands import analyses, data, models, upkeep
from cmil_core.commands.shared import check_store_path, one_line
from cmil_core.errors import CmilError, InputError
from cmil_core.logs import cli_logging

__all__ = ["console_main", "main"]

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse, with docs/DESIGN.md's one-line ``error:`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _add_verbosity(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v`` and ``-q``, on the main parser (defaults) and on each command (no defaults,
    so that ``cmil -q demo`` and ``cmil demo -q`` both work)."""
    group = p.add_mutually_exclusive_group()
    default = 0 if top else argparse.SUPPRESS
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       default=default,
                       help="print the debug log on stderr (each slide, each fold, tracebacks)")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=default,
                       help="no progress bar and no warnings: only errors and the results")


def _build_parser(prog: str = "python -m cmil_core") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="cMIL: bone-marrow cytology multiple-instance learning for neuroblastoma.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    for add in (data.add_demo, data.add_import_cohort, data.add_ingest, data.add_qc,
                models.add_train, models.add_score, models.add_evaluate,
                analyses.add_roc, analyses.add_survival, analyses.add_cox,
                models.add_report, upkeep.add_check, upkeep.add_backup,
                upkeep.add_restore, data.add_export_geojson):
        add(sub)
    for command in sub.choices.values():
        _add_verbosity(command, top=False)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m cmil_core") -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    with cli_logging(args.verbosity):
        log.debug("%s %s: %s", prog, __version__, args.command)
        try:
            check_store_path(getattr(args, "db", None))
            status = func(args)
            log.debug("%s finished with exit status %d", args.command, status)
            return status
        except InputError as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            log.debug("refused input", exc_info=True)
            return 2
        except (CmilError, OSError) as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            if os.environ.get("CMIL_DEBUG") or args.verbosity > 0:
                traceback.print_exc()
            return 1
        except KeyboardInterrupt:
            print("error: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130


def console_main() -> int:
    """The ``cmil`` command (installed with the package): :func:`main` named ``cmil``."""
    return main(prog="cmil")
