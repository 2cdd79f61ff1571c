"""Tests for medvit.data.transforms (kept small: MONAI's import dominates the runtime)."""

from __future__ import annotations

import pickle

import medmnist  # a hard dependency (it defines the datasets)
import numpy as np
import pytest
import torch

from medvit.data import presets
from medvit.data import transforms as tf
from medvit.data.presets import PRESETS_2D as PRESETS  # the 3D ones: tests/test_data3d.py
from medvit.data.transforms import (
    MODALITY_BY_FLAG,
    HEDJitter,
    MedTransform,
    build_transforms,
    preset_for_flag,
)

RANDOM_PRESETS = tuple(p for p in PRESETS if p != "none")
COLOUR_PRESETS = ("dermoscopy", "fundus", "histopathology")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (input kind, in_chans): grey kept grey, grey expanded to 3 channels, true RGB.
INPUTS = [("grey", 1), ("grey", 3), ("rgb", 3)]


def _image(kind: str, size: int = 28, seed: int = 0) -> np.ndarray:
    """Smooth-ish random uint8 image so blur/contrast ops have something to act on."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if kind == "rgb" else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _natural_input(preset: str) -> tuple[str, int]:
    return ("rgb", 3) if preset in COLOUR_PRESETS else ("grey", 1)


def _stream(t: MedTransform, img: np.ndarray, n: int) -> list[torch.Tensor]:
    return [t(img) for _ in range(n)]


def test_every_medmnist_2d_flag_maps_to_a_preset():
    flags = {
        "pathmnist",
        "chestmnist",
        "dermamnist",
        "octmnist",
        "pneumoniamnist",
        "retinamnist",
        "breastmnist",
        "bloodmnist",
        "tissuemnist",
        "organamnist",
        "organcmnist",
        "organsmnist",
    }
    flags |= {k for k in medmnist.INFO if not k.endswith("3d")}
    assert flags <= set(MODALITY_BY_FLAG)
    for flag in flags:
        assert preset_for_flag(flag) in PRESETS
    assert preset_for_flag("PneumoniaMNIST") == "chest_xray"
    assert preset_for_flag("organsmnist") == "ct"
    assert preset_for_flag("bloodmnist") == "histopathology"


def test_unknown_flag_names_flag_and_known_flags():
    with pytest.raises(ValueError, match=r"'nodulemnist4d'.*pathmnist.*organsmnist"):
        preset_for_flag("nodulemnist4d")


def test_preset_table_matches_public_presets():
    assert set(presets.PRESET_OPS) == set(presets.PRESETS)
    for preset in RANDOM_PRESETS:
        libs = {spec.lib for spec in presets.PRESET_OPS[preset]}
        assert libs == {"albumentations", "monai"}, preset


@pytest.mark.parametrize(("kind", "in_chans"), INPUTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_train_output_shape_dtype_range(preset, kind, in_chans):
    t = build_transforms(preset, img_size=32, train=True, in_chans=in_chans, seed=0)
    for i in range(3):
        out = t(_image(kind, seed=i))
        assert out.shape == (in_chans, 32, 32)
        assert out.dtype == torch.float32
        assert out.is_contiguous()
        assert torch.isfinite(out).all()
        # Default mean=std=0.5 maps [0, 1] to [-1, 1]; ops must not escape the intensity range.
        assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("preset", COLOUR_PRESETS + ("chest_xray",))
def test_per_channel_normalisation_range(preset):
    t = build_transforms(preset, 40, True, in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=1)
    out = t(_image("rgb"))
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    flat = out.reshape(3, -1)
    assert (flat.min(1).values >= lo - 1e-5).all() and (flat.max(1).values <= hi + 1e-5).all()


def test_eval_values_are_exact_scaling():
    img = np.array([[0, 255], [51, 102]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    out = build_transforms("chest_xray", 8, train=False)(img)
    expected = (torch.from_numpy(img).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("preset", PRESETS)
def test_eval_is_deterministic_and_seed_independent(preset):
    kind, in_chans = _natural_input(preset)
    img = _image(kind)
    a = build_transforms(preset, 32, train=False, in_chans=in_chans, seed=1)
    b = build_transforms(preset, 32, train=False, in_chans=in_chans, seed=2)
    first = a(img)
    assert torch.equal(first, a(img))
    assert torch.equal(first, b(img))
    # Eval of any preset is the plain resize + normalise that "none" also gives in train mode.
    assert torch.equal(first, build_transforms("none", 32, True, in_chans=in_chans)(img))


@pytest.mark.parametrize("preset", RANDOM_PRESETS)
def test_train_actually_randomises(preset):
    kind, in_chans = _natural_input(preset)
    img = _image(kind)
    outs = _stream(build_transforms(preset, 28, True, in_chans=in_chans, seed=0), img, 12)
    distinct = {o.numpy().tobytes() for o in outs}
    assert len(distinct) >= 4, f"{preset}: only {len(distinct)} distinct outputs in 12 draws"


@pytest.mark.parametrize("preset", RANDOM_PRESETS)
def test_same_seed_same_stream(preset):
    kind, in_chans = _natural_input(preset)
    imgs = [_image(kind, seed=i) for i in range(8)]
    a = build_transforms(preset, 28, True, in_chans=in_chans, seed=123)
    b = build_transforms(preset, 28, True, in_chans=in_chans, seed=123)
    c = build_transforms(preset, 28, True, in_chans=in_chans, seed=124)
    outs_a, outs_b, outs_c = ([t(im) for im in imgs] for t in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(outs_a, outs_c, strict=True))
    # Re-seeding rewinds the stream; it returns self for chaining.
    assert c.set_random_state(123) is c
    assert all(torch.equal(x, c(im)) for x, im in zip(outs_a, imgs, strict=True))


def test_per_sample_seed_fixes_output_whatever_the_order():
    # The data module re-seeds before every sample: the output must depend on the seed only.
    img = _image("rgb")
    t = build_transforms("dermoscopy", 28, True, in_chans=3, seed=0)
    forward = {s: t.set_random_state(s)(img) for s in (1, 2, 3, 2**40)}
    backward = {s: t.set_random_state(s)(img) for s in (2**40, 3, 2, 1)}
    assert all(torch.equal(forward[s], backward[s]) for s in forward)
    assert not torch.equal(forward[1], forward[2])


def test_default_seed_follows_torch_manual_seed():
    img = _image("rgb")
    streams = []
    for _ in range(2):
        torch.manual_seed(7)
        t = build_transforms("dermoscopy", 28, True, in_chans=3)
        streams.append(_stream(t, img, 6))
    assert all(torch.equal(x, y) for x, y in zip(*streams, strict=True))


def test_eval_transform_does_not_consume_global_torch_rng():
    torch.manual_seed(0)
    build_transforms("chest_xray", 28, train=False)
    build_transforms("none", 28, train=True)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_pickle_round_trip_keeps_stream():
    # DataLoader workers with the spawn start method receive a pickled copy.
    t = build_transforms("ultrasound", 28, True, seed=5)
    clone = pickle.loads(pickle.dumps(t))
    img = _image("grey")
    assert all(torch.equal(t(img), clone(img)) for _ in range(5))


def test_dataloader_workers_get_distinct_reproducible_streams(monkeypatch):
    img = _image("rgb")
    worker = {"key": None}
    monkeypatch.setattr(tf, "_current_worker_key", lambda: worker["key"])

    def run(key):
        worker["key"] = None  # built in the main process...
        t = build_transforms("histopathology", 28, True, in_chans=3, seed=3)
        worker["key"] = key  # ...then used from a worker process
        return _stream(t, img, 6)

    w0, w0_again, w1 = run((0, 1000)), run((0, 1000)), run((1, 1001))
    assert all(torch.equal(x, y) for x, y in zip(w0, w0_again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(w0, w1, strict=True))


def test_explicit_seed_inside_worker_is_respected(monkeypatch):
    monkeypatch.setattr(tf, "_current_worker_key", lambda: (0, 99))
    img = _image("grey")
    a = build_transforms("ct", 28, True, seed=0).set_random_state(11)
    b = build_transforms("ct", 28, True, seed=1).set_random_state(11)
    assert all(torch.equal(a(img), b(img)) for _ in range(5))


@pytest.mark.parametrize(("src", "dst"), [(28, 64), (64, 32), (28, 28)])
def test_resize(src, dst):
    img = _image("grey", size=src)
    for train in (False, True):
        out = build_transforms("microscopy", dst, train, seed=0)(img)
        assert out.shape == (1, dst, dst)
    # Upsampling a constant image must stay constant (no ringing from the interpolation).
    flat = np.full((src, src), 200, dtype=np.uint8)
    out = build_transforms("none", dst, False)(flat)
    torch.testing.assert_close(out, torch.full((1, dst, dst), (200 / 255 - 0.5) / 0.5))


def test_non_square_input_is_resized_to_square():
    out = build_transforms("oct", 32, True, seed=0)(np.zeros((20, 36), dtype=np.uint8))
    assert out.shape == (1, 32, 32)


def test_grey_expanded_to_three_identical_channels():
    img = _image("grey")
    out = build_transforms("chest_xray", 64, False, in_chans=3)(img)
    assert out.shape == (3, 64, 64)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # Per-channel stats are applied after expansion.
    per_chan = build_transforms("chest_xray", 64, False, 3, IMAGENET_MEAN, IMAGENET_STD)(img)
    for c in range(3):
        expected = (out[0] * 0.5 + 0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(per_chan[c], expected)


def test_channel_last_singleton_is_grey():
    img = _image("grey")
    t = build_transforms("none", 28, False)
    assert torch.equal(t(img[:, :, None]), t(img))


def test_input_is_not_modified():
    img = _image("rgb")
    before = img.copy()
    t = build_transforms("histopathology", 28, True, in_chans=3, seed=0)
    for _ in range(5):
        t(img)
    assert np.array_equal(img, before)


@pytest.mark.parametrize(
    ("image", "in_chans", "match"),
    [
        (np.zeros((28, 28), dtype=np.float32), 1, r"dtype uint8, got float32"),
        (np.zeros((28, 28, 4), dtype=np.uint8), 3, r"\(H, W\) or \(H, W, 3\).*\(28, 28, 4\)"),
        (np.zeros((3, 28, 28), dtype=np.uint8), 3, r"channels last.*\(3, 28, 28\)"),
        (np.zeros((28,), dtype=np.uint8), 1, r"\(H, W\) or \(H, W, 3\).*\(28,\)"),
        (np.zeros((0, 28), dtype=np.uint8), 1, r"non-empty.*\(0, 28\)"),
        (np.zeros((28, 28, 3), dtype=np.uint8), 1, r"RGB image.*in_chans=1"),
        (torch.zeros(28, 28, dtype=torch.uint8), 1, r"numpy.ndarray.*torch.Tensor"),
        ([[0, 1], [2, 3]], 1, r"numpy.ndarray.*list"),
    ],
)
def test_bad_input_raises(image, in_chans, match):
    t = build_transforms("chest_xray", 28, True, in_chans=in_chans, seed=0)
    with pytest.raises(ValueError, match=match):
        t(image)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "mri"}, r"Unknown preset 'mri'.*chest_xray.*microscopy"),
        ({"img_size": 4}, r"img_size must be >= 8, got 4"),
        ({"img_size": 32.0}, r"img_size must be an int"),
        ({"in_chans": 2}, r"in_chans must be 1 or 3, got 2"),
        ({"in_chans": 3, "mean": (0.5, 0.5)}, r"mean must have length 1 or in_chans=3"),
        ({"std": (0.5, 0.5, 0.5)}, r"std must have length 1 or in_chans=1"),
        ({"std": (0.0,)}, r"std must be > 0"),
        ({"mean": (float("nan"),)}, r"mean must be finite"),
        ({"seed": -1}, r"seed must be a non-negative int"),
    ],
)
def test_bad_build_args_raise(kwargs, match):
    args = {"preset": "chest_xray", "img_size": 28, "train": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_transforms(**args)


def _lateral_test_image() -> np.ndarray:
    """Bright mass in the upper-left quadrant on a dark background."""
    img = np.full((28, 28), 20, dtype=np.uint8)
    img[3:12, 3:11] = 230
    return img


@pytest.mark.parametrize("preset", ["chest_xray", "ct"])
def test_lateralised_presets_never_flip(preset):
    t = build_transforms(preset, 28, True, seed=0)
    img = _lateral_test_image()
    for _ in range(60):
        out = t(img)[0]
        # Every single draw keeps the mass on its side, left-right and top-bottom.
        assert out[:, :14].sum() > out[:, 14:].sum()
        assert out[:14, :].sum() > out[14:, :].sum()


def test_flip_detector_positive_control():
    # The same check must catch flips, or the never-flip test above would prove nothing.
    t = build_transforms("microscopy", 28, True, seed=0)
    img = _lateral_test_image()
    flipped = sum(int(o[0, :, :14].sum() < o[0, :, 14:].sum()) for o in _stream(t, img, 60))
    assert flipped > 10


def test_repr_lists_ops():
    text = repr(build_transforms("histopathology", 224, True, in_chans=3, seed=0))
    assert "preset='histopathology'" in text and "img_size=224" in text
    for op in ("HorizontalFlip", "RandomRotate90", "HEDJitter", "RandGaussianSmooth", "resize"):
        assert op in text
    assert "HEDJitter" not in repr(build_transforms("histopathology", 224, False, in_chans=3))


def test_hed_jitter_is_identity_without_jitter():
    img = _image("rgb")
    op = HEDJitter(scale_range=(1.0, 1.0), shift_range=(0.0, 0.0), p=1.0)
    assert np.array_equal(op(image=img)["image"], img)
    as_float = img.astype(np.float32) / 255
    np.testing.assert_allclose(op(image=as_float)["image"], as_float, atol=1e-5)


def test_hed_jitter_more_stain_darkens_moderately():
    # Synthetic H&E tile: non-negative H and E concentrations mixed with the Ruifrok vectors.
    conc = np.random.default_rng(0).uniform(0.0, 1.2, (28, 28, 2))
    od = conc @ np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    img = np.rint(np.exp(-od) * 256 - 1).clip(0, 255).astype(np.uint8)
    more = HEDJitter(scale_range=(1.1, 1.1), shift_range=(0.03, 0.03), p=1.0)(image=img)["image"]
    diff = more.astype(int) - img.astype(int)
    assert diff.mean() < -2 and np.abs(diff).max() < 40


def test_hed_stain_matrices_are_scikit_images():
    from skimage.color import hed_from_rgb, rgb_from_hed

    np.testing.assert_allclose(presets.RGB_FROM_HED, rgb_from_hed, rtol=0, atol=1e-12)
    np.testing.assert_allclose(presets.HE_FROM_RGB, hed_from_rgb[:, :2], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(presets.RGB_FROM_HE, rgb_from_hed[:2], rtol=1e-6, atol=1e-7)


def test_hed_jitter_equals_scikit_image_rgb2hed_and_hed2rgb():
    from skimage.color import hed2rgb, rgb2hed

    # H&E-like pixels: positive H, E and DAB concentrations, so rgb2hed clips nothing.
    rng = np.random.default_rng(1)
    stains = rng.uniform([0.05, 0.05, 0.01], [0.15, 0.12, 0.03], (28, 28, 3))
    img = np.clip(np.rint(hed2rgb(stains) * 256 - 1), 0, 255).astype(np.uint8)
    scale, shift = np.array([1.08, 0.93]), np.array([0.02, -0.015])
    got = HEDJitter(p=1.0).apply(img.astype(np.float32) / 255, scale=scale, shift=shift)
    # medvit's optical density is -log((v + 1) / 256) for a level v; skimage's is
    # -log(rgb) / -log(1e-6): the same after rescaling both.
    unit = -np.log(1e-6)
    hed = rgb2hed((img.astype(np.float64) + 1) / 256)
    assert (hed > 0).all()
    hed[..., :2] = hed[..., :2] * scale + shift / unit
    want = np.clip(hed2rgb(hed) * 256 - 1, 0, 255) / 255
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - img / 255).max() > 0.02  # the jitter did change the colours


# The reviewed strengths of every preset, op by op ("RGB" marks ops dropped for grey input). The
# worker and device paths both read this table, so a changed probability or range would change
# both consistently and no equivalence test would notice; this one does. Change it on purpose,
# together with the README's preset table.
PRESET_TABLE = {
    "none": [],
    "chest_xray": [
        "Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=0, fill=0, p=0.7)",
        "RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25))",
        "RandScaleIntensity(factors=0.1, prob=0.3)",
        "RandShiftIntensity(offsets=0.05, prob=0.3)",
        "RandGaussianNoise(prob=0.2, std=0.02)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1)",
    ],
    "ct": [
        "Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=0, fill=0, p=0.7)",
        "RandScaleIntensity(factors=0.1, prob=0.4)",
        "RandShiftIntensity(offsets=0.05, prob=0.4)",
        "RandAdjustContrast(prob=0.2, gamma=(0.85, 1.15))",
        "RandGaussianNoise(prob=0.2, std=0.02)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1)",
    ],
    "ultrasound": [
        "HorizontalFlip(p=0.5)",
        "Affine(rotate=(-10, 10), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=0, fill=0, p=0.5)",
        "MultiplicativeNoise(multiplier=(0.85, 1.15), elementwise=True, p=0.3)",
        "RandRicianNoise(prob=0.2, std=0.03)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.75), sigma_y=(0.25, 0.75), prob=0.2)",
        "RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25))",
    ],
    "oct": [
        "HorizontalFlip(p=0.5)",
        "Affine(rotate=(-8, 8), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=0, fill=0, p=0.5)",
        "MultiplicativeNoise(multiplier=(0.85, 1.15), elementwise=True, p=0.3)",
        "RandRicianNoise(prob=0.2, std=0.03)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.75), sigma_y=(0.25, 0.75), prob=0.2)",
        "RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25))",
    ],
    "dermoscopy": [
        "HorizontalFlip(p=0.5)",
        "VerticalFlip(p=0.5)",
        "RandomRotate90(p=0.5)",
        "Affine(rotate=(-20, 20), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=4, p=0.5)",
        "RGB ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1)",
    ],
    "fundus": [
        "HorizontalFlip(p=0.5)",
        "VerticalFlip(p=0.5)",
        "Affine(rotate=(-180, 180), scale=(0.95, 1.05), border_mode=0, fill=0, p=0.7)",
        "RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)",
        "RGB ColorJitter(brightness=0, contrast=0, saturation=0.1, hue=0.02, p=0.3)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1)",
    ],
    "histopathology": [
        "HorizontalFlip(p=0.5)",
        "VerticalFlip(p=0.5)",
        "RandomRotate90(p=0.5)",
        "RGB HEDJitter(scale_range=(0.9, 1.1), shift_range=(-0.03, 0.03), p=0.5)",
        "RGB ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.3)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1)",
    ],
    "microscopy": [
        "HorizontalFlip(p=0.5)",
        "VerticalFlip(p=0.5)",
        "RandomRotate90(p=0.5)",
        "Affine(scale=(0.9, 1.1), border_mode=4, p=0.3)",
        "RandBiasField(coeff_range=(0.0, 0.05), prob=0.2)",
        "RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25))",
        "RandGaussianNoise(prob=0.2, std=0.02)",
        "RandGaussianSmooth(sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1)",
    ],
}


def test_preset_table_has_the_reviewed_probabilities_and_ranges():
    got = {
        preset: [("RGB " if s.colour else "") + str(s) for s in specs]
        for preset, specs in presets.PRESET_OPS.items()
    }
    assert got.keys() - set(presets.PRESETS_3D) == PRESET_TABLE.keys()
    for preset, want in PRESET_TABLE.items():
        assert got[preset] == want, f"preset {preset!r} changed"
    # The strings name what the library objects are built with, not a stale copy of them.
    for specs in presets.PRESET_OPS.values():
        for s in specs:
            built = s.build()
            p = built.prob if hasattr(built, "prob") else built.p
            assert p == (s.kwargs.get("prob", s.kwargs.get("p"))), s
