"""``medvit predict``: pixel scaling of 16-bit and float images, label columns, unreadable files,
and inputs of another dataset than the checkpoint's."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medvit.evaluate.predict as predict_module
from medvit.cli import main
from medvit.evaluate.predict import predict
from medvit.models.module import ViTClassifier

NAMES = ["malignant", "normal, benign"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A medvit-format checkpoint of a tiny grey 28 px BreastMNIST model (no training needed)."""
    torch.manual_seed(0)
    model = ViTClassifier(
        num_classes=2, in_chans=1, img_size=28, task="binary", class_names=NAMES, patch_size=7
    )
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "datamodule_hyper_parameters": {"flag": "breastmnist", "size": 28},
        },
        path,
    )
    return path


def model_inputs(monkeypatch) -> list[torch.Tensor]:
    """Capture every batch the model receives during ``predict``."""
    seen: list[torch.Tensor] = []
    load_model = predict_module.load_model

    def spying(path):
        model, data_hp = load_model(path)
        model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        return model, data_hp

    monkeypatch.setattr(predict_module, "load_model", spying)
    return seen


def test_16_bit_png_maps_its_full_range_to_0_255(ckpt, tmp_path, monkeypatch):
    # A ramp over the whole 16-bit range: PIL's own 8-bit conversion clips it to ~all 255.
    ramp = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    seen = model_inputs(monkeypatch)
    predict(ckpt, [str(path)], tmp_path / "out.csv", device="cpu")
    (x,) = seen
    # The transform normalises with mean 0.5, std 0.5 (the checkpoint stores none).
    pixels = (x[0, 0] * 0.5 + 0.5) * 255
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(pixels.numpy() - expected).max() < 1e-3
    assert (pixels.numpy() >= 254.5).mean() < 0.01  # not saturated


def test_float_tiff_maps_its_min_max_to_0_255(ckpt, tmp_path, monkeypatch):
    image = np.linspace(-1.0, 3.0, 28 * 28, dtype=np.float32).reshape(28, 28)
    path = tmp_path / "float.tiff"
    Image.fromarray(image).save(path)
    seen = model_inputs(monkeypatch)
    predict(ckpt, [str(path)], tmp_path / "out.csv", device="cpu")
    pixels = ((seen[0][0, 0] * 0.5 + 0.5) * 255).numpy()
    expected = np.rint((image.astype(np.float64) + 1) * 255 / 4)
    assert np.abs(pixels - expected).max() < 1e-3


def test_to_uint8_rules():
    from medvit.evaluate.predict import to_uint8

    eight = np.array([[0, 7, 255]], np.uint8)
    assert to_uint8(eight) is eight
    assert to_uint8(np.array([[0, 257, 65535]], np.uint16)).tolist() == [[0, 1, 255]]
    assert to_uint8(np.array([[0.0, 0.5, 1.0]])).tolist() == [[0, 128, 255]]
    assert to_uint8(np.full((2, 2), 3.0)).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([[np.nan, 1.0]]))


def test_labels_are_integers_with_class_names(ckpt, tmp_path):
    from conftest import make_medmnist_npz

    npz = make_medmnist_npz(tmp_path / "breastmnist.npz", "breastmnist", n=(4, 4, 6))
    out = tmp_path / "out.csv"
    main(["predict", "--ckpt_path", str(ckpt), f"{npz}:test", "-o", str(out)])
    rows = list(csv.DictReader(out.open()))
    truth = np.load(npz)["test_labels"].reshape(-1).tolist()
    assert [r["label"] for r in rows] == [str(t) for t in truth]  # "1", not "[1]"
    assert [r["label_name"] for r in rows] == [NAMES[t] for t in truth]


def test_unreadable_file_gets_an_error_row_and_the_others_are_predicted(ckpt, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((28, 28), 90, np.uint8)).save(folder / "a_good.png")
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(folder / "c_good.png")
    out = tmp_path / "out.csv"
    main(["predict", "--ckpt_path", str(ckpt), str(folder), "-o", str(out)])
    rows = {Path(r["source"]).name: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a_good.png", "b_broken.png", "c_good.png"}
    assert "cannot read image" in rows["b_broken.png"]["error"]
    assert rows["b_broken.png"]["prediction"] == "" and rows["b_broken.png"]["prob_malignant"] == ""
    for name in ("a_good.png", "c_good.png"):
        assert rows[name]["error"] == "" and rows[name]["prediction"] in NAMES
        assert 0 <= float(rows[name]["prob_malignant"]) <= 1
    assert "1 of 3 files could not be read" in capsys.readouterr().err
    # A file named explicitly that does not exist is still a one-line error before any work.
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(ckpt), str(folder / "missing.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "missing.png does not exist" in err


def test_npz_of_another_dataset_is_refused_unless_forced(ckpt, tmp_path, capsys):
    from conftest import make_medmnist_npz

    other = make_medmnist_npz(tmp_path / "pneumoniamnist.npz", "pneumoniamnist", n=(4, 4, 6))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(ckpt), str(other)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("medvit: error: checkpoint") and "trained on breastmnist" in err
    assert "pneumoniamnist data" in err and "--force" in err
    out = tmp_path / "forced.csv"
    main(["predict", "--ckpt_path", str(ckpt), str(other), "--force", "-o", str(out)])
    assert len(list(csv.DictReader(out.open()))) == 6
    # Labels a binary checkpoint cannot have (a 7-class set under a neutral name).
    seven = make_medmnist_npz(tmp_path / "mine.npz", "dermamnist", n=(4, 4, 14))
    with np.load(seven) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["test_images"] = arrays["test_images"][..., 0]  # grey, as predict would make them
    np.savez(seven, **arrays)
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ckpt), str(seven)])
    assert "the inputs have label 6" in capsys.readouterr().err
