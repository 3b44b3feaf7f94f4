"""cmil_core._atomic: temporary names, what is stale, writes that leave the old file or the new."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmil_core import _atomic

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: never a live process


def test_temporary_names_are_hidden_recognised_and_name_their_writer(tmp_path: Path) -> None:
    tmp = _atomic.temp_path(tmp_path / "slide.npz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".slide.npz.")
    assert tmp.name.endswith(".partial") and _atomic.writer_pid(tmp.name) == os.getpid()
    assert _atomic.temp_path(tmp_path / "slide.npz") != tmp
    for name, temp in [
        (tmp.name, True),
        (".a.npz.k2j3_x9.partial", True),  # features of earlier versions (mkstemp)
        (".report.partial-1a2b3c4d", True), (".report.old-1a2b3c4d", True),  # report folders
        ("P1_slide.tiff.part", True),  # uploads, zip extraction
        ("slide.npz", False), ("cmil.duckdb", False), ("cmil.duckdb.wal", False),
        ("partial.npz", False), (".hidden", False),
    ]:
        assert _atomic.is_temp_name(name) is temp, name
    assert _atomic.writer_pid(".a.npz.k2j3_x9.partial") is None


def test_stale_means_writer_gone_or_an_hour_old(tmp_path: Path) -> None:
    mine = _atomic.temp_path(tmp_path / "a")
    dead = tmp_path / f".b.{DEAD_PID}-0123abcd.partial"
    anonymous = tmp_path / ".c.partial-0123abcd"
    old = tmp_path / "d.part"
    for p in (mine, dead, anonymous, old):
        p.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    assert not _atomic.is_stale(mine) and not _atomic.is_stale(anonymous)
    assert _atomic.is_stale(dead) and _atomic.is_stale(old)
    (tmp_path / "keep.npz").write_bytes(b"x")
    removed = _atomic.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, anonymous.name, "keep.npz"])


def test_a_killed_process_is_gone_even_as_a_zombie() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}").exists() and time.monotonic() < deadline:
        if "Z" in Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[:1]:
            break  # exited, not yet reaped: a zombie
        time.sleep(0.05)
    assert not _atomic.pid_alive(child.pid)
    child.wait()
    assert not _atomic.pid_alive(child.pid)
    assert _atomic.pid_alive(os.getpid())


def test_replacing_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "table.csv"
    _atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError), _atomic.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n" and os.listdir(target.parent) == ["table.csv"]
    _atomic.write_bytes(target, b"new\n")
    assert target.read_bytes() == b"new\n" and os.listdir(target.parent) == ["table.csv"]


def test_new_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m1"
    with pytest.raises(RuntimeError), _atomic.new_folder(target) as tmp:
        (tmp / "model.pt").write_bytes(b"w")
        raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path / "models") == []
    with _atomic.new_folder(target) as tmp:
        (tmp / "model.pt").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["config.json", "model.pt"]
    assert os.listdir(tmp_path / "models") == ["m1"]
