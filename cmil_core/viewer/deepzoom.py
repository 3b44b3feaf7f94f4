"""Deep Zoom tiles of a slide for the dashboard's viewer: checked paths, a disk cache, a tile route.

The viewer (OpenSeadragon in the browser) asks for Deep Zoom tiles
(``<key>_files/<level>/<col>_<row>.jpeg``). They are made on demand by
OpenSlide's :class:`openslide.deepzoom.DeepZoomGenerator` (whole-slide
files through :class:`openslide.OpenSlide`, photographs through
:class:`openslide.ImageSlide`), written to a disk cache under the store's
folder (``<store folder>/tile_cache``) and served from there the next time.

Safety, in three layers:

* :func:`checked_slide_path` opens only the file the store registered for a
  slide, resolved (``..`` and symbolic links followed), and only when it
  lies under one of :func:`allowed_roots`: the store's folder (demo slides,
  uploads), ``$CMIL_SLIDE_ROOT``, and the folders the slide's cohort was
  ingested from (``ingest_runs.source``): the same rule as ingest, where a
  link out of the slide folder is refused.
* :class:`TileServer` serves only slides registered with it
  (:meth:`TileServer.register`, by the page, after the check above) under
  an opaque key; a request is matched against one strict pattern of
  numbers (:data:`TILE_PATH`) and a per-process secret token, so nothing a
  browser sends becomes part of a file name: ``../`` and the like are
  answered 404 without touching the disk.
* :class:`TileCache` names its files from numbers and the slide's hash
  only, keeps itself under a size limit (``$CMIL_TILE_CACHE_MB``, default
  :data:`DEFAULT_CACHE_MB`) by deleting the least recently used tiles
  (modification time, refreshed on every hit).

Why a small HTTP route of its own: Streamlit serves static files that exist
(``server.enableStaticServing``) but cannot make a tile on demand, and
sending tiles through a component's messages would rerun the page for each.
:class:`TileServer` is a threaded :mod:`http.server` on a local port, one
per Streamlit process (``$CMIL_TILE_PORT`` fixes the port; behind a reverse
proxy set ``$CMIL_TILE_URL`` to the public address that forwards to it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cmil_core import store as store_mod
from cmil_core.errors import InputError

__all__ = [
    "DEFAULT_CACHE_MB",
    "OVERLAP",
    "TILE_FORMAT",
    "TILE_PATH",
    "TILE_SIZE",
    "SlideTiles",
    "TileCache",
    "TileServer",
    "ViewerError",
    "allowed_roots",
    "cache_folder",
    "cache_limit_bytes",
    "checked_slide_path",
]

TILE_SIZE = 254  # + 2 x 1 px overlap = 256 px images, the usual Deep Zoom choice
OVERLAP = 1
TILE_FORMAT = "jpeg"
JPEG_QUALITY = 85
DEFAULT_CACHE_MB = 1024
CACHE_ENV = "CMIL_TILE_CACHE_MB"
#: ``/<token>/<key>_files/<level>/<col>_<row>.jpeg``: the only request a tile server answers.
TILE_PATH = re.compile(
    r"^/(?P<token>[0-9a-f]{32})/(?P<key>[0-9a-f]{24})_files/"
    r"(?P<level>\d{1,2})/(?P<col>\d{1,7})_(?P<row>\d{1,7})\.jpeg$"
)
_OPEN_SLIDES = 16  # slides kept open per process


class ViewerError(InputError):
    """A slide cannot be shown in the viewer; the message says why."""


# --------------------------------------------------------------------------- paths


def cache_folder(db: str | os.PathLike[str]) -> Path:
    """Where tiles of the store ``db`` are cached: ``<store folder>/tile_cache``."""
    return store_mod.StoreFolder.of(db).tile_cache


def cache_limit_bytes() -> int:
    """The tile cache's size limit: ``$CMIL_TILE_CACHE_MB`` megabytes, else
    :data:`DEFAULT_CACHE_MB`."""
    text = os.environ.get(CACHE_ENV, "").strip()
    if not text:
        return DEFAULT_CACHE_MB * 1024 * 1024
    try:
        mb = float(text)
    except ValueError:
        raise InputError(f"{CACHE_ENV}={text!r} is not a number of megabytes") from None
    if not mb > 0:
        raise InputError(f"{CACHE_ENV}={text!r} must be a positive number of megabytes")
    return int(mb * 1024 * 1024)


def allowed_roots(store: store_mod.Store, cohort: str) -> list[Path]:
    """The folders a slide of ``cohort`` may be read from (resolved, existing).

    The store's folder, ``$CMIL_SLIDE_ROOT`` when set, and each folder the
    cohort's slides were ingested from.
    """
    from cmil_core.ingest.discovery import configured_slide_root

    roots = [store_mod.StoreFolder.of(store).root]
    try:
        root = configured_slide_root()
    except InputError:
        root = None
    if root is not None:
        roots.append(root)
    runs = store_mod.ingest_runs_frame(store, cohort)
    for source in runs["source"].dropna().unique() if len(runs) else []:
        folder = Path(str(source)).expanduser()
        if folder.is_dir():
            roots.append(folder.resolve())
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique


def checked_slide_path(store: store_mod.Store, slide_id: int) -> tuple[Path, store_mod.SlideRow]:
    """The registered file of slide ``slide_id``, resolved, if it lies under :func:`allowed_roots`.

    Raises :class:`ViewerError` for an unknown slide, a missing file, or a
    file (or a link's target) outside every allowed folder.
    """
    slide = store_mod.get_slide(store, int(slide_id))
    if slide is None:
        raise ViewerError(f"no slide {slide_id} in the store")
    raw = Path(slide.path).expanduser()
    name = raw.name
    if "\0" in slide.path:
        raise ViewerError(f"slide {slide_id}: its path is not a valid path")
    target = raw.resolve()
    roots = allowed_roots(store, slide.cohort)
    if not any(target.is_relative_to(r) for r in roots):
        raise ViewerError(
            f"slide {slide_id} ({name}): {target} lies outside the slide folders the viewer may "
            f"read ({', '.join(str(r) for r in roots)}); set CMIL_SLIDE_ROOT to a folder holding it"
        )
    if not target.is_file():
        raise ViewerError(f"slide {slide_id} ({name}): no such file at {target}")
    return target, slide


# --------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class SlideTiles:
    """What the viewer needs to open a slide: its key and Deep Zoom geometry (level-0 pixels)."""

    key: str
    width: int
    height: int
    levels: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    def tile_source(self, base_url: str) -> dict[str, Any]:
        """OpenSeadragon's inline Deep Zoom descriptor, tiles under ``base_url``."""
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Url": f"{base_url.rstrip('/')}/{self.key}_files/",
                "Format": TILE_FORMAT,
                "Overlap": str(self.overlap),
                "TileSize": str(self.tile_size),
                "Size": {"Width": str(self.width), "Height": str(self.height)},
            }
        }


def slide_key(path: Path, sha256: str | None) -> str:
    """A slide's cache key: from its content hash, else from its path, size and mtime."""
    if sha256:
        text = f"sha256:{sha256}"
    else:
        stat = path.stat()
        text = f"path:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class _OpenSlide:
    """One open slide and its Deep Zoom generator (a lock where the reader is not thread-safe)."""

    def __init__(self, path: Path) -> None:
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        from cmil_core.ingest.slides import open_slide

        # The same checks as ingest (empty, damaged, decompression bombs) first; a
        # photograph is shown as ingest read it (RGB, upright), so patches sit on their cells.
        with open_slide(path) as checked:
            photograph = checked.photograph()
        self.osr: Any = (openslide.OpenSlide(str(path)) if photograph is None
                         else openslide.ImageSlide(photograph))
        whole_slide = photograph is None
        self.lock = None if whole_slide else threading.Lock()  # PIL images are not thread-safe
        self.dz = DeepZoomGenerator(self.osr, tile_size=TILE_SIZE, overlap=OVERLAP,
                                    limit_bounds=False)

    def tile(self, level: int, col: int, row: int) -> bytes:
        if not 0 <= level < self.dz.level_count:
            raise ViewerError(f"no Deep Zoom level {level}")
        cols, rows = self.dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ViewerError(f"no tile ({col}, {row}) at level {level}")
        if self.lock is None:
            image = self.dz.get_tile(level, (col, row))
        else:
            with self.lock:
                image = self.dz.get_tile(level, (col, row))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()

    def close(self) -> None:
        self.osr.close()


class TileCache:
    """Deep Zoom tiles on disk under ``folder``, at most ``limit_bytes`` in all (LRU).

    Files: ``<folder>/<key>/<level>/<col>_<row>.jpeg``; names come from
    numbers and the slide key only. A hit refreshes the file's modification
    time; when a write takes the total over the limit, the least recently
    used files are deleted down to 80 % of it.
    """

    def __init__(self, folder: str | os.PathLike[str], limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError("limit_bytes must be positive")
        self.folder = Path(folder)
        self.limit_bytes = int(limit_bytes)
        self._lock = threading.Lock()
        self._size: int | None = None
        self._slides: dict[str, Path] = {}
        self._open: OrderedDict[str, _OpenSlide] = OrderedDict()

    # -- slides

    def add_slide(self, path: Path, sha256: str | None) -> SlideTiles:
        """Make ``path`` (already checked: :func:`checked_slide_path`) servable; its geometry."""
        key = slide_key(path, sha256)
        with self._lock:
            self._slides[key] = path
        opened = self._opened(key)
        width, height = opened.dz.level_dimensions[-1]
        return SlideTiles(key, int(width), int(height), int(opened.dz.level_count))

    def _opened(self, key: str) -> _OpenSlide:
        with self._lock:
            found = self._open.get(key)
            if found is not None:
                self._open.move_to_end(key)
                return found
            path = self._slides.get(key)
        if path is None:
            raise ViewerError("unknown slide key")
        opened = _OpenSlide(path)
        with self._lock:
            if key in self._open:  # another thread was quicker
                opened.close()
                return self._open[key]
            self._open[key] = opened
            while len(self._open) > _OPEN_SLIDES:
                _, old = self._open.popitem(last=False)
                old.close()
        return opened

    def level_tiles(self, key: str) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles at each Deep Zoom level of a registered slide."""
        return tuple((int(c), int(r)) for c, r in self._opened(key).dz.level_tiles)

    # -- tiles

    def tile_file(self, key: str, level: int, col: int, row: int) -> Path:
        return self.folder / key / str(int(level)) / f"{int(col)}_{int(row)}.{TILE_FORMAT}"

    def tile(self, key: str, level: int, col: int, row: int) -> bytes:
        """The JPEG bytes of one tile: from the cache, else made and cached."""
        if key not in self._slides:
            raise ViewerError("unknown slide key")
        file = self.tile_file(key, level, col, row)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            pass
        else:
            with contextlib.suppress(OSError):
                os.utime(file)
            return data
        data = self._opened(key).tile(level, col, row)
        self._store(file, data)
        return data

    def _store(self, file: Path, data: bytes) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, file)
        with self._lock:
            if self._size is None:
                self._size = self.size_bytes()
            else:
                self._size += len(data)
            over = self._size > self.limit_bytes
        if over:
            self.evict()

    def size_bytes(self) -> int:
        """The bytes of every tile now in the cache."""
        return sum(size for _, _, size in self._files())

    def _files(self) -> list[tuple[float, Path, int]]:
        found: list[tuple[float, Path, int]] = []
        if not self.folder.is_dir():
            return found
        for dirpath, _, names in os.walk(self.folder):
            for name in names:
                if not name.endswith(f".{TILE_FORMAT}"):
                    continue
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, path, stat.st_size))
        return found

    def evict(self, target: float = 0.8) -> int:
        """Delete least recently used tiles until at most ``target`` of the limit is used.

        Returns the bytes freed.
        """
        with self._lock:
            files = sorted(self._files(), key=lambda f: f[0])
            total = sum(size for _, _, size in files)
            goal = self.limit_bytes * target
            freed = 0
            for _, path, size in files:
                if total - freed <= goal:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                freed += size
            self._size = total - freed
        return freed

    def close(self) -> None:
        with self._lock:
            for opened in self._open.values():
                opened.close()
            self._open.clear()


# --------------------------------------------------------------------------- the route


class TileServer:
    """A threaded HTTP server answering :data:`TILE_PATH` requests from a :class:`TileCache`.

    ``TileServer(cache, host, port).start()``; ``port=0`` picks a free port
    (:attr:`port`). URLs carry :attr:`token`, a random secret of this
    process: pages hand it only to sessions that may see the slides.
    """

    def __init__(self, cache: TileCache, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cache = cache
        self.token = secrets.token_hex(16)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, kind = server.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Access-Control-Allow-Origin", "*")
                if status == 200:
                    self.send_header("Cache-Control", "private, max-age=86400")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: one line per tile would flood the server's log

        self._httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def base_path(self) -> str:
        """The path tiles hang under: ``/<token>``."""
        return f"/{self.token}"

    def register(self, path: Path, sha256: str | None) -> SlideTiles:
        """Serve ``path`` (checked by :func:`checked_slide_path`); its key and geometry."""
        return self.cache.add_slide(path, sha256)

    def answer(self, request_path: str) -> tuple[int, bytes, str]:
        """``(status, body, content type)`` for a request path; only :data:`TILE_PATH` is served."""
        match = TILE_PATH.match(request_path.split("?", 1)[0])
        if match is None or not secrets.compare_digest(match["token"], self.token):
            return 404, b"not found", "text/plain"
        try:
            data = self.cache.tile(match["key"], int(match["level"]), int(match["col"]),
                                   int(match["row"]))
        except ViewerError:
            return 404, b"not found", "text/plain"
        except InputError as exc:
            return 500, str(exc).encode(), "text/plain"
        return 200, data, "image/jpeg"

    def start(self) -> TileServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="cmil-tiles",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self.cache.close()
