"""The command line: ``python -m cmil_core COMMAND ...``.

This module only parses arguments and prints results; the work is done by the
functions of the other modules. Exit status: 0 success; 2 bad input or
arguments, with one line ``error: ...`` on stderr naming the file, row and
column where that applies; 1 any other failure (such as a store in use by
another process), also as one ``error:`` line. Set ``CMIL_DEBUG=1`` (or pass
``-v``) to see tracebacks.

Global flags, before or after the command: ``-v``/``--verbose`` prints the
debug log of ``cmil_core`` on stderr (each slide, each fold...); ``-q``/
``--quiet`` prints no progress bar and no warnings, only errors and the
results. ``--version`` prints the version. Installed, the same entry point is
the ``cmil`` command (``cmil demo``, ``cmil train`` ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NoReturn, TypeVar

from cmil_core import __version__
from cmil_core.errors import CmilError, InputError
from cmil_core.logs import cli_logging
from cmil_core.progress import ProgressCallback

__all__ = ["console_main", "main"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Parser(argparse.ArgumentParser):
    """argparse, with docs/DESIGN.md's one-line ``error:`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _check_store_path(db: str | None, *, must_exist: bool = False) -> None:
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


def _one_line(message: str) -> str:
    """The message with control characters (a newline inside a value) escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)


def _folds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value}: cross-validation needs at least 2 folds")
    return value


def _model_id(text: str) -> str:
    if not text.strip() or len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"'{_one_line(text[:40])}{'…' if len(text) > 40 else ''}' ({len(text)} characters) "
            "is not a model id; see the Models page or train's last line"
        )
    return text


def _progress(args: argparse.Namespace) -> ProgressCallback:
    """A progress bar on stderr, or none with ``-q``."""
    from cmil_core.progress import TerminalProgress, no_progress

    return no_progress if args.verbosity < 0 else TerminalProgress()


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


def _add_executor(p: argparse.ArgumentParser, what: str) -> None:
    """``--executor local|ray`` and ``--ray-address`` (cmil_core.model.distributed)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help=f"where the command {what}: local (this machine, the default) or ray "
                        "(a Ray cluster; needs requirements-cluster.txt); this process alone "
                        "writes the store")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="Ray cluster to join with --executor ray, e.g. 10.0.0.1:6379 "
                        "(default $CMIL_RAY_ADDRESS, else a cluster started with ray start on "
                        "this machine, else a new local one)")


def _add_db(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--db", required=required, metavar="PATH",
        help="results store (DuckDB file); default $CMIL_DB or data/cmil.duckdb",
    )


def _add_table_flags(p: argparse.ArgumentParser, drop_missing: bool = False) -> None:
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


def _audit(args: argparse.Namespace, action: str, **fields: Any) -> None:
    """Record a finished command in the store's audit trail, as the operating-system user."""
    from cmil_core.ops.access import cli_user, record

    problem = record(args.db, cli_user(), action, **fields)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    from cmil_core.demo.generator import generate_demo, summary_dict

    summary = generate_demo(
        args.db, size=args.size, seed=args.seed, folder=args.out,
        progress=_progress(args), force=args.force,
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
        print(f"  patches: {summary.patches} ({summary.patches_passed} passed quality control)")
        print(f"  ground-truth tumour regions: {summary.tumour_regions}")
        patch_cnn = summary.details.get("patch_cnn")
        for model_id, how in (patch_cnn.items() if isinstance(patch_cnn, dict) else ()):
            print(f"  model {model_id}: patch CNN {how}")
    return 0


def _cmd_import_cohort(args: argparse.Namespace) -> int:
    from cmil_core.clinical.cohort_import import import_cohort

    result = import_cohort(
        args.db, args.cohort, args.csv, role=args.role, center=args.center,
        replace=args.replace, dry_run=args.dry_run, encoding=args.encoding, sheet=args.sheet,
    )
    if not args.dry_run:
        _audit(args, "import", cohort=result.cohort,
               details={"source": result.source, "patients": result.patients,
                        "replace": bool(args.replace), "via": "cli"})
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
    print(f"  read as {result.encoding}" + (f", sheet '{result.sheet}'" if result.sheet else ""))
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _qc_flags(args: argparse.Namespace) -> dict[str, float | str | None]:
    from cmil_core.ingest.qc import QC_FIELDS

    return {name: getattr(args, f"qc_{name}") for name in QC_FIELDS}


def _add_qc_flags(p: argparse.ArgumentParser) -> None:
    """``--qc FILE`` and one flag per QC threshold (from the dataclass's fields)."""
    from cmil_core.ingest.qc import SETTING_FIELDS, THRESHOLD_FIELDS, flag_name
    from cmil_core.ingest.quality import QCThresholds

    p.add_argument("--qc", metavar="FILE",
                   help="QC thresholds file (TOML, or JSON for *.json): keys as the flags "
                        "below, with underscores; a flag overrides the file")
    defaults = QCThresholds()
    for name in THRESHOLD_FIELDS:
        p.add_argument(flag_name(name), dest=f"qc_{name}", type=float, metavar="X",
                       help=f"QC threshold {name} (default {getattr(defaults, name):g})")
    for name, choices in SETTING_FIELDS.items():
        p.add_argument(flag_name(name), dest=f"qc_{name}", choices=choices,
                       help=f"QC setting {name} (default {getattr(defaults, name)}): 'field' "
                            "keeps a photograph's patches without nuclear material when the "
                            "photograph holds a nucleated cell, 'patch' judges each patch; "
                            "whole-slide files are always judged per patch")


def _cmd_ingest(args: argparse.Namespace) -> int:
    from cmil_core.ingest.pipeline import format_ingest_summary, ingest
    from cmil_core.ingest.qc import resolve_thresholds
    from cmil_core.ingest.tiling import TilingConfig
    from cmil_core.ops.access import cli_user

    config = TilingConfig(patch_um=args.patch_um, overlap=args.overlap)
    thresholds = resolve_thresholds(args.qc, _qc_flags(args))  # None: the cohort's current
    _check_store_path(args.db, must_exist=True)
    summary = ingest(
        args.db, args.cohort, args.slides, manifest=args.manifest, mpp=args.mpp,
        config=config, thresholds=thresholds, progress=_progress(args), who=cli_user(),
        executor=args.executor, ray_address=args.ray_address,
    )
    from cmil_core.ops.access import ingest_details

    _audit(args, "ingest", cohort=args.cohort, details={**ingest_details(summary), "via": "cli"})
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_ingest_summary(summary))
    return 0


def _param(text: str) -> tuple[str, int | float]:
    """``NAME=VALUE`` of ``--param``: an aggregator hyper-parameter and its number."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VALUE (e.g. max_epochs=20)")
    try:
        return name, int(value)
    except ValueError:
        pass
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': {value!r} is not a number") from None


def _cnn_param(text: str) -> tuple[str, object]:
    """NAME=VALUE of a CNN training setting: a number, true/false, or a word (pooling=mean)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VALUE (e.g. max_epochs=8)")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def _triple(text: str) -> tuple[float, float, float]:
    """Three numbers separated by commas (a per-channel mean or std)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not three numbers R,G,B (e.g. 0.5,0.5,0.5)")
    return values[0], values[1], values[2]


def _print_encoder_training(db: str, model_id: str, *, quiet: bool) -> None:
    """One line on stderr: whether the patch CNN was trained or frozen, and why (auto rule)."""
    from cmil_core import store

    if quiet:
        return
    with store.using(db, read_only=True) as st:
        row = store.get_model(st, model_id)
    if row is None:
        return
    metrics = row.metrics
    line = f"patch CNN: {metrics.get('encoder_training', 'frozen')}"
    if metrics.get("encoder_training_note"):
        line += f" ({metrics['encoder_training_note']})"
    print(line, file=sys.stderr)


def _cmd_train(args: argparse.Namespace) -> int:
    from cmil_core.model.finetune import FinetuneConfig
    from cmil_core.model.mil import make_aggregator
    from cmil_core.model.modeling import train

    params = dict(args.param or [])
    make_aggregator(args.aggregator, **params)  # refuse a bad --param before any work
    cnn_params = dict(args.cnn_param or [])
    cnn = None
    if args.encoder_training != "frozen":  # refuse a bad --cnn-param before any work
        cnn = FinetuneConfig.from_params(cnn_params)
    elif cnn_params:
        raise InputError("--cnn-param applies to --encoder-training finetune or auto only")
    _check_store_path(args.db, must_exist=True)
    model_id = train(
        args.db, args.cohort, aggregator=args.aggregator, encoder=args.encoder,
        weights=args.weights, seed=args.seed, folds=args.folds, params=params or None,
        progress=_progress(args), encoder_training=args.encoder_training, cnn=cnn,
        input_px=args.input_px, mean=args.mean, std=args.std,
        executor=args.executor, ray_address=args.ray_address,
    )
    _print_encoder_training(args.db, model_id, quiet=args.verbosity < 0)
    _audit(args, "train", cohort=args.cohort, model_id=model_id,
           details={"aggregator": args.aggregator, "encoder": args.encoder, "seed": args.seed,
                    "folds": args.folds, "params": params, "via": "cli",
                    "encoder_training": args.encoder_training, "cnn_params": cnn_params})
    print(model_id)  # the contract: the model id is the last line of standard output
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from cmil_core.model.modeling import score

    _check_store_path(args.db, must_exist=True)
    done = score(args.db, args.model, args.cohort or None, progress=_progress(args),
                 allow_tiling_mismatch=args.allow_tiling_mismatch,
                 executor=args.executor, ray_address=args.ray_address)
    for cohort, n in done.items():
        _audit(args, "score", cohort=cohort, model_id=args.model,
               details={"patients": n, "via": "cli"})
    for cohort, n in done.items():
        print(f"{cohort}: {n} patients scored with {args.model}")
    return 0


def _cmd_qc(args: argparse.Namespace) -> int:
    from cmil_core import store
    from cmil_core.ingest.qc import (
        apply_thresholds,
        cohort_thresholds,
        format_qc,
        qc_status,
        resolve_thresholds,
    )
    from cmil_core.ops.access import cli_user

    _check_store_path(args.db, must_exist=True)
    with store.open_store(args.db, read_only=not args.apply) as st:
        if args.cohort not in {c.cohort for c in store.list_cohorts(st)}:
            raise InputError(f"cohort '{args.cohort}' does not exist in {args.db}")
        current = cohort_thresholds(st, args.cohort)
        wanted = resolve_thresholds(args.qc, _qc_flags(args), base=current) or current
        decision = None
        if args.apply:
            if wanted is None:
                raise InputError("--apply needs thresholds: --qc FILE or a threshold flag")
            decision = apply_thresholds(st, args.cohort, wanted, who=cli_user(), source="cli")
        result = qc_status(st, args.cohort, wanted, decision)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_qc(result))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cmil_core import store
    from cmil_core.model.controls import colour_control, format_control
    from cmil_core.outputs.evaluation import (
        calibration,
        calibration_summary,
        discrimination,
        format_calibration,
        format_evaluation,
        localisation,
        patient_flow,
    )

    _check_store_path(args.db, must_exist=True)
    with store.open_store(args.db, read_only=True) as st:
        rows = discrimination(st, args.model, in_sample=args.in_sample)
        loc = localisation(st, args.model) if store.table_counts(st)["demo_tumor_regions"] else None
        flow = patient_flow(st, args.model)
        control = colour_control(st, [r["cohort"] for r in rows])
        calibrated = calibration(st, args.model, in_sample=args.in_sample)
    if args.json:
        print(json.dumps({"cohorts": rows, "localisation": loc, "colour_control": control,
                          "patient_flow": flow.to_dict("records"),
                          "calibration": calibration_summary(calibrated)}, indent=2))
    else:
        print(format_evaluation(rows, loc, flow))
        print(format_calibration(calibrated))
        print(format_control(control, rows))
    return 0


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
    from cmil_core.analysis.stats import format_roc, roc_analysis
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


def _cmd_cox(args: argparse.Namespace) -> int:
    from cmil_core.analysis.survival import cox_analysis, format_cox
    from cmil_core.clinical.missing import prepare, read_raw

    covariates = [c.strip() for c in args.covariates.split(",") if c.strip()]
    raw = read_raw(args.csv, encoding=args.encoding, sheet=args.sheet)
    prepared = _naming_file(args.csv, lambda: prepare(
        raw, numeric=[args.time, args.event], auto=covariates))
    frame = prepared.frame
    result = _naming_file(args.csv, lambda: cox_analysis(frame, args.time, args.event, covariates))
    return _print_result(prepared.annotate(result), args.json, format_cox)


def _report_cutoff(text: str) -> str | float:
    if text in ("model", "youden", "median", "maxstat"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not model, youden, median, maxstat or a number"
        ) from None


def _cmd_report(args: argparse.Namespace) -> int:
    from cmil_core.outputs.report import write_report

    _check_store_path(args.db, must_exist=True)
    path = write_report(args.db, args.model, args.out, endpoint=args.endpoint,
                        cutoff=args.cutoff, progress=_progress(args),
                        pseudonymise=args.pseudonymise, in_sample=args.in_sample)
    _audit(args, "export", model_id=args.model,
           details={"kind": "report", "out": str(path.parent), "endpoint": args.endpoint,
                    "cutoff": args.cutoff, "pseudonymised": bool(args.pseudonymise),
                    "in_sample": bool(args.in_sample), "via": "cli"})
    print(path)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from cmil_core.ops.maintenance import check_store, format_check
    from cmil_core.store import default_db_path

    report = check_store(args.db or default_db_path(), hash_files=not args.no_hash,
                         repair=args.repair)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_check(report))
    return 0 if report.ok else 1


def _cmd_backup(args: argparse.Namespace) -> int:
    from cmil_core.ops.maintenance import backup_store
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


def _cmd_restore(args: argparse.Namespace) -> int:
    from cmil_core.ops.maintenance import format_check, restore_store
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


def _cmd_export_geojson(args: argparse.Namespace) -> int:
    from cmil_core.viewer.overlays import export_geojson

    _check_store_path(args.db, must_exist=True)
    if args.out is None:
        collections = export_geojson(args.db, args.model, args.cohort, args.patient)
        if len(collections) != 1:
            raise InputError(f"the selection holds {len(collections)} slides, one GeoJSON each: "
                             "give --out DIR (or --patient for one patient's slide)")
        print(json.dumps(collections[0][1]))
    else:
        written = export_geojson(args.db, args.model, args.cohort, args.patient, args.out)
        for file, collection in written:
            print(f"{file}: {len(collection['features'])} features")
    _audit(args, "export", cohort=args.cohort, model_id=args.model,
           details={"kind": "geojson", "patient": args.patient, "out": args.out, "via": "cli"})
    return 0


def _build_parser(prog: str = "python -m cmil_core") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="cMIL: bone-marrow cytology multiple-instance learning for neuroblastoma.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="generate the synthetic demo study into a store")
    _add_db(p)
    p.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: about 30 patients (tests); full: the paper's 359")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same study)")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the demo's files; default <store folder>/demo")
    p.add_argument("--force", action="store_true", help="rebuild even if the store holds this demo")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("import-cohort", help="validate and import a clinical table, all or nothing")
    _add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="cohort name, e.g. A")
    p.add_argument("--csv", required=True, metavar="FILE",
                   help="clinical table (comma, semicolon or tab separated text, or .xlsx)")
    _add_table_flags(p)
    p.add_argument("--role", choices=["train", "validation", "test"], default="validation")
    p.add_argument("--center", metavar="TEXT", help="centre that contributed the cohort")
    p.add_argument("--replace", action="store_true",
                   help="replace the clinical table of an existing cohort")
    p.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_import_cohort)

    p = sub.add_parser("ingest", help="register, tile and quality-check a cohort's slides")
    _add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="cohort whose clinical table is imported")
    p.add_argument("--slides", required=True, metavar="DIR_OR_ZIP",
                   help="folder (or zip) of slides: files named PATIENT_..., "
                        "or one folder per patient")
    p.add_argument("--manifest", metavar="CSV",
                   help="table with slide_path, patient_id and optionally mpp, per slide")
    p.add_argument("--mpp", type=float, metavar="X",
                   help="microns per pixel, for slides whose files give none (or a wrong one)")
    p.add_argument("--patch-um", type=float, default=112.0, metavar="UM",
                   help="patch side in microns (default 112: 224 px at 0.5 um/px)")
    p.add_argument("--overlap", type=float, default=0.0, help="patch overlap, 0 to 0.9")
    _add_qc_flags(p)
    _add_executor(p, "reads and tiles the slides")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("qc", help="quality control of a cohort: counts under other thresholds "
                                  "(read-only), or --apply them as a new decision")
    _add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="cohort whose slides are ingested")
    _add_qc_flags(p)
    p.add_argument("--apply", action="store_true",
                   help="record the thresholds as the cohort's new QC decision (re-judges the "
                        "stored metrics; reads no slide)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_qc)

    p = sub.add_parser("train", help="train a cMIL model on a training cohort")
    _add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="training cohort (its slides ingested)")
    p.add_argument("--aggregator", choices=["histogram", "attention"], default="attention",
                   help="histogram: the study's patch classifier + histogram/TF-IDF + logistic "
                        "regression; attention: gated attention MIL")
    p.add_argument("--encoder", default="smallcnn",
                   choices=["smallcnn", "resnet18", "resnet34", "resnet50", "torchscript",
                            "export"],
                   help="patch encoder (default smallcnn: fast on a CPU)")
    p.add_argument("--weights", metavar="FILE",
                   help="local encoder weights: a torchvision-format state dict (torch or "
                        "safetensors file), a TorchScript file with --encoder torchscript, a "
                        "torch.export .pt2 program with --encoder export; without it a seeded "
                        "initialisation")
    p.add_argument("--encoder-training", choices=["auto", "finetune", "frozen"], default="auto",
                   help="finetune: train the patch CNN on the smears with the patients' labels "
                        "inside each cross-validation fold (the study's method; --weights is "
                        "its starting point); frozen: embed with the encoder as loaded; auto "
                        "(default): finetune, unless the smaller class has under 10 patients "
                        "or 100 quality-passed patches, or the encoder is a whole program "
                        "(then frozen, and train says so)")
    p.add_argument("--cnn-param", type=_cnn_param, action="append", metavar="NAME=VALUE",
                   help="CNN training setting (repeat; finetune only), e.g. --cnn-param "
                        "max_epochs=8 --cnn-param input_px=64: input_px, patches_per_patient, "
                        "patches_per_epoch, max_epochs, patience, lr, pooling (max|mean), "
                        "augment, precision (auto|bf16|fp16|fp32), ... "
                        "(cmil_core.model.finetune.FinetuneConfig lists them all)")
    p.add_argument("--input-px", type=int, metavar="PX",
                   help="side the encoder's input is resized to (default 224 frozen, 96 "
                        "finetune); give it with --encoder torchscript/export as the model "
                        "was trained")
    p.add_argument("--mean", type=_triple, metavar="R,G,B",
                   help="per-channel input mean of [0, 1] pixels (default ImageNet's)")
    p.add_argument("--std", type=_triple, metavar="R,G,B",
                   help="per-channel input standard deviation (default ImageNet's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=_folds, default=5,
                   help="cross-validation folds (patient-stratified)")
    p.add_argument("--param", type=_param, action="append", metavar="NAME=VALUE",
                   help="aggregator hyper-parameter (repeat), e.g. --param max_epochs=20 "
                        "--param lr=0.001; histogram: hidden, dropout, lr, max_epochs, n_bins, C, "
                        "...; attention: embed_dim, attention_dim, dropout, lr, max_epochs, ... "
                        "(the model's config.json lists them all)")
    _add_executor(p, "computes the feature files")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("score", help="score cohorts with a trained model")
    _add_db(p, required=True)
    p.add_argument("--model", required=True, type=_model_id, metavar="ID",
                   help="model id printed by train")
    p.add_argument("--cohort", action="append", metavar="NAME",
                   help="cohort to score (repeat; default: every cohort)")
    p.add_argument("--allow-tiling-mismatch", action="store_true",
                   help="score cohorts whose patch size, overlap or QC thresholds differ from "
                        "the training cohort's (refused otherwise); their scores are marked")
    _add_executor(p, "computes the feature files")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("evaluate", help="a model's AUC per cohort (and, on the demo, localisation)")
    _add_db(p, required=True)
    p.add_argument("--model", required=True, type=_model_id, metavar="ID")
    p.add_argument("--in-sample", action="store_true",
                   help="training row from the final model's in-sample scores (optimistic) "
                        "instead of its out-of-fold scores")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("roc", help="ROC, AUC with 95%% CI, Youden cutoff metrics, DeLong tests")
    p.add_argument("--csv", required=True, metavar="FILE", help="one row per patient")
    p.add_argument("--label", required=True, metavar="COL", help="true class column")
    p.add_argument("--positive", metavar="VALUE",
                   help="label value of the positive class (default: the label is 0/1)")
    p.add_argument("--score", required=True, action="append", metavar="COL",
                   help="score column, higher = more likely positive (repeat to compare)")
    p.add_argument("--group", metavar="COL", help="analyse each value of this column apart")
    _add_table_flags(p, drop_missing=True)
    p.add_argument("--cutoff-group", metavar="VALUE",
                   help="fix the Youden cutoff on this group (training) and apply it to all")
    p.add_argument("--ci", choices=["delong", "bootstrap"], default="delong")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print JSON (docs/DESIGN.md keys)")
    p.set_defaults(func=_cmd_roc)

    p = sub.add_parser("survival", help="Kaplan-Meier, log-rank and Cox HR by group or risk group")
    p.add_argument("--csv", required=True, metavar="FILE")
    p.add_argument("--time", required=True, metavar="COL", help="follow-up time column")
    p.add_argument("--event", required=True, metavar="COL",
                   help="event column (1 event, 0 censored)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--group", metavar="COL", help="compare the groups of this column")
    how.add_argument("--score", metavar="COL", help="split patients by this score at --cutoff")
    _add_table_flags(p, drop_missing=True)
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

    p = sub.add_parser("cox", help="multivariable Cox model (Efron ties), HRs, concordance")
    p.add_argument("--csv", required=True, metavar="FILE")
    p.add_argument("--time", required=True, metavar="COL")
    p.add_argument("--event", required=True, metavar="COL")
    p.add_argument("--covariates", required=True, metavar="A,B,...",
                   help="comma-separated columns; text columns are coded against a reference")
    _add_table_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON (docs/DESIGN.md keys)")
    p.set_defaults(func=_cmd_cox)

    p = sub.add_parser("report",
                       help="every table and figure of a model: HTML, JSON, CSV, PNG, SVG")
    _add_db(p, required=True)
    p.add_argument("--model", required=True, type=_model_id, metavar="ID")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write (new, empty, or a previous report, which is replaced)")
    p.add_argument("--endpoint", choices=["os", "efs"], default="os",
                   help="survival endpoint: overall or event-free survival")
    p.add_argument("--cutoff", type=_report_cutoff, default="model",
                   metavar="model|youden|median|maxstat|NUMBER",
                   help="risk-group cutoff, fixed on the training cohort (default: the model's)")
    p.add_argument("--in-sample", action="store_true",
                   help="training rows from the final model's in-sample scores (optimistic, "
                        "labelled so) instead of its out-of-fold scores")
    p.add_argument("--pseudonymise", action="store_true",
                   help="replace every patient id by a salted hash (HMAC-SHA256; salt from "
                        "$CMIL_PSEUDONYM_SALT, else a random one not kept)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("check", help="check the store: orphans, counts, slide, feature and model "
                                     "files, leftovers of killed runs; exit 1 on a problem")
    _add_db(p)
    p.add_argument("--no-hash", action="store_true",
                   help="skip hashing slide files and reading feature and model files whole")
    p.add_argument("--repair", action="store_true",
                   help="fix what is safe: delete orphan rows, model folders without a row and "
                        "leftover temporary files; then check again")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("backup", help="one archive of the store, models, features and reports")
    _add_db(p)
    p.add_argument("--out", required=True, metavar="FILE", help="archive to write (a zip)")
    p.add_argument("--no-features", action="store_true",
                   help="leave out the feature files (recomputed when needed)")
    p.add_argument("--force", action="store_true", help="replace an existing archive")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_backup)

    p = sub.add_parser("restore", help="restore a backup archive as the store --db, then check it")
    p.add_argument("--backup", required=True, metavar="FILE", help="archive written by backup")
    _add_db(p)
    p.add_argument("--force", action="store_true",
                   help="replace an existing store (and its models, reports and features)")
    p.add_argument("--no-hash", action="store_true", help="check without hashing slide files")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_restore)
    p = sub.add_parser("export-geojson", help="patch scores and QC as GeoJSON detections for "
                                              "QuPath (level-0 pixels), one file per slide")
    _add_db(p, required=True)
    p.add_argument("--model", required=True, type=_model_id, metavar="ID")
    p.add_argument("--cohort", required=True, metavar="NAME")
    p.add_argument("--patient", metavar="ID", help="only this patient's slides")
    p.add_argument("--out", metavar="FILE_OR_DIR",
                   help="a .geojson file (one slide) or a folder (one file per slide); "
                        "without it the one slide's GeoJSON goes to standard output")
    p.set_defaults(func=_cmd_export_geojson)
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
            _check_store_path(getattr(args, "db", None))
            status = func(args)
            log.debug("%s finished with exit status %d", args.command, status)
            return status
        except InputError as exc:
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            log.debug("refused input", exc_info=True)
            return 2
        except (CmilError, OSError) as exc:
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            if os.environ.get("CMIL_DEBUG") or args.verbosity > 0:
                traceback.print_exc()
            return 1
        except KeyboardInterrupt:
            print("error: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130


def console_main() -> int:
    """The ``cmil`` command (installed with the package): :func:`main` named ``cmil``."""
    return main(prog="cmil")
