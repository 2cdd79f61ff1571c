"""Overlay pictures: the image, its heat map and both blended, titled with the prediction.

Volumes ``(C, D, H, W)`` get one row per mid slice (axial, coronal, sagittal). No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medvit.evaluate.figures import figure_to_png, new_figure
from medvit.fileio import atomic_write


def display_image(x: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None):
    """A normalised model input ``(C, *spatial)`` back on [0, 1] (unknown scaling stretched)."""
    x = np.asarray(x, dtype=np.float32)
    shape = (-1,) + (1,) * (x.ndim - 1)
    m = np.asarray(mean if mean else [0.5], np.float32).reshape(shape)
    s = np.asarray(std if std else [0.5], np.float32).reshape(shape)
    x = x * s + m
    if x.min() < -0.05 or x.max() > 1.05:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return np.clip(x, 0, 1)


def _views(image: np.ndarray, heat: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image slice (H, W[, 3]), map slice (H, W))``: one 2D view, or 3 mid slices."""
    rgb = lambda a: a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)  # noqa: E731
    if heat.ndim == 2:
        return [("", rgb(image), heat)]
    d, h, w = (s // 2 for s in heat.shape)
    return [
        ("axial", rgb(image[:, d]), heat[d]),
        ("coronal", rgb(image[:, :, h]), heat[:, h]),
        ("sagittal", rgb(image[:, :, :, w]), heat[:, :, w]),
    ]


def overlay_png(image: np.ndarray, heat: np.ndarray, title: str, dpi: int = 100) -> bytes:
    """PNG bytes: image, heat map and blend side by side (a row per slice of a volume).

    Args:
        image: ``(C, *spatial)`` on [0, 1] (see :func:`display_image`).
        heat: ``spatial`` map on [0, 1].
        title: the figure's title (prediction, truth, probability).
    """
    views = _views(np.asarray(image), np.asarray(heat))
    fig = new_figure(figsize=(7.5, 2.6 * len(views) + 0.4))
    axes = fig.subplots(len(views), 3, squeeze=False)
    for row, (name, img, hm) in zip(axes, views, strict=True):
        grey = dict(cmap="gray", vmin=0, vmax=1) if img.ndim == 2 else {}
        row[0].imshow(img, **grey)
        row[1].imshow(hm, cmap="jet", vmin=0, vmax=1)
        row[2].imshow(img, **grey)
        row[2].imshow(hm, cmap="jet", vmin=0, vmax=1, alpha=0.45)
        for ax, label in zip(row, ("image", "heat map", "overlay"), strict=True):
            ax.set_axis_off()
            ax.set_title(f"{label} ({name})" if name else label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    # Fixed margins: tight_layout would measure every text, the slowest part of a picture.
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        bottom=0.02,
        top=1 - 0.7 / fig.get_figheight(),
        wspace=0.05,
        hspace=0.15,
    )
    return figure_to_png(fig, dpi=dpi)


def write_overlay(path: Path, image: np.ndarray, heat: np.ndarray, title: str) -> Path:
    """:func:`overlay_png` written atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fh.write(overlay_png(image, heat, title))
    return path


def caption(predicted: str, probability: float, true: str | None, target: str | None) -> str:
    """``predicted benign (p=0.93) · true malignant · map for benign``."""
    parts = [f"predicted {predicted} (p={probability:.2f})", f"true {true or '?'}"]
    if target is not None and target != predicted:
        parts.append(f"map for {target}")
    return " · ".join(parts)
