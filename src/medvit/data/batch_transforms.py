"""The augmentation presets run on whole batches on the training device, after the transfer.

Per-sample augmentation in DataLoader workers (:mod:`medvit.data.transforms`) is the default. At
224 px one fast GPU consumes images faster than the host's cores can augment them one at a time;
with ``MedMNISTDataModule(augment_on="device")`` the workers only read uint8 images and
:class:`BatchAugment` runs the preset on each batch once it is on the device (the DataModule's
``on_after_batch_transfer``). Uint8 batches are also 4x cheaper to move than float32 ones.

There is one preset table, :data:`medvit.data.presets.PRESET_OPS`. Each of its entries, an
albumentations or MONAI op, is instantiated and translated here into a batched torch op of
:mod:`medvit.data.batch_ops`. The translation reads the
parameter ranges from that instance, so the library has already normalised them (``0.1`` becomes
``(-0.1, 0.1)``). Per-sample parameters are drawn from the same distributions and applied with
the same formulas. A preset that uses an op, or an option of an op, with no translation is
refused when it is built, so the two paths cannot drift apart silently. Outputs are close to the
worker path but not bit-identical:
- intermediate results stay float instead of being rounded to uint8 after each
  albumentations op;
- the affine warp is ``grid_sample`` instead of OpenCV's ``warpAffine`` (the final resize does
  equal OpenCV's);
- ColorJitter applies its four parts in a fixed order where albumentations shuffles them.

Randomness is per sample. The training sampler gives each sample a seed that is a function of
(seed, epoch, index). Per-image parameters are hashes of (sample seed, op), computed on the host
where the seeds stay, and pixel noise comes from a generator seeded with such a hash. A sample
is therefore augmented the same way whatever batch, rank or worker count it lands in, and a DDP
run still reproduces a single-device run. Noise fields differ between CPU and CUDA, whose
generators differ. The host also knows which images each op picks, so an op runs only on those
images and never forces a host-device synchronisation. Validation and test batches are never
augmented and stay on the worker path, so their numbers do not depend on this option.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import monai.transforms as mt
import numpy as np
import torch
import torch.nn.functional as F

from medvit.data.batch_ops import (
    BatchRandom,
    adjust_contrast,
    affine,
    area_matrix,
    bias_field,
    color_jitter,
    gaussian_smooth,
    hed_jitter,
    per_sample,
    rot90,
)
from medvit.data.presets import PRESET_OPS, PRESETS_3D, HEDJitter, OpSpec, Preset
from medvit.data.transforms import Channels, check_output_args, validate_image

__all__ = [
    "BatchAugment",
    "BatchOp",
    "RawImage",
    "build_batch_transforms",
    "translate",
]


def _between(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


# ------------------------------------------------------------------------------- random ops
class BatchOp:
    """One random op of a preset on (B, C, H, W) float batches in [0, 1].

    Each image fires with probability ``p``; ``fn(x, u, rng, stream)`` transforms the images that
    fire, ``u`` holding ``draw`` uniforms per image for the op's parameters.

    Args:
        name: the library op's class name, for messages and ``repr``.
        p: probability that an image is transformed.
        draw: per-image uniforms ``fn`` needs.
        fn: the batched op.
        clip: clamp the result to [0, 1]; geometric ops cannot leave it.
        colour: an RGB-only op; grey batches pass through, as the worker path drops it for grey.
    """

    def __init__(
        self,
        name: str,
        p: float,
        draw: int,
        fn: Callable[..., torch.Tensor],
        clip: bool = True,
        colour: bool = False,
    ) -> None:
        self.name = name
        self.p = float(p)
        self.draw = draw
        self.fn = fn
        self.clip = clip
        self.colour = colour

    def __call__(self, x: torch.Tensor, rng: BatchRandom, stream: int) -> torch.Tensor:
        if self.colour and x.shape[1] != 3:
            return x
        u = rng.uniform(stream, 1 + self.draw)  # on the host, like the seeds
        rows = torch.nonzero(u[:, 0] < self.p).flatten()
        if len(rows) == 0:
            return x
        # Host-side indices: only the chosen images are computed, with no device sync.
        idx = rows.to(x.device, non_blocking=True)
        params = u[rows, 1:].to(x.device, non_blocking=True)
        out = self.fn(x.index_select(0, idx), params, rng.subset(rows), stream)
        return x.index_copy(0, idx, out.clamp(0.0, 1.0) if self.clip else out)

    def __repr__(self) -> str:
        return f"{self.name}(p={self.p})"


def _range(value: Any, name: str, op: str) -> tuple[float, float]:
    lo, hi = (value, value) if np.isscalar(value) else tuple(value)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{op}: {name} must be a finite (low, high) range, got {value!r}.")
    return float(lo), float(hi)


def _require(op: Any, name: str, **expected: Any) -> None:
    """Refuse options the batched version does not implement, instead of ignoring them."""
    for key, want in expected.items():
        have = getattr(op, key)
        if have != want:
            raise ValueError(
                f"{name}({key}={have!r}) has no on-device version (only {key}={want!r}); "
                "use augment_on='workers' for this preset."
            )


def _flip(dim: int) -> Callable[[Any, str], BatchOp]:
    def build(op: Any, name: str) -> BatchOp:
        return BatchOp(name, op.p, 0, lambda x, u, rng, s: x.flip(dim), clip=False)

    return build


def _rotate90(op: Any, name: str) -> BatchOp:
    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        return rot90(x, (u[:, 0] * 4).long().clamp(max=3))  # k in {0, 1, 2, 3}, as albumentations

    return BatchOp(name, op.p, 1, fn, clip=False)


def _affine(op: Any, name: str) -> BatchOp:
    _require(op, name, fit_output=False, interpolation=cv2.INTER_LINEAR)
    no_shift = {"x": (0.0, 0.0), "y": (0.0, 0.0)}
    if op.translate_px is not None and op.translate_px != no_shift:
        raise ValueError(f"{name}(translate_px={op.translate_px!r}): use translate_percent.")
    if any(v != (0.0, 0.0) for v in op.shear.values()):
        raise ValueError(f"{name}(shear={op.shear!r}) has no on-device version.")
    modes = {cv2.BORDER_CONSTANT: "zeros", cv2.BORDER_REFLECT_101: "reflection"}
    if op.border_mode not in modes:
        raise ValueError(
            f"{name}(border_mode={op.border_mode}) has no on-device version; "
            "use cv2.BORDER_CONSTANT or cv2.BORDER_REFLECT_101."
        )
    if not np.isscalar(op.fill):
        raise ValueError(f"{name}(fill={op.fill!r}): only one fill value is supported on device.")
    rot = _range(op.rotate, "rotate", name)
    sx, sy = _range(op.scale["x"], "scale", name), _range(op.scale["y"], "scale", name)
    shift = op.translate_percent or no_shift
    tx = _range(shift["x"], "translate_percent", name)
    ty = _range(shift["y"], "translate_percent", name)
    mode, fill = modes[op.border_mode], float(op.fill) / 255.0
    keep_ratio = op.keep_ratio

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        scale_x = _between(u[:, 1], *sx)
        scale_y = scale_x if keep_ratio else _between(u[:, 2], *sy)
        return affine(
            x,
            _between(u[:, 0], *rot),
            scale_x,
            scale_y,
            _between(u[:, 3], *tx),
            _between(u[:, 4], *ty),
            mode,
            fill,
        )

    return BatchOp(name, op.p, 5, fn)


def _multiplicative_noise(op: Any, name: str) -> BatchOp:
    lo, hi = _range(op.multiplier, "multiplier", name)
    elementwise, per_channel = op.elementwise, op.per_channel

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        b, c, h, w = x.shape
        # Same layouts as albumentations: per pixel (shared over channels unless per_channel).
        shape = (c if per_channel else 1, h, w) if elementwise else (c if per_channel else 1, 1, 1)
        return x * rng.field(s, shape, lo, hi, x.device)

    return BatchOp(name, op.p, 0, fn)


def _brightness_contrast(op: Any, name: str) -> BatchOp:
    _require(op, name, brightness_by_max=True)
    b_lo, b_hi = _range(op.brightness_limit, "brightness_limit", name)
    c_lo, c_hi = _range(op.contrast_limit, "contrast_limit", name)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        alpha = 1.0 + _between(u[:, 1], c_lo, c_hi)
        beta = _between(u[:, 0], b_lo, b_hi)
        return x * per_sample(alpha) + per_sample(beta)

    return BatchOp(name, op.p, 2, fn)


def _color_jitter(op: Any, name: str) -> BatchOp:
    ranges = [_range(getattr(op, k), k, name) for k in ("brightness", "contrast", "saturation")]
    hue = _range(op.hue, "hue", name)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        b, c, sat = (_between(u[:, i], *r) for i, r in enumerate(ranges))
        return color_jitter(x, b, c, sat, _between(u[:, 3], *hue))

    return BatchOp(name, op.p, 4, fn, colour=True)


def _hed_jitter(op: Any, name: str) -> BatchOp:
    scale = _range(op.scale_range, "scale_range", name)
    shift = _range(op.shift_range, "shift_range", name)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        return hed_jitter(x, _between(u[:, :2], *scale), _between(u[:, 2:], *shift))

    return BatchOp(name, op.p, 4, fn, colour=True)


def _adjust_contrast(op: Any, name: str) -> BatchOp:
    _require(op, name, invert_image=False, retain_stats=False)
    gamma = _range(op.gamma, "gamma", name)
    return BatchOp(
        name, op.prob, 1, lambda x, u, rng, s: adjust_contrast(x, _between(u[:, 0], *gamma))
    )


def _scale_intensity(op: Any, name: str) -> BatchOp:
    _require(op, name, channel_wise=False)
    lo, hi = _range(op.factors, "factors", name)
    return BatchOp(
        name, op.prob, 1, lambda x, u, rng, s: x * per_sample(1.0 + _between(u[:, 0], lo, hi))
    )


def _shift_intensity(op: Any, name: str) -> BatchOp:
    _require(op, name, channel_wise=False)
    lo, hi = _range(op.offsets, "offsets", name)
    return BatchOp(name, op.prob, 1, lambda x, u, rng, s: x + per_sample(_between(u[:, 0], lo, hi)))


def _gaussian_noise(op: Any, name: str) -> BatchOp:
    _require(op, name, sample_std=True)
    mean, std = float(op.mean), float(op.std)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        # MONAI draws the image's std from U(0, std), then the noise from N(mean, that std).
        sd = per_sample(_between(u[:, 0], 0.0, std))
        return x + mean + sd * rng.normal(s, x.shape[1:], x.device)

    return BatchOp(name, op.prob, 1, fn)


def _rician_noise(op: Any, name: str) -> BatchOp:
    _require(op, name, sample_std=True, relative=False, channel_wise=False)
    mean, std = float(op.mean), float(op.std)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        sd = per_sample(_between(u[:, 0], 0.0, std))
        n = rng.normal(s, (2, *x.shape[1:]), x.device)  # (B, 2, C, H, W)
        return torch.sqrt((x + mean + sd * n[:, 0]) ** 2 + (mean + sd * n[:, 1]) ** 2)

    return BatchOp(name, op.prob, 1, fn)


def _gaussian_smooth(op: Any, name: str) -> BatchOp:
    _require(op, name, approx="erf")
    sx = _range(op.sigma_x, "sigma_x", name)
    sy = _range(op.sigma_y, "sigma_y", name)
    tail = int(max(max(sx[1], sy[1]) * 4.0, 0.5) + 0.5)  # MONAI's truncation at 4 sigma

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        # sigma_x is MONAI's first spatial axis (rows), sigma_y the second.
        return gaussian_smooth(x, _between(u[:, 0], *sx), _between(u[:, 1], *sy), tail)

    return BatchOp(name, op.prob, 2, fn)


def _bias_field(op: Any, name: str) -> BatchOp:
    degree = int(op.degree)
    lo, hi = _range(op.coeff_range, "coeff_range", name)
    n_coeff = (degree + 1) * (degree + 2) // 2

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        return bias_field(x, _between(u, lo, hi), degree)

    return BatchOp(name, op.prob, n_coeff, fn)


# Library op -> builder of its batched version, reading the ranges off the library's instance.
_TRANSLATIONS: dict[type, Callable[[Any, str], BatchOp]] = {
    A.HorizontalFlip: _flip(-1),
    A.VerticalFlip: _flip(-2),
    A.RandomRotate90: _rotate90,
    A.Affine: _affine,
    A.MultiplicativeNoise: _multiplicative_noise,
    A.RandomBrightnessContrast: _brightness_contrast,
    A.ColorJitter: _color_jitter,
    HEDJitter: _hed_jitter,
    mt.RandAdjustContrast: _adjust_contrast,
    mt.RandScaleIntensity: _scale_intensity,
    mt.RandShiftIntensity: _shift_intensity,
    mt.RandGaussianNoise: _gaussian_noise,
    mt.RandRicianNoise: _rician_noise,
    mt.RandGaussianSmooth: _gaussian_smooth,
    mt.RandBiasField: _bias_field,
}


def translate(spec: OpSpec) -> BatchOp:
    """The batched version of one preset entry; ``ValueError`` if it has none."""
    op = spec.build()
    builder = _TRANSLATIONS.get(type(op))
    if builder is None:
        raise ValueError(
            f"{type(op).__name__} has no on-device version; use augment_on='workers' or add a "
            "translation to medvit.data.batch_transforms._TRANSLATIONS."
        )
    return builder(op, type(op).__name__)


class RawImage:
    """Worker-side half of ``augment_on="device"``: a uint8 image as a (C, H, W) uint8 tensor.

    Args:
        in_chans: the model's channels, 1 or 3, only to refuse RGB input for a grey model.
    """

    def __init__(self, in_chans: Channels = 1) -> None:
        if isinstance(in_chans, bool) or in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}.")
        self.in_chans = in_chans

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        img = validate_image(image, self.in_chans)
        if img.ndim == 2:
            return torch.from_numpy(np.ascontiguousarray(img[None]))  # (1, H, W)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (3, H, W)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans})"


class BatchAugment(torch.nn.Module):
    """Device half of ``augment_on="device"``: a preset on uint8 batches, then resize, normalise.

    The arguments are :class:`~medvit.data.transforms.MedTransform`'s, without ``train`` (this
    is the training transform) and ``seed`` (the training sampler seeds each sample).
    """

    def __init__(
        self,
        preset: Preset,
        img_size: int,
        in_chans: Channels = 1,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        mean_arr, inv_std = check_output_args(preset, img_size, in_chans, mean, std)
        self.preset, self.img_size, self.in_chans = preset, int(img_size), int(in_chans)
        self.ops = [translate(spec) for spec in PRESET_OPS[preset]]
        self.register_buffer("mean", torch.from_numpy(mean_arr).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "inv_std", torch.from_numpy(inv_std).view(1, -1, 1, 1), persistent=False
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: (B, C, H, W) uint8, C = 1 or 3.
            seeds: (B,) per-sample seeds from the training sampler, best left on the CPU
                (seeds on a GPU are copied back, which waits for the GPU).

        Returns:
            (B, in_chans, img_size, img_size) float32, normalised.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                "BatchAugment expects (B, C, H, W) uint8 images with C = 1 or 3, got "
                f"{images.dtype} of shape {tuple(images.shape)}."
            )
        if images.shape[1] == 3 and self.in_chans == 1:
            raise ValueError("got an RGB batch but in_chans=1; use in_chans=3.")
        if seeds.shape != images.shape[:1]:
            raise ValueError(
                f"need one seed per image: {tuple(seeds.shape)} seeds for {len(images)} images."
            )
        # Parameters are drawn where the seeds are; on the host that needs no device sync.
        rng = BatchRandom(seeds if seeds.device.type == "cpu" else seeds.cpu())
        x = images.to(torch.float32) / 255.0
        for i, op in enumerate(self.ops):
            x = op(x, rng, stream=i)
        h, w = x.shape[-2:]
        if (h, w) != (self.img_size, self.img_size):
            if h * w > self.img_size**2:
                rows = area_matrix(h, self.img_size, x.device)  # (S, H)
                cols = area_matrix(w, self.img_size, x.device)  # (S, W)
                x = rows @ x @ cols.T  # (B, C, S, S)
            else:  # the same half-pixel bilinear as OpenCV's INTER_LINEAR
                x = F.interpolate(x, (self.img_size, self.img_size), mode="bilinear")
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        if self.mean.device != x.device:
            self.to(x.device)  # once: the DataModule is not a module, so nothing moves us
        return ((x - self.mean) * self.inv_std).contiguous()

    def extra_repr(self) -> str:
        ops = ", ".join(map(repr, self.ops))
        return (
            f"preset={self.preset!r}, img_size={self.img_size}, in_chans={self.in_chans}, [{ops}]"
        )


def build_batch_transforms(
    preset: Preset,
    img_size: int,
    in_chans: Channels = 1,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
) -> tuple[RawImage, BatchAugment]:
    """The two halves of on-device augmentation for a preset: worker side and device side.

    The arguments are :class:`BatchAugment`'s.

    Returns:
        ``(RawImage, BatchAugment)``: per-sample uint8 conversion, batched augmentation.

    Raises:
        ValueError: On an unknown preset, a preset op without a batched version, or bad sizes,
            channels or statistics.
    """
    if preset in PRESETS_3D:
        raise ValueError(
            f"preset {preset!r} is for 3D volumes, which augment_on='device' does not batch: "
            "use --data.augment_on workers."
        )
    return RawImage(in_chans), BatchAugment(preset, img_size, in_chans, mean, std)
