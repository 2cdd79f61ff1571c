"""``medvit predict``: class probabilities for image files or an npz split, as CSV.

Images are brought to what the model saw in training, MedMNIST's 8-bit pixels (0..255), by
:func:`to_uint8`: 8-bit images are used as they are; 16-bit images map their type's full range
(0..65535) linearly to 0..255, so a dark 16-bit image stays dark; float images map their own
minimum..maximum to 0..255. Images are then converted to the checkpoint's channels and resized
to its image size, as in training. A file that cannot be read gets a row whose ``error`` column
says why, and the other files are still predicted.
"""

from __future__ import annotations

import argparse
import csv
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medmnist import INFO
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medvit.data.transforms import build_transforms
from medvit.fileio import atomic_write
from medvit.models.checkpoint import CheckpointError, load_checkpoint
from medvit.models.module import ViTClassifier

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


#: What a single image file can fail with while it is decoded (reported in its CSV row).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image array on MedMNIST's training scale: ``uint8``, 0..255.

    Rules: ``uint8`` is returned unchanged; ``bool`` becomes 0/255; other integer images are
    taken as 16-bit, their full range 0..65535 mapped linearly to 0..255 (``v * 255 / 65535``,
    rounded), unless a value lies outside 0..65535, when their minimum..maximum is mapped
    instead; float images map their own minimum..maximum to 0..255 (a constant image gives 0).

    Raises:
        ValueError: for another dtype (complex, object) or non-finite floats.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.integer):
        if image.size and (image.min() < 0 or image.max() > 65535):
            return _min_max(image.astype(np.float64))
        return np.rint(image.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("the image has NaN or infinite pixels")
        return _min_max(image.astype(np.float64))
    raise ValueError(f"unsupported pixel type {image.dtype}")


def _min_max(image: np.ndarray) -> np.ndarray:
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    return np.rint((image - low) * (255 / (high - low))).astype(np.uint8)


def read_image(path: str | Path, rgb: bool) -> np.ndarray:
    """An image file as ``uint8`` pixels (H, W) or, with ``rgb``, (H, W, 3); see :func:`to_uint8`.

    PIL converts a 16-bit or float image to 8 bits by clipping (a 16-bit image becomes almost
    all 255), so such images are scaled here first.
    """
    with Image.open(path) as image:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = Image.fromarray(to_uint8(np.asarray(image)))
        return np.asarray(image.convert("RGB" if rgb else "L"))


class _Inputs(Dataset):
    """Items ``(image, error, i)`` from (source, loader) pairs, decoded lazily.

    A file that cannot be decoded gives a blank image and the reason in ``error`` (empty when
    the image was read), so one broken file does not end the run.
    """

    def __init__(self, items: list[tuple[str, Any]], transform: Any, blank: np.ndarray) -> None:
        self.items, self.transform, self.blank = items, transform, blank

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        _, load = self.items[i]
        try:
            image = load()
        except READ_ERRORS as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            return self.transform(self.blank), f"cannot read image: {reason}", i
        return self.transform(image), "", i


def _read_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``{split}_images`` (and ``{split}_labels`` if present) of an npz, never unpickling."""
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
    if images.dtype == object or images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: '{split}_images' has shape {images.shape} and dtype {images.dtype}; "
            "expected (N, H, W) or (N, H, W, 3) images."
        )
    return images, labels


def _collect(inputs: list[str], rgb: bool) -> tuple[list[tuple[str, Any]], list[Any]]:
    """Expand inputs into (source name, image loader) pairs and labels (None if unknown)."""
    items: list[tuple[str, Any]] = []
    labels: list[Any] = []
    for spec in inputs:
        path_str, _, split = (
            spec.partition(":") if spec.endswith((":train", ":val", ":test")) else (spec, "", "")
        )
        path = Path(path_str)
        if path.suffix == ".npz":
            split = split or "test"
            if not path.is_file():
                raise ValueError(f"{path} does not exist.")
            images, split_labels = _read_npz_split(path, split)
            for j in range(len(images)):
                items.append((f"{path.name}:{split}", lambda a=images, j=j: to_uint8(a[j])))
                labels.append(None if split_labels is None else split_labels[j].tolist())
            continue
        files = (
            sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        for file in files:
            if not file.is_file():
                raise ValueError(f"{file} does not exist.")
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(
                    f"{file}: expected an image ({sorted(IMAGE_SUFFIXES)}) or an .npz[:split]."
                )
            items.append((str(file), lambda f=file: read_image(f, rgb)))
            labels.append(None)
    if not items:
        raise ValueError(f"No images found in {inputs}.")
    return items, labels


def load_model(ckpt_path: str | Path) -> tuple[ViTClassifier, dict[str, Any]]:
    """The model of a medvit checkpoint and its datamodule hyper-parameters, read safely.

    The checkpoint is read once with ``torch.load(weights_only=True)`` (it cannot run code) and
    the model is rebuilt from its plain hyper-parameters, without pretrained weights.

    Raises:
        CheckpointError: the file is missing, unreadable, refused, or not written by medvit.
    """
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    data_hp = ckpt.get("datamodule_hyper_parameters") if isinstance(ckpt, dict) else None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not data_hp or not hparams or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{ckpt_path} has no model and datamodule hyper-parameters; was it written by "
            "medvit fit?"
        )
    # "_instantiator" and the like are LightningCLI bookkeeping, not constructor arguments.
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    kwargs["pretrained"] = False  # the weights come from the checkpoint
    try:
        model = ViTClassifier(**kwargs)
        model.on_load_checkpoint(ckpt)  # fills what older checkpoints lack, as Lightning does
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{ckpt_path}: cannot rebuild the model from it ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]})."
        ) from err
    return model, data_hp


def _label_columns(label: Any, task: str, names: list[str]) -> tuple[Any, str]:
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
    from medvit.train.cli import describe_training_data

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


def predict(
    ckpt_path: str | Path,
    inputs: list[str],
    output: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    force: bool = False,
) -> list[dict[str, Any]]:
    """Predict class probabilities with a medvit checkpoint and write them as CSV.

    Pixels are scaled to the 0..255 of MedMNIST's training images first (see
    :func:`to_uint8`: 16-bit images by their type's full range, float images by their
    minimum..maximum), then converted to the checkpoint's channels and size.

    Args:
        ckpt_path: a ``.ckpt`` written by ``medvit fit``.
        inputs: image files, folders of images, or ``file.npz[:split]`` (default split ``test``).
        output: CSV path; ``None`` writes to standard output.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        force: predict even when an npz input is another dataset than the checkpoint's (see
            :func:`check_inputs_fit_checkpoint`).

    Returns:
        One dict per image: ``source``, ``index``, ``prob_<class>``..., ``prediction``,
        ``label`` (an integer class index; ``;``-joined indices for multi-label; blank when
        unknown), ``label_name`` and ``error`` (why the file could not be read; its
        probabilities and prediction are then blank).

    Raises:
        ValueError: a missing input or checkpoint, no images, or inputs of another dataset.
    """
    ckpt_path = Path(ckpt_path)
    model, data_hp = load_model(ckpt_path)
    hp = model.hparams
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device)
    transform = build_transforms(
        "none",
        hp.img_size,
        train=False,
        in_chans=hp.in_chans,
        mean=data_hp.get("mean") or [0.5],
        std=data_hp.get("std") or [0.5],
    )
    rgb = INFO[data_hp["flag"]]["n_channels"] == 3
    items, labels = _collect(inputs, rgb)
    if not force:
        check_inputs_fit_checkpoint(ckpt_path, data_hp, hp, inputs, labels)
    blank = np.zeros((hp.img_size, hp.img_size, 3) if rgb else (hp.img_size, hp.img_size), np.uint8)
    loader = DataLoader(_Inputs(items, transform, blank), batch_size=batch_size)
    names = list(hp.class_names or [str(i) for i in range(hp.num_classes)])
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for x, errors, index in tqdm(loader, desc="predict", disable=len(loader) < 5):
            probs = model.probabilities(model(x.to(device))).float().cpu().numpy()
            for i, p, error in zip(index.tolist(), probs, errors, strict=True):
                source = items[i][0]
                row: dict[str, Any] = {"source": source, "index": i}
                if error:
                    row.update({f"prob_{n}": "" for n in names})
                    row["prediction"] = ""
                    print(f"medvit predict: skipped {source}: {error}", file=sys.stderr)
                else:
                    probs_row = zip(names, p, strict=True)
                    row.update({f"prob_{n}": round(float(v), 6) for n, v in probs_row})
                    if hp.task == "multilabel":
                        row["prediction"] = ";".join(
                            n for n, v in zip(names, p, strict=True) if v >= 0.5
                        )
                    else:
                        row["prediction"] = names[int(p.argmax())]
                row["label"], row["label_name"] = _label_columns(labels[i], hp.task, names)
                row["error"] = error
                rows.append(row)
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
    return rows


def main(argv: list[str] | None = None) -> None:
    """``medvit predict --ckpt_path CKPT [-o out.csv] INPUT...``."""
    parser = argparse.ArgumentParser(
        prog="medvit predict",
        description="Class probabilities for images (files or folders) or an npz split, as CSV.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by medvit fit")
    parser.add_argument("inputs", nargs="+", help="image files, folders, or file.npz[:split]")
    parser.add_argument("-o", "--output", default=None, help="CSV file (default: stdout)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--force",
        action="store_true",
        help="predict even when an npz input is another dataset than the checkpoint's",
    )
    args = parser.parse_args(argv)
    try:
        predict(args.ckpt_path, args.inputs, args.output, args.batch_size, args.device, args.force)
    except ValueError as err:  # CheckpointError included: a user problem, not a bug
        from medvit.cli import exit_with_user_error, show_tracebacks

        if show_tracebacks():
            raise
        exit_with_user_error(err)
