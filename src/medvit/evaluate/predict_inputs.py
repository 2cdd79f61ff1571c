"""What ``medvit predict`` reads: its inputs as a list of images, and how files are decoded.

Inputs: image, DICOM and NIfTI files (decoded by :func:`medvit.data.readers.load_image`), folders
of them (recursively), CSV/TSV listings of paths (:func:`medvit.data.sources.read_csv`) and
``file.npz[:split]``. For a 3D checkpoint the inputs are volumes instead, decoded by
:func:`medvit.data.volumes.load_volume` with the checkpoint's size, spacing and window: 3D NIfTI
files, DICOM series folders (a folder holding DICOM files directly is ONE volume), folders of
those (recursively), listings of them and 3D ``.npz`` splits. No torch here.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from medmnist import INFO

from medvit.data.readers import (
    IMAGE_SUFFIXES,
    is_image_file,
    is_nifti,
    load_image,
    parse_window,
    to_uint8,
)
from medvit.data.selection import describe_training_data
from medvit.data.sources import DataSourceError, Table, read_csv, scan_folder
from medvit.data.volumes import (
    is_series_folder,
    item_dims,
    load_volume,
    parse_spacing,
    resample,
    series_files,
)
from medvit.fileio import atomic_write

#: Inputs read as a listing of image paths (CSV, or TSV by suffix), not as an image.
LISTING_SUFFIXES = (".csv", ".tsv", ".tab")

#: Output columns predict writes itself; a CSV column of the same name is renamed ``input_<name>``.
_OWN_COLUMNS = ("source", "index", "prediction", "label", "label_name", "error")


@dataclass
class Item:
    """One image to predict: its name in the output, how to decode it, and what is known of it.

    Attributes:
        source: the ``source`` column: the path as given (relative to the CSV for a listing), or
            ``file.npz:split``.
        load: returns the image as ``uint8`` pixels.
        label: the npz label row or the CSV's label (class index, or 0/1 per finding); None when
            unknown.
        columns: the CSV's other columns for this row (``patient_id``, ``split``, ...).
    """

    source: str
    load: Callable[[], np.ndarray]
    label: Any = None
    columns: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decoding:
    """How files are decoded: :func:`load_image`'s ``size``, ``in_chans`` and ``window``.

    With ``spatial_dims=3``, :func:`~medvit.data.volumes.load_volume`'s cube ``size``,
    ``spacing``, ``window`` and ``crop_pad`` instead.
    """

    size: int | None
    in_chans: int
    window: tuple[float, float] | None
    spatial_dims: int = 2
    spacing: tuple[float, ...] | None = None
    crop_pad: bool = False

    def loader(self, path: Path) -> Callable[[], np.ndarray]:
        """A function decoding ``path`` when called (in the DataLoader, so errors stay per row).

        A :func:`functools.partial`, so that DataLoader worker processes can receive it.
        """
        if self.spatial_dims == 3:
            return partial(load_volume, path, self.size, self.spacing, self.window, self.crop_pad)
        return partial(load_image, path, self.size, self.in_chans, self.window)


def _npz_image(images: np.ndarray, j: int) -> np.ndarray:
    return to_uint8(images[j])


def _npz_volume(images: np.ndarray, j: int, size: int) -> np.ndarray:
    """Volume ``j`` of a 3D npz as uint8, resampled to the checkpoint's cube when it differs."""
    volume = to_uint8(images[j].reshape(images.shape[1:4]))
    if volume.shape == (size, size, size):
        return volume
    cube = resample(volume.astype(np.float32), (1.0, 1.0, 1.0), size)
    return np.rint(np.clip(cube, 0, 255)).astype(np.uint8)


def read_npz_split(
    path: Path, split: str, spatial_dims: int = 2
) -> tuple[np.ndarray, np.ndarray | None]:
    """``{split}_images`` (and ``{split}_labels`` if present) of an npz, never unpickling.

    ``spatial_dims`` 3 expects volumes (N, D, H, W) (or (N, D, H, W, 1)); 2 expects images.
    """
    key = f"{split}_images"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            if key not in npz:
                raise ValueError(f"{path} has no key '{key}' (keys: {sorted(npz.files)}).")
            images = npz[key]
            key = f"{split}_labels"
            labels = npz.get(key)
    except ValueError as err:
        if str(path) in str(err):
            raise
        # e.g. an object (pickled) array: numpy's message does not say which file or key.
        raise ValueError(f"{path}: cannot read '{key}' ({' '.join(str(err).split())}).") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz archive ({err}).") from err
    volumes = images.ndim == 5 and images.shape[4] == 1
    volumes |= images.ndim == 4 and images.shape[3] not in (1, 3, 4)
    if spatial_dims == 3 and not volumes:
        raise ValueError(
            f"{path}: '{split}_images' of shape {images.shape} are 2D images, but the checkpoint "
            "is a 3D model; expected volumes (N, D, H, W)."
        )
    if spatial_dims == 2 and volumes:
        raise ValueError(
            f"{path}: '{split}_images' of shape {images.shape} are 3D volumes, but the "
            "checkpoint is a 2D model; expected (N, H, W) or (N, H, W, 3) images."
        )
    if images.dtype == object or images.ndim not in (3, 4, 5):
        raise ValueError(
            f"{path}: '{split}_images' has shape {images.shape} and dtype {images.dtype}; "
            "expected (N, H, W) or (N, H, W, 3) images."
        )
    return images, labels


def decoding_for(hp: Any, data_hp: dict[str, Any], window: Any) -> Decoding:
    """Decode files as the training data was: its channels, its decode size, its window.

    A MedMNIST checkpoint's data has its set's channels (a grey set stays grey here even for a
    3-channel model: the transform repeats it, as in training) at ``data.size``; other data the
    datamodule's ``in_chans`` (else the model's) and ``size`` (else the model's ``img_size``).
    ``window`` (``--window``) wins over a ``window`` the datamodule was trained with.
    """
    flag = data_hp.get("flag")
    own = data_hp.get("in_chans") or hp.in_chans
    in_chans = INFO[flag]["n_channels"] if flag in INFO else own
    size = data_hp.get("size") or hp.img_size
    window = parse_window(window if window is not None else data_hp.get("window"))
    # The model's spatial_dims is linked from the data's; a datamodule's own is None when found
    # from its items.
    dims = int(getattr(hp, "spatial_dims", None) or data_hp.get("spatial_dims") or 2)
    spacing = parse_spacing(data_hp.get("spacing")) if dims == 3 else None
    crop_pad = bool(data_hp.get("crop_pad")) and dims == 3
    channels = 1 if dims == 3 else int(in_chans)
    return Decoding(int(size), channels, window, dims, spacing, crop_pad)


def image_files(folder: Path) -> list[Path]:
    """Every image, DICOM or NIfTI file under ``folder`` (recursively), hidden ones left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
        and is_image_file(p)
    )


def volume_items(folder: Path) -> list[Path]:
    """Every volume under ``folder`` (recursively): NIfTI files and DICOM series folders.

    A folder holding DICOM files directly is one series; hidden entries are left out.
    """
    found = []
    for p in folder.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.is_file() and is_nifti(p) or p.is_dir() and series_files(p):
            found.append(p)
    return sorted(found)


def folder_labels(
    folder: Path, files: list[Path], task: str, names: list[str], series: bool = False
) -> dict[Path, int]:
    """The class of each file when ``folder`` has one subfolder per checkpoint class, else ``{}``.

    The ImageFolder convention (optionally under ``train/``, ``val/``, ``test/``), read by
    :func:`medvit.data.sources.scan_folder`; used only when every image found lies in a folder
    named after one of the checkpoint's classes, so any other layout is simply unlabelled.
    """
    if task == "multilabel" or not files:
        return {}
    try:
        table = scan_folder(folder, class_names=names, series=series)
    except (DataSourceError, ValueError):
        return {}
    found = dict(zip(table.paths, table.labels.tolist(), strict=True))
    where = {f: Path(os.path.normpath(os.path.abspath(f))) for f in files}
    if table.problems or set(found) != set(where.values()):
        return {}
    return {f: found[where[f]] for f in files}


def output_name(column: str) -> str:
    """A CSV column's name in the output: ``input_<name>`` when predict writes one so named."""
    # patient_id and split are in extra only when other columns play those roles.
    clash = column in (*_OWN_COLUMNS, "patient_id", "split") or column.startswith(
        ("prob_", "input_")
    )
    return f"input_{column}" if clash else column


#: The listing's column options (names as :func:`medvit.data.sources.read_csv` takes them) and
#: their defaults; a checkpoint's datamodule and the command line may name other columns.
COLUMN_OPTIONS = {
    "path_column": "path",
    "label_column": "label",
    "patient_column": "patient_id",
    "split_column": "split",
}


def listing_items(
    path: Path,
    decoding: Decoding,
    task: str,
    names: list[str],
    force: bool,
    columns: dict[str, str] | None = None,
) -> list[Item]:
    """The rows of a CSV/TSV listing as :class:`Item` entries, in file order.

    Paths are relative to the listing. Labels are read when the listing has them for this
    checkpoint: a label column (class names or indices of the checkpoint's classes) or, for a
    multi-label checkpoint, one 0/1 column per class name. The patient column (written as
    ``patient_id``), ``split`` and every other column are kept for the output.

    Args:
        columns: column names by :data:`COLUMN_OPTIONS` key; the path column must exist, the
            others are used when present.

    Raises:
        ValueError: the listing lacks its path column or has bad rows (e.g. labels the
            checkpoint does not have; with ``force`` those rows are predicted without labels).
    """
    named = {**COLUMN_OPTIONS, **(columns or {})}
    # Read once without labels to see the columns, keeping only the named ones the file has.
    first = read_csv(path, path_column=named["path_column"], label_column="", label_columns=[])
    present = {*first.extra, named["path_column"]}
    present |= {"patient_id"} if first.patient_ids is not None else set()
    present |= {"split"} if first.splits is not None else set()
    options = {
        key: named[key] if named[key] in present else COLUMN_OPTIONS[key]
        for key in ("path_column", "patient_column", "split_column")
    }
    plain = read_csv(path, label_column="", label_columns=[], **options)
    table: Table = plain
    if task == "multilabel" and names and all(n in present for n in names):
        table = read_csv(path, label_columns=names, **options)
    elif task != "multilabel" and named["label_column"] in present:
        table = read_csv(path, label_column=named["label_column"], class_names=names, **options)
    labelled = table is not plain
    if labelled and table.problems and all(p.kind == "unknown labels" for p in table.problems):
        if force:
            table, labelled = plain, False
        else:
            raise ValueError(
                f"{DataSourceError(path, table.problems)} The checkpoint's classes are "
                f"{names}; give --force to predict these rows without labels."
            )
    if table.problems:
        raise DataSourceError(path, table.problems)
    kept: dict[str, np.ndarray] = {}
    if table.patient_ids is not None:
        kept["patient_id"] = table.patient_ids
    if table.splits is not None:
        kept["split"] = table.splits
    kept.update({output_name(k): v for k, v in table.extra.items()})
    return [
        Item(
            source,
            decoding.loader(file),
            table.labels[k] if labelled else None,
            {c: str(v[k]) for c, v in kept.items()},
        )
        for k, (file, source) in enumerate(zip(table.paths, table.rel_paths(), strict=True))
    ]


def collect(
    inputs: list[str],
    decoding: Decoding,
    task: str,
    names: list[str],
    force: bool,
    columns: dict[str, str] | None = None,
) -> list[Item]:
    """Expand the command line's inputs into the images to predict, in order.

    ``columns`` names a listing's columns (see :func:`listing_items`).
    """
    items: list[Item] = []
    volumes = decoding.spatial_dims == 3
    for spec in inputs:
        path_str, _, split = (
            spec.partition(":") if spec.endswith((":train", ":val", ":test")) else (spec, "", "")
        )
        path = Path(path_str)
        if path.suffix == ".npz":
            split = split or "test"
            if not path.is_file():
                raise ValueError(f"{path} does not exist.")
            images, split_labels = read_npz_split(path, split, decoding.spatial_dims)
            for j in range(len(images)):
                label = None if split_labels is None else split_labels[j].tolist()
                if volumes:
                    load = partial(_npz_volume, images, j, decoding.size)
                else:
                    load = partial(_npz_image, images, j)
                items.append(Item(f"{path.name}:{split}", load, label))
        elif volumes and is_series_folder(path):
            items.append(Item(str(path), decoding.loader(path)))
        elif path.is_dir():
            files = volume_items(path) if volumes else image_files(path)
            labels = folder_labels(path, files, task, names, series=volumes)
            items += [Item(str(f), decoding.loader(f), labels.get(f)) for f in files]
        elif not path.is_file():
            raise ValueError(f"{path} does not exist.")
        elif path.name.lower().endswith(LISTING_SUFFIXES):
            items += listing_items(path, decoding, task, names, force, columns)
        elif is_image_file(path):
            _check_dims(path, decoding.spatial_dims)
            items.append(Item(str(path), decoding.loader(path)))
        else:
            raise ValueError(
                f"{path}: expected an image ({', '.join(sorted(IMAGE_SUFFIXES))}), a DICOM or "
                f"NIfTI file, a folder, a CSV/TSV listing ({', '.join(LISTING_SUFFIXES)}) or an "
                ".npz[:split]."
            )
    if not items:
        what = "volumes (3D NIfTI files or DICOM series folders)" if volumes else "images"
        raise ValueError(f"No {what} found in {inputs}.")
    return items


def _check_dims(path: Path, spatial_dims: int) -> None:
    """Refuse, in one line, a file given by name whose dimensions are not the checkpoint's."""
    dims = item_dims(path)
    if dims is not None and dims != spatial_dims:
        kind = "a 3D volume" if dims == 3 else "a 2D image"
        model = (
            "a 3D model (it takes 3D NIfTI files, DICOM series folders and 3D .npz splits)"
            if spatial_dims == 3
            else "a 2D model"
        )
        raise ValueError(f"{path} is {kind}, but the checkpoint is {model}.")


def label_columns(label: Any, task: str, names: list[str]) -> tuple[Any, str]:
    """``label`` and ``label_name`` CSV values of an npz label row (blank when unknown).

    Single-label tasks: the class index as an integer and its name. Multi-label: the indices of
    the present labels and their names, each joined by ``;`` (as ``prediction`` is).
    """
    if label is None:
        return "", ""
    values = np.asarray(label).reshape(-1)
    if task == "multilabel":
        present = [int(k) for k in np.flatnonzero(values)]
        return ";".join(map(str, present)), ";".join(
            names[k] if k < len(names) else "" for k in present
        )
    index = int(values[0])
    return index, names[index] if 0 <= index < len(names) else ""


def check_inputs_fit_checkpoint(
    ckpt_path: str | Path, data_hp: dict[str, Any], hp: Any, inputs: list[str], labels: list
) -> None:
    """Refuse npz inputs that are another dataset than the checkpoint's, in one line.

    Predict converts every image to the checkpoint's channels and size, so only what it cannot
    adapt is checked: an npz named after another MedMNIST set (``pneumoniamnist.npz`` for a
    BreastMNIST checkpoint), and labels that do not fit the checkpoint's classes.

    Raises:
        ValueError: on a mismatch (``--force`` skips this check).
    """
    flag = data_hp.get("flag")
    trained = describe_training_data(
        flag or "other data", hp.task, hp.class_names, hp.num_classes, hp.in_chans, hp.img_size
    )
    for spec in inputs:
        stem = Path(spec.split(":")[0]).stem
        name = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1].isdigit() else stem
        if spec.split(":")[0].endswith(".npz") and name in INFO and flag and name != flag:
            raise ValueError(
                f"checkpoint {ckpt_path} was trained on {trained} but {spec} is {name} data "
                f"({len(INFO[name]['label'])} classes: {', '.join(INFO[name]['label'].values())}). "
                "Give --force to predict anyway."
            )
    known = [np.asarray(x).reshape(-1) for x in labels if x is not None]
    if not known:
        return
    if hp.task == "multilabel":
        bad = next((x for x in known if len(x) != hp.num_classes), None)
        problem = bad is not None and f"labels with {len(bad)} columns"
    else:
        top = max(int(x.max()) for x in known if len(x))
        wide = max(len(x) for x in known)
        problem = (wide != 1 and f"labels with {wide} columns") or (
            top >= hp.num_classes and f"label {top}"
        )
    if problem:
        raise ValueError(
            f"checkpoint {ckpt_path} was trained on {trained} but the inputs have {problem}. "
            "Give --force to predict anyway."
        )


def prediction_row(
    item: Item,
    index: int,
    probs: Any,
    error: str,
    names: list[str],
    task: str,
    listed: list[str],
) -> dict[str, Any]:
    """One CSV row of ``medvit predict`` (see :func:`medvit.evaluate.predict.predict`).

    Shared by the checkpoint and the ONNX predictor, so both write the same columns.

    Args:
        item: the input.
        index: its position among the inputs.
        probs: its class probabilities (ignored when ``error``).
        error: why it could not be read, or ``""``.
        names: the class names.
        task: the model's task.
        listed: the listings' columns, in order (blank for other inputs).
    """
    row: dict[str, Any] = {"source": item.source}
    row.update({c: item.columns.get(c, "") for c in listed})
    row["index"] = index
    if error:
        row.update({f"prob_{n}": "" for n in names})
        row["prediction"] = ""
        print(f"medvit predict: skipped {item.source}: {error}", file=sys.stderr)
    else:
        row.update({f"prob_{n}": round(float(v), 6) for n, v in zip(names, probs, strict=True)})
        if task == "multilabel":
            # A label counts as present above 0.5, as the metrics count it.
            row["prediction"] = ";".join(n for n, v in zip(names, probs, strict=True) if v > 0.5)
        else:
            row["prediction"] = names[int(np.argmax(probs))]
    row["label"], row["label_name"] = label_columns(item.label, task, names)
    row["error"] = error
    return row


def write_rows(rows: list[dict[str, Any]], output: str | Path | None) -> None:
    """Write predict's rows as CSV to ``output`` (atomically), or to standard output."""
    fields = list(rows[0])
    if output is None:
        writer = csv.DictWriter(sys.stdout, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(output, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print(f"Wrote {len(rows)} predictions to {output}", file=sys.stderr)
    failed = sum(1 for r in rows if r["error"])
    if failed:
        print(f"medvit predict: {failed} of {len(rows)} files could not be read", file=sys.stderr)


def window_arg(text: str) -> tuple[float, float]:
    """``--window center,width`` as two floats."""
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CENTER,WIDTH (e.g. 40,400), got {text!r}"
        ) from None
    return center, width
