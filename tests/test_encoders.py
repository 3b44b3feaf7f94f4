"""cmil_core.model.encoders (and backbones, weight_files): architectures, weights files, TorchScript, the fast path, extraction.

Reference numbers for the ResNets are torchvision's (``torchvision.models``
documentation, "Params" and "GFLOPS" columns, which count multiply-adds):
resnet18 11,689,512 parameters and 1.81 G, resnet34 21,797,672 and 3.66 G,
resnet50 25,557,032 and 4.09 G, the classifier ``fc`` included (512 x 1000 +
1000 = 513,000 parameters for the 512-d networks, 2048 x 1000 + 1000 =
2,049,000 for resnet50).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmil_core.errors import InputError
from cmil_core.model import encoders
from cmil_core.model.backbones import ARCHITECTURES, build_backbone, count_macs
from cmil_core.model.encoders import (
    ENCODER_NAMES,
    Encoder,
    EncoderSpec,
    bf16_supported,
    encoder_from_spec,
    extract,
    load_encoder,
    preprocess,
)
from tests.conftest import is_plain_json

SMALL_PX = 64  # ResNets on small inputs keep the tests fast


def _random_patches(n: int, px: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def smear_patches(fixtures_dir: Path) -> np.ndarray:
    """Eight 224 px crops of real Wright-Giemsa blood smear photographs (BCCD)."""
    paths = sorted((fixtures_dir / "smears" / "bccd").glob("*.jpg"))[:4]
    if len(paths) < 4:
        pytest.skip("BCCD photographs not found")
    crops = []
    for path in paths:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
        crops += [rgb[:224, :224], rgb[-224:, -224:]]
    return np.stack(crops)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _save_torchscript(module: torch.nn.Module, px: int, path: Path) -> None:
    """Trace and save; torch 2.13 deprecates TorchScript, which these tests still cover."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module.eval(), torch.zeros(2, 3, px, px))
        torch.jit.save(traced, str(path))


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet34", 512),
                                           ("resnet50", 2048)])
def test_resnet_shapes(name: str, dim: int) -> None:
    enc = load_encoder(name, input_px=SMALL_PX, precision="fp32")
    out = enc.embed(_random_patches(3, SMALL_PX))
    assert out.shape == (3, dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert enc.spec.embed_dim == dim == enc.embed_dim


def test_smallcnn_shape_at_224() -> None:
    enc = load_encoder("smallcnn")
    out = enc.embed(_random_patches(5, 224))
    assert out.shape == (5, 128) and out.dtype == np.float32 and np.isfinite(out).all()
    assert enc.embed(_random_patches(0, 224)).shape == (0, 128)


@pytest.mark.parametrize(("name", "params_with_fc", "fc_params"), [
    ("resnet18", 11_689_512, 513_000),
    ("resnet34", 21_797_672, 513_000),
    ("resnet50", 25_557_032, 2_049_000),
])
def test_resnet_parameter_counts_match_torchvision(
    name: str, params_with_fc: int, fc_params: int
) -> None:
    module = build_backbone(name)
    assert sum(p.numel() for p in module.parameters()) == params_with_fc - fc_params


@pytest.mark.parametrize(("name", "gmacs"), [("resnet18", 1.81), ("resnet34", 3.66),
                                             ("resnet50", 4.09)])
def test_count_macs_matches_torchvision(name: str, gmacs: float) -> None:
    assert count_macs(build_backbone(name), 224) / 1e9 == pytest.approx(gmacs, abs=0.01)


def test_smallcnn_cost() -> None:
    # Hand count: 112^2*16*27 + 56^2*32*144 + 28^2*64*288 + 28^2*64*576 + 14^2*128*576
    # + 14^2*128*1152 multiply-adds.
    expected = (112**2 * 16 * 27 + 56**2 * 32 * 144 + 28**2 * 64 * 288 + 28**2 * 64 * 576
                + 14**2 * 128 * 576 + 14**2 * 128 * 1152)
    assert count_macs(build_backbone("smallcnn"), 224) == expected


def test_torchvision_key_names() -> None:
    keys = build_backbone("resnet50").state_dict()
    shapes = {k: tuple(v.shape) for k, v in keys.items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer1.0.downsample.1.running_var"] == (256,)
    assert shapes["layer3.5.conv2.weight"] == (256, 256, 3, 3)  # v1.5: stride on the 3x3
    assert shapes["layer4.2.bn3.weight"] == (2048,)
    assert not any(k.startswith("fc.") for k in keys)
    assert len(keys) == 320 - 2  # torchvision's resnet50 state dict, without fc.weight/bias
    assert len(build_backbone("resnet18").state_dict()) == 122 - 2


def test_resize_to_input_px() -> None:
    enc = load_encoder("smallcnn", input_px=64, precision="fp32")
    big = _random_patches(2, 128)
    assert enc.embed(big).shape == (2, 128)
    x = preprocess(big, enc.spec)
    assert tuple(x.shape) == (2, 3, 64, 64)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_preprocess_normalises_like_torchvision() -> None:
    spec = load_encoder("smallcnn").spec
    batch = _random_patches(2, 224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    expected = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(preprocess(batch, spec), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- determinism and spec


def test_same_seed_same_embeddings_and_global_rng_untouched() -> None:
    batch = _random_patches(4, 224)
    state = torch.get_rng_state()
    a = load_encoder("smallcnn", seed=7, precision="fp32")
    b = load_encoder("smallcnn", seed=7, precision="fp32")
    c = load_encoder("smallcnn", seed=8, precision="fp32")
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a.embed(batch), b.embed(batch))
    assert not np.allclose(a.embed(batch), c.embed(batch))
    assert a.spec.key == b.spec.key != c.spec.key
    assert a.spec.init_sha256 == b.spec.init_sha256 != c.spec.init_sha256


def test_resnet_seed_determinism() -> None:
    batch = _random_patches(2, SMALL_PX)
    a, b = (load_encoder("resnet18", seed=3, input_px=SMALL_PX, precision="fp32")
            for _ in range(2))
    np.testing.assert_array_equal(a.embed(batch), b.embed(batch))
    c = load_encoder("resnet18", seed=4, input_px=SMALL_PX, precision="fp32")
    assert not np.allclose(a.embed(batch), c.embed(batch))


def test_spec_key_tracks_what_changes_features(tmp_path: Path) -> None:
    base = load_encoder("smallcnn", precision="fp32").spec
    assert base.key.startswith("smallcnn-") and len(base.key) == len("smallcnn-") + 12
    assert load_encoder("smallcnn", precision="fp32").spec.key == base.key
    for other in (
        load_encoder("smallcnn", seed=1, precision="fp32").spec,
        load_encoder("smallcnn", input_px=192, precision="fp32").spec,
        load_encoder("smallcnn", precision="bf16").spec,
        load_encoder("smallcnn", precision="fp32", mean=(0.5, 0.5, 0.5)).spec,
    ):
        assert other.key != base.key
    # The weights file's place is not part of the key; its content is.
    module = build_backbone("smallcnn", seed=5)
    torch.save(module.state_dict(), tmp_path / "a.pth")
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "a.pth", tmp_path / "moved" / "b.pth")
    a = load_encoder("smallcnn", tmp_path / "a.pth", precision="fp32").spec
    b = load_encoder("smallcnn", tmp_path / "moved" / "b.pth", precision="fp32").spec
    assert a.weights != b.weights and a.key == b.key
    assert a.seed is None and a.weights_sha256 is not None


def test_spec_dict_round_trip() -> None:
    spec = load_encoder("resnet18", input_px=SMALL_PX).spec
    data = spec.to_dict()
    assert is_plain_json(data)
    assert EncoderSpec.from_dict(data) == spec
    assert EncoderSpec.from_dict(data).key == spec.key
    with pytest.raises(InputError, match="unknown encoder setting"):
        EncoderSpec.from_dict({**data, "colour": "blue"})
    with pytest.raises(InputError, match="unknown encoder 'vgg16'"):
        EncoderSpec.from_dict({**data, "name": "vgg16"})


def test_precision_auto_follows_the_cpu() -> None:
    assert load_encoder("smallcnn").spec.precision == ("bf16" if bf16_supported() else "fp32")
    enc = load_encoder("smallcnn", precision="fp32")
    twin = enc.with_precision("bf16")
    assert twin.module is enc.module and twin.spec.precision == "bf16"
    assert enc.spec.precision == "fp32"


def test_encoder_from_spec_rebuilds_exactly(tmp_path: Path) -> None:
    batch = _random_patches(2, 224)
    seeded = load_encoder("smallcnn", seed=11, precision="fp32")
    again = encoder_from_spec(seeded.spec.to_dict())
    assert again.spec == seeded.spec
    np.testing.assert_array_equal(again.embed(batch), seeded.embed(batch))

    path = tmp_path / "w.pth"
    torch.save(build_backbone("smallcnn", seed=2).state_dict(), path)
    from_file = load_encoder("smallcnn", path, precision="fp32")
    moved = tmp_path / "moved.pth"
    path.rename(moved)
    with pytest.raises(InputError, match="no such weights file"):
        encoder_from_spec(from_file.spec)
    rebuilt = encoder_from_spec(from_file.spec, weights=moved)
    assert rebuilt.spec.key == from_file.spec.key
    np.testing.assert_array_equal(rebuilt.embed(batch), from_file.embed(batch))
    torch.save(build_backbone("smallcnn", seed=3).state_dict(), moved)
    with pytest.raises(InputError, match="moved.pth: SHA-256 .* not the same weights"):
        encoder_from_spec(from_file.spec, weights=moved)


# --------------------------------------------------------------------------- weights files


def test_torchvision_state_dict_with_prefix_and_wrapper_loads(tmp_path: Path) -> None:
    source = build_backbone("resnet18", seed=1).eval()
    state = source.state_dict()
    # What torchvision saves: the classifier too.
    head = {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save({f"module.{k}": v for k, v in {**state, **head}.items()}, tmp_path / "dp.pth")
    torch.save({"state_dict": {**state, **head}, "epoch": 3}, tmp_path / "wrapped.pt")
    # Old files lack the batch norm counters.
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
               tmp_path / "old.pth")
    batch = _random_patches(2, SMALL_PX)
    reference = load_encoder("resnet18", seed=1, input_px=SMALL_PX, precision="fp32").embed(batch)
    for name in ("dp.pth", "wrapped.pt", "old.pth"):
        enc = load_encoder("resnet18", tmp_path / name, input_px=SMALL_PX, precision="fp32")
        np.testing.assert_array_equal(enc.embed(batch), reference)
        assert enc.spec.weights_sha256 is not None and enc.spec.seed is None


def test_wrong_keys_raise_naming_file_and_keys(tmp_path: Path) -> None:
    torch.save(build_backbone("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(InputError) as info:
        load_encoder("resnet18", tmp_path / "r34.pth")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("r34.pth: weights do not fit resnet18: unexpected keys layer1.2.")
    assert "(+" in message  # more keys than are quoted

    torch.save(build_backbone("smallcnn").state_dict(), tmp_path / "small.pth")
    with pytest.raises(InputError, match=r"small\.pth: .*missing keys conv1\.weight, bn1\.weight"):
        load_encoder("resnet18", tmp_path / "small.pth")

    state = build_backbone("resnet18").state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(InputError, match=r"shape\.pth: .*layer2\.0\.conv1\.weight has shape "
                                         r"\(128, 64, 5, 5\) in the file, \(128, 64, 3, 3\)"):
        load_encoder("resnet18", tmp_path / "shape.pth")


@pytest.mark.parametrize(("content", "pattern"), [
    (b"not a checkpoint", "garbage.pth: not a readable PyTorch weights file"),
    (None, "garbage.pth: not a state dict: entries lr"),
])
def test_unreadable_weights_files(tmp_path: Path, content: bytes | None, pattern: str) -> None:
    path = tmp_path / "garbage.pth"
    if content is None:
        torch.save({"lr": 0.1, "conv1.weight": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=pattern):
        load_encoder("resnet18", path)


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="unknown encoder 'vit'"):
        load_encoder("vit")
    with pytest.raises(InputError, match="no such weights file"):
        load_encoder("resnet18", "/nonexistent/weights.pth")
    with pytest.raises(InputError, match="'torchscript' needs a weights file"):
        load_encoder("torchscript")
    with pytest.raises(InputError, match="input_px=16"):
        load_encoder("smallcnn", input_px=16)
    with pytest.raises(InputError, match="precision='half'"):
        load_encoder("smallcnn", precision="half")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="seed=-1"):
        load_encoder("smallcnn", seed=-1)
    enc = load_encoder("smallcnn")
    with pytest.raises(InputError, match=r"uint8 patches \[B, H, W, 3\], got a float32"):
        enc.embed(np.zeros((1, 224, 224, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"shape \(224, 224, 3\)"):
        enc.embed(np.zeros((224, 224, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_module_gives_the_same_embeddings(tmp_path: Path) -> None:
    native = load_encoder("smallcnn", seed=4, precision="fp32")
    path = tmp_path / "smallcnn.pt"
    _save_torchscript(native.module, 224, path)
    scripted = load_encoder("torchscript", path, precision="fp32")
    assert scripted.spec.embed_dim == 128 and scripted.spec.torchscript
    batch = _random_patches(5, 224)  # another batch size than traced
    np.testing.assert_allclose(scripted.embed(batch), native.embed(batch), rtol=1e-4, atol=1e-5)
    if bf16_supported():
        fast = scripted.with_precision("bf16").embed(batch)
        assert _cosine(fast, native.embed(batch)).min() >= 0.99
    with pytest.raises(InputError, match="smallcnn.pt: not a readable PyTorch weights file.*"
                                         "'torchscript'"):
        load_encoder("smallcnn", path)


def test_torchscript_that_is_not_an_encoder(tmp_path: Path) -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    path = tmp_path / "conv.pt"
    _save_torchscript(conv, 32, path)
    with pytest.raises(InputError,
                       match=r"conv\.pt: .*maps \[1, 3, 224, 224\] to \(1, 4, 222, 222\)"):
        load_encoder("torchscript", path)
    torch.save(conv.state_dict(), tmp_path / "state.pt")
    with pytest.raises(InputError, match="state.pt: not a readable TorchScript file"):
        load_encoder("torchscript", tmp_path / "state.pt")


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("name", ["smallcnn", "resnet50"])
def test_fast_path_equals_plain_module_in_fp32(name: str) -> None:
    px = 224 if name == "smallcnn" else SMALL_PX
    enc = load_encoder(name, seed=2, input_px=px, precision="fp32")
    batch = _random_patches(3, px)
    with torch.no_grad():
        plain = enc.module(preprocess(batch, enc.spec).contiguous()).numpy()
    np.testing.assert_allclose(enc.embed(batch), plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    fast = enc.fast_module()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.module.modules())


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_bf16_embeddings_agree_with_fp32(name: str, smear_patches: np.ndarray) -> None:
    fp32 = load_encoder(name, seed=0, precision="fp32")
    bf16 = fp32.with_precision("bf16")
    exact, fast = fp32.embed(smear_patches), bf16.embed(smear_patches)
    cosine = _cosine(exact, fast)
    assert cosine.min() >= 0.99, f"bf16 vs fp32 cosine similarity {cosine.min():.5f}"
    # Raw embeddings share a large common part (ReLU then average pool), which
    # flatters the cosine: the differences between patches must survive too.
    centre = exact.mean(axis=0)
    assert _cosine(exact - centre, fast - centre).min() >= 0.95
    pairs = np.triu_indices(len(exact), 1)
    d_exact = np.linalg.norm(exact[:, None] - exact[None], axis=2)[pairs]
    d_fast = np.linalg.norm(fast[:, None] - fast[None], axis=2)[pairs]
    assert np.corrcoef(d_exact, d_fast)[0, 1] >= 0.999
    # bf16 keeps 8 significant bits: relative errors of about 1 %, not more.
    assert np.abs(fast - exact).max() <= 0.05 * np.abs(exact).max()


def test_batch_size_does_not_change_results() -> None:
    batch = _random_patches(7, 224)
    enc = load_encoder("smallcnn", precision="fp32")
    chunked = Encoder(enc.module, enc.spec, batch_size=3)
    np.testing.assert_allclose(chunked.embed(batch), enc.embed(batch), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="batch_size=0"):
        Encoder(enc.module, enc.spec, batch_size=0)


def test_available_cores() -> None:
    assert 1 <= encoders.available_cores() <= len(os.sched_getaffinity(0))


def test_all_names_are_known() -> None:
    assert set(ENCODER_NAMES) == {*ARCHITECTURES, "torchscript", "export"}


# --------------------------------------------------------------------------- extract


def test_extract_keeps_order_and_matches_embed() -> None:
    enc = load_encoder("smallcnn", input_px=64, precision="fp32")
    batches = [_random_patches(n, 64, seed=n) for n in (3, 1, 4, 2)]
    out = list(extract(enc, iter(batches)))
    assert [o.shape[0] for o in out] == [3, 1, 4, 2]
    for o, b in zip(out, batches, strict=True):
        np.testing.assert_array_equal(o, enc.embed(b))


def test_extract_reads_ahead_but_bounded() -> None:
    enc = load_encoder("smallcnn", input_px=64, precision="fp32")
    pulled: list[int] = []

    def source() -> Iterator[np.ndarray]:
        for i in range(20):
            pulled.append(i)
            yield _random_patches(2, 64)

    results = extract(enc, source(), prefetch=2)
    next(results)
    time.sleep(0.3)  # let the reader run as far ahead as it may
    # one batch embedded, two waiting in the queue, one in the reader's hand
    assert 2 <= len(pulled) <= 1 + 2 + 1
    results.close()


def test_extract_propagates_reader_errors_and_stops_on_close() -> None:
    enc = load_encoder("smallcnn", input_px=64, precision="fp32")

    def failing() -> Iterator[np.ndarray]:
        yield _random_patches(1, 64)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(extract(enc, failing()))

    closed = threading.Event()

    def endless() -> Iterator[np.ndarray]:
        try:
            while True:
                yield _random_patches(1, 64)
        finally:
            closed.set()

    results = extract(enc, endless())
    next(results)
    results.close()
    assert closed.wait(5.0), "the reader did not close its source"
    assert not any(t.name == "cmil-extract-reader" for t in threading.enumerate())
    with pytest.raises(InputError, match="prefetch=0"):
        next(extract(enc, [], prefetch=0))


# --------------------------------------------------------------------------- safetensors and torch.export


def test_safetensors_state_dict_gives_the_same_encoder_as_a_torch_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = build_backbone("smallcnn", seed=3).state_dict()
    torch_file, st_file = tmp_path / "w.pt", tmp_path / "w.weights"  # named freely: sniffed
    torch.save(state, torch_file)
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(st_file))
    a = load_encoder("smallcnn", torch_file, precision="fp32", input_px=64)
    b = load_encoder("smallcnn", st_file, precision="fp32", input_px=64)
    batch = _random_patches(4, 64)
    np.testing.assert_array_equal(a.embed(batch), b.embed(batch))
    assert b.spec.weights_sha256 == encoders.file_sha256(st_file) != a.spec.weights_sha256
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="other.safetensors: weights do not fit smallcnn: "
                                         "missing keys blocks"):
        load_encoder("smallcnn", tmp_path / "other.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(st_file.read_bytes()[:200])
    with pytest.raises(InputError, match="broken.safetensors: not a readable safetensors file"):
        load_encoder("smallcnn", broken)


class _TinyFoundationModel(torch.nn.Module):
    """A stand-in for a user's exported model: conv, pool, linear projection to 24-d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_torch_export_program_with_the_users_preprocessing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _TinyFoundationModel().eval()
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.zeros(2, 3, 48, 48),),
                                  dynamic_shapes=({0: batch_dim},))
    path = tmp_path / "foundation.pt2"
    torch.export.save(program, path)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    enc = load_encoder("export", path, input_px=48, mean=mean, std=std, precision="fp32")
    assert enc.spec.name == "export" and enc.spec.embed_dim == 24 and enc.spec.input_px == 48
    assert enc.spec.mean == mean and enc.spec.weights_sha256 == encoders.file_sha256(path)
    patches = _random_patches(5, 64)  # resized to 48 px like any encoder's input
    expected = net(encoders.preprocess(patches, enc.spec)).detach().numpy()
    np.testing.assert_allclose(enc.embed(patches), expected, rtol=1e-5, atol=1e-5)
    again = encoders.encoder_from_spec(enc.spec.to_dict())  # as score rebuilds it
    assert again.spec.key == enc.spec.key
    other = load_encoder("export", path, input_px=48, precision="fp32")  # ImageNet's mean
    assert other.spec.key != enc.spec.key


def test_torch_export_program_refusals(tmp_path: Path) -> None:
    net = _TinyFoundationModel().eval()
    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, 48, 48),)), static)
    with pytest.raises(InputError, match=r"static.pt2: the torch.export program fails on a "
                                         r"\[2, 3, 48, 48\] input .*dynamic batch dimension"):
        load_encoder("export", static, input_px=48)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(InputError, match="junk.pt2: not a readable torch.export program"):
        load_encoder("export", junk)
    with pytest.raises(InputError, match="encoder 'export' needs a weights file"):
        load_encoder("export")
