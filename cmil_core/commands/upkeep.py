"""The store upkeep commands: ``check``, ``backup`` and ``restore``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from cmil_core.commands.shared import Subparsers, add_db

__all__ = [
    "add_backup",
    "add_check",
    "add_restore",
]


def _cmd_check(args: argparse.Namespace) -> int:
    from cmil_core.ops.maintenance import check_store, format_check
    from cmil_core.store import default_db_path

    report = check_store(args.db or default_db_path(), hash_files=not args.no_hash,
                         repair=args.repair)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_check(report))
    return 0 if report.ok else 1


def add_check(sub: Subparsers) -> None:
    """The ``check`` command's parser; it runs :func:`_cmd_check`."""
    p = sub.add_parser("check", help="check the store: orphans, counts, slide, feature and model "
                                     "files, leftovers of killed runs; exit 1 on a problem")
    add_db(p)
    p.add_argument("--no-hash", action="store_true",
                   help="skip hashing slide files and reading feature and model files whole")
    p.add_argument("--repair", action="store_true",
                   help="fix what is safe: delete orphan rows, model folders without a row and "
                        "leftover temporary files; then check again")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_check)


def _cmd_backup(args: argparse.Namespace) -> int:
    from cmil_core.ops.backup import backup_store
    from cmil_core.store import default_db_path

    summary = backup_store(args.db or default_db_path(), args.out, features=not args.no_features,
                           force=args.force)
    if args.json:
        print(json.dumps(asdict(summary), indent=2))
    else:
        print(f"{summary.archive}: backup of {summary.db} ({summary.members} files, "
              f"{summary.bytes / 1e6:.1f} MB before compression; {summary.models} model(s)"
              f"{'' if summary.features else ', without feature files'})")
    return 0


def add_backup(sub: Subparsers) -> None:
    """The ``backup`` command's parser; it runs :func:`_cmd_backup`."""
    p = sub.add_parser("backup", help="one archive of the store, models, features and reports")
    add_db(p)
    p.add_argument("--out", required=True, metavar="FILE", help="archive to write (a zip)")
    p.add_argument("--no-features", action="store_true",
                   help="leave out the feature files (recomputed when needed)")
    p.add_argument("--force", action="store_true", help="replace an existing archive")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_backup)


def _cmd_restore(args: argparse.Namespace) -> int:
    from cmil_core.ops.backup import restore_store
    from cmil_core.ops.maintenance import format_check
    from cmil_core.store import default_db_path

    summary = restore_store(args.backup, args.db or default_db_path(), force=args.force,
                            hash_files=not args.no_hash)
    if args.json:
        data = asdict(summary)
        data["check"] = summary.check.to_dict()
        print(json.dumps(data, indent=2))
    else:
        print(f"{summary.db}: restored from {summary.backup} (made {summary.created_at} of "
              f"{summary.source}; {summary.members} files, {summary.models} model(s)"
              f"{'' if summary.features else ', without feature files'})")
        print(format_check(summary.check))
    return 0 if summary.check.ok else 1


def add_restore(sub: Subparsers) -> None:
    """The ``restore`` command's parser; it runs :func:`_cmd_restore`."""
    p = sub.add_parser("restore", help="restore a backup archive as the store --db, then check it")
    p.add_argument("--backup", required=True, metavar="FILE", help="archive written by backup")
    add_db(p)
    p.add_argument("--force", action="store_true",
                   help="replace an existing store (and its models, reports and features)")
    p.add_argument("--no-hash", action="store_true", help="check without hashing slide files")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_restore)
