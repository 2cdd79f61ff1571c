"""Task-aware torchmetrics collections (one per stage, keys ``stage/name``)."""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryCalibrationError,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
    CohenKappa,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
    MultilabelRecall,
    MultilabelSpecificity,
)

TASKS = ("binary", "multiclass", "multilabel", "ordinal")


class MultilabelCalibrationError(BinaryCalibrationError):
    """ECE over all (sample, label) pairs of a multi-label problem."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.reshape(-1), target.reshape(-1).long())


class OrdinalMAE(MeanAbsoluteError):
    """Mean absolute error, in grades, of the most probable grade."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.argmax(dim=1).float(), target.float())


def build_metrics(task: str, num_classes: int, prefix: str) -> MetricCollection:
    """Metrics for one stage.

    Every task gets ``auroc`` (macro), ``acc``, ``bal_acc`` (mean of per-class recall; for binary
    and multi-label, the mean of sensitivity and specificity), ``f1`` (macro) and ``ece``.
    Binary adds ``sens`` and ``spec``; ordinal adds ``qwk`` (quadratic weighted kappa) and ``mae``.
    Inputs are probabilities: (B,) of the positive class for binary, (B, C) otherwise.

    Args:
        task: one of ``binary``, ``multiclass``, ``multilabel``, ``ordinal``.
        num_classes: classes (or labels for multi-label).
        prefix: stage prefix such as ``"val/"``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got '{task}'.")
    if task == "binary":
        sens, spec = BinaryRecall(), BinarySpecificity()
        metrics = {
            "auroc": BinaryAUROC(),
            "acc": BinaryAccuracy(),
            "bal_acc": (BinaryRecall() + BinarySpecificity()) / 2,
            "f1": BinaryF1Score(),
            "sens": sens,
            "spec": spec,
            "ece": BinaryCalibrationError(n_bins=15),
        }
    elif task == "multilabel":
        n = num_classes
        metrics = {
            "auroc": MultilabelAUROC(num_labels=n, average="macro"),
            "acc": MultilabelAccuracy(num_labels=n, average="macro"),
            "bal_acc": (
                MultilabelRecall(num_labels=n, average="macro")
                + MultilabelSpecificity(num_labels=n, average="macro")
            )
            / 2,
            "f1": MultilabelF1Score(num_labels=n, average="macro"),
            "ece": MultilabelCalibrationError(n_bins=15),
        }
    else:
        n = num_classes
        metrics = {
            "auroc": MulticlassAUROC(num_classes=n, average="macro"),
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "bal_acc": MulticlassAccuracy(num_classes=n, average="macro"),
            "f1": MulticlassF1Score(num_classes=n, average="macro"),
            "ece": MulticlassCalibrationError(num_classes=n, n_bins=15),
        }
        if task == "ordinal":
            metrics["qwk"] = CohenKappa(task="multiclass", num_classes=n, weights="quadratic")
            metrics["mae"] = OrdinalMAE()
    # Compute groups would merge states across the compositional bal_acc; the saving is tiny.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
