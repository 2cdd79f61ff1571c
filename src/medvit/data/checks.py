"""Checks that an unpacked MedMNIST file fits its flag and can be trained on.

:class:`~medvit.data.medmnist.MedMNISTDataModule` runs them on every file it opens, before any
training starts, so a wrong or damaged file fails with one line naming the file and the key.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvit.data.files import SPLITS, DataFileError

__all__ = ["MIN_SPLIT_SIZE", "check_arrays", "check_split_sizes", "class_counts"]

#: Fewer samples than this in a split is refused before training: nothing to learn or measure.
MIN_SPLIT_SIZE = 2


def class_counts(labels: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """Samples per class, or positives per label for a ``multilabel`` task (int64)."""
    labels = np.asarray(labels)
    if task == "multilabel":
        return labels.sum(0).astype(np.int64)
    return np.bincount(labels.reshape(-1).astype(np.int64), minlength=num_classes)


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    path: Path,
    flag: str,
    size: int,
    info: Mapping[str, Any],
    task: str,
    official_sizes: bool,
    spatial_dims: int = 2,
) -> None:
    """Refuse a file whose shapes, dtypes or labels do not fit ``flag``, naming the key.

    Args:
        arrays: the file's arrays, by key (``train_images``, ``train_labels``, ...).
        path: the file, for messages.
        flag: the MedMNIST flag and ``size`` the image size the file should hold.
        info: the flag's ``medmnist.INFO`` entry (channels, labels, split sizes).
        task: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        official_sizes: also insist on the official number of samples per split.
        spatial_dims: 3 for a set of volumes: images are then grey cubes (N, size, size, size).
    """
    channels = info["n_channels"]
    num_classes = len(info["label"])
    expected_img = (size, size) if channels == 1 else (size, size, 3)
    if spatial_dims == 3:
        expected_img = (size, size, size)
    n_labels = num_classes if task == "multilabel" else 1
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        key = f"{split}_images"
        if images.dtype != np.uint8 or images.shape[1:] != expected_img:
            raise DataFileError(
                f"{path}: '{key}' has shape {images.shape} and dtype {images.dtype}; "
                f"{flag} at size {size} needs (N, {', '.join(map(str, expected_img))}) uint8."
            )
        key = f"{split}_labels"
        if labels.ndim != 2 or labels.shape != (len(images), n_labels):
            raise DataFileError(
                f"{path}: '{key}' has shape {labels.shape}; expected ({len(images)}, "
                f"{n_labels}) to match '{split}_images'."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataFileError(f"{path}: '{key}' has dtype {labels.dtype}; expected integers.")
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        top = 1 if task == "multilabel" else num_classes - 1
        if lo < 0 or hi > top:
            raise DataFileError(
                f"{path}: '{key}' holds values in [{lo}, {hi}]; {flag} labels must lie in "
                f"[0, {top}] ({task} task)."
            )
        official = info["n_samples"][split]
        if official_sizes and len(images) != official:
            raise DataFileError(
                f"{path}: '{split}' has {len(images)} samples; the official split has {official}."
            )


def check_split_sizes(
    arrays: Mapping[str, np.ndarray],
    path: Path,
    task: str,
    class_names: Sequence[str],
    warn_missing: bool,
) -> None:
    """Refuse an empty or too small split; warn when val or test lacks a class.

    Only a file of one's own (MD5 not checked) can get here with such splits: the official
    sizes are checked in :func:`check_arrays`. Training on an empty split would "succeed" and
    report an untrained model's metrics.

    Args:
        arrays: the file's arrays, by key.
        path: the file, for messages.
        task: as in :func:`check_arrays`.
        class_names: class (or label) names in index order.
        warn_missing: warn when the val or test split lacks a class (off when validation
            comes from CV folds rather than the official val split).
    """
    counts = {
        split: class_counts(arrays[f"{split}_labels"], task, len(class_names)) for split in SPLITS
    }
    sizes = {split: len(arrays[f"{split}_labels"]) for split in SPLITS}
    small = [s for s in SPLITS if sizes[s] < MIN_SPLIT_SIZE]
    if small:
        detail = "; ".join(
            f"{split}: {sizes[split]} ({', '.join(map(str, counts[split].tolist()))})"
            for split in SPLITS
        )
        per = "positives per label" if task == "multilabel" else "per class"
        raise DataFileError(
            f"{path}: the {' and '.join(small)} split(s) hold fewer than "
            f"{MIN_SPLIT_SIZE} samples, too few to train and evaluate. Samples per split "
            f"({per} in brackets): {detail}."
        )
    if not warn_missing:
        return
    for split in ("val", "test"):
        missing = [class_names[i] for i in np.flatnonzero(counts[split] == 0)]
        if missing:
            warnings.warn(
                f"{path}: the {split} split has no samples of {missing} "
                f"({sizes[split]} samples; per class: {counts[split].tolist()}); "
                f"{split} AUROC will be undefined (NaN) for "
                f"{'those labels' if task == 'multilabel' else 'these classes'}.",
                stacklevel=2,
            )
