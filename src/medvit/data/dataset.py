"""The training-side data objects: a memory-mapped MedMNIST split and the seeded sampler.

:class:`~medvit.data.medmnist.MedMNISTDataModule` builds them; they know nothing of Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from medvit.data.files import SPLITS

__all__ = ["MedMNISTSplit", "SeededDistributedSampler"]


class MedMNISTSplit(Dataset):
    """Images and labels of one or more (split, indices) sources of a memory-mapped MedMNIST set.

    Items are ``(image, target, index)``, where ``index`` is the item's position in this dataset
    (for an official split, its index in that split), so predictions can be matched back. With
    ``return_seed`` (augmentation on the device) a training item also carries its augmentation
    seed: ``(image, target, index, seed)``.
    The arrays are opened lazily in each process: a pickled memmap would copy the whole split.
    """

    def __init__(
        self,
        folder: Path,
        sources: Sequence[tuple[str, np.ndarray]],
        transform: Any,
        multilabel: bool,
        return_seed: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.transform = transform
        self.multilabel = multilabel
        self.return_seed = return_seed
        self._split_of = np.concatenate(
            [np.full(len(idx), SPLITS.index(split), dtype=np.int8) for split, idx in sources]
        )
        self._index_of = np.concatenate([np.asarray(idx, dtype=np.int64) for _, idx in sources])
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._index_of)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def _array(self, key: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {
                k: np.load(self.folder / f"{k}.npy", mmap_mode="r", allow_pickle=False)
                for s in SPLITS
                for k in (f"{s}_images", f"{s}_labels")
            }
        return self._arrays[key]

    def labels(self) -> np.ndarray:
        """All labels in dataset order, shape (N, 1) or (N, L) for multi-label."""
        out = []
        for split in SPLITS:
            mask = self._split_of == SPLITS.index(split)
            if mask.any():
                out.append(np.asarray(self._array(f"{split}_labels")[self._index_of[mask]]))
        return np.concatenate(out) if out else np.empty((0, 1), dtype=np.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        # Training samplers pass (index, augmentation seed): a sample's augmentation then depends
        # only on (seed, epoch, index), not on the worker or rank that happens to load it.
        i, seed = key if isinstance(key, tuple) else (key, None)
        if self.return_seed:
            if seed is None:
                raise ValueError(
                    "augmentation on the device needs the (index, seed) keys of "
                    "SeededDistributedSampler; this dataset was indexed with a plain index."
                )
        elif seed is not None:
            self.transform.set_random_state(seed)
        split = SPLITS[self._split_of[i]]
        j = int(self._index_of[i])
        image = np.asarray(self._array(f"{split}_images")[j])
        label = np.asarray(self._array(f"{split}_labels")[j])
        if self.multilabel:
            target = torch.from_numpy(label.astype(np.float32))
        else:
            target = torch.tensor(int(label.reshape(-1)[0]), dtype=torch.long)
        if self.return_seed:
            return self.transform(image), target, i, seed
        return self.transform(image), target, i


class SeededDistributedSampler(DistributedSampler):
    """Shuffling sampler yielding ``(index, augmentation_seed)``, identical on 1 or N ranks.

    With one rank it visits the same permutation as N ranks together, so a global batch holds
    the same samples whatever the device count; each sample's augmentation seed is a function
    of (seed, epoch, index). Together these make a DDP run reproduce a single-device run.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in super().__iter__():
            mixed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            yield index, int(mixed)
