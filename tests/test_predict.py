"""``medvit predict``: pixel scaling of 16-bit and float images, label columns, unreadable files,
inputs of another dataset than the checkpoint's, and every input format of issue #12 (DICOM,
NIfTI, mixed folders, CSV/TSV listings, ``--window``)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

import medvit.evaluate.predict as predict_module
from medvit.cli import main
from medvit.data.readers import load_image
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


# ------------------------------------------------------------ every input format of issue #12
DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CT = DICOM_DIR / "CT_small.dcm"  # CT, 128 px, rescaled to Hounsfield units, no window
MR = DICOM_DIR / "MR_small.dcm"  # MR, 64 px, window 600/1600
RT_PLAN = DICOM_DIR / "rtplan.dcm"  # a DICOM file without pixel data
NIFTI_3D = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"  # many slices


def expected_probs(ckpt: Path, images: list[np.ndarray]) -> np.ndarray:
    """The checkpoint's model applied by hand to 28 px grey uint8 images (mean 0.5, std 0.5)."""
    model, _ = predict_module.load_model(ckpt)
    x = torch.from_numpy(np.stack(images)).float()[:, None] / 255
    with torch.inference_mode():
        return model.eval().probabilities(model((x - 0.5) / 0.5)).numpy()


def probs_of(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[f"prob_{n}"]) for n in NAMES] for r in rows])


def save_nifti(path: Path, values: np.ndarray) -> Path:
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), path)
    return path


def test_dicom_and_nifti_files_are_predicted_as_readers_decode_them(ckpt, tmp_path):
    # A DICOM export named by UID, without a suffix: found by its DICM magic.
    shutil.copy(MR, tmp_path / "1.2.840.113619")
    ramp = np.linspace(-1000.0, 400.0, 40 * 50).reshape(40, 50).astype(np.float32)
    nifti = save_nifti(tmp_path / "slice.nii.gz", ramp)
    inputs = [CT, tmp_path / "1.2.840.113619", nifti]
    rows = predict(ckpt, [str(p) for p in inputs], tmp_path / "out.csv", device="cpu")
    assert [r["source"] for r in rows] == [str(p) for p in inputs]
    assert [r["error"] for r in rows] == ["", "", ""]
    images = [load_image(p, 28, 1) for p in inputs]
    assert all(image.shape == (28, 28) and image.std() > 10 for image in images)  # not blank
    np.testing.assert_allclose(probs_of(rows), expected_probs(ckpt, images), atol=2e-6)
    assert [r["prediction"] for r in rows] == [NAMES[int(p.argmax())] for p in probs_of(rows)]
    written = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [r["prob_malignant"] for r in written] == [str(r["prob_malignant"]) for r in rows]


def test_folder_mixing_formats_is_searched_recursively(ckpt, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), np.uint8)).save(folder / "a_rgb.png")
    shutil.copy(CT, folder / "b_ct.dcm")
    Image.fromarray(rng.integers(0, 65536, (28, 28)).astype(np.uint16)).save(folder / "c16.tiff")
    save_nifti(folder / "nested" / "d.nii", rng.normal(size=(20, 20)).astype(np.float32))
    shutil.copy(MR, folder / "nested" / "deeper" / "IM0001")  # DICOM magic, no suffix
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "nested" / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("path\na_rgb.png\n")  # a listing only when named
    out = tmp_path / "out.csv"
    main(["predict", "--ckpt_path", str(ckpt), str(folder), "-o", str(out)])
    rows = list(csv.DictReader(out.open()))
    files = [
        folder / "a_rgb.png",
        folder / "b_ct.dcm",
        folder / "c16.tiff",
        folder / "nested" / "d.nii",
        folder / "nested" / "deeper" / "IM0001",
    ]
    assert [r["source"] for r in rows] == [str(f) for f in files]
    assert list(rows[0])[:2] == ["source", "index"]  # no listing: the columns as before
    images = [load_image(f, 28, 1) for f in files]
    np.testing.assert_allclose(probs_of(rows), expected_probs(ckpt, images), atol=2e-6)


def test_csv_listing_keeps_paths_patient_ids_labels_and_other_columns(ckpt, tmp_path, capsys):
    (tmp_path / "data" / "img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("p1.png", "p2.png"):
        Image.fromarray(rng.integers(0, 256, (28, 28), np.uint8)).save(tmp_path / "data/img" / name)
    shutil.copy(CT, tmp_path / "data" / "img" / "ct.dcm")
    listing = tmp_path / "data" / "labels.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "patient_id", "label", "age", "index"])
        writer.writerow(["img/p1.png", "P7", "normal, benign", "61", "a"])
        writer.writerow(["img/ct.dcm", "P7", "malignant", "61", "b"])
        writer.writerow(["img/gone.png", "P9", "1", "48", "c"])  # an integer label: an index
        writer.writerow(["img/p2.png", "P9", "malignant", "48", "d"])
    out = tmp_path / "out.csv"
    main(["predict", "--ckpt_path", str(ckpt), str(listing), "-o", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:5] == ["source", "patient_id", "age", "input_index", "index"]
    assert [r["source"] for r in rows] == ["img/p1.png", "img/ct.dcm", "img/gone.png", "img/p2.png"]
    assert [r["patient_id"] for r in rows] == ["P7", "P7", "P9", "P9"]
    assert [r["age"] for r in rows] == ["61", "61", "48", "48"]
    assert [r["input_index"] for r in rows] == ["a", "b", "c", "d"]  # renamed, not overwritten
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["label"] for r in rows] == ["1", "0", "1", "0"]
    assert [r["label_name"] for r in rows] == [NAMES[1], NAMES[0], NAMES[1], NAMES[0]]
    # The missing file is reported in its row; the others are predicted.
    assert rows[2]["error"] == "cannot read image: file not found" and rows[2]["prediction"] == ""
    assert "1 of 4 files could not be read" in capsys.readouterr().err
    good = [rows[k] for k in (0, 1, 3)]
    images = [load_image(tmp_path / "data" / r["source"], 28, 1) for r in good]
    np.testing.assert_allclose(probs_of(good), expected_probs(ckpt, images), atol=2e-6)

    # A TSV without labels beside an image file: labels blank, listing columns blank elsewhere.
    tsv = tmp_path / "data" / "scans.tsv"
    tsv.write_text("path\tpatient_id\nimg/ct.dcm\tP7\n")
    rows = predict(ckpt, [str(tsv), str(tmp_path / "data/img/p1.png")], None, device="cpu")
    assert [(r["source"], r["patient_id"], r["label"]) for r in rows] == [
        ("img/ct.dcm", "P7", ""),
        (str(tmp_path / "data/img/p1.png"), "", ""),
    ]


def test_csv_labels_the_checkpoint_lacks_are_refused_unless_forced(ckpt, tmp_path, capsys):
    Image.fromarray(np.full((28, 28), 9, np.uint8)).save(tmp_path / "a.png")
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\na.png,pneumonia\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(ckpt), str(listing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown labels" in err and "a.png (pneumonia)" in err and "--force" in err
    rows = predict(ckpt, [str(listing)], tmp_path / "out.csv", device="cpu", force=True)
    assert (rows[0]["label"], rows[0]["input_label"], rows[0]["error"]) == ("", "pneumonia", "")
    # A listing without its path column stops before any work, naming the columns it has.
    (tmp_path / "bad.csv").write_text("file,label\na.png,malignant\n")
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ckpt), str(tmp_path / "bad.csv")])
    assert "missing columns" in (err := capsys.readouterr().err) and "file, label" in err


def test_16_bit_png_gives_the_probabilities_of_its_8_bit_equivalent(ckpt, tmp_path):
    eight = np.random.default_rng(2).integers(0, 256, (56, 56), np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    # v * 257 spans 0..65535 and maps back to v exactly (v * 257 * 255 / 65535 = v).
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I;16")
    rows = predict(ckpt, [str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png")], None)
    assert [r["prob_malignant"] for r in rows[:1]] == [r["prob_malignant"] for r in rows[1:]]
    resized = load_image(tmp_path / "eight.png", 28, 1)  # 56 -> 28 px, as training decodes
    np.testing.assert_allclose(probs_of(rows), expected_probs(ckpt, [resized] * 2), atol=2e-6)


def test_unreadable_files_of_every_kind_get_error_rows(ckpt, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(CT, folder / "a_ct.dcm")
    shutil.copy(RT_PLAN, folder / "b_plan.dcm")
    (folder / "c_empty.png").write_bytes(b"")
    (folder / "d_garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x07" * 50)
    shutil.copy(NIFTI_3D, folder / "e_volume.nii")
    Image.fromarray(np.full((28, 28), 70, np.uint8)).save(folder / "f.png")
    out = tmp_path / "out.csv"
    main(["predict", "--ckpt_path", str(ckpt), str(folder), "-o", str(out)])
    rows = {Path(r["source"]).name: r for r in csv.DictReader(out.open())}
    assert rows["b_plan.dcm"]["error"] == "cannot read image: DICOM file has no pixel data (RTPLAN)"
    assert rows["c_empty.png"]["error"] == "cannot read image: file is empty"
    assert rows["d_garbage.dcm"]["error"].startswith("cannot read image: ")
    assert "not 2D" in rows["e_volume.nii"]["error"]
    for bad in ("b_plan.dcm", "c_empty.png", "d_garbage.dcm", "e_volume.nii"):
        assert rows[bad]["prob_malignant"] == rows[bad]["prediction"] == ""
    good = [rows["a_ct.dcm"], rows["f.png"]]
    assert [r["error"] for r in good] == ["", ""]
    images = [load_image(folder / "a_ct.dcm", 28, 1), load_image(folder / "f.png", 28, 1)]
    np.testing.assert_allclose(probs_of(good), expected_probs(ckpt, images), atol=2e-6)
    assert "4 of 6 files could not be read" in capsys.readouterr().err


def test_window_option_changes_the_dicom_result(ckpt, tmp_path, capsys):
    out = {}
    for name, extra in (("own", []), ("soft", ["--window", "40,400"])):
        out[name] = tmp_path / f"{name}.csv"
        main(["predict", "--ckpt_path", str(ckpt), str(CT), "-o", str(out[name]), *extra])
    own, soft = (list(csv.DictReader(out[k].open())) for k in ("own", "soft"))
    np.testing.assert_allclose(
        probs_of(own), expected_probs(ckpt, [load_image(CT, 28, 1)]), 0, 2e-6
    )
    windowed = load_image(CT, 28, 1, window=(40, 400))
    assert not np.array_equal(windowed, load_image(CT, 28, 1))
    np.testing.assert_allclose(probs_of(soft), expected_probs(ckpt, [windowed]), 0, 2e-6)
    assert own[0]["prob_malignant"] != soft[0]["prob_malignant"]
    for bad in ("40", "40,0"):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "--ckpt_path", str(ckpt), str(CT), "--window", bad])
        assert exit_info.value.code == 2
        assert "window" in capsys.readouterr().err


def test_own_data_checkpoint_decodes_with_its_size_channels_and_window(tmp_path):
    """A checkpoint of other data than MedMNIST (no ``flag``): its datamodule's decode options."""
    torch.manual_seed(1)
    model = ViTClassifier(
        num_classes=2, in_chans=3, img_size=28, task="binary", class_names=NAMES, patch_size=7
    )
    ckpt = tmp_path / "own.ckpt"
    data_hp = {"path": "labels.csv", "size": 32, "in_chans": 1, "window": [40, 400]}
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "datamodule_hyper_parameters": data_hp,
        },
        ckpt,
    )
    colour = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), np.uint8)).save(colour)
    rows = predict(ckpt, [str(CT), str(colour)], None, device="cpu")
    assert [r["error"] for r in rows] == ["", ""]
    # Decoded grey at 32 px with the training window, then 28 px and 3 channels by the transform.
    decoded = [load_image(CT, 32, 1, window=(40, 400)), load_image(colour, 32, 1)]
    from medvit.data.transforms import build_transforms

    transform = build_transforms("none", 28, train=False, in_chans=3)
    x = torch.stack([transform(image) for image in decoded])
    with torch.inference_mode():
        expected = model.eval().probabilities(model(x)).numpy()
    np.testing.assert_allclose(probs_of(rows), expected, atol=2e-6)


def test_folder_of_class_folders_gives_labels(ckpt, tmp_path):
    root = tmp_path / "xrays"
    for split, cls in (("train", 1), ("test", 0), ("test", 1)):
        (root / split / NAMES[cls]).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), 50, np.uint8)).save(root / "train" / NAMES[1] / "t.png")
    Image.fromarray(np.full((28, 28), 80, np.uint8)).save(root / "test" / NAMES[0] / "a.png")
    shutil.copy(CT, root / "test" / NAMES[1] / "b.dcm")
    rows = predict(ckpt, [str(root / "test"), str(root)], None, device="cpu")
    by_source = [(Path(r["source"]).relative_to(root).as_posix(), r["label"]) for r in rows]
    assert by_source == [
        (f"test/{NAMES[0]}/a.png", 0),
        (f"test/{NAMES[1]}/b.dcm", 1),
        (f"test/{NAMES[0]}/a.png", 0),
        (f"test/{NAMES[1]}/b.dcm", 1),
        (f"train/{NAMES[1]}/t.png", 1),
    ]
    assert [r["label_name"] for r in rows[:2]] == NAMES
    # A folder that is not named after the checkpoint's classes everywhere stays unlabelled.
    (root / "test" / "unsure").mkdir()
    shutil.copy(MR, root / "test" / "unsure" / "c.dcm")
    rows = predict(ckpt, [str(root / "test")], None, device="cpu")
    assert len(rows) == 3 and [r["label"] for r in rows] == ["", "", ""]


def test_multilabel_listing_reads_one_column_per_class(tmp_path):
    findings = ["effusion", "nodule", "edema"]
    model = ViTClassifier(
        num_classes=3, in_chans=1, img_size=28, task="multilabel", class_names=findings,
        patch_size=7,
    )  # fmt: skip
    ckpt = tmp_path / "multi.ckpt"
    hp = {"path": "x.csv", "size": 28, "path_column": "image"}  # the path column it trained with
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
         "datamodule_hyper_parameters": hp},
        ckpt,
    )  # fmt: skip
    shutil.copy(CT, tmp_path / "ct.dcm")
    shutil.copy(MR, tmp_path / "mr.dcm")
    listing = tmp_path / "findings.csv"
    listing.write_text("image,nodule,edema,effusion,view\nct.dcm,1,0,1,AP\nmr.dcm,0,0,0,PA\n")
    rows = predict(ckpt, [str(listing)], None, device="cpu")
    assert [(r["label"], r["label_name"], r["view"]) for r in rows] == [
        ("0;1", "effusion;nodule", "AP"),
        ("", "", "PA"),
    ]
    images = [load_image(tmp_path / "ct.dcm", 28, 1), load_image(tmp_path / "mr.dcm", 28, 1)]
    x = (torch.from_numpy(np.stack(images)).float()[:, None] / 255 - 0.5) / 0.5
    with torch.inference_mode():
        expected = model.eval().probabilities(model(x)).numpy()
    got = np.array([[float(r[f"prob_{n}"]) for n in findings] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert [r["prediction"] for r in rows] == [
        ";".join(n for n, p in zip(findings, row, strict=True) if p >= 0.5) for row in expected
    ]


def test_window_values_are_checked_in_one_line():
    from medvit.evaluate.predict_inputs import check_window

    assert check_window(None) is None
    assert check_window("40,400") == check_window([40, 400]) == (40.0, 400.0)
    for bad in ("40", [40, 0], [40, float("nan")], "a,b", 40):
        with pytest.raises(ValueError, match="window"):
            check_window(bad)


def test_listing_columns_named_otherwise(ckpt, tmp_path):
    Image.fromarray(np.full((28, 28), 30, np.uint8)).save(tmp_path / "a.png")
    shutil.copy(MR, tmp_path / "b.dcm")
    listing = tmp_path / "list.tsv"
    listing.write_text(
        "file\tsubject\tdiagnosis\tpatient_id\na.png\tS1\tmalignant\told-1\nb.dcm\tS2\t1\told-2\n"
    )
    out = tmp_path / "out.csv"
    columns = [
        "--path_column",
        "file",
        "--label_column",
        "diagnosis",
        "--patient_column",
        "subject",
    ]
    main(["predict", "--ckpt_path", str(ckpt), str(listing), "-o", str(out), *columns])
    rows = list(csv.DictReader(out.open()))
    assert [(r["source"], r["patient_id"], r["input_patient_id"]) for r in rows] == [
        ("a.png", "S1", "old-1"),
        ("b.dcm", "S2", "old-2"),
    ]
    assert [(r["label"], r["error"]) for r in rows] == [("0", ""), ("1", "")]
    images = [load_image(tmp_path / "a.png", 28, 1), load_image(tmp_path / "b.dcm", 28, 1)]
    np.testing.assert_allclose(probs_of(rows), expected_probs(ckpt, images), atol=2e-6)
    # Only the path column must exist: a patient or label column named but absent is not used.
    rows = predict(ckpt, [str(listing)], None, columns={"path_column": "file", "label_column": "x"})
    assert [(r["patient_id"], r["label"], r["diagnosis"]) for r in rows] == [
        ("old-1", "", "malignant"),
        ("old-2", "", "1"),
    ]
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ckpt), str(listing)])  # no 'path' column


def test_decoding_in_worker_processes_gives_the_same_rows(ckpt, tmp_path):
    from conftest import make_medmnist_npz

    npz = make_medmnist_npz(tmp_path / "breastmnist.npz", "breastmnist", n=(2, 2, 3))
    shutil.copy(CT, tmp_path / "ct.dcm")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    inputs = [str(tmp_path / "ct.dcm"), str(tmp_path / "broken.png"), f"{npz}:test"]
    here = predict(ckpt, inputs, None, batch_size=2, device="cpu")
    workers = predict(ckpt, inputs, None, batch_size=2, device="cpu", num_workers=2)
    assert workers == here and len(here) == 5 and here[1]["error"].startswith("cannot read")
