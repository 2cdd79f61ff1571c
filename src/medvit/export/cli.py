"""``medvit export --ckpt_path CKPT --format onnx [--int8 [static|dynamic]] -o model.onnx``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from medvit.export.metadata import (
        DEFAULT_CALIBRATION_SAMPLES,
        DEFAULT_MAX_AUC_DROP,
        INT8_MODES,
    )

    parser = argparse.ArgumentParser(
        prog="medvit export",
        description=(
            "Export a checkpoint as an ONNX model (fp32, dynamic batch) that carries its classes, "
            "task, input size and normalisation, checked with onnx.checker and against PyTorch's "
            "logits; optionally int8-quantized with onnxruntime, gated on the test split's AUC. "
            "Run it with: medvit predict --ckpt_path model.onnx INPUT..."
        ),
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by medvit fit")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="(only onnx)")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--int8",
        nargs="?",
        const="static",
        default=None,
        choices=INT8_MODES,
        help="int8 post-training quantization: static (the default of a bare --int8; "
        "per-channel weights, activations calibrated on the validation split) or dynamic "
        "(activation ranges per batch at run time)",
    )
    parser.add_argument(
        "--max_auc_drop",
        type=float,
        default=DEFAULT_MAX_AUC_DROP,
        help=f"int8: refuse to write when the test AUC drops by more (default {DEFAULT_MAX_AUC_DROP})",
    )
    parser.add_argument(
        "--calibration_samples",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLES,
        help=f"static int8: validation images to calibrate on (default {DEFAULT_CALIBRATION_SAMPLES})",
    )
    parser.add_argument(
        "--data_root",
        default=None,
        metavar="DIR",
        help="int8: folder of the checkpoint's MedMNIST files, when not where its fit read them",
    )
    parser.add_argument(
        "--force", action="store_true", help="int8: write the model even above --max_auc_drop"
    )
    return parser


def export(
    ckpt_path: str | Path,
    output: str | Path,
    int8: str | None = None,
    max_auc_drop: float | None = None,
    force: bool = False,
    calibration_samples: int | None = None,
    data_root: str | None = None,
) -> Path:
    """Export ``ckpt_path`` to ``output`` (see :func:`build_parser` for the options).

    Nothing is written unless every check passed (parity, onnx.checker, the int8 AUC gate).

    Returns:
        The written file.
    """
    from medvit.export.metadata import DEFAULT_CALIBRATION_SAMPLES, DEFAULT_MAX_AUC_DROP
    from medvit.export.onnx_export import check_model, export_checkpoint, write_model
    from medvit.export.quantize import datamodule_for, quantize_checked

    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"-o {output}: an ONNX model's file name ends in .onnx.")
    if max_auc_drop is not None and max_auc_drop < 0:
        raise ValueError(f"--max_auc_drop must be >= 0, got {max_auc_drop}.")
    dm = None
    if int8:
        from medvit.evaluate.predict import load_model

        # Before the (slow) export: data that cannot be found fails first.
        _, data_hp = load_model(ckpt_path)
        if data_root is not None:
            data_hp = {**data_hp, "root": data_root}
        dm = datamodule_for(ckpt_path, data_hp)
        dm.prepare_data()
    proto, info, _ = export_checkpoint(ckpt_path)
    parity = info.checks["parity"]["max_abs_logit_diff"]
    print(f"parity with PyTorch: max |logit difference| {parity:.2e} at batch 1 and 8")
    if int8:
        proto, info = quantize_checked(
            proto,
            info,
            int8,
            dm,
            DEFAULT_MAX_AUC_DROP if max_auc_drop is None else max_auc_drop,
            force,
            calibration_samples or DEFAULT_CALIBRATION_SAMPLES,
        )
        check_model(proto)
    size = write_model(proto, output)
    print(f"Wrote {output} ({info.precision}, {size / 2**20:.1f} MiB)", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> None:
    """``medvit export``."""
    args = build_parser().parse_args(argv)
    try:
        export(
            args.ckpt_path,
            args.output,
            args.int8,
            args.max_auc_drop,
            args.force,
            args.calibration_samples,
            args.data_root,
        )
    except ValueError as err:  # CheckpointError, ExportError, the AUC gate, data problems
        from medvit.cli import exit_with_user_error, show_tracebacks

        if show_tracebacks():
            raise
        exit_with_user_error(err)
