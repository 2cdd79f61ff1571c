"""``ImageDataModule``: train on your own images or volumes: a folder of class folders or a CSV/TSV.

``medvit fit -c configs/experiment/breastmnist.yaml --data ImageDataModule --data.path DATA``.
The table of samples comes from :mod:`medvit.data.sources`, each file is decoded by
:mod:`medvit.data.readers` once into the decode cache (:mod:`medvit.data.decode`), and from there
on training is the MedMNIST path's (:class:`~medvit.data.arrays.ArrayDataModule`): the same
memory-mapped uint8 arrays, transforms, sampler, folds and metrics.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from medvit import runs
from medvit.data.arrays import ArrayDataModule, AugmentOn, check_common_args
from medvit.data.checks import check_split_sizes
from medvit.data.decode import MANIFEST, decode_to_cache
from medvit.data.files import SPLITS
from medvit.data.presets import PRESETS, Preset
from medvit.data.problems import show_path
from medvit.data.readers import parse_window, read_pixels
from medvit.data.sources import (
    DataSourceError,
    Problem,
    Table,
    bad_files,
    drop,
    load_table,
    make_splits,
    validate,
    with_splits,
)
from medvit.data.transforms import Channels
from medvit.data.volumes import parse_spacing

__all__ = ["BAD_FILE_POLICIES", "ImageDataModule", "OnBadFile", "Task", "parse_window"]

Task = Literal["binary", "multiclass", "multilabel", "ordinal"]
#: What to do with files that are missing, empty or cannot be decoded.
OnBadFile = Literal["error", "skip"]
BAD_FILE_POLICIES: tuple[str, ...] = get_args(OnBadFile)
#: Files decoded to guess the channels (grey or colour) when ``in_chans`` is not given.
_CHANNEL_PROBES = 16


class ImageDataModule(ArrayDataModule):
    """Your own images or volumes: a folder of class folders, or a CSV/TSV of paths and labels.

    Task, classes, channels and size come from the data (and are linked to the model as for
    MedMNIST). Each image is decoded once, at ``size``, into memory-mapped uint8 arrays under
    ``cache_dir`` (rebuilt when a file, a label, the split or an option changes). Splits given
    by the source (a ``split`` column, or ``train/``, ``val/``, ``test/`` folders) are used as
    they are; otherwise a seeded, stratified split that keeps each patient in one split is made
    and written to the run folder (``splits.csv``), and read back from there when the run is
    resumed.

    Args:
        path: a folder (one subfolder per class, optionally under ``train/``, ``val/``,
            ``test/``) or a CSV/TSV file (paths relative to it).
        size: side length images are decoded to (square; aspect ratio not kept).
        task: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``; ``None`` infers it
            (2 classes binary, more multiclass, 0/1 finding columns multilabel). ``ordinal`` for
            integer grades.
        class_names: the classes in label order; default: sorted names (folders, label values).
        modality: augmentation preset (``medvit.data.presets``), e.g. ``chest_xray``,
            ``dermoscopy``; ``none`` (the default) only resizes and normalises, since the
            right augmentation depends on the anatomy (no flips for chest X-rays).
        window: DICOM/NIfTI window ``"center,width"`` in the file's units (e.g. ``40,400``
            for soft-tissue CT) instead of the file's own VOI LUT or window.
        spatial_dims: 2 (images) or 3 (volumes: 3D NIfTI files and DICOM series folders,
            decoded by :mod:`medvit.data.volumes` into ``size``-cubes); ``None`` finds it from
            the items (a folder item or a NIfTI file with several slices is a volume). Give 3
            for a folder of class folders whose DICOM files form one series per folder.
        spacing: volumes: resample to this voxel spacing in mm first (one value isotropic, or
            D,H,W), then resize to the cube; ``None`` only resizes.
        crop_pad: volumes: centre-crop or pad (with the minimum) to the cube instead of
            resizing, after the spacing step: keeps the physical scale.
        on_bad_file: ``error``: stop before training, listing every missing, empty or
            undecodable file; ``skip``: train without them and list them in the run folder
            (``skipped_files.csv``). Other problems (labels, duplicates, columns) always stop.
        path_column: CSV column of image paths.
        label_column: CSV column of labels (class names or integers).
        label_columns: CSV columns of 0/1 findings (multi-label).
        patient_column: CSV column of patient ids (keeps a patient in one split or fold).
        split_column: CSV column of splits (``train``/``val``/``test``).
        val_fraction: share of samples for validation when the source has no val split.
        test_fraction: share of samples for testing when the source has no splits.
        split_seed: seed of the split medvit makes (independent of ``seed_everything``).
        global_batch_size: batch size summed over all devices (see MedMNISTDataModule).
        num_workers: DataLoader worker processes per device.
        decode_workers: processes decoding the images for the cache; ``None``: the CPU cores
            this process may use (at most 16).
        in_chans: channels fed to the model; ``None``: 3 when the sampled images are in
            colour, else 1. Colour images with ``in_chans=1`` are converted to grey (luma).
        img_size: side length fed to the model; ``None`` keeps ``size``.
        augment_on: ``workers`` or ``device`` (see MedMNISTDataModule).
        mean: normalisation mean per channel (or one value); ``None`` means 0.5.
        std: normalisation std, as ``mean``.
        cache_dir: cache root; default ``$MEDVIT_DATA_DIR/mmap`` (else ``data/mmap``); the
            decoded arrays go under its ``images/`` folder.
        folds_file: a ``folds.csv`` from ``medvit cv``; with ``fold``, its CV split of the pool
            (train + val) replaces the train/val split.
        fold: which fold of ``folds_file`` is the validation fold.
        repeat: which repeat of ``folds_file`` to use.
        pin_memory: pin host memory in the DataLoaders.
        positive_class: binary data: the class (name or index) sensitivity, specificity, F1
            and the operating point are about; default class 1.
    """

    def __init__(
        self,
        path: str,
        size: int = 224,
        task: Task | None = None,
        class_names: list[str] | None = None,
        modality: Preset = "none",
        window: tuple[float, float] | str | None = None,
        spatial_dims: Literal[2, 3] | None = None,
        spacing: float | list[float] | str | None = None,
        crop_pad: bool = False,
        on_bad_file: OnBadFile = "error",
        path_column: str = "path",
        label_column: str = "label",
        label_columns: list[str] | None = None,
        patient_column: str = "patient_id",
        split_column: str = "split",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        global_batch_size: int = 64,
        num_workers: int = 2,
        decode_workers: int | None = None,
        in_chans: Channels | None = None,
        img_size: int | None = None,
        augment_on: AugmentOn = "workers",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        cache_dir: str | None = None,
        folds_file: str | None = None,
        fold: int | None = None,
        repeat: int = 0,
        pin_memory: bool = False,
        positive_class: str | int | None = None,
    ) -> None:
        super().__init__()
        check_common_args(global_batch_size, num_workers, in_chans, augment_on, folds_file, fold)
        if not path:
            raise ValueError("ImageDataModule needs --data.path: a folder or a CSV/TSV file.")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        if modality not in PRESETS:
            raise ValueError(f"modality must be one of {PRESETS}, got {modality!r}.")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(
                f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}."
            )
        if decode_workers is not None and decode_workers < 0:
            raise ValueError(f"decode_workers must be >= 0, got {decode_workers}.")
        self.window = parse_window(window)
        self.spacing = parse_spacing(spacing)
        self.save_hyperparameters(logger=False)
        csv_options = {
            "path_column": path_column,
            "label_column": label_column,
            "label_columns": label_columns,
            "patient_column": patient_column,
            "split_column": split_column,
        }
        #: The samples as the source lists them (before bad files are dropped).
        self.table: Table = load_table(
            path, spatial_dims, task=task, class_names=class_names, **csv_options
        )
        if self.table.spatial_dims == 3 and in_chans == 3:
            raise ValueError("volumes are grey: in_chans must be 1 or None for 3D data.")
        #: The run folder (set by ``medvit fit``): where ``splits.csv`` and
        #: ``skipped_files.csv`` are written, and a made split is read back from.
        self.run_dir: Path | None = None
        #: Another run folder to read a made split from (the checkpoint's, for ``medvit test``).
        self.source_run_dir: Path | None = None
        #: Files left out with ``on_bad_file="skip"``: ``(path as listed, reason)``.
        self.skipped: list[tuple[str, str]] = []
        self._channels: int | None = None
        self._init_arrays(positive_class)

    # ----------------------------------------------------------------- metadata for the model
    @property
    def dataset_name(self) -> str:  # type: ignore[override]
        """The source's name: the folder's name, or the CSV file's stem."""
        return runs.source_name(self.table.source or self.table.root)

    @property
    def task(self) -> str:
        return self.table.task

    def _native_spatial_dims(self) -> int:
        """3 for volumes (arrays (N, D, H, W), cubes of ``size``), 2 for images: the source's."""
        return self.table.spatial_dims

    @property
    def class_names(self) -> list[str]:
        return list(self.table.class_names)

    def _native_channels(self) -> int:
        if self._channels is None:
            self._channels = self._probe_channels()
        return self._channels

    def _probe_channels(self) -> int:
        """3 when any of a few evenly spaced files is in colour (channels differ), else 1."""
        paths = self.table.paths
        if not paths or self.spatial_dims == 3:  # volumes are grey
            return 1
        picks = np.unique(np.linspace(0, len(paths) - 1, min(_CHANNEL_PROBES, len(paths))))
        for i in picks.astype(int):
            try:
                pixels = read_pixels(paths[i], self.window)
            except ValueError:  # ImageReadError too: reported when the cache is built
                continue
            if pixels.ndim == 3:
                rgb = pixels[..., :3]
                if not (
                    np.array_equal(rgb[..., 0], rgb[..., 1])
                    and np.array_equal(rgb[..., 0], rgb[..., 2])
                ):
                    return 3
        return 1

    def _preset(self) -> Preset:
        return self.hparams.modality

    def _cache_root(self) -> Path:
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir)
        return Path(os.environ.get("MEDVIT_DATA_DIR", "data")) / "mmap"

    def _decode_workers(self) -> int:
        if self.hparams.decode_workers is not None:
            return self.hparams.decode_workers
        return min(16, len(os.sched_getaffinity(0)))

    def _is_writer(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    # ----------------------------------------------------------------------------- lifecycle
    def prepare_data(self) -> None:
        """Check the source and decode every image into the cache (once per node)."""
        if self._folder is None:
            self._folder = self._arrays_folder()

    def _arrays_folder(self) -> Path:
        table, source = self.table, self.table.source or self.table.root
        skip = self.hparams.on_bad_file == "skip"
        problems = validate(table)
        if any(not p.skippable for p in problems):
            raise DataSourceError(source, problems)
        missing = bad_files(problems)  # missing or empty files
        kept = drop(table, missing)
        if skip and missing:
            more = [p for p in validate(kept) if not p.skippable]  # e.g. a class left empty
            if more:
                raise DataSourceError(source, [*problems, *more])
        splits = self._splits(kept)
        writer = self._is_writer() and self.run_dir is not None
        decoded = decode_to_cache(
            kept.paths,
            kept.labels,
            splits,
            name=self.dataset_name,
            source=Path(source),
            cache_root=self._cache_root(),
            size=self.hparams.size,
            channels=self._decode_channels(),
            window=self.window,
            workers=self._decode_workers(),
            spacing=self.spacing,
            spatial_dims=self.spatial_dims,
            crop_pad=bool(self.hparams.crop_pad),
        )
        if decoded.failed or missing:
            found = [*problems, *_decode_problems(decoded.failed, table.root)]
            if not skip:
                err = DataSourceError(source, found)
                err.args = (
                    f"{err.args[0]}\nFix or remove these files, or pass --data.on_bad_file skip "
                    "to train without them (they are then listed in the run folder).",
                )
                raise err
            self.skipped = [
                (show_path(p, table.root), prob.kind) for prob in problems for p in prob.paths
            ] + [(show_path(p, table.root), why) for p, why, _ in decoded.failed]
            if writer:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                runs.write_skipped_files(self.run_dir / runs.SKIPPED_FILE, self.skipped)
            warnings.warn(
                f"{source}: {len(self.skipped)} bad file(s) left out of training "
                f"(--data.on_bad_file skip): "
                + "; ".join(f"{p} ({why})" for p, why in self.skipped[:20])
                + (
                    ""
                    if self.run_dir is None
                    else f". All listed in {self.run_dir / runs.SKIPPED_FILE}."
                ),
                stacklevel=2,
            )
        if writer:  # every row the split was made for (skipped files too: a resume reads it)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            patients = kept.patient_ids
            runs.write_splits(self.run_dir / runs.SPLITS_FILE, kept.rel_paths(), splits, patients)
        arrays = {
            f"{s}_{kind}": np.load(decoded.folder / f"{s}_{kind}.npy", mmap_mode="r")
            for s in SPLITS
            for kind in ("images", "labels")
        }
        check_split_sizes(
            arrays, Path(source), self.task, self.class_names,
            warn_missing=self.hparams.folds_file is None,
        )  # fmt: skip
        self._split_sizes = {s: len(arrays[f"{s}_labels"]) for s in SPLITS}
        if decoded.built:
            what = "volumes" if self.spatial_dims == 3 else "images"
            rank_zero_info(f"Decoded {len(kept)} {what} of {source} into {decoded.folder}")
        return decoded.folder

    def split_samples(self, split: str) -> tuple[list[str], list[str] | None]:
        """The files of a split in index order (as the source lists them) and their patients.

        Index ``i`` of the split's arrays, of its dataset and of ``test_predictions.npz`` is
        file ``i`` here (bad files skipped are not). Patients are None without a patient column.
        After :meth:`prepare_data` or :meth:`setup`.
        """
        if self._folder is None:
            raise RuntimeError(f"call prepare_data() or setup() before split_samples('{split}')")
        paths = json.loads((self._folder / MANIFEST).read_text())["paths"][split]
        table = self.table
        names = [show_path(Path(p), table.root) for p in paths]
        if table.patient_ids is None:
            return names, None
        patient_of = {
            str(p): str(pid) for p, pid in zip(table.paths, table.patient_ids, strict=True)
        }
        return names, [patient_of[p] for p in paths]

    def _decode_channels(self) -> int:
        # Grey images stay one channel (the transforms repeat it for in_chans=3, as MedMNIST).
        return (
            1 if self.spatial_dims == 3 or self.in_chans == 1 or self._native_channels() == 1 else 3
        )

    def _splits(self, table: Table) -> np.ndarray:
        """Split per row: the source's, the run's ``splits.csv`` (a resume), or a new one."""
        hp = self.hparams
        if table.splits is not None:
            return with_splits(table, hp.val_fraction, 0.0, hp.split_seed).splits
        for folder in (self.run_dir, self.source_run_dir):
            saved_file = folder / runs.SPLITS_FILE if folder is not None else None
            if saved_file is not None and saved_file.is_file():
                saved = runs.read_splits(saved_file)
                names = table.rel_paths()
                new = [n for n in names if n not in saved]
                if new:
                    raise DataSourceError(
                        table.source or table.root,
                        [Problem("files not in the run's split", tuple(new),
                                 f"the data changed since {saved_file} was written; "
                                 "start a new run (without --ckpt_path)")],
                    )  # fmt: skip
                return np.array([saved[n] for n in names])
        return make_splits(
            table.labels, table.patient_ids, hp.val_fraction, hp.test_fraction, hp.split_seed
        )


#: How the one error names each kind of decoding failure (``ImageReadError.kind``).
_FAILURE_KINDS = {
    "missing": "missing files",
    "empty": "empty files",
    "no_pixel_data": "DICOM files without pixel data",
    "multi_frame": "multi-frame files",
    "unsupported": "unsupported images",
    "dimensions": "files of the wrong dimensions (2D image vs 3D volume)",
    "series": "DICOM series folders that cannot be stacked",
    "resample": "volumes that cannot be resampled",
    "unreadable": "unreadable files",
}


_UNREADABLE = _FAILURE_KINDS["unreadable"]


def _decode_problems(failed: list[tuple[Path, str, str]], root: Path) -> list[Problem]:
    """Files that failed to decode as problems, one per kind (in the order above)."""
    problems = []
    for title in _FAILURE_KINDS.values():
        rows = [(p, why) for p, why, k in failed if _FAILURE_KINDS.get(k, _UNREADABLE) == title]
        if rows:
            items = tuple(f"{show_path(p, root)} ({why})" for p, why in rows)
            paths = tuple(p for p, _ in rows)
            problems.append(Problem(title, items, "found while decoding", paths, skippable=True))
    return problems
