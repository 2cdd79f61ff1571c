"""The numbers behind the figures: ROC and PR curves, confusion matrices, calibration bins and
per-class scores of :class:`~medvit.runs.Predictions`, with numpy and scikit-learn (no torch).

A run's ``metrics.json`` holds torchmetrics' values, so each number here is computed the way
torchmetrics computes it on the same predictions: probabilities are taken in float32 (what
torchmetrics sees), argmax for multi-class predictions, ``p > 0.5`` for multi-label ones and
for binary confusion matrices, 0 where a ratio has a zero denominator, and a class without
positives (or negatives) gets a flat ROC curve and an AUROC of 0. ``tests/test_report.py``
compares every function with torchmetrics.
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import auc, precision_recall_curve, roc_curve
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from sklearn.metrics import multilabel_confusion_matrix as _sk_multilabel_confusion_matrix

from medvit.runs import Predictions

N_BINS = 15  # reliability bins; the same as the ``ece`` metric (torchmetrics, 15 bins)
# Metrics where a lower value is better (for "best" markers in tables and plots).
LOWER_IS_BETTER = frozenset({"ece", "mae", "loss"})

Curve = tuple[str, np.ndarray, np.ndarray, float]


def _scores(preds: Predictions) -> np.ndarray:
    """The probabilities as torchmetrics sees them (float32): ties and thresholds agree."""
    return preds.probs.astype(np.float32)


def _has_both(target: np.ndarray) -> bool:
    return bool(target.min() != target.max()) if target.size else False


# ----------------------------------------------------------------------------- ROC / PR
def binary_roc(is_pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(fpr, tpr, auc)`` at every distinct score, from (0, 0); torchmetrics' ``binary_roc``.

    Without positives the TPR is all 0 (without negatives the FPR), so the AUC is 0, as in
    torchmetrics (scikit-learn would give NaN).
    """
    is_pos = np.asarray(is_pos).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = roc_curve(is_pos, score, pos_label=1, drop_intermediate=False)
    if not is_pos.any():
        tpr = np.zeros_like(fpr)
    if is_pos.all():
        fpr = np.zeros_like(tpr)
    return fpr, tpr, float(auc(fpr, tpr))


def binary_pr(is_pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(recall, precision, average_precision)``; torchmetrics' ``binary_precision_recall_curve``.

    Recall decreases along the curve and ends at (0, 1). Without positives the recall is 1 at
    every threshold (both libraries agree) and the AP is 0.
    """
    is_pos = np.asarray(is_pos).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        precision, recall, _ = precision_recall_curve(is_pos, score, pos_label=1)
    # The step-wise area, as sklearn's average_precision_score and torchmetrics compute it.
    ap = float(-np.sum(np.diff(recall) * precision[:-1]))
    return recall, precision, ap


def roc_curves(preds: Predictions) -> list[Curve]:
    """``(label, fpr, tpr, auc)`` per curve: the positive class (binary) or each class + macro.

    Classes without both positives and negatives in the targets have no curve; the macro AUC
    averages every class, as the ``auroc`` metric does.
    """
    scores, names, c = _scores(preds), preds.class_names, preds.num_classes
    if preds.task == "binary":
        fpr, tpr, area = binary_roc(preds.target == preds.positive, scores[:, preds.positive])
        return [(names[preds.positive], fpr, tpr, area)]
    if preds.task == "multilabel":
        targets = [preds.target[:, i] for i in range(c)]
    else:
        targets = [preds.target == i for i in range(c)]
    per_class = [binary_roc(targets[i], scores[:, i]) for i in range(c)]
    valid = [i for i in range(c) if _has_both(targets[i])]
    out: list[Curve] = [(names[i], *per_class[i]) for i in valid]
    if preds.task == "multilabel" and len(valid) < 2:
        return out
    # The macro curve: mean TPR on the union of the classes' FPRs, as torchmetrics'
    # multi-class ``average="macro"`` builds it.
    curves = valid if preds.task == "multilabel" else range(c)
    grid = np.unique(np.concatenate([per_class[i][0] for i in curves]))
    mean_tpr = np.mean([np.interp(grid, *per_class[i][:2]) for i in curves], axis=0)
    macro = float(np.mean([per_class[i][2] for i in range(c)]))
    out.append(("macro average", grid, mean_tpr, macro))
    return out


def pr_curves(preds: Predictions) -> list[Curve]:
    """``(label, recall, precision, average_precision)`` per curve, as :func:`roc_curves`.

    Classes without positives have no curve. The macro AP averages the classes with
    positives (multi-class: torchmetrics skips the NaN AP of a class absent from the targets).
    """
    scores, names, c = _scores(preds), preds.class_names, preds.num_classes
    if preds.task == "binary":
        curve = binary_pr(preds.target == preds.positive, scores[:, preds.positive])
        return [(names[preds.positive], *curve)]
    if preds.task == "multilabel":
        targets = [preds.target[:, i] for i in range(c)]
    else:
        targets = [preds.target == i for i in range(c)]
    valid = [i for i in range(c) if targets[i].any()]
    per_class = {i: binary_pr(targets[i], scores[:, i]) for i in valid}
    out: list[Curve] = [(names[i], *per_class[i]) for i in valid]
    if preds.task == "multilabel" and len(valid) < 2:
        return out
    grid = np.unique(np.concatenate([per_class[i][0] for i in valid]))
    # np.interp needs increasing x; the curves list recall in decreasing order.
    mean_p = np.mean(
        [np.interp(grid, per_class[i][0][::-1], per_class[i][1][::-1]) for i in valid], axis=0
    )
    macro = float(np.mean([per_class[i][2] for i in valid]))
    out.append(("macro average", grid, mean_p, macro))
    return out


# ----------------------------------------------------------------------------- confusion
def confusion_matrix(preds: Predictions, normalize: str | None = None) -> np.ndarray:
    """(C, C) matrix (rows true, columns predicted), or (L, 2, 2) for multi-label.

    Binary: predicted class 1 where ``P(class 1) > 0.5``; multi-class: argmax; multi-label:
    each label where its probability is > 0.5. Empty rows or columns normalise to 0.

    Args:
        preds: predictions.
        normalize: ``None`` (counts), ``"true"`` (rows sum to 1), ``"pred"`` or ``"all"``.
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got '{normalize}'.")
    scores = _scores(preds)
    if preds.task == "multilabel":
        cm = _sk_multilabel_confusion_matrix(preds.target, (scores > 0.5).astype(np.int64))
        if normalize is None:
            return cm
        axis = {"true": 2, "pred": 1, "all": (1, 2)}[normalize]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(cm / cm.sum(axis=axis, keepdims=True))
    if preds.task == "binary":
        predicted = (scores[:, 1] > 0.5).astype(np.int64)
    else:
        predicted = scores.argmax(axis=1)
    labels = np.arange(preds.num_classes)
    return _sk_confusion_matrix(preds.target, predicted, labels=labels, normalize=normalize)


# ----------------------------------------------------------------------------- per class
PER_CLASS = ("precision", "recall", "specificity", "f1", "auroc", "ap")


def per_class_metrics(preds: Predictions) -> dict[str, np.ndarray]:
    """Support and :data:`PER_CLASS` scores of every class, as torchmetrics' ``average=None``.

    Multi-class (and binary) tasks predict the argmax; multi-label tasks each label where
    ``p > 0.5``. Ratios are float32 divisions of the counts, as in torchmetrics, so the
    values are the same to the last digit. A multi-class class absent from the targets has
    no average precision (NaN).

    Returns:
        ``support`` (samples of the class, or positives of the label) and one array per name
        in :data:`PER_CLASS`.
    """
    scores, c = _scores(preds), preds.num_classes
    if preds.task == "multilabel":
        truth = preds.target.astype(bool)
        predicted = scores > 0.5
    else:
        truth = preds.target[:, None] == np.arange(c)
        predicted = scores.argmax(axis=1)[:, None] == np.arange(c)
    tp = (truth & predicted).sum(0).astype(np.float32)
    fp = (~truth & predicted).sum(0).astype(np.float32)
    fn = (truth & ~predicted).sum(0).astype(np.float32)
    tn = (~truth & ~predicted).sum(0).astype(np.float32)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        safe = np.where(den == 0, np.float32(1), den)
        return np.where(den == 0, np.float32(0), num / safe)

    aps = [binary_pr(truth[:, i], scores[:, i])[2] for i in range(c)]
    if preds.task != "multilabel":
        aps = [ap if truth[:, i].any() else np.nan for i, ap in enumerate(aps)]
    return {
        "support": truth.sum(0),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fn + fp),
        "auroc": np.array([binary_roc(truth[:, i], scores[:, i])[2] for i in range(c)]),
        "ap": np.array(aps, dtype=np.float64),
    }


# ----------------------------------------------------------------------------- calibration
def _outcomes(preds: Predictions, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str, str]:
    """``(confidence, outcome, xlabel, ylabel)`` of the calibration error's definition."""
    if preds.task == "binary":
        pos = preds.positive
        conf, outcome = scores[:, pos], preds.target == pos
        short = textwrap.shorten(preds.class_names[pos], width=24, placeholder="…")
        return conf, outcome, f"Predicted probability of '{short}'", "Observed frequency"
    if preds.task == "multilabel":
        conf, outcome = scores.reshape(-1), preds.target.reshape(-1) == 1
        return conf, outcome, "Predicted probability (all labels)", "Observed frequency"
    conf, outcome = scores.max(axis=1), scores.argmax(axis=1) == preds.target
    return conf, outcome, "Confidence (top predicted probability)", "Accuracy"


def expected_calibration_error(
    conf: np.ndarray, outcome: np.ndarray, n_bins: int = N_BINS
) -> float:
    """torchmetrics' L1 calibration error, step by step in float32 (its dtype).

    Like ``torch.bucketize(right=True) - 1``, a confidence of exactly 1.0 gets a bin of its own.
    """
    conf = np.asarray(conf, dtype=np.float32)
    if not conf.size:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1, dtype=np.float32)
    idx = np.searchsorted(edges, conf, side="right") - 1
    count = np.zeros(n_bins + 1, np.float32)
    conf_sum = np.zeros(n_bins + 1, np.float32)
    acc_sum = np.zeros(n_bins + 1, np.float32)
    np.add.at(count, idx, np.float32(1))
    np.add.at(conf_sum, idx, conf)
    np.add.at(acc_sum, idx, np.asarray(outcome, dtype=np.float32))
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(np.nan_to_num(acc_sum / count) - np.nan_to_num(conf_sum / count))
    return float(np.sum(gap * (count / count.sum()), dtype=np.float32))


def calibration_bins(preds: Predictions, n_bins: int = N_BINS) -> dict[str, Any]:
    """Reliability-diagram bins, defined as torchmetrics' calibration error (``ece`` metric).

    Binary: confidence = probability of the positive class, outcome = it is the true class.
    Multi-class: confidence = top probability, outcome = top prediction correct. Multi-label:
    every (sample, label) pair as a binary prediction. Bins split [0, 1] into ``n_bins`` equal
    widths.

    Returns:
        dict with ``edges`` (n_bins + 1), ``confidence``, ``accuracy`` and ``count`` per bin
        (NaN where empty), ``ece`` (torchmetrics' value), ``xlabel`` and ``ylabel``.
    """
    conf, outcome, xlabel, ylabel = _outcomes(preds, preds.probs)
    outcome = outcome.astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # For the picture, a confidence of exactly 1.0 joins the top bin.
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=outcome, minlength=n_bins) / count
    return {
        "edges": edges,
        "confidence": confidence,
        "accuracy": accuracy,
        "count": count,
        "ece": expected_calibration_error(*_outcomes(preds, _scores(preds))[:2], n_bins),
        "xlabel": xlabel,
        "ylabel": ylabel,
    }
