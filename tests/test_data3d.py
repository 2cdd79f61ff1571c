"""MedMNIST 3D data: the six 3D flags, memory-mapped volumes and the 3D augmentation presets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from medmnist import INFO

from medvit.data import presets
from medvit.data.files import DataFileError
from medvit.data.medmnist import FLAGS_3D, MedMNISTDataModule
from medvit.data.presets import PRESETS_3D, preset_for_flag
from medvit.data.transforms import build_transforms
from medvit.data.transforms3d import MedTransform3D, resize_volume


def module(root: Path, flag: str, size: int = 28, **kwargs) -> MedMNISTDataModule:
    kwargs.setdefault("verify_md5", False)
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("global_batch_size", 4)
    kwargs.setdefault("cache_dir", str(root / "cache"))
    return MedMNISTDataModule(flag=flag, size=size, root=str(root), **kwargs)


def _volume(size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size,) * 3, dtype=np.uint8)


# ------------------------------------------------------------------------------ real files
@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    """One unpack cache for the module: the 64^3 file unpacks to 400 MB."""
    return tmp_path_factory.mktemp("cache3d")


@pytest.mark.parametrize("size", [28, 64])
def test_real_adrenalmnist3d(real_data, real_cache, size):
    dm = MedMNISTDataModule(
        flag="adrenalmnist3d",
        size=size,
        root=str(real_data),
        cache_dir=str(real_cache),
        num_workers=0,
        global_batch_size=4,
    )  # MD5 checked: these are the official files
    info = INFO["adrenalmnist3d"]
    assert dm.spatial_dims == 3 and dm.img_size == size and dm.in_chans == 1
    assert dm.task == "binary" and dm.class_names == ["normal", "hyperplasia"]
    assert dm.positive_index == 1  # hyperplasia, the finding
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    counts = {"train": len(dm.data_train), "val": len(dm.data_val), "test": len(dm.data_test)}
    assert counts == info["n_samples"]
    images = dm.data_train._array("train_images")
    assert isinstance(images, np.memmap)
    assert images.dtype == np.uint8 and images.shape == (counts["train"], size, size, size)
    assert len(pickle.dumps(dm.data_train)) < images.nbytes / 100  # workers get paths only
    labels = dm.data_test.labels()
    assert labels.shape == (counts["test"], 1) and set(np.unique(labels)) == {0, 1}
    assert dm.class_counts("train").sum() == counts["train"]
    # Evaluation: the volume scaled to [0, 1] and normalised with 0.5 / 0.5, nothing else.
    x, y, index = dm.data_test[3]
    raw = np.asarray(dm.data_test._array("test_images")[3], dtype=np.float32)
    assert x.shape == (1, size, size, size) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy((raw / 255 - 0.5) / 0.5), atol=1e-6)
    assert int(y) == int(labels[3, 0]) and index == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (4, 1, size, size, size)


# ------------------------------------------------------------------- every 3D flag (synthetic)
@pytest.mark.parametrize("flag", FLAGS_3D)
def test_every_3d_flag(synthetic_root, flag):
    root = synthetic_root(flag, n=(12, 6, 6))
    dm = module(root, flag)
    info = INFO[flag]
    assert dm.spatial_dims == 3
    assert len(dm.class_names) == len(info["label"]) and dm.in_chans == 1
    assert dm._preset() == preset_for_flag(flag) in PRESETS_3D
    dm.prepare_data()
    dm.setup("fit")
    image, target, _ = dm.data_train[(0, 1)]  # augmented (the sampler's (index, seed) key)
    assert image.shape == (1, 28, 28, 28) and torch.isfinite(image).all()
    assert 0 <= int(target) < len(info["label"])


def test_3d_at_64_and_three_channels(synthetic_root):
    root = synthetic_root("organmnist3d", 64, n=(11, 4, 4))
    dm = module(root, "organmnist3d", 64, in_chans=3, img_size=32)
    dm.prepare_data()
    dm.setup("fit")
    x, _, _ = dm.data_val[0]
    assert x.shape == (3, 32, 32, 32) and torch.equal(x[0], x[2])
    # A 2D file for a 3D flag is refused before training, naming the key.
    bad = synthetic_root("breastmnist", n=(6, 4, 4))
    (bad / "breastmnist.npz").rename(bad / "nodulemnist3d.npz")
    with pytest.raises(DataFileError, match=r"'train_images' has shape \(6, 28, 28\).*28, 28, 28"):
        module(bad, "nodulemnist3d").prepare_data()


def test_3d_sizes_and_device_augmentation_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"size must be one of \(28, 64\) for vesselmnist3d"):
        MedMNISTDataModule(flag="vesselmnist3d", size=224, root=str(tmp_path))
    with pytest.raises(ValueError, match="augment_on='device'.*--data.augment_on workers"):
        MedMNISTDataModule(flag="vesselmnist3d", root=str(tmp_path), augment_on="device")
    assert MedMNISTDataModule(flag="breastmnist", root=str(tmp_path)).spatial_dims == 2


def test_same_seed_same_batches_with_workers(synthetic_root, monkeypatch):
    root = synthetic_root("adrenalmnist3d", n=(16, 4, 4))
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")

    def first_batch(workers: int) -> torch.Tensor:
        dm = module(root, "adrenalmnist3d", num_workers=workers)
        dm.prepare_data()
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[0]

    a, b = first_batch(0), first_batch(1)
    # The sampler's per-sample seeds decide the augmentation, whatever the worker count.
    assert a.shape == (4, 1, 28, 28, 28) and torch.equal(a, b)
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    assert not torch.equal(a, first_batch(0))


# ------------------------------------------------------------------------------- presets
def test_every_3d_flag_has_its_own_preset_in_the_one_table():
    assert {preset_for_flag(f) for f in FLAGS_3D} == set(PRESETS_3D)
    assert set(PRESETS_3D) <= set(presets.PRESET_OPS)
    for preset in PRESETS_3D:
        specs = presets.PRESET_OPS[preset]
        assert specs and all(s.lib == "monai" for s in specs), preset
        names = {s.cls.__name__ for s in specs}
        assert {"RandAffine", "RandGaussianNoise", "RandScaleIntensity"} <= names, preset
        assert {"RandShiftIntensity", "RandAdjustContrast"} <= names, preset


def test_flips_only_on_allowed_axes():
    def flip_axes(preset: str) -> set[int]:
        return {
            s.kwargs["spatial_axis"]
            for s in presets.PRESET_OPS[preset]
            if s.cls.__name__ == "RandFlip"
        }

    assert flip_axes("organ3d") == set()  # left/right organ classes
    assert flip_axes("adrenal3d") == flip_axes("fracture3d") == {2}  # left-right only
    assert flip_axes("nodule3d") == flip_axes("vessel3d") == {0, 1, 2}
    elastic = {
        p
        for p in PRESETS_3D
        if any(s.cls.__name__ == "Rand3DElastic" for s in presets.PRESET_OPS[p])
    }
    assert elastic == {"adrenal3d", "vessel3d"}  # the shape sets


@pytest.mark.parametrize("preset", PRESETS_3D)
def test_3d_preset_is_seeded_and_augments(preset):
    vol = _volume(seed=1)
    t = build_transforms(preset, 28, train=True, seed=3)
    assert isinstance(t, MedTransform3D)
    outs = [t(vol) for _ in range(6)]
    again = build_transforms(preset, 28, train=True, seed=3)
    assert all(torch.equal(o, again(vol)) for o in outs)  # same seed, same stream
    assert all(o.shape == (1, 28, 28, 28) and o.min() >= -1 and o.max() <= 1 for o in outs)
    plain = build_transforms(preset, 28, train=False)(vol)
    assert any(not torch.equal(o, plain) for o in outs)
    t.set_random_state(3)
    assert torch.equal(t(vol), outs[0])


def test_presets_refuse_the_other_dimension():
    with pytest.raises(ValueError, match="'adrenal3d' is for 3D volumes"):
        build_transforms("adrenal3d", 28, train=True, spatial_dims=2)
    with pytest.raises(ValueError, match="'ct' is for 2D images"):
        build_transforms("ct", 28, train=True, spatial_dims=3)
    t = build_transforms("none", 28, train=False, spatial_dims=3)
    with pytest.raises(ValueError, match=r"grey volume of shape \(D, H, W\).*2D model"):
        t(np.zeros((28, 28), np.uint8))
    from medvit.data.batch_transforms import build_batch_transforms

    with pytest.raises(ValueError, match="augment_on workers"):
        build_batch_transforms("vessel3d", 28)


def test_resize_volume_is_area_when_shrinking_by_a_factor():
    x = torch.arange(8.0).view(1, 2, 2, 2).repeat_interleave(2, 1).repeat_interleave(2, 2)
    x = x.repeat_interleave(2, 3)  # (1, 4, 4, 4): each value a 2x2x2 block
    assert torch.equal(resize_volume(x, 2), torch.arange(8.0).view(1, 2, 2, 2))
    assert resize_volume(torch.rand(1, 28, 28, 28), 32).shape == (1, 32, 32, 32)
