"""Resumable pipeline stages: slides to quality-checked patches (``ingest``).

:func:`ingest` takes a cohort's slides (a folder, a zip, optionally a
manifest), and for each slide, in their order (read ahead in worker
processes or on a cluster, written here one at a time):

1. registers it (path, sha256, size, kind, width, height, mpp);
2. skips it when it is already tiled from the same file (sha256) with the
   same settings (the *tiling key*: patch size, metric version and the
   slide's mpp; not the QC thresholds, which judge stored metrics);
3. otherwise finds the smear, lays the patch grid, measures every patch and
   writes the patches and the slide's ``tiled`` status in one transaction;
4. on any problem with that slide (cannot be opened or read, no resolution,
   patient not in the cohort, the same file, by sha256, already registered
   as another slide: another patient's, or a copy for the same patient that
   would count its patches twice) marks it ``failed`` with the reason, which
   names both patients, and goes on with the next one.

The unit of work is a slide and each is committed on its own, so a killed run
loses at most the slide it was on, and a rerun resumes: finished slides are
skipped, a changed file is redone, nothing is duplicated. The store is opened
for each write only, so the dashboard can read between slides. The settings
of every run are stored in ``ingest_runs``.

Quality control is a decision per cohort (:mod:`cmil_core.ingest.qc`): at the end
of a run every patch of the cohort is judged, in SQL from its stored
metrics, under the run's thresholds (given, else the cohort's current
decision, else the defaults), and a new decision is recorded when they
differ from the current one. Changing thresholds therefore re-tiles
nothing. The summary carries the decision and the bias warnings of
:func:`cmil_core.ingest.qc.qc_warnings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import pandas as pd

from cmil_core import store as store_mod
from cmil_core.errors import InputError, shown
from cmil_core.ingest import qc as qc_mod
from cmil_core.ingest.discovery import SlideSource, discover_slides
from cmil_core.ingest.quality import METRICS_VERSION, QCThresholds
from cmil_core.ingest.scan_ahead import scan_in_processes
from cmil_core.ingest.slides import file_sha256, open_slide
from cmil_core.ingest.tiling import tile_slide
from cmil_core.ingest.tiling_config import TilingConfig
from cmil_core.progress import ProgressCallback, no_progress, stage_reporter

__all__ = [
    "IngestSummary", "SlideOutcome", "SlideScan", "format_ingest_summary", "ingest",
    "scan_slide", "tiling_key",
]

PASSED = "passed"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOutcome:
    """What happened to one slide in a run."""

    path: str
    patient_id: str
    status: str  # "tiled", "skipped" (already tiled), "failed"
    reason: str | None = None
    patches: int = 0
    passed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestSummary:
    cohort: str
    run_id: int
    folder: str
    slides: list[SlideOutcome]
    qc_decision: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        """Patches by outcome over the cohort's slides in this run: ``passed`` or the reason."""
        total: Counter[str] = Counter()
        for s in self.slides:
            total[PASSED] += s.passed
            total.update(s.rejected)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "cohort": self.cohort,
            "run_id": self.run_id,
            "folder": self.folder,
            "slides": [asdict(s) for s in self.slides],
            "status_counts": dict(Counter(s.status for s in self.slides)),
            "patch_counts": dict(self.counts),
            "qc_decision": None if self.qc_decision is None else {
                k: (str(v) if k == "decided_at" else v) for k, v in self.qc_decision.items()},
            "qc_warnings": list(self.warnings),
        }


def tiling_key(config: TilingConfig, mpp: float) -> str:
    """A hash of everything that decides a slide's patches and their metrics besides its
    pixels. Not the QC thresholds: a decision re-judges stored metrics (no re-tiling)."""
    payload = {
        "config": config.to_dict(),
        "metrics_version": METRICS_VERSION,
        "mpp": round(mpp, 9),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _outcome_from_table(source: SlideSource, table: Any) -> SlideOutcome:
    reasons = Counter(r for r in table["qc_reason"].tolist() if r is not None)
    passed = int(table["qc_pass"].sum())
    return SlideOutcome(
        str(source.path), source.patient_id, "tiled", None, len(table), passed, dict(reasons)
    )


def _outcome_from_store(store: store_mod.Store, slide: store_mod.SlideRow) -> SlideOutcome:
    rows = store_mod.qc_counts(store, slide.cohort, slide_id=slide.slide_id)
    rejected = {
        str(r.qc_reason): int(r.patches) for r in rows.itertuples() if r.qc_reason is not None
    }
    passed = int(rows.loc[rows["qc_reason"].isna(), "patches"].sum())
    return SlideOutcome(
        slide.path, slide.patient_id or "", "skipped", None, passed + sum(rejected.values()),
        passed, rejected,
    )


def ingest(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    slides: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    mpp: float | None = None,
    config: TilingConfig | None = None,
    thresholds: QCThresholds | None = None,
    progress: ProgressCallback = no_progress,
    extract_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    who: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> IngestSummary:
    """Register, tile and quality-check a cohort's slides; see the module docstring.

    ``executor``: ``"local"`` reads the slides on this machine: with
    ``workers`` >= 2 and two slides or more, whole slides side by side in
    ``workers`` processes (:mod:`cmil_core.ingest.scan_ahead`), else one at a
    time with their patches shared by ``workers`` threads; ``"ray"`` reads
    and tiles them on a Ray cluster (``ray_address``, else
    ``$CMIL_RAY_ADDRESS``, else a local one; :mod:`cmil_core.model.distributed`).
    Either way this process alone writes the store, slide by slide, with the
    same outcome.

    ``mpp`` (``--mpp``) replaces the resolution the files give; a manifest's
    ``mpp`` column wins over both, slide by slide. A zip is extracted into
    ``extract_dir`` (default: ``slides/<cohort>/<zip name>`` beside the store).
    Raises :class:`InputError` before writing anything when the cohort does
    not exist, the folder has no slides, or a manifest is wrong; a bad slide
    only fails itself. ``thresholds``: the QC
    decision of this run (None: the cohort's current decision, else the
    defaults); ``who`` records it (default: the operating-system user).
    """
    config = config or TilingConfig()
    if executor not in ("local", "ray"):
        raise InputError(f"--executor {executor!r} is not one of local, ray")
    if mpp is not None and not 0 < mpp < 1000:
        raise InputError(f"--mpp {mpp} is not a resolution in microns per pixel")
    with store_mod.using(db) as store:
        db_path = store.path
        known = {c.cohort for c in store_mod.list_cohorts(store)}
        if cohort not in known:
            raise InputError(
                f"cohort '{cohort}' does not exist in {db_path}: import its clinical table "
                "first (python -m cmil_core import-cohort)"
            )
        patients = set(store_mod.patients_frame(store, cohort)["patient_id"])
        if thresholds is None:
            thresholds = qc_mod.cohort_thresholds(store, cohort) or QCThresholds()
    source_path = Path(slides)
    if extract_dir is None and source_path.is_file():
        extract_dir = store_mod.StoreFolder.of(db_path).extracted(cohort, source_path.stem)
    folder, sources = discover_slides(slides, manifest=manifest, extract_to=extract_dir)
    if manifest is not None:
        unknown = sorted({s.patient_id for s in sources} - patients)
        if unknown:
            listed = ", ".join(f"'{shown(p)}'" for p in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InputError(
                f"{Path(manifest).name}: patient_id {listed}{more} not in cohort '{cohort}'"
                f"{_zeros_hint(unknown[0], patients)}; nothing ingested"
            )

    settings = {
        "tiling": config.to_dict(),
        "thresholds": thresholds.to_dict(),
        "metrics_version": METRICS_VERSION,
        "mpp_override": mpp,
    }
    with store_mod.using(db) as store:
        run_id = store_mod.start_ingest_run(
            store, cohort, source=str(folder), manifest=str(manifest) if manifest else None,
            config=settings,
        )
    log.info("ingest run %d of cohort %s: %d slides from %s", run_id, cohort, len(sources),
             folder)
    report = stage_reporter(progress, stage=f"slides of {cohort}", index=1, stages=1)
    outcomes: list[SlideOutcome] = []
    scans: Iterator[SlideScan | None] = itertools.repeat(None)
    try:
        if sources and (executor == "ray" or (workers >= 2 and len(sources) >= 2)):
            with store_mod.using(db, read_only=True) as store:
                tiled = {s.path: (s.sha256, s.tiling_key, s.patient_id)
                         for s in store_mod.list_slides(store, cohort)
                         if s.status in ("tiled", "encoded")}
            if executor == "ray":
                from cmil_core.model.distributed import scan_slides

                scans = scan_slides(sources, mpp_override=mpp, config=config,
                                    thresholds=thresholds, tiled=tiled, patients=patients,
                                    address=ray_address)
            else:  # whole slides side by side in worker processes (scan_ahead)
                scans = scan_in_processes(sources, mpp_override=mpp, config=config,
                                          thresholds=thresholds, tiled=tiled,
                                          patients=patients, workers=workers)
        for i, source in enumerate(sources):
            report(i, len(sources), source.path.name)

            def patch_progress(
                done: int, total: int, i: int = i, name: str = source.path.name
            ) -> None:
                report(i, len(sources), f"{name}: {done}/{total} patches")

            scan = next(scans)
            # A scanned slide's pixels are all read: its writes (each its own
            # transaction) share one opening of the store. On a folder of
            # photographs, opening and closing the file three or four times per
            # slide took longer than reading the slide.
            with (store_mod.using(db) if scan is not None
                  else contextlib.nullcontext(db)) as target:
                outcomes.append(
                    _ingest_one(target, cohort, source, patients, mpp, config, thresholds,
                                run_id, workers, patch_progress, scan=scan)
                )
            done = outcomes[-1]
            log.info("slide %d/%d %s (patient %s): %s, %d patches, %d passed%s", i + 1,
                     len(sources), source.path.name, done.patient_id, done.status, done.patches,
                     done.passed, f": {done.reason}" if done.reason else "")
        report(len(sources), len(sources), "done")
    except BaseException:
        log.warning("ingest run %d of cohort %s stopped after %d of %d slides", run_id, cohort,
                    len(outcomes), len(sources))
        close = getattr(scans, "close", None)
        if callable(close):
            close()
        with store_mod.using(db) as store:
            partial = IngestSummary(cohort, run_id, str(folder), outcomes).to_dict()
            store_mod.finish_ingest_run(store, run_id, "interrupted", partial)
        raise
    summary = IngestSummary(cohort, run_id, str(folder), outcomes)
    if who is None:
        from cmil_core.ops.access import cli_user

        who = cli_user()
    with store_mod.using(db) as store:
        # One decision for the whole cohort: slides skipped now were judged by an
        # earlier run, perhaps under other thresholds.
        summary.qc_decision = store_mod.apply_qc_decision(
            store, cohort, thresholds.to_dict(), who=who, source="ingest", only_if_changed=True,
            audit=False)  # the ingest's own audit row names the decision
        summary.slides = _recount(store, cohort, outcomes)
        summary.warnings = [w.message for w in qc_mod.qc_warnings(store, cohort)]
        store_mod.finish_ingest_run(store, run_id, "done", summary.to_dict())
    log.info("ingest run %d of cohort %s done: %s", run_id, cohort,
             ", ".join(f"{n} {k}" for k, n in sorted(Counter(o.status for o in outcomes).items())))
    return summary


def _recount(store: store_mod.Store, cohort: str,
             outcomes: list[SlideOutcome]) -> list[SlideOutcome]:
    """The outcomes with each slide's patch counts as the cohort's decision left them."""
    rows = store_mod.qc_counts(store, cohort)
    out = []
    for o in outcomes:
        mine = rows[(rows["path"] == o.path) & (rows["patches"] > 0)]
        if o.status == "failed" or mine.empty:
            out.append(o)
            continue
        rejected = {str(r.qc_reason): int(r.patches) for r in mine.itertuples()
                    if r.qc_reason is not None and not pd.isna(r.qc_reason)}
        passed = int(mine.loc[mine["qc_reason"].isna(), "patches"].sum())
        out.append(SlideOutcome(o.path, o.patient_id, o.status, o.reason,
                                passed + sum(rejected.values()), passed, rejected))
    return out


@dataclass(frozen=True)
class SlideScan:
    """What reading one slide gives, without the store: a worker's share of ``ingest``.

    :func:`scan_slide` fills it where the slide is (a Ray worker,
    :mod:`cmil_core.model.distributed`); the driver then takes the same decisions as
    the local executor, in the same order, and alone writes the store.
    ``table`` is None when the slide was not tiled (unreadable, no
    resolution, already tiled or its patient unknown when scanned).
    """

    sha256: str | None = None
    size_bytes: int | None = None
    read_error: str | None = None  # the file could not be read (hashing)
    open_error: str | None = None  # open_slide refused it
    kind: str | None = None
    width: int | None = None
    height: int | None = None
    mpp: float | None = None
    table: pd.DataFrame | None = None
    tile_error: str | None = None


def scan_slide(
    source: SlideSource,
    mpp_override: float | None,
    config: TilingConfig,
    thresholds: QCThresholds,
    *,
    tiled: dict[str, tuple[Any, Any, Any]] | None = None,
    patients: set[str] | None = None,
    workers: int = 1,
    path: str | os.PathLike[str] | None = None,
) -> SlideScan:
    """Hash, open and tile one slide, as :func:`ingest` would, without the store.

    ``tiled``: per slide path, the ``(sha256, tiling key, patient_id)`` of
    slides already tiled (not tiled again when they match); ``patients``: the
    cohort's patients (a slide of another patient is not tiled); ``path``:
    where this node reads the file (default ``source.path``).
    """
    where = Path(path) if path is not None else source.path
    name = source.path.name
    try:
        sha = file_sha256(where)
        size_bytes = where.stat().st_size
    except OSError as exc:
        return SlideScan(read_error=f"{name}: cannot be read ({exc.strerror})")
    wanted_mpp = source.mpp if source.mpp is not None else mpp_override
    try:
        slide = open_slide(where, mpp=wanted_mpp)
    except InputError as exc:
        return SlideScan(sha, size_bytes, open_error=str(exc))
    with slide:
        info: dict[str, Any] = {"kind": slide.kind, "width": slide.width, "height": slide.height,
                "mpp": slide.mpp}
        if slide.mpp is None:
            return SlideScan(sha, size_bytes, **info)
        key = tiling_key(config, slide.mpp)
        known = (tiled or {}).get(str(source.path))
        if known == (sha, key, source.patient_id) or (
            patients is not None and source.patient_id not in patients
        ):
            return SlideScan(sha, size_bytes, **info)
        try:
            table = tile_slide(slide, config, thresholds, None, workers=workers)
        except InputError as exc:
            return SlideScan(sha, size_bytes, **info, tile_error=str(exc))
    return SlideScan(sha, size_bytes, **info, table=table)


class _Scanned:
    """A scanned slide's properties where ``_ingest_one`` expects an open slide."""

    def __init__(self, scan: SlideScan) -> None:
        self.kind, self.width, self.height, self.mpp = scan.kind, scan.width, scan.height, scan.mpp

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _zeros_hint(patient_id: str, patients: Collection[str]) -> str:
    """A hint when ``patient_id`` is a patient of the cohort but for leading zeros, else "".

    Spreadsheets store an ID typed as 007 as the number 7, while the slide
    files and manifests keep "007". The two are not matched silently (001 and
    01 could be two patients); the message names the cohort's ID instead.
    """
    if not patient_id.isdigit():
        return ""
    same = sorted(p for p in patients if p.isdigit() and p != patient_id
                  and p.lstrip("0") == patient_id.lstrip("0"))
    if not same:
        return ""
    return (f" (the cohort has patient '{same[0]}': a spreadsheet may have dropped the ID's "
            "leading zeros; format the ID column as text and import the table again)")


def _ingest_one(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    source: SlideSource,
    patients: set[str],
    mpp_override: float | None,
    config: TilingConfig,
    thresholds: QCThresholds,
    run_id: int,
    workers: int,
    patch_progress: Any = None,
    scan: SlideScan | None = None,
) -> SlideOutcome:
    """One slide's ingest; with ``scan`` (read elsewhere) the same decisions, no pixel read here."""
    path = str(source.path)
    name = source.path.name
    if scan is not None and scan.read_error is not None:
        return _fail_unregistered(db, cohort, source, scan.read_error, run_id)
    try:
        sha = scan.sha256 if scan is not None else file_sha256(source.path)
        size_bytes = scan.size_bytes if scan is not None else source.path.stat().st_size
    except OSError as exc:
        return _fail_unregistered(db, cohort, source, f"{name}: cannot be read ({exc.strerror})",
                                  run_id)
    assert sha is not None
    duplicate = _duplicate_reason(db, cohort, source, sha)
    if duplicate is not None:
        return _record_failure(db, cohort, source, sha, size_bytes, None, duplicate, run_id)
    wanted_mpp = source.mpp if source.mpp is not None else mpp_override
    slide: Any
    if scan is not None and scan.open_error is not None:
        return _record_failure(db, cohort, source, sha, size_bytes, None, scan.open_error, run_id)
    try:
        slide = _Scanned(scan) if scan is not None else open_slide(source.path, mpp=wanted_mpp)
    except InputError as exc:
        return _record_failure(db, cohort, source, sha, size_bytes, None, str(exc), run_id)
    with slide:
        if slide.mpp is None:
            return _record_failure(
                db, cohort, source, sha, size_bytes, slide,
                f"{name}: the file gives no resolution; pass --mpp (microns per pixel) "
                "or an mpp column in the manifest", run_id,
            )
        key = tiling_key(config, slide.mpp)
        with store_mod.using(db) as store:
            known = store_mod.find_slide(store, cohort, path)
            if (
                known is not None and known.status in ("tiled", "encoded") and known.sha256 == sha
                and known.tiling_key == key and known.patient_id == source.patient_id
            ):
                return _outcome_from_store(store, known)
            slide_id = store_mod.register_slide(
                store, cohort=cohort, patient_id=source.patient_id, path=path, sha256=sha,
                kind=slide.kind, width=slide.width, height=slide.height, mpp=slide.mpp,
                size_bytes=size_bytes,
            )
        if source.patient_id not in patients:
            reason = (
                f"{name}: patient '{source.patient_id}' (from the {source.origin} rule) is not "
                f"in cohort '{cohort}'{_zeros_hint(source.patient_id, patients)}; add the patient "
                "to the clinical table or use a manifest"
            )
            with store_mod.using(db) as store:
                store_mod.mark_slide_failed(store, slide_id, reason, run_id=run_id)
            return SlideOutcome(path, source.patient_id, "failed", reason)
        try:
            if scan is not None and scan.tile_error is not None:
                raise InputError(scan.tile_error)
            if scan is not None and scan.table is not None:
                table = scan.table
            else:  # not scanned, or the scan skipped a slide the store now wants tiled
                with open_slide(source.path, mpp=wanted_mpp) if scan is not None \
                        else contextlib.nullcontext(slide) as opened:
                    table = tile_slide(opened, config, thresholds, patch_progress,
                                       workers=workers)
        except InputError as exc:
            with store_mod.using(db) as store:
                store_mod.mark_slide_failed(store, slide_id, str(exc), run_id=run_id)
            return SlideOutcome(path, source.patient_id, "failed", str(exc))
        tiling = dict(table.attrs.get("tiling", {}))
        with store_mod.using(db) as store:
            store_mod.write_slide_patches(
                store, slide_id, table, tiling_key=key, tiling=tiling, run_id=run_id
            )
    return _outcome_from_table(source, table)


def _duplicate_reason(
    db: store_mod.Store | str | os.PathLike[str], cohort: str, source: SlideSource, sha: str
) -> str | None:
    """Why this file cannot be a slide: its content is already another slide's; or None.

    The slide registered first keeps the content (a rerun does not turn the
    original into a duplicate of its copy).
    """
    path = str(source.path)
    with store_mod.using(db) as store:
        own = store_mod.find_slide(store, cohort, path)
        others = [
            s for s in store_mod.slides_with_sha256(store, sha)
            if (s.cohort, s.path) != (cohort, path) and s.status != "failed"
            and (own is None or s.slide_id < own.slide_id)
        ]
    if not others:
        return None
    other = others[0]
    name = source.path.name
    there = f"slide {other.slide_id} ({Path(other.path).name}) of patient '{other.patient_id}' " \
        f"in cohort '{other.cohort}'"
    if (other.cohort, other.patient_id) == (cohort, source.patient_id):
        return (f"{name}: the same file (sha256 {sha[:12]}) is already {there}; "
                "a copy would count its patches twice")
    return (f"{name}: the same file (sha256 {sha[:12]}) is already {there}; refused for "
            f"patient '{source.patient_id}' in cohort '{cohort}' (one slide belongs to one "
            "patient: check the file names or the manifest)")


def _record_failure(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    source: SlideSource,
    sha: str | None,
    size_bytes: int | None,
    slide: Any,
    reason: str,
    run_id: int,
) -> SlideOutcome:
    with store_mod.using(db) as store:
        slide_id = store_mod.register_slide(
            store, cohort=cohort, patient_id=source.patient_id, path=str(source.path), sha256=sha,
            kind=getattr(slide, "kind", None), width=getattr(slide, "width", None),
            height=getattr(slide, "height", None), mpp=getattr(slide, "mpp", None),
            size_bytes=size_bytes,
        )
        store_mod.mark_slide_failed(store, slide_id, reason, run_id=run_id)
    return SlideOutcome(str(source.path), source.patient_id, "failed", reason)


def _fail_unregistered(
    db: store_mod.Store | str | os.PathLike[str],
    cohort: str,
    source: SlideSource,
    reason: str,
    run_id: int,
) -> SlideOutcome:
    return _record_failure(db, cohort, source, None, None, None, reason, run_id)


def format_ingest_summary(summary: IngestSummary) -> str:
    """Per-slide and cohort counts of patches kept and rejected by reason, for a terminal."""
    statuses = Counter(s.status for s in summary.slides)
    lines = [
        f"cohort '{summary.cohort}' (run {summary.run_id}): {len(summary.slides)} slides: "
        + ", ".join(f"{n} {k}" for k, n in sorted(statuses.items()))
    ]
    reasons = sorted({r for s in summary.slides for r in s.rejected})
    header = ["slide", "patient", "status", "patches", "passed", *reasons]
    rows = []
    for s in summary.slides:
        if s.status == "failed":
            continue
        rows.append([Path(s.path).name, s.patient_id, s.status, str(s.patches), str(s.passed),
                     *(str(s.rejected.get(r, 0)) for r in reasons)])
    counts = summary.counts
    total_patches = sum(counts.values())
    rows.append(["all slides", "", "", str(total_patches), str(counts[PASSED]),
                 *(str(counts[r]) for r in reasons)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.extend(fmt.format(*r) for r in rows)
    failed = [s for s in summary.slides if s.status == "failed"]
    if failed:
        lines.append(f"failed slides ({len(failed)}):")
        lines.extend(f"  {s.reason}" for s in failed)
    decision = summary.qc_decision
    if decision is not None:
        state = "new" if decision.get("new") else "unchanged"
        values = qc_mod.format_thresholds(decision["thresholds"])
        lines.append(f"quality control: decision {decision['decision_id']} ({state}): {values}")
    lines.extend(f"warning: {w}" for w in summary.warnings)
    return "\n".join(lines)
