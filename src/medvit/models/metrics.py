"""Task-aware torchmetrics collections (one per stage, keys ``stage/name``), operating points."""

from __future__ import annotations

import math

import numpy as np
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


def operating_threshold(
    probs: np.ndarray, target: np.ndarray, target_sensitivity: float | None = None
) -> float:
    """A decision threshold on the positive class's probability, chosen on validation data.

    A case is called positive when its probability is ``>= threshold`` (sklearn's ROC rule).

    Args:
        probs: (N,) probabilities of the positive class.
        target: (N,) 1 for the positive class, 0 otherwise.
        target_sensitivity: ``None`` picks the threshold of maximal Youden's J (sensitivity +
            specificity - 1). A value in (0, 1] picks the highest threshold whose sensitivity
            reaches it, i.e. the best specificity at that sensitivity.

    Returns:
        The threshold, or NaN when ``target`` lacks one of the two classes (no ROC curve).
    """
    from sklearn.metrics import roc_curve

    target = np.asarray(target).astype(int)
    if target.min(initial=1) == target.max(initial=0) or len(target) == 0:
        return math.nan
    fpr, tpr, thresholds = roc_curve(target, np.asarray(probs, dtype=np.float64))
    if target_sensitivity is None:
        index = int(np.argmax(tpr - fpr))  # first maximum: the highest such threshold
    else:
        index = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    # sklearn's first threshold is +inf (nothing positive); 1.0 says the same for probabilities.
    return float(min(thresholds[index], 1.0))


def operating_point_metrics(
    probs: np.ndarray, target: np.ndarray, threshold: float
) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 of ``probs >= threshold``.

    Returns:
        ``{"threshold", "op_acc", "op_sens", "op_spec", "op_ppv", "op_npv", "op_f1"}``; a ratio
        whose denominator is 0 is NaN.
    """
    target = np.asarray(target).astype(bool)
    pred = np.asarray(probs) >= threshold
    tp, fp = int(np.sum(pred & target)), int(np.sum(pred & ~target))
    fn, tn = int(np.sum(~pred & target)), int(np.sum(~pred & ~target))

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {
        "threshold": float(threshold),
        "op_acc": ratio(tp + tn, len(target)),
        "op_sens": ratio(tp, tp + fn),
        "op_spec": ratio(tn, tn + fp),
        "op_ppv": ratio(tp, tp + fp),
        "op_npv": ratio(tn, tn + fn),
        "op_f1": ratio(2 * tp, 2 * tp + fp + fn),
    }
