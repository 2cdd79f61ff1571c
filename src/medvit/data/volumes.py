"""Decode one volume into a ``uint8`` cube: 3D NIfTI files and DICOM series folders.

The one decoder of volumes, shared by :class:`~medvit.data.images.ImageDataModule` (through the
decode cache) and ``medvit predict``, so that prediction sees what training saw. The steps:

1. **Read** (:func:`read_volume`) into float32 values laid out (D, H, W) with the voxel spacing
   in mm per axis:

   - NIfTI (nibabel): the scaled values (``scl_slope``/``scl_inter`` applied), reoriented to the
     closest canonical (RAS+) orientation, then transposed so that D runs inferior -> superior
     (z), H posterior -> anterior (y) and W left -> right (x); spacing from the header's zooms.
     A 4D file with a single volume is taken; more volumes (a time series) are refused.
   - A DICOM series folder (pydicom): every DICOM file directly in the folder is one slice of
     ONE series. Slices are sorted by ``ImagePositionPatient`` projected on the slice normal
     (the cross product of ``ImageOrientationPatient``'s row and column directions), not by file
     name or ``InstanceNumber``. Spacing: the slice gap from those positions, rows and columns
     from ``PixelSpacing`` (1 mm when absent). Values go through the modality LUT
     (``RescaleSlope`` and ``RescaleIntercept``: Hounsfield units for CT). A ``DICOMDIR`` is not
     a slice. Refused, naming the folder: several ``SeriesInstanceUID`` s, slices of different
     ``Rows``/``Columns`` or orientations, a slice without ``ImagePositionPatient``/
     ``ImageOrientationPatient``, two slices at one position, uneven slice gaps (missing
     slices), a single slice, multi-frame or colour files.

2. **Resample** (:func:`resample`, MONAI): first, when a target ``spacing`` is given, MONAI's
   ``Spacing`` (trilinear, border padding, the physical extent kept: spacing (2, 1, 1) to
   (1, 1, 1) doubles the depth); then MONAI's ``Resize`` to the ``size`` cube (axes that shrink
   area-averaged, then axes that grow trilinear, as Pillow's BOX/bilinear for 2D images; the
   aspect ratio is not kept, as for 2D images and MedMNIST). With ``crop_pad`` the volume is
   instead centre-cropped or padded (with its minimum) to the cube: with a target spacing this
   keeps the physical scale (a 64 cube at 1.5 mm is a 96 mm field of view).
   Refused: a spacing that is zero, negative or not finite, and a volume too thin to be one:
   after the spacing step every axis must have at least 2 voxels and at least ``size /``
   :data:`MAX_UPSAMPLING` voxels (a 3-slice stack is not stretched into a 64-voxel cube).

3. **Intensities to uint8** (:func:`to_uint8_volume`), as the 2D path scales pixels: a
   ``window`` ``(center, width)`` (e.g. ``40,400`` HU for soft tissue) with DICOM's LINEAR
   function; else a DICOM series' own first ``WindowCenter``/``WindowWidth``; else the volume's
   own minimum..maximum (a constant volume gives 0). MONOCHROME1 series are inverted. The window
   is applied after resampling, on the interpolated HU values.

Every failure is an :class:`~medvit.data.readers.ImageReadError` naming the file or folder.
MONAI (and so torch) is imported only inside :func:`resample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvit.data.readers import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    ImageReadError,
    _linear_window,
    _min_max,
    is_dicom,
    is_nifti,
    parse_window,
)

__all__ = [
    "MAX_UPSAMPLING",
    "Volume",
    "is_series_folder",
    "item_dims",
    "load_volume",
    "parse_spacing",
    "read_dicom_series",
    "read_nifti_volume",
    "read_volume",
    "resample",
    "series_files",
    "to_uint8_volume",
]

#: The most an axis may be stretched by the resize to the cube (after the spacing step).
MAX_UPSAMPLING = 8
#: Slice gaps may differ from their median by this fraction before a series is refused.
_GAP_TOLERANCE = 0.1


@dataclass
class Volume:
    """A volume as read, before resampling.

    Attributes:
        values: float32 (D, H, W) in the file's units (HU for CT).
        spacing: voxel size in mm along (D, H, W).
        window: a DICOM series' own ``(center, width)``, or None.
        invert: MONOCHROME1 (low values bright): inverted after windowing.
    """

    values: np.ndarray
    spacing: tuple[float, float, float]
    window: tuple[float, float] | None = None
    invert: bool = False


def parse_spacing(spacing: float | Sequence[float] | str | None) -> tuple[float, ...] | None:
    """A target spacing as three mm values (D, H, W), or None; one value means isotropic.

    Raises:
        ValueError: not one or three finite numbers > 0 (one line).
    """
    if spacing is None:
        return None
    raw = spacing
    if isinstance(spacing, str):
        spacing = [s for s in spacing.replace(" ", "").split(",") if s]
    if isinstance(spacing, (int, float)):
        spacing = [spacing]
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"spacing must be one or three numbers > 0 in mm (D, H, W), e.g. 1.5 or 2,1,1; "
            f"got {raw!r}."
        )
    return values


def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (hidden ones left out), sorted by name."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [
        p
        for p in entries
        # DICOMDIR is the media's index (DICOM, but no image): not a slice
        if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file()
        and is_dicom(p)
    ]  # fmt: skip


def is_series_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files directly (one series, one volume)."""
    path = Path(path)
    return path.is_dir() and bool(series_files(path))


def item_dims(path: str | Path) -> int | None:
    """Whether a data item is a volume (3) or an image (2), from its kind and NIfTI header.

    A folder is a DICOM series (3); a NIfTI file is 3 when it has more than one slice (4D files
    count as volumes, refused when read if they hold several); other files are 2. None when the
    item cannot be looked at (missing, unreadable header): its decoding reports why.
    """
    path = Path(path)
    if not is_nifti(path):
        # Known image suffixes need no stat (a 2D source may list 100k files).
        if path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES:
            return 2
        return 3 if path.is_dir() else 2 if path.is_file() else None
    try:
        import nibabel

        shape = nibabel.load(path).header.get_data_shape()
    except Exception:  # noqa: BLE001 - reported when decoded
        return None
    return 3 if len(shape) >= 3 and sum(n > 1 for n in shape[:3]) >= 3 else 2


def read_nifti_volume(path: str | Path) -> Volume:
    """A 3D NIfTI file as a canonical (D=z, H=y, W=x) float32 volume; see the module docs."""
    import nibabel

    path = Path(path)
    image = nibabel.load(path)
    shape = tuple(image.shape)
    if len(shape) > 3 and math.prod(shape[3:]) == 1:  # (x, y, z, 1[, 1 ...]): one volume
        image = image.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
    elif len(shape) > 3:
        raise ImageReadError(
            path,
            f"NIfTI of shape {shape} holds {math.prod(shape[3:])} volumes (a time series); give "
            "one 3D volume",
            "dimensions",
        )
    if len(image.shape) < 3 or sum(n > 1 for n in image.shape[:3]) < 3:
        raise ImageReadError(
            path, f"NIfTI of shape {shape} is a 2D image, not a volume", "dimensions"
        )
    image = nibabel.as_closest_canonical(image)
    values = np.asarray(image.get_fdata(dtype=np.float32)).transpose(2, 1, 0)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(np.ascontiguousarray(values), (zooms[2], zooms[1], zooms[0]))


def _series_error(folder: Path, reason: str) -> ImageReadError:
    return ImageReadError(folder, f"DICOM series folder: {reason}", "series")


def read_dicom_series(folder: str | Path) -> Volume:
    """One DICOM series folder as a float32 (D, H, W) volume; see the module docs for rules."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    folder = Path(folder)
    files = series_files(folder)
    if not files:
        raise ImageReadError(folder, "folder holds no DICOM files", "missing")
    if len(files) == 1:
        raise _series_error(folder, "a single slice is a 2D image, not a volume")
    slices = []
    for f in files:
        try:
            slices.append((f, pydicom.dcmread(f)))
        except Exception as err:  # noqa: BLE001 - name the slice
            raise _series_error(folder, f"{f.name} is unreadable ({err})") from err
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise _series_error(
            folder, f"{len(uids)} series (SeriesInstanceUID) mixed; put one series per folder"
        )
    sizes = {(ds.get("Rows"), ds.get("Columns")) for _, ds in slices}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes, key=str))
        raise _series_error(folder, f"slices of different sizes (Rows x Columns: {shown})")
    lacking = [
        f.name
        for f, ds in slices
        if ds.get("ImagePositionPatient") is None or ds.get("ImageOrientationPatient") is None
    ]
    if lacking:
        raise _series_error(
            folder,
            f"{len(lacking)} slice(s) without ImagePositionPatient/ImageOrientationPatient "
            f"(e.g. {lacking[0]}); they cannot be ordered",
        )
    frames = max(int(ds.get("NumberOfFrames") or 1) for _, ds in slices)
    if frames > 1:
        raise _series_error(folder, "multi-frame DICOM files are not supported in a series")
    orientation = np.array(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    tilted = [
        f.name
        for f, ds in slices
        if not np.allclose(np.array(ds.ImageOrientationPatient, np.float64), orientation, atol=1e-3)
    ]
    if tilted:
        raise _series_error(
            folder, f"slices of different orientations (ImageOrientationPatient, e.g. {tilted[0]})"
        )
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array(
        [np.dot(np.array(ds.ImagePositionPatient, np.float64), normal) for _, ds in slices]
    )
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    if np.any(gaps <= 1e-6):
        raise _series_error(folder, "two slices at the same position (a repeated slice?)")
    gap = float(np.median(gaps))
    if np.any(np.abs(gaps - gap) > _GAP_TOLERANCE * gap):
        raise _series_error(
            folder, f"uneven slice gaps ({gaps.min():.3g} to {gaps.max():.3g} mm; missing slices?)"
        )
    first = slices[order[0]][1]
    pixel_spacing = first.get("PixelSpacing") or [1.0, 1.0]
    # float32 slice by slice: a 512 x 512 x 600 CT stays 600 MB, not 1.2 GB of float64
    if int(first.get("SamplesPerPixel") or 1) != 1:
        raise _series_error(folder, "colour slices (SamplesPerPixel > 1) are not supported")
    values = np.empty((len(order), int(first.Rows), int(first.Columns)), np.float32)
    for k, i in enumerate(order):
        ds = slices[i][1]
        values[k] = apply_modality_lut(ds.pixel_array, ds)
    window = None
    center, width = first.get("WindowCenter"), first.get("WindowWidth")
    if center is not None and width is not None:
        pick = lambda v: float(v[0]) if isinstance(v, Sequence) else float(v)  # noqa: E731
        window = parse_window((pick(center), max(1.0, pick(width))))
    invert = str(first.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    spacing = (gap, float(pixel_spacing[0]), float(pixel_spacing[1]))
    return Volume(values, spacing, window, invert)


def read_volume(path: str | Path) -> Volume:
    """A NIfTI file or a DICOM series folder as a :class:`Volume`; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise ImageReadError(path, "file not found", "missing")
    if is_nifti(path):
        return read_nifti_volume(path)
    raise ImageReadError(
        path,
        "is a 2D image; a volume is a .nii/.nii.gz file or a folder holding one DICOM series",
        "dimensions",
    )


def resample(
    values: np.ndarray,
    spacing: Sequence[float],
    size: int,
    target_spacing: Sequence[float] | None = None,
    name: str | Path = "volume",
    crop_pad: bool = False,
) -> np.ndarray:
    """``values`` (D, H, W) resampled with MONAI to a float32 (size, size, size) cube.

    The spacing step first (when ``target_spacing`` is given), then the resize to the cube, or
    with ``crop_pad`` a centred crop or pad to it (MONAI ``ResizeWithPadOrCrop``, padding with
    the volume's minimum, e.g. air in CT), which keeps the physical scale of the spacing step.
    See the module docs for the rule on volumes too thin to resample.

    Raises:
        ImageReadError: a bad spacing or a volume too thin (kind ``"resample"``), naming ``name``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Resize, ResizeWithPadOrCrop, Spacing

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageReadError(
            name, f"cannot resample: voxel spacing {spacing} is not three numbers > 0", "resample"
        )
    if not np.isfinite(values).all():
        raise ImageReadError(name, "the volume has NaN or infinite values", "unreadable")
    tensor = torch.from_numpy(np.ascontiguousarray(values, np.float32))[None]
    if target_spacing is not None and tuple(target_spacing) != spacing:
        axes = zip(values.shape, spacing, target_spacing, strict=True)
        shape = [round(n * s / t) for n, s, t in axes]
        _check_shape(shape, size, name, f" at spacing {tuple(target_spacing)} mm")
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        spaced = Spacing(
            pixdim=tuple(target_spacing), mode="bilinear", padding_mode="border",
            scale_extent=True, dtype=np.float32,
        )(MetaTensor(tensor, affine=affine))  # fmt: skip
        tensor = torch.as_tensor(spaced)
    _check_shape(tensor.shape[1:], size, name, "")
    if crop_pad:
        low = tensor.min()
        tensor = ResizeWithPadOrCrop((size, size, size))(tensor - low) + low
        return np.asarray(torch.as_tensor(tensor)[0].numpy(), dtype=np.float32)
    # Axes that shrink are area-averaged first (as Pillow's BOX for 2D images; MONAI's
    # Gaussian anti-aliasing pads with zeros and darkens the borders), then axes that grow are
    # interpolated trilinearly: a constant volume stays constant.
    shrunk = tuple(min(int(n), size) for n in tensor.shape[1:])
    if shrunk != tuple(tensor.shape[1:]):
        tensor = Resize(shrunk, mode="area")(tensor)
    if shrunk != (size, size, size):
        tensor = Resize((size, size, size), mode="trilinear")(tensor)
    return np.asarray(torch.as_tensor(tensor)[0].numpy(), dtype=np.float32)


def _check_shape(shape: Sequence[int], size: int, name: str | Path, where: str) -> None:
    least = max(2, math.ceil(size / MAX_UPSAMPLING))
    if min(shape) < least:
        raise ImageReadError(
            name,
            f"cannot resample a volume of shape {tuple(int(n) for n in shape)}{where} to a "
            f"{size}^3 cube: every axis needs >= {least} voxels (at most {MAX_UPSAMPLING}x "
            "upsampling)",
            "resample",
        )


def to_uint8_volume(
    values: np.ndarray,
    window: tuple[float, float] | None = None,
    invert: bool = False,
) -> np.ndarray:
    """Volume values on the 0..255 training scale: the ``window`` (LINEAR), else min..max."""
    out = _linear_window(values, *window) if window is not None else _min_max(values)
    return 255 - out if invert else out


def load_volume(
    path: str | Path,
    size: int,
    spacing: float | Sequence[float] | None = None,
    window: tuple[float, float] | str | None = None,
    crop_pad: bool = False,
) -> np.ndarray:
    """One volume decoded for training or prediction: ``uint8`` (size, size, size).

    :func:`read_volume`, :func:`resample` (to ``spacing``, then resized, or with ``crop_pad``
    cropped/padded, to the cube), then :func:`to_uint8_volume` with ``window`` (the override)
    or the series' own window.

    Raises:
        ImageReadError: the volume cannot be read or resampled, or ``path`` is a 2D image.
    """
    path = Path(path)
    target = parse_spacing(spacing)
    window = parse_window(window)
    try:
        volume = read_volume(path)
        cube = resample(volume.values, volume.spacing, size, target, path, crop_pad)
    except ImageReadError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise anything on corrupt input
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ImageReadError(path, f"cannot decode: {reason}") from err
    return to_uint8_volume(cube, window or volume.window, volume.invert)
