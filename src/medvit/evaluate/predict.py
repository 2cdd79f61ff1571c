"""``medvit predict``: class probabilities for image files, folders, CSV listings or an npz split.

Inputs: image files (PNG, JPEG, BMP, TIFF incl. 16-bit grey and float), DICOM files (by suffix or
the ``DICM`` magic), 2D NIfTI, folders of any of these (searched recursively; labelled when laid
out as one subfolder per checkpoint class), a CSV/TSV listing paths (read with
:func:`medvit.data.sources.read_csv`: its path column, with optional ``patient_id``, ``split``
and label columns), and ``file.npz[:split]``.

Files are decoded by :func:`medvit.data.readers.load_image` as the training data was: pixels on
MedMNIST's 8-bit scale (:func:`~medvit.data.readers.to_uint8`'s rules for 16-bit and float
images; DICOM rescaled, windowed and MONOCHROME1-inverted), converted to the training data's
channels and resized to its decode size (``data.size``); the evaluation transform then brings
them to the model's image size and channels. A file that cannot be read gets a row whose
``error`` column says why, and the other files are still predicted.

A 3D checkpoint takes volumes instead (:mod:`medvit.evaluate.predict_inputs`): 3D NIfTI files,
DICOM series folders, folders of them and 3D npz splits, decoded by
:func:`medvit.data.volumes.load_volume` with the training data's cube size, spacing and window.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medvit.data.readers import to_uint8
from medvit.evaluate.input_dataset import input_dataset
from medvit.evaluate.predict_inputs import (
    COLUMN_OPTIONS,
    LISTING_SUFFIXES,
    check_inputs_fit_checkpoint,
    collect,
    decoding_for,
    prediction_row,
    window_arg,
    write_rows,
)
from medvit.models.checkpoint import CheckpointError, load_checkpoint
from medvit.models.module import ViTClassifier

# to_uint8 (moved to medvit.data.readers) stays importable from here.
__all__ = ["LISTING_SUFFIXES", "load_model", "main", "predict", "to_uint8"]


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
    force: bool = False,
    window: tuple[float, float] | None = None,
    columns: dict[str, str | None] | None = None,
    num_workers: int = 0,
    explain: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Predict class probabilities with a medvit checkpoint and write them as CSV.

    Files are decoded as the training data was (see :func:`decoding_for`): pixels on MedMNIST's
    0..255 scale (:func:`to_uint8`: 16-bit images by their type's full range, float images by
    their minimum..maximum; DICOM by its rescale and window), the training data's channels and
    decode size; then the model's image size and channels.

    Args:
        ckpt_path: a ``.ckpt`` written by ``medvit fit``.
        inputs: image, DICOM or NIfTI files, folders of them (recursively), CSV/TSV listings of
            paths (relative to the listing), or ``file.npz[:split]`` (default split ``test``).
        output: CSV path; ``None`` writes to standard output.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        force: predict even when an npz input is another dataset than the checkpoint's (see
            :func:`check_inputs_fit_checkpoint`), or a listing has labels the checkpoint lacks.
        window: DICOM/NIfTI ``(center, width)`` used instead of the file's own window (and of
            the one the checkpoint was trained with).
        columns: a listing's column names by ``path_column``, ``label_column``,
            ``patient_column``, ``split_column`` (as :func:`medvit.data.sources.read_csv`); a name
            not given is the one the checkpoint's datamodule used, else ``path``, ``label``,
            ``patient_id``, ``split``. Only the path column must exist.
        num_workers: DataLoader processes decoding files (0: in this process).
        explain: a folder for one overlay per input (:mod:`medvit.explain`, its default
            method, for the predicted class), ``maps.npz`` and ``explained.csv``.

    Returns:
        One dict per image: ``source`` (the path as given; relative to the listing for a
        CSV/TSV row), then the listing's ``patient_id``, ``split`` and other columns when a
        listing is among the inputs (a column named like one of predict's own is renamed
        ``input_<name>``; blank for other inputs), ``index``, ``prob_<class>``...,
        ``prediction``, ``label`` (an integer class index; ``;``-joined indices for multi-label;
        blank when unknown), ``label_name`` and ``error`` (why the file could not be read; its
        probabilities and prediction are then blank).

    Raises:
        ValueError: a missing input or checkpoint, no images, a bad listing, a bad window, or
            inputs of another dataset.
    """
    ckpt_path = Path(ckpt_path)
    model, data_hp = load_model(ckpt_path)
    hp = model.hparams
    explainer = None
    if explain is not None:  # a network without attention is refused before any work
        from medvit.explain.explainer import Explainer

        explainer = Explainer(model)
    decoding = decoding_for(hp, data_hp, window)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device)
    names = list(hp.class_names or [str(i) for i in range(hp.num_classes)])
    named = {k: data_hp[k] for k in COLUMN_OPTIONS if isinstance(data_hp.get(k), str)}
    named.update({k: v for k, v in (columns or {}).items() if v is not None})
    items = collect(inputs, decoding, hp.task, names, force, named)
    labels = [item.label for item in items]
    if not force:
        check_inputs_fit_checkpoint(ckpt_path, data_hp, hp, inputs, labels)
    dataset = input_dataset(
        items, decoding, hp.img_size, hp.in_chans, data_hp.get("mean"), data_hp.get("std")
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    # The listings' columns, in order of first appearance (blank for rows from other inputs).
    listed = list(dict.fromkeys(c for item in items for c in item.columns))
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for x, errors, index in tqdm(loader, desc="predict", disable=len(loader) < 5):
            probs = model.probabilities(model(x.to(device))).float().cpu().numpy()
            for i, p, error in zip(index.tolist(), probs, errors, strict=True):
                rows.append(prediction_row(items[i], i, p, error, names, hp.task, listed))
    write_rows(rows, output)
    if explainer is not None:
        from medvit.explain.run import explain_dataset

        sources, shown = [item.source for item in items], (data_hp.get("mean"), data_hp.get("std"))
        explain_dataset(
            explainer, loader.dataset, sources, labels, names, explain, "predicted",
            model.probabilities, shown, batch_size, device, hp.task,
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    """``medvit predict --ckpt_path CKPT [-o out.csv] [--window C,W] INPUT...``."""
    parser = argparse.ArgumentParser(
        prog="medvit predict",
        description=(
            "Class probabilities as CSV for images (PNG, JPEG, BMP, TIFF), DICOM and 2D NIfTI "
            "files, folders of them, CSV/TSV listings of paths, or an npz split; for a 3D "
            "checkpoint volumes: 3D NIfTI files, DICOM series folders, or a 3D npz split."
        ),
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="checkpoint written by medvit fit, or a .onnx model written by medvit export "
        "(run with onnxruntime)",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image/DICOM/NIfTI files, folders, CSV/TSV listings (column 'path', optional "
        "'patient_id' and 'label'), or file.npz[:split]",
    )
    parser.add_argument("-o", "--output", default=None, help="CSV file (default: stdout)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--num_workers", type=int, default=0, help="processes decoding files (default: 0, none)"
    )
    parser.add_argument(
        "--window",
        type=window_arg,
        default=None,
        metavar="CENTER,WIDTH",
        help="DICOM/NIfTI window in the file's units (e.g. 40,400 for CT soft tissue), instead "
        "of the file's own (and the checkpoint's)",
    )
    for option, default in COLUMN_OPTIONS.items():
        parser.add_argument(
            f"--{option}",
            default=None,
            metavar="NAME",
            help=f"a CSV/TSV listing's {option.split('_')[0]} column (default: the checkpoint's, "
            f"else '{default}')",
        )
    parser.add_argument(
        "--explain",
        default=None,
        metavar="DIR",
        help="also write one overlay per input (where the model looked) into DIR "
        "(medvit explain's default method; medvit explain has the options)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="predict even when an npz input is another dataset than the checkpoint's, or a "
        "listing has labels the checkpoint does not know (they are then left out)",
    )
    args = parser.parse_args(argv)
    try:
        predict(
            args.ckpt_path,
            args.inputs,
            args.output,
            args.batch_size,
            args.device,
            args.force,
            args.window,
            {option: getattr(args, option) for option in COLUMN_OPTIONS},
            args.num_workers,
            args.explain,
        )
    except ValueError as err:  # CheckpointError included: a user problem, not a bug
        from medvit.cli import exit_with_user_error, show_tracebacks

        if show_tracebacks():
            raise
        exit_with_user_error(err)
