"""A medvit checkpoint as an fp32 ONNX model: rebuilt strictly, exported, checked, compared.

The graph takes normalised images ``(batch, C, H, W)`` (``batch`` dynamic) and returns the
module's logits ``(batch, num_classes)``: what ``ViTClassifier.forward`` returns in eval mode,
so whatever network the module builds is exported as it runs. Probabilities (temperature,
softmax or sigmoid) are applied by the runtime from the metadata, as ``predict`` does.

Export uses torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, onnxscript), opset 18.
A model is written only after ``onnx.checker`` (full check) passes and onnxruntime reproduces
PyTorch's logits at batch 1 and 8 within :data:`PARITY_ATOL` with the same argmax.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from medvit.export.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    ModelInfo,
    model_info,
)
from medvit.fileio import atomic_write
from medvit.models.checkpoint import CheckpointError

#: Largest |logit difference| between onnxruntime and PyTorch that an export may have.
PARITY_ATOL = 1e-4
#: Batch sizes the parity check runs at (the batch axis is dynamic: both must work).
PARITY_BATCHES = (1, 8)
#: The ONNX opset the exporter targets (onnxruntime >= 1.18 runs it).
OPSET = 18


class ExportError(ValueError):
    """A model that cannot be exported faithfully (one line, naming the reason)."""


def load_for_export(ckpt_path: str | Path) -> tuple[torch.nn.Module, dict[str, Any], ModelInfo]:
    """The checkpoint's module (eval mode), its datamodule settings and its :class:`ModelInfo`.

    The module is rebuilt by the current code from the checkpoint's hyper-parameters and its
    state dict must load strictly: a checkpoint whose code has changed since (renamed or
    reshaped weights, arguments the module no longer takes) is refused, not half-loaded.

    Raises:
        CheckpointError: a missing, unreadable or refused file, or one the current code cannot
            rebuild exactly.
    """
    from medvit.evaluate.predict import load_model  # Lightning: only the exporter needs it

    ckpt_path = Path(ckpt_path)
    if ckpt_path.suffix == ".onnx":
        raise CheckpointError(
            f"{ckpt_path} is already an ONNX model; medvit export takes a checkpoint (.ckpt) "
            "written by medvit fit."
        )
    try:
        module, data_hp = load_model(ckpt_path)
    except CheckpointError as err:
        if "cannot rebuild" in str(err):
            raise CheckpointError(
                f"{err} The checkpoint does not match the model this version of medvit builds "
                "from its hyper-parameters (its code has changed); export it with the medvit "
                "version that trained it."
            ) from err
        raise
    module.eval()
    state = {
        "op_threshold": float(getattr(module, "op_threshold", torch.tensor(math.nan))),
        "temperature": float(getattr(module, "temperature", torch.tensor(1.0))),
    }
    info = model_info(dict(module.hparams), data_hp, state)
    info.source = ckpt_path.name
    return module, data_hp, info


class _Logits(torch.nn.Module):
    """The module's forward alone (a LightningModule carries metrics and trainer hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _reference(module: torch.nn.Module, x: torch.Tensor, info: ModelInfo) -> np.ndarray:
    """PyTorch's logits of ``x``; refuses an output the graph could not carry as logits."""
    with torch.inference_mode():
        out = module(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), info.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(
            f"the model returns {shape} in eval mode, not logits of shape (batch, "
            f"{info.num_classes}); medvit export exports single-output classifiers only."
        )
    return out.float().numpy()


def export_onnx(module: torch.nn.Module, info: ModelInfo) -> onnx.ModelProto:
    """Export ``module`` (eval mode) with a dynamic batch axis; the fp32 ONNX model.

    Raises:
        ExportError: the exporter cannot translate the model.
    """
    module = module.eval().float().cpu()
    example = torch.zeros(info.input_shape(2))
    _reference(module, example, info)  # refuse tuple outputs and the like before exporting
    buffer = io.StringIO()
    try:
        # The exporter prints its progress and warns about what it decomposes: noise for a user.
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Logits(module),
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(
            f"torch.onnx cannot export this model ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]})."
        ) from err
    proto = program.model_proto
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise ExportError(
            "the exported graph fixed its batch size (the model's code branches on it); it "
            "cannot be exported with a dynamic batch axis."
        )
    return proto


def set_metadata(proto: onnx.ModelProto, info: ModelInfo) -> onnx.ModelProto:
    """Store ``info`` in ``proto``'s ``metadata_props`` (replacing an earlier entry)."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.helper.set_model_props(
        proto, {**{p.key: p.value for p in kept}, METADATA_KEY: info.to_json()}
    )
    proto.producer_name = "medvit"
    return proto


def check_model(proto: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` with the full check (shape inference included).

    Raises:
        ExportError: the model is not valid ONNX.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(
            f"the exported model fails onnx.checker ({' '.join(str(err).split())[:300]})."
        ) from err


def session(model: onnx.ModelProto | bytes | str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session of a model (a proto, its bytes or a file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def parity(
    module: torch.nn.Module, proto: onnx.ModelProto, info: ModelInfo, seed: int = 0
) -> dict[str, float]:
    """Compare onnxruntime with PyTorch at each of :data:`PARITY_BATCHES`.

    Inputs are standard-normal images (the normalised scale the model sees).

    Returns:
        ``{"max_abs_logit_diff": ..., "batches": [1, 8]}``.

    Raises:
        ExportError: a difference above :data:`PARITY_ATOL` or a different argmax.
    """
    runner = session(proto)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in PARITY_BATCHES:
        x = torch.randn(info.input_shape(batch), generator=generator)
        expected = _reference(module, x, info)
        got = runner.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(
                f"the ONNX model returns shape {got.shape} at batch {batch}, PyTorch "
                f"{expected.shape}."
            )
        diff = float(np.max(np.abs(got - expected)))
        worst = max(worst, diff)
        if not diff <= PARITY_ATOL:  # also catches NaN
            raise ExportError(
                f"the ONNX model differs from PyTorch by {diff:.3g} in a logit at batch {batch} "
                f"(limit {PARITY_ATOL:g}); it would not predict as the checkpoint does."
            )
        if not np.array_equal(got.argmax(1), expected.argmax(1)):
            raise ExportError(
                f"the ONNX model's predicted classes differ from PyTorch's at batch {batch}."
            )
    return {"max_abs_logit_diff": worst, "batches": list(PARITY_BATCHES)}


def write_model(proto: onnx.ModelProto, path: str | Path) -> int:
    """Write ``proto`` to ``path`` atomically (a temporary file renamed over it); its size."""
    data = proto.SerializeToString()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return len(data)


def export_checkpoint(ckpt_path: str | Path) -> tuple[onnx.ModelProto, ModelInfo, Any]:
    """The checked fp32 ONNX model of a checkpoint, its metadata set; and the module.

    Returns:
        ``(proto, info, module)``; ``info.checks["parity"]`` holds the parity numbers.

    Raises:
        CheckpointError: see :func:`load_for_export`.
        ExportError: see :func:`export_onnx`, :func:`check_model`, :func:`parity`.
    """
    module, _, info = load_for_export(ckpt_path)
    proto = export_onnx(module, info)
    info.checks["parity"] = parity(module, proto, info)
    set_metadata(proto, info)
    check_model(proto)
    return proto, info, module
