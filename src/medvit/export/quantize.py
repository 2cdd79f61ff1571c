"""int8 post-training quantization of an exported model with onnxruntime, and its AUC gate.

Two modes (``medvit export --int8 MODE``):

- ``static`` (the default of a bare ``--int8``): QDQ format, int8 weights per output channel and
  uint8 activations whose ranges are calibrated (min/max) on the checkpoint's validation split
  (onnxruntime's recommended U8S8 on x86). The MatMuls and Gemms with weights and the Convs are
  quantized; LayerNorm, softmax, GELU and attention's two activation-by-activation MatMuls stay
  fp32.
- ``dynamic``: int8 weights per output channel, activation ranges computed per batch at run
  time; the same MatMuls and Gemms, no Conv (onnxruntime's integer convolution is slower than
  its fp32 one), no calibration data.

The exporter measures the test split's AUC with the fp32 and the int8 model; a drop above the
limit (default :data:`DEFAULT_MAX_AUC_DROP`) refuses to write the file unless forced.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from medvit.export.metadata import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_MAX_AUC_DROP,
    INPUT_NAME,
    INT8_MODES,
    OUTPUT_NAME,
    ModelInfo,
    auroc,
    probabilities,
)
from medvit.export.onnx_export import ExportError, session, set_metadata


class QualityGateError(ExportError):
    """The int8 model loses more test AUC than allowed (``--force`` writes it anyway)."""


def datamodule_for(ckpt_path: str | Path, data_hp: dict[str, Any]) -> Any:
    """The checkpoint's DataModule, rebuilt from its saved hyper-parameters (no workers).

    MedMNIST data when the settings name a ``flag``, own data (``ImageDataModule``, its split
    read back from the checkpoint's run folder) when they name a ``path``.

    Raises:
        ValueError: the settings name neither.
    """
    from medvit import runs

    if data_hp.get("flag"):
        from medvit.data.medmnist import MedMNISTDataModule as cls
    elif data_hp.get("path"):
        from medvit.data.images import ImageDataModule as cls
    else:
        raise ValueError(
            f"{ckpt_path}: its datamodule settings name no MedMNIST flag nor data path, so its "
            "validation and test splits cannot be read for int8 calibration."
        )
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in data_hp.items() if k in accepted}
    kwargs["num_workers"] = 0
    dm = cls(**kwargs)
    if hasattr(dm, "source_run_dir"):
        dm.source_run_dir = runs.run_dir_of_checkpoint(Path(ckpt_path).resolve())
    return dm


def split_batches(dm: Any, split: str, limit: int | None = None, batch: int = 64) -> Iterator:
    """``(images, targets)`` numpy batches of a split (``val`` or ``test``), eval transform."""
    import torch

    dm.setup("fit" if split == "val" else "test")
    data = dm.data_val if split == "val" else dm.data_test
    n = len(data) if limit is None else min(limit, len(data))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, range(n)), batch_size=batch, num_workers=0
    )
    for x, y, _ in loader:
        yield x.numpy(), y.numpy()


def evaluate(model: onnx.ModelProto | bytes, batches: list, info: ModelInfo) -> float:
    """The AUC of ``model`` (onnxruntime) on ``batches`` of ``(images, targets)``."""
    runner = session(model)
    logits = [runner.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x, _ in batches]
    target = np.concatenate([y for _, y in batches])
    return auroc(probabilities(np.concatenate(logits), info), target, info)


def quantize(
    proto: onnx.ModelProto, mode: str, calibration: list[np.ndarray] | None = None
) -> onnx.ModelProto:
    """The int8 model of an fp32 ``proto`` (see the module docstring for the modes).

    Args:
        proto: the checked fp32 model.
        mode: ``static`` or ``dynamic``.
        calibration: ``static``: input batches whose activation ranges set the scales.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise ValueError(f"--int8 must be one of {INT8_MODES}, got {mode!r}.")
    if mode == "static" and not calibration:
        raise ValueError("static int8 needs calibration images (the validation split is empty).")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration or [])

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {INPUT_NAME: x}

    root = logging.getLogger()
    level = root.level
    # onnxruntime's quantizer logs a warning per LayerNorm weight it leaves alone.
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="medvit-int8-") as tmp:
            src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
            onnx.save(proto, src)
            # Shape inference and graph clean-up, as onnxruntime recommends before quantizing.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            exclude = _activation_matmuls(onnx.load(pre))
            if mode == "dynamic":
                quantize_dynamic(
                    pre,
                    out,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    nodes_to_exclude=exclude,
                )
            else:
                quantize_static(
                    pre,
                    out,
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    nodes_to_exclude=exclude,
                )
            return onnx.load(out)
    finally:
        root.setLevel(level)


def _activation_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls that multiply two activations (attention's ``q @ k.T`` and
    ``attn @ v``): they stay fp32, since int8 softmax outputs lose the small attention weights
    and these products have no weights to shrink."""
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "MatMul" and not any(i in constants for i in n.input)
    ]


def quantize_checked(
    proto: onnx.ModelProto,
    info: ModelInfo,
    mode: str,
    dm: Any,
    max_auc_drop: float = DEFAULT_MAX_AUC_DROP,
    force: bool = False,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    report: Any = print,
) -> tuple[onnx.ModelProto, ModelInfo]:
    """Quantize ``proto`` and gate it on the test AUC; the int8 model and its metadata.

    Args:
        proto, info: the fp32 model and its metadata.
        mode: ``static`` (calibrated on ``dm``'s validation split) or ``dynamic``.
        dm: the checkpoint's DataModule (:func:`datamodule_for`).
        max_auc_drop: the largest allowed ``AUC(fp32) - AUC(int8)`` on the test split.
        force: return the model even above the limit (the numbers are still reported).
        calibration_samples: at most this many validation images calibrate a static model.
        report: prints one line of numbers.

    Raises:
        QualityGateError: the drop exceeds ``max_auc_drop`` and ``force`` is false.
    """
    calibration = None
    if mode == "static":
        calibration = [x for x, _ in split_batches(dm, "val", calibration_samples)]
    int8 = quantize(proto, mode, calibration)
    test = list(split_batches(dm, "test"))
    before, after = evaluate(proto, test, info), evaluate(int8, test, info)
    drop = before - after
    line = (
        f"test AUC fp32 {before:.4f}, int8 {mode} {after:.4f} (drop {drop:+.4f}, limit "
        f"{max_auc_drop:g}, {sum(len(y) for _, y in test)} test images)"
    )
    report(line)
    if not drop <= max_auc_drop and not force:  # a NaN AUC is refused too
        raise QualityGateError(
            f"int8 {mode} quantization lowers the {line}; nothing written. Give --force to "
            "write it anyway, or try --int8 dynamic|static."
        )
    int8_info = ModelInfo(**{**info.__dict__, "checks": dict(info.checks)})
    int8_info.precision = f"int8-{mode}"
    int8_info.checks["int8"] = {
        "mode": mode,
        "test_auc_fp32": before,
        "test_auc_int8": after,
        "max_auc_drop": max_auc_drop,
        "forced": bool(force and not drop <= max_auc_drop),
        "calibration_images": 0 if calibration is None else int(sum(len(x) for x in calibration)),
    }
    set_metadata(int8, int8_info)
    return int8, int8_info
