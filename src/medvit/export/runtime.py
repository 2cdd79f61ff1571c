"""``medvit predict`` on an ``.onnx`` model: onnxruntime, the model's own metadata, no Lightning.

The inputs, their decoding and the CSV are :mod:`medvit.evaluate.predict_inputs`'s, shared with
the checkpoint predictor, so a model predicts the same columns (and, within the export's parity
tolerance, the same numbers) as its checkpoint. Images are brought to the model's size, channels
and normalisation by the evaluation transform (:func:`medvit.data.transforms.build_transforms`,
``train=False``) with the mean and std the model carries.

:func:`predict_main` is ``medvit predict``'s entry point: it hands a checkpoint to
:func:`medvit.evaluate.predict.main` and runs an ``.onnx`` model here, so that predicting with
an ONNX model never imports Lightning (nor the LightningModule).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from medvit.evaluate.predict_inputs import (
    COLUMN_OPTIONS,
    check_inputs_fit_checkpoint,
    collect,
    decoding_for,
    prediction_row,
    window_arg,
    write_rows,
)
from medvit.export.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    ModelFileError,
    ModelInfo,
    probabilities,
)


class OnnxClassifier:
    """An exported model: an onnxruntime session and its :class:`ModelInfo`.

    Args:
        path: a ``.onnx`` file written by ``medvit export``.
        threads: onnxruntime intra-op threads (0: its default).
        device: ``auto``/``cpu``, or ``cuda`` (onnxruntime's CUDA provider, when installed).

    Raises:
        ModelFileError: the file is missing, not ONNX, or carries no medvit metadata.
    """

    def __init__(self, path: str | Path, threads: int = 0, device: str = "auto") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model {self.path} does not exist.")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise ModelFileError(
                "--device cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)."
            )
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a bad file
            raise ModelFileError(
                f"cannot load {self.path} as an ONNX model ({' '.join(str(err).split())[:300]})."
            ) from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelFileError(
                f"{self.path} carries no medvit metadata (its classes, input size and "
                "normalisation); export the checkpoint with medvit export."
            )
        self.info = ModelInfo.from_json(meta[METADATA_KEY], self.path)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(B, num_classes)`` logits of normalised ``(B, C, H, W)`` float32 images."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, with the model's temperature (as the checkpoint's predict)."""
        return probabilities(self.logits(x), self.info)


def _checkpoint_like(info: ModelInfo) -> SimpleNamespace:
    """What predict's input helpers read from a checkpoint's ``hparams``."""
    return SimpleNamespace(
        task=info.task,
        class_names=info.class_names,
        num_classes=info.num_classes,
        in_chans=info.in_chans,
        img_size=info.img_size,
    )


def predict_onnx(
    model_path: str | Path,
    inputs: list[str],
    output: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    force: bool = False,
    window: tuple[float, float] | None = None,
    columns: dict[str, str | None] | None = None,
    threads: int = 0,
) -> list[dict[str, Any]]:
    """:func:`medvit.evaluate.predict.predict` for an exported ``.onnx`` model.

    The arguments and the rows returned (and written as CSV) are that function's; ``threads``
    sets onnxruntime's intra-op threads.

    Raises:
        ValueError: as the checkpoint predictor; :class:`ModelFileError` for a bad model file.
    """
    from medvit.evaluate.input_dataset import input_dataset

    model = OnnxClassifier(model_path, threads, device)
    info = model.info
    if info.spatial_dims != 2:
        raise ModelFileError(
            f"{model_path} is a {info.spatial_dims}D model; medvit predict runs 2D ONNX models "
            "only. Predict volumes with its checkpoint."
        )
    hp, data_hp = _checkpoint_like(info), dict(info.data)
    decoding = decoding_for(hp, data_hp, window)
    names = list(info.class_names)
    named = {k: data_hp[k] for k in COLUMN_OPTIONS if isinstance(data_hp.get(k), str)}
    named.update({k: v for k, v in (columns or {}).items() if v is not None})
    items = collect(inputs, decoding, info.task, names, force, named)
    if not force:
        check_inputs_fit_checkpoint(model_path, data_hp, hp, inputs, [i.label for i in items])
    dataset = input_dataset(items, decoding, info.img_size, info.in_chans, info.mean, info.std)
    listed = list(dict.fromkeys(c for item in items for c in item.columns))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        batch, errors = [], []
        for i in range(start, min(start + batch_size, len(items))):
            x, error, _ = dataset[i]
            batch.append(x.numpy())
            errors.append(error)
        probs = model.probabilities(np.stack(batch))
        for k, (p, error) in enumerate(zip(probs, errors, strict=True)):
            i = start + k
            rows.append(prediction_row(items[i], i, p, error, names, info.task, listed))
    write_rows(rows, output)
    return rows


def _onnx_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvit predict",
        description="Class probabilities as CSV with an ONNX model written by medvit export "
        "(onnxruntime; the model carries its classes, input size and normalisation).",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .onnx model from medvit export")
    parser.add_argument("inputs", nargs="+", help="as for a checkpoint (medvit predict --help)")
    parser.add_argument("-o", "--output", default=None, help="CSV file (default: stdout)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    parser.add_argument("--window", type=window_arg, default=None, metavar="CENTER,WIDTH")
    for option in COLUMN_OPTIONS:
        parser.add_argument(f"--{option}", default=None, metavar="NAME")
    parser.add_argument("--force", action="store_true")
    return parser


def _onnx_requested(argv: list[str]) -> bool:
    """Whether ``--ckpt_path`` names an ``.onnx`` file."""
    for i, word in enumerate(argv):
        name, eq, value = word.partition("=")
        if name == "--ckpt_path":
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            return value.lower().endswith(".onnx")
    return False


def predict_main(argv: list[str] | None = None) -> None:
    """``medvit predict``: an ``.onnx`` model runs here, a checkpoint in
    :func:`medvit.evaluate.predict.main`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not _onnx_requested(argv) or "-h" in argv or "--help" in argv:
        from medvit.evaluate.predict import main

        main(argv)
        return
    args = _onnx_parser().parse_args(argv)
    try:
        predict_onnx(
            args.ckpt_path,
            args.inputs,
            args.output,
            args.batch_size,
            args.device,
            args.force,
            args.window,
            {option: getattr(args, option) for option in COLUMN_OPTIONS},
            args.threads,
        )
    except ValueError as err:
        from medvit.cli import exit_with_user_error, show_tracebacks

        if show_tracebacks():
            raise
        exit_with_user_error(err)
