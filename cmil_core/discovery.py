"""Finding a cohort's slides and whose they are.

``ingest --slides DIR_OR_ZIP [--manifest CSV]`` hands us a folder or a zip.
:func:`discover_slides` returns one :class:`SlideSource` per slide file, with
its patient:

1. a **manifest** (CSV with ``slide_path``, ``patient_id`` and optionally
   ``mpp``; ``slide_path`` relative to the folder, or absolute) decides
   everything: only the slides it lists are taken, and a listed file that is
   missing, or a row that repeats a slide, is an error;
2. otherwise a file inside a sub-folder belongs to the patient named by the
   top-level sub-folder (``P001/fov01.jpg``: per-patient folders, the usual
   layout for microscope photographs);
3. otherwise the file name up to the first ``_`` is the patient
   (``P001_slide2.svs``), or the whole stem when there is no ``_``.

Zips are extracted by :func:`extract_zip` into a target folder, member by
member, refusing absolute paths, ``..``, links and anything that would land
outside the target, and bounding the total size and the compression ratio
(zip bombs). Files OpenSlide or Pillow may read are recognised by suffix
(:data:`SLIDE_SUFFIXES`); hidden files and partial downloads are skipped.

The dashboard reads server folders only under one root, the folder named by
the environment variable ``CMIL_SLIDE_ROOT`` (:func:`configured_slide_root`;
unset: server folders are off and only uploads are offered).
:func:`resolve_under_root` resolves what a user types (relative to that root)
and refuses anything that lands outside it, through ``..`` or a symbolic
link. Uploads are written under ``<store folder>/uploads/<cohort>/``
(:func:`upload_folder`, :func:`save_upload`) and zips extracted there by
:func:`extract_zip`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cmil_core.errors import InputError
from cmil_core.tables import read_frame

__all__ = [
    "MAX_ZIP_BYTES",
    "MAX_ZIP_RATIO",
    "SLIDE_ROOT_ENV",
    "SLIDE_SUFFIXES",
    "SlideSource",
    "configured_slide_root",
    "discover_slides",
    "extract_zip",
    "folders_under_root",
    "patient_from_path",
    "resolve_under_root",
    "save_upload",
    "upload_folder",
]

# OpenSlide's formats plus plain images.
SLIDE_SUFFIXES = frozenset(
    {
        ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
        ".bif", ".dcm", ".jpg", ".jpeg", ".png", ".bmp",
    }
)
MAX_ZIP_BYTES = 64 * 1024**3  # 64 GiB uncompressed in all
MAX_ZIP_RATIO = 250  # a member that inflates more than this is a bomb, not an image


@dataclass(frozen=True)
class SlideSource:
    """A slide file found for a cohort: where, whose, and any resolution given for it."""

    path: Path
    patient_id: str
    mpp: float | None = None
    origin: str = "prefix"  # "manifest", "folder" or "prefix"


def patient_from_path(path: Path, root: Path) -> tuple[str, str]:
    """(patient id, rule) for a file under ``root``: top folder name, else file-name prefix."""
    rel = path.relative_to(root)
    if len(rel.parts) > 1:
        return rel.parts[0], "folder"
    stem = path.name.split(".")[0] if path.suffix.lower() != ".svslide" else path.stem
    return stem.split("_", 1)[0], "prefix"


def _is_candidate(path: Path) -> bool:
    name = path.name
    return (
        path.is_file()
        and not name.startswith(".")
        and not name.endswith(".part")
        and path.suffix.lower() in SLIDE_SUFFIXES
    )


def _scan(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            path = base / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root.resolve()):
                    continue  # a link out of the slide folder is never followed
            if _is_candidate(path):
                found.append(path)
    return found


def extract_zip(
    zip_path: Path,
    target: Path,
    *,
    max_bytes: int = MAX_ZIP_BYTES,
    max_ratio: float = MAX_ZIP_RATIO,
) -> Path:
    """Extract ``zip_path`` into ``target`` safely; returns ``target``.

    Members already extracted with the same size are kept (a rerun does not
    extract again). Raises :class:`InputError` naming the member for a path
    that escapes the target, a link, a bomb, or a corrupt archive; nothing
    is extracted then.
    """
    name = zip_path.name
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{name}: not a readable zip archive ({exc})") from exc
    with archive:
        members = archive.infolist()
        total = 0
        root = target.resolve()
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in members:
            member = info.filename
            pure = PurePosixPath(member.replace("\\", "/"))
            if pure.is_absolute() or member.startswith(("/", "\\")) or (
                len(member) > 1 and member[1] == ":"
            ):
                raise InputError(f"{name}: member '{member}' has an absolute path; refused")
            if ".." in pure.parts:
                raise InputError(f"{name}: member '{member}' points outside the archive; refused")
            mode = (info.external_attr >> 16) & 0o170000
            if mode == stat.S_IFLNK:
                raise InputError(f"{name}: member '{member}' is a symbolic link; refused")
            if info.is_dir():
                continue
            dest = (root / Path(*pure.parts)).resolve()
            if not dest.is_relative_to(root):
                raise InputError(f"{name}: member '{member}' would land outside the target")
            total += info.file_size
            if total > max_bytes:
                raise InputError(
                    f"{name}: more than {max_bytes / 1024**3:.0f} GiB uncompressed; refused"
                )
            if info.compress_size and info.file_size / info.compress_size > max_ratio:
                raise InputError(
                    f"{name}: member '{member}' inflates {info.file_size / info.compress_size:.0f}"
                    " times; refused as a zip bomb"
                )
            plan.append((info, dest))
        for info, dest in plan:
            if dest.exists() and dest.stat().st_size == info.file_size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            try:
                with archive.open(info) as src, open(tmp, "wb") as out:
                    written = 0
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > info.file_size:
                            raise InputError(
                                f"{name}: member '{info.filename}' is larger than declared"
                            )
                        out.write(block)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                tmp.unlink(missing_ok=True)
                raise InputError(f"{name}: member '{info.filename}' is corrupt ({exc})") from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, dest)
    return target


def _read_manifest(manifest: Path, root: Path) -> list[SlideSource]:
    frame = read_frame(manifest, numeric=False)
    source = manifest.name
    columns = {c.strip().lower(): c for c in frame.columns}
    for needed in ("slide_path", "patient_id"):
        if needed not in columns:
            raise InputError(
                f"{source}: no '{needed}' column (the manifest needs slide_path and patient_id)"
            )
    problems: list[str] = []
    out: list[SlideSource] = []
    seen: dict[Path, int] = {}
    for row, record in frame.iterrows():
        raw_path = record[columns["slide_path"]]
        pid = record[columns["patient_id"]]
        if raw_path is None:
            problems.append(f"row {row}, column 'slide_path': empty")
            continue
        if pid is None:
            problems.append(f"row {row}, column 'patient_id': empty")
            continue
        path = Path(raw_path)
        path = path if path.is_absolute() else root / path
        mpp: float | None = None
        if "mpp" in columns and record[columns["mpp"]] is not None:
            try:
                mpp = float(str(record[columns["mpp"]]).replace(",", "."))
            except ValueError:
                problems.append(f"row {row}, column 'mpp': '{record[columns['mpp']]}' is not a number")
                continue
            if not 0 < mpp < 1000:
                problems.append(f"row {row}, column 'mpp': {mpp} is not a resolution in um/pixel")
                continue
        if not path.exists():
            problems.append(f"row {row}, column 'slide_path': '{raw_path}' does not exist")
            continue
        key = path.resolve()
        if key in seen:
            problems.append(f"row {row}, column 'slide_path': '{raw_path}' repeats row {seen[key]}")
            continue
        seen[key] = int(row)  # type: ignore[arg-type]
        out.append(SlideSource(path, str(pid), mpp, "manifest"))
        if len(problems) >= 20:
            break
    if problems:
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise InputError(f"{source}: {len(problems)} problems, nothing ingested: {shown}{more}")
    return out


def discover_slides(
    slides: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    extract_to: str | os.PathLike[str] | None = None,
) -> tuple[Path, list[SlideSource]]:
    """The slide files of a folder or zip, with their patients (see the module docstring).

    A zip is extracted into ``extract_to`` (required for zips). Returns the
    folder the slides are in and the sources, sorted by patient and path.
    """
    root = Path(slides).expanduser()
    if not root.exists():
        raise InputError(f"{root}: no such folder or zip")
    if root.is_file():
        if root.suffix.lower() != ".zip" and not zipfile.is_zipfile(root):
            raise InputError(f"{root.name}: --slides must be a folder or a .zip archive")
        if extract_to is None:
            raise InputError(f"{root.name}: no folder given to extract the zip into")
        target = Path(extract_to)
        target.mkdir(parents=True, exist_ok=True)
        root = extract_zip(root, target)
    root = root.resolve()
    if manifest is not None:
        sources = _read_manifest(Path(manifest), root)
    else:
        sources = []
        for path in _scan(root):
            pid, rule = patient_from_path(path, root)
            sources.append(SlideSource(path, pid, None, rule))
    if not sources:
        raise InputError(
            f"{root}: no slide files found (looked for {', '.join(sorted(SLIDE_SUFFIXES))})"
        )
    return root, sorted(sources, key=lambda s: (s.patient_id, str(s.path)))


# --- server folders under a root, and uploads (the dashboard's slide sources) ---

SLIDE_ROOT_ENV = "CMIL_SLIDE_ROOT"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def configured_slide_root() -> Path | None:
    """The folder the dashboard may ingest server folders from: ``$CMIL_SLIDE_ROOT``.

    None when the variable is unset or empty (server folders are then off);
    :class:`InputError` when it names something that is not a folder.
    """
    text = os.environ.get(SLIDE_ROOT_ENV, "").strip()
    if not text:
        return None
    root = Path(text).expanduser()
    if not root.is_dir():
        raise InputError(f"{SLIDE_ROOT_ENV}={text}: no such folder on the server")
    return root.resolve()


def resolve_under_root(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> Path:
    """The folder (or zip) ``relative`` names under ``root``, resolved; never anything outside it.

    ``relative`` is read relative to ``root`` (an absolute path is accepted
    only if it lies under ``root``). The path is resolved first, following
    ``..`` and symbolic links, and then must lie under the resolved root: a
    link inside the root that points out of it is refused like ``../x``.
    Raises :class:`InputError` for a path outside the root, one that does not
    exist, or one that is neither a folder nor a zip.

    >>> import tempfile; base = Path(tempfile.mkdtemp()); (base / "A").mkdir()
    >>> resolve_under_root(base, "A") == (base / "A").resolve()
    True
    >>> resolve_under_root(base, "../etc")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cmil_core.errors.InputError: '../etc' is outside the slide folder root ...
    """
    text = os.fspath(relative).strip()
    if "\0" in text:
        raise InputError(f"{text!r} is not a valid path")
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise InputError(f"{root}: the slide folder root is not a folder")
    target = (base / text).resolve() if text else base
    if not target.is_relative_to(base):
        raise InputError(
            f"'{text}' is outside the slide folder root {base}; only folders under it can be used"
        )
    if not target.exists():
        raise InputError(f"'{text}': no such folder under {base}")
    if not (target.is_dir() or (target.is_file() and target.suffix.lower() == ".zip")):
        raise InputError(f"'{text}' is neither a folder nor a .zip archive")
    return target


def folders_under_root(
    root: str | os.PathLike[str], *, depth: int = 2, limit: int = 200
) -> list[str]:
    """Sub-folders of ``root`` (relative, POSIX style, at most ``depth`` deep, at most ``limit``).

    Hidden folders and links are skipped: what is listed is what
    :func:`resolve_under_root` accepts.
    """
    base = Path(root).resolve()
    found: list[str] = []
    for dirpath, dirnames, _ in os.walk(base, followlinks=False):
        here = Path(dirpath)
        level = len(here.relative_to(base).parts)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink()
        )
        if level >= depth:
            dirnames[:] = []
        for d in dirnames:
            found.append((here / d).relative_to(base).as_posix())
            if len(found) >= limit:
                return found
    return found


def _safe_name(name: str, fallback: str) -> str:
    """A file or folder name with nothing but letters, digits, ``.``, ``_`` and ``-``."""
    cleaned = _UNSAFE_NAME.sub("_", name).strip("._") or fallback
    return cleaned[:120]


def upload_folder(db: str | os.PathLike[str], cohort: str) -> Path:
    """Where a cohort's uploaded files go: ``<store folder>/uploads/<cohort>/`` (not created)."""
    base = Path(db).expanduser().resolve().parent / "uploads"
    return base / _safe_name(cohort, "cohort")


def save_upload(source: bytes | BinaryIO, name: str, folder: str | os.PathLike[str]) -> Path:
    """Write an uploaded file into ``folder`` under a cleaned-up version of its ``name``.

    Only the last part of ``name`` is kept, with characters other than
    letters, digits, ``.``, ``_`` and ``-`` replaced, so an upload cannot
    choose where it lands. Written to a ``.part`` file first and renamed, so a
    half-written file never looks complete. Returns the file's path.
    """
    base_name = PurePosixPath(name.replace("\\", "/")).name
    stem, dot, suffix = base_name.rpartition(".")
    safe = _safe_name(stem if dot else base_name, "upload")
    if dot:
        safe += "." + _safe_name(suffix, "bin")
    target_dir = Path(folder)
    target_dir.mkdir(parents=True, exist_ok=True)
    dest = target_dir / safe
    tmp = dest.with_name(dest.name + ".part")
    try:
        with open(tmp, "wb") as out:
            if isinstance(source, (bytes, bytearray, memoryview)):
                out.write(source)
            else:
                source.seek(0)
                shutil.copyfileobj(source, out, 1 << 20)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest
