"""The per-image transform: a preset run in the DataLoader workers, then resize and normalise.

``build_transforms`` is the single entry point, in the spirit of timm's ``create_transform``: it
maps a preset name (see :mod:`medvit.data.presets`; ``preset_for_flag`` picks one for a MedMNIST
flag) to a ``MedTransform`` that turns a uint8 image into a normalised float32 tensor ready for
a ViT.

Library split: albumentations runs first on the uint8 HWC image (geometry, photographic colour,
H&E stain jitter, speckle), MONAI runs second on the float32 channel-first image in [0, 1]
(radiology-style intensity, noise and blur).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import monai.transforms as mt
import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta

from medvit.data.presets import (
    MODALITY_BY_FLAG,
    PRESET_OPS,
    PRESETS,
    PRESETS_2D,
    PRESETS_3D,
    HEDJitter,
    OpSpec,
    Preset,
    preset_for_flag,
    preset_spatial_dims,
)

__all__ = [
    "MODALITY_BY_FLAG",
    "HEDJitter",
    "PRESETS",
    "MedTransform",
    "build_transforms",
    "check_output_args",
    "preset_for_flag",
    "validate_image",
]

#: Model input channels: grey, or RGB (grey images are repeated to 3 channels).
Channels = Literal[1, 3]

_MIN_IMG_SIZE = 8
PRESETS_BY_DIMS = {2: PRESETS_2D, 3: PRESETS_3D}
_SEED_BOUND = 2**32  # MONAI's MAX_SEED; keeps default seeds valid for every backend


def _stats(name: str, values: Sequence[float], in_chans: int) -> np.ndarray:
    """Validate mean or std and return it as a float32 vector broadcastable over HWC."""
    try:
        arr = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}.") from exc
    if arr.size not in (1, in_chans):
        raise ValueError(
            f"{name} must have length 1 or in_chans={in_chans}, got length {arr.size}: {values!r}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {values!r}.")
    return arr


def check_output_args(
    preset: str, img_size: Any, in_chans: Any, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Check what every transform of a preset shares; returns float32 ``(mean, 1 / std)``.

    Raises:
        ValueError: On an unknown preset, ``img_size`` not an int >= 8, ``in_chans`` not 1 or 3,
            or ``mean``/``std`` of the wrong length, not finite, or (std) not positive.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)):
        raise ValueError(f"img_size must be an int >= {_MIN_IMG_SIZE}, got {img_size!r}.")
    if img_size < _MIN_IMG_SIZE:
        raise ValueError(f"img_size must be >= {_MIN_IMG_SIZE}, got {img_size}.")
    if isinstance(in_chans, bool) or in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}.")
    mean_arr = _stats("mean", mean, int(in_chans))
    std_arr = _stats("std", std, int(in_chans))
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be > 0, got {std!r}.")
    return mean_arr, (1.0 / std_arr).astype(np.float32)


class MedTransform:
    """Callable uint8 image -> normalised float32 tensor, with optional modality augmentation.

    Steps per call: validate input; if ``train``, run the preset's albumentations ops (uint8 HWC)
    then its MONAI ops (float32 CHW in [0, 1], clipped back to [0, 1]); resize to ``img_size``
    if needed (area when shrinking, bilinear when enlarging); repeat grey to ``in_chans``;
    normalise with ``mean``/``std``. Scaling to [0, 1] happens before MONAI ops so their noise
    and contrast parameters are resolution- and bit-depth-independent; channel expansion happens
    before normalisation so per-channel (e.g. ImageNet) stats work on grey input.

    Randomness: every random op draws from generators seeded by ``set_random_state``, which is
    cheap enough (tens of microseconds) to call before every sample. Inside a torch DataLoader
    worker the generators are re-seeded once per worker from the worker's torch seed unless
    ``set_random_state`` was called in that worker (per sample, by a ``worker_init_fn`` or by
    MONAI's DataLoader), so workers and epochs differ while staying reproducible under
    ``torch.manual_seed``.

    Args:
        preset: One of ``PRESETS`` (``preset_for_flag`` maps a MedMNIST flag to one).
        img_size: Output height and width in pixels (>= 8).
        train: Apply the preset's random augmentation; ``False`` is fully deterministic.
        in_chans: Output channels, 1 or 3; grey input is repeated to 3 channels.
        mean: Normalisation mean on the [0, 1] scale, length 1 or ``in_chans``.
        std: Normalisation std on the [0, 1] scale, length 1 or ``in_chans``, all > 0.
        seed: Seed for the random ops; ``None`` draws one from the global torch RNG (only if
            there are random ops), so ``torch.manual_seed`` makes construction reproducible.
    """

    #: 2 for images; :class:`~medvit.data.transforms3d.MedTransform3D` transforms volumes.
    spatial_dims = 2

    def __init__(
        self,
        preset: Preset,
        img_size: int,
        train: bool,
        in_chans: Channels = 1,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        seed: int | None = None,
    ) -> None:
        self._mean, self._inv_std = check_output_args(preset, img_size, in_chans, mean, std)
        if preset_spatial_dims(preset) not in (None, self.spatial_dims):
            kind = "3D volumes" if self.spatial_dims == 2 else "2D images"
            raise ValueError(
                f"preset {preset!r} is for {kind}, but this transform gets "
                f"{self.spatial_dims}D input; pick one of {PRESETS_BY_DIMS[self.spatial_dims]}."
            )
        self.preset = preset
        self.train = bool(train)
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)

        specs = PRESET_OPS[preset] if self.train else ()
        self._specs = specs
        # Separate grey pipeline without colour ops; both share one RNG so the stream is defined
        # by call order alone. Built once here: constructing ops per call is too slow in workers.
        self._alb_rgb = self._albumentations(specs, colour=True)
        self._alb_grey = self._albumentations(specs, colour=False)
        monai_ops = [s.build() for s in specs if s.lib == "monai"]
        self._monai = mt.Compose(monai_ops) if monai_ops else None
        self._random = bool(specs)
        self._share_generators()
        self._worker_key: tuple[int, int] | None = None
        self._seed = 0
        if seed is None:
            # Deterministic transforms leave the global torch stream untouched.
            seed = int(torch.randint(0, _SEED_BOUND, (1,)).item()) if self._random else 0
        self.set_random_state(seed)

    @staticmethod
    def _albumentations(specs: Sequence[OpSpec], colour: bool) -> A.Compose | None:
        ops = [s.build() for s in specs if s.lib == "albumentations" and (colour or not s.colour)]
        # strict=True turns silently ignored (misspelt/renamed) kwargs into errors at build time.
        return A.Compose(ops, strict=True) if ops else None

    def set_random_state(self, seed: int) -> MedTransform:
        """Seed every random op (MONAI and albumentations) so the output stream is reproducible.

        Args:
            seed: Non-negative integer seed.

        Returns:
            ``self``, for chaining.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        self._seed = int(seed)
        self._seed_ops(np.random.SeedSequence(self._seed))
        # Marks an explicit seeding inside a worker (e.g. a worker_init_fn) as authoritative.
        self._worker_key = _current_worker_key()
        return self

    def _share_generators(self) -> None:
        """Point every random op at one generator per library, created once.

        The data module re-seeds per sample, so seeding must be cheap: constructing a
        ``RandomState`` per MONAI op (what ``Compose.set_random_state`` does) costs ~100x more
        than re-seeding one in place. Sharing also keeps ops decorrelated, unlike albumentations'
        ``Compose.set_random_seed``, which hands every op an identically seeded generator (so
        HorizontalFlip and VerticalFlip would always fire together).
        """
        self._monai_rs = np.random.RandomState()
        self._alb_rng = np.random.default_rng()
        self._alb_py = random.Random()
        if self._monai is not None:
            for op in self._monai.transforms:
                if isinstance(op, mt.Randomizable):
                    op.set_random_state(state=self._monai_rs)
        for compose in (self._alb_rgb, self._alb_grey):
            if compose is not None:
                compose.set_random_state(self._alb_rng, self._alb_py)

    def _seed_ops(self, seq: np.random.SeedSequence) -> None:
        monai_seed, alb_seed = (int(s) for s in seq.generate_state(2))
        self._monai_rs.seed(monai_seed)
        self._alb_rng.bit_generator.state = np.random.PCG64(alb_seed).state
        self._alb_py.seed(alb_seed)

    def _reseed_for_worker(self) -> None:
        key = _current_worker_key()
        if key != self._worker_key:
            # Forked/spawned workers start from identical copies of our generators; mixing in the
            # per-worker (and per-epoch) torch seed decorrelates them reproducibly.
            self._seed_ops(np.random.SeedSequence([self._seed, key[1] if key else 0]))
            self._worker_key = key

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Transform one image.

        Args:
            image: uint8 array of shape (H, W), (H, W, 1) or (H, W, 3).

        Returns:
            Contiguous float32 tensor of shape (in_chans, img_size, img_size).

        Raises:
            ValueError: If the input is not a uint8 grey/RGB array, or is RGB with in_chans=1.
        """
        img = self._validate(image)
        is_rgb = img.ndim == 3
        if self._random:
            self._reseed_for_worker()
            alb = self._alb_rgb if is_rgb else self._alb_grey
            if alb is not None:
                img = alb(image=img)["image"]

        x = img.astype(np.float32)
        x *= np.float32(1.0 / 255.0)
        if x.ndim == 2:
            x = x[:, :, None]
        if self._random and self._monai is not None:
            x = self._run_monai(x)

        h, w = x.shape[:2]
        if (h, w) != (self.img_size, self.img_size):
            shrink = h * w > self.img_size * self.img_size
            x = cv2.resize(
                np.ascontiguousarray(x),
                (self.img_size, self.img_size),
                interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
            )
            if x.ndim == 2:  # cv2 drops a singleton channel axis
                x = x[:, :, None]
        if x.shape[2] != self.in_chans:
            x = np.repeat(x, self.in_chans, axis=2)
        x = (x - self._mean) * self._inv_std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))

    def _run_monai(self, x: np.ndarray) -> np.ndarray:
        """Apply the MONAI ops to an HWC float image in [0, 1]; returns HWC clipped to [0, 1]."""
        # MetaTensor bookkeeping costs ~40% at 28 px and is useless here; scope the global flag.
        previous = get_track_meta()
        set_track_meta(False)
        try:
            out = self._monai(torch.from_numpy(x).permute(2, 0, 1))
        finally:
            set_track_meta(previous)
        arr = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        arr = np.ascontiguousarray(arr.transpose(1, 2, 0), dtype=np.float32)
        # Noise, gamma and bias field can leave the valid intensity range.
        return np.clip(arr, 0.0, 1.0, out=arr)

    def _validate(self, image: Any) -> np.ndarray:
        return validate_image(image, self.in_chans)

    def __repr__(self) -> str:
        mean = tuple(round(float(m), 4) for m in self._mean)
        std = tuple(round(float(1.0 / s), 4) for s in self._inv_std)
        lines = [
            f"{type(self).__name__}(preset={self.preset!r}, train={self.train}, "
            f"img_size={self.img_size}, in_chans={self.in_chans}, seed={self._seed},"
        ]
        lines += [f"  [{s.lib}{', RGB only' if s.colour else ''}] {s}" for s in self._specs]
        lines.append(
            f"  resize -> {self.img_size}x{self.img_size} (area down, bilinear up), "
            f"scale 1/255, normalize(mean={mean}, std={std}))"
        )
        return "\n".join(lines)


def validate_image(image: Any, in_chans: int) -> np.ndarray:
    """Check one input image for a model with ``in_chans`` channels; (H, W, 1) becomes (H, W).

    Raises:
        ValueError: If it is not a non-empty uint8 (H, W) or (H, W, 3) array, or RGB for
            ``in_chans=1``.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(
            "expected a numpy.ndarray of dtype uint8 with shape (H, W) or (H, W, 3), got "
            f"{type(image).__module__}.{type(image).__qualname__}; convert with np.asarray()."
        )
    if image.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8, got {image.dtype} with shape {image.shape}.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected shape (H, W) or (H, W, 3) (channels last), got {image.shape}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}.")
    if image.ndim == 3 and in_chans == 1:
        raise ValueError(
            f"got an RGB image of shape {image.shape} but in_chans=1; "
            "use in_chans=3 or convert the image to grey."
        )
    return image


def _current_worker_key() -> tuple[int, int] | None:
    info = torch.utils.data.get_worker_info()
    return None if info is None else (info.id, info.seed)


def build_transforms(
    preset: Preset,
    img_size: int,
    train: bool,
    *args: Any,
    spatial_dims: int | None = None,
    **kwargs: Any,
) -> MedTransform:
    """Build the image transform for a modality preset, like timm's ``create_transform``.

    The arguments are :class:`MedTransform`'s (then ``in_chans``, ``mean``, ``std``, ``seed``);
    ``train=False`` gives the deterministic eval transform (resize and normalise
    only), and ``preset_for_flag`` maps a MedMNIST flag to a preset. ``spatial_dims`` (2 or 3;
    ``None``: the preset's) picks :class:`MedTransform` for images or
    :class:`~medvit.data.transforms3d.MedTransform3D` for volumes ((D, H, W) -> (C, D, H, W)).

    Raises:
        ValueError: On an unknown preset, ``img_size < 8``, ``in_chans`` not in (1, 3),
            malformed ``mean``/``std``, or a preset made for the other ``spatial_dims``.
    """
    if spatial_dims is None:
        spatial_dims = preset_spatial_dims(preset) or 2
    if spatial_dims == 3:
        from medvit.data.transforms3d import MedTransform3D

        return MedTransform3D(preset, img_size, train, *args, **kwargs)
    return MedTransform(preset, img_size, train, *args, **kwargs)
