"""``medvit predict``: class probabilities for image files or an npz split, as CSV."""

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


class _Inputs(Dataset):
    """Items ``(image, 0, i)`` from a list of (source, loader) pairs, decoded lazily."""

    def __init__(self, items: list[tuple[str, Any]], transform: Any) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        _, load = self.items[i]
        return self.transform(load()), 0, i


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
                items.append((f"{path.name}:{split}", lambda a=images, j=j: a[j]))
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
            mode = "RGB" if rgb else "L"
            items.append((str(file), lambda f=file, m=mode: np.asarray(Image.open(f).convert(m))))
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


def predict(
    ckpt_path: str | Path,
    inputs: list[str],
    output: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Predict class probabilities with a medvit checkpoint and write them as CSV.

    Args:
        ckpt_path: a ``.ckpt`` written by ``medvit fit``.
        inputs: image files, folders of images, or ``file.npz[:split]`` (default split ``test``).
        output: CSV path; ``None`` writes to standard output.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        One dict per image: ``source``, ``index``, ``prob_<class>``..., ``prediction``, ``label``.
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
    loader = DataLoader(_Inputs(items, transform), batch_size=batch_size)
    names = list(hp.class_names or [str(i) for i in range(hp.num_classes)])
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for x, _, index in tqdm(loader, desc="predict", disable=len(loader) < 5):
            probs = model.probabilities(model(x.to(device))).float().cpu().numpy()
            for i, p in zip(index.tolist(), probs, strict=True):
                source = items[i][0]
                row: dict[str, Any] = {"source": source, "index": i}
                row.update({f"prob_{n}": round(float(v), 6) for n, v in zip(names, p, strict=True)})
                if hp.task == "multilabel":
                    row["prediction"] = ";".join(
                        n for n, v in zip(names, p, strict=True) if v >= 0.5
                    )
                else:
                    row["prediction"] = names[int(p.argmax())]
                row["label"] = "" if labels[i] is None else labels[i]
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
    args = parser.parse_args(argv)
    try:
        predict(args.ckpt_path, args.inputs, args.output, args.batch_size, args.device)
    except ValueError as err:  # CheckpointError included: a user problem, not a bug
        print(f"medvit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
