"""Predict's inputs as the model takes them: decoded, resized and normalised, one bad file kept.

Shared by ``medvit predict`` (a checkpoint or an ``.onnx`` model) and ``medvit explain``, so
every path feeds its model the same tensors. Imports torch, not Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from medvit.data.readers import ImageReadError
from medvit.data.transforms import build_transforms
from medvit.evaluate.predict_inputs import Decoding, Item

__all__ = ["READ_ERRORS", "InputDataset", "input_dataset"]

#: What a single image can fail with while it is decoded (reported in its CSV row).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class InputDataset(Dataset):
    """Items ``(image, error, i)`` from :class:`Item` entries, decoded lazily.

    A file that cannot be decoded gives a blank image and the reason in ``error`` (empty when
    the image was read), so one broken file does not end the run.
    """

    def __init__(self, items: list[Item], transform: Any, blank: np.ndarray) -> None:
        self.items, self.transform, self.blank = items, transform, blank

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        try:
            image = self.items[i].load()
        except READ_ERRORS as err:
            # ImageReadError's message starts with the path, which the row already has.
            reason = err.reason if isinstance(err, ImageReadError) else str(err)
            reason = " ".join(reason.split()) or type(err).__name__
            return self.transform(self.blank), f"cannot read image: {reason}", i
        return self.transform(image), "", i


def input_dataset(
    items: list[Item],
    decoding: Decoding,
    img_size: int,
    in_chans: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> InputDataset:
    """``items`` decoded as ``decoding`` says, then resized to ``img_size`` and normalised as
    the model's evaluation transform does (images or volumes); ``mean``/``std`` default 0.5."""
    transform = build_transforms(
        "none",
        img_size,
        train=False,
        in_chans=in_chans,
        mean=list(mean or [0.5]),
        std=list(std or [0.5]),
        spatial_dims=decoding.spatial_dims,
    )
    side = decoding.size
    if decoding.spatial_dims == 3:  # a volume model: the inputs are volumes
        blank = np.zeros((side, side, side), np.uint8)
    else:
        blank = np.zeros((side, side) if decoding.in_chans == 1 else (side, side, 3), np.uint8)
    return InputDataset(items, transform, blank)
