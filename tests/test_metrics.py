"""Every metric medvit reports equals an independent reference on fixed inputs.

The references are scikit-learn, or a few lines of NumPy where scikit-learn has no such metric
(expected calibration error, ordinal MAE), written from the definitions rather than from
torchmetrics' code. ``torchmetrics.functional`` is a second reference for ECE. Inputs are chosen
so that every class appears in both targets and predictions (macro averages are then defined the
same way everywhere) and no probability sits on a threshold or a bin edge.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmf
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    recall_score,
    roc_auc_score,
)

from medvit.models.metrics import build_metrics

N_BINS = 15  # what build_metrics uses for every ECE


def _ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of |accuracy - confidence| * share."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            total += gap * inside.sum() / len(confidence)
    return total


def _compute(task: str, n: int, probs: torch.Tensor, target: torch.Tensor, batches: int = 3):
    """Metric values of ``build_metrics`` fed in a few batches, as a validation epoch is."""
    metrics = build_metrics(task, n, prefix="val/")
    for p, t in zip(probs.chunk(batches), target.chunk(batches), strict=True):
        metrics.update(p, t)
    return {k.removeprefix("val/"): float(v) for k, v in metrics.compute().items()}


def _assert_values(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want), f"metric names {sorted(got)}, expected {sorted(want)}"
    # float32 accumulation in torchmetrics against float64 references
    bad = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > 1e-5}
    assert not bad, f"metrics (got, reference) that differ: {bad}"


def _probs(n: int, classes: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 1.5, (n, classes))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def test_binary_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 90)
    # Informative but imperfect scores, clear of the 0.5 threshold and of 15-bin edges.
    p = np.clip(0.35 * target + rng.uniform(0.05, 0.6, 90), 0.01, 0.99).astype(np.float32)
    p[np.isclose(p, 0.5, atol=1e-3)] += 0.01
    pred = (p > 0.5).astype(int)
    got = _compute("binary", 2, torch.from_numpy(p), torch.from_numpy(target))
    sens = recall_score(target, pred)
    spec = recall_score(target, pred, pos_label=0)
    want = {
        "auroc": roc_auc_score(target, p),
        "acc": accuracy_score(target, pred),
        "bal_acc": balanced_accuracy_score(target, pred),
        "f1": f1_score(target, pred),
        "sens": sens,
        "spec": spec,
        # Binary ECE is the reliability of the positive-class probability.
        "ece": _ece(p, target),
    }
    _assert_values(got, want)
    assert want["bal_acc"] == pytest.approx((sens + spec) / 2)
    ref = tmf.binary_calibration_error(torch.from_numpy(p), torch.from_numpy(target), N_BINS)
    assert got["ece"] == pytest.approx(float(ref), abs=1e-6)
    # Not a degenerate case: the numbers differ from each other.
    assert len({round(v, 4) for v in want.values()}) >= 5, want


@pytest.mark.parametrize("task", ["multiclass", "ordinal"])
def test_multiclass_and_ordinal_metrics_equal_sklearn(task):
    classes, n = 5, 120
    rng = np.random.default_rng(1)
    # Imbalanced classes, so micro accuracy and balanced accuracy differ.
    target = rng.choice(classes, n, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    probs = _probs(n, classes, seed=2)
    # Push the true class up for ~60% of samples, so the metrics are far from chance.
    boost = rng.random(n) < 0.6
    probs[boost, target[boost]] += 1.0
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    assert set(pred) == set(target) == set(range(classes))
    got = _compute(task, classes, torch.from_numpy(probs), torch.from_numpy(target))
    want = {
        "auroc": roc_auc_score(target, probs, multi_class="ovr", average="macro"),
        "acc": accuracy_score(target, pred),
        "bal_acc": balanced_accuracy_score(target, pred),
        "f1": f1_score(target, pred, average="macro"),
        # Top-label ECE: confidence is the largest probability, correct is argmax == target.
        "ece": _ece(probs.max(1), pred == target),
    }
    if task == "ordinal":
        want["qwk"] = cohen_kappa_score(target, pred, weights="quadratic")
        want["mae"] = np.abs(pred - target).mean()
    _assert_values(got, want)
    ref = tmf.multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(target), classes, N_BINS
    )
    assert got["ece"] == pytest.approx(float(ref), abs=1e-6)
    assert abs(want["acc"] - want["bal_acc"]) > 1e-3


def test_ordinal_qwk_and_mae_weigh_the_distance_between_grades():
    # Same accuracy, errors one grade off versus four grades off.
    target = np.array([0, 1, 2, 3, 4] * 4)
    near, far = target.copy(), target.copy()
    near[:5] = [1, 2, 3, 4, 3]
    far[:5] = [4, 4, 4, 0, 0]
    out = {}
    for name, pred in (("near", near), ("far", far)):
        probs = np.full((20, 5), 0.05, np.float32)
        probs[np.arange(20), pred] = 0.8
        out[name] = _compute("ordinal", 5, torch.from_numpy(probs), torch.from_numpy(target), 2)
        assert out[name]["qwk"] == pytest.approx(
            cohen_kappa_score(target, pred, weights="quadratic"), abs=1e-6
        )
        assert out[name]["mae"] == pytest.approx(np.abs(pred - target).mean(), abs=1e-6)
    assert out["near"]["acc"] == out["far"]["acc"] == pytest.approx(0.75)
    assert out["near"]["mae"] == pytest.approx(0.25) and out["far"]["mae"] == pytest.approx(0.8)
    assert out["near"]["qwk"] > out["far"]["qwk"] + 0.4, out


def _multilabel_case() -> tuple[np.ndarray, np.ndarray]:
    """(60, 4) probabilities and targets with labels of different prevalence and calibration."""
    rng = np.random.default_rng(3)
    prevalence = np.array([0.7, 0.4, 0.25, 0.15])
    target = (rng.random((60, 4)) < prevalence).astype(np.int64)
    target[:2] = [[1, 1, 1, 1], [0, 0, 0, 0]]  # every label has both values
    noise = rng.uniform(0.02, 0.55, (60, 4))
    probs = np.clip(0.4 * target + noise, 0.01, 0.99).astype(np.float32)
    probs[np.isclose(probs, 0.5, atol=1e-3)] += 0.01
    return probs, target


def test_multilabel_metrics_equal_sklearn():
    probs, target = _multilabel_case()
    pred = (probs > 0.5).astype(int)
    got = _compute("multilabel", 4, torch.from_numpy(probs), torch.from_numpy(target))
    per_label_bal = [balanced_accuracy_score(target[:, j], pred[:, j]) for j in range(4)]
    want = {
        "auroc": roc_auc_score(target, probs, average="macro"),
        "acc": np.mean([accuracy_score(target[:, j], pred[:, j]) for j in range(4)]),
        # Mean of macro sensitivity and macro specificity = mean of per-label balanced accuracy.
        "bal_acc": np.mean(per_label_bal),
        "f1": f1_score(target, pred, average="macro"),
        # Every (sample, label) pair is one binary prediction of its own target.
        "ece": _ece(probs.reshape(-1), target.reshape(-1)),
    }
    _assert_values(got, want)
    ref = tmf.binary_calibration_error(
        torch.from_numpy(probs).flatten(), torch.from_numpy(target).flatten(), N_BINS
    )
    assert got["ece"] == pytest.approx(float(ref), abs=1e-6)


# Labels 0 and 1 have one class only, so their AUROC warns; only ECE is looked at here.
@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")
def test_multilabel_ece_pairs_each_probability_with_its_own_target():
    # Label 0 is always present and predicted at 0.9; label 1 never, predicted at 0.1; label 2
    # half the time at 0.5. Paired correctly the model is perfectly calibrated on labels 0 and 1.
    n = 30
    target = np.zeros((n, 3), np.int64)
    target[:, 0] = 1
    target[::2, 2] = 1
    probs = np.zeros((n, 3), np.float32)
    probs[:, 0], probs[:, 1], probs[:, 2] = 0.9, 0.1, 0.52
    got = _compute("multilabel", 3, torch.from_numpy(probs), torch.from_numpy(target))["ece"]
    right = _ece(probs.reshape(-1), target.reshape(-1))
    # (0.9 -> 1: gap 0.1) + (0.1 -> 0: gap 0.1) + (0.52 -> half: gap 0.02), each a third of pairs
    assert right == pytest.approx((0.1 + 0.1 + 0.02) / 3, abs=1e-6)
    assert got == pytest.approx(right, abs=1e-6)
    # Any other pairing (transposed, or targets of another sample or label) is far off.
    wrong = [
        _ece(probs.reshape(-1), target.T.reshape(-1)),
        _ece(probs.T.reshape(-1), target.reshape(-1)),
        _ece(probs.reshape(-1), np.roll(target, 1, axis=1).reshape(-1)),
    ]
    assert min(abs(w - right) for w in wrong) > 0.1, wrong


def test_metrics_do_not_depend_on_how_the_epoch_is_batched():
    probs, target = _multilabel_case()
    whole = _compute("multilabel", 4, torch.from_numpy(probs), torch.from_numpy(target), 1)
    split = _compute("multilabel", 4, torch.from_numpy(probs), torch.from_numpy(target), 6)
    assert whole == pytest.approx(split, abs=1e-6)
