"""LightningDataModule for every 2D MedMNIST v2 / MedMNIST+ set, with the official splits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from medmnist import INFO
from torch.utils.data import DataLoader, Dataset, Sampler

from medvit.data.batch_transforms import BatchAugment, build_batch_transforms
from medvit.data.checks import check_arrays, check_split_sizes, class_counts
from medvit.data.dataset import MedMNISTSplit, SeededDistributedSampler
from medvit.data.files import (
    SPLITS,
    DataFileError,
    download,
    extract_npz,
    file_name,
    mmap_dir_for,
    open_arrays,
    size_suffix,
    verify_md5,
)
from medvit.data.presets import Preset, preset_for_flag
from medvit.data.transforms import Channels, build_transforms
from medvit.runs import read_folds

#: Image sizes MedMNIST publishes each 2D set at.
Size = Literal[28, 64, 128, 224]
SIZES: tuple[int, ...] = get_args(Size)
TASKS = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}
FLAGS_2D = tuple(flag for flag in INFO if not flag.endswith("3d"))
#: Where training augmentation runs (see ``MedMNISTDataModule``).
AugmentOn = Literal["workers", "device"]
AUGMENT_ON: tuple[str, ...] = get_args(AugmentOn)
# The positive class of each binary set: the finding a clinician screens for, so sensitivity is
# its detection rate. MedMNIST's own label order puts it at 0 for BreastMNIST (0 malignant,
# 1 normal/benign) and at 1 for PneumoniaMNIST (0 normal, 1 pneumonia).
POSITIVE_CLASS = {"breastmnist": "malignant", "pneumoniamnist": "pneumonia"}


def default_root() -> str:
    """Where MedMNIST files live unless ``--data.root`` says otherwise."""
    return os.environ.get("MEDVIT_DATA_DIR", "data")


class MedMNISTDataModule(L.LightningDataModule):
    """A 2D MedMNIST dataset with its official train/val/test splits.

    Metadata (task, class names, channels, split sizes, URLs, MD5) comes from ``medmnist.INFO``.
    Files are ``{root}/{flag}.npz`` (28 px) or ``{root}/{flag}_{size}.npz``; they are downloaded
    only in :meth:`prepare_data`, MD5-checked, and unpacked once into memory-mappable ``.npy``
    files under ``cache_dir``. Model selection uses the validation split; the test split is only
    read by ``test`` and ``predict``.

    Args:
        flag: MedMNIST flag, e.g. ``"breastmnist"`` (2D sets only).
        size: image size of the file to use: 28, 64, 128 or 224.
        root: folder holding (or receiving) the ``.npz`` files. Defaults to the
            ``MEDVIT_DATA_DIR`` environment variable, else ``data``.
        global_batch_size: batch size summed over all devices; each device gets
            ``global_batch_size // world_size`` and the division must be exact, so a run keeps
            the same optimisation (and learning rate) on 1 or N devices.
        num_workers: DataLoader worker processes per device.
        in_chans: channels fed to the model; ``None`` keeps the dataset's (1 or 3). Grey sets
            can be fed as 3 channels for RGB-pretrained models.
        img_size: side length fed to the model; ``None`` keeps ``size``.
        augmentation: augmentation preset; ``None`` picks the flag's modality preset.
        augment_on: where training augmentation runs. ``"workers"``: per image in the
            DataLoader workers. ``"device"``: the workers only read uint8 images, and the preset
            runs on whole batches after they reach the training device
            (:class:`~medvit.data.batch_transforms.BatchAugment`), for when the host's cores
            cannot keep a GPU busy. Validation and test data are prepared in the workers either way.
        mean: normalisation mean per channel (or one value); ``None`` means 0.5, unless the
            CLI fills it from the model's pretrained data config.
        std: normalisation std, as ``mean``.
        download: download a missing file in :meth:`prepare_data`.
        verify_md5: refuse a file whose MD5 differs from the official one. Turn off only for
            a file of your own in the MedMNIST format (split sizes are then not checked).
        cache_dir: where unpacked ``.npy`` copies live; defaults to ``{root}/mmap`` when
            ``root`` is writable, else ``data/mmap``.
        base_url: fetch files from this URL prefix (a mirror) instead of the official URL.
        folds_file: a ``folds.csv`` from ``medvit cv``; with ``fold`` it replaces the official
            train/val split by the CV split of the pool (the test split stays official).
        fold: which fold of ``folds_file`` is the validation fold.
        repeat: which repeat of ``folds_file`` to use.
        pin_memory: pin host memory in the DataLoaders (useful on GPU).
        positive_class: binary sets: the class (name or index) that sensitivity, specificity,
            F1 and the operating point are about. ``None`` takes it from ``POSITIVE_CLASS``
            (the finding a clinician looks for, e.g. malignant for BreastMNIST), else class 1.
    """

    def __init__(
        self,
        flag: str = "breastmnist",
        size: Size = 28,
        root: str | None = None,
        global_batch_size: int = 64,
        num_workers: int = 2,
        in_chans: Channels | None = None,
        img_size: int | None = None,
        augmentation: Preset | None = None,
        augment_on: AugmentOn = "workers",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        download: bool = True,
        verify_md5: bool = True,
        cache_dir: str | None = None,
        base_url: str | None = None,
        folds_file: str | None = None,
        fold: int | None = None,
        repeat: int = 0,
        pin_memory: bool = False,
        positive_class: str | int | None = None,
    ) -> None:
        super().__init__()
        if flag not in INFO:
            raise ValueError(f"Unknown MedMNIST flag '{flag}'. Known 2D flags: {list(FLAGS_2D)}.")
        if flag not in FLAGS_2D:
            raise ValueError(
                f"'{flag}' is a 3D MedMNIST set; MedMNISTDataModule handles the 2D sets "
                f"{list(FLAGS_2D)}."
            )
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size}.")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        info = INFO[flag]
        if in_chans not in (None, 1, 3):
            raise ValueError(f"in_chans must be 1, 3 or None, got {in_chans}.")
        if in_chans == 1 and info["n_channels"] == 3:
            raise ValueError(f"{flag} images are RGB; in_chans=1 would drop colour. Use 3.")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}.")
        if (folds_file is None) != (fold is None):
            raise ValueError("folds_file and fold go together: give both or neither.")
        self.save_hyperparameters(logger=False)
        self.info = info
        self._positive_index = self._resolve_positive_class(positive_class)
        self.root = Path(root if root is not None else default_root())
        self.batch_size_per_device = global_batch_size
        self.data_train: MedMNISTSplit | None = None
        self.data_val: MedMNISTSplit | None = None
        self.data_test: MedMNISTSplit | None = None
        self.batch_augment: BatchAugment | None = None
        self._folder: Path | None = None
        self._split_sizes: dict[str, int] = {}

    # ----------------------------------------------------------------- metadata for the model
    @property
    def task(self) -> str:
        """One of ``binary``, ``multiclass``, ``multilabel``, ``ordinal``."""
        return TASKS[self.info["task"]]

    @property
    def class_names(self) -> list[str]:
        """Class (or, for multi-label sets, label) names in index order."""
        labels = self.info["label"]
        return [labels[str(i)] for i in range(len(labels))]

    @property
    def num_classes(self) -> int:
        return len(self.info["label"])

    @property
    def positive_index(self) -> int:
        """Binary sets: index of the positive class (see ``positive_class``); else 1, unused."""
        return self._positive_index

    def _resolve_positive_class(self, positive_class: str | int | None) -> int:
        flag, names = self.hparams.flag, self.class_names
        if self.task != "binary":
            if positive_class is not None:
                raise ValueError(
                    f"positive_class is for binary sets; {flag} is a {self.task} task."
                )
            return 1
        if positive_class is None:
            positive_class = POSITIVE_CLASS.get(flag, 1)
        if isinstance(positive_class, int) and positive_class in range(len(names)):
            return positive_class
        if positive_class in names:
            return names.index(positive_class)
        raise ValueError(
            f"positive_class {positive_class!r} is not a class of {flag}: give one of {names} "
            f"or its index."
        )

    @property
    def in_chans(self) -> int:
        return self.hparams.in_chans or self.info["n_channels"]

    @property
    def img_size(self) -> int:
        return self.hparams.img_size or self.hparams.size

    @property
    def path(self) -> Path:
        """The ``.npz`` file this module reads."""
        return self.root / file_name(self.hparams.flag, self.hparams.size)

    @property
    def url(self) -> str:
        if self.hparams.base_url:
            return f"{self.hparams.base_url.rstrip('/')}/{self.path.name}"
        return self.info[f"url{size_suffix(self.hparams.size)}"]

    @property
    def md5(self) -> str:
        return self.info[f"MD5{size_suffix(self.hparams.size)}"]

    def _cache_root(self) -> Path:
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir)
        if os.access(self.root, os.W_OK):
            return self.root / "mmap"
        return Path("data") / "mmap"

    @contextmanager
    def _cache_errors(self, cache_root: Path) -> Iterator[None]:
        """Turn a failed write in the cache folder into one line naming ``--data.cache_dir``."""
        try:
            yield
        except OSError as err:
            failed = os.path.abspath(err.filename) if err.filename else ""
            top = os.path.abspath(cache_root)
            # The cache folder, something in it, or a parent that had to be created.
            if not failed or os.path.commonpath([failed, top]) not in (failed, top):
                raise
            why = ""
            if not self.hparams.cache_dir and cache_root != self.root / "mmap":
                why = f" (the data folder {self.root} is not writable, so the default is {top})"
            raise DataFileError(
                f"Cannot write the unpacked-array cache in {cache_root}{why}: "
                f"{err.strerror or err}. Point --data.cache_dir at a writable folder, e.g. "
                "--data.cache_dir /tmp/medvit-cache."
            ) from err

    # ----------------------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        """Download (rank 0 only), check the MD5 and unpack into memory-mappable files."""
        path = self.path
        if not path.is_file():
            if not self.hparams.download:
                raise DataFileError(
                    f"{path} does not exist and download is off. Get it from {self.url} "
                    f"and put it at {path}, or point --data.root (or MEDVIT_DATA_DIR) at its folder."
                )
            rank_zero_info(f"Downloading {self.url} -> {path}")
            download(self.url, path, self.md5 if self.hparams.verify_md5 else None)
        elif self.hparams.verify_md5:
            cache_root = self._cache_root()
            with self._cache_errors(cache_root):
                verify_md5(path, self.md5, cache_root)
        self._unpack()

    def _unpack(self) -> Path:
        path = self.path
        if not path.is_file():
            raise DataFileError(
                f"{path} does not exist. Run prepare_data() (the Trainer does) or get it from "
                f"{self.url} and put it at {path}."
            )
        cache_root = self._cache_root()
        with self._cache_errors(cache_root):
            folder = extract_npz(path, mmap_dir_for(path, cache_root))
        arrays = open_arrays(folder, path)
        official = self.hparams.verify_md5
        check_arrays(
            arrays, path, self.hparams.flag, self.hparams.size, self.info, self.task, official
        )
        check_split_sizes(
            arrays, path, self.task, self.class_names, warn_missing=self.hparams.folds_file is None
        )
        # Official sizes when the MD5 was checked (check_arrays insists), the file's own otherwise.
        self._split_sizes = {split: len(arrays[f"{split}_labels"]) for split in SPLITS}
        return folder

    def setup(self, stage: str | None = None) -> None:
        """Build the split datasets (every rank) and the per-device batch size."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.global_batch_size % world != 0:
            raise ValueError(
                f"global_batch_size ({self.hparams.global_batch_size}) is not divisible by the "
                f"number of devices ({world}); pick a multiple of {world}."
            )
        self.batch_size_per_device = self.hparams.global_batch_size // world
        if self._folder is None:
            self._folder = self._unpack()
        multilabel = self.task == "multilabel"
        mean = self.hparams.mean or [0.5]
        std = self.hparams.std or [0.5]
        preset = self.hparams.augmentation or preset_for_flag(self.hparams.flag)

        def make(train: bool):
            return build_transforms(
                preset, self.img_size, train=train, in_chans=self.in_chans, mean=mean, std=std
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
