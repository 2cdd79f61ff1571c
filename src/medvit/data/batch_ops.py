"""Batched tensor ops for on-device augmentation, each with explicit per-image parameters.

:mod:`medvit.data.batch_transforms` translates the preset table into these: it draws every
image's parameters from :class:`BatchRandom` and calls the op on the images that fire. Each op
applies the formula of the albumentations or MONAI op it stands for, on (B, C, H, W) float
batches in [0, 1]; ``tests/test_batch_transforms.py`` compares them with the libraries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medvit.data.presets import HE_FROM_RGB, RGB_FROM_HE

__all__ = [
    "BatchRandom",
    "adjust_contrast",
    "adjust_hue",
    "affine",
    "area_matrix",
    "bias_field",
    "color_jitter",
    "gaussian_kernels",
    "gaussian_smooth",
    "grey",
    "hed_jitter",
    "per_sample",
    "rot90",
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


def per_sample(v: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over (B, C, H, W)."""
    return v.view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------ the ops
def rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each square image by ``k[b] * 90`` degrees counter-clockwise, like ``np.rot90``."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"RandomRotate90 on a batch needs square images, got {tuple(x.shape)}.")
    k = per_sample(k)
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
    x = (x * per_sample(brightness)).clamp(0.0, 1.0)
    mean = per_sample(grey(x).mean((1, 2, 3)))
    c = per_sample(contrast)
    x = (x * c + mean * (1.0 - c)).clamp(0.0, 1.0)
    s = per_sample(saturation)
    x = (x * s + grey(x) * (1.0 - s)).clamp(0.0, 1.0)
    return adjust_hue(x, hue).clamp(0.0, 1.0)


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``HEDJitter`` on RGB batches in [0, 1]; ``scale`` and ``shift`` are (B, 2) for H and E."""
    he_from_rgb = x.new_tensor(HE_FROM_RGB)  # (3, 2)
    rgb_from_he = x.new_tensor(RGB_FROM_HE)  # (2, 3)
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
    return ((x - lo) / (span + 1e-7)) ** per_sample(gamma) * span + lo


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
