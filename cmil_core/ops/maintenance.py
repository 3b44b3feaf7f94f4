"""Keeping a store sound: a consistency check, backups and restores.

``python -m cmil_core check --db DB`` (:func:`check_store`) reads the store
and the files beside it and reports, one line each, what is wrong and how to
repair it:

* the schema version (older stores are upgraded by any writing command);
* orphan rows: patches without their slide, patch or patient scores without
  their model, patch, cohort or patient, patients without their cohort,
  tumour regions without their slide;
* slides of patients or cohorts the store does not know (failed slides
  excepted: ingest records those on purpose);
* counts that disagree with a status: a ``tiled`` or ``encoded`` slide
  without patches, a ``pending`` or ``failed`` slide that still has some
  (a killed ingest, resumed by rerunning it);
* slide files missing, or changed since ingest (size, and SHA-256 against
  ``slides.sha256``; ``--no-hash`` skips hashing, for large slides);
* model artifacts (``models/<id>/model.pt`` and ``config.json``) missing,
  unreadable, or recorded at a folder that moved; folders under ``models/``
  without a row (left by a train killed between writing its folder and
  recording it);
* feature files missing for the slides a model scored, or unreadable
  (warnings: they are a cache, recomputed by the next ``score``);
* temporary files left by killed runs (:mod:`cmil_core._atomic`);
* quality control that may bias the study (warnings of
  :func:`cmil_core.ingest.qc.qc_warnings`: a cohort losing more than 30 % of its
  patches, patients losing all of theirs, a kept share differing between
  label classes), models and scores built on an older QC decision (stale),
  and scores made despite a tiling mismatch (warnings);
* ingest runs still marked running, and a demo left unfinished (warnings).

*Problems* make the exit status 1; *warnings* do not. ``--repair`` fixes
what is safe to fix without a person's judgement: it deletes orphan rows,
model folders without a row, stale temporary files and unreadable feature
files, marks ``tiled`` slides without patches ``pending`` (so that ingest
redoes them), and records the new place of model folders that moved with the
store; then it checks again. Missing or changed slides, unknown patients and
lost model files are reported with what to run, never "repaired".

Backups
-------
``backup --db DB --out FILE`` (:func:`backup_store`) writes one zip archive:

* ``store/<name>.duckdb`` (and its ``.wal`` when there is one): the store
  file, copied while the store is open read-only in this process. DuckDB's
  file lock lets other readers (the dashboard) go on, and keeps writers of
  other processes out until the copy is done, so the copy is a consistent
  state without stopping the dashboard; a command that writes meanwhile waits
  for the lock (ingest, which opens the store per slide) or makes the backup
  wait (train and score hold it to the end). The models' folders are copied
  under the same lock, so every model row has its files;
* ``models/<model_id>/...``, ``reports/...`` and, unless ``--no-features``,
  ``features/...`` (a cache: restored stores recompute missing features);
* ``MANIFEST.json``: format, source, schema version, table counts, and the
  SHA-256 and size of every member.

Slides are not included: the store refers to them by path (copy them
yourself, at the same paths, to move a study to another machine). The
archive is written under a temporary name and renamed into place.

``restore --backup FILE --db DB`` (:func:`restore_store`) verifies every
member against the manifest before writing anything (a damaged archive is
refused, nothing written), extracts into a temporary folder beside ``DB``,
points the models at their restored folders, records the restore in the
audit trail, then moves the store, ``models/``, ``reports/`` (and
``features/`` when the backup has them) into place, and checks the result.
An existing store is replaced only with ``--force``; what it replaces is
moved aside first and deleted last, so a crash mid-restore loses nothing (a
second ``restore --force`` finishes the job; ``check`` lists the leftovers).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from cmil_core import _atomic, store as store_mod
from cmil_core.errors import InputError

__all__ = [
    "BACKUP_FORMAT",
    "BACKUP_FORMAT_VERSION",
    "BackupSummary",
    "CheckReport",
    "Finding",
    "RestoreSummary",
    "backup_store",
    "check_store",
    "format_check",
    "restore_store",
    "temporary_leftovers",
]

BACKUP_FORMAT = "cmil-backup"
BACKUP_FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
#: Folders beside the store that hold its artifacts (all of them go in a backup).
ARTIFACT_FOLDERS = ("models", "features", "reports")
#: Folders beside the store where killed runs can leave temporary files.
_TEMP_SCAN = ("models", "features", "reports", "demo", "slides")
_EXAMPLES = 5
_CHUNK = 1 << 20


def _store_dir(db: Path) -> Path:
    return db.expanduser().resolve().parent


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        return "unknown"


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------

@dataclass
class Finding:
    """One thing wrong: what (``message``), and what to do (``repair``).

    ``severity``: ``problem`` (the exit status is 1) or ``warning``.
    ``repairable``: ``check --repair`` fixes it. ``examples``: up to five
    of the rows or files concerned.
    """

    severity: str
    kind: str
    message: str
    repair: str
    count: int = 1
    examples: list[str] = field(default_factory=list)
    repairable: bool = False
    # what --repair acts on (not part of the report)
    _targets: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_targets")
        return data


@dataclass
class CheckReport:
    """What :func:`check_store` found; ``ok`` when there is no problem."""

    db: str
    schema_version: int | None
    expected_schema_version: int
    checked: dict[str, int]
    findings: list[Finding]
    repaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "db": self.db,
            "ok": self.ok,
            "schema_version": self.schema_version,
            "expected_schema_version": self.expected_schema_version,
            "checked": dict(self.checked),
            "problems": len(self.problems),
            "warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
            "repaired": list(self.repaired),
        }


def _examples(values: Sequence[Any]) -> list[str]:
    return [str(v) for v in list(values)[:_EXAMPLES]]


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def temporary_leftovers(db: str | os.PathLike[str]) -> list[Path]:
    """Temporary files and folders beside the store ``db`` (stale or not).

    Looks in the store's folder itself and, at any depth, in its ``models``,
    ``features``, ``reports``, ``demo`` and ``slides`` folders.
    """
    root = _store_dir(Path(db))
    found = [p for p in sorted(root.iterdir()) if _atomic.is_temp_name(p.name)] \
        if root.is_dir() else []
    for name in _TEMP_SCAN:
        top = root / name
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            for entry in sorted([*dirnames, *filenames]):
                if _atomic.is_temp_name(entry):
                    found.append(here / entry)
            dirnames[:] = [d for d in dirnames if not _atomic.is_temp_name(d)]
    return found


def check_store(
    db: str | os.PathLike[str],
    *,
    hash_files: bool = True,
    repair: bool = False,
) -> CheckReport:
    """Check the store ``db`` and the files beside it (see the module docstring).

    ``hash_files``: compare every slide file's SHA-256 with the stored one and
    read every feature file and model archive whole (slow on large slides).
    ``repair``: open the store for writing, fix what is safe to fix, and
    return a fresh check with ``repaired`` listing what was done.

    Raises :class:`InputError` when there is no store at ``db``, and
    :class:`~cmil_core.store.StoreBusyError` when another process writes it.
    """
    path = Path(db).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no store here (no such file)")
    if repair:
        with store_mod.open_store(path) as st:  # a writing open also upgrades the schema
            report = _check(st, path, hash_files)
            done = _repair(st, path, report)
        fresh = check_store(path, hash_files=hash_files)
        fresh.repaired = done
        return fresh
    try:
        st = store_mod.open_store(path, read_only=True)
    except store_mod.StoreBusyError:
        raise
    except store_mod.StoreError as exc:
        if "schema version" not in str(exc):
            raise
        newer = "newer" in str(exc)
        finding = Finding(
            "problem", "schema", str(exc).split(": ", 1)[-1],
            "upgrade cmil_core" if newer else
            f"upgrade the store: python -m cmil_core check --db {path} --repair",
        )
        return CheckReport(str(path), None, store_mod.SCHEMA_VERSION, {}, [finding])
    with st:
        return _check(st, path, hash_files)


def _check(st: store_mod.Store, path: Path, hash_files: bool) -> CheckReport:
    root = _store_dir(path)
    findings: list[Finding] = []
    checked: dict[str, int] = {}
    version = store_mod.schema_version(st)
    counts = store_mod.table_counts(st)
    checked.update({f"{k}_rows": v for k, v in counts.items()})
    db_arg = f"--db {path}"

    # Orphan rows.
    for kind, n in store_mod.orphan_counts(st).items():
        if n:
            findings.append(Finding(
                "problem", "orphan-rows", f"{_plural(n, 'row')}: {kind}",
                f"python -m cmil_core check {db_arg} --repair deletes them", n,
                repairable=True, _targets=[kind],
            ))

    # Slides of unknown cohorts or patients.
    unknown = store_mod.unknown_patient_slides(st)
    for cohort, rows in unknown.groupby("cohort", sort=True):
        n = int(rows["slides"].sum())
        if not bool(rows["cohort_known"].iloc[0]):
            findings.append(Finding(
                "problem", "unknown-cohort-slides",
                f"{_plural(n, 'slide')} of cohort '{cohort}', which is not in the store",
                f"import cohort '{cohort}' again (python -m cmil_core import-cohort {db_arg} "
                f"--cohort {cohort} --csv FILE)", n, _examples(rows["patient_id"]),
            ))
        else:
            findings.append(Finding(
                "problem", "unknown-patient-slides",
                f"{_plural(n, 'slide')} of cohort '{cohort}' belong to "
                f"{_plural(len(rows), 'patient')} not in its clinical table",
                f"add the patients (import-cohort {db_arg} --cohort {cohort} --csv FILE "
                "--replace), or rerun ingest with a manifest that names known patients", n,
                _examples(rows["patient_id"]),
            ))

    # Counts against statuses, and the slide files.
    slides = store_mod.slide_check_frame(st)
    checked["slides"] = len(slides)
    empty = slides[slides["status"].isin(["tiled", "encoded"]) & (slides["patches"] == 0)]
    for cohort, rows in empty.groupby("cohort", sort=True):
        findings.append(Finding(
            "problem", "tiled-without-patches",
            f"{_plural(len(rows), 'slide')} of cohort '{cohort}' marked tiled have no patches",
            f"python -m cmil_core check {db_arg} --repair marks them pending; then rerun "
            f"python -m cmil_core ingest {db_arg} --cohort {cohort} --slides FOLDER",
            len(rows), _examples(rows["path"]), True, [int(i) for i in rows["slide_id"]],
        ))
    stale = slides[slides["status"].isin(["pending", "failed"]) & (slides["patches"] > 0)]
    for cohort, rows in stale.groupby("cohort", sort=True):
        findings.append(Finding(
            "problem", "untiled-with-patches",
            f"{_plural(len(rows), 'slide')} of cohort '{cohort}' not tiled still have patches "
            "(an ingest was interrupted)",
            f"rerun python -m cmil_core ingest {db_arg} --cohort {cohort} --slides FOLDER",
            len(rows), _examples(rows["path"]),
        ))
    findings += _check_slide_files(slides, db_arg, hash_files, checked)

    # Models and their files; feature files.
    models = store_mod.model_artifacts_frame(st)
    checked["models"] = len(models)
    findings += _check_models(models, root, db_arg, hash_files)
    findings += _check_features(models, slides, root, db_arg, hash_files, checked)

    # Temporary files left by killed runs.
    leftovers = temporary_leftovers(path)
    old = [p for p in leftovers if _atomic.is_stale(p)]
    fresh = [p for p in leftovers if p not in old]
    if old:
        findings.append(Finding(
            "problem", "temporary-files",
            f"{_plural(len(old), 'temporary file')} left by killed runs",
            f"python -m cmil_core check {db_arg} --repair deletes them", len(old),
            _examples([p.relative_to(root) for p in old]), True, old,
        ))
    if fresh:
        findings.append(Finding(
            "warning", "temporary-files-in-use",
            f"{_plural(len(fresh), 'temporary file')} being written by a running process",
            "check again when it has finished", len(fresh),
            _examples([p.relative_to(root) for p in fresh]),
        ))

    findings += _check_qc(st, db_arg)

    # Work left unfinished.
    runs = store_mod.ingest_runs_frame(st)
    running = runs[runs["status"] == "running"]
    for row in running.itertuples():
        findings.append(Finding(
            "warning", "ingest-running",
            f"ingest run {row.run_id} of cohort '{row.cohort}' (started {row.started_at}) is "
            "still running, or was killed",
            f"if it was killed, rerun python -m cmil_core ingest {db_arg} --cohort {row.cohort} "
            "to resume it",
        ))
    demo = store_mod.get_meta(st, "demo")
    if demo is not None:
        try:
            complete = bool(json.loads(demo).get("complete"))
        except (ValueError, AttributeError):
            complete = True
        if not complete:
            findings.append(Finding(
                "warning", "demo-unfinished", "the demo study was not finished",
                f"rerun python -m cmil_core demo {db_arg} to finish it",
            ))
    order = {"problem": 0, "warning": 1}
    findings.sort(key=lambda f: order[f.severity])
    return CheckReport(str(path), version, store_mod.SCHEMA_VERSION, checked, findings)


def _check_qc(st: store_mod.Store, db_arg: str) -> list[Finding]:
    """Quality control that may bias the study; models and scores on an older decision."""
    from cmil_core.ingest import qc

    out: list[Finding] = []
    for w in qc.qc_warnings(st):
        out.append(Finding(
            "warning", f"qc-{w.kind}", w.message,
            f"review the thresholds on the Quality control page, or python -m cmil_core qc "
            f"{db_arg} --cohort {w.cohort}", max(1, len(w.patients)), _examples(w.patients),
        ))
    marks = qc.stale_marks(st)
    models = marks["models"][marks["models"]["stale"]]
    for row in models.itertuples():
        out.append(Finding(
            "warning", "stale-model",
            f"model {row.model_id} is stale: trained on an older QC decision of cohort "
            f"'{row.train_cohort}' (now decision {row.current_decision_id})",
            f"train again: python -m cmil_core train {db_arg} --cohort {row.train_cohort}",
        ))
    scores = marks["scores"]
    for row in scores[scores["stale"]].itertuples():
        out.append(Finding(
            "warning", "stale-scores",
            f"scores of cohort '{row.cohort}' by model {row.model_id} are stale: made on an "
            f"older QC decision of the cohort (now decision {row.current_decision_id})",
            f"score again: python -m cmil_core score {db_arg} --model {row.model_id} "
            f"--cohort {row.cohort}", int(row.patients),
        ))
    for row in scores[scores["tiling_mismatch"].notna()].itertuples():
        out.append(Finding(
            "warning", "scores-tiling-mismatch",
            f"cohort '{row.cohort}' was scored by model {row.model_id} despite a tiling or QC "
            f"mismatch with the training cohort ({row.tiling_mismatch})",
            "ingest the cohort with the training settings and score again, or keep the mark",
            int(row.patients),
        ))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_slide_files(slides: Any, db_arg: str, hash_files: bool,
                       checked: dict[str, int]) -> list[Finding]:
    missing: dict[str, list[str]] = {}
    changed: dict[str, list[str]] = {}
    hashed = 0
    for row in slides.itertuples():
        if row.status == "failed":
            continue  # ingest recorded why; the file may never have been readable
        p = Path(row.path)
        try:
            size = p.stat().st_size
        except OSError:
            missing.setdefault(row.cohort, []).append(row.path)
            continue
        if pd.notna(row.size_bytes) and int(row.size_bytes) != size:
            changed.setdefault(row.cohort, []).append(row.path)
            continue
        if hash_files and isinstance(row.sha256, str):
            try:
                digest = _sha256(p)
            except OSError:
                missing.setdefault(row.cohort, []).append(row.path)
                continue
            hashed += 1
            if digest != row.sha256:
                changed.setdefault(row.cohort, []).append(row.path)
    checked["slide_files_hashed"] = hashed
    out: list[Finding] = []
    for cohort, paths in sorted(missing.items()):
        out.append(Finding(
            "problem", "slide-files-missing",
            f"{_plural(len(paths), 'slide file')} of cohort '{cohort}' missing",
            "put the files back at these paths, or ingest the cohort from their new place "
            f"(python -m cmil_core ingest {db_arg} --cohort {cohort} --slides FOLDER)",
            len(paths), _examples(paths),
        ))
    for cohort, paths in sorted(changed.items()):
        out.append(Finding(
            "problem", "slide-files-changed",
            f"{_plural(len(paths), 'slide file')} of cohort '{cohort}' changed since ingest "
            "(size or SHA-256)",
            f"rerun python -m cmil_core ingest {db_arg} --cohort {cohort} --slides FOLDER "
            "(changed slides are redone), then score again", len(paths), _examples(paths),
        ))
    return out


def _check_models(models: Any, root: Path, db_arg: str, hash_files: bool) -> list[Finding]:
    out: list[Finding] = []
    models_root = root / "models"
    recorded: set[Path] = set()
    gone: list[str] = []
    moved: dict[str, str] = {}
    broken: list[str] = []
    for row in models.itertuples():
        here = Path(row.artifact_path) if isinstance(row.artifact_path, str) else None
        expected = models_root / row.model_id
        if here is not None:
            recorded.add(here.resolve())
        if here is None or not (here / "model.pt").is_file():
            if (expected / "model.pt").is_file() and (expected / "config.json").is_file():
                moved[row.model_id] = str(expected)
                recorded.add(expected.resolve())
            else:
                gone.append(row.model_id)
            continue
        why = _model_files_problem(here, row.model_id, hash_files)
        if why:
            broken.append(f"{row.model_id} ({why})")
    if gone:
        out.append(Finding(
            "problem", "model-files-missing",
            f"the files of {_plural(len(gone), 'model')} are missing",
            "restore them from a backup, or delete the model (Models page) and train again",
            len(gone), _examples(gone),
        ))
    if broken:
        out.append(Finding(
            "problem", "model-files-unreadable",
            f"the files of {_plural(len(broken), 'model')} cannot be read",
            "restore them from a backup, or delete the model (Models page) and train again",
            len(broken), _examples(broken),
        ))
    if moved:
        out.append(Finding(
            "problem", "model-files-moved",
            f"{_plural(len(moved), 'model')} recorded at a folder that no longer exists, "
            "found under this store's models/ folder (the store was moved)",
            f"python -m cmil_core check {db_arg} --repair records their new place",
            len(moved), _examples(list(moved)), True, [moved],
        ))
    if models_root.is_dir():
        orphans = sorted(
            p for p in models_root.iterdir()
            if p.is_dir() and not _atomic.is_temp_name(p.name) and p.resolve() not in recorded
        )
        if orphans:
            out.append(Finding(
                "problem", "model-folders-without-row",
                f"{_plural(len(orphans), 'folder')} under models/ belong to no model "
                "(left by a killed train or delete)",
                f"python -m cmil_core check {db_arg} --repair deletes them", len(orphans),
                _examples([p.name for p in orphans]), True, orphans,
            ))
    return out


def _model_files_problem(folder: Path, model_id: str, hash_files: bool) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json: {type(exc).__name__}"
    if not isinstance(config, dict) or config.get("model_id", model_id) != model_id:
        return "config.json names another model"
    weights = folder / "model.pt"
    if not zipfile.is_zipfile(weights):  # torch.save writes a zip archive
        return "model.pt is not a saved model"
    if hash_files:
        try:
            with zipfile.ZipFile(weights) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, zlib.error) as exc:
            return f"model.pt: {exc}"
        if bad is not None:
            return f"model.pt is damaged ({bad})"
    return None


def _check_features(models: Any, slides: Any, root: Path, db_arg: str, hash_files: bool,
                    checked: dict[str, int]) -> list[Finding]:
    """Feature files of the slides each model scored (and of encoded slides): present, readable."""
    features_root = root / "features"
    usable = slides[slides["status"].isin(["tiled", "encoded"]) & (slides["passed"] > 0)
                    & slides["sha256"].notna() & slides["tiling_key"].notna()]
    on_disk = {p.relative_to(features_root).as_posix(): p
               for p in features_root.glob("*/*.npz")} if features_root.is_dir() else {}
    checked["feature_files"] = len(on_disk)
    out: list[Finding] = []
    wanted: dict[str, Path] = {}
    for row in models.itertuples():
        if not row.encoder_key or not row.cohorts:
            continue
        rows = usable[usable["cohort"].isin(row.cohorts)]
        names = {f"{row.encoder_key}/{s[:16]}_{t}.npz"
                 for s, t in zip(rows["sha256"], rows["tiling_key"], strict=True)}
        absent = sorted(n for n in names if n not in on_disk)
        wanted.update({n: on_disk[n] for n in names if n in on_disk})
        if absent:
            cohorts = " ".join(f"--cohort {c}" for c in row.cohorts)
            out.append(Finding(
                "warning", "feature-files-missing",
                f"{_plural(len(absent), 'feature file')} of model {row.model_id}'s encoder "
                "are missing (recomputed, slowly, when next needed)",
                f"to recompute them now: python -m cmil_core score {db_arg} "
                f"--model {row.model_id} {cohorts}", len(absent), _examples(absent),
            ))
    stems = {n.split("/", 1)[1] for n in on_disk}
    encoded = usable[usable["status"] == "encoded"]
    bare = [p for s, t, p in zip(encoded["sha256"], encoded["tiling_key"], encoded["path"],
                                 strict=True) if f"{s[:16]}_{t}.npz" not in stems]
    if bare:
        out.append(Finding(
            "warning", "encoded-without-features",
            f"{_plural(len(bare), 'encoded slide')} have no feature file (recomputed when next "
            "needed)", "train or score on their cohort to recompute them", len(bare),
            _examples(bare),
        ))
    if hash_files and wanted:
        from cmil_core.model.features import load_features  # imports torch: only when needed

        unreadable = []
        for _, p in sorted(wanted.items()):
            try:
                load_features(p)
            except InputError:
                unreadable.append(p)
        checked["feature_files_read"] = len(wanted)
        if unreadable:
            out.append(Finding(
                "warning", "feature-files-unreadable",
                f"{_plural(len(unreadable), 'feature file')} cannot be read",
                f"python -m cmil_core check {db_arg} --repair deletes them (recomputed when "
                "next needed)", len(unreadable),
                _examples([p.relative_to(root) for p in unreadable]), True, unreadable,
            ))
    return out


def _repair(st: store_mod.Store, path: Path, report: CheckReport) -> list[str]:
    """Apply the safe repairs of ``report``'s findings; returns one line per action."""
    root = _store_dir(path)
    done: list[str] = []
    for f in report.findings:
        if not f.repairable:
            continue
        if f.kind == "orphan-rows":
            n = store_mod.delete_orphans(st, f._targets)
            done += [f"deleted {_plural(k, 'row')}: {kind}" for kind, k in n.items() if k]
        elif f.kind == "tiled-without-patches":
            store_mod.set_slides_status(st, f._targets, "pending")
            done.append(f"marked {_plural(len(f._targets), 'slide')} pending")
        elif f.kind == "model-files-moved":
            store_mod.set_model_artifact_paths(st, f._targets[0])
            done += [f"model {m}: files recorded at {p}" for m, p in f._targets[0].items()]
        elif f.kind == "model-folders-without-row":
            for folder in f._targets:
                if folder.parent.resolve() == (root / "models").resolve() and folder.is_dir():
                    shutil.rmtree(folder)
                    done.append(f"deleted models/{folder.name}")
        elif f.kind in ("temporary-files", "feature-files-unreadable"):
            for p in f._targets:
                if f.kind == "temporary-files" and not _atomic.is_stale(p):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                done.append(f"deleted {p.relative_to(root)}")
    return done


def format_check(report: CheckReport) -> str:
    """The report for a terminal: a line per finding with its repair, then a summary."""
    lines = [f"repaired: {r}" for r in report.repaired]
    for f in report.findings:
        shown = f" (e.g. {', '.join(f.examples)})" if f.examples and f.count > 1 else (
            f" ({f.examples[0]})" if f.examples else "")
        lines.append(f"{f.severity}: {f.message}{shown}; repair: {f.repair}")
    c = report.checked
    seen = (f"{_plural(c.get('slides', 0), 'slide')} ({c.get('slide_files_hashed', 0)} hashed), "
            f"{_plural(c.get('models', 0), 'model')}, "
            f"{_plural(c.get('feature_files', 0), 'feature file')}")
    version = report.schema_version if report.schema_version is not None else "?"
    verdict = "ok" if report.ok else _plural(len(report.problems), "problem")
    lines.append(f"{report.db} (schema {version}): {seen}: {verdict}, "
                 f"{_plural(len(report.warnings), 'warning')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# backup
# --------------------------------------------------------------------------

@dataclass
class BackupSummary:
    archive: str
    db: str
    members: int
    bytes: int
    models: int
    features: bool
    tables: dict[str, int]


def _files_under(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, in a stable order, skipping temporary names and links."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _atomic.is_temp_name(d))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not _atomic.is_temp_name(name) and p.is_file() and not p.is_symlink():
                yield p


def _add(archive: zipfile.ZipFile, source: Path, name: str,
         members: dict[str, dict[str, Any]]) -> None:
    """Copy a file into the archive, hashing it on the way."""
    info = zipfile.ZipInfo.from_file(source, name)
    info.compress_type = zipfile.ZIP_DEFLATED
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as src, archive.open(info, "w", force_zip64=True) as dst:
        while block := src.read(_CHUNK):
            digest.update(block)
            dst.write(block)
            size += len(block)
    members[name] = {"sha256": digest.hexdigest(), "size": size}


def backup_store(
    db: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    features: bool = True,
    force: bool = False,
    timeout: float = 60.0,
) -> BackupSummary:
    """Write a backup archive of the store ``db`` and its artifacts to ``out``.

    See the module docstring for what goes in and why the copy is
    consistent. ``features``: include the feature files (a cache, often the
    bulk). ``force``: replace an existing ``out``. ``timeout``: seconds to
    wait for a command that writes the store to finish.

    The lock keeps out writers of *other* processes: call it from a process
    that is not writing the same store meanwhile (the command line is not).
    """
    path = Path(db).expanduser()
    target = Path(out).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no store here (no such file)")
    if target.exists() and not force:
        raise InputError(f"{target}: already exists; pass --force to replace it")
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give the archive's file name")
    root = _store_dir(path)
    resolved = target.resolve()
    for name in ARTIFACT_FOLDERS:
        if resolved.is_relative_to((root / name).resolve()):
            raise InputError(f"{target}: inside the store's {name}/ folder; write it elsewhere")
    members: dict[str, dict[str, Any]] = {}
    with _atomic.replacing(target) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        # The store file and the models, while no other process can write.
        with store_mod.open_store(path, read_only=True, timeout=timeout) as st:
            version = store_mod.schema_version(st)
            tables = store_mod.table_counts(st)
            models = store_mod.model_artifacts_frame(st)
            _add(zf, path, f"store/{path.name}", members)
            wal = Path(str(path) + ".wal")
            if wal.is_file():
                _add(zf, wal, f"store/{path.name}.wal", members)
            saved = 0
            for row in models.itertuples():
                folder = Path(row.artifact_path) if isinstance(row.artifact_path, str) else None
                if folder is None or not folder.is_dir():
                    continue  # check reports it; the row is kept
                for f in _files_under(folder):
                    _add(zf, f, f"models/{row.model_id}/{f.relative_to(folder).as_posix()}",
                         members)
                saved += 1
        # Caches and exports: immutable once written (each file is replaced whole).
        for name in ("features", "reports") if features else ("reports",):
            for f in _files_under(root / name):
                _add(zf, f, f"{name}/{f.relative_to(root / name).as_posix()}", members)
        manifest = {
            "format": BACKUP_FORMAT,
            "format_version": BACKUP_FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "created_by": _user(),
            "source": str(path.resolve()),
            "store": path.name,
            "schema_version": version,
            "tables": tables,
            "models": sorted(str(m) for m in models["model_id"]),
            "features": features,
            "members": members,
        }
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    total = sum(m["size"] for m in members.values())
    return BackupSummary(str(target), str(path), len(members), total, saved, features, tables)


# --------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------

@dataclass
class RestoreSummary:
    db: str
    backup: str
    created_at: str
    source: str
    members: int
    models: int
    features: bool
    replaced: bool
    check: CheckReport


def _damaged(backup: Path, why: str) -> InputError:
    return InputError(f"{backup}: {why}; nothing was restored")


def _member_target(name: str) -> PurePosixPath:
    """A member's path in the restored folder; refuses names that could escape it."""
    p = PurePosixPath(name)
    if (p.is_absolute() or ".." in p.parts or not p.parts or "\\" in name
            or p.parts[0] not in ("store", *ARTIFACT_FOLDERS) or len(p.parts) < 2):
        raise ValueError(name)
    return p


def _read_manifest(backup: Path, zf: zipfile.ZipFile) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except KeyError:
        raise _damaged(backup, f"no {MANIFEST}: not a cMIL backup") from None
    except (ValueError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise _damaged(backup, f"{MANIFEST} is damaged ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
        raise _damaged(backup, "not a cMIL backup (its manifest is of another format)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BACKUP_FORMAT_VERSION:
        raise _damaged(backup, f"backup format version {version!r}; this program reads up to "
                               f"{BACKUP_FORMAT_VERSION}: upgrade cmil_core")
    members = manifest.get("members")
    store_name = manifest.get("store")
    if not isinstance(members, dict) or not isinstance(store_name, str):
        raise _damaged(backup, "its manifest lists no members")
    names = set(zf.namelist()) - {MANIFEST}
    if names != set(members):
        extra = sorted(names - set(members))[:3]
        absent = sorted(set(members) - names)[:3]
        raise _damaged(backup, "its members differ from its manifest"
                       + (f" (not listed: {', '.join(extra)})" if extra else "")
                       + (f" (missing: {', '.join(absent)})" if absent else ""))
    for name in members:
        try:
            _member_target(name)
        except ValueError:
            raise _damaged(backup, f"member {name!r} would land outside the store's folder") \
                from None
    if f"store/{store_name}" not in members:
        raise _damaged(backup, f"the store file store/{store_name} is missing")
    return manifest


def _copy_member(backup: Path, zf: zipfile.ZipFile, name: str, expected: dict[str, Any],
                 dest: Path | None) -> None:
    """Read a member (writing it to ``dest`` when given), checking its SHA-256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        with zf.open(name) as src:
            out = dest.open("wb") if dest is not None else None
            try:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    size += len(block)
                    if out is not None:
                        out.write(block)
            finally:
                if out is not None:
                    out.close()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _damaged(backup, f"member {name} is damaged ({exc})") from exc
    if digest.hexdigest() != expected.get("sha256") or size != expected.get("size"):
        raise _damaged(backup, f"member {name} is damaged (its SHA-256 differs from the manifest)")


def restore_store(
    backup: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    force: bool = False,
    hash_files: bool = True,
    who: str | None = None,
) -> RestoreSummary:
    """Restore a backup archive as the store ``db`` (see the module docstring).

    ``force``: replace an existing store (and its models/, reports/ and, when
    the backup has them, features/). ``hash_files``: passed to the final
    :func:`check_store`. ``who``: recorded in the audit trail (default: the
    operating-system user).
    """
    source = Path(backup).expanduser()
    path = Path(db).expanduser()
    if not source.is_file():
        raise InputError(f"{source}: no such backup file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the store's file name (e.g. cmil.duckdb)")
    exists = path.exists()
    if exists and not force:
        raise InputError(f"{path}: a store is already there; pass --force to replace it "
                         "(what it holds is lost)")
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _damaged(source, f"not a readable zip archive ({exc})") from exc
    with zf:
        manifest = _read_manifest(source, zf)
        members: dict[str, dict[str, Any]] = manifest["members"]
        # Pass 1: verify every member before writing anything.
        for name in sorted(members):
            _copy_member(source, zf, name, members[name], None)
        root = path.resolve().parent
        has_features = any(n.startswith("features/") for n in members)
        if not exists and not force:
            for name in ("models", "reports", *(("features",) if has_features else ())):
                folder = root / name
                if folder.is_dir() and any(folder.iterdir()):
                    raise InputError(
                        f"{folder}: already holds files of another store; restore into an "
                        "empty folder, or pass --force to replace them")
        if exists:
            # Refuse while another process uses the store about to be replaced.
            try:
                store_mod.open_store(path).close()
            except store_mod.StoreBusyError:
                raise
            except store_mod.StoreError:
                pass  # unreadable or of another version: replaced all the same
        root.mkdir(parents=True, exist_ok=True)
        # Pass 2: extract into a temporary folder beside the store, checking again.
        staging = _atomic.temp_path(root / f"{path.name}.restore")
        staging.mkdir()
        try:
            store_name = manifest["store"]
            for name in sorted(members):
                rel = _member_target(name)
                if rel.parts[0] == "store":
                    tail = rel.name[len(store_name):] if rel.name.startswith(store_name) else None
                    if tail not in ("", ".wal"):
                        raise _damaged(source, f"unexpected store member {name}")
                    dest = staging / (path.name + tail)
                else:
                    dest = staging.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(source, zf, name, members[name], dest)
            restored = _finish_staging(staging, path, root, manifest, source, who)
            replaced = _swap_into_place(staging, path, root, has_features)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    report = check_store(path, hash_files=hash_files)
    return RestoreSummary(
        str(path), str(source), str(manifest.get("created_at", "")),
        str(manifest.get("source", "")), len(members), restored, has_features, replaced, report,
    )


def _finish_staging(staging: Path, path: Path, root: Path, manifest: dict[str, Any],
                    source: Path, who: str | None) -> int:
    """Point the restored models at their final folders and record the restore."""
    with store_mod.open_store(staging / path.name) as st:
        models = store_mod.model_artifacts_frame(st)
        paths = {str(m): str(root / "models" / str(m)) for m in models["model_id"]
                 if (staging / "models" / str(m)).is_dir()}
        store_mod.set_model_artifact_paths(st, paths)
        store_mod.record_audit(
            st, who or _user(), "restore",
            details={"backup": str(source.resolve()),
                     "backup_created_at": manifest.get("created_at"),
                     "source": manifest.get("source"), "members": len(manifest["members"]),
                     "features": manifest.get("features")},
        )
    return len(paths)


def _swap_into_place(staging: Path, path: Path, root: Path, has_features: bool) -> bool:
    """Move what is replaced aside, the restored files in, then delete what was replaced.

    Returns whether something was replaced. On an error midway, the restored
    files go back to ``staging`` and the previous ones back in place.
    """
    names = [path.name, "models", "reports", *(("features",) if has_features else ())]
    aside = _atomic.temp_path(root / f"{path.name}.replaced")
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in [*names, path.name + ".wal"]:
            current = root / name
            if current.exists() or current.is_symlink():
                aside.mkdir(exist_ok=True)
                os.rename(current, aside / name)
                moved_out.append(name)
        for name in names:
            if (staging / name).exists():
                os.rename(staging / name, root / name)
                moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.rename(root / name, staging / name)
        for name in reversed(moved_out):
            os.rename(aside / name, root / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return bool(moved_out)
