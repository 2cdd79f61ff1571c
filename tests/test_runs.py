"""medvit.runs: the one owner of run-folder files reads what the writers wrote."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from medvit import runs


def test_settings_of_an_own_data_run_are_read_through_class_path_and_init_args(tmp_path):
    config = {
        "data": {"class_path": "medvit.data.images.ImageDataModule", "init_args": {"path": "x/labels.csv", "size": 64}},
        "model": {"lr": 0.001},
    }  # fmt: skip
    (tmp_path / runs.CONFIG_FILE).write_text(yaml.safe_dump(config))
    run = runs.Run(tmp_path)
    assert run.setting("data.path") == "x/labels.csv" and run.setting("data.size") == 64
    assert run.setting("model.lr") == 0.001 and run.setting("data.flag") is None
    assert run.data_name == "labels.csv"


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ({"flag": "breastmnist", "size": 28}, "breastmnist"),
        ({"flag": "pathmnist", "size": 64}, "pathmnist_64"),
        ({"path": "/data/chest_xray/"}, "chest_xray"),
        ({}, None),
    ],
)
def test_data_name(args, name):
    assert runs.data_name(args) == name


def test_predictions_round_trip_and_multilabel_threshold(tmp_path):
    probs = np.array([[0.2, 0.5, 0.9], [0.51, 0.1, 0.5]], np.float32)
    target = np.array([[0, 1, 1], [1, 0, 0]])
    path = tmp_path / runs.PREDICTIONS_FILE
    runs.write_predictions(
        path, probs=probs, target=target, index=np.array([7, 3]), class_names=["a", "b", "c"],
        task="multilabel",
    )  # fmt: skip
    preds = runs.read_predictions(path)
    assert preds.class_names == ["a", "b", "c"] and preds.task == "multilabel"
    assert preds.index.tolist() == [7, 3] and np.array_equal(preds.target, target)
    # A label counts at probability > 0.5, as torchmetrics counts it: 0.5 itself is negative.
    assert preds.predicted.tolist() == [[0, 0, 1], [1, 0, 0]]


def test_broken_predictions_file_is_named(tmp_path):
    path = tmp_path / runs.PREDICTIONS_FILE
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=str(path)):
        runs.read_predictions(path)
    assert runs.read_predictions(tmp_path / "absent.npz") is None


def test_cv_summary_reader_fills_every_key_of_the_schema(tmp_path):
    runs.write_json(tmp_path / runs.SUMMARY_JSON, {"runs": [{"run": "r0-f0"}], "missing": []})
    summary = runs.read_cv_summary(tmp_path)
    assert summary["runs"] == [{"run": "r0-f0"}] and summary["ensemble"] is None
    assert summary["val"] == {} and summary["test"] == {}
    assert summary["runs_completed"] == 1 and summary["runs_expected"] == 1


def test_gallery_round_trip_drops_missing_pictures_and_refuses_bad_entries(tmp_path):
    from medvit import runs

    image = runs.gallery_image_path(tmp_path, "misclassified", "test_00003.png")
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    entry = {
        "image": str(image.relative_to(tmp_path)),
        "index": 3,
        "true": "malignant",
        "predicted": "benign",
        "probability": 0.91,
    }
    runs.write_gallery(tmp_path, "misclassified", [entry])
    assert runs.read_gallery(tmp_path) == {"misclassified": [entry]}
    image.unlink()
    assert runs.read_gallery(tmp_path) == {"misclassified": []}
    with pytest.raises(ValueError, match="lacks \\['probability'\\]"):
        runs.write_gallery(
            tmp_path, "explained", [{k: v for k, v in entry.items() if k != "probability"}]
        )
    with pytest.raises(ValueError, match="Unknown gallery section"):
        runs.gallery_image_path(tmp_path, "best", "a.png")
