"""cmil_core.viewer.deepzoom: which files the viewer may read, the tile route, and the cache's limit."""

from __future__ import annotations

import http.client
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmil_core import store
from cmil_core.viewer.deepzoom import (
    TileCache,
    TileServer,
    ViewerError,
    checked_slide_path,
)

CMU1 = "CMU-1-Small-Region.svs"


@pytest.fixture
def served(tmp_path: Path, fixtures_dir: Path) -> Iterator[tuple[TileServer, str]]:
    """A tile server over CMU-1-Small-Region.svs, its cache in tmp_path."""
    server = TileServer(TileCache(tmp_path / "cache", 50 << 20)).start()
    tiles = server.register((fixtures_dir / "slides" / CMU1).resolve(), None)
    yield server, tiles.key
    server.stop()


def _get(server: TileServer, path: str) -> tuple[int, bytes]:
    """A raw GET (the path sent exactly as given: no client-side normalising of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_tile_is_the_slides_pixels_at_that_level(served: tuple[TileServer, str]) -> None:
    server, key = served
    levels = server.cache.level_tiles(key)
    top = len(levels) - 1  # full resolution: 2220 x 2967 px, 254 px tiles
    assert levels[top] == (9, 12)
    status, body = _get(server, f"{server.base_path()}/{key}_files/{top}/0_0.jpeg")
    assert status == 200
    tile = Image.open(io.BytesIO(body))
    assert tile.format == "JPEG" and tile.size == (255, 255)  # 254 + 1 px overlap on one side
    # The last column is the remainder of the width: 2220 - 8 * 254 = 188 px, + 1 overlap.
    status, body = _get(server, f"{server.base_path()}/{key}_files/{top}/8_0.jpeg")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (189, 255)


def test_a_sideways_photograph_is_served_upright_as_ingest_reads_it(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    upright = Image.open(fixtures_dir / "smears" / "bccd" / "BloodImage_00000.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held sideways: pixels stored turned, shown upright
    photo = tmp_path / "P1" / "fov1.png"
    photo.parent.mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, exif=exif)
    server = TileServer(TileCache(tmp_path / "cache", 50 << 20)).start()
    try:
        key = server.register(photo.resolve(), None).key
        levels = server.cache.level_tiles(key)
        top = len(levels) - 1
        assert levels[top] == (3, 2)  # 640 x 480 upright, in 254 px tiles
        status, body = _get(server, f"{server.base_path()}/{key}_files/{top}/0_0.jpeg")
        assert status == 200
        tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=float)
        expected = np.asarray(upright.crop((0, 0, 255, 255)), dtype=float)
        assert np.abs(tile - expected).mean() < 4  # JPEG's error, not a turned image
    finally:
        server.stop()


@pytest.mark.parametrize("path", [
    "/etc/passwd",
    "/../../etc/passwd",
    "/{token}/../../../etc/passwd",
    "/{token}/{key}_files/../../../../etc/passwd",
    "/{token}/{key}_files/0/..%2f..%2fetc%2fpasswd",
    "/{token}/{key}_files/12/0_0.jpeg/../../x",
    "/{token}/{key}_files/12/0_0.png",
    "/{token}/{key}_files/99/0_0.jpeg",       # no such level
    "/{token}/{key}_files/12/99_0.jpeg",      # no such column
    "/{token}/000000000000000000000000_files/0/0_0.jpeg",  # no such slide
    "/00000000000000000000000000000000/{key}_files/0/0_0.jpeg",  # wrong token
])
def test_anything_but_a_tile_is_refused_without_touching_the_disk(
    served: tuple[TileServer, str], path: str
) -> None:
    server, key = served
    status, body = _get(server, path.format(token=server.token, key=key))
    assert status == 404
    assert b"root:" not in body
    assert not list((server.cache.folder).rglob("*passwd*"))


def test_the_cache_stays_under_its_limit_dropping_the_least_recently_used(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    limit = 60_000  # bytes: a few tiles of CMU-1 (about 10-20 kB each)
    cache = TileCache(tmp_path / "cache", limit)
    key = cache.add_slide((fixtures_dir / "slides" / CMU1).resolve(), None).key
    top = len(cache.level_tiles(key)) - 1
    first = cache.tile(key, top, 0, 0)
    for col in range(1, 9):
        cache.tile(key, top, col, 1)
        cache.tile(key, top, 0, 0)  # used again and again: stays
        assert cache.size_bytes() <= limit
    assert cache.tile_file(key, top, 0, 0).read_bytes() == first
    assert not cache.tile_file(key, top, 1, 1).exists()  # the oldest went first
    cache.close()


def test_a_slide_outside_the_store_folder_and_slide_root_is_refused(
    tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CMIL_SLIDE_ROOT", raising=False)
    db = tmp_path / "store" / "cmil.duckdb"
    db.parent.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(fixtures_dir / "slides" / CMU1, outside / CMU1)
    inside = db.parent / "slides"
    inside.mkdir()
    shutil.copy(fixtures_dir / "slides" / CMU1, inside / CMU1)
    (inside / "link.svs").symlink_to(outside / CMU1)  # a link out of the store's folder
    with store.open_store(db) as st:
        for path in (inside / CMU1, outside / CMU1, inside / "link.svs",
                     inside / ".." / ".." / "elsewhere" / CMU1):
            store.register_slide(st, cohort="c1", patient_id="P1", path=str(path), sha256=None,
                                 kind="svs", width=2220, height=2967, mpp=0.499, size_bytes=1)
        ids = {p.path: p.slide_id for p in store.list_slides(st, "c1")}
        path, _ = checked_slide_path(st, ids[str(inside / CMU1)])
        assert path == (inside / CMU1).resolve()
        for bad in (outside / CMU1, inside / "link.svs", inside / ".." / ".." / "elsewhere" / CMU1):
            with pytest.raises(ViewerError, match="outside the slide folders"):
                checked_slide_path(st, ids[str(bad)])
        with pytest.raises(ViewerError, match="no slide 999"):
            checked_slide_path(st, 999)
    # The slide root ($CMIL_SLIDE_ROOT) opens the outside folder.
    monkeypatch.setenv("CMIL_SLIDE_ROOT", str(outside))
    with store.open_store(db, read_only=True) as st:
        path, _ = checked_slide_path(st, ids[str(outside / CMU1)])
        assert path == (outside / CMU1).resolve()
