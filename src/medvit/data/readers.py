"""Decode one image file into ``uint8`` pixels: PNG/JPEG/BMP/TIFF, DICOM and 2D NIfTI.

Everything is brought to MedMNIST's training scale, 8-bit pixels 0..255:

- PNG, JPEG, BMP, TIFF (Pillow): 8-bit images as they are; 16-bit grey and float images by
  :func:`to_uint8`'s rules. EXIF orientation is not applied (as torchvision and timm loaders).
- DICOM (pydicom), in the order the standard prescribes: 1. the modality LUT or rescale slope and
  intercept, 2. the file's VOI LUT or window (or a ``window=(center, width)`` override, applied
  with DICOM's LINEAR function) mapped to 0..255, with the image's own minimum..maximum when the
  file has neither, 3. MONOCHROME1 inverted, so that high values are bright as in MONOCHROME2.
  Colour files (RGB, YBR, PALETTE COLOR) become RGB. Multi-frame files and files without pixel
  data are refused.
- NIfTI (nibabel): a 2D image, or a 3D/4D volume with a single slice. Its scaled values are
  mapped by their minimum..maximum (or by the ``window``). The array is transposed so that
  NIfTI's first axis (x) runs along the columns, as SimpleITK's and ITK's arrays do.

:func:`load_image` adds the conversion to ``in_chans`` (:func:`to_channels`) and the resize.
Every failure is an :class:`ImageReadError` whose message is one line naming the file.
No torch here: this module is used in decoding worker processes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Suffixes read with Pillow (lower case).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
#: Suffixes read as DICOM; a file with any other name is also DICOM when it has the magic.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
#: Suffixes (file name endings) read as NIfTI with nibabel.
NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"

#: Why a file could not be read (``ImageReadError.kind``), for grouping problems in reports.
#: ``dimensions``, ``series`` and ``resample`` come from volumes (:mod:`medvit.data.volumes`).
ReadErrorKind = Literal[
    "missing", "empty", "unreadable", "no_pixel_data", "multi_frame", "unsupported",
    "dimensions", "series", "resample",
]  # fmt: skip


class ImageReadError(ValueError):
    """A file that cannot be decoded into an image; ``str()`` is one line naming the file.

    Attributes:
        path: the file.
        reason: why, in words (one line).
        kind: one of :data:`ReadErrorKind`, e.g. ``"no_pixel_data"`` or ``"unreadable"``.
    """

    def __init__(self, path: str | Path, reason: str, kind: ReadErrorKind = "unreadable") -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        self.kind = kind
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across decoding worker processes
        return (type(self), (self.path, self.reason, self.kind))


def _name(path: Path) -> str:
    return path.name.lower()


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return _name(Path(path)).endswith(tuple(NIFTI_SUFFIXES))


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is DICOM: by its suffix, or by ``b"DICM"`` at byte 128 (any name).

    A file that cannot be opened is not DICOM (its reader reports why).
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


def is_image_file(path: str | Path) -> bool:
    """Whether :func:`read_pixels` takes ``path``: a known suffix, or DICOM found by its magic."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES or is_nifti(path) or is_dicom(path)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image array on MedMNIST's training scale: ``uint8``, 0..255.

    Rules: ``uint8`` is returned unchanged; ``bool`` becomes 0/255; other integer images are
    taken as 16-bit, their full range 0..65535 mapped linearly to 0..255 (``v * 255 / 65535``,
    rounded), unless a value lies outside 0..65535, when their minimum..maximum is mapped
    instead; float images map their own minimum..maximum to 0..255 (a constant image gives 0).

    Raises:
        ValueError: for another dtype (complex, object) or non-finite floats.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.integer):
        if image.size and (image.min() < 0 or image.max() > 65535):
            return _min_max(image.astype(np.float64))
        return np.rint(image.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("the image has NaN or infinite pixels")
        return _min_max(image.astype(np.float64))
    raise ValueError(f"unsupported pixel type {image.dtype}")


def _min_max(image: np.ndarray) -> np.ndarray:
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    return np.rint((image - low) * (255 / (high - low))).astype(np.uint8)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low..high`` mapped linearly onto 0..255 (clipped, rounded) as ``uint8``."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float64) - low) * (255 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def parse_window(window: Any) -> tuple[float, float] | None:
    """``(center, width)`` as floats, or None; a ValueError in one line when it is not a window.

    Takes a pair or the text ``"center,width"`` (as a command line, config or checkpoint holds it).
    """
    if window is None:
        return None
    if isinstance(window, str):
        window = window.replace(" ", "").split(",")
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be (center, width), e.g. 40,400; got {window!r}.") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
        raise ValueError(f"window width must be a finite number >= 1, got {window!r}.")
    return center, width


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2.1) onto 0..255, as ``uint8``."""
    center, width = center - 0.5, width - 1
    values = values.astype(np.float64)
    if width == 0:  # a window 1 wide is a threshold
        return np.where(values > center, 255, 0).astype(np.uint8)
    out = ((values - center) / width + 0.5) * 255
    out[values <= center - width / 2] = 0
    out[values > center + width / 2] = 255
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _read_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # Some exports omit the 128-byte preamble and "DICM": read those (found by suffix) too,
        # but only when they parse into real DICOM elements, not any bytes at all.
        ds = pydicom.dcmread(path, force=True)
        if not any(k in ds for k in ("SOPClassUID", "Modality", "PixelData")):
            raise ImageReadError(
                path, "not a DICOM file (no DICM magic, no DICOM elements)"
            ) from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("Modality") or "no modality"
        raise ImageReadError(path, f"DICOM file has no pixel data ({kind})", "no_pixel_data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageReadError(
            path, f"multi-frame DICOM ({frames} frames) is not supported", "multi_frame"
        )
    pixels = ds.pixel_array  # pydicom converts YBR colour to RGB
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return to_uint8(apply_color_lut(pixels, ds))  # 8- or 16-bit RGB entries
    if pixels.ndim == 3:  # RGB after decoding; scale by the stored bit depth
        if pixels.dtype == np.uint8:
            return pixels
        return _scale(pixels, 0, 2 ** int(ds.get("BitsStored") or 16) - 1)

    # 1. modality LUT or rescale slope/intercept (float64 when rescaled)
    values = apply_modality_lut(pixels, ds)
    # 2. VOI: the override, else the VOI LUT (preferred, as pydicom's apply_voi_lut), else the
    #    window; each output range mapped onto 0..255
    if window is not None:
        out = _linear_window(values, *window)
    elif ds.get("VOILUTSequence") and all(
        ds.VOILUTSequence[0].get(k) is not None for k in ("LUTDescriptor", "LUTData")
    ):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = _scale(apply_voi(values, ds), 0, 2**depth - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # The window maps onto the range apply_windowing uses (it depends on bits stored, pixel
        # representation and rescale): ask it for the two ends rather than re-derive them.
        with np.errstate(over="ignore"):
            low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
        out = _scale(apply_windowing(values, ds), float(low), float(high))
    else:  # no display range in the file: the image's own
        out = to_uint8(np.asarray(values, np.float64))
    # 3. MONOCHROME1: low values are bright; invert so that all grey images read alike
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _read_nifti(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    import nibabel

    image = nibabel.load(path)
    values = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter
    if values.ndim < 2 or any(n != 1 for n in values.shape[2:]):
        raise ImageReadError(
            path,
            f"NIfTI image of shape {tuple(values.shape)} is not 2D (a volume needs a 3D model)",
            "dimensions",
        )
    values = values.reshape(values.shape[:2]).T  # (x, y) -> rows y, columns x
    if window is not None:
        return _linear_window(values, *window)
    if values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    if values.dtype == np.bool_:
        return to_uint8(np.ascontiguousarray(values))
    if not np.isfinite(values).all():
        raise ValueError("the image has NaN or infinite pixels")
    return _min_max(values.astype(np.float64))


def _read_pil(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageReadError(
                    path,
                    f"image has {frames} frames; only single images are supported",
                    "multi_frame",
                )
            mode = image.mode
            if mode in ("I", "F") or mode.startswith("I;16"):
                return to_uint8(np.asarray(image))  # PIL would clip these to 8 bits
            if mode in ("L", "RGB", "RGBA"):
                return np.asarray(image).copy()
            if mode == "1":
                return np.asarray(image.convert("L")).copy()
            has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
            return np.asarray(image.convert("RGBA" if has_alpha else "RGB")).copy()


def read_pixels(path: str | Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """The pixels of one image file as ``uint8``: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA.

    The format is chosen by name (NIfTI, DICOM) or the DICOM magic; anything else goes to
    Pillow, which recognises its formats by content. See the module docstring for the scaling.

    Args:
        path: the file.
        window: ``(center, width)`` of a DICOM LINEAR window in the file's modality units (e.g.
            Hounsfield units for CT: ``(40, 400)`` for soft tissue), used instead of the file's
            own VOI LUT or window; DICOM and NIfTI only (other formats are already display
            values and ignore it).

    Raises:
        ImageReadError: the file is missing, empty, cannot be decoded, is multi-frame, is a
            DICOM without pixel data, or is a NIfTI volume with more than one slice.
        ValueError: ``window`` is not ``(center, width)`` with width >= 1.
    """
    path = Path(path)
    window = parse_window(window)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found", "missing") from None
    except OSError as err:
        raise ImageReadError(path, f"cannot open: {err.strerror or err}") from None
    if size == 0:
        raise ImageReadError(path, "file is empty", "empty")
    try:
        if is_nifti(path):
            pixels = _read_nifti(path, window)
        elif is_dicom(path):
            pixels = _read_dicom(path, window)
        else:
            pixels = _read_pil(path)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(
            path, "not an image file Pillow, pydicom or nibabel can read"
        ) from None
    except Exception as err:  # noqa: BLE001 - decoders raise anything on corrupt input
        reason = " ".join(str(err).split()) or type(err).__name__
        # e.g. a DICOM transfer syntax whose decoder plugin is not installed
        unsupported = isinstance(err, NotImplementedError) or "missing dependencies" in reason
        kind = "unsupported" if unsupported else "unreadable"
        raise ImageReadError(path, f"cannot decode: {reason}", kind) from err
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise ImageReadError(path, f"unsupported pixel layout {pixels.shape}", "unsupported")
    return np.ascontiguousarray(pixels)


def to_channels(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """Grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) ``uint8`` pixels as (H, W, ``in_chans``).

    Grey -> 3 repeats the channel; RGB -> 1 is Pillow's ITU-R 601-2 luma (``L = R*299/1000 +
    G*587/1000 + B*114/1000``); RGBA is first composited on black (each colour times alpha/255,
    rounded), so transparent pixels become black.

    Raises:
        ValueError: ``in_chans`` is not 1 or 3, or the pixels are not one of the layouts above.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:].astype(np.uint32)
        pixels = ((pixels[:, :, :3].astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)
    if pixels.ndim == 2:
        grey = pixels[:, :, None]
        return grey if in_chans == 1 else np.repeat(grey, 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W), (H, W, 3) or (H, W, 4), got {pixels.shape}")
    if in_chans == 3:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L"))[:, :, None]


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) ``uint8`` pixels resized to (size, size, C) with Pillow; unchanged if equal.

    Shrinking averages areas (BOX), enlarging is bilinear; the aspect ratio is not kept (as
    MedMNIST's own square images).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    shrink = size * size <= height * width
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    channels = pixels.shape[2]
    planes = pixels[:, :, 0] if channels == 1 else pixels
    out = np.asarray(Image.fromarray(planes).resize((size, size), resample))
    return out[:, :, None] if channels == 1 else out


def load_image(
    path: str | Path,
    size: int | None,
    in_chans: int,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """One file decoded for training: ``uint8`` (size, size) for 1 channel, (size, size, 3).

    :func:`read_pixels`, then :func:`to_channels`, then :func:`resize` (skipped when ``size`` is
    None or the image already has that size, so a MedMNIST image saved as PNG reads back
    bit-identical). The layout matches MedMNIST's arrays: (H, W) grey, (H, W, 3) RGB.

    Raises:
        ImageReadError: the file cannot be read (see :func:`read_pixels`).
    """
    pixels = to_channels(read_pixels(path, window), in_chans)
    if size is not None:
        pixels = resize(pixels, size)
    return pixels[:, :, 0] if in_chans == 1 else pixels
