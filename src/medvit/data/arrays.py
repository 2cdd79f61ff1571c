"""What every medvit DataModule shares: splits served from memory-mapped uint8 arrays.

A subclass brings its data into a folder holding ``{split}_images.npy`` (uint8, (N, H, W) grey or
(N, H, W, 3) RGB, or (N, D, H, W) grey volumes when ``spatial_dims`` is 3) and ``{split}_labels.npy`` ((N, 1) class index, or (N, L) 0/1 for multi-label)
for the splits train, val and test, and says what the data are (task, class names, channels,
augmentation preset). This base turns that into Lightning's datasets and loaders, the same way
for every source: CV folds (``folds_file``/``fold``/``repeat``), per-image or batched
augmentation, the seeded sampler that makes 1 and N devices train alike, class counts and the
positive class. :class:`~medvit.data.medmnist.MedMNISTDataModule` (an ``.npz`` unpacked) and
:class:`~medvit.data.images.ImageDataModule` (your own files, decoded once) are its subclasses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from medvit.data.batch_transforms import BatchAugment, build_batch_transforms
from medvit.data.checks import class_counts
from medvit.data.dataset import MedMNISTSplit, SeededDistributedSampler
from medvit.data.presets import Preset
from medvit.data.transforms import build_transforms
from medvit.runs import read_folds

__all__ = ["AUGMENT_ON", "AugmentOn", "ArrayDataModule", "check_common_args"]

#: Where training augmentation runs (see ``MedMNISTDataModule``).
AugmentOn = Literal["workers", "device"]
AUGMENT_ON: tuple[str, ...] = get_args(AugmentOn)


def check_common_args(
    global_batch_size: int,
    num_workers: int,
    in_chans: int | None,
    augment_on: str,
    folds_file: str | None,
    fold: int | None,
) -> None:
    """Refuse, in one line, a value of an option every DataModule has."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
    if in_chans not in (None, 1, 3):
        raise ValueError(f"in_chans must be 1, 3 or None, got {in_chans}.")
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}.")
    if (folds_file is None) != (fold is None):
        raise ValueError("folds_file and fold go together: give both or neither.")


class ArrayDataModule(L.LightningDataModule):
    """Base of medvit's DataModules: train/val/test splits as memory-mapped uint8 arrays.

    Subclasses call ``save_hyperparameters`` with at least ``global_batch_size``,
    ``num_workers``, ``in_chans``, ``img_size``, ``size``, ``augment_on``, ``mean``, ``std``,
    ``folds_file``, ``fold``, ``repeat`` and ``pin_memory``, then :meth:`_init_arrays`, and
    implement ``task``, ``class_names``, :meth:`_native_channels`, :meth:`_preset`,
    :meth:`_default_positive_class` and :meth:`_arrays_folder`; volume data also override
    :meth:`_native_spatial_dims`.
    """

    #: What a message calls the data when it has no better name (a subclass sets its own).
    dataset_name: str = "the data"

    def _init_arrays(self, positive_class: str | int | None) -> None:
        self._positive_index = self._resolve_positive_class(positive_class)
        self.batch_size_per_device = self.hparams.global_batch_size
        self.data_train: MedMNISTSplit | None = None
        self.data_val: MedMNISTSplit | None = None
        self.data_test: MedMNISTSplit | None = None
        self.batch_augment: BatchAugment | None = None
        self._folder: Path | None = None
        self._split_sizes: dict[str, int] = {}

    # ------------------------------------------------------------------ for the subclasses
    @property
    def task(self) -> str:  # pragma: no cover - abstract
        """One of ``binary``, ``multiclass``, ``multilabel``, ``ordinal``."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:  # pragma: no cover - abstract
        """Class (or, for multi-label data, label) names in index order."""
        raise NotImplementedError

    def _native_channels(self) -> int:  # pragma: no cover - abstract
        """Channels of the arrays (1 grey, 3 RGB)."""
        raise NotImplementedError

    def _native_spatial_dims(self) -> int:
        """2 for images, 3 for volumes (what the cached arrays hold); images unless overridden."""
        return 2

    def _preset(self) -> Preset:  # pragma: no cover - abstract
        """The augmentation preset to train with."""
        raise NotImplementedError

    def _default_positive_class(self) -> str | int:
        """Binary data: the positive class when ``positive_class`` is not given."""
        return 1

    def _arrays_folder(self) -> Path:  # pragma: no cover - abstract
        """The folder of split arrays, ready to memory-map; sets ``self._split_sizes``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- metadata for the model
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_index(self) -> int:
        """Binary data: index of the positive class (see ``positive_class``); else 1, unused."""
        return self._positive_index

    def _resolve_positive_class(self, positive_class: str | int | None) -> int:
        name, names = self.dataset_name, self.class_names
        if self.task != "binary":
            if positive_class is not None:
                raise ValueError(
                    f"positive_class is for binary sets; {name} is a {self.task} task."
                )
            return 1
        if positive_class is None:
            positive_class = self._default_positive_class()
        if isinstance(positive_class, int) and positive_class in range(len(names)):
            return positive_class
        if positive_class in names:
            return names.index(positive_class)
        raise ValueError(
            f"positive_class {positive_class!r} is not a class of {name}: give one of {names} "
            f"or its index."
        )

    @property
    def in_chans(self) -> int:
        return self.hparams.in_chans or self._native_channels()

    @property
    def img_size(self) -> int:
        """Side length fed to the model (of the square image, or of the cube for volumes)."""
        return self.hparams.img_size or self.hparams.size

    @property
    def spatial_dims(self) -> int:
        """2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W); the CLI links it to the model."""
        return self._native_spatial_dims()

    def _check_augment_on(self) -> None:
        """Refuse on-device augmentation of volumes in one line naming the option."""
        if self.hparams.augment_on == "device" and self.spatial_dims == 3:
            raise ValueError(
                f"augment_on='device' batches 2D ops only, and {self.dataset_name} holds 3D "
                "volumes: use --data.augment_on workers (the 3D presets run in the workers)."
            )

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str | None = None) -> None:
        """Build the split datasets (every rank) and the per-device batch size."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.global_batch_size % world != 0:
            raise ValueError(
                f"global_batch_size ({self.hparams.global_batch_size}) is not divisible by the "
                f"number of devices ({world}); pick a multiple of {world}."
            )
        self.batch_size_per_device = self.hparams.global_batch_size // world
        self._check_augment_on()
        if self._folder is None:
            self._folder = self._arrays_folder()
        multilabel = self.task == "multilabel"
        mean = self.hparams.mean or [0.5]
        std = self.hparams.std or [0.5]
        preset = self._preset()

        def make(train: bool):
            return build_transforms(
                preset,
                self.img_size,
                train=train,
                in_chans=self.in_chans,
                mean=mean,
                std=std,
                spatial_dims=self.spatial_dims,
            )

        n = self._split_sizes
        if stage in (None, "fit", "validate") and self.data_train is None:
            train_src, val_src = self._fit_sources(n)
            on_device = self.hparams.augment_on == "device"
            if on_device:
                train_tf, self.batch_augment = build_batch_transforms(
                    preset, self.img_size, in_chans=self.in_chans, mean=mean, std=std
                )
            else:
                train_tf = make(True)
            self.data_train = MedMNISTSplit(
                self._folder, train_src, train_tf, multilabel, return_seed=on_device
            )
            self.data_val = MedMNISTSplit(self._folder, val_src, make(False), multilabel)
        if stage in (None, "test", "predict") and self.data_test is None:
            test_src = [("test", np.arange(n["test"]))]
            self.data_test = MedMNISTSplit(self._folder, test_src, make(False), multilabel)

    def _fit_sources(self, n: dict[str, int]) -> tuple[list, list]:
        if self.hparams.folds_file is None:
            return [("train", np.arange(n["train"]))], [("val", np.arange(n["val"]))]
        rows = read_folds(self.hparams.folds_file, repeat=self.hparams.repeat)
        if self.hparams.fold not in rows["fold"]:
            raise ValueError(
                f"{self.hparams.folds_file} has no fold {self.hparams.fold} in repeat "
                f"{self.hparams.repeat} (folds: {sorted(set(rows['fold'].tolist()))})."
            )
        for split in ("train", "val"):
            idx = rows["index"][rows["split"] == split]
            if len(idx) and (idx.min() < 0 or idx.max() >= n[split]):
                raise ValueError(
                    f"{self.hparams.folds_file} refers to {split} index {idx.max()}, but the "
                    f"{split} split has {n[split]} samples: it was made for another dataset."
                )
        in_val = rows["fold"] == self.hparams.fold

        def sources(mask: np.ndarray) -> list:
            return [
                (split, rows["index"][mask & (rows["split"] == split)])
                for split in ("train", "val")
            ]

        return sources(~in_val), sources(in_val)

    def _carries_seeds(self, batch: Any) -> bool:
        # Only training batches carry seeds (a 4-tuple); evaluation batches pass through.
        return (
            self.batch_augment is not None and isinstance(batch, (list, tuple)) and len(batch) == 4
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Keep the augmentation seeds on the host: parameters are drawn there, without a sync."""
        if self._carries_seeds(batch):
            images, target, index, seeds = batch
            return images, target, index, seeds.numpy()  # the transfer moves tensors only
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``augment_on="device"``, augment training batches where they now are."""
        if self._carries_seeds(batch):
            images, target, index, seeds = batch
            return self.batch_augment(images, torch.as_tensor(seeds)), target, index
        return batch

    def class_counts(self, stage: str = "train") -> np.ndarray:
        """Samples per class (or positives per label) in a split; after :meth:`setup`."""
        data = {"train": self.data_train, "val": self.data_val, "test": self.data_test}[stage]
        if data is None:
            raise RuntimeError(f"call setup() before class_counts('{stage}')")
        return class_counts(data.labels(), self.task, self.num_classes)

    # ---------------------------------------------------------------------------- dataloaders
    def _loader(self, data: Dataset, train: bool) -> DataLoader:
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything
        if train:
            # Lightning calls set_epoch() on it every epoch.
            sampler: Sampler = SeededDistributedSampler(
                data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
        else:
            # Lightning's default DistributedSampler pads the last batch by repeating samples,
            # which would count them twice in validation/test metrics (torchmetrics #1297).
            sampler = UnrepeatedDistributedSampler(
                data, num_replicas=world, rank=rank, shuffle=False
            )
        workers = self.hparams.num_workers
        return DataLoader(
            data,
            batch_size=self.batch_size_per_device,
            sampler=sampler,
            # Its own generator: otherwise each new (non-persistent) iterator draws a worker seed
            # from the global RNG, and stochastic depth would depend on the worker count.
            generator=torch.Generator().manual_seed(seed),
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
            drop_last=train and len(data) > self.batch_size_per_device,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, train=False)
