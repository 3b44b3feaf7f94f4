"""cmil_core.model.features: per-slide feature files, their reuse, atomic writing and corruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmil_core.errors import InputError
from cmil_core.ingest.patch_reading import read_patch
from cmil_core.ingest.slides import file_sha256, open_slide
from cmil_core.model import features as features_mod
from cmil_core.model.encoders import Encoder, load_encoder
from cmil_core.model.features import (
    FEATURES_FORMAT,
    FeatureFile,
    feature_path,
    load_features,
    settings_key,
    slide_features,
)
from tests.conftest import ROOT, is_plain_json

PX = 64  # encoder input: small keeps the tests fast
TILING = "t1"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return load_encoder("smallcnn", input_px=PX, precision="fp32")


@pytest.fixture
def image_slide(tmp_path: Path) -> Path:
    """A 512 x 384 photograph-like slide: coloured blobs on glass."""
    rng = np.random.default_rng(0)
    img = np.full((384, 512, 3), 235, dtype=np.uint8)
    for _ in range(120):
        cx, cy, r = rng.integers(0, 512), rng.integers(0, 384), rng.integers(5, 20)
        img[max(cy - r, 0): cy + r, max(cx - r, 0): cx + r] = rng.integers(60, 230, 3)
    path = tmp_path / "P001_smear.png"
    Image.fromarray(img).save(path)
    return path


def _grid(n_cols: int = 4, n_rows: int = 3, size: int = 128, first_id: int = 1000) -> pd.DataFrame:
    rows = [(first_id + r * n_cols + c, c * size, r * size, size)
            for r in range(n_rows) for c in range(n_cols)]
    return pd.DataFrame(rows, columns=["patch_id", "x", "y", "size"])


class _Counting:
    """Wraps an encoder's embed to count the patches it embeds."""

    def __init__(self, encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.patches = 0
        original = encoder.embed

        def embed(batch: np.ndarray) -> np.ndarray:
            self.patches += batch.shape[0]
            return original(batch)

        monkeypatch.setattr(encoder, "embed", embed)


def test_round_trip(image_slide: Path, encoder: Encoder, tmp_path: Path) -> None:
    patches = _grid()
    calls: list[tuple[int, int]] = []
    ff = slide_features(image_slide, patches, encoder, tmp_path / "feat", tiling_key=TILING,
                        batch_size=5, progress=lambda d, t: calls.append((d, t)))
    sha = file_sha256(image_slide)
    assert ff.path == tmp_path / "feat" / encoder.spec.key / f"{sha[:16]}_{TILING}.npz"
    assert ff.path == feature_path(tmp_path / "feat", encoder.spec.key, sha, TILING)
    assert calls[0] == (0, 12) and calls[-1] == (12, 12) and len(calls) == 1 + 3

    loaded = load_features(ff.path)
    assert loaded.features.dtype == np.float16 and loaded.features.shape == (12, 128)
    np.testing.assert_array_equal(loaded.features, ff.features)
    np.testing.assert_array_equal(loaded.patch_ids, patches["patch_id"].to_numpy())
    assert loaded.patch_ids.dtype == np.int64
    np.testing.assert_array_equal(loaded.coords, patches[["x", "y", "size"]].to_numpy())
    assert loaded.meta == ff.meta and is_plain_json(loaded.meta)
    meta = loaded.meta
    assert meta["format"] == FEATURES_FORMAT and meta["format_version"] == 1
    assert meta["encoder"] == encoder.spec.to_dict() and meta["encoder_key"] == encoder.spec.key
    assert meta["slide_sha256"] == sha and meta["slide_name"] == image_slide.name
    assert meta["tiling_key"] == TILING and meta["n_patches"] == 12 and meta["embed_dim"] == 128
    assert meta["created_at"].endswith("+00:00")
    assert {"python", "cmil_core", "torch", "numpy"} <= set(meta["versions"])
    assert loaded.encoder_spec == encoder.spec and len(loaded) == 12

    # The rows are the encoder's embeddings of read_patch at input_px, in table order.
    with open_slide(image_slide) as slide:
        pixels = np.stack([read_patch(slide, int(r.x), int(r.y), int(r.size), PX)
                           for r in patches.itertuples()])
    expected = encoder.embed(pixels)
    np.testing.assert_allclose(loaded.features.astype(np.float32), expected,
                               rtol=2e-3, atol=1e-3 * np.abs(expected).max())
    np.testing.assert_array_equal(loaded.rows_of([1011, 1000]), [11, 0])
    with pytest.raises(InputError, match="no features for patch id"):
        loaded.rows_of([5])


def test_reuse_does_not_recompute(image_slide: Path, encoder: Encoder, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _Counting(encoder, monkeypatch)
    patches = _grid()
    first = slide_features(image_slide, patches, encoder, tmp_path, tiling_key=TILING)
    assert counter.patches == 12
    mtime = first.path.stat().st_mtime_ns
    calls: list[tuple[int, int]] = []
    second = slide_features(image_slide, patches, encoder, tmp_path, tiling_key=TILING,
                            slide_sha256=file_sha256(image_slide),
                            progress=lambda d, t: calls.append((d, t)))
    assert counter.patches == 12  # nothing embedded again
    assert second.path.stat().st_mtime_ns == mtime
    assert calls == [(12, 12)]
    np.testing.assert_array_equal(second.features, first.features)


def test_recompute_when_patches_or_keys_change(image_slide: Path, encoder: Encoder,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _Counting(encoder, monkeypatch)
    patches = _grid()
    first = slide_features(image_slide, patches, encoder, tmp_path, tiling_key=TILING)
    mtime = first.path.stat().st_mtime_ns
    # Fewer patch ids (a stricter quality decision): served from the same file, in the
    # order asked, nothing embedded or written.
    subset = patches.iloc[::2].iloc[::-1].reset_index(drop=True)
    second = slide_features(image_slide, subset, encoder, tmp_path, tiling_key=TILING)
    assert counter.patches == 12
    assert second.path == first.path and first.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.patch_ids, subset["patch_id"])
    np.testing.assert_array_equal(second.features, first.features[::2][::-1])
    # Same ids, moved patches: those recomputed; the file keeps the other six.
    moved = subset.assign(x=subset["x"] + 1)
    slide_features(image_slide, moved, encoder, tmp_path, tiling_key=TILING)
    assert counter.patches == 12 + 6
    assert len(load_features(first.path)) == 12
    # Another tiling key: another file, the first one kept.
    third = slide_features(image_slide, moved, encoder, tmp_path, tiling_key="t2")
    assert counter.patches == 12 + 6 + 6
    assert third.path != first.path and first.path.exists()
    # Another encoder: another folder.
    other = load_encoder("smallcnn", seed=1, input_px=PX, precision="fp32")
    fourth = slide_features(image_slide, moved, other, tmp_path, tiling_key="t2")
    assert fourth.path.parent.name == other.spec.key != encoder.spec.key


def test_a_looser_decision_embeds_only_the_patches_the_file_lacks(
        image_slide: Path, encoder: Encoder, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _Counting(encoder, monkeypatch)
    patches = _grid()
    strict = patches.iloc[:5]
    slide_features(image_slide, strict, encoder, tmp_path / "a", tiling_key=TILING)
    assert counter.patches == 5
    loose = slide_features(image_slide, patches, encoder, tmp_path / "a", tiling_key=TILING)
    assert counter.patches == 5 + 7  # only the seven new patches were read and embedded
    fresh = slide_features(image_slide, patches, encoder, tmp_path / "b", tiling_key=TILING)
    np.testing.assert_array_equal(loose.patch_ids, patches["patch_id"])
    np.testing.assert_allclose(loose.features.astype(np.float32),
                               fresh.features.astype(np.float32), rtol=2e-3, atol=2e-3)
    # Back to the strict decision: nothing read again.
    again = slide_features(image_slide, strict, encoder, tmp_path / "a", tiling_key=TILING)
    assert counter.patches == 5 + 7 + 12
    np.testing.assert_array_equal(again.features, loose.features[:5])


def test_a_crash_while_writing_leaves_no_file(image_slide: Path, encoder: Encoder,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    original_savez = np.savez

    def crash(fh: Any, **arrays: Any) -> None:
        fh.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # as if the run were stopped in the middle

    monkeypatch.setattr(features_mod.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key=TILING)
    folder = tmp_path / encoder.spec.key
    assert list(folder.iterdir()) == []  # neither a final file nor a temporary one
    monkeypatch.setattr(features_mod.np, "savez", original_savez)

    # A run killed outright (no cleanup) leaves its temporary file: it is ignored,
    # and removed by the next successful write once it is old.
    final = feature_path(tmp_path, encoder.spec.key, file_sha256(image_slide), TILING)
    fresh = folder / f".{final.name}.fresh.partial"
    stale = folder / f".{final.name}.stale.partial"
    for leftover in (fresh, stale):
        leftover.write_bytes(b"PK\x03\x04 killed")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    ff = slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key=TILING)
    assert ff.path == final and len(load_features(final)) == 12
    assert fresh.exists() and not stale.exists()


def test_a_killed_writer_leaves_no_final_file(image_slide: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of writing (a child process): no final file, a later run succeeds."""
    root = tmp_path / "feat"
    child = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        import pandas as pd
        from cmil_core.model import features
        from cmil_core.model.encoders import load_encoder

        def slow_savez(fh, **arrays):
            fh.write(b"PK\\x03\\x04 the first bytes of an archive")
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)

        features.np.savez = slow_savez
        enc = load_encoder("smallcnn", input_px={PX}, precision="fp32")
        table = pd.DataFrame({{"patch_id": [1, 2], "x": [0, 128], "y": [0, 0], "size": [128, 128]}})
        features.slide_features({str(image_slide)!r}, table, enc, {str(root)!r}, tiling_key="k")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
    enc = load_encoder("smallcnn", input_px=PX, precision="fp32")
    folder = root / enc.spec.key
    leftovers = list(folder.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".partial")
    table = pd.DataFrame({"patch_id": [1, 2], "x": [0, 128], "y": [0, 0], "size": [128, 128]})
    ff = slide_features(image_slide, table, enc, root, tiling_key="k")
    assert load_features(ff.path).features.shape == (2, 128)
    # the killed writer is gone, so its leftover is stale: the rewrite removed it
    assert [p.name for p in folder.iterdir()] == [ff.path.name]


def test_corrupt_files_raise_and_are_recomputed(image_slide: Path, encoder: Encoder,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ff = slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key=TILING)
    whole = ff.path.read_bytes()
    ff.path.write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(InputError, match=rf"{ff.path.name}: not a readable feature file"):
        load_features(ff.path)
    counter = _Counting(encoder, monkeypatch)
    again = slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key=TILING)
    assert counter.patches == 12
    np.testing.assert_array_equal(load_features(again.path).features, ff.features)

    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not numpy at all")
    with pytest.raises(InputError, match="garbage.npz: not a readable feature file"):
        load_features(garbage)
    bare = tmp_path / "bare.npz"
    with bare.open("wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(InputError, match="bare.npz: .*not an .npz archive"):
        load_features(bare)
    partial = tmp_path / "partial.npz"
    np.savez(partial, features=np.zeros((1, 2), np.float16))
    with pytest.raises(InputError, match="partial.npz: .*no array patch_ids, coords, meta"):
        load_features(partial)
    other = tmp_path / "other.npz"
    np.savez(other, features=np.zeros((1, 2), np.float16), patch_ids=np.zeros(1, np.int64),
             coords=np.zeros((1, 3), np.int64), meta=np.array(json.dumps({"format": "x"})))
    with pytest.raises(InputError, match="other.npz: .*format 'cmil-features'"):
        load_features(other)
    with pytest.raises(InputError, match="no such feature file"):
        load_features(tmp_path / "absent.npz")


def test_empty_patch_table(image_slide: Path, encoder: Encoder, tmp_path: Path) -> None:
    ff = slide_features(image_slide, _grid().iloc[:0], encoder, tmp_path, tiling_key=TILING)
    loaded = load_features(ff.path)
    assert loaded.features.shape == (0, 128) and loaded.coords.shape == (0, 3)


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda t: t.drop(columns="size"), "lacks column.*size"),
    (lambda t: t.assign(patch_id=1), "repeats patch_id 1"),
    (lambda t: t.assign(x=t["x"] + 0.5), "column x must hold whole numbers"),
    (lambda t: t.assign(y=t["y"].where(t.index != 2)), "column y is empty at row 2"),
    (lambda t: t.assign(size=0), "size must be positive"),
])
def test_bad_patch_tables(image_slide: Path, encoder: Encoder, tmp_path: Path,
                          change: Any, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        slide_features(image_slide, change(_grid()), encoder, tmp_path, tiling_key=TILING)


def test_bad_arguments(image_slide: Path, encoder: Encoder, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tiling_key='a/b'"):
        slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key="a/b")
    with pytest.raises(InputError, match="slide_sha256='abc'"):
        slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key=TILING,
                       slide_sha256="abc")
    with pytest.raises(InputError, match="no such slide file"):
        slide_features(tmp_path / "absent.svs", _grid(), encoder, tmp_path, tiling_key=TILING)
    with pytest.raises(InputError, match="workers=0"):
        slide_features(image_slide, _grid(), encoder, tmp_path, tiling_key=TILING, workers=0)


def test_real_svs_slide(fixtures_dir: Path, tmp_path: Path) -> None:
    """CMU-1-Small-Region.svs (Aperio, 0.499 um/px): 224 px patches read at 224 px."""
    path = fixtures_dir / "slides" / "CMU-1-Small-Region.svs"
    enc = load_encoder("smallcnn")  # the demo's encoder, fast path, 224 px
    patches = pd.DataFrame({
        "patch_id": np.arange(10, dtype=np.int64) + 7,
        "x": [224 * (i % 5) + 500 for i in range(10)],
        "y": [224 * (i // 5) + 900 for i in range(10)],
        "size": 224,
    })
    ff = slide_features(path, patches, enc, tmp_path, tiling_key="cmu", workers=2, batch_size=4)
    assert isinstance(ff, FeatureFile) and ff.features.shape == (10, 128)
    assert ff.meta["slide_sha256"] == file_sha256(path)
    with open_slide(path) as slide:
        pixels = np.stack([read_patch(slide, int(r.x), int(r.y), 224, 224)
                           for r in patches.itertuples()])
    expected = enc.embed(pixels)
    np.testing.assert_allclose(ff.features.astype(np.float32), expected,
                               rtol=2e-3, atol=1e-3 * np.abs(expected).max())
    # distinct tissue gives distinct embeddings
    assert np.linalg.matrix_rank(ff.features.astype(np.float32)) > 1


def test_settings_key() -> None:
    a = settings_key({"config": {"patch_um": 112.0, "overlap": 0.0}, "metrics_version": 1})
    b = settings_key({"metrics_version": 1, "config": {"overlap": 0.0, "patch_um": 112.0}})
    c = settings_key({"config": {"patch_um": 100.0, "overlap": 0.0}, "metrics_version": 1})
    assert a == b != c and a.startswith("t") and len(a) == 13
    assert feature_path("/r", "smallcnn-0123456789ab", "a" * 64, a).name == f"{'a' * 16}_{a}.npz"
    with pytest.raises(InputError, match="not JSON-ready"):
        settings_key({"x": float("nan")})


def test_precompute_in_two_processes_writes_the_same_files(tmp_path: Path, fixtures_dir: Path) -> None:
    """Several slides at once across processes: the files equal the ones one process writes."""
    from cmil_core.ingest.slides import file_sha256
    from cmil_core.model.encoders import load_encoder
    from cmil_core.model.features import SlideTask, precompute

    smears = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:3]
    encoder = load_encoder("smallcnn", seed=3, precision="fp32")
    tasks = []
    for path in smears:
        patches = pd.DataFrame({"patch_id": [1, 2], "x": [0, 64], "y": [0, 32], "size": [96, 96]})
        tasks.append(SlideTask(str(path), patches, "t1", 0.5, file_sha256(path)))
    parallel = tmp_path / "parallel"
    precompute(tasks, encoder, parallel, processes=2)
    written = sorted(p.relative_to(parallel) for p in parallel.rglob("*.npz"))
    assert len(written) == 3 and not list(parallel.rglob("*.partial"))
    serial = tmp_path / "serial"
    for task in tasks:
        one = slide_features(task.path, task.patches, encoder, serial, tiling_key="t1",
                             mpp=0.5, slide_sha256=task.sha256)
        other = load_features(parallel / written[0].parent / f"{task.sha256[:16]}_t1.npz")
        np.testing.assert_allclose(np.asarray(other.features, np.float32),
                                   np.asarray(one.features, np.float32), atol=2e-3)
    # Already there: nothing to do, nothing spawned, files untouched.
    stamps = {p: p.stat().st_mtime_ns for p in parallel.rglob("*.npz")}
    precompute(tasks, encoder, parallel, processes=2)
    assert {p: p.stat().st_mtime_ns for p in parallel.rglob("*.npz")} == stamps


def test_extraction_processes_come_from_the_environment_or_the_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from cmil_core.model.features import default_processes

    monkeypatch.setenv("CMIL_EXTRACT_PROCESSES", "3")
    assert default_processes() == 3
    monkeypatch.setenv("CMIL_EXTRACT_PROCESSES", "many")
    with pytest.raises(InputError, match="CMIL_EXTRACT_PROCESSES='many'"):
        default_processes()
    monkeypatch.delenv("CMIL_EXTRACT_PROCESSES")
    assert default_processes() == (torch.cuda.device_count() or 1)
