"""Hostile and broken input, everywhere a user can hand us something.

This file spans modules on purpose (``tables``, ``cohort_import``,
``discovery``, ``slides``, ``pipeline``, ``cli``, ``patients`` and the
dashboard): it is the one table of what a user may throw at the product, so
that a new entry point is checked against all of it in one place. Each
module's own behaviour stays tested in its own file.

Every case is a named row of :data:`CASES`: a builder that prepares the input
in a fresh copy of a small study (cohort ``A``: patients P1-P3, one smear
photograph of P1 ingested, a scored model ``m1``) and returns the call to
make, the entry point that call goes through, and the fragment the message
must hold. The test then checks, for every case:

1. the user gets a clear message naming what is wrong (the fragment);
2. nothing else changed: every table of the store holds the same rows, and
   the case's folder holds the same files, as before the call, except the
   tables a case may change by contract (``ingest`` marks a bad slide
   ``failed``, with the reason as its message, and records its run);
3. no traceback reaches the user: the command line prints exactly one
   ``error:`` line and exits 2; a page shows no exception element.

Policies decided here (and documented in the modules):

* identifiers (patient ids, cohort names) that start with ``= + - @`` (CSV
  formula injection), hold control or invisible characters, or ``<``/``>``
  are refused at import, so exports write ids unchanged
  (:func:`cmil_core.clinical.cohort_import.identifier_problem`);
* UTF-16 is read with or without a byte-order mark (UTF-32 only with one);
* a symbolic link out of a slide folder, or a manifest path outside it,
  refuses the whole ingest; a nested archive refuses the zip;
* one slide file (by sha256) belongs to one patient: the same content
  handed over again for another patient fails that slide, naming both.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cmil_core import store
from cmil_core.cli import main
from cmil_core.clinical import tables
from cmil_core.clinical.cohort_import import import_cohort, preview_table
from cmil_core.errors import InputError
from cmil_core.ingest import discovery
from cmil_core.ingest.pipeline import ingest
from cmil_core.ingest.tiling_config import TilingConfig

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PATIENTS_PAGE = "pages/patients.py"
SMEAR = "smears/bccd/BloodImage_00000.jpg"
TABLE = b"patient_id,bm_metastasis,os_months,os_event\n"


# --------------------------------------------------------------------------- the study


@dataclass
class Work:
    """One case's world: a copy of the base study under ``root``."""

    root: Path
    db: Path
    fixtures: Path
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    @property
    def smear(self) -> bytes:
        return (self.fixtures / SMEAR).read_bytes()


@pytest.fixture(scope="module")
def base_study(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """Cohort A (P1-P3), P1's smear photograph ingested, and a scored model ``m1``."""
    root = tmp_path_factory.mktemp("hostile_base")
    db = root / "store" / "cmil.duckdb"
    csv = root / "A.csv"
    csv.write_bytes(TABLE + b"P1,1,10,1\nP2,0,20,0\nP3,1,5,1\n")
    import_cohort(db, "A", csv, role="train")
    (root / "slides").mkdir()
    shutil.copyfile(fixtures_dir / SMEAR, root / "slides" / "P1_a.jpg")
    summary = ingest(db, "A", root / "slides", mpp=0.3)
    assert [s.status for s in summary.slides] == ["tiled"]
    with store.open_store(db) as st:
        store.add_model(st, store.ModelRow(
            "m1", datetime(2025, 1, 1), "attention", "smallcnn", "A", {"cutoff": 0.5}, {},
            str(root / "models" / "m1"), 0.5))
        store.write_scores(
            st, "m1", "A",
            pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "score": [0.9, 0.2, 0.4],
                          "risk_group": ["high", "low", "low"]}),
            pd.DataFrame(columns=["patch_id", "probability", "attention", "attention_raw"]))
    return root


def _snapshot_store(db: Path) -> dict[str, list[str]]:
    """Every row of every table of the store (small here), in a stable order."""
    with store.open_store(db, read_only=True) as st:
        cur = st.cursor()
        names = [r[0] for r in cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()]
        return {n: sorted(map(repr, cur.execute(f"SELECT * FROM {n}").fetchall()))
                for n in names}


def _snapshot_files(root: Path) -> set[tuple[str, int]]:
    """Every file and folder under ``root`` (the study's store file aside) with its size."""
    out: set[tuple[str, int]] = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("store/cmil.duckdb"):
            continue  # compared table by table
        out.add((rel, 0 if path.is_dir() else path.lstat().st_size))
    return out


# --------------------------------------------------------------------------- entry points


def _raises(call: Callable[[], Any]) -> str:
    """The message of the InputError ``call`` raises (anything else fails the test)."""
    with pytest.raises(InputError) as info:
        call()
    return str(info.value)


def _cli(argv: list[str]) -> str:
    """Run the command line in-process; exit 2 with one ``error:`` line; returns that line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusals
            code = int(exc.code or 0)
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert code == 2, (code, text)
    assert text.startswith("error: ") and text.count("\n") == 1, text
    return text


def _failed_slide(work: Work, slides: Path, **kwargs: Any) -> str:
    """Ingest ``slides`` into cohort A: the one new slide fails; returns its reason."""
    summary = ingest(work.db, "A", slides, **kwargs)
    failed = [s for s in summary.slides if s.status == "failed"]
    assert len(failed) == 1 and failed[0].patches == 0, summary.slides
    assert failed[0].reason is not None
    return failed[0].reason


def _page(work: Work, **params: str) -> str:
    """Open the dashboard with URL query parameters, then the Patients page; returns the
    warnings and texts it shows (no exception element allowed)."""
    from streamlit import config as streamlit_config
    from streamlit.testing.v1 import AppTest

    work.monkeypatch.setenv("CMIL_DB", str(work.db))
    streamlit_config.set_option("client.showErrorDetails", "full")
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    shown: list[str] = []
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    shown += [w.value for w in at.warning]
    at.switch_page(PATIENTS_PAGE)
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    shown += [w.value for w in at.warning] + [t.value for t in at.text]
    # Pages escape user strings for markdown (pages._common.md): read them as shown.
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", "\n".join(shown))


# --------------------------------------------------------------------------- inputs


def _import(
    work: Work, data: bytes, name: str = "clinical.csv", cohort: str = "B"
) -> Callable[[], str]:
    path = work.file(name, data)
    return lambda: _raises(lambda: import_cohort(work.db, cohort, path, role="validation"))


def _cli_import(work: Work, data: bytes) -> Callable[[], str]:
    path = work.file("clinical.csv", data)
    return lambda: _cli(["import-cohort", "--db", str(work.db), "--cohort", "B",
                         "--csv", str(path)])


def _zip(
    work: Work, members: list[tuple[str | zipfile.ZipInfo, bytes]], name: str = "s.zip"
) -> Path:
    path = work.root / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted here
        for member, data in members:
            archive.writestr(member, data)
    return path


def _ingest_raises(work: Work, slides: Path, **kwargs: Any) -> Callable[[], str]:
    return lambda: _raises(lambda: ingest(work.db, "A", slides, **kwargs))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (and holds almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _link_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _folder(work: Work, files: dict[str, bytes]) -> Path:
    folder = work.root / "in" / "slides"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _manifest(work: Work, text: str) -> Path:
    return work.file("manifest.csv", text.encode())


def _corrupt_member_zip(work: Work) -> Path:
    path = _zip(work, [("P2_a.jpg", os.urandom(5000))])  # incompressible: stored as is
    data = bytearray(path.read_bytes())
    data[60:120] = bytes(60)  # inside the only member's data: its CRC no longer matches
    path.write_bytes(bytes(data))
    return path


def _symlink_out(work: Work) -> Path:
    folder = _folder(work, {"P2_a.jpg": work.smear[:100]})
    outside = work.file("secret/P3_x.jpg", b"not yours")
    (folder / "P3_x.jpg").symlink_to(outside)
    return folder


def _fixture_manifest(work: Work, name: str, patient: str = "P2") -> Callable[[], str]:
    manifest = _manifest(work, f"slide_path,patient_id\n{name},{patient}\n")
    config = TilingConfig(patch_um=4, output_px=8) if name == "unreadable.svs" else None
    return lambda: _failed_slide(work, work.fixtures / "slides", manifest=manifest, config=config)


def _slide_fails(work: Work, files: dict[str, bytes], **kwargs: Any) -> Callable[[], str]:
    folder = _folder(work, files)
    return lambda: _failed_slide(work, folder, **kwargs)


def _ingest_cli(work: Work, *extra: str, slides: Path | None = None) -> Callable[[], str]:
    folder = slides or _folder(work, {})
    return lambda: _cli(["ingest", "--db", str(work.db), "--cohort", "A",
                         "--slides", str(folder), *extra])


def _subprocess_binary_table(work: Work) -> Callable[[], str]:
    path = work.file("clinical.csv", bytes(range(256)) * 4)

    def run() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cmil_core", "import-cohort", "--db", str(work.db),
             "--cohort", "B", "--csv", str(path)],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    return run


def _monkeypatched(work: Work, target: object, name: str, value: object,
                   build: Callable[[Work], Callable[[], str]]) -> Callable[[], str]:
    work.monkeypatch.setattr(target, name, value)
    return build(work)


# --------------------------------------------------------------------------- the table

SLIDE_RUN = frozenset({"slides", "ingest_runs"})  # what an ingest with one failed slide writes


@dataclass(frozen=True)
class Case:
    """A row of the table: ``build`` prepares the input in the case's world and returns
    the call, which goes through ``entry`` (import, upload, cli, ingest, slides, page)
    and returns the message the user sees; it must hold ``expect``. ``may_change``:
    the store tables the call may write (none, unless a failed slide is the message)."""

    id: str
    entry: str
    build: Callable[[Work], Callable[[], str]]
    expect: str
    may_change: frozenset[str] = frozenset()


CASES = [
    # --- clinical tables -----------------------------------------------------------
    Case("table_empty_file", "import", lambda w: _import(w, b""), "the file is empty"),
    Case("table_only_blank_lines", "import", lambda w: _import(w, b"\n  \n\t\n"),
         "the file is empty"),
    Case("table_binary_file", "import", lambda w: _import(w, bytes(range(256)) * 8),
         "contains binary data"),
    Case("table_gzip_named_csv", "import",
         lambda w: _import(w, gzip.compress(TABLE + b"P1,1,3,1\n")), "a gzip-compressed file"),
    Case("table_broken_xlsx_named_csv", "import",
         lambda w: _import(w, _zip(w, [("xl/workbook.xml", b"<x/>")], "book.xlsx").read_bytes()),
         "an Excel workbook that cannot be read"),
    Case("table_zip_named_csv", "import",
         lambda w: _import(w, _zip(w, [("a.txt", b"x")], "a.zip").read_bytes()),
         "a zip archive (and not an Excel .xlsx workbook)"),
    Case("table_utf32_without_bom", "import",
         lambda w: _import(w, (TABLE + b"P1,1,3,1\n").decode().encode("utf-32-le")),
         "contains binary data"),
    Case("table_unclosed_quote", "import",
         lambda w: _import(w, TABLE + b'P1,"1,3,1\nP2,0,4,0\n'),
         "row 2: a quote opened in this row is never closed"),
    Case("table_text_after_quote", "import", lambda w: _import(w, TABLE + b'"P1"x,1,3,1\n'),
         "row 2: cannot parse"),
    Case("table_ragged_row", "import", lambda w: _import(w, TABLE + b"P1,1,3,1,9\n"),
         "row 2 has 5 fields, the header has 4"),
    Case("table_only_a_header", "import", lambda w: _import(w, TABLE),
         "the table has a header but no data rows"),
    Case("table_no_patient_id_column", "import", lambda w: _import(w, b"name,age\nA,3\n"),
         "no patient_id column"),
    Case("table_header_with_newline", "import", lambda w: _import(w, b'"pat\nient",x\n1,2\n'),
         "no patient_id column (accepted names: patient_id, patientid, patient, id, case_id, "
         "subject_id, pid); the header is: pat\\nient, x"),
    Case("table_duplicate_ids", "import", lambda w: _import(w, TABLE + b"P1,1,3,1\nP1,0,4,0\n"),
         "row 3, column 'patient_id': patient_id 'P1' repeats row 2"),
    Case("table_duplicate_columns", "import",
         lambda w: _import(w, b"patient_id,os_months,OS months\nP1,3,4\n"),
         "column 'OS months': the column name repeats 'os_months'"),
    Case("table_10kb_id", "import", lambda w: _import(w, TABLE + b"P" * 10_000 + b",1,3,1\n"),
         "patient_id is 10000 characters long (at most 128)"),
    Case("table_id_with_newline", "import", lambda w: _import(w, TABLE + b'"P\n1",1,3,1\n'),
         "patient_id 'P\\n1' holds the control character \\n"),
    Case("table_id_with_nul", "import", lambda w: _import(w, TABLE + b"P\x001,1,3,1\n"),
         "contains binary data"),
    Case("table_id_with_rtl_override", "import",
         lambda w: _import(w, TABLE + "P\u202e1,1,3,1\n".encode()),
         "holds the control character \\u202e (U+202E)"),
    Case("table_id_with_script_tag", "import",
         lambda w: _import(w, TABLE + b"<script>alert(1)</script>,1,3,1\n"),
         "holds '<' or '>'; identifiers are plain text"),
    Case("table_id_formula_injection", "import",
         lambda w: _import(w, TABLE + b"\"=cmd|' /C calc'!A0\",1,3,1\n"),
         "starts with '=', which a spreadsheet would run as a formula"),
    Case("table_id_formula_at", "import", lambda w: _import(w, TABLE + b"@SUM(A1),1,3,1\n"),
         "starts with '@'"),
    Case("table_survival_not_numeric", "import", lambda w: _import(w, TABLE + b"P1,1,twelve,1\n"),
         "column 'os_months': 'twelve' is not a number"),
    Case("table_negative_time", "import", lambda w: _import(w, TABLE + b"P1,1,-3,1\n"),
         "'-3' is negative"),
    Case("table_infinite_time", "import", lambda w: _import(w, TABLE + b"P1,1,1e400,1\n"),
         "'1e400' is not finite"),
    Case("table_event_not_0_1", "import", lambda w: _import(w, TABLE + b"P1,1,3,2\n"),
         "column 'os_event': '2' is not an event indicator (use 1 or 0)"),
    Case("table_event_without_time", "import", lambda w: _import(w, TABLE + b"P1,1,,1\n"),
         "os event given without a time"),
    Case("table_label_not_binary", "import", lambda w: _import(w, TABLE + b"P1,maybe,3,1\n"),
         "'maybe' is not a metastasis status"),
    Case("table_million_columns", "import",
         lambda w: _import(w, b",".join([b"patient_id"] + [b"c%d" % i for i in range(10**6)])
                           + b"\nP1" + b",1" * 10**6 + b"\n"),
         "the header has about 1000001 columns; at most 10000 are read"),
    Case("table_too_large", "import",
         lambda w: _monkeypatched(w, tables, "MAX_TABLE_BYTES", 40,
                                  lambda w: _import(w, TABLE + b"P1,1,3,1\n")),
         "bytes is too large for a clinical table"),
    Case("table_cohort_exists", "import",
         lambda w: _import(w, TABLE + b"P9,1,3,1\n", cohort="A"),
         "cohort 'A' already has 3 patients; pass --replace"),
    Case("cohort_name_formula", "import",
         lambda w: _import(w, TABLE + b"P1,1,3,1\n", cohort='=HYPERLINK("x")'),
         "cohort name '=HYPERLINK(\"x\")' is not allowed: it starts with '='"),
    Case("cohort_name_slash", "import", lambda w: _import(w, TABLE + b"P1,1,3,1\n", cohort="a/b"),
         "is not allowed (1-64 characters, no slashes)"),
    Case("cohort_name_control", "import",
         lambda w: _import(w, TABLE + b"P1,1,3,1\n", cohort="B\x1b[31m"),
         "holds the control character \\x1b"),
    Case("upload_binary_table", "upload",
         lambda w: (lambda: _raises(lambda: preview_table(b"\x89PNG\r\n\x1a\n" + bytes(99),
                                                          "photo.csv"))),
         "photo.csv: this is not a text table: it is a PNG image"),
    Case("cli_table_value_with_newline", "cli",
         lambda w: _cli_import(w, TABLE + b'P1,"ye\ns",3,1\n'),
         "'ye\\ns' is not a metastasis status"),
    Case("cli_table_missing", "cli",
         lambda w: lambda: _cli(["import-cohort", "--db", str(w.db), "--cohort", "B",
                                 "--csv", str(w.root / "nope.csv")]),
         "nope.csv: no such file"),
    Case("cli_table_is_a_folder", "cli",
         lambda w: lambda: _cli(["import-cohort", "--db", str(w.db), "--cohort", "B",
                                 "--csv", str(w.root / "slides")]),
         "slides: is a folder, not a table"),
    Case("cli_subprocess_binary_table", "cli", _subprocess_binary_table,
         "clinical.csv: this is not a text table"),
    # --- slide zips ----------------------------------------------------------------
    Case("zip_dotdot_member", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("P2_a.jpg", b"x"), ("../evil.jpg", b"x")])),
         "member '../evil.jpg' points outside the archive; refused"),
    Case("zip_absolute_member", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("/etc/evil.jpg", b"x")])),
         "member '/etc/evil.jpg' has an absolute path; refused"),
    Case("zip_windows_drive_member", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("C:/evil.jpg", b"x")])), "has an absolute path"),
    Case("zip_symlink_member", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [(_link_member("P2_a.jpg"), b"/etc/passwd")])),
         "member 'P2_a.jpg' is a symbolic link; refused"),
    Case("zip_bomb_ratio", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("P2_a.png", bytes(20_000_000))])),
         "times; refused as a zip bomb"),
    Case("zip_huge_declared_size", "ingest",
         lambda w: _monkeypatched(w, discovery, "MAX_ZIP_BYTES", 1000, lambda w: _ingest_raises(
             w, _zip(w, [(f"P2_{i}.jpg", os.urandom(400)) for i in range(4)]))),
         "uncompressed; refused"),
    Case("zip_too_many_members", "ingest",
         lambda w: _monkeypatched(w, discovery, "MAX_ZIP_MEMBERS", 20, lambda w: _ingest_raises(
             w, _zip(w, [(f"P2_{i}.jpg", b"x") for i in range(21)]))),
         "21 members, more than the 20 allowed"),
    Case("zip_empty", "ingest", lambda w: _ingest_raises(w, _zip(w, [])),
         "no slide files found"),
    Case("zip_corrupt", "ingest",
         lambda w: _ingest_raises(w, w.file("s.zip", b"PK\x03\x04" + os.urandom(500))),
         "s.zip: not a readable zip archive"),
    Case("zip_truncated", "ingest",
         lambda w: _ingest_raises(
             w, w.file("t.zip", _zip(w, [("P2_a.jpg", w.smear)]).read_bytes()[:9000])),
         "t.zip: not a readable zip archive"),
    Case("zip_corrupt_member_data", "ingest", lambda w: _ingest_raises(w, _corrupt_member_zip(w)),
         "member 'P2_a.jpg' is corrupt"),
    Case("zip_nested", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("inner.zip", _zip(w, [("P2_a.jpg", w.smear)],
                                                                  "inner.zip").read_bytes())])),
         "member 'inner.zip' is itself an archive; nested archives are not opened"),
    Case("zip_member_name_with_newline", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("../P2\nx.jpg", b"x")])),
         "member '../P2\\nx.jpg' points outside the archive"),
    Case("zip_member_twice", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("P2_a.jpg", b"x"), ("P2_a.jpg", b"y")])),
         "member 'P2_a.jpg' appears twice"),
    Case("zip_file_and_folder", "ingest",
         lambda w: _ingest_raises(w, _zip(w, [("P2", b"x"), ("P2/a.jpg", b"y")])),
         "member 'P2' is both a file and a folder"),
    # --- slide folders and manifests -----------------------------------------------
    Case("folder_symlink_out_of_root", "ingest", lambda w: _ingest_raises(w, _symlink_out(w)),
         "P3_x.jpg: a symbolic link to"),
    Case("folder_without_slides", "ingest",
         lambda w: _ingest_raises(w, _folder(w, {"notes.txt": b"x"})), "no slide files found"),
    Case("manifest_unknown_patient", "ingest",
         lambda w: _ingest_raises(w, _folder(w, {"a.jpg": w.smear}),
                                  manifest=_manifest(w, "slide_path,patient_id\na.jpg,Z9\n")),
         "manifest.csv: patient_id 'Z9' not in cohort 'A'; nothing ingested"),
    Case("manifest_path_dotdot", "ingest",
         lambda w: _ingest_raises(w, _folder(w, {"a.jpg": w.smear}), manifest=_manifest(
             w, "slide_path,patient_id\n../manifest.csv,P2\n")),
         "'../manifest.csv' lies outside the slide folder"),
    Case("manifest_path_absolute_outside", "ingest",
         lambda w: _ingest_raises(w, _folder(w, {"a.jpg": w.smear}), manifest=_manifest(
             w, f"slide_path,patient_id\n{w.fixtures / SMEAR},P2\n")),
         "lies outside the slide folder"),
    Case("manifest_without_columns", "ingest",
         lambda w: _ingest_raises(w, _folder(w, {"a.jpg": w.smear}),
                                  manifest=_manifest(w, "file,patient\na.jpg,P2\n")),
         "no 'slide_path' column"),
    # --- slide files (a bad slide fails alone, with its reason) ----------------------
    Case("slide_broken_svs", "slides", lambda w: _fixture_manifest(w, "broken.svs"),
         "broken.svs: OpenSlide cannot open it", SLIDE_RUN),
    Case("slide_unopenable_tiff", "slides", lambda w: _fixture_manifest(w, "unopenable.tiff"),
         "Unsupported TIFF compression", SLIDE_RUN),
    Case("slide_unreadable_pixels", "slides", lambda w: _fixture_manifest(w, "unreadable.svs"),
         "unreadable.svs: cannot read pixels", SLIDE_RUN),
    Case("slide_truncated_jpeg", "slides",
         lambda w: _slide_fails(w, {"P2_a.jpg": w.smear[: len(w.smear) // 2]}, mpp=0.3),
         "P2_a.jpg: not a readable image", SLIDE_RUN),
    Case("slide_truncated_svs", "slides",
         lambda w: _slide_fails(w, {"P2_a.svs": (
             w.fixtures / "slides" / "CMU-1-Small-Region.svs").read_bytes()[:300_000]}),
         "P2_a.svs: OpenSlide cannot open it (not recognised as a .svs slide", SLIDE_RUN),
    Case("slide_empty_file", "slides",
         lambda w: _slide_fails(w, {"P2_a.jpg": b""}, mpp=0.3),
         "P2_a.jpg: the file is empty", SLIDE_RUN),
    Case("slide_png_decompression_bomb", "slides",
         lambda w: _slide_fails(w, {"P2_bomb.png": _png_header(100_000, 100_000)}, mpp=0.3),
         "P2_bomb.png: refused as a decompression bomb", SLIDE_RUN),
    Case("slide_same_file_other_patient", "slides",
         lambda w: _slide_fails(w, {"P2_copy.jpg": w.smear}, mpp=0.3),  # P1's file, byte for byte
         "is already slide 1 (P1_a.jpg) of patient 'P1' in cohort 'A'; refused for patient 'P2'",
         SLIDE_RUN),
    # --- command-line arguments ------------------------------------------------------
    Case("cli_slides_missing", "cli",
         lambda w: _ingest_cli(w, slides=w.root / "nowhere"), "nowhere: no such folder or zip"),
    Case("cli_slides_not_a_zip", "cli",
         lambda w: _ingest_cli(w, slides=w.file("x.csv", b"a\n1\n")),
         "x.csv: --slides must be a folder or a .zip archive"),
    Case("cli_mpp_zero", "cli", lambda w: _ingest_cli(w, "--mpp", "0"),
         "--mpp 0.0 is not a resolution in microns per pixel"),
    Case("cli_mpp_negative", "cli", lambda w: _ingest_cli(w, "--mpp", "-0.5"),
         "--mpp -0.5 is not a resolution"),
    Case("cli_mpp_nan", "cli", lambda w: _ingest_cli(w, "--mpp", "nan"),
         "--mpp nan is not a resolution"),
    Case("cli_mpp_text", "cli", lambda w: _ingest_cli(w, "--mpp", "half"),
         "argument --mpp: invalid float value: 'half'"),
    Case("cli_patch_size_nan", "cli", lambda w: _ingest_cli(w, "--patch-um", "nan"),
         "patch_um=nan is not a finite number"),
    Case("cli_manifest_is_a_folder", "cli",
         lambda w: _ingest_cli(w, "--manifest", str(w.root / "slides")),
         "slides: is a folder, not a table"),
    Case("cli_ingest_unknown_cohort", "cli",
         lambda w: lambda: _cli(["ingest", "--db", str(w.db), "--cohort", "Nope",
                                 "--slides", str(w.root / "slides")]),
         "cohort 'Nope' does not exist"),
    Case("cli_train_one_fold", "cli",
         lambda w: lambda: _cli(["train", "--db", str(w.db), "--cohort", "A", "--folds", "1"]),
         "argument --folds: 1: cross-validation needs at least 2 folds"),
    Case("cli_train_unknown_cohort", "cli",
         lambda w: lambda: _cli(["train", "--db", str(w.db), "--cohort", "Nope"]),
         "cohort 'Nope' does not exist"),
    Case("cli_train_weights_is_a_folder", "cli",
         lambda w: lambda: _cli(["train", "--db", str(w.db), "--cohort", "A",
                                 "--weights", str(w.root / "slides")]),
         "no such weights file"),
    Case("cli_score_unknown_model", "cli",
         lambda w: lambda: _cli(["score", "--db", str(w.db), "--model", "nope"]),
         "no model 'nope' in the store"),
    Case("cli_score_10kb_model_id", "cli",
         lambda w: lambda: _cli(["score", "--db", str(w.db), "--model", "m" * 10_000]),
         "(10000 characters) is not a model id"),
    Case("cli_report_unknown_model", "cli",
         lambda w: lambda: _cli(["report", "--db", str(w.db), "--model", "nope",
                                 "--out", str(w.root / "report")]),
         "no model 'nope' in the store"),
    Case("cli_db_does_not_exist", "cli",
         lambda w: lambda: _cli(["score", "--db", str(w.root / "typo" / "cmil.duckdb"),
                                 "--model", "m1"]),
         "no store here; create one with import-cohort"),
    Case("cli_db_is_a_folder", "cli",
         lambda w: lambda: _cli(["score", "--db", str(w.root / "slides"), "--model", "m1"]),
         "slides: is a folder; give the store file"),
    Case("cli_db_is_not_a_store", "cli",
         lambda w: lambda: _cli(["import-cohort", "--db", str(w.root / "A.csv"), "--cohort", "B",
                                 "--csv", str(w.root / "A.csv")]),
         "A.csv: not a DuckDB store file"),
    Case("cli_roc_table_missing", "cli",
         lambda w: lambda: _cli(["roc", "--csv", str(w.root / "nope.csv"), "--label", "y",
                                 "--score", "s"]),
         "nope.csv: no such file"),
    Case("cli_unknown_command", "cli", lambda w: lambda: _cli(["explode"]),
         "invalid choice: 'explode'"),
    # --- URL query parameters of the dashboard -----------------------------------------
    Case("url_patient_garbage", "page", lambda w: lambda: _page(w, patient="garbage"),
         "patient 'garbage' is not of the form <cohort>/<patient_id>"),
    Case("url_patient_unknown", "page", lambda w: lambda: _page(w, patient="A/Z999"),
         "no patient 'Z999' in cohort 'A'"),
    Case("url_patient_unknown_cohort", "page", lambda w: lambda: _page(w, patient="Nope/P1"),
         "no patient 'P1' in cohort 'Nope'"),
    Case("url_patient_script", "page",
         lambda w: lambda: _page(w, patient="A/<script>alert(1)</script>"),
         "no patient '<script>alert(1)</script>' in cohort 'A'"),
    Case("url_patient_10kb", "page", lambda w: lambda: _page(w, patient="A/" + "P" * 10_000),
         "(10002 characters)' is not a patient reference"),
    Case("url_patient_control_characters", "page", lambda w: lambda: _page(w, patient="A/P1\x00\n"),
         "patient 'A/P1\\x00\\n' is not a patient reference"),
    Case("url_model_unknown", "page", lambda w: lambda: _page(w, model="nope", patient="A/P1"),
         "The link's model 'nope' is not in this store; showing model 'm1'."),
    Case("url_model_10kb", "page", lambda w: lambda: _page(w, model="x" * 10_000),
         "(10000 characters)' is not in this store"),
]


def test_the_table_covers_every_entry_point() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert {c.entry for c in CASES} == {"import", "upload", "cli", "ingest", "slides", "page"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_hostile_input_is_refused_clearly_and_changes_nothing(
    case: Case, base_study: Path, fixtures_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "study"
    shutil.copytree(base_study, root)
    work = Work(root, root / "store" / "cmil.duckdb", fixtures_dir, monkeypatch)
    call = case.build(work)
    rows, files = _snapshot_store(work.db), _snapshot_files(root)

    message = call()

    assert case.expect in message, message
    assert "Traceback" not in message
    after = _snapshot_store(work.db)
    changed = {name for name in rows.keys() | after.keys() if rows.get(name) != after.get(name)}
    assert changed <= case.may_change, changed
    assert _snapshot_files(root) == files
