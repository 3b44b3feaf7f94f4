"""Finding a cohort's slides and whose they are.

``ingest --slides DIR_OR_ZIP [--manifest CSV]`` hands us a folder or a zip.
:func:`discover_slides` returns one :class:`SlideSource` per slide file, with
its patient:

1. a **manifest** (CSV with ``slide_path``, ``patient_id`` and optionally
   ``mpp``; ``slide_path`` relative to the folder, or absolute but inside it)
   decides everything: only the slides it lists are taken, and a listed file
   that is missing or lies outside the folder (``../x.svs``, ``/etc/...``, or
   a link out of it), or a row that repeats a slide, is an error;
2. otherwise a file inside a sub-folder belongs to the patient named by the
   top-level sub-folder (``P001/fov01.jpg``: per-patient folders, the usual
   layout for microscope photographs);
3. otherwise the file name up to the first ``_`` is the patient
   (``P001_slide2.svs``), or the whole stem when there is no ``_``.

Zips are extracted by :func:`extract_zip` into a target folder, member by
member, refusing absolute paths, ``..``, links, anything that would land
outside the target, members named twice and archives inside the archive
(nested zips are not opened: extract them first), and bounding the number
of members, the total size (also against the free disk space) and the
compression ratio (zip bombs). A refused or corrupt archive leaves nothing
behind: the folder :func:`discover_slides` created for it is removed.

A symbolic link inside a slide folder that points outside it is refused
(with its name and target) rather than followed or silently skipped: copy
the file in, or link only within the folder. Files OpenSlide or Pillow may
read are recognised by suffix (:data:`SLIDE_SUFFIXES`); hidden files and
partial downloads are skipped.

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
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cmil_core.clinical.tables import read_frame
from cmil_core.errors import InputError, shown
from cmil_core.store import StoreFolder

__all__ = [
    "MAX_ZIP_BYTES",
    "MAX_ZIP_MEMBERS",
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
MAX_ZIP_MEMBERS = 100_000  # files and folders; a cohort of photographs has thousands
# Archives inside the archive are not opened (nor taken as slides): refused by name.
_ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz")


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


def _refuse_link_out(path: Path, root: Path) -> None:
    """Refuse a symbolic link under ``root`` whose target lies outside it."""
    target = path.resolve()
    if not target.is_relative_to(root):
        raise InputError(
            f"{path.relative_to(root)}: a symbolic link to {target}, outside the slide folder "
            f"{root}; refused (copy the file into the folder, or link only within it)"
        )


def _scan(root: Path) -> list[Path]:
    found: list[Path] = []
    root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                _refuse_link_out(base / d, root)  # a link within the folder is not walked
        for name in sorted(filenames):
            path = base / name
            if name.startswith("."):
                continue
            if path.is_symlink():
                _refuse_link_out(path, root)
            if _is_candidate(path):
                found.append(path)
    return found


def _size(n: float) -> str:
    """A byte count for a person: 512 bytes, 3.2 MiB, 64.0 GiB."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _free_bytes(folder: Path) -> int | None:
    """Free space where ``folder`` is (or would be created); None when it cannot be told."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def extract_zip(
    zip_path: Path,
    target: Path,
    *,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
    max_members: int | None = None,
) -> Path:
    """Extract ``zip_path`` into ``target`` safely; returns ``target``.

    Members already extracted with the same size are kept (a rerun does not
    extract again). Raises :class:`InputError` naming the member for a path
    that escapes the target, a link, a member named twice, an archive inside
    the archive, a bomb (more than ``max_members`` members, more than
    ``max_bytes`` in all or than the disk has free, a member inflating more
    than ``max_ratio`` times), or a corrupt archive; nothing is extracted
    then, except for corrupt data found while extracting. The limits default
    to :data:`MAX_ZIP_MEMBERS`, :data:`MAX_ZIP_BYTES` and :data:`MAX_ZIP_RATIO`.
    """
    max_bytes = MAX_ZIP_BYTES if max_bytes is None else max_bytes
    max_ratio = MAX_ZIP_RATIO if max_ratio is None else max_ratio
    max_members = MAX_ZIP_MEMBERS if max_members is None else max_members
    name = zip_path.name
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: not a readable zip archive ({exc})") from exc
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise InputError(
                f"{name}: {len(members)} members, more than the {max_members} allowed; refused"
            )
        total = 0
        root = target.resolve()
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        seen: set[Path] = set()
        for info in members:
            member = info.filename
            label = shown(member, 120)
            pure = PurePosixPath(member.replace("\\", "/"))
            if pure.is_absolute() or member.startswith(("/", "\\")) or (
                len(member) > 1 and member[1] == ":"
            ):
                raise InputError(f"{name}: member '{label}' has an absolute path; refused")
            if ".." in pure.parts:
                raise InputError(f"{name}: member '{label}' points outside the archive; refused")
            mode = (info.external_attr >> 16) & 0o170000
            if mode == stat.S_IFLNK:
                raise InputError(f"{name}: member '{label}' is a symbolic link; refused")
            if info.is_dir():
                continue
            if pure.name.lower().endswith(_ARCHIVE_SUFFIXES):
                raise InputError(
                    f"{name}: member '{label}' is itself an archive; nested archives are not "
                    "opened: put the slides directly in one zip"
                )
            dest = (root / Path(*pure.parts)).resolve()
            if not dest.is_relative_to(root):
                raise InputError(f"{name}: member '{label}' would land outside the target")
            if dest in seen:
                raise InputError(f"{name}: member '{label}' appears twice in the archive; refused")
            seen.add(dest)
            total += info.file_size
            if total > max_bytes:
                raise InputError(
                    f"{name}: more than {_size(max_bytes)} uncompressed; refused"
                )
            if info.compress_size and info.file_size / info.compress_size > max_ratio:
                raise InputError(
                    f"{name}: member '{label}' inflates {info.file_size / info.compress_size:.0f}"
                    " times; refused as a zip bomb"
                )
            plan.append((info, dest))
        folders = {parent for dest in seen for parent in dest.parents}
        clash = next((info for info, dest in plan if dest in folders), None)
        if clash is not None:
            raise InputError(
                f"{name}: member '{shown(clash.filename, 120)}' is both a file and a folder; "
                "refused"
            )
        free = _free_bytes(root)
        needed = sum(
            i.file_size for i, d in plan if not (d.exists() and d.stat().st_size == i.file_size)
        )
        if free is not None and needed > free:
            raise InputError(
                f"{name}: extracting needs {_size(needed)}, the disk has {_size(free)} free; "
                "refused"
            )
        for info, dest in plan:
            if dest.exists() and dest.stat().st_size == info.file_size:
                continue
            label = shown(info.filename, 120)
            tmp = dest.with_name(dest.name + ".part")
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(tmp, "wb") as out:
                    written = 0
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > info.file_size:
                            raise InputError(
                                f"{name}: member '{label}' is larger than declared"
                            )
                        out.write(block)
                os.replace(tmp, dest)
            except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
                tmp.unlink(missing_ok=True)
                raise InputError(f"{name}: member '{label}' is corrupt ({exc})") from exc
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise InputError(
                    f"{name}: member '{label}' cannot be written to {dest.parent} "
                    f"({exc.strerror or exc})"
                ) from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
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
        label = shown(str(raw_path), 120)
        path = Path(raw_path)
        path = path if path.is_absolute() else root / path
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as exc:  # a name too long, a loop of links
            problems.append(f"row {row}, column 'slide_path': '{label}' is not a usable path "
                            f"({exc.__class__.__name__})")
            continue
        if not resolved.is_relative_to(root):
            problems.append(
                f"row {row}, column 'slide_path': '{label}' lies outside the slide folder "
                f"{root} (paths must stay inside it)"
            )
            continue
        mpp: float | None = None
        if "mpp" in columns and record[columns["mpp"]] is not None:
            try:
                mpp = float(str(record[columns["mpp"]]).replace(",", "."))
            except ValueError:
                problems.append(
                    f"row {row}, column 'mpp': '{record[columns['mpp']]}' is not a number"
                )
                continue
            if not 0 < mpp < 1000:
                problems.append(f"row {row}, column 'mpp': {mpp} is not a resolution in um/pixel")
                continue
        if not path.exists():
            problems.append(f"row {row}, column 'slide_path': '{label}' does not exist")
            continue
        key = path.resolve()
        if key in seen:
            problems.append(f"row {row}, column 'slide_path': '{label}' repeats row {seen[key]}")
            continue
        seen[key] = int(row)
        out.append(SlideSource(path, str(pid), mpp, "manifest"))
        if len(problems) >= 20:
            break
    if problems:
        listed = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        noun = "problem" if len(problems) == 1 else "problems"
        raise InputError(f"{source}: {len(problems)} {noun}, nothing ingested: {listed}{more}")
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
    created: Path | None = None  # the topmost folder this call creates, removed on failure
    try:
        if root.is_file():
            if root.suffix.lower() != ".zip" and not zipfile.is_zipfile(root):
                raise InputError(f"{root.name}: --slides must be a folder or a .zip archive")
            if extract_to is None:
                raise InputError(f"{root.name}: no folder given to extract the zip into")
            target = Path(extract_to)
            created = target if not target.exists() else None
            while created is not None and not created.parent.exists():
                created = created.parent
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
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
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
    return StoreFolder.of(db).uploads / _safe_name(cohort, "cohort")


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
