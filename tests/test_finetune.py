"""cmil_core.model.finetune (and finetune_config, patch_data, cnn_training): the weakly supervised patch CNN learns shape from patient labels, leak-free."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cmil_core.analysis.roc import roc_auc
from cmil_core.errors import InputError
from cmil_core.model import encoders, finetune, mil
from cmil_core.model.backbones import build_backbone
from cmil_core.model.cnn_training import TrainedCNN, train_cnn
from cmil_core.model.finetune_config import FinetuneConfig
from cmil_core.model.patch_data import PatchSet, augment_batch, class_balanced_draws

_BACKGROUND = np.array([232.0, 214.0, 220.0])  # pale pink smear background
_INK = np.array([90.0, 60.0, 140.0])  # dark purple nuclei


def planted_bags(n_patients: int, *, patches: int = 12, witnesses: int = 4, px: int = 32,
                 seed: int = 0) -> PatchSet:
    """Bags of tiny patches: three dark objects each; positives hide rings among discs.

    Every patch holds three objects of one colour. In a negative patient all
    are filled discs of radius 4 (area 16 pi); in the first ``witnesses``
    patches of a positive patient one of them is a ring of radii 3 and 5
    (area 25 pi - 9 pi = 16 pi): the same amount of the same ink, so mean
    colour and darkness carry no signal, only shape does. Patients alternate
    negative, positive.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64)
    pixels, owner = [], []
    labels = np.arange(n_patients) % 2
    for p in range(n_patients):
        for j in range(patches):
            img = np.tile(_BACKGROUND, (px, px, 1)) + rng.normal(0, 4, (px, px, 3))
            for k in range(3):
                cx, cy = rng.uniform(7, px - 7, 2)
                d = np.hypot(xx - cx, yy - cy)
                ring = labels[p] == 1 and j < witnesses and k == 0
                img[(d <= 5.0) & (d >= 3.0) if ring else d <= 4.0] = _INK + rng.normal(0, 4, 3)
            pixels.append(np.clip(img, 0, 255).astype(np.uint8))
            owner.append(p)
    return PatchSet(np.stack(pixels), np.array(owner), np.arange(len(owner)),
                    [f"P{p:02d}" for p in range(n_patients)], labels)


def tiny(**overrides: Any) -> FinetuneConfig:
    """A CNN run of a second or two on two cores."""
    base: dict[str, Any] = dict(input_px=32, batch_size=32, patches_per_epoch=64, max_epochs=2,
                                patience=10, prefetch=1, device="cpu")
    return FinetuneConfig(**{**base, **overrides})


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- settings and data


@pytest.mark.parametrize(("setting", "message"), [
    ({"input_px": 16}, r"input_px=16 must lie in \[32, 1024\]"),
    ({"lr": 0.0}, r"lr=0.0 must lie in"),
    ({"pooling": "median"}, r"pooling='median' must be one of max, mean"),
    ({"architecture": "vgg"}, r"architecture='vgg' must be one of resnet18, .*smallcnn"),
    ({"max_epochs": 2.5}, r"max_epochs=2.5 must be an integer"),
    ({"std": (0.2, 0.0, 0.2)}, r"std=.* must be three finite numbers above 0"),
    ({"augment": "maybe"}, r"augment='maybe' must be true or false"),
])
def test_bad_settings_are_refused_in_one_line(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        FinetuneConfig(**setting)
    assert "\n" not in str(info.value)


def test_settings_from_the_command_line() -> None:
    config = FinetuneConfig.from_params({"max_epochs": 3, "pooling": "mean"}, input_px=64)
    assert (config.max_epochs, config.pooling, config.input_px) == (3, "mean", 64)
    assert FinetuneConfig.from_params(config.to_dict()) == config  # a saved config reloads
    with pytest.raises(InputError, match="unknown CNN training setting 'epochs'"):
        FinetuneConfig.from_params({"epochs": 3})


def test_class_balanced_sampling_weighs_classes_and_patients_equally() -> None:
    # class 0: patients of 2 and 6 patches; class 1: one patient of 12; patient 3 has no row
    owner = np.array([0] * 2 + [1] * 6 + [2] * 12)
    labels = np.array([0, 0, 1, 1])
    rows = class_balanced_draws(owner, labels, 40_000, np.random.default_rng(0))
    share = np.bincount(owner[rows], minlength=4) / rows.size
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5, 0.0], atol=0.01)
    per_patch = np.bincount(rows, minlength=owner.size) / rows.size
    np.testing.assert_allclose(per_patch[:2], 0.125, atol=0.01)  # 1 / (2 * 2 patients * 2)


def test_a_subset_holds_only_its_patients_pixels() -> None:
    data = planted_bags(6, patches=3)
    part = data.subset([4, 1])
    assert part.patient_ids == ["P04", "P01"] and part.labels.tolist() == [0, 1]
    assert len(part) == 6 and set(part.patch_ids.tolist()) == {3, 4, 5, 12, 13, 14}
    np.testing.assert_array_equal(part.pixels[part.rows_of(0)], data.pixels[data.rows_of(4)])


# --------------------------------------------------------------------------- augmentation


def test_augmentation_off_is_plain_normalisation() -> None:
    data = planted_bags(2, patches=4)
    config = tiny(augment=False)
    x = augment_batch(torch.from_numpy(data.pixels), config, torch.Generator())
    assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    spec = encoders.EncoderSpec(name="smallcnn", embed_dim=128, input_px=32, seed=0)
    torch.testing.assert_close(x, encoders.preprocess(data.pixels, spec), rtol=1e-5, atol=1e-5)


def test_augmentation_with_zero_strength_only_turns_and_flips() -> None:
    data = planted_bags(2, patches=8)
    config = tiny(stain_sigma=0.0, stain_bias=0.0, stain_vector_sigma=0.0, brightness=0.0,
                  contrast=0.0, saturation=0.0, blur_probability=0.0)
    off = augment_batch(torch.from_numpy(data.pixels), tiny(augment=False),
                                 torch.Generator())
    on = augment_batch(torch.from_numpy(data.pixels), config,
                                torch.Generator().manual_seed(3))
    # the same pixels, moved: each patch's sorted values are unchanged (the optical
    # density round trip is exact to float rounding)
    a = torch.sort(off.reshape(16, -1), dim=1).values
    b = torch.sort(on.reshape(16, -1), dim=1).values
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(off, on)  # and at least one patch did move


def test_augmentation_changes_colour_and_is_seeded() -> None:
    data = planted_bags(2, patches=8)
    batch = torch.from_numpy(data.pixels)
    first = augment_batch(batch, tiny(), torch.Generator().manual_seed(1))
    again = augment_batch(batch, tiny(), torch.Generator().manual_seed(1))
    other = augment_batch(batch, tiny(), torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    plain = augment_batch(batch, tiny(augment=False), torch.Generator())
    colour_shift = (first.mean(dim=(2, 3)) - plain.mean(dim=(2, 3))).abs().mean()
    assert 0.01 < float(colour_shift) < 0.5 and not torch.equal(first, other)
    with pytest.raises(InputError, match="augment_batch takes uint8"):
        augment_batch(batch.float(), tiny(), torch.Generator())


# --------------------------------------------------------------------------- training


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    data = planted_bags(8, patches=4)
    a = train_cnn(data, tiny(), seed=5)
    b = train_cnn(data, tiny(), seed=5)
    c = train_cnn(data, tiny(), seed=6)
    assert _same_state(a.model, b.model)
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in
                         enumerate(b.history)]
    assert not _same_state(a.model, c.model)
    assert len(a.history) == 2 and a.val_auc is not None and 1 <= a.best_epoch <= 2
    assert set(a.trained_patients).isdisjoint(a.validation_patients)
    assert len(a.validation_patients) == 2  # a quarter of each class, at least one


class _Killed(Exception):
    pass


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    data = planted_bags(8, patches=4)
    config = tiny(max_epochs=3)
    whole = train_cnn(data, config, seed=2, checkpoint=tmp_path / "whole.ckpt")

    def kill_after_epoch_2(done: int, total: int, message: str) -> None:
        if done == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train_cnn(data, config, seed=2, checkpoint=tmp_path / "cut.ckpt",
                           progress=kill_after_epoch_2)
    resumed = train_cnn(data, config, seed=2, checkpoint=tmp_path / "cut.ckpt")
    assert resumed.resumed_from == 2 and len(resumed.history) == 3
    assert _same_state(whole.model, resumed.model)
    assert resumed.best_epoch == whole.best_epoch
    # a finished checkpoint returns at once; one of other inputs is not used
    again = train_cnn(data, config, seed=2, checkpoint=tmp_path / "cut.ckpt")
    assert again.resumed_from == 3 and _same_state(whole.model, again.model)
    fresh = train_cnn(data, config, seed=9, checkpoint=tmp_path / "cut.ckpt")
    assert fresh.resumed_from == 0
    assert not list(tmp_path.glob(".*partial"))  # every write was atomic and finished


def test_a_weights_file_is_the_starting_point(tmp_path: Path) -> None:
    start = build_backbone("smallcnn", seed=42)
    path = tmp_path / "start.pt"
    torch.save(start.state_dict(), path)
    data = planted_bags(8, patches=4)
    trained = train_cnn(data, tiny(max_epochs=1, lr=1e-7), seed=0, weights=path)
    # a learning rate of 1e-7 barely moves the weights: they are the file's, not seed 0's
    w = trained.backbone.state_dict()["blocks.0.conv.weight"]
    torch.testing.assert_close(w, start.state_dict()["blocks.0.conv.weight"], atol=1e-4, rtol=0)
    assert trained.summary()["started_from"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError, match="weights do not fit smallcnn"):
        torch.save(build_backbone("resnet18").state_dict(), tmp_path / "r18.pt")
        train_cnn(data, tiny(), weights=tmp_path / "r18.pt")


def test_training_needs_both_classes_and_matching_pixels() -> None:
    data = planted_bags(4, patches=2)
    with pytest.raises(InputError, match="needs patients of both classes"):
        train_cnn(data.subset([0, 2]), tiny())
    with pytest.raises(InputError, match="patches of 32 px but input_px=64"):
        train_cnn(data, tiny(input_px=64))


def test_the_saved_backbone_is_an_ordinary_encoder_file(tmp_path: Path) -> None:
    data = planted_bags(8, patches=4)
    trained = train_cnn(data, tiny(max_epochs=1), seed=0)
    path, sha = finetune.save_backbone(trained.backbone, tmp_path)
    assert path.name == f"encoder-{sha[:12]}.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    loaded = encoders.load_encoder("smallcnn", path, input_px=32, precision="fp32")
    in_memory = finetune.trained_encoder(trained.backbone, tiny(max_epochs=1, precision="fp32"))
    assert loaded.spec.weights_sha256 == sha
    np.testing.assert_allclose(loaded.embed(data.pixels[:6]), in_memory.embed(data.pixels[:6]),
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- cross-validation


def test_no_fold_trains_on_its_held_out_patients(monkeypatch: pytest.MonkeyPatch) -> None:
    data = planted_bags(12, patches=3)
    given: list[list[str]] = []
    # cross_validate looks train_cnn up in cmil_core.model.finetune: the spy goes there
    original = finetune.train_cnn

    def spy(subset: PatchSet, *args: Any, **kwargs: Any) -> TrainedCNN:
        given.append(list(subset.patient_ids))
        assert set(subset.patch_ids.tolist()) == {  # the pixels it holds are its patients' only
            int(i) for i, o in zip(data.patch_ids, data.owner, strict=True)
            if data.patient_ids[o] in subset.patient_ids}
        return original(subset, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_cnn", spy)
    params = {"max_epochs": 2, "crossfit_folds": 0, "patches_per_epoch": 64}
    cv, cnns = finetune.cross_validate(data, "histogram", k=3, seed=0, config=tiny(max_epochs=1),
                                       params=params)
    assert cv.k == 3 and len(given) == 3 and len(cnns) == 3
    held_out = [[data.patient_ids[i] for i in fold] for fold in cv.folds]
    all_held_out = [p for fold in held_out for p in fold]
    assert sorted(all_held_out) == sorted(data.patient_ids)  # each held out exactly once
    for trained_on, test, cnn in zip(given, held_out, cnns, strict=True):
        assert set(trained_on).isdisjoint(test)
        assert set(trained_on) | set(test) == set(data.patient_ids)
        assert set(cnn.trained_patients + cnn.validation_patients) == set(trained_on)
    assert np.isfinite(cv.oof_scores).all() and 0.0 <= cv.auc <= 1.0
    # the same folds as the frozen baseline's cross-validation of the same patients
    bags = [np.zeros((1, 2), np.float32) + i for i in range(12)]
    frozen = mil.cross_validate("histogram", bags, data.labels.tolist(), k=3, seed=0,
                                params=params)
    assert frozen.folds == cv.folds


@pytest.mark.slow
def test_learns_a_planted_shape_where_frozen_random_features_fail() -> None:
    """Rings among discs of equal ink: trained CNN finds them from patient labels only."""
    train, test = planted_bags(24, seed=0), planted_bags(24, seed=1)
    config = FinetuneConfig(input_px=32, patches_per_epoch=1024, max_epochs=8, patience=8,
                            lr=3e-3, device="cpu")
    cnn = train_cnn(train, config, seed=0)
    trained = finetune.trained_encoder(cnn.backbone, config)
    frozen = encoders.load_encoder("smallcnn", seed=0, input_px=32)
    aucs = {}
    for name, encoder in (("trained", trained), ("frozen", frozen)):
        bags = [encoder.embed(train.pixels[train.rows_of(i)]) for i in range(24)]
        model = mil.make_aggregator("histogram").fit(bags, train.labels, seed=0)
        held_out = [encoder.embed(test.pixels[test.rows_of(i)]) for i in range(24)]
        aucs[name] = roc_auc(test.labels, [p.score for p in model.predict(held_out)])
    # patient score = the CNN's highest patch probability (MIL's max pooling)
    with torch.inference_mode():
        q = torch.sigmoid(cnn.model(augment_batch(
            torch.from_numpy(test.pixels), FinetuneConfig(augment=False, input_px=32),
            torch.Generator()))).numpy()
    aucs["cnn max"] = roc_auc(test.labels, [q[test.owner == i].max() for i in range(24)])
    # measured (seed 0, two AVX2 cores): cnn max 0.90, trained 0.85, frozen 0.46
    assert aucs["cnn max"] >= 0.8, aucs
    assert aucs["trained"] >= 0.75, aucs
    assert aucs["frozen"] <= 0.65, aucs
    assert aucs["trained"] - aucs["frozen"] >= 0.25, aucs
    assert json.dumps(cnn.summary())  # the record a model's config keeps is plain JSON


# --------------------------------------------------------------------------- train and score


@pytest.mark.slow
def test_train_finetune_saves_the_cnn_and_score_uses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`train --encoder-training finetune` on the small demo, then `score` through feature files."""
    from cmil_core import store
    from cmil_core.cli import main
    from cmil_core.demo.generator import generate_demo
    from cmil_core.model import modeling

    db = tmp_path / "cmil.duckdb"
    generate_demo(db, size="small", seed=1)
    cnn = ["--cnn-param", "input_px=32", "--cnn-param", "max_epochs=1",
           "--cnn-param", "patches_per_epoch=128", "--cnn-param", "patches_per_patient=8"]
    assert main(["train", "--db", str(db), "--cohort", "training", "--aggregator", "histogram",
                 "--encoder-training", "finetune", "--folds", "2", *cnn,
                 "--param", "max_epochs=2", "--param", "crossfit_folds=0"]) == 0
    printed = capsys.readouterr()
    model_id = printed.out.strip().splitlines()[-1]  # the contract: last line
    assert "patch CNN: finetune" in printed.err  # asked for: trained even below the auto rule
    with store.open_store(db, read_only=True) as st:
        row = store.get_model(st, model_id)
    assert row is not None and row.metrics["encoder_training"] == "finetune"
    assert "encoder_training_note" not in row.metrics
    folder = modeling.artifact_dir(db, model_id)
    config = json.loads((folder / "config.json").read_text())
    weights = folder / Path(config["encoder"]["weights"]).name
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.name == f"encoder-{sha[:12]}.pt" and config["encoder"]["weights_sha256"] == sha
    assert config["encoder_training"] == "finetune" and config["encoder"]["input_px"] == 32
    tuned = config["finetune"]
    assert len(tuned["folds"]) == config["cv"]["k"] == 2
    for fold, held_out in zip(tuned["folds"], config["cv"]["folds"], strict=True):
        assert set(fold["trained_patients"]).isdisjoint(held_out)  # no fold saw its test
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    # scoring another cohort embeds it with the trained CNN (its own feature files)
    done = modeling.score(db, model_id, ["external_a"])
    assert done == {"external_a": 8}
    assert (tmp_path / "features" / config["encoder_key"]).is_dir()
    loaded = modeling.load_model(db, model_id)
    assert loaded.encoder.spec.weights_sha256 == sha


# --------------------------------------------------------------------------- the final CNN and its feature files


def test_the_default_final_cnn_stops_early_as_a_fold_does() -> None:
    """The default: the final CNN keeps an inner patient split and stops on its AUC."""
    assert FinetuneConfig().final == "early_stopping"
    folds = [TrainedCNN(model=None, config=tiny(), history=[], best_epoch=2,  # type: ignore[arg-type]
                        val_auc=0.5, trained_patients=[], validation_patients=[])]
    assert finetune.final_cnn_config(tiny(max_epochs=9), folds) == tiny(max_epochs=9)


def test_the_final_cnn_trains_as_long_as_the_folds_found_best() -> None:
    """fold_median: median best epoch (rounded up), every patient trains, no validation split."""
    data = planted_bags(8, patches=4)
    folds = [TrainedCNN(model=None, config=tiny(), history=[], best_epoch=e,  # type: ignore[arg-type]
                                 val_auc=0.5, trained_patients=[], validation_patients=[])
             for e in (2, 5, 3, 4)]
    config = finetune.final_cnn_config(tiny(max_epochs=9, final="fold_median"), folds)
    assert (config.max_epochs, config.val_fraction) == (4, 0.0)  # median 3.5 -> 4
    assert finetune.final_cnn_config(tiny(max_epochs=9, final="early_stopping"), folds) == \
        tiny(max_epochs=9, final="early_stopping")
    final = train_cnn(data, finetune.final_cnn_config(tiny(final="fold_median"), folds[:1]),
                      seed=0)
    assert len(final.history) == 2 and final.validation_patients == []
    assert sorted(final.trained_patients) == sorted(data.patient_ids)


def test_feature_files_from_the_pixels_in_memory_are_the_ones_scoring_reads(
        tmp_path: Path) -> None:
    """Slides whose patches are all in memory get their feature file; slide_features reuses it."""
    import pandas as pd

    from cmil_core.model import features

    data = planted_bags(4, patches=3)  # patch ids 0..11, patient p owns 3p..3p+2
    encoder = encoders.load_encoder("smallcnn", input_px=32, seed=0)
    rows = [{"slide_id": 1 + pid // 3, "patch_id": pid, "x": 100 * pid, "y": 0, "size": 64,
             "path": f"/nowhere/S{1 + pid // 3}.tiff", "sha256": str(1 + pid // 3) * 64,
             "mpp": 0.5, "tiling_key": "t-demo"} for pid in range(12)]
    rows.append({**rows[-1], "patch_id": 99, "x": 5000})  # slide 4 has a patch not in memory
    table = pd.DataFrame(rows)
    assert finetune.write_feature_files(data, table, tmp_path, encoder) == 3
    for slide in (1, 2, 3):
        part = table[table["slide_id"] == slide]
        # the slide file does not exist: a reused feature file never opens it
        ff = features.slide_features(part["path"].iloc[0], part[["patch_id", "x", "y", "size"]],
                                     encoder, tmp_path, tiling_key="t-demo", mpp=0.5,
                                     slide_sha256=part["sha256"].iloc[0])
        expected = encoder.embed(data.pixels[part["patch_id"].to_numpy()]).astype(np.float16)
        np.testing.assert_array_equal(ff.features, expected)
    assert not features.feature_path(tmp_path, encoder.spec.key, "4" * 64, "t-demo").exists()
