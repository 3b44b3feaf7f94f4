"""Per-slide feature files: patch embeddings stored outside the results store.

A *feature file* holds the embeddings of one slide's patches by one encoder:
a float16 matrix ``[n_patches, D]`` (half the disk of float32; float16 keeps
3 significant digits, far finer than what separates two patches'
embeddings), the patch ids in row order, the patches' level-0 coordinates
and a JSON metadata record. DuckDB holds the patch table; these matrices, a
few kilobytes per patch, live next to it on disk (docs/DESIGN.md: "outside DuckDB").

Format and place
----------------
One uncompressed ``.npz`` (``numpy.savez``; float embeddings barely compress)
with four arrays, readable without pickle (``np.load(path,
allow_pickle=False)``):

* ``features``: float16 ``[n, D]``;
* ``patch_ids``: int64 ``[n]``, the ``patches.patch_id`` of each row;
* ``coords``: int64 ``[n, 3]``, ``x, y, size`` in level-0 pixels;
* ``meta``: a 0-d unicode array holding a JSON object: ``format``,
  ``format_version``, ``encoder`` (:meth:`EncoderSpec.to_dict`),
  ``encoder_key``, ``slide_sha256``, ``slide_name``, ``mpp`` (the override
  given, if any), ``tiling_key``, ``n_patches``, ``embed_dim``, ``created_at``
  (UTC, ISO 8601) and ``versions`` (Python and packages).

Path: ``<root>/<encoder key>/<slide sha256[:16]>_<tiling key>.npz``
(:func:`feature_path`). The encoder key (:attr:`EncoderSpec.key`) changes
with anything that changes the features; the slide is named by its content,
not its file name; the tiling key is the caller's name for the grid and
quality filter that chose the patches.

Writing is atomic (:mod:`cmil_core._atomic`): the file is written under a
temporary name in the same folder (``.<name>.<pid>-<hex>.partial``), flushed
to disk, then renamed over the final name with ``os.replace``. A run killed at
any moment leaves either the old file, or the new one, never half a file; a
leftover ``.partial`` file is ignored by readers, and removed by the next
successful write of that file once it is stale: its writer process is gone, or
it is an hour old (a younger one may belong to a writer still at work).

Reuse
-----
:func:`slide_features` returns the existing file, without reading a pixel,
when its metadata match the request: same encoder key, slide SHA-256, tiling
key, and every requested patch in the file at the same coordinates. A file
with more patches than asked for serves the subset asked for (in the order
asked): a new quality-control decision that keeps fewer patches of a slide
reuses its file. When it keeps patches the file lacks, only those are read
and embedded, and the file is rewritten with the union, so that going back
to an earlier decision reads nothing again. Otherwise it reads the patches
(:func:`cmil_core.ingest.patch_reading.read_patch` at the encoder's ``input_px``, in worker
threads), embeds them with :func:`cmil_core.model.encoders.extract` (reading
overlapped with computing) and replaces the file. A corrupt file is
recomputed; :func:`load_features` on one raises
:class:`~cmil_core.errors.InputError` naming it.

Example::

    from cmil_core.model.encoders import load_encoder
    from cmil_core.model.features import slide_features

    encoder = load_encoder("smallcnn")
    ff = slide_features("P001.svs", patches, encoder, "data/features",
                        tiling_key="t3f9a")   # patches: patch_id, x, y, size
    ff.features.shape                          # (len(patches), 128), float16
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from numpy.lib.npyio import NpzFile

from cmil_core import _atomic
from cmil_core.errors import InputError
from cmil_core.ingest.patch_reading import map_ordered, read_patch
from cmil_core.ingest.slides import Slide, file_sha256, open_slide
from cmil_core.model.encoders import Encoder, EncoderSpec, extract

__all__ = [
    "FEATURES_FORMAT",
    "FEATURES_FORMAT_VERSION",
    "PATCH_COLUMNS",
    "FeatureFile",
    "SlideTask",
    "as_float16",
    "default_processes",
    "feature_path",
    "load_features",
    "precompute",
    "settings_key",
    "slide_features",
    "write_feature_file",
    "write_slide_features",
]

FEATURES_FORMAT = "cmil-features"
FEATURES_FORMAT_VERSION = 1
#: Columns :func:`slide_features` needs in its patch table.
PATCH_COLUMNS: tuple[str, ...] = ("patch_id", "x", "y", "size")

_ARRAYS = ("features", "patch_ids", "coords", "meta")
_TILING_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARTIAL_SUFFIX = ".partial"
_STALE_PARTIAL_S = 3600.0
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True, eq=False)
class FeatureFile:
    """One slide's embeddings by one encoder, as stored (see the module docstring).

    ``features`` float16 ``[n, D]``; ``patch_ids`` int64 ``[n]`` (row order);
    ``coords`` int64 ``[n, 3]`` (``x, y, size``, level-0 pixels); ``meta``
    the JSON metadata; ``path`` the file.
    """

    path: Path
    features: npt.NDArray[np.float16]
    patch_ids: npt.NDArray[np.int64]
    coords: npt.NDArray[np.int64]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.patch_ids.size)

    @property
    def embed_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def encoder_key(self) -> str:
        return str(self.meta["encoder_key"])

    @property
    def encoder_spec(self) -> EncoderSpec:
        """The spec of the encoder that made these features."""
        return EncoderSpec.from_dict(self.meta["encoder"])

    @property
    def tiling_key(self) -> str:
        return str(self.meta["tiling_key"])

    @property
    def slide_sha256(self) -> str:
        return str(self.meta["slide_sha256"])

    def rows_of(self, patch_ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Row index of each of ``patch_ids``; an id not in the file raises InputError."""
        wanted = np.asarray(patch_ids, dtype=np.int64).reshape(-1)
        order = np.argsort(self.patch_ids, kind="stable")
        pos = np.searchsorted(self.patch_ids, wanted, sorter=order)
        pos = np.minimum(pos, max(len(self) - 1, 0))
        rows = order[pos] if len(self) else np.empty(0, dtype=np.int64)
        found = rows.size == wanted.size and np.array_equal(self.patch_ids[rows], wanted)
        if not found:
            missing = wanted[~np.isin(wanted, self.patch_ids)]
            raise InputError(
                f"{self.path.name}: no features for patch id(s) "
                f"{', '.join(str(v) for v in missing[:3])}."
            )
        return rows.astype(np.int64)


# --------------------------------------------------------------------------- paths and checks


def _check_tiling_key(tiling_key: str) -> str:
    if not isinstance(tiling_key, str) or not _TILING_KEY.fullmatch(tiling_key):
        raise InputError(
            f"tiling_key={tiling_key!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it is part of a file name)."
        )
    return tiling_key


def _check_sha256(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise InputError(f"slide_sha256={sha!r} must be 64 lowercase hex digits.")
    return sha


def settings_key(settings: Mapping[str, Any], prefix: str = "t") -> str:
    """A short file-name-safe key of JSON-ready settings: ``prefix`` + 12 hex digits of SHA-256.

    For the ``tiling_key`` of :func:`slide_features`: hash what laid the
    patches (e.g. ``table.attrs["tiling"]["config"]`` of
    :func:`cmil_core.ingest.tiling.tile_slide`, and the metrics version), so that
    changing any of them gives new feature files; not the QC thresholds (a
    file serves any subset of its slide's patches). Key order does not matter.
    """
    try:
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"settings are not JSON-ready ({exc}).") from exc
    return _check_tiling_key(f"{prefix}{hashlib.sha256(blob.encode()).hexdigest()[:12]}")


def feature_path(root: str | os.PathLike[str], encoder_key: str, slide_sha256: str,
                 tiling_key: str) -> Path:
    """``<root>/<encoder_key>/<slide_sha256[:16]>_<tiling_key>.npz``."""
    _check_tiling_key(tiling_key)
    _check_sha256(slide_sha256)
    if not _TILING_KEY.fullmatch(encoder_key):
        raise InputError(f"encoder key {encoder_key!r} is not a valid folder name.")
    return Path(root) / encoder_key / f"{slide_sha256[:16]}_{tiling_key}.npz"


def _patch_arrays(patches: pd.DataFrame) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``patch_ids [n]`` and ``coords [n, 3]`` from the table, checked."""
    if not isinstance(patches, pd.DataFrame):
        raise InputError(f"patches must be a pandas DataFrame, got {type(patches).__name__}.")
    missing = [c for c in PATCH_COLUMNS if c not in patches.columns]
    if missing:
        raise InputError(
            f"the patch table lacks column(s) {', '.join(missing)}; "
            f"it needs {', '.join(PATCH_COLUMNS)}."
        )
    columns: list[npt.NDArray[np.int64]] = []
    for name in PATCH_COLUMNS:
        col = patches[name]
        values = col.to_numpy()
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise InputError(f"the patch table's column {name} is empty at row {row}.")
        if not (pd.api.types.is_integer_dtype(col) or (
            pd.api.types.is_float_dtype(col) and np.all(np.mod(values, 1) == 0)
        )):
            raise InputError(f"the patch table's column {name} must hold whole numbers.")
        columns.append(values.astype(np.int64))
    ids = columns[0]
    if ids.size and np.unique(ids).size != ids.size:
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise InputError(f"the patch table repeats patch_id {dup}.")
    if ids.size and int(columns[3].min()) <= 0:
        raise InputError("the patch table's column size must be positive.")
    coords = np.stack(columns[1:], axis=1) if ids.size else np.empty((0, 3), dtype=np.int64)
    return ids, coords.astype(np.int64)


def _versions() -> dict[str, str]:
    from cmil_core import __version__

    out = {"python": platform.python_version(), "cmil_core": __version__}
    for dist in ("torch", "numpy", "pillow", "openslide-python", "openslide-bin"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- file I/O


def _unreadable(path: Path, why: str) -> InputError:
    return InputError(
        f"{path.name}: not a readable feature file ({why}); delete it to recompute."
    )


def load_features(path: str | os.PathLike[str]) -> FeatureFile:
    """Read a feature file written by :func:`slide_features`.

    Raises :class:`~cmil_core.errors.InputError` naming the file when it is
    missing, truncated, corrupt, of another format or inconsistent.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such feature file.")
    try:
        with p.open("rb") as fh:  # our handle: closed even when numpy fails half-way
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, NpzFile):  # a bare .npy array
                raise _unreadable(p, "not an .npz archive")
            with data:
                absent = [name for name in _ARRAYS if name not in data.files]
                if absent:
                    raise _unreadable(p, f"no array {', '.join(absent)}")
                arrays = {name: data[name] for name in _ARRAYS}
        meta = json.loads(str(arrays["meta"][()]))
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        # ValueError covers json.JSONDecodeError and numpy's refusal of pickled data
        raise _unreadable(p, type(exc).__name__ + (f": {exc}" if str(exc) else "")) from exc
    features, ids, coords = arrays["features"], arrays["patch_ids"], arrays["coords"]
    if not isinstance(meta, dict) or meta.get("format") != FEATURES_FORMAT:
        raise _unreadable(p, f"its metadata do not say format {FEATURES_FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FEATURES_FORMAT_VERSION:
        raise _unreadable(p, f"format version {version!r}; this program reads up to "
                             f"{FEATURES_FORMAT_VERSION}")
    n = ids.shape[0] if ids.ndim == 1 else -1
    if (features.dtype != np.float16 or features.ndim != 2 or features.shape[0] != n
            or ids.dtype != np.int64 or coords.dtype != np.int64 or coords.shape != (n, 3)
            or meta.get("n_patches") != n or meta.get("embed_dim") != features.shape[1]):
        raise _unreadable(p, "arrays and metadata disagree")
    missing_meta = [k for k in ("encoder", "encoder_key", "slide_sha256", "tiling_key")
                    if k not in meta]
    if missing_meta:
        raise _unreadable(p, f"metadata lack {', '.join(missing_meta)}")
    return FeatureFile(path=p, features=features, patch_ids=ids, coords=coords, meta=meta)


def _remove_stale_partials(path: Path) -> None:
    """Delete stale ``.partial`` leftovers of ``path`` (writers killed while writing it)."""
    for leftover in path.parent.glob(f".{path.name}.*{_PARTIAL_SUFFIX}"):
        if _atomic.is_stale(leftover, _STALE_PARTIAL_S):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _write_atomic(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """``np.savez`` to a temporary file in ``path``'s folder, fsync, then ``os.replace``."""
    with _atomic.replacing(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, allow_pickle=True, **arrays)  # savez's default, named for mypy
    _remove_stale_partials(path)


# --------------------------------------------------------------------------- extraction


def _read_batches(
    slide: Slide, coords: npt.NDArray[np.int64], output_px: int, batch_size: int, workers: int,
) -> Iterator[npt.NDArray[np.uint8]]:
    """uint8 batches ``[b, output_px, output_px, 3]`` of the patches at ``coords``, in order.

    ``workers`` threads read whole batches (OpenSlide and PIL release the
    GIL), at most ``2 * workers`` batches in flight.
    """
    n = coords.shape[0]

    def read(start: int) -> npt.NDArray[np.uint8]:
        stop = min(n, start + batch_size)
        out = np.empty((stop - start, output_px, output_px, 3), dtype=np.uint8)
        for j, (x, y, size) in enumerate(coords[start:stop].tolist()):
            out[j] = read_patch(slide, x, y, size, output_px)
        return out

    # workers <= 1 reads in this thread, like map(); more threads read ahead in order.
    return map_ordered(read, range(0, n, batch_size), workers if workers > 1 else 0)


def _same_source(ff: FeatureFile, encoder_key: str, slide_sha256: str, tiling_key: str,
                 embed_dim: int) -> bool:
    return (ff.encoder_key == encoder_key and ff.slide_sha256 == slide_sha256
            and ff.tiling_key == tiling_key and ff.embed_dim == embed_dim)


def _known_rows(ff: FeatureFile, ids: npt.NDArray[np.int64],
                coords: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Per requested patch, its row in ``ff`` (same id and coordinates), or -1."""
    rows = np.full(ids.size, -1, dtype=np.int64)
    if not len(ff) or not ids.size:
        return rows
    order = np.argsort(ff.patch_ids, kind="stable")
    pos = np.minimum(np.searchsorted(ff.patch_ids, ids, sorter=order), len(ff) - 1)
    cand = order[pos]
    ok = (ff.patch_ids[cand] == ids) & np.all(ff.coords[cand] == coords, axis=1)
    rows[ok] = cand[ok]
    return rows


def _subset(ff: FeatureFile, rows: npt.NDArray[np.int64]) -> FeatureFile:
    if rows.size == len(ff) and np.array_equal(rows, np.arange(len(ff))):
        return ff
    return FeatureFile(path=ff.path, features=ff.features[rows], patch_ids=ff.patch_ids[rows],
                       coords=ff.coords[rows], meta=ff.meta)


def slide_features(
    slide_path: str | os.PathLike[str],
    patches: pd.DataFrame,
    encoder: Encoder,
    root: str | os.PathLike[str],
    *,
    tiling_key: str,
    mpp: float | None = None,
    slide_sha256: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureFile:
    """The feature file of one slide's ``patches`` by ``encoder``: reused, or computed and written.

    ``patches``: one row per patch, columns :data:`PATCH_COLUMNS` (``x, y,
    size`` in level-0 pixels); rows of the file follow its order. Typically
    the quality-passed rows of the ``patches`` table of one slide.
    ``root``: folder of all feature files. ``tiling_key``: the caller's name
    of the tiling and quality settings that chose the patches (letters,
    digits, ``.``, ``_``, ``-``); a different key gives a different file.
    ``mpp``: resolution override for :func:`~cmil_core.ingest.slides.open_slide`.
    ``slide_sha256``: the slide's SHA-256 when known (the store has it), which
    spares hashing the file. ``batch_size``: patches per read and per
    forward pass. ``workers``: reader threads (2: on two cores with smallcnn,
    where reading a patch costs about as much as embedding it, two readers
    overlapped with the encoder gave 800 patches/s on CMU-1-Small-Region.svs
    against 570 with one and 690 for reading then embedding in turn;
    ``bench/extract.py --slide``. With ResNets the encoder dominates).
    ``progress(done, total)`` gets patch counts (once ``(n, n)`` when the file
    is reused).

    Raises :class:`~cmil_core.errors.InputError` for a bad table or key, and
    :class:`~cmil_core.ingest.slides.SlideError` for an unreadable slide.
    """
    _check_tiling_key(tiling_key)
    for label, value, low in (("batch_size", batch_size, 1), ("workers", workers, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{label}={value!r} must be an integer >= {low}.")
    ids, coords = _patch_arrays(patches)
    src = Path(slide_path)
    sha = _check_sha256(slide_sha256) if slide_sha256 is not None else None
    if sha is None:
        if not src.is_file():
            raise InputError(f"{src}: no such slide file.")
        sha = file_sha256(src)
    spec = encoder.spec
    path = feature_path(root, spec.key, sha, tiling_key)
    n = int(ids.size)
    existing: FeatureFile | None = None
    if path.exists():
        try:
            existing = load_features(path)
        except InputError:
            existing = None  # corrupt: recompute and replace
        if existing is not None and not _same_source(existing, spec.key, sha, tiling_key,
                                                     spec.embed_dim):
            existing = None
    known = (_known_rows(existing, ids, coords) if existing is not None
             else np.full(n, -1, dtype=np.int64))
    if existing is not None and bool(np.all(known >= 0)):
        if progress is not None:
            progress(n, n)
        return _subset(existing, known)
    todo = np.flatnonzero(known < 0)
    features = np.empty((n, spec.embed_dim), dtype=np.float16)
    if existing is not None:
        have = known >= 0
        features[have] = existing.features[known[have]]
    if progress is not None:
        progress(n - todo.size, n)
    with open_slide(src, mpp=mpp) as slide:
        done = 0
        batches = _read_batches(slide, coords[todo], spec.input_px, batch_size, workers)
        for emb in extract(encoder, batches):
            features[todo[done : done + emb.shape[0]]] = as_float16(emb, src.name, spec.key)
            done += emb.shape[0]
            if progress is not None:
                progress(n - todo.size + done, n)
    wanted = FeatureFile(path=path, features=features, patch_ids=ids, coords=coords, meta={})
    if existing is not None:  # keep the file's other patches: the union, in patch-id order
        extra = np.flatnonzero(~np.isin(existing.patch_ids, ids))
        all_ids = np.concatenate([ids, existing.patch_ids[extra]])
        order = np.argsort(all_ids, kind="stable")
        features = np.concatenate([features, existing.features[extra]])[order]
        ids_out = all_ids[order]
        coords_out = np.concatenate([coords, existing.coords[extra]])[order]
    else:
        ids_out, coords_out = ids, coords
    meta = write_feature_file(path, features, ids_out, coords_out, spec, slide_sha256=sha,
                              slide_name=src.name, mpp=mpp, tiling_key=tiling_key)
    return FeatureFile(path=path, features=wanted.features, patch_ids=ids, coords=coords,
                       meta=meta)


def as_float16(emb: npt.NDArray[np.floating[Any]], slide_name: str,
               encoder_key: str) -> npt.NDArray[np.float16]:
    """Embeddings as stored (float16); InputError naming the slide when they do not fit."""
    peak = float(np.max(np.abs(emb))) if emb.size else 0.0
    if not np.isfinite(peak) or peak > _FLOAT16_MAX:
        raise InputError(
            f"{slide_name}: encoder {encoder_key} gives embeddings of magnitude {peak:g}, "
            "beyond float16; rescale the encoder's output."
        )
    return emb.astype(np.float16)


def write_feature_file(
    path: str | os.PathLike[str],
    features: npt.NDArray[np.float16],
    patch_ids: npt.NDArray[np.int64],
    coords: npt.NDArray[np.int64],
    spec: EncoderSpec,
    *,
    slide_sha256: str,
    slide_name: str,
    mpp: float | None,
    tiling_key: str,
) -> dict[str, Any]:
    """Write one feature file atomically (the module docstring's format); returns its metadata.

    What :func:`slide_features` writes, for executors that embed elsewhere
    (:mod:`cmil_core.model.distributed`): rows in the order given.
    """
    meta: dict[str, Any] = {
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_FORMAT_VERSION,
        "encoder": spec.to_dict(),
        "encoder_key": spec.key,
        "slide_sha256": slide_sha256,
        "slide_name": slide_name,
        "mpp": mpp,
        "tiling_key": tiling_key,
        "n_patches": int(patch_ids.size),
        "embed_dim": spec.embed_dim,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    arrays: dict[str, npt.NDArray[Any]] = {
        "features": features, "patch_ids": patch_ids, "coords": coords,
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    _write_atomic(Path(path), arrays)
    return meta


def write_slide_features(
    root: str | os.PathLike[str],
    patches: pd.DataFrame,
    embeddings: npt.NDArray[np.floating[Any]],
    spec: EncoderSpec,
    *,
    slide_sha256: str,
    slide_name: str,
    mpp: float | None,
    tiling_key: str,
) -> Path:
    """Write one slide's feature file from embeddings computed elsewhere; returns its path.

    ``patches``: rows as for :func:`slide_features` (columns
    :data:`PATCH_COLUMNS`); ``embeddings``: one row per patch, in that order,
    made by the encoder of ``spec`` from the patches as :func:`slide_features`
    reads them (for example from pixels already in memory, as the CNN
    training holds them). :func:`slide_features` then reuses the file.
    """
    _check_tiling_key(tiling_key)
    ids, coords = _patch_arrays(patches)
    emb = np.asarray(embeddings)
    if emb.shape != (ids.size, spec.embed_dim):
        raise InputError(f"{slide_name}: {emb.shape} embeddings for {ids.size} patches of "
                         f"{spec.embed_dim} dimensions.")
    sha = _check_sha256(slide_sha256)
    path = feature_path(root, spec.key, sha, tiling_key)
    write_feature_file(path, as_float16(emb, slide_name, spec.key), ids, coords, spec,
                       slide_sha256=sha, slide_name=slide_name, mpp=mpp, tiling_key=tiling_key)
    return path


# --------------------------------------------------------------------------- many slides at once


@dataclass(frozen=True)
class SlideTask:
    """One slide's share of a cohort's extraction (the arguments of :func:`slide_features`)."""

    path: str
    patches: pd.DataFrame
    tiling_key: str
    mpp: float | None
    sha256: str | None


_WORKER: dict[str, Any] = {}


def _worker_start(spec: dict[str, Any], devices: Any, threads: int) -> None:
    """Each worker process: its own encoder, on the next free device, with its share of cores."""
    from cmil_core.model.encoders import encoder_from_spec, set_threads

    set_threads(threads)
    device = devices.get() if devices is not None else "cpu"
    _WORKER["encoder"] = encoder_from_spec(spec).to(device)


def _worker_run(task: SlideTask, root: str) -> str:
    slide_features(task.path, task.patches, _WORKER["encoder"], root,
                   tiling_key=task.tiling_key, mpp=task.mpp, slide_sha256=task.sha256,
                   workers=1)
    return task.path


def default_processes() -> int:
    """Extraction processes: one per GPU where there are GPUs, else
    ``$CMIL_EXTRACT_PROCESSES`` or 1."""
    import torch

    env = os.environ.get("CMIL_EXTRACT_PROCESSES", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise InputError(f"CMIL_EXTRACT_PROCESSES={env!r} is not a whole number") from None
    return torch.cuda.device_count() or 1


def precompute(
    tasks: list[SlideTask],
    encoder: Encoder,
    root: str | os.PathLike[str],
    *,
    processes: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> None:
    """Write the missing feature files of many slides with ``processes`` worker processes.

    The queue is the set of feature files itself: a slide whose file exists
    is skipped, each file is written atomically, so a killed run resumes
    where it stopped. Workers take a GPU each where there are GPUs (one
    process per GPU), else share the CPU cores evenly. On a CPU-only machine
    with ``processes`` of 1, or one slide to do, nothing is spawned: the
    caller's loop computes the files itself. ``encoder`` must be rebuildable from its spec (weights
    from a local file, or a seeded initialisation).
    """
    import multiprocessing

    import torch

    from cmil_core.model.encoders import available_cores

    todo = [t for t in tasks if not feature_path(
        root, encoder.spec.key, t.sha256 or file_sha256(t.path), t.tiling_key).exists()]
    gpus = torch.cuda.device_count()
    if not todo or (not gpus and (processes <= 1 or len(todo) <= 1)):
        return
    processes = min(processes, len(todo))
    context = multiprocessing.get_context("spawn")
    devices = None
    if gpus:
        devices = context.Manager().Queue()
        for k in range(processes):
            devices.put(f"cuda:{k % gpus}")
    threads = max(1, available_cores() // processes)
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_worker_start,
                             initargs=(encoder.spec.to_dict(), devices, threads)) as pool:
        futures = [pool.submit(_worker_run, t, str(root)) for t in todo]
        for done, future in enumerate(as_completed(futures), start=1):
            path = future.result()
            if progress is not None:
                progress(done, len(todo), Path(path).name)
