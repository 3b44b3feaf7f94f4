"""cmil_core.ingest.discovery: which files are slides, whose they are, and safe zips."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from cmil_core.errors import InputError
from cmil_core.ingest.discovery import discover_slides, extract_zip


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_rules_per_patient_folders_and_prefixes(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    _touch(root / "P001_a.svs")
    _touch(root / "P002.ndpi")
    _touch(root / "P003" / "fov01.jpg")
    _touch(root / "P003" / "deeper" / "fov02.png")
    _touch(root / "notes.txt")
    _touch(root / ".hidden.svs")
    _touch(root / "P004_b.tiff.part")
    _, sources = discover_slides(root)
    found = {(s.path.relative_to(root.resolve()).as_posix(), s.patient_id, s.origin) for s in sources}
    assert found == {
        ("P001_a.svs", "P001", "prefix"),
        ("P002.ndpi", "P002", "prefix"),
        ("P003/fov01.jpg", "P003", "folder"),
        ("P003/deeper/fov02.png", "P003", "folder"),
    }


def test_symlinks_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    outside = _touch(tmp_path / "secret" / "X_1.svs")
    root = tmp_path / "slides"
    _touch(root / "P1_a.svs")
    (root / "P9_link.svs").symlink_to(outside)
    with pytest.raises(InputError, match=r"P9_link.svs: a symbolic link to .*outside the slide"):
        discover_slides(root)
    (root / "P9_link.svs").unlink()
    (root / "P2_link.svs").symlink_to(root / "P1_a.svs")  # a link within the folder is fine
    _, sources = discover_slides(root)
    assert [s.patient_id for s in sources] == ["P1", "P2"]


def test_manifest_decides_patients_and_resolution(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    _touch(root / "a.jpg")
    _touch(root / "sub" / "b.jpg")
    _touch(root / "ignored.jpg")
    manifest = _touch(tmp_path / "m.csv", b"slide_path,patient_id,mpp\na.jpg,NB1,0.3\nsub/b.jpg,NB2,\n")
    _, sources = discover_slides(root, manifest=manifest)
    assert [(s.path.name, s.patient_id, s.mpp, s.origin) for s in sources] == [
        ("a.jpg", "NB1", 0.3, "manifest"), ("b.jpg", "NB2", None, "manifest")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,patient\na.jpg,NB1\n", "m.csv: no 'slide_path' column"),
        (b"slide_path,patient_id\nmissing.jpg,NB1\n", "row 2, column 'slide_path': 'missing.jpg' does not exist"),
        (b"slide_path,patient_id\na.jpg,\n", "row 2, column 'patient_id': empty"),
        (b"slide_path,patient_id,mpp\na.jpg,NB1,fast\n", "row 2, column 'mpp': 'fast' is not a number"),
        (b"slide_path,patient_id,mpp\na.jpg,NB1,-1\n", "row 2, column 'mpp'"),
        (b"slide_path,patient_id\na.jpg,NB1\na.jpg,NB2\n", "row 3, column 'slide_path': 'a.jpg' repeats row 2"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    root = tmp_path / "slides"
    _touch(root / "a.jpg")
    manifest = _touch(tmp_path / "m.csv", content)
    with pytest.raises(InputError, match=message):
        discover_slides(root, manifest=manifest)


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no slide files found"):
        discover_slides(tmp_path / "empty")
    with pytest.raises(InputError, match="no such folder or zip"):
        discover_slides(tmp_path / "nope")
    with pytest.raises(InputError, match="must be a folder or a .zip"):
        discover_slides(_touch(tmp_path / "x.svs"))


def test_zip_of_patient_folders_is_extracted_and_found(tmp_path: Path, fixtures_dir: Path) -> None:
    archive = tmp_path / "photos.zip"
    smears = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:4]
    with zipfile.ZipFile(archive, "w") as zf:
        for i, path in enumerate(smears):
            zf.write(path, f"NB{i % 2}/{path.name}")
    root, sources = discover_slides(archive, extract_to=tmp_path / "out")
    assert root == (tmp_path / "out").resolve()
    assert sorted({s.patient_id for s in sources}) == ["NB0", "NB1"]
    assert all(s.path.read_bytes() == (fixtures_dir / "smears" / "bccd" / s.path.name).read_bytes()
               for s in sources)
    # A rerun keeps what is already extracted.
    mtime = sources[0].path.stat().st_mtime_ns
    discover_slides(archive, extract_to=tmp_path / "out")
    assert sources[0].path.stat().st_mtime_ns == mtime


def _zip_with(tmp_path: Path, member: str, data: bytes = b"data", *, link: bool = False) -> Path:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("P1/ok.jpg", b"fine")
        info = zipfile.ZipInfo(member)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return archive


@pytest.mark.parametrize(
    ("member", "kwargs", "message"),
    [
        ("../escape.jpg", {}, "points outside the archive"),
        ("P1/../../escape.jpg", {}, "points outside the archive"),
        ("/etc/evil.jpg", {}, "absolute path"),
        ("C:/evil.jpg", {}, "absolute path"),
        ("P1/link.jpg", {"link": True}, "symbolic link"),
        ("P1/bomb.jpg", {"data": b"\0" * 10_000_000}, "zip bomb"),
    ],
)
def test_hostile_zips_are_refused_and_nothing_lands(
    tmp_path: Path, member: str, kwargs: dict, message: str
) -> None:
    archive = _zip_with(tmp_path, member, **kwargs)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(InputError, match=message):
        extract_zip(archive, target)
    assert list(target.rglob("*")) == []
    assert not (tmp_path / "escape.jpg").exists()


def test_zip_size_bound(tmp_path: Path) -> None:
    archive = _zip_with(tmp_path, "P1/big.jpg", b"y" * 5000)
    with pytest.raises(InputError, match="uncompressed; refused"):
        extract_zip(archive, tmp_path / "out", max_bytes=1000, max_ratio=1e9)


def test_corrupt_zip(tmp_path: Path) -> None:
    bad = _touch(tmp_path / "bad.zip", b"PK\x03\x04 this is not really a zip")
    with pytest.raises(InputError, match="bad.zip: not a readable zip archive"):
        discover_slides(bad, extract_to=tmp_path / "out")


# --- server folders under CMIL_SLIDE_ROOT, and uploads ---

@pytest.fixture
def slide_root(tmp_path: Path) -> Path:
    """A slide root with a patient folder, a zip, a link out of it and a link within it."""
    root = tmp_path / "root"
    _touch(root / "centre" / "P1" / "a.jpg")
    _touch(root / "centre.zip", b"PK")
    _touch(tmp_path / "secret" / "P9" / "x.jpg")
    (root / "escape").symlink_to(tmp_path / "secret", target_is_directory=True)
    (root / "inside").symlink_to(root / "centre", target_is_directory=True)
    _touch(root / "notes.txt")
    return root


@pytest.mark.parametrize(
    ("relative", "expected"),
    [("centre", "centre"), ("centre/P1", "centre/P1"), ("./centre/../centre", "centre"),
     ("centre.zip", "centre.zip"), ("inside", "centre"), ("", ".")],
)
def test_resolve_under_root_accepts_what_lies_under_it(
    slide_root: Path, relative: str, expected: str
) -> None:
    from cmil_core.ingest.discovery import resolve_under_root

    assert resolve_under_root(slide_root, relative) == (slide_root / expected).resolve()


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("..", "outside the slide folder root"),
        ("../secret", "outside the slide folder root"),
        ("centre/../../secret/P9", "outside the slide folder root"),
        ("escape", "outside the slide folder root"),  # a link out of the root
        ("escape/P9", "outside the slide folder root"),
        ("/etc", "outside the slide folder root"),
        ("missing", "no such folder under"),
        ("notes.txt", "neither a folder nor a .zip"),
        ("cen\0tre", "not a valid path"),
    ],
)
def test_resolve_under_root_refuses_everything_else(
    slide_root: Path, relative: str, message: str
) -> None:
    from cmil_core.ingest.discovery import resolve_under_root

    with pytest.raises(InputError, match=message):
        resolve_under_root(slide_root, relative)


def test_absolute_path_under_the_root_is_accepted(slide_root: Path) -> None:
    from cmil_core.ingest.discovery import resolve_under_root

    inside = slide_root / "centre" / "P1"
    assert resolve_under_root(slide_root, str(inside)) == inside.resolve()


def test_configured_slide_root(slide_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmil_core.ingest.discovery import configured_slide_root, folders_under_root

    monkeypatch.delenv("CMIL_SLIDE_ROOT", raising=False)
    assert configured_slide_root() is None
    monkeypatch.setenv("CMIL_SLIDE_ROOT", "  ")
    assert configured_slide_root() is None
    monkeypatch.setenv("CMIL_SLIDE_ROOT", str(slide_root))
    assert configured_slide_root() == slide_root.resolve()
    monkeypatch.setenv("CMIL_SLIDE_ROOT", str(slide_root / "notes.txt"))
    with pytest.raises(InputError, match="CMIL_SLIDE_ROOT=.*no such folder"):
        configured_slide_root()
    # Links are not listed, hidden folders neither; depth is bounded.
    _touch(slide_root / ".cache" / "x.jpg")
    _touch(slide_root / "centre" / "P1" / "deep" / "y.jpg")
    assert folders_under_root(slide_root) == ["centre", "centre/P1"]
    assert folders_under_root(slide_root, depth=1) == ["centre"]


def test_uploads_land_in_the_stores_folder_under_a_clean_name(tmp_path: Path) -> None:
    import io

    from cmil_core.ingest.discovery import save_upload, upload_folder

    db = tmp_path / "store" / "cmil.duckdb"
    assert upload_folder(db, "Centre B") == tmp_path / "store" / "uploads" / "Centre_B"
    assert upload_folder(db, "..") == tmp_path / "store" / "uploads" / "cohort"
    folder = upload_folder(db, "B")
    saved = save_upload(b"zipdata", "../../etc/evil name.zip", folder)
    assert saved == folder / "evil_name.zip" and saved.read_bytes() == b"zipdata"
    saved = save_upload(io.BytesIO(b"again"), "C:\\Users\\me\\photos.ZIP", folder)
    assert saved == folder / "photos.ZIP" and saved.read_bytes() == b"again"
    assert sorted(p.name for p in folder.iterdir()) == ["evil_name.zip", "photos.ZIP"]  # no .part


def test_an_uploaded_zip_is_found_after_saving(tmp_path: Path, fixtures_dir: Path) -> None:
    from cmil_core.ingest.discovery import save_upload, upload_folder

    buffer = tmp_path / "src.zip"
    smears = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:2]
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, path in enumerate(smears):
            zf.write(path, f"NB{i}/{path.name}")
    folder = upload_folder(tmp_path / "cmil.duckdb", "B")
    saved = save_upload(buffer.read_bytes(), "centre b.zip", folder)
    root, sources = discover_slides(saved, extract_to=saved.with_suffix(""))
    assert root == (folder / "centre_b").resolve()
    assert [s.patient_id for s in sources] == ["NB0", "NB1"]
