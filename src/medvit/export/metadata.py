"""What an exported ONNX model carries so that ``medvit predict`` needs nothing else.

One ``metadata_props`` entry, :data:`METADATA_KEY`, holds JSON: the model's classes, task,
input size and channels, the normalisation, the positive class, operating threshold and
temperature, and the data settings that decode files as the checkpoint's data were (MedMNIST
flag, decode size, channels, DICOM window, listing columns). No torch, no onnx here: the runtime
reads it through onnxruntime's ``custom_metadata_map``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The ``metadata_props`` key holding :class:`ModelInfo` as JSON.
METADATA_KEY = "medvit"
#: Bumped when a field changes meaning; the runtime refuses versions it does not know.
FORMAT_VERSION = 1
#: Names of the graph's input and output.
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: The int8 quantization modes (``--int8 MODE``; a bare ``--int8`` is the first).
INT8_MODES = ("static", "dynamic")
#: The largest test-AUC drop an int8 model may have without ``--force``.
DEFAULT_MAX_AUC_DROP = 0.005
#: At most this many validation images calibrate a static int8 model.
DEFAULT_CALIBRATION_SAMPLES = 512
#: The datamodule settings predict decodes files with (see ``decoding_for`` and the listings).
DATA_KEYS = (
    "flag",
    "size",
    "in_chans",
    "img_size",
    "window",
    "path",
    "path_column",
    "label_column",
    "patient_column",
    "split_column",
    "mean",
    "std",
)


class ModelFileError(ValueError):
    """An ``.onnx`` file that is missing, unreadable or not exported by ``medvit export``."""


@dataclass
class ModelInfo:
    """Everything ``medvit predict`` needs to run an exported model like its checkpoint.

    Attributes:
        task: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        num_classes: logits per image.
        class_names: names of the classes (or labels), in logit order.
        in_chans: input channels of the graph.
        img_size: input side in pixels (the graph's ``H == W``).
        spatial_dims: 2 (images) or 3 (volumes, ``D == H == W``).
        mean: normalisation mean on the [0, 1] scale (length 1 or ``in_chans``).
        std: normalisation std on the [0, 1] scale.
        positive_class: binary tasks: the class the operating threshold is about.
        op_threshold: binary tasks: the validation operating threshold, ``None`` when none.
        temperature: probabilities are ``softmax(logits / temperature)`` (sigmoid for
            multi-label).
        data: the checkpoint's datamodule settings of :data:`DATA_KEYS` (decoding files).
        precision: ``fp32``, ``int8-dynamic`` or ``int8-static``.
        source: the checkpoint's file name.
        checks: what the exporter measured (parity, test AUC before and after int8).
    """

    task: str
    num_classes: int
    class_names: list[str]
    in_chans: int
    img_size: int
    spatial_dims: int = 2
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    positive_class: int = 1
    op_threshold: float | None = None
    temperature: float = 1.0
    data: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    source: str = ""
    checks: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def input_shape(self, batch: int | str = "batch") -> tuple[Any, ...]:
        """The graph's input shape, e.g. ``(batch, 1, 28, 28)``."""
        return (batch, self.in_chans, *([self.img_size] * self.spatial_dims))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str | Path = "the model") -> ModelInfo:
        """Parse :meth:`to_json`'s text; a :class:`ModelFileError` naming ``where`` otherwise."""
        try:
            values = json.loads(text)
            version = values.get("format_version")
            if version != FORMAT_VERSION:
                raise ModelFileError(
                    f"{where} has medvit metadata version {version}; this medvit reads version "
                    f"{FORMAT_VERSION}. Export the checkpoint again with this medvit."
                )
            return cls(**values)
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise ModelFileError(
                f"{where}: its '{METADATA_KEY}' metadata is not what medvit export writes ({err})."
            ) from err


def model_info(
    hparams: dict[str, Any], data_hp: dict[str, Any], state: dict[str, Any]
) -> ModelInfo:
    """The :class:`ModelInfo` of a checkpoint's hyper-parameters and buffers.

    Args:
        hparams: the module's hyper-parameters (``ViTClassifier``'s arguments).
        data_hp: the datamodule's hyper-parameters.
        state: ``{"op_threshold": float, "temperature": float}`` (the module's buffers).
    """
    names = list(hparams.get("class_names") or [str(i) for i in range(hparams["num_classes"])])
    threshold = state.get("op_threshold")
    threshold = None if threshold is None or not math.isfinite(threshold) else float(threshold)
    data = {k: data_hp[k] for k in DATA_KEYS if data_hp.get(k) is not None}
    if isinstance(data.get("window"), (tuple, list)):
        data["window"] = [float(v) for v in data["window"]]
    return ModelInfo(
        task=str(hparams["task"]),
        num_classes=int(hparams["num_classes"]),
        class_names=[str(n) for n in names],
        in_chans=int(hparams["in_chans"]),
        img_size=int(hparams["img_size"]),
        spatial_dims=int(hparams.get("spatial_dims") or 2),
        mean=[float(v) for v in (data_hp.get("mean") or [0.5])],
        std=[float(v) for v in (data_hp.get("std") or [0.5])],
        positive_class=int(hparams.get("positive_class", 1)),
        op_threshold=threshold,
        temperature=float(state.get("temperature", 1.0)),
        data=data,
    )


def probabilities(logits: Any, info: ModelInfo) -> Any:
    """Per-class probabilities of ``(B, C)`` logits, as ``ViTClassifier.probabilities`` does.

    ``softmax(logits / temperature)``, or a sigmoid per label for multi-label tasks; numpy,
    computed in float64 and returned as float32.
    """
    import numpy as np

    z = np.asarray(logits, dtype=np.float64) / info.temperature
    if info.task == "multilabel":
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def auroc(probs: Any, target: Any, info: ModelInfo) -> float:
    """The test AUC as medvit reports it: the positive class's ROC AUC for binary tasks, the
    macro one-vs-rest AUC otherwise (macro over labels for multi-label).

    Classes absent from ``target`` are left out of the macro average.
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score

    probs, target = np.asarray(probs), np.asarray(target)
    if info.task == "binary":
        is_pos = target.reshape(-1) == info.positive_class
        return float(roc_auc_score(is_pos, probs[:, info.positive_class]))
    onehot = (
        target.astype(bool)
        if info.task == "multilabel"
        else np.eye(info.num_classes, dtype=bool)[target.reshape(-1).astype(int)]
    )
    scores = [
        roc_auc_score(onehot[:, k], probs[:, k])
        for k in range(info.num_classes)
        if 0 < onehot[:, k].sum() < len(onehot)
    ]
    return float(np.mean(scores)) if scores else float("nan")
