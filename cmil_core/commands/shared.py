"""What several commands share: argument types and flags, the progress bar, the audit line.

:func:`check_store_path` refuses a ``--db`` that is no store (``main`` calls it
for every command; commands that need an existing store call it again with
``must_exist``); :func:`one_line` keeps an error message on one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TypeAlias

from cmil_core.errors import InputError
from cmil_core.progress import ProgressCallback

__all__ = [
    "Subparsers",
    "add_db",
    "add_executor",
    "add_table_flags",
    "audit",
    "check_store_path",
    "one_line",
    "parse_model_id",
    "progress",
]


#: What ``add_subparsers()`` returns: each command module adds its parsers to it
#: (of the CLI's own ArgumentParser subclass, hence Any).
Subparsers: TypeAlias = "argparse._SubParsersAction[Any]"


def check_store_path(db: str | None, *, must_exist: bool = False) -> None:
    """Refuse a --db that is a folder or a file that is not a DuckDB store; with
    ``must_exist`` (commands that read or extend a store), also one that names no
    file: a typo, refused before an empty store is created for it."""
    if db is None:
        return
    path = os.path.expanduser(db)
    if os.path.isdir(path):
        raise InputError(f"--db {db}: is a folder; give the store file (e.g. {db}/cmil.duckdb)")
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            head = fh.read(12)
        if head and head[8:12] != b"DUCK":
            raise InputError(f"--db {db}: not a DuckDB store file")
    elif must_exist:
        raise InputError(
            f"--db {db}: no store here; create one with import-cohort (or demo) first"
        )


def one_line(message: str) -> str:
    """The message with control characters (a newline inside a value) escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)


def parse_model_id(text: str) -> str:
    if not text.strip() or len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"'{one_line(text[:40])}{'…' if len(text) > 40 else ''}' ({len(text)} characters) "
            "is not a model id; see the Models page or train's last line"
        )
    return text


def progress(args: argparse.Namespace) -> ProgressCallback:
    """A progress bar on stderr, or none with ``-q``."""
    from cmil_core.progress import TerminalProgress, no_progress

    return no_progress if args.verbosity < 0 else TerminalProgress()


def add_executor(p: argparse.ArgumentParser, what: str) -> None:
    """``--executor local|ray`` and ``--ray-address`` (cmil_core.model.distributed)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help=f"where the command {what}: local (this machine, the default) or ray "
                        "(a Ray cluster; needs requirements-cluster.txt); this process alone "
                        "writes the store")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="Ray cluster to join with --executor ray, e.g. 10.0.0.1:6379 "
                        "(default $CMIL_RAY_ADDRESS, else a cluster started with ray start on "
                        "this machine, else a new local one)")


def add_db(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--db", required=required, metavar="PATH",
        help="results store (DuckDB file); default $CMIL_DB or data/cmil.duckdb",
    )


def add_table_flags(p: argparse.ArgumentParser, drop_missing: bool = False) -> None:
    """``--encoding`` and ``--sheet`` of the commands reading a clinical table (and
    ``--drop-missing`` of those that compare groups)."""
    p.add_argument("--encoding", metavar="NAME",
                   help="text encoding of the table (e.g. gb18030, gbk, big5, shift_jis, "
                        "euc_kr, utf-16, cp1252); default: detected, refused when unsure")
    p.add_argument("--sheet", metavar="NAME|NUMBER",
                   help="sheet of an .xlsx workbook, by name or number (1 = first; default "
                        "the first)")
    if drop_missing:
        p.add_argument("--drop-missing", action="store_true",
                       help="go on when every row of a group level misses a value (the level "
                            "is left out); refused otherwise")


def audit(args: argparse.Namespace, action: str, **fields: Any) -> None:
    """Record a finished command in the store's audit trail, as the operating-system user."""
    from cmil_core.ops.access import cli_user, record

    problem = record(args.db, cli_user(), action, **fields)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
