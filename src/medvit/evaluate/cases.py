"""Which test cases a gallery shows, and how they are described (numpy only, no torch).

The gallery writer at test time (:mod:`medvit.train.gallery`), the explanation gallery and the
report share these, so "misclassified", "confidence" and the caption mean the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medvit.runs import Predictions

__all__ = ["Case", "describe_labels", "misclassified_cases", "ranked_cases"]


@dataclass(frozen=True)
class Case:
    """One test case of a gallery.

    Args:
        row: the row in the predictions (``probs[row]``).
        index: the sample's index in the test split (the dataset's item ``index``).
        true: the true class name (multi-label: the positive labels, ``; ``-joined, or
            ``(none)``).
        predicted: the predicted class name (multi-label: labels with probability > 0.5).
        probability: single-label: the probability of the predicted class; multi-label: the
            probability of the label with the largest error.
        score: what the cases are ranked by: the predicted class's probability, or for
            multi-label the largest |probability - label| over the labels.
        caption: ``true … · predicted … (p = …)``.
    """

    row: int
    index: int
    true: str
    predicted: str
    probability: float
    score: float
    caption: str


def describe_labels(names: list[str], value: np.ndarray | int, multilabel: bool) -> str:
    """A class name, or for multi-label the names of the labels set (``(none)`` if none)."""
    if multilabel:
        return "; ".join(n for n, v in zip(names, np.ravel(value), strict=True) if v) or "(none)"
    return names[int(value)]


def _case(preds: Predictions, row: int) -> Case:
    names, multilabel = preds.class_names, preds.task == "multilabel"
    probs, target = preds.probs[row], preds.target[row]
    predicted = preds.predicted[row]
    true_text = describe_labels(names, target, multilabel)
    pred_text = describe_labels(names, predicted, multilabel)
    if multilabel:
        errors = np.abs(probs - target)
        worst = int(errors.argmax())
        probability, score = float(probs[worst]), float(errors[worst])
        detail = f"worst label {names[worst]}: p = {probability:.3f}, true {int(target[worst])}"
    else:
        probability = score = float(probs[int(predicted)])
        detail = f"p = {probability:.3f}"
    caption = f"#{int(preds.index[row])} · true: {true_text} · predicted: {pred_text} ({detail})"
    return Case(
        row=row,
        index=int(preds.index[row]),
        true=true_text,
        predicted=pred_text,
        probability=probability,
        score=score,
        caption=caption,
    )


def ranked_cases(
    preds: Predictions,
    wrong: bool,
    n: int,
    true_class: int | None = None,
) -> list[Case]:
    """The ``n`` most confident correct or wrong cases, most confident first.

    A case is wrong when the predicted class differs from the true one (multi-label: any label
    differs at probability 0.5, as the metrics count). Single-label cases are ranked by the
    probability of the predicted class; wrong multi-label ones by their largest label error,
    correct ones by the smallest largest error (the most certain first). Ties go to the lower
    test index.

    Args:
        preds: the test predictions.
        wrong: the wrong cases (True) or the correct ones (False).
        n: at most this many.
        true_class: only cases of this true class (single-label tasks).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    predicted = preds.predicted
    if preds.task == "multilabel":
        is_wrong = (predicted != preds.target).any(axis=1)
        errors = np.abs(preds.probs - preds.target).max(axis=1)
        # Wrong: the largest error first. Correct: the smallest largest-error first.
        score = errors if wrong else -errors
    else:
        is_wrong = predicted != preds.target
        score = preds.probs[np.arange(len(predicted)), predicted]
    keep = is_wrong if wrong else ~is_wrong
    if true_class is not None:
        if preds.task == "multilabel":
            raise ValueError("true_class selects cases of single-label tasks only.")
        keep &= preds.target == true_class
    rows = np.flatnonzero(keep)
    # lexsort: the last key is the primary one (score, descending), then the test index.
    order = np.lexsort((preds.index[rows], -score[rows]))
    return [_case(preds, int(r)) for r in rows[order][:n]]


def misclassified_cases(preds: Predictions, n: int = 12) -> list[Case]:
    """The ``n`` most confident misclassified test cases (multi-label: the largest errors)."""
    return ranked_cases(preds, wrong=True, n=n)
