"""On-device batch augmentation: same formulas as the libraries, seeded per sample, any batch."""

from __future__ import annotations

import csv
import json

import albumentations as A
import cv2
import monai.transforms as mt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from albumentations.augmentations.pixel import functional as AF

from medvit.data import batch_ops as bt
from medvit.data.batch_ops import BatchRandom
from medvit.data.batch_transforms import BatchAugment, RawImage, translate
from medvit.data.medmnist import MedMNISTDataModule, SeededDistributedSampler
from medvit.data.presets import PRESETS_2D as PRESETS  # on-device augmentation is 2D only
from medvit.data.presets import HEDJitter, _alb, _mon
from medvit.data.transforms import build_transforms

B = 6


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(B, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def _lowbias32(v: int) -> int:
    """The reference hash in plain Python integers."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def test_hash_has_no_int64_overflow():
    values = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    got = bt._mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(v) for v in values]


def test_random_numbers_depend_only_on_seed_stream_and_counter():
    seeds = torch.tensor([7, 2**32 - 1, 0, 123456789])
    rng = BatchRandom(seeds)
    u = rng.uniform(3, 50)
    assert torch.equal(u, BatchRandom(seeds).uniform(3, 50))
    # A sample's numbers are the same alone, in another batch, at another position.
    assert torch.equal(BatchRandom(seeds[2:3]).uniform(3, 50)[0], u[2])
    assert torch.equal(BatchRandom(seeds.flip(0)).uniform(3, 50), u.flip(0))
    # A longer draw starts with the shorter one; other streams and seeds differ.
    assert torch.equal(rng.uniform(3, 80)[:, :50], u)
    assert not torch.equal(rng.uniform(4, 50), u)
    assert len({tuple(r) for r in u.tolist()}) == 4
    many = BatchRandom(torch.arange(32)).uniform(0, 20000)
    assert many.min() > 0 and many.max() < 1
    assert abs(many.mean().item() - 0.5) < 0.005 and abs(many.var().item() - 1 / 12) < 0.002
    z = BatchRandom(torch.arange(32)).normal(1, (100, 100), torch.device("cpu"))
    assert z.shape == (32, 100, 100)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    # Noise images follow the same rule: a sample's field is its own, whatever the batch.
    assert torch.equal(BatchRandom(torch.arange(5, 9)).normal(1, (100, 100), "cpu"), z[5:9])
    assert not torch.equal(BatchRandom(torch.arange(32)).normal(2, (100, 100), "cpu"), z)
    f = BatchRandom(torch.arange(4)).field(0, (50, 50), 0.85, 1.15, "cpu")
    assert f.min() >= 0.85 and f.max() < 1.15 and abs(f.mean().item() - 1.0) < 0.01
    with pytest.raises(ValueError, match="1-D integer tensor"):
        BatchRandom(torch.rand(4))


# ------------------------------------------------- each op against its library's own formula
def test_adjust_contrast_equals_monai(x):
    gamma = torch.linspace(0.8, 1.25, B)
    want = torch.stack(
        [torch.as_tensor(mt.AdjustContrast(float(g))(xi)) for g, xi in zip(gamma, x, strict=True)]
    )
    assert torch.allclose(bt.adjust_contrast(x, gamma), want, atol=1e-6)


def test_gaussian_smooth_equals_monai(x):
    s_h, s_w = torch.linspace(0.25, 0.75, B), torch.linspace(0.75, 0.3, B)
    want = torch.stack(
        [
            torch.as_tensor(mt.GaussianSmooth((float(a), float(b)))(xi))
            for a, b, xi in zip(s_h, s_w, x, strict=True)
        ]
    )
    # The batched kernel is as long as the largest sigma needs; extra taps are below 1e-4.
    assert torch.allclose(bt.gaussian_smooth(x, s_h, s_w, tail=3), want, atol=1e-4)


def test_bias_field_equals_monai(x):
    coeff = torch.rand(B, 10, generator=torch.Generator().manual_seed(1)) * 0.1
    op = mt.RandBiasField(prob=1.0)
    want = torch.stack(
        [
            xi * torch.from_numpy(np.exp(op._generate_random_field((28, 28), 3, c.tolist())))
            for c, xi in zip(coeff, x, strict=True)
        ]
    ).float()
    assert torch.allclose(bt.bias_field(x, coeff, 3), want, atol=1e-5)


def test_hed_jitter_equals_the_worker_op(x):
    scale = torch.rand(B, 2) * 0.2 + 0.9
    shift = torch.rand(B, 2) * 0.06 - 0.03
    op = HEDJitter(p=1.0)
    want = torch.stack(
        [
            torch.from_numpy(
                op.apply(xi.permute(1, 2, 0).numpy(), scale=s.numpy(), shift=t.numpy())
            ).permute(2, 0, 1)
            for xi, s, t in zip(x, scale, shift, strict=True)
        ]
    )
    assert torch.allclose(bt.hed_jitter(x, scale, shift), want, atol=1e-5)


def test_color_jitter_equals_albumentations_functions(x):
    b, c, s = (torch.linspace(0.8, 1.2, B) for _ in range(3))
    h = torch.linspace(-0.3, 0.3, B)
    want = []
    for xi, bi, ci, si, hi in zip(x, b, c, s, h, strict=True):
        img = np.ascontiguousarray(xi.permute(1, 2, 0).numpy())
        img = np.clip(AF.adjust_brightness_torchvision(img, float(bi)), 0, 1)
        img = np.clip(AF.adjust_contrast_torchvision(img, float(ci)), 0, 1)
        img = np.clip(AF.adjust_saturation_torchvision(img, float(si)), 0, 1)
        img = np.clip(AF.adjust_hue_torchvision(img, float(hi)), 0, 1)
        want.append(torch.from_numpy(img).permute(2, 0, 1))
    assert torch.allclose(bt.color_jitter(x, b, c, s, h), torch.stack(want), atol=1e-5)


def test_rot90_and_affine_geometry(x):
    k = torch.tensor([0, 1, 2, 3, 1, 2])
    want = torch.stack(
        [
            torch.from_numpy(np.rot90(xi.numpy(), int(ki), (1, 2)).copy())
            for xi, ki in zip(x, k, strict=True)
        ]
    )
    assert torch.equal(bt.rot90(x, k), want)
    ones, zeros = torch.ones(B), torch.zeros(B)
    assert torch.allclose(bt.affine(x, zeros, ones, ones, zeros, zeros), x, atol=1e-5)
    # A quarter turn samples pixel centres exactly: it is a 90 degree rotation.
    quarter = bt.affine(x, torch.full((B,), 90.0), ones, ones, zeros, zeros)
    assert torch.allclose(quarter, bt.rot90(x, torch.full((B,), 3)), atol=1e-5)
    # A shift of a quarter of the side moves content 7 px right; zeros come in on the left.
    moved = bt.affine(x, zeros, ones, ones, torch.full((B,), 0.25), zeros)
    assert torch.allclose(moved[..., 7:], x[..., :-7], atol=1e-5)
    assert moved[..., :7].abs().max() == 0
    filled = bt.affine(x, zeros, ones, ones, torch.full((B,), 0.25), zeros, fill=0.5)
    assert torch.allclose(filled[..., :7], torch.full_like(filled[..., :7], 0.5))
    # Scale 2 about the centre: output pixel i samples the input at 6.75 + i / 2 (pixel-centre
    # coordinates), so the output's centre 14 px are the input's centre 8 px (10..17) enlarged
    # twice with half-pixel bilinear weights 0.75 / 0.25, i.e. F.interpolate's own.
    zoom = bt.affine(x, zeros, 2 * ones, 2 * ones, zeros, zeros)
    weights = torch.zeros(14, 28)
    for i in range(14):
        at = 6.75 + (i + 7) / 2
        weights[i, int(at)], weights[i, int(at) + 1] = 1 - at % 1, at % 1
    centre = zoom[..., 7:21, 7:21]
    assert torch.allclose(centre, weights @ x @ weights.T, atol=1e-5)
    enlarged = F.interpolate(x[..., 10:18, 10:18], size=(16, 16), mode="bilinear")
    assert torch.allclose(centre, enlarged[..., 1:15, 1:15], atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        bt.rot90(torch.zeros(1, 1, 4, 6), torch.ones(1, dtype=torch.long))


# ---------------------------------------------------------------------- presets and errors
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_batched_version(preset):
    aug = BatchAugment(preset, 32, in_chans=3)
    from medvit.data.presets import PRESET_OPS as _PRESET_OPS

    assert [op.name for op in aug.ops] == [s.cls.__name__ for s in _PRESET_OPS[preset]]
    for c in (1, 3):
        out = BatchAugment(preset, 32, in_chans=c)(
            torch.randint(0, 256, (8, c, 28, 28), dtype=torch.uint8), torch.arange(8)
        )
        assert out.shape == (8, c, 32, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= -1.0 - 1e-6 and out.max() <= 1 + 1e-6


def test_ops_or_options_without_a_batched_version_are_refused():
    with pytest.raises(ValueError, match="GaussianBlur has no on-device version"):
        translate(_alb(A.GaussianBlur, p=0.5))
    with pytest.raises(ValueError, match="shear"):
        translate(_alb(A.Affine, shear=(-5, 5), p=0.5))
    with pytest.raises(ValueError, match="border_mode=2"):
        translate(_alb(A.Affine, rotate=(-5, 5), border_mode=cv2.BORDER_REFLECT, p=0.5))
    with pytest.raises(ValueError, match="channel_wise=True"):
        translate(_mon(mt.RandScaleIntensity, factors=0.1, channel_wise=True, prob=0.5))


def test_bad_inputs_name_what_is_expected():
    aug = BatchAugment("chest_xray", 28)
    with pytest.raises(ValueError, match=r"uint8 images with C = 1 or 3, got torch.float32"):
        aug(torch.rand(2, 1, 28, 28), torch.arange(2))
    with pytest.raises(ValueError, match="one seed per image: \\(3,\\) seeds for 2 images"):
        aug(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.arange(3))
    with pytest.raises(ValueError, match="RGB batch but in_chans=1"):
        aug(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), torch.arange(2))
    with pytest.raises(ValueError, match="Unknown preset 'xray'"):
        BatchAugment("xray", 28)
    with pytest.raises(ValueError, match="std must be > 0"):
        BatchAugment("none", 28, std=(0.0,))
    with pytest.raises(ValueError, match="in_chans=1"):
        RawImage(1)(np.zeros((28, 28, 3), np.uint8))
    assert RawImage(3)(np.zeros((28, 20, 3), np.uint8)).shape == (3, 28, 20)


# ------------------------------------------------------------------ the batch as a whole
def _batch(n: int = 16, c: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )


@pytest.mark.parametrize("preset", ["ultrasound", "histopathology", "microscopy"])
def test_a_sample_is_augmented_the_same_in_any_batch(preset):
    c = 3 if preset == "histopathology" else 1
    aug = BatchAugment(preset, 28, in_chans=c)
    images, seeds = _batch(16, c), torch.arange(1000, 1016)
    out = aug(images, seeds)
    assert torch.equal(out, aug(images, seeds))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(aug(images[perm], seeds[perm]), out[perm], atol=1e-6)
    # Two ranks' halves of a global batch give the rows of the whole batch.
    halves = torch.cat([aug(images[:8], seeds[:8]), aug(images[8:], seeds[8:])])
    assert torch.allclose(halves, out, atol=1e-6)
    assert not torch.allclose(aug(images, seeds + 1), out)


def test_each_op_fires_with_its_probability():
    aug = BatchAugment("ultrasound", 28)  # HorizontalFlip(p=0.5) first
    images = torch.zeros(2000, 1, 28, 28, dtype=torch.uint8)
    images[..., :14] = 255  # left half white: a flip shows in one pixel
    flip = aug.ops[0]
    out = flip(images.float() / 255, BatchRandom(torch.arange(2000)), stream=0)
    rate = (out[:, 0, 0, 0] == 0).float().mean().item()
    assert 0.45 < rate < 0.55


def test_no_augmentation_equals_the_worker_eval_transform():
    rng = np.random.default_rng(0)
    for size, img_size in [(28, 28), (28, 40), (28, 224), (56, 28), (64, 28), (224, 100)]:
        imgs = rng.integers(0, 256, (4, size, size), dtype=np.uint8)
        want = torch.stack(
            [build_transforms("none", img_size, train=False, in_chans=3)(i) for i in imgs]
        )
        raw = torch.stack([RawImage(3)(i) for i in imgs])
        got = BatchAugment("none", img_size, in_chans=3)(raw, torch.arange(4))
        # OpenCV's area shrink (any factor) and half-pixel bilinear enlarging, to float error.
        assert torch.allclose(got, want, atol=1e-5), (size, img_size)


def test_datamodule_augments_training_batches_on_the_device(synthetic_root, tmp_path):
    root = synthetic_root("pathmnist", n=(24, 8, 8))
    common = dict(
        flag="pathmnist",
        root=str(root),
        verify_md5=False,
        num_workers=0,
        global_batch_size=8,
        cache_dir=str(tmp_path / "mmap"),
        img_size=32,
    )
    dm = MedMNISTDataModule(augment_on="device", **common)
    dm.prepare_data()
    dm.setup("fit")
    images, target, index, seeds = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 28, 28)
    x, y, i = dm.on_after_batch_transfer((images, target, index, seeds), 0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(y, target) and torch.equal(i, index)
    assert torch.equal(x, dm.batch_augment(images, seeds))
    # In Lightning's order the seeds skip the transfer (a numpy array) and give the same batch.
    before = dm.on_before_batch_transfer((images, target, index, seeds), 0)
    assert isinstance(before[3], np.ndarray) and before[0] is images
    assert torch.equal(dm.on_after_batch_transfer(before, 0)[0], x)
    # Evaluation batches are untouched and equal to the per-image path's.
    workers = MedMNISTDataModule(augment_on="workers", **common)
    workers.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert dm.on_after_batch_transfer(val, 0) is val
    for a, b in zip(val, next(iter(workers.val_dataloader())), strict=True):
        assert torch.equal(a, b)
    # Two ranks see the samples and seeds of the one-process global batch.
    one = list(SeededDistributedSampler(dm.data_train, num_replicas=1, rank=0, seed=0))[:8]
    two = [
        list(SeededDistributedSampler(dm.data_train, num_replicas=2, rank=r, seed=0))[:4]
        for r in (0, 1)
    ]
    assert sorted(one) == sorted(two[0] + two[1])
    with pytest.raises(ValueError, match="augment_on must be one of"):
        MedMNISTDataModule(augment_on="gpu", **common)


def test_fit_with_augmentation_on_the_device(synthetic_root, short_trainer, tmp_path):
    from medvit.cli import main

    root = synthetic_root("bloodmnist", n=(32, 16, 16))
    main(
        [
            "fit",
            "--data.flag=bloodmnist",
            f"--data.root={root}",
            "--data.augment_on=device",
            f"--run.root={tmp_path / 'runs'}",
            *short_trainer(1, train_batches=2),
        ]
    )
    # Had Lightning skipped the DataModule's hook, the model would have met uint8 4-tuples.
    (run_dir,) = (tmp_path / "runs" / "bloodmnist").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["augment_on"] == "device"
    with open(run_dir / "metrics.csv", newline="") as fh:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(fh) if r["train/loss_epoch"]]
    assert len(losses) == 1 and np.isfinite(losses[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["test"]["auroc"] <= 1 and metrics["epochs_trained"] == 1


# ------------------------------------------- every preset's parameters equal the library's
def _lib_p(op) -> float:
    return op.prob if isinstance(op, mt.Randomizable) else op.p


def _at(u: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    """The library's (low, high) range at the uniforms ``u``: low at 0, high at 1."""
    lo, hi = rng
    return lo + (hi - lo) * u


def _expected(op, x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
    """What the batched op must give for uniforms ``u``, from the library instance's own ranges.

    The formulas are ``bt``'s, checked against the libraries above; what this checks is that
    each parameter comes from the right library attribute, with its low end at u = 0 and its
    high end at u = 1, and that each parameter reads its own uniform.
    """
    if isinstance(op, A.HorizontalFlip):
        return x.flip(-1)
    if isinstance(op, A.VerticalFlip):
        return x.flip(-2)
    if isinstance(op, A.RandomRotate90):
        return bt.rot90(x, torch.floor(u[:, 0] * 4).long().clamp(max=3))
    if isinstance(op, A.Affine):
        modes = {cv2.BORDER_CONSTANT: "zeros", cv2.BORDER_REFLECT_101: "reflection"}
        sx = _at(u[:, 1], op.scale["x"])
        sy = sx if op.keep_ratio else _at(u[:, 2], op.scale["y"])
        shift = op.translate_percent or {"x": (0.0, 0.0), "y": (0.0, 0.0)}
        out = bt.affine(
            x,
            _at(u[:, 0], op.rotate),
            sx,
            sy,
            _at(u[:, 3], shift["x"]),
            _at(u[:, 4], shift["y"]),
            modes[op.border_mode],
            op.fill / 255.0,
        )
        return out.clamp(0, 1)
    if isinstance(op, A.MultiplicativeNoise):
        c = x.shape[1] if op.per_channel else 1
        shape = (c, *x.shape[2:]) if op.elementwise else (c, 1, 1)
        return (x * rng.field(s, shape, *op.multiplier, x.device)).clamp(0, 1)
    if isinstance(op, A.RandomBrightnessContrast):
        alpha = 1 + _at(u[:, 1], op.contrast_limit)
        beta = _at(u[:, 0], op.brightness_limit)
        return (x * alpha.view(-1, 1, 1, 1) + beta.view(-1, 1, 1, 1)).clamp(0, 1)
    if isinstance(op, A.ColorJitter):
        b, c, sat = (
            _at(u[:, i], getattr(op, k))
            for i, k in enumerate(("brightness", "contrast", "saturation"))
        )
        return bt.color_jitter(x, b, c, sat, _at(u[:, 3], op.hue)).clamp(0, 1)
    if isinstance(op, HEDJitter):
        scale, shift = _at(u[:, :2], op.scale_range), _at(u[:, 2:], op.shift_range)
        return bt.hed_jitter(x, scale, shift).clamp(0, 1)
    if isinstance(op, mt.RandAdjustContrast):
        return bt.adjust_contrast(x, _at(u[:, 0], op.gamma)).clamp(0, 1)
    if isinstance(op, mt.RandScaleIntensity):
        return (x * (1 + _at(u[:, 0], op.factors)).view(-1, 1, 1, 1)).clamp(0, 1)
    if isinstance(op, mt.RandShiftIntensity):
        return (x + _at(u[:, 0], op.offsets).view(-1, 1, 1, 1)).clamp(0, 1)
    if isinstance(op, mt.RandGaussianNoise):
        sd = _at(u[:, 0], (0.0, op.std)).view(-1, 1, 1, 1)
        return (x + op.mean + sd * rng.normal(s, x.shape[1:], x.device)).clamp(0, 1)
    if isinstance(op, mt.RandRicianNoise):
        sd = _at(u[:, 0], (0.0, op.std)).view(-1, 1, 1, 1)
        n = rng.normal(s, (2, *x.shape[1:]), x.device)
        out = torch.sqrt((x + op.mean + sd * n[:, 0]) ** 2 + (op.mean + sd * n[:, 1]) ** 2)
        return out.clamp(0, 1)
    if isinstance(op, mt.RandGaussianSmooth):
        # MONAI's own filter at the drawn sigmas (rows: sigma_x, columns: sigma_y).
        sig = zip(_at(u[:, 0], op.sigma_x), _at(u[:, 1], op.sigma_y), strict=True)
        return torch.stack(
            [
                torch.as_tensor(mt.GaussianSmooth((float(a), float(b)))(xi))
                for (a, b), xi in zip(sig, x, strict=True)
            ]
        ).clamp(0, 1)
    if isinstance(op, mt.RandBiasField):
        return bt.bias_field(x, _at(u, op.coeff_range), op.degree).clamp(0, 1)
    raise AssertionError(f"no expectation written for {type(op).__name__}")


def _uniforms(n_rows: int, n_params: int) -> torch.Tensor:
    """Row 0 all lows, row 1 all highs, then distinct values per parameter."""
    u = torch.rand(n_rows, n_params, generator=torch.Generator().manual_seed(5))
    u[0], u[1] = 0.0, 1.0
    return u


@pytest.mark.parametrize("preset", PRESETS)
def test_every_batched_op_has_the_library_ops_probability_and_ranges(preset):
    from medvit.data.presets import PRESET_OPS as _PRESET_OPS

    aug = BatchAugment(preset, 28, in_chans=3)
    x = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    rng = BatchRandom(torch.arange(5))
    for i, (spec, batched) in enumerate(zip(_PRESET_OPS[preset], aug.ops, strict=True)):
        lib = spec.build()
        where = f"{preset} op {i} ({type(lib).__name__})"
        assert batched.name == type(lib).__name__, where
        assert batched.p == _lib_p(lib), f"{where}: p={batched.p}, library {_lib_p(lib)}"
        assert batched.colour == spec.colour, where
        u = _uniforms(5, batched.draw)
        got = batched.fn(x, u, rng, i)
        got = got.clamp(0, 1) if batched.clip else got
        want = _expected(lib, x, u, rng, i)
        assert torch.allclose(got, want, atol=1e-4), f"{where}: parameters differ"


def test_rotate90_draws_each_quarter_turn_equally():
    # albumentations draws k uniformly from {0, 1, 2, 3}.
    op = translate(_alb(A.RandomRotate90, p=1.0))
    u = (torch.arange(400, dtype=torch.float32)[:, None] + 0.5) / 400
    x = torch.rand(1, 1, 4, 4).expand(400, -1, -1, -1)
    out = op.fn(x, u, None, 0)
    ks = [
        next(k for k in range(4) if torch.equal(o, bt.rot90(x[:1], torch.tensor([k]))[0]))
        for o in out
    ]
    assert np.bincount(ks, minlength=4).tolist() == [100, 100, 100, 100]
