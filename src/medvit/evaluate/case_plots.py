"""Pictures of single cases: a 2D image, or a 3D volume's mid axial, coronal and sagittal slices.

numpy and matplotlib only (no torch), so the gallery writer at test time, the report, wandb and
``medvit predict`` draw cases the same way. Inputs are model inputs, channel first: an image
``(C, H, W)`` or a volume ``(C, D, H, W)`` (D: the slice axis, MedMNIST 3D's first axis), as
the test dataset yields them; :func:`denormalize` undoes the data module's normalisation first.

Slices of a volume ``v`` (C, D, H, W): axial ``v[:, D // 2]`` (H × W), coronal
``v[:, :, H // 2]`` (D × W) and sagittal ``v[:, :, :, W // 2]`` (D × H). Coronal and sagittal
slices are drawn with slice 0 at the bottom, so a volume stored from feet to head (NIfTI's RAS,
DICOM sorted by position) stands upright.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medvit.evaluate.figures import figure_to_png, new_figure

__all__ = [
    "SLICE_NAMES",
    "case_figure",
    "case_png",
    "denormalize",
    "image_figure",
    "mid_slices",
    "slices_strip",
    "to_uint8",
    "volume_slices_figure",
]

SLICE_NAMES = ("axial", "coronal", "sagittal")


def denormalize(
    sample: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """A normalised model input back on the [0, 1] scale, channel first, float32.

    Args:
        sample: ``(C, H, W)`` or ``(C, D, H, W)``, normalised as ``(x - mean) / std`` per channel
            (a torch tensor works too: ``np.asarray`` reads it).
        mean: per-channel (or one) mean on the [0, 1] scale; ``None``: 0.5, medvit's default.
        std: per-channel (or one) std; ``None``: 0.5.

    Values outside [0, 1] after undoing the normalisation (a transform the statistics do not
    describe) are stretched to the full range, so the picture is not clipped to black or white.
    """
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"a case is (C, H, W) or (C, D, H, W), got an array of shape {tuple(x.shape)}."
        )
    c = x.shape[0]
    shape = (c,) + (1,) * (x.ndim - 1)
    m = np.broadcast_to(np.asarray(mean if mean else [0.5], np.float32).reshape(-1), (c,))
    s = np.broadcast_to(np.asarray(std if std else [0.5], np.float32).reshape(-1), (c,))
    x = x * s.reshape(shape) + m.reshape(shape)
    if x.size and (x.min() < -0.05 or x.max() > 1.05):
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return np.clip(x, 0.0, 1.0)


def to_uint8(picture: np.ndarray) -> np.ndarray:
    """A channel-first picture on [0, 1] (or uint8) as uint8 ``(H, W)`` (grey) or ``(H, W, 3)``."""
    x = np.asarray(picture)
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if x.ndim == 2:
        return x
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"a picture is (1|3, H, W), got shape {tuple(x.shape)}.")
    return x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)


def mid_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The mid axial, coronal and sagittal slices of a volume, channel first.

    Args:
        volume: ``(C, D, H, W)`` or ``(D, H, W)``.

    Returns:
        ``{"axial": (C, H, W), "coronal": (C, D, W), "sagittal": (C, D, H)}`` with slice 0 of
        coronal and sagittal in row 0 (:func:`volume_slices_figure` draws row 0 at the bottom).
    """
    v = np.asarray(volume)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"a volume is (C, D, H, W) or (D, H, W), got shape {tuple(v.shape)}.")
    _, d, h, w = v.shape
    return {
        "axial": v[:, d // 2],
        "coronal": v[:, :, h // 2],
        "sagittal": v[:, :, :, w // 2],
    }


def slices_strip(volume: np.ndarray, gap: int = 2) -> np.ndarray:
    """The three mid slices side by side as one uint8 picture (for table thumbnails).

    Coronal and sagittal are flipped upside down as in :func:`volume_slices_figure`; slices
    are bottom-aligned on a black strip with ``gap`` black columns between them.
    """
    slices = mid_slices(volume)
    pictures = [to_uint8(slices["axial"])]
    pictures += [to_uint8(slices[k])[::-1] for k in ("coronal", "sagittal")]
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    out = np.zeros((height, width, *pictures[0].shape[2:]), dtype=np.uint8)
    x = 0
    for p in pictures:
        out[height - p.shape[0] :, x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def _show(ax: Any, picture: np.ndarray, lower: bool = False) -> None:
    image = to_uint8(picture)
    ax.imshow(
        image,
        cmap="gray" if image.ndim == 2 else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
        origin="lower" if lower else "upper",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def image_figure(image: np.ndarray, title: str | None = None, inches: float = 2.6) -> Figure:
    """One 2D image (``(C, H, W)`` on [0, 1], or uint8) with an optional title."""
    x = np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"an image is (C, H, W), got shape {tuple(x.shape)}.")
    fig = new_figure(figsize=(inches, inches + (0.2 if title else 0.0)), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, x)
    if title:
        ax.set_title(title, fontsize=8, wrap=True)
    return fig


def volume_slices_figure(
    volume: np.ndarray, title: str | None = None, inches: float = 2.3
) -> Figure:
    """A volume's mid axial, coronal and sagittal slices side by side, each titled.

    Args:
        volume: ``(C, D, H, W)`` or ``(D, H, W)`` on [0, 1], or uint8.
        title: a line above the three panels (e.g. the true and predicted class).
        inches: the width of one panel.
    """
    slices = mid_slices(volume)
    d, h, w = np.asarray(volume).shape[-3:]
    where = {"axial": f"D = {d // 2}", "coronal": f"H = {h // 2}", "sagittal": f"W = {w // 2}"}
    fig = new_figure(
        figsize=(3 * inches, inches + 0.1 + (0.3 if title else 0.0)), layout="constrained"
    )
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, SLICE_NAMES, strict=True):
        _show(ax, slices[name], lower=name != "axial")
        ax.set_title(f"{name} ({where[name]})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def case_figure(sample: np.ndarray, title: str | None = None) -> Figure:
    """:func:`image_figure` for ``(C, H, W)``, :func:`volume_slices_figure` for ``(C, D, H, W)``."""
    x = np.asarray(sample)
    if x.ndim == 4:
        return volume_slices_figure(x, title)
    return image_figure(x, title)


def case_png(sample: np.ndarray, title: str | None = None, dpi: int = 100) -> bytes:
    """PNG bytes of :func:`case_figure`."""
    return figure_to_png(case_figure(sample, title), dpi=dpi)
