"""Keeping a store sound: the consistency check ``check`` and its repairs.

Backups and restores (which end with this check) are :mod:`cmil_core.ops.backup`.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cmil_core import _atomic, store as store_mod
from cmil_core.errors import InputError

__all__ = [
    "READ_CHUNK",
    "CheckReport",
    "Finding",
    "check_store",
    "format_check",
    "temporary_leftovers",
]

_EXAMPLES = 5
#: Bytes read at a time when hashing or copying a file.
READ_CHUNK = 1 << 20


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
    root = store_mod.StoreFolder.of(db).root
    found = [p for p in sorted(root.iterdir()) if _atomic.is_temp_name(p.name)] \
        if root.is_dir() else []
    for name in store_mod.StoreFolder.WORK_FOLDERS:
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
    root = store_mod.StoreFolder.of(path).root
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
        while block := fh.read(READ_CHUNK):
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
    models_root = store_mod.StoreFolder(root / "store").models
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
    features_root = store_mod.StoreFolder(root / "store").features
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
    root = store_mod.StoreFolder.of(path).root
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
                if store_mod.StoreFolder.of(path).is_model_folder(folder) and folder.is_dir():
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
