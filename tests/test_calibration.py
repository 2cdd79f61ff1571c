"""Temperature scaling fitted on validation: the NLL optimum, applied to test and predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_calibration_error

from medvit.models.module import fit_temperature


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_fitted_temperature_is_the_nll_minimum(true_t):
    # Labels drawn from softmax(z / true_t): the NLL-optimal temperature for logits z is ~true_t.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial((z / true_t).softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(z, y, "multiclass")
    grid = torch.linspace(0.2, 8, 2000, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(z / g_t, y) for g_t in grid])
    assert t == pytest.approx(float(grid[nll.argmin()]), abs=0.01)
    assert t == pytest.approx(true_t, rel=0.1)


def test_multilabel_temperature_uses_a_sigmoid_per_label():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3000, 4, generator=g, dtype=torch.float64) * 2
    y = torch.bernoulli((z / 3.0).sigmoid(), generator=g)
    assert fit_temperature(z, y, "multilabel") == pytest.approx(3.0, rel=0.1)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory) -> Path:
    from conftest import short_breast_fit

    return short_breast_fit(tmp_path_factory.mktemp("ts"), "--model.temperature_scaling=true")


def test_test_predictions_use_the_validation_temperature(calibrated_run):
    metrics = json.loads((calibrated_run / "metrics.json").read_text())
    val, test = metrics["val"], metrics["test"]
    t = val["temperature"]
    assert t > 0 and t != pytest.approx(1.0) and test["temperature"] == pytest.approx(t)
    ckpt = torch.load(calibrated_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert float(ckpt["state_dict"]["temperature"]) == pytest.approx(t)

    preds = np.load(calibrated_run / "test_predictions.npz")
    probs, target = torch.from_numpy(preds["probs"]), torch.from_numpy(preds["target"]).reshape(-1)
    # The saved probabilities are softmax(logits / T): recover the logits up to a constant and
    # check the ECE before (T = 1) and after against torchmetrics.
    logits = probs.double().log() * t
    malignant = (target == 0).long()
    after = binary_calibration_error(probs[:, 0].float(), malignant, n_bins=15)
    before = binary_calibration_error(logits.softmax(1)[:, 0].float(), malignant, n_bins=15)
    assert test["ece"] == pytest.approx(float(after), abs=1e-5)
    assert test["ece_uncalibrated"] == pytest.approx(float(before), abs=1e-5)
    # Accuracy is the same with or without the temperature.
    assert test["acc"] == pytest.approx(float((logits.argmax(1) == target).double().mean()))
