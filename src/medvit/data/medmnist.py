"""LightningDataModule for every MedMNIST v2 / MedMNIST+ set (2D and 3D), with the official splits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

from lightning.pytorch.utilities import rank_zero_info
from medmnist import INFO

from medvit.data.arrays import AUGMENT_ON, ArrayDataModule, AugmentOn, check_common_args
from medvit.data.checks import check_arrays, check_split_sizes, class_counts  # noqa: F401
from medvit.data.dataset import MedMNISTSplit, SeededDistributedSampler  # noqa: F401 (re-exported)
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
from medvit.data.transforms import Channels

__all__ = [
    "AUGMENT_ON",
    "MedMNISTSplit",
    "SeededDistributedSampler",
    "FLAGS_2D",
    "FLAGS_3D",
    "POSITIVE_CLASS",
    "SIZES",
    "SIZES_3D",
    "TASKS",
    "AugmentOn",
    "MedMNISTDataModule",
    "Size",
    "default_root",
]

#: Image sizes MedMNIST publishes each 2D set at.
Size = Literal[28, 64, 128, 224]
SIZES: tuple[int, ...] = get_args(Size)
#: Cube sides MedMNIST publishes each 3D set at.
SIZES_3D: tuple[int, ...] = (28, 64)
TASKS = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}
FLAGS_2D = tuple(flag for flag in INFO if not flag.endswith("3d"))
#: The 3D sets: grey volumes (N, D, H, W), D = H = W = size.
FLAGS_3D = tuple(flag for flag in INFO if flag.endswith("3d"))
# The positive class of each binary set: the finding a clinician screens for, so sensitivity is
# its detection rate. MedMNIST's own label order puts it at 0 for BreastMNIST (0 malignant,
# 1 normal/benign) and at 1 for PneumoniaMNIST (0 normal, 1 pneumonia).
POSITIVE_CLASS = {"breastmnist": "malignant", "pneumoniamnist": "pneumonia"}


def default_root() -> str:
    """Where MedMNIST files live unless ``--data.root`` says otherwise."""
    return os.environ.get("MEDVIT_DATA_DIR", "data")


class MedMNISTDataModule(ArrayDataModule):
    """A MedMNIST dataset (2D images or 3D volumes) with its official train/val/test splits.

    A 3D flag (``FLAGS_3D``, e.g. ``adrenalmnist3d``) gives grey volumes: samples are
    (C, D, H, W) tensors, ``spatial_dims`` is 3 and ``img_size`` is the cube's side; the flag's
    3D augmentation preset runs in the workers. Metadata (task, class names, channels, split sizes, URLs, MD5) comes from ``medmnist.INFO``.
    Files are ``{root}/{flag}.npz`` (28 px) or ``{root}/{flag}_{size}.npz``; they are downloaded
    only in :meth:`prepare_data`, MD5-checked, and unpacked once into memory-mappable ``.npy``
    files under ``cache_dir``. Model selection uses the validation split; the test split is only
    read by ``test`` and ``predict``.

    Args:
        flag: MedMNIST flag, e.g. ``"breastmnist"`` or ``"adrenalmnist3d"``.
        size: image size of the file to use: 28, 64, 128 or 224 (3D sets: 28 or 64).
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
            raise ValueError(
                f"Unknown MedMNIST flag '{flag}'. Known 2D flags: {list(FLAGS_2D)}; "
                f"3D flags: {list(FLAGS_3D)}."
            )
        sizes = SIZES_3D if flag in FLAGS_3D else SIZES
        if size not in sizes:
            raise ValueError(f"size must be one of {sizes} for {flag}, got {size}.")
        check_common_args(global_batch_size, num_workers, in_chans, augment_on, folds_file, fold)
        info = INFO[flag]
        if in_chans == 1 and info["n_channels"] == 3:
            raise ValueError(f"{flag} images are RGB; in_chans=1 would drop colour. Use 3.")
        self.save_hyperparameters(logger=False)
        self.info = info
        self.root = Path(root if root is not None else default_root())
        self._init_arrays(positive_class)
        self._check_augment_on()

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
    def dataset_name(self) -> str:  # type: ignore[override]
        """The flag, as messages name the data."""
        return self.hparams.flag

    def _native_channels(self) -> int:
        return self.info["n_channels"]

    def _native_spatial_dims(self) -> int:
        return 3 if self.hparams.flag in FLAGS_3D else 2

    def _preset(self) -> Preset:
        return self.hparams.augmentation or preset_for_flag(self.hparams.flag)

    def _default_positive_class(self) -> str | int:
        return POSITIVE_CLASS.get(self.hparams.flag, 1)

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
            arrays,
            path,
            self.hparams.flag,
            self.hparams.size,
            self.info,
            self.task,
            official,
            spatial_dims=self.spatial_dims,
        )
        check_split_sizes(
            arrays, path, self.task, self.class_names, warn_missing=self.hparams.folds_file is None
        )
        # Official sizes when the MD5 was checked (check_arrays insists), the file's own otherwise.
        self._split_sizes = {split: len(arrays[f"{split}_labels"]) for split in SPLITS}
        return folder

    def _arrays_folder(self) -> Path:
        return self._unpack()
