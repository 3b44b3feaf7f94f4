"""The data commands: ``demo``, ``import-cohort``, ``ingest``, ``qc``, ``export-geojson``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from cmil_core.commands.shared import (
    Subparsers,
    add_db,
    add_executor,
    add_table_flags,
    audit,
    check_store_path,
    parse_model_id,
    progress,
)
from cmil_core.errors import InputError

__all__ = [
    "add_demo",
    "add_export_geojson",
    "add_import_cohort",
    "add_ingest",
    "add_qc",
]


def _cmd_demo(args: argparse.Namespace) -> int:
    from cmil_core.demo.generator import generate_demo, summary_dict

    summary = generate_demo(
        args.db, size=args.size, seed=args.seed, folder=args.out,
        progress=progress(args), force=args.force,
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


def add_demo(sub: Subparsers) -> None:
    """The ``demo`` command's parser; it runs :func:`_cmd_demo`."""
    p = sub.add_parser("demo", help="generate the synthetic demo study into a store")
    add_db(p)
    p.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: about 30 patients (tests); full: the paper's 359")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same study)")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the demo's files; default <store folder>/demo")
    p.add_argument("--force", action="store_true", help="rebuild even if the store holds this demo")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_demo)


def _cmd_import_cohort(args: argparse.Namespace) -> int:
    from cmil_core.clinical.cohort_import import import_cohort

    result = import_cohort(
        args.db, args.cohort, args.csv, role=args.role, center=args.center,
        replace=args.replace, dry_run=args.dry_run, encoding=args.encoding, sheet=args.sheet,
    )
    if not args.dry_run:
        audit(args, "import", cohort=result.cohort,
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


def add_import_cohort(sub: Subparsers) -> None:
    """The ``import-cohort`` command's parser; it runs :func:`_cmd_import_cohort`."""
    p = sub.add_parser("import-cohort", help="validate and import a clinical table, all or nothing")
    add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="cohort name, e.g. A")
    p.add_argument("--csv", required=True, metavar="FILE",
                   help="clinical table (comma, semicolon or tab separated text, or .xlsx)")
    add_table_flags(p)
    p.add_argument("--role", choices=["train", "validation", "test"], default="validation")
    p.add_argument("--center", metavar="TEXT", help="centre that contributed the cohort")
    p.add_argument("--replace", action="store_true",
                   help="replace the clinical table of an existing cohort")
    p.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_import_cohort)


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
    from cmil_core.ingest.tiling_config import TilingConfig
    from cmil_core.ops.access import cli_user

    config = TilingConfig(patch_um=args.patch_um, overlap=args.overlap)
    thresholds = resolve_thresholds(args.qc, _qc_flags(args))  # None: the cohort's current
    check_store_path(args.db, must_exist=True)
    summary = ingest(
        args.db, args.cohort, args.slides, manifest=args.manifest, mpp=args.mpp,
        config=config, thresholds=thresholds, progress=progress(args), who=cli_user(),
        executor=args.executor, ray_address=args.ray_address,
    )
    from cmil_core.ops.access import ingest_details

    audit(args, "ingest", cohort=args.cohort, details={**ingest_details(summary), "via": "cli"})
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_ingest_summary(summary))
    return 0


def add_ingest(sub: Subparsers) -> None:
    """The ``ingest`` command's parser; it runs :func:`_cmd_ingest`."""
    p = sub.add_parser("ingest", help="register, tile and quality-check a cohort's slides")
    add_db(p, required=True)
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
    add_executor(p, "reads and tiles the slides")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_ingest)


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

    check_store_path(args.db, must_exist=True)
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


def add_qc(sub: Subparsers) -> None:
    """The ``qc`` command's parser; it runs :func:`_cmd_qc`."""
    p = sub.add_parser("qc", help="quality control of a cohort: counts under other thresholds "
                                  "(read-only), or --apply them as a new decision")
    add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="cohort whose slides are ingested")
    _add_qc_flags(p)
    p.add_argument("--apply", action="store_true",
                   help="record the thresholds as the cohort's new QC decision (re-judges the "
                        "stored metrics; reads no slide)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_qc)


def _cmd_export_geojson(args: argparse.Namespace) -> int:
    from cmil_core.viewer.overlays import export_geojson

    check_store_path(args.db, must_exist=True)
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
    audit(args, "export", cohort=args.cohort, model_id=args.model,
           details={"kind": "geojson", "patient": args.patient, "out": args.out, "via": "cli"})
    return 0


def add_export_geojson(sub: Subparsers) -> None:
    """The ``export-geojson`` command's parser; it runs :func:`_cmd_export_geojson`."""
    p = sub.add_parser("export-geojson", help="patch scores and QC as GeoJSON detections for "
                                              "QuPath (level-0 pixels), one file per slide")
    add_db(p, required=True)
    p.add_argument("--model", required=True, type=parse_model_id, metavar="ID")
    p.add_argument("--cohort", required=True, metavar="NAME")
    p.add_argument("--patient", metavar="ID", help="only this patient's slides")
    p.add_argument("--out", metavar="FILE_OR_DIR",
                   help="a .geojson file (one slide) or a folder (one file per slide); "
                        "without it the one slide's GeoJSON goes to standard output")
    p.set_defaults(func=_cmd_export_geojson)
