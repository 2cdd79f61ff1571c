"""The augmentation presets: one public table that both augmentation paths read.

A preset is a tuple of :class:`OpSpec`, each one albumentations or MONAI op with its arguments.
:class:`~medvit.data.transforms.MedTransform` builds the ops and runs them per image in the
DataLoader workers; :class:`~medvit.data.batch_transforms.BatchAugment` builds the same ops and
translates each into a batched torch op on the training device. Changing an op here changes it
on both paths.

Also here: ``MODALITY_BY_FLAG`` (the preset of each MedMNIST flag) and the H&E stain matrices
with :class:`HEDJitter`, the stain op the histopathology preset uses.

The 3D presets (one per MedMNIST 3D flag, ``PRESETS_3D``) are MONAI array ops on float32
(C, D, H, W) volumes in [0, 1]; :class:`~medvit.data.transforms3d.MedTransform3D` runs them in
the workers. The batched on-device path is 2D only (see ``batch_transforms``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import albumentations as A
import cv2
import monai.transforms as mt
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema

__all__ = [
    "HE_FROM_RGB",
    "MODALITY_BY_FLAG",
    "PRESETS",
    "PRESETS_2D",
    "PRESETS_3D",
    "PRESET_OPS",
    "RGB_FROM_HE",
    "RGB_FROM_HED",
    "HEDJitter",
    "OpSpec",
    "Preset",
    "preset_for_flag",
    "preset_spatial_dims",
]

#: The augmentation presets; ``"none"`` only resizes and normalises.
Preset = Literal[
    "none",
    "chest_xray",
    "ultrasound",
    "dermoscopy",
    "fundus",
    "histopathology",
    "ct",
    "oct",
    "microscopy",
    # 3D volumes (C, D, H, W): one per MedMNIST 3D flag.
    "organ3d",
    "nodule3d",
    "adrenal3d",
    "fracture3d",
    "vessel3d",
    "synapse3d",
]
PRESETS: tuple[str, ...] = get_args(Preset)
#: The presets for volumes; ``"none"`` serves images and volumes alike.
PRESETS_3D: tuple[str, ...] = tuple(p for p in PRESETS if p.endswith("3d"))
#: The presets for 2D images (including ``"none"``).
PRESETS_2D: tuple[str, ...] = tuple(p for p in PRESETS if p not in PRESETS_3D)

#: The preset of each MedMNIST 2D flag, by imaging modality.
MODALITY_BY_FLAG: dict[str, Preset] = {
    "pathmnist": "histopathology",
    "chestmnist": "chest_xray",
    "dermamnist": "dermoscopy",
    "octmnist": "oct",
    "pneumoniamnist": "chest_xray",
    "retinamnist": "fundus",
    "breastmnist": "ultrasound",
    # Wright-Giemsa smears are not H&E, but HED-space jitter is still the closest stain model.
    "bloodmnist": "histopathology",
    # Grey kidney cortex microscopy: no stain to jitter, rotation-invariant like other microscopy.
    "tissuemnist": "microscopy",
    "organamnist": "ct",
    "organcmnist": "ct",
    "organsmnist": "ct",
    "organmnist3d": "organ3d",
    "nodulemnist3d": "nodule3d",
    "adrenalmnist3d": "adrenal3d",
    "fracturemnist3d": "fracture3d",
    "vesselmnist3d": "vessel3d",
    "synapsemnist3d": "synapse3d",
}


def preset_spatial_dims(preset: str) -> int | None:
    """3 for a volume preset, 2 for an image preset, ``None`` for ``"none"`` (either)."""
    if preset == "none":
        return None
    return 3 if preset in PRESETS_3D else 2


def preset_for_flag(flag: str) -> Preset:
    """Return the augmentation preset for a MedMNIST dataset flag such as ``"pathmnist"``.

    Args:
        flag: MedMNIST dataset flag (case-insensitive).

    Raises:
        ValueError: If the flag is not a known MedMNIST flag.
    """
    key = flag.strip().lower() if isinstance(flag, str) else flag
    if key not in MODALITY_BY_FLAG:
        raise ValueError(
            f"Unknown MedMNIST flag {flag!r}; known flags: {', '.join(MODALITY_BY_FLAG)}."
        )
    return MODALITY_BY_FLAG[key]


#: Ruifrok & Johnston (2001) stain optical-density vectors, rows H, E, DAB (as skimage.color).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
# Only the H and E columns/rows are needed: DAB and the model residual are left untouched.
#: Optical density (N, 3) -> H and E concentrations (N, 2).
HE_FROM_RGB = np.linalg.inv(RGB_FROM_HED)[:, :2].astype(np.float32)
#: H and E concentrations (N, 2) -> optical density (N, 3).
RGB_FROM_HE = RGB_FROM_HED[:2].astype(np.float32)
# Optical density per uint8 level, offset by one so black stays finite and 255 maps to 0.
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


class HEDJitter(A.ImageOnlyTransform):
    """H&E stain jitter (Tellez et al. 2018) that leaves unjittered colour exactly unchanged.

    Each image draws one scale and one shift per stain; the H and E concentrations of every
    pixel become ``c * scale + shift`` in Ruifrok-Johnston optical-density space. Only the change
    is added back to the pixel's optical density, so the part of the colour the two-stain model
    cannot explain is preserved. (``A.HEStain`` in albumentations 2.0.x instead rebuilds pixels
    from their two-stain projection, which shifts colours even at zero jitter: eosin pink
    (230, 150, 190) comes back as (215, 148, 229) with its "standard" matrix.)

    Args:
        scale_range: Range of the multiplicative factor per stain.
        shift_range: Range of the additive optical-density offset per stain.
        p: Probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        scale_range: tuple[float, float]
        shift_range: tuple[float, float]

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.9, 1.1),
        shift_range: tuple[float, float] = (-0.03, 0.03),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        self.scale_range = scale_range
        self.shift_range = shift_range

    def get_params(self) -> dict[str, np.ndarray]:
        """Draw per-stain scale and shift for H and E."""
        return {
            "scale": self.random_generator.uniform(*self.scale_range, size=2),
            "shift": self.random_generator.uniform(*self.shift_range, size=2),
        }

    def apply(
        self, img: np.ndarray, scale: np.ndarray, shift: np.ndarray, **params: Any
    ) -> np.ndarray:
        """Jitter the H and E concentrations of an RGB uint8 or [0, 1] float image."""
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"HEDJitter needs an RGB (H, W, 3) image, got shape {img.shape}.")
        is_uint8 = img.dtype == np.uint8
        if is_uint8:
            od = _OD_LUT[img]
        else:
            od = -np.log((np.clip(img, 0.0, 1.0).astype(np.float32) * 255.0 + 1.0) / 256.0)
        od = od.reshape(-1, 3)
        conc = od @ HE_FROM_RGB
        delta = conc * (scale - 1.0).astype(np.float32) + shift.astype(np.float32)
        od = od + delta @ RGB_FROM_HE
        rgb = np.clip(np.exp(-od) * 256.0 - 1.0, 0.0, 255.0).reshape(img.shape)
        if is_uint8:
            return np.rint(rgb).astype(np.uint8)
        return (rgb / 255.0).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Names used by albumentations' repr and serialisation."""
        return ("scale_range", "shift_range")


@dataclass(frozen=True)
class OpSpec:
    """Recipe for one random op: kept as data so pipelines can be rebuilt, filtered and printed.

    Attributes:
        lib: the library of ``cls``; albumentations ops run on uint8 HWC images, MONAI ops on
            float32 CHW images in [0, 1].
        cls: the op's class, e.g. ``A.HorizontalFlip`` or ``mt.RandGaussianNoise``.
        kwargs: its constructor arguments; ``p`` (albumentations) or ``prob`` (MONAI) is the
            probability that an image is transformed.
        colour: the op needs a 3-channel colour image; it is skipped for grey input.
    """

    lib: Literal["albumentations", "monai"]
    cls: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    colour: bool = False  # needs a 3-channel colour image; dropped for grey input

    def build(self) -> Any:
        """Instantiate the op."""
        return self.cls(**self.kwargs)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args})"


def _alb(cls: Callable[..., Any], colour: bool = False, **kwargs: Any) -> OpSpec:
    """An albumentations op of the table."""
    return OpSpec("albumentations", cls, kwargs, colour)


def _mon(cls: Callable[..., Any], **kwargs: Any) -> OpSpec:
    """A MONAI op of the table."""
    return OpSpec("monai", cls, kwargs)


# ------------------------------------------------------------------------------ 3D volumes
# Spatial axes of a MedMNIST 3D volume (C, D, H, W): 0 = D (slices, cranio-caudal for the CT
# sets), 1 = H (rows, anterior-posterior), 2 = W (columns, left-right). MedMNIST 3D volumes are
# 28^3 or 64^3, so geometry stays mild: a 1-voxel shift at 28^3 is 3.6%.
_LEFT_RIGHT = 2


def _affine3d(rotate_deg: float, p: float, scale: float = 0.1, shift: float = 0.05) -> OpSpec:
    # Radians about each axis; translate_range is in voxels at 28^3 (1.4 = 5%).
    rad = float(np.deg2rad(rotate_deg))
    return _mon(
        mt.RandAffine,
        prob=p,
        rotate_range=(rad, rad, rad),
        scale_range=(scale, scale, scale),
        translate_range=(28 * shift,) * 3,
        padding_mode="zeros",
    )


def _flips3d(axes: tuple[int, ...]) -> tuple[OpSpec, ...]:
    # One op per axis, each with its own coin: RandFlip(spatial_axis=[0, 1]) flips both at once.
    return tuple(_mon(mt.RandFlip, prob=0.5, spatial_axis=axis) for axis in axes)


def _intensity3d(noise: float = 0.02, p: float = 0.3) -> tuple[OpSpec, ...]:
    # Window level/width jitter (scale, shift), gamma contrast and quantum noise, as in 2D "ct".
    return (
        _mon(mt.RandScaleIntensity, factors=0.1, prob=p),
        _mon(mt.RandShiftIntensity, offsets=0.05, prob=p),
        _mon(mt.RandAdjustContrast, prob=p, gamma=(0.85, 1.15)),
        _mon(mt.RandGaussianNoise, prob=0.2, std=noise),
    )


def _elastic3d(p: float) -> OpSpec:
    # Smooth deformation of ~1 voxel mean (<= ~3 voxels) at 28^3: a plausible shape variation
    # of a segmented organ or vessel, measured on a coordinate ramp.
    return _mon(
        mt.Rand3DElastic,
        sigma_range=(2.0, 3.0),
        magnitude_range=(20.0, 40.0),
        prob=p,
        padding_mode="zeros",
    )


def _radiology_affine(p: float) -> OpSpec:
    # Radiology: small rotation/scale/shift only; black fill matches air/collimator borders.
    return _alb(
        A.Affine,
        rotate=(-10, 10),
        scale=(0.9, 1.1),
        translate_percent=(-0.05, 0.05),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        p=p,
    )


# Strengths are deliberately moderate: MedMNIST images are often 28x28, where a 1-px shift is 4%
# and a sigma-1 blur erases most structure. Within a preset all albumentations ops run before all
# MONAI ops (uint8 stage, then float stage), so list them in that order to keep the table honest.
# The batched path runs them in the listed order (see medvit.data.batch_transforms).
PRESET_OPS: dict[Preset, tuple[OpSpec, ...]] = {
    "none": (),
    # Lateralised anatomy: never flip; contrast/exposure and quantum-noise jitter.
    "chest_xray": (
        _radiology_affine(p=0.7),
        _mon(mt.RandAdjustContrast, prob=0.3, gamma=(0.8, 1.25)),
        _mon(mt.RandScaleIntensity, factors=0.1, prob=0.3),
        _mon(mt.RandShiftIntensity, offsets=0.05, prob=0.3),
        _mon(mt.RandGaussianNoise, prob=0.2, std=0.02),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1),
    ),
    # Lateralised anatomy (organ{a,c,s}mnist); scale/shift emulate window level/width jitter.
    "ct": (
        _radiology_affine(p=0.7),
        _mon(mt.RandScaleIntensity, factors=0.1, prob=0.4),
        _mon(mt.RandShiftIntensity, offsets=0.05, prob=0.4),
        _mon(mt.RandAdjustContrast, prob=0.2, gamma=(0.85, 1.15)),
        _mon(mt.RandGaussianNoise, prob=0.2, std=0.02),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1),
    ),
    # Probe orientation is arbitrary left-right but depth runs top-down: h-flip only; speckle is
    # multiplicative (albumentations) plus Rician magnitude noise (MONAI); gain via gamma.
    "ultrasound": (
        _alb(A.HorizontalFlip, p=0.5),
        _radiology_affine(p=0.5),
        _alb(A.MultiplicativeNoise, multiplier=(0.85, 1.15), elementwise=True, p=0.3),
        _mon(mt.RandRicianNoise, prob=0.2, std=0.03),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.75), sigma_y=(0.25, 0.75), prob=0.2),
        _mon(mt.RandAdjustContrast, prob=0.3, gamma=(0.8, 1.25)),
    ),
    # Retinal OCT B-scans: layers run horizontally, so h-flip and a small tilt but no v-flip.
    "oct": (
        _alb(A.HorizontalFlip, p=0.5),
        _alb(
            A.Affine,
            rotate=(-8, 8),
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=0.5,
        ),
        _alb(A.MultiplicativeNoise, multiplier=(0.85, 1.15), elementwise=True, p=0.3),
        _mon(mt.RandRicianNoise, prob=0.2, std=0.03),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.75), sigma_y=(0.25, 0.75), prob=0.2),
        _mon(mt.RandAdjustContrast, prob=0.3, gamma=(0.8, 1.25)),
    ),
    # Lesions have no canonical orientation: full dihedral group; reflect padding avoids
    # black-corner shortcuts; colour jitter covers camera/illumination differences.
    "dermoscopy": (
        _alb(A.HorizontalFlip, p=0.5),
        _alb(A.VerticalFlip, p=0.5),
        _alb(A.RandomRotate90, p=0.5),
        _alb(
            A.Affine,
            rotate=(-20, 20),
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.5,
        ),
        _alb(
            A.ColorJitter,
            colour=True,
            brightness=0.2,
            contrast=0.2,
            saturation=0.2,
            hue=0.02,
            p=0.5,
        ),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1),
    ),
    # Fundus photos sit in a black circle: any rotation with black fill is realistic; mild colour
    # only, since hue carries diagnostic signal (haemorrhages, exudates).
    "fundus": (
        _alb(A.HorizontalFlip, p=0.5),
        _alb(A.VerticalFlip, p=0.5),
        _alb(
            A.Affine,
            rotate=(-180, 180),
            scale=(0.95, 1.05),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=0.7,
        ),
        _alb(A.RandomBrightnessContrast, brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        _alb(
            A.ColorJitter,
            colour=True,
            brightness=0,
            contrast=0,
            saturation=0.1,
            hue=0.02,
            p=0.3,
        ),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1),
    ),
    # Tiles are rotation-invariant; stain variation between labs is the dominant domain shift, so
    # jitter H and E concentrations (Tellez-style HED jitter) plus a light colour jitter.
    "histopathology": (
        _alb(A.HorizontalFlip, p=0.5),
        _alb(A.VerticalFlip, p=0.5),
        _alb(A.RandomRotate90, p=0.5),
        _alb(HEDJitter, colour=True, scale_range=(0.9, 1.1), shift_range=(-0.03, 0.03), p=0.5),
        _alb(
            A.ColorJitter,
            colour=True,
            brightness=0.1,
            contrast=0.1,
            saturation=0.1,
            hue=0.02,
            p=0.3,
        ),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1),
    ),
    # Grey microscopy: rotation-invariant; uneven illumination (bias field), exposure, shot noise.
    "microscopy": (
        _alb(A.HorizontalFlip, p=0.5),
        _alb(A.VerticalFlip, p=0.5),
        _alb(A.RandomRotate90, p=0.5),
        _alb(A.Affine, scale=(0.9, 1.1), border_mode=cv2.BORDER_REFLECT_101, p=0.3),
        _mon(mt.RandBiasField, coeff_range=(0.0, 0.05), prob=0.2),
        _mon(mt.RandAdjustContrast, prob=0.3, gamma=(0.8, 1.25)),
        _mon(mt.RandGaussianNoise, prob=0.2, std=0.02),
        _mon(mt.RandGaussianSmooth, sigma_x=(0.25, 0.6), sigma_y=(0.25, 0.6), prob=0.1),
    ),
    # ---- 3D volumes (MONAI only, float (C, D, H, W) in [0, 1]).
    # Abdominal CT with left/right organ classes (kidney, femur, lung): never flip.
    "organ3d": (_affine3d(10, p=0.7), *_intensity3d()),
    # Lung nodule crops: malignancy has no orientation, so every axis may flip.
    "nodule3d": (*_flips3d((0, 1, 2)), _affine3d(15, p=0.7), *_intensity3d()),
    # Adrenal gland shape masks: the label (hyperplasia) does not depend on the side, but the
    # body's up/down and front/back do shape the gland: left-right flips only; elastic shape.
    "adrenal3d": (
        *_flips3d((_LEFT_RIGHT,)),
        _affine3d(10, p=0.7),
        _elastic3d(p=0.3),
        *_intensity3d(p=0.2),
    ),
    # Rib fractures: the fracture type does not depend on the side; no up/down flip.
    "fracture3d": (*_flips3d((_LEFT_RIGHT,)), _affine3d(10, p=0.7), *_intensity3d()),
    # Vessel segments (MRA shapes): no canonical orientation; elastic shape variation.
    "vessel3d": (
        *_flips3d((0, 1, 2)),
        _affine3d(20, p=0.7),
        _elastic3d(p=0.3),
        *_intensity3d(p=0.2),
    ),
    # Electron-microscopy synapse crops: no canonical orientation.
    "synapse3d": (*_flips3d((0, 1, 2)), _affine3d(20, p=0.7), *_intensity3d()),
}
