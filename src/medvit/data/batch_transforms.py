"""The augmentation presets run on whole batches on the training device, after the transfer.

Per-sample augmentation in DataLoader workers (:mod:`medvit.data.transforms`) is the default. At
224 px one fast GPU consumes images faster than the host's cores can augment them one at a time;
with ``MedMNISTDataModule(augment_on="device")`` the workers only read uint8 images and
:class:`BatchAugment` runs the preset on each batch once it is on the device (the DataModule's
``on_after_batch_transfer``). Uint8 batches are also 4x cheaper to move than float32 ones.

There is one preset table, ``transforms._PRESET_OPS``. Each of its entries, an albumentations or
MONAI op, is instantiated and translated here into a batched torch op. The translation reads the
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

from medvit.data.transforms import (
    _HE_FROM_RGB,
    _PRESET_OPS,
    _RGB_FROM_HE,
    HEDJitter,
    _OpSpec,
    check_output_args,
    validate_image,
)

__all__ = [
    "BatchAugment",
    "BatchRandom",
    "RawImage",
    "build_batch_transforms",
]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2**32 / phi: the Weyl increment that spreads consecutive counters
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as cv2.COLOR_RGB2GRAY


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """Low 32 bits of ``x * c`` for x in [0, 2**32), with no int64 overflow on any device."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 finaliser (C. Wellons): a bijective 32-bit hash with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_IMAGE_STREAMS = 1 << 20  # offset of the streams that seed noise images
_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    """One reusable generator per device; re-seeding it is cheaper than creating one."""
    if device not in _GENERATORS:
        _GENERATORS[device] = torch.Generator(device=device)
    return _GENERATORS[device]


class BatchRandom:
    """Random numbers for a batch, one independent sequence per sample seed.

    ``uniform`` is counter-based: a hash of (sample seed, stream, counter). ``field`` and
    ``normal`` draw whole images from torch's generator on the target device, seeded per sample
    with such a hash. Nothing a sample gets depends on the rest of its batch.

    Args:
        seeds: (B,) integer tensor of per-sample seeds in [0, 2**32); keep it on the CPU.
    """

    def __init__(self, seeds: torch.Tensor) -> None:
        if seeds.ndim != 1 or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise ValueError(
                f"seeds must be a 1-D integer tensor (one per sample), got {seeds.dtype} "
                f"of shape {tuple(seeds.shape)}."
            )
        self.seeds = seeds.to(torch.int64) & _MASK32
        self.device = seeds.device

    def subset(self, rows: torch.Tensor) -> BatchRandom:
        """The same sequences for the samples ``rows`` only."""
        return BatchRandom(self.seeds[rows])

    def _bits(self, stream: int, n: int) -> torch.Tensor:
        """(B, n) int64 hashes in [0, 2**32)."""
        key = _mix32((self.seeds + (_mix32(torch.tensor(stream + 1)).item())) & _MASK32)
        counter = _mul32(torch.arange(n, device=self.device, dtype=torch.int64), _GOLDEN)
        return _mix32((key[:, None] + counter) & _MASK32)

    def uniform(self, stream: int, n: int) -> torch.Tensor:
        """(B, n) float32 uniforms in the open interval (0, 1)."""
        # 23 bits plus a half: exactly representable in float32, so never 0 and never 1.
        return ((self._bits(stream, n) >> 9).to(torch.float32) + 0.5) * (2.0**-23)

    def _images(
        self, stream: int, shape: Sequence[int], device: torch.device, fill: Callable
    ) -> torch.Tensor:
        out = torch.empty((len(self.seeds), *shape), device=device)
        gen = _generator(torch.device(device))
        # A stream of its own, so the generator's seed is not the op's firing coin.
        keys = self._bits(stream + _IMAGE_STREAMS, 1)[:, 0]
        for row, key in enumerate(keys.tolist()):
            gen.manual_seed(key)
            fill(out[row], gen)
        return out

    def field(
        self, stream: int, shape: Sequence[int], low: float, high: float, device: torch.device
    ) -> torch.Tensor:
        """(B, *shape) float32 uniforms in [low, high) on ``device``."""
        return self._images(stream, shape, device, lambda t, g: t.uniform_(low, high, generator=g))

    def normal(self, stream: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """(B, *shape) standard normal float32 values on ``device``."""
        return self._images(stream, shape, device, lambda t, g: t.normal_(generator=g))


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over (B, C, H, W)."""
    return v.view(-1, 1, 1, 1)


def _between(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


# ------------------------------------------------------------------ ops with explicit parameters
def rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each square image by ``k[b] * 90`` degrees counter-clockwise, like ``np.rot90``."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"RandomRotate90 on a batch needs square images, got {tuple(x.shape)}.")
    k = _per_sample(k)
    x_t = x.transpose(-2, -1)
    out = torch.where(k == 1, x_t.flip(-2), x)
    out = torch.where(k == 2, x.flip(-2, -1), out)
    return torch.where(k == 3, x_t.flip(-1), out)


def affine(
    x: torch.Tensor,
    angle: torch.Tensor,
    scale_x: torch.Tensor,
    scale_y: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
    padding_mode: str = "zeros",
    fill: float = 0.0,
) -> torch.Tensor:
    """Rotate (degrees), scale and shift (fraction of the side) each image about its centre.

    Args:
        x: (B, C, H, W) float images.
        angle, scale_x, scale_y, shift_x, shift_y: (B,) parameters per image.
        padding_mode: ``"zeros"`` (constant ``fill``) or ``"reflection"``.
        fill: value outside the image for ``"zeros"``, on the image's own scale.
    """
    rad = angle * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # grid_sample maps output to input coordinates in [-1, 1], so invert M = S R and the shift
    # (a shift of t * side is 2 t in normalised units).
    inv = torch.stack(
        [
            torch.stack([cos / scale_x, sin / scale_x], -1),
            torch.stack([-sin / scale_y, cos / scale_y], -1),
        ],
        -2,
    )  # (B, 2, 2)
    shift = torch.stack([2.0 * shift_x, 2.0 * shift_y], -1)  # (B, 2)
    theta = torch.cat([inv, -(inv @ shift[..., None])], -1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if padding_mode == "zeros" and fill:
        return F.grid_sample(x - fill, grid, "bilinear", "zeros", align_corners=False) + fill
    return F.grid_sample(x, grid, "bilinear", padding_mode, align_corners=False)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma."""
    w = x.new_tensor(_GREY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns (HSV, as ``cv2``)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    mn, _ = x.min(1)
    delta = v - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        v == r,
        ((g - b) / safe) % 6.0,
        torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB with the branch-free formula: channel n takes v - delta * clamp(min(k, 4 - k)).
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        out.append(v - delta * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, 1)


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
) -> torch.Tensor:
    """albumentations' ColorJitter formulas on RGB in [0, 1], in this fixed order."""
    x = (x * _per_sample(brightness)).clamp(0.0, 1.0)
    mean = _per_sample(grey(x).mean((1, 2, 3)))
    c = _per_sample(contrast)
    x = (x * c + mean * (1.0 - c)).clamp(0.0, 1.0)
    s = _per_sample(saturation)
    x = (x * s + grey(x) * (1.0 - s)).clamp(0.0, 1.0)
    return adjust_hue(x, hue).clamp(0.0, 1.0)


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``HEDJitter`` on RGB batches in [0, 1]; ``scale`` and ``shift`` are (B, 2) for H and E."""
    he_from_rgb = x.new_tensor(_HE_FROM_RGB)  # (3, 2)
    rgb_from_he = x.new_tensor(_RGB_FROM_HE)  # (2, 3)
    od = -torch.log((x.clamp(0.0, 1.0) * 255.0 + 1.0) / 256.0).permute(0, 2, 3, 1)  # (B, H, W, 3)
    conc = od @ he_from_rgb  # (B, H, W, 2)
    delta = conc * (scale - 1.0)[:, None, None, :] + shift[:, None, None, :]
    od = od + delta @ rgb_from_he
    rgb = torch.clamp(torch.exp(-od) * 256.0 - 1.0, 0.0, 255.0) / 255.0
    return rgb.permute(0, 3, 1, 2)  # (B, 3, H, W)


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's ``AdjustContrast``: gamma on the image rescaled to its own [min, max]."""
    lo = x.amin((1, 2, 3), keepdim=True)
    span = x.amax((1, 2, 3), keepdim=True) - lo
    return ((x - lo) / (span + 1e-7)) ** _per_sample(gamma) * span + lo


def gaussian_kernels(sigma: torch.Tensor, tail: int) -> torch.Tensor:
    """(B, 2 tail + 1) MONAI ``erf`` Gaussian kernels; taps beyond 4 sigma are ~0."""
    t = torch.arange(-tail, tail + 1, device=sigma.device, dtype=torch.float32)
    s = 0.70710678 / sigma.abs()[:, None]
    return (0.5 * (torch.erf(s * (t + 0.5)) - torch.erf(s * (t - 0.5)))).clamp(min=0)


def gaussian_smooth(
    x: torch.Tensor, sigma_h: torch.Tensor, sigma_w: torch.Tensor, tail: int
) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per image, zero padding as MONAI's ``GaussianFilter``."""
    b, c, h, w = x.shape
    k_h = gaussian_kernels(sigma_h, tail).repeat_interleave(c, 0)  # (B * C, K)
    k_w = gaussian_kernels(sigma_w, tail).repeat_interleave(c, 0)
    # One grouped convolution runs every image with its own kernel.
    y = x.reshape(1, b * c, h, w)  # (1, B * C, H, W)
    y = F.conv2d(F.pad(y, (0, 0, tail, tail)), k_h[:, None, :, None], groups=b * c)
    y = F.conv2d(F.pad(y, (tail, tail, 0, 0)), k_w[:, None, None, :], groups=b * c)
    return y.view(b, c, h, w)


def area_matrix(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_out, n_in) weights of OpenCV's INTER_AREA shrink along one axis.

    Each output pixel averages the input pixels under it, weighted by how much of each it
    covers; ``F.interpolate(mode="area")`` instead pools whole pixels, which differs for
    non-integer factors.
    """
    scale = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64, device=device)[:, None] * scale
    j = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    overlap = (torch.minimum(lo + scale, j + 1) - torch.maximum(lo, j)).clamp(min=0)
    return (overlap / scale).to(torch.float32)


def _legendre(n: int, degree: int, device: torch.device) -> torch.Tensor:
    """(degree + 1, n) Legendre polynomials on ``linspace(-1, 1, n)`` (Bonnet's recursion)."""
    t = torch.linspace(-1.0, 1.0, n, device=device)
    p = [torch.ones_like(t), t]
    for k in range(1, degree):
        p.append(((2 * k + 1) * t * p[k] - k * p[k - 1]) / (k + 1))
    return torch.stack(p[: degree + 1])


def bias_field(x: torch.Tensor, coeff: torch.Tensor, degree: int) -> torch.Tensor:
    """MONAI's ``RandBiasField`` field for given coefficients: ``x * exp(leggrid2d(...))``."""
    b, _, h, w = x.shape
    mat = x.new_zeros(b, degree + 1, degree + 1)
    rows, cols = np.tril_indices(degree + 1)  # MONAI's coefficient layout
    mat[:, rows, cols] = coeff
    field = torch.einsum(
        "bij,ih,jw->bhw", mat, _legendre(h, degree, x.device), _legendre(w, degree, x.device)
    )
    return x * torch.exp(field)[:, None]


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
        return x * _per_sample(alpha) + _per_sample(beta)

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
        name, op.prob, 1, lambda x, u, rng, s: x * _per_sample(1.0 + _between(u[:, 0], lo, hi))
    )


def _shift_intensity(op: Any, name: str) -> BatchOp:
    _require(op, name, channel_wise=False)
    lo, hi = _range(op.offsets, "offsets", name)
    return BatchOp(
        name, op.prob, 1, lambda x, u, rng, s: x + _per_sample(_between(u[:, 0], lo, hi))
    )


def _gaussian_noise(op: Any, name: str) -> BatchOp:
    _require(op, name, sample_std=True)
    mean, std = float(op.mean), float(op.std)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        # MONAI draws the image's std from U(0, std), then the noise from N(mean, that std).
        sd = _per_sample(_between(u[:, 0], 0.0, std))
        return x + mean + sd * rng.normal(s, x.shape[1:], x.device)

    return BatchOp(name, op.prob, 1, fn)


def _rician_noise(op: Any, name: str) -> BatchOp:
    _require(op, name, sample_std=True, relative=False, channel_wise=False)
    mean, std = float(op.mean), float(op.std)

    def fn(x: torch.Tensor, u: torch.Tensor, rng: BatchRandom, s: int) -> torch.Tensor:
        sd = _per_sample(_between(u[:, 0], 0.0, std))
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


def translate(spec: _OpSpec) -> BatchOp:
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

    def __init__(self, in_chans: int = 1) -> None:
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

    Args:
        preset: One of ``PRESETS``.
        img_size: Output height and width in pixels (>= 8).
        in_chans: Output channels, 1 or 3; grey batches are repeated to 3 channels.
        mean: Normalisation mean on the [0, 1] scale, length 1 or ``in_chans``.
        std: Normalisation std on the [0, 1] scale, length 1 or ``in_chans``, all > 0.
    """

    def __init__(
        self,
        preset: str,
        img_size: int,
        in_chans: int = 1,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        mean_arr, inv_std = check_output_args(preset, img_size, in_chans, mean, std)
        self.preset, self.img_size, self.in_chans = preset, int(img_size), int(in_chans)
        self.ops = [translate(spec) for spec in _PRESET_OPS[preset]]
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
    preset: str,
    img_size: int,
    in_chans: int = 1,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
) -> tuple[RawImage, BatchAugment]:
    """The two halves of on-device augmentation for a preset: worker side and device side.

    Args:
        preset: One of ``PRESETS`` (``preset_for_flag`` maps a MedMNIST flag to one).
        img_size: Output height and width in pixels (>= 8).
        in_chans: Model input channels, 1 or 3.
        mean: Normalisation mean on the [0, 1] scale, length 1 or ``in_chans``.
        std: Normalisation std on the [0, 1] scale, length 1 or ``in_chans``.

    Returns:
        ``(RawImage, BatchAugment)``: per-sample uint8 conversion, batched augmentation.

    Raises:
        ValueError: On an unknown preset, a preset op without a batched version, or bad sizes,
            channels or statistics.
    """
    return RawImage(in_chans), BatchAugment(preset, img_size, in_chans, mean, std)
