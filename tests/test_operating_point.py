"""Binary tasks: the clinical positive class and the operating point chosen on validation."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, recall_score, roc_curve

from medvit.cli import MedViTCLI, main
from medvit.data.medmnist import MedMNISTDataModule
from medvit.models.metrics import operating_point_metrics, operating_threshold


def scores(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, n)
    probs = np.clip(0.3 * target + rng.normal(0.35, 0.2, n), 0, 1)
    return probs, target


def sens_spec(probs, target, threshold):
    pred = probs >= threshold
    tn, fp, fn, tp = confusion_matrix(target, pred, labels=[0, 1]).ravel()
    return tp / (tp + fn), tn / (tn + fp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_threshold_maximises_sensitivity_plus_specificity(seed):
    probs, target = scores(seed)
    threshold = operating_threshold(probs, target)
    best = sum(sens_spec(probs, target, threshold))
    # Brute force over every observed probability as a threshold.
    assert best == pytest.approx(max(sum(sens_spec(probs, target, t)) for t in np.unique(probs)))


@pytest.mark.parametrize("goal", [0.8, 0.9, 0.95, 1.0])
def test_target_sensitivity_gives_the_best_specificity_reaching_it(goal):
    probs, target = scores(3)
    threshold = operating_threshold(probs, target, target_sensitivity=goal)
    sens, spec = sens_spec(probs, target, threshold)
    assert sens >= goal
    # Every threshold that also reaches the goal has no better specificity.
    reaching = [t for t in np.unique(probs) if sens_spec(probs, target, t)[0] >= goal]
    assert spec == pytest.approx(max(sens_spec(probs, target, t)[1] for t in reaching))


def test_threshold_is_one_of_sklearns_roc_thresholds_and_nan_without_both_classes():
    probs, target = scores(4)
    assert operating_threshold(probs, target) in set(roc_curve(target, probs)[2])
    assert math.isnan(operating_threshold(probs, np.zeros_like(target)))


def test_operating_point_metrics_equal_sklearn():
    probs, target = scores(5)
    op = operating_point_metrics(probs, target, 0.5)
    pred = (probs >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(target, pred).ravel()
    assert op["op_sens"] == pytest.approx(recall_score(target, pred))
    assert op["op_spec"] == pytest.approx(tn / (tn + fp))
    assert op["op_ppv"] == pytest.approx(tp / (tp + fp))
    assert op["op_npv"] == pytest.approx(tn / (tn + fn))
    assert op["op_f1"] == pytest.approx(f1_score(target, pred))
    assert op["op_acc"] == pytest.approx((pred == target).mean())
    assert math.isnan(operating_point_metrics(probs, target, 1.1)["op_ppv"])  # nothing positive


def test_positive_class_of_each_binary_set(synthetic_root):
    root = synthetic_root("breastmnist", n=(8, 4, 4))
    common = dict(root=str(root), verify_md5=False)
    assert MedMNISTDataModule("breastmnist", **common).positive_index == 0  # malignant
    assert MedMNISTDataModule("pneumoniamnist", **common).positive_index == 1  # pneumonia
    dm = MedMNISTDataModule("breastmnist", positive_class="normal, benign", **common)
    assert dm.positive_index == 1
    with pytest.raises(ValueError, match=r"'benign' is not a class of breastmnist: give one of"):
        MedMNISTDataModule("breastmnist", positive_class="benign", **common)
    with pytest.raises(ValueError, match="positive_class is for binary sets"):
        MedMNISTDataModule("dermamnist", positive_class=0, **common)


def test_cli_links_the_positive_class(synthetic_root, tmp_path):
    root = synthetic_root("breastmnist", n=(8, 4, 4))
    args = [f"--data.root={root}", "--data.verify_md5=false", f"--run.root={tmp_path}"]
    assert MedViTCLI(args=args, run=False).model.hparams.positive_class == 0
    other = MedViTCLI(args=[*args, "--data.positive_class=normal, benign"], run=False)
    assert other.model.hparams.positive_class == 1


@pytest.fixture(scope="module")
def breast_run(tmp_path_factory) -> Path:
    """A short fit + test on a synthetic BreastMNIST file (positive class: malignant = 0)."""
    from conftest import short_breast_fit

    return short_breast_fit(tmp_path_factory.mktemp("op"), "--model.target_sensitivity=0.9")


def test_binary_metrics_describe_the_positive_class(breast_run):
    metrics = json.loads((breast_run / "metrics.json").read_text())
    preds = np.load(breast_run / "test_predictions.npz")
    probs, target = preds["probs"], preds["target"].reshape(-1)
    assert metrics["positive_class"] == "malignant"
    malignant = (target == 0).astype(int)
    called = (probs.argmax(1) == 0).astype(int)
    test = metrics["test"]
    assert test["sens"] == pytest.approx(recall_score(malignant, called), abs=1e-6)
    assert test["spec"] == pytest.approx(recall_score(1 - malignant, 1 - called), abs=1e-6)
    assert test["f1"] == pytest.approx(f1_score(malignant, called), abs=1e-6)
    assert test["acc"] == pytest.approx((probs.argmax(1) == target).mean(), abs=1e-6)


def test_validation_threshold_is_applied_unchanged_to_test(breast_run):
    metrics = json.loads((breast_run / "metrics.json").read_text())
    val, test = metrics["val"], metrics["test"]
    # best.ckpt carries the threshold chosen on its own validation epoch.
    assert 0 <= val["threshold"] <= 1 and test["threshold"] == pytest.approx(val["threshold"])
    assert val["op_sens"] >= 0.9  # --model.target_sensitivity 0.9, reached on validation
    preds = np.load(breast_run / "test_predictions.npz")
    malignant = preds["target"].reshape(-1) == 0
    expected = operating_point_metrics(preds["probs"][:, 0], malignant, val["threshold"])
    for key, value in expected.items():
        assert test[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_report_names_the_positive_class_and_the_operating_point(breast_run):
    from medvit.report import build_report

    html = build_report([breast_run], progress=False)
    for label in (
        "sensitivity: malignant found, at argmax",
        "F1 of malignant, at argmax",
        "threshold on P(malignant), chosen on validation",
        "sensitivity at the threshold",
    ):
        assert label in html, label
    assert "F1 (macro)" not in html  # a binary F1 is the positive class's, not a macro average


def test_curves_and_calibration_are_about_the_positive_class(breast_run):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from medvit.evaluate import plots

    preds = plots.Predictions.load(breast_run / "test_predictions.npz")
    assert preds.positive == 0
    malignant, p = (preds.target == 0).astype(int), preds.probs[:, 0]
    ((label, _, _, auc),) = plots.roc_curves(preds)
    assert label == "malignant" and auc == pytest.approx(roc_auc_score(malignant, p), abs=1e-6)
    ((label, _, _, ap),) = plots.pr_curves(preds)
    assert ap == pytest.approx(average_precision_score(malignant, p), abs=1e-6)
    bins = plots.calibration_bins(preds)
    assert "malignant" in bins["xlabel"]


def test_report_of_a_parent_folder_compares_every_run_inside(breast_run, tmp_path):
    import shutil

    from medvit.report import build_report, expand_parents

    parent = tmp_path / "breastmnist"
    for name in ("20261130-090000", "20261130-100000"):
        shutil.copytree(breast_run, parent / name)
    (parent / "notes").mkdir()  # not a run: left out
    assert expand_parents([parent]) == [parent / "20261130-090000", parent / "20261130-100000"]
    html = build_report([parent], progress=False)
    assert html.count('data-plot="roc"') >= 2 and "20261130-090000" in html


def test_a_checkpoint_from_before_operating_points_still_tests(breast_run, tmp_path):
    import torch

    ckpt = torch.load(breast_run / "checkpoints" / "best.ckpt", weights_only=True)
    for key in ("op_threshold", "temperature"):
        del ckpt["state_dict"][key]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "test",
                "-c",
                str(breast_run / "config.yaml"),
                f"--ckpt_path={old}",
                f"--run.root={tmp_path / 'runs'}",
                "--run.dir=null",
            ]
        )
    # Testing another folder's checkpoint writes none: no "dirpath has changed" warning.
    assert not [w for w in caught if "dirpath" in str(w.message)]
    (run_dir,) = (tmp_path / "runs" / "breastmnist").iterdir()
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert "auroc" in test and "threshold" not in test  # no threshold in it: none applied
    # medvit predict rebuilds the model from the checkpoint alone: the same defaults apply.
    data = breast_run.parents[2] / "data" / "breastmnist.npz"
    main(["predict", f"--ckpt_path={old}", f"{data}:test", "-o", str(tmp_path / "p.csv")])
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 31  # header + 30 test rows
