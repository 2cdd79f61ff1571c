"""The per-volume transform: a 3D preset run in the DataLoader workers, then resize and normalise.

:class:`MedTransform3D` is :class:`~medvit.data.transforms.MedTransform` for volumes: the same
seeding (one shared MONAI generator re-seeded per sample by the training sampler, re-seeded per
worker otherwise), the same scaling to [0, 1] before the MONAI ops so their noise and contrast
parameters do not depend on bit depth, the same channel repeat and normalisation. 3D presets
hold MONAI array ops only (``RandAffine``, ``RandFlip``, ``Rand3DElastic``, intensity and
noise), which work on channel-first (C, D, H, W) tensors. ``build_transforms`` returns one for
a 3D preset or ``spatial_dims=3``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta

from medvit.data.transforms import MedTransform

__all__ = ["MedTransform3D", "validate_volume"]


class MedTransform3D(MedTransform):
    """Callable uint8 volume (D, H, W) -> normalised float32 tensor (in_chans, S, S, S).

    Steps per call: validate input; scale to float32 [0, 1]; if ``train``, run the preset's
    MONAI ops on the (1, D, H, W) volume and clip back to [0, 1]; resize to ``img_size`` per side
    if needed (trilinear; average pooling when shrinking by a whole factor, which is area
    resampling); repeat to ``in_chans``; normalise with ``mean``/``std``.

    The arguments are :class:`~medvit.data.transforms.MedTransform`'s; ``img_size`` is the side
    of the output cube and ``preset`` is ``"none"`` or one of ``PRESETS_3D``.
    """

    spatial_dims = 3

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Transform one volume.

        Args:
            image: uint8 array of shape (D, H, W) or (D, H, W, 1) (grey).

        Returns:
            Contiguous float32 tensor of shape (in_chans, img_size, img_size, img_size).
        """
        vol = validate_volume(image)
        x = torch.from_numpy(vol.astype(np.float32))[None]  # (1, D, H, W)
        x.mul_(1.0 / 255.0)
        if self._random and self._monai is not None:
            self._reseed_for_worker()
            x = self._run_monai3d(x)
        x = resize_volume(x, self.img_size)
        if x.shape[0] != self.in_chans:
            x = x.expand(self.in_chans, *x.shape[1:])
        mean = torch.from_numpy(self._mean).view(-1, 1, 1, 1)
        inv_std = torch.from_numpy(self._inv_std).view(-1, 1, 1, 1)
        return ((x - mean) * inv_std).contiguous()

    def _run_monai3d(self, x: torch.Tensor) -> torch.Tensor:
        # MetaTensor bookkeeping is useless here and slow; scope the global flag as in 2D.
        previous = get_track_meta()
        set_track_meta(False)
        try:
            out = self._monai(x)
        finally:
            set_track_meta(previous)
        out = torch.as_tensor(out, dtype=torch.float32)
        # Noise, gamma and interpolation can leave the valid intensity range.
        return out.clamp_(0.0, 1.0)

    def _validate(self, image: Any) -> np.ndarray:
        return validate_volume(image)

    def __repr__(self) -> str:
        text = super().__repr__()
        side = self.img_size
        old = f"resize -> {side}x{side} (area down, bilinear up)"
        return text.replace(old, f"resize -> {side}^3 (area down by whole factors, else trilinear)")


def resize_volume(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (C, D, H, W) float volume to (C, size, size, size).

    Whole-factor shrinking (64 -> 32) averages blocks (area resampling, no aliasing); anything
    else is trilinear.
    """
    if tuple(x.shape[1:]) == (size, size, size):
        return x
    factors = {s // size for s in x.shape[1:] if s % size == 0}
    if len(factors) == 1 and all(s % size == 0 for s in x.shape[1:]):
        return F.avg_pool3d(x[None], kernel_size=factors.pop())[0]
    return F.interpolate(x[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]


def validate_volume(image: Any) -> np.ndarray:
    """Check one input volume; (D, H, W, 1) becomes (D, H, W).

    Raises:
        ValueError: If it is not a non-empty uint8 (D, H, W) array (a 2D image gets a line
            saying the data is 2D).
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(
            "expected a numpy.ndarray of dtype uint8 with shape (D, H, W), got "
            f"{type(image).__module__}.{type(image).__qualname__}; convert with np.asarray()."
        )
    if image.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8, got {image.dtype} with shape {image.shape}.")
    if image.ndim == 4 and image.shape[3] == 1:
        image = image[..., 0]
    if image.ndim != 3 or image.shape[2] == 3:  # (H, W, 3) is an RGB image
        raise ValueError(
            f"expected a grey volume of shape (D, H, W), got {image.shape}: a 2D image needs "
            "a 2D model and preset (spatial_dims 2)."
        )
    if min(image.shape) == 0:
        raise ValueError(f"expected a non-empty volume, got shape {image.shape}.")
    return image
