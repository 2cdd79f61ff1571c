"""ImageDataModule: own images from a folder or a CSV, the decode cache, bad files, splits, CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from conftest import short_trainer_args
from PIL import Image

from medvit import runs
from medvit.cli import main
from medvit.data import decode
from medvit.data.files import release_caches
from medvit.data.images import ImageDataModule
from medvit.data.readers import load_image
from medvit.data.sources import DataSourceError
from medvit.train.cli import MedViTCLI, data_class_requested

ROOT = Path(__file__).resolve().parents[1]
DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"  # files inside pydicom's wheel
RECIPE = str(ROOT / "configs" / "experiment" / "breastmnist.yaml")


@pytest.fixture(autouse=True)
def _release():
    yield
    release_caches()  # let the next test's prune delete this one's caches


def square_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A grey image with a bright square where its class says: learnable in an epoch or two."""
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    q = size // 2
    r, c = divmod(label, 2)
    image[r * q : (r + 1) * q, c * q : (c + 1) * q] = 255
    return image


def class_folders(root: Path, classes=("benign", "malignant"), per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(square_image(k, rng)).save(root / name / f"{i:03d}.png")
    return root


def patient_csv(tmp: Path, patients: int = 16, per_patient: int = 3) -> Path:
    """``labels.csv`` of PNGs, several per patient, label per patient, no split column."""
    rng = np.random.default_rng(1)
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients):
        label = p % 2
        for j in range(per_patient):
            name = f"img/p{p:02d}_{j}.png"
            Image.fromarray(square_image(label, rng)).save(tmp / name)
            rows.append({"path": name, "label": ["normal", "tumour"][label], "patient_id": f"P{p}"})
    with open(tmp / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp / "labels.csv"


def module(path: Path, tmp: Path, **kwargs) -> ImageDataModule:
    kwargs = {"size": 16, "num_workers": 0, "decode_workers": 0, "global_batch_size": 4, **kwargs}
    return ImageDataModule(str(path), cache_dir=str(tmp / "cache"), **kwargs)


def count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = decode.load_image

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decode, "load_image", counting)
    return calls


# ------------------------------------------------------------------------------- the module
def test_folder_infers_task_classes_channels_and_makes_a_split(tmp_path: Path) -> None:
    data = module(class_folders(tmp_path / "imgs", ("a", "b", "c")), tmp_path, size=20)
    assert (data.task, data.class_names, data.num_classes) == ("multiclass", ["a", "b", "c"], 3)
    assert (data.in_chans, data.img_size, data.dataset_name) == (1, 20, "imgs")
    data.prepare_data()
    data.setup()
    sizes = {s: len(d) for s, d in (("train", data.data_train), ("val", data.data_val))}
    assert sizes["train"] + sizes["val"] + len(data.data_test) == 36
    assert len(data.data_test) == pytest.approx(36 * 0.2, abs=2)
    counts = data.class_counts("train")
    assert counts.sum() == len(data.data_train) and counts.max() - counts.min() <= 1  # stratified
    image, target, index = data.data_train[0]
    assert tuple(image.shape) == (1, 20, 20) and int(target) in (0, 1, 2) and index == 0
    arrays = np.load(data._folder / "train_images.npy", mmap_mode="r")
    assert (
        isinstance(arrays, np.memmap) and arrays.dtype == np.uint8 and arrays.shape[1:] == (20, 20)
    )


def test_csv_grades_and_findings_give_ordinal_and_multilabel_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = [["path", "grade", "effusion", "nodule", "split"]]
    for i in range(16):
        Image.fromarray(square_image(i % 4, rng)).save(tmp_path / f"{i}.png")
        split = ("train", "train", "val", "test")[i // 4]  # every grade and finding in each
        rows.append([f"{i}.png", i % 4, i % 2, (i // 2) % 2, split])
    with open(tmp_path / "all.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    graded = module(tmp_path / "all.csv", tmp_path, task="ordinal", label_column="grade")
    assert (graded.task, graded.class_names) == ("ordinal", ["0", "1", "2", "3"])
    findings = module(tmp_path / "all.csv", tmp_path, label_columns=["effusion", "nodule"])
    assert (findings.task, findings.num_classes) == ("multilabel", 2)
    findings.prepare_data()
    findings.setup()
    labels = np.load(findings._folder / "train_labels.npy")
    assert labels.shape == (findings._split_sizes["train"], 2) and set(np.unique(labels)) == {0, 1}
    assert findings.class_counts("train").tolist() == labels.sum(0).tolist()
    image, target, _ = findings.data_train[0]
    assert target.dtype.is_floating_point and tuple(target.shape) == (2,)


def test_colour_images_give_three_channels_and_in_chans_1_greys_them(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for name in ("x", "y"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    assert module(root, tmp_path).in_chans == 3
    grey = module(root, tmp_path, in_chans=1)
    grey.prepare_data()
    assert np.load(grey._folder / "train_images.npy").shape[1:] == (16, 16)


def test_cache_is_reused_and_rebuilt_when_a_file_or_an_option_changes(
    tmp_path: Path, monkeypatch
) -> None:
    folder = class_folders(tmp_path / "imgs", per_class=6)
    calls = count_decodes(monkeypatch)
    first = module(folder, tmp_path)
    first.prepare_data()
    assert len(calls) == 12 and (first._folder / "complete").is_file()
    again = module(folder, tmp_path)
    again.prepare_data()
    assert again._folder == first._folder and len(calls) == 12  # reused, nothing decoded
    release_caches()

    touched = folder / "benign" / "000.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after_touch = module(folder, tmp_path)
    after_touch.prepare_data()
    assert after_touch._folder != first._folder and len(calls) == 24
    assert not first._folder.exists()  # the source's older cache was deleted
    release_caches()

    bigger = module(folder, tmp_path, size=24)
    bigger.prepare_data()
    assert bigger._folder != after_touch._folder and len(calls) == 36
    assert np.load(bigger._folder / "train_images.npy").shape[1:] == (24, 24)
    windowed = module(folder, tmp_path, size=24, window="40,400")
    windowed.prepare_data()
    assert windowed._folder != bigger._folder and len(calls) == 48


def test_decoding_in_several_processes_gives_the_same_arrays(tmp_path: Path) -> None:
    folder = class_folders(tmp_path / "imgs", per_class=40)  # over the pool's minimum
    alone = module(folder, tmp_path / "one")
    alone.prepare_data()
    pooled = module(folder, tmp_path / "two", decode_workers=2)
    pooled.prepare_data()
    for name in ("train_images", "test_labels", "val_images"):
        a = np.load(alone._folder / f"{name}.npy")
        assert np.array_equal(a, np.load(pooled._folder / f"{name}.npy")) and len(a)


def test_an_interrupted_build_is_never_reused(tmp_path: Path, monkeypatch) -> None:
    folder = class_folders(tmp_path / "imgs", per_class=6)
    calls = count_decodes(monkeypatch)
    real = decode.load_image

    def dies(path, *args, **kwargs):
        if len(calls) >= 5:
            raise KeyboardInterrupt  # Ctrl-C halfway through decoding
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decode, "load_image", dies)
    with pytest.raises(KeyboardInterrupt):
        module(folder, tmp_path).prepare_data()
    images = tmp_path / "cache" / decode.IMAGES_DIR
    assert list(images.iterdir()) == [images / ".imgs.unpack.lock"]  # nothing half-written

    # What a kill -9 leaves: the build's temporary folder, and a final-named folder without
    # its complete marker. Neither is used; the next build decodes every file again.
    data = module(folder, tmp_path)
    key = decode.cache_key(
        data.table.paths, data.table.labels, data._splits(data.table), 16, 1, None
    )
    partial = images / f"imgs-{key[:16]}.k9x2"
    unmarked = images / f"imgs-{key[:16]}"
    for leftover in (partial, unmarked):
        leftover.mkdir()
        np.save(leftover / "train_images.npy", np.zeros((1, 16, 16), np.uint8))
    monkeypatch.setattr(decode, "load_image", real)
    calls = count_decodes(monkeypatch)
    data.prepare_data()
    assert data._folder == unmarked and (unmarked / "complete").is_file() and len(calls) == 12
    assert not partial.exists()
    assert np.load(unmarked / "train_images.npy").shape[0] == data._split_sizes["train"] > 1


BAD = {  # file -> the kind of problem the one error lists it under
    "img/missing.png": "missing files",
    "img/empty.png": "empty files",
    "img/corrupt.png": "unreadable files",
    "img/plan.dcm": "DICOM files without pixel data",
    "img/cine.dcm": "multi-frame files",
}


def bad_csv(tmp: Path) -> Path:
    """A CSV of 12 good PNGs plus one bad file of each kind in ``BAD``."""
    path = patient_csv(tmp, patients=6, per_patient=2)
    (tmp / "img" / "empty.png").write_bytes(b"")
    (tmp / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    shutil.copyfile(DICOM_DIR / "rtplan.dcm", tmp / "img" / "plan.dcm")  # no pixel data
    shutil.copyfile(DICOM_DIR / "examples_ybr_color.dcm", tmp / "img" / "cine.dcm")  # 30 frames
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        for i, name in enumerate(BAD):
            writer.writerow([name, ["normal", "tumour"][i % 2], f"P{i}"])
    return path


def test_bad_files_are_one_error_listing_each_before_training(tmp_path: Path) -> None:
    data = module(bad_csv(tmp_path), tmp_path)
    data.run_dir = tmp_path / "run"
    with pytest.raises(DataSourceError) as err:
        data.prepare_data()
    assert not data.run_dir.exists()  # nothing written for a run that cannot start
    text = str(err.value)
    lines = {line.strip(" -").split(" [")[0].split(" (")[0]: line for line in text.splitlines()}
    for name, kind in BAD.items():
        assert name in lines[kind] and "[1]" in lines[kind]  # each kind, its file and count
    assert "5 problems" in text and "--data.on_bad_file skip" in text


def test_on_bad_file_skip_trains_without_them_and_lists_them(tmp_path: Path) -> None:
    data = module(bad_csv(tmp_path), tmp_path, on_bad_file="skip")
    data.run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="5 bad file"):
        data.prepare_data()
    data.setup()
    assert sum(data._split_sizes.values()) == 12
    skipped = dict(runs.read_skipped_files(data.run_dir / runs.SKIPPED_FILE))
    assert set(skipped) == set(BAD)
    assert skipped["img/missing.png"] == "missing files" and "image" in skipped["img/corrupt.png"]
    assert "no pixel data" in skipped["img/plan.dcm"] and "30 frames" in skipped["img/cine.dcm"]
    manifest = json.loads((data._folder / decode.MANIFEST).read_text())
    kept = [p for paths in manifest["paths"].values() for p in paths]
    assert len(kept) == 12 and not any(p.endswith(tuple(BAD)) for p in kept)


def test_made_split_keeps_patients_together_is_written_and_read_back(tmp_path: Path) -> None:
    csv_path = patient_csv(tmp_path, patients=20, per_patient=3)
    data = module(csv_path, tmp_path, split_seed=3)
    data.run_dir = tmp_path / "run"
    data.prepare_data()
    written = runs.read_splits(data.run_dir / runs.SPLITS_FILE)
    assert len(written) == 60 and set(written.values()) == {"train", "val", "test"}
    with open(data.run_dir / runs.SPLITS_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    split_of_patient: dict[str, set[str]] = {}
    for row in rows:
        split_of_patient.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_patient.values())  # no patient in two splits
    for split in ("train", "val", "test"):
        names, patients = data.split_samples(split)
        assert len(names) == data._split_sizes[split] > 0
        assert {written[n] for n in names} == {split}
        assert {next(iter(split_of_patient[p])) for p in patients} == {split}

    # A resume reads the run's split back, even when it differs from what the seed would make.
    moved = next(r["patient_id"] for r in rows if r["split"] == "train")
    for row in rows:
        if row["patient_id"] == moved:
            row["split"] = "test"
    paths = [r["path"] for r in rows]
    splits = np.array([r["split"] for r in rows])
    runs.write_splits(
        data.run_dir / runs.SPLITS_FILE, paths, splits, [r["patient_id"] for r in rows]
    )
    resumed = module(csv_path, tmp_path, split_seed=3)
    resumed.run_dir = data.run_dir
    resumed.prepare_data()
    assert resumed._split_sizes["test"] == data._split_sizes["test"] + 3
    assert resumed._split_sizes["train"] == data._split_sizes["train"] - 3


def test_explicit_split_column_is_used_as_given(tmp_path: Path) -> None:
    csv_path = patient_csv(tmp_path, patients=8, per_patient=2)
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        row["split"] = ["train", "train", "val", "test"][(i // 2) % 4]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    data = module(csv_path, tmp_path)
    data.prepare_data()
    assert data._split_sizes == {"train": 8, "val": 4, "test": 4}
    manifest = json.loads((data._folder / decode.MANIFEST).read_text())
    want = [str(tmp_path / r["path"]) for r in rows if r["split"] == "val"]
    assert manifest["paths"]["val"] == want  # the CSV's order within a split


def test_dicom_files_in_a_csv_decode_with_the_window_override(tmp_path: Path) -> None:
    """Real CT and MR files from pydicom; --data.window replaces their own display window."""
    rows = [["path", "label", "split"]]
    for name, label in (("CT_small.dcm", "ct"), ("MR_small.dcm", "mr")):
        for i, split in enumerate(("train", "train", "val", "test")):
            shutil.copyfile(DICOM_DIR / name, tmp_path / f"{label}{i}.dcm")
            rows.append([f"{label}{i}.dcm", label, split])
    with open(tmp_path / "scans.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    own = module(tmp_path / "scans.csv", tmp_path)
    own.prepare_data()
    windowed = module(tmp_path / "scans.csv", tmp_path, window="40,400")
    windowed.prepare_data()
    assert own.in_chans == 1 and own.class_names == ["ct", "mr"]
    assert own._split_sizes == {"train": 4, "val": 2, "test": 2}
    first = tmp_path / "ct0.dcm"
    for data, window in ((own, None), (windowed, (40.0, 400.0))):
        train = np.load(data._folder / "train_images.npy")
        np.testing.assert_array_equal(train[0], load_image(first, 16, 1, window))
    assert not np.array_equal(
        np.load(own._folder / "train_images.npy")[0],
        np.load(windowed._folder / "train_images.npy")[0],
    )


# ---------------------------------------------------------------------------------- the CLI
class ParseOnly(MedViTCLI):
    def instantiate_classes(self) -> None:
        pass


def test_data_class_is_selected_by_name_or_by_a_config(tmp_path: Path) -> None:
    assert not data_class_requested(["fit", "-c", RECIPE, "--data.flag", "pneumoniamnist"])
    assert data_class_requested(["fit", "-c", RECIPE, "--data", "ImageDataModule"])
    assert data_class_requested(["fit", "--data=medvit.data.images.ImageDataModule"])
    config = ParseOnly(
        args=["-c", RECIPE, "--data", "ImageDataModule", "--data.path", "x.csv"], run=False
    ).config
    assert config.data.class_path == "medvit.data.images.ImageDataModule"
    # The recipe's arguments both classes have carry over; its flag does not.
    assert config.data.init_args.path == "x.csv" and config.data.init_args.size == 28
    assert config.data.init_args.global_batch_size == 16 and "flag" not in config.data.init_args
    for source in ("folder", "csv"):
        extra = ROOT / "configs" / "data" / f"{source}.yaml"
        assert data_class_requested(["fit", "-c", RECIPE, "-c", str(extra)])
        parsed = ParseOnly(args=["-c", RECIPE, "-c", str(extra)], run=False).config
        assert parsed.data.class_path.endswith("ImageDataModule")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"data": {"class_path": "ImageDataModule"}}))
    assert data_class_requested(["test", "-c", str(saved)])


def test_cli_links_the_image_data_to_the_model(tmp_path: Path) -> None:
    folder = class_folders(tmp_path / "imgs", ("a", "b", "c"), per_class=4)
    cli = MedViTCLI(
        args=["-c", RECIPE, "--data", "ImageDataModule", f"--data.path={folder}",
              f"--data.cache_dir={tmp_path / 'cache'}", f"--run.root={tmp_path / 'runs'}",
              "--data.size=32", "--model.patch_size=8"],
        run=False,
    )  # fmt: skip
    assert isinstance(cli.datamodule, ImageDataModule)
    hp = cli.model.hparams
    assert (hp.task, hp.num_classes, hp.class_names) == ("multiclass", 3, ["a", "b", "c"])
    assert (hp.in_chans, hp.img_size) == (1, 32)
    assert cli.datamodule.run_dir == cli.run_dir and cli.run_dir.parent.name == "imgs_32"


def test_fit_on_a_folder_of_class_folders_end_to_end(tmp_path: Path) -> None:
    folder = class_folders(tmp_path / "imgs", per_class=12)
    main(
        ["fit", "-c", RECIPE, "--data", "ImageDataModule", f"--data.path={folder}",
         f"--data.cache_dir={tmp_path / 'cache'}", f"--run.root={tmp_path / 'runs'}",
         "--data.positive_class=malignant",
         *short_trainer_args(1, batch_size=8, verify_md5=True)]
    )  # fmt: skip
    (run_dir,) = (tmp_path / "runs" / "imgs").iterdir()
    metrics = runs.read_metrics(run_dir)
    assert metrics["positive_class"] == "malignant" and 0 <= metrics["test"]["auroc"] <= 1
    splits = runs.read_splits(run_dir / runs.SPLITS_FILE)
    assert len(splits) == 24 and splits["benign/000.png"] in ("train", "val", "test")
    config = runs.read_yaml(run_dir / runs.CONFIG_FILE)
    assert config["data"]["class_path"] == "medvit.data.images.ImageDataModule"
    predictions = runs.read_predictions(run_dir / runs.PREDICTIONS_FILE)
    assert list(predictions.class_names) == ["benign", "malignant"]
    assert len(predictions.target) == sum(1 for s in splits.values() if s == "test")


def test_resume_and_test_use_the_split_the_run_made(tmp_path: Path) -> None:
    """A made split is read back from the run folder, whatever split_seed says now."""
    csv_path = patient_csv(tmp_path, patients=12, per_patient=2)
    quick = short_trainer_args(1, batch_size=4, verify_md5=True)
    cache = f"--data.cache_dir={tmp_path / 'cache'}"
    main(["fit", "-c", RECIPE, "--data", "ImageDataModule", f"--data.path={csv_path}", cache,
          f"--run.root={tmp_path / 'runs'}", "--data.split_seed=1", *quick])  # fmt: skip
    (run_dir,) = (tmp_path / "runs" / "labels").iterdir()
    made = runs.read_splits(run_dir / runs.SPLITS_FILE)
    other_seed = "--data.split_seed=2"  # would make another split of these 12 patients
    main(["fit", "-c", str(run_dir / runs.CONFIG_FILE), cache, other_seed, *quick,
          "--trainer.max_epochs=2", f"--ckpt_path={runs.last_checkpoint(run_dir)}"])  # fmt: skip
    assert runs.read_splits(run_dir / runs.SPLITS_FILE) == made
    main(["test", "-c", str(run_dir / runs.CONFIG_FILE), cache, other_seed,
          f"--ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"])  # fmt: skip
    (tested,) = [d for d in (tmp_path / "runs" / "labels").iterdir() if d.name.endswith("-test")]
    assert runs.read_splits(tested / runs.SPLITS_FILE) == made
    predictions = runs.read_predictions(tested / runs.PREDICTIONS_FILE)
    assert len(predictions.target) == sum(1 for s in made.values() if s == "test")


# ---------------------------------------------------------------- the equivalence with .npz
@pytest.mark.slow
def test_pngs_listed_in_a_csv_train_exactly_as_the_npz(real_data: Path, tmp_path: Path) -> None:
    """BreastMNIST exported to PNG files + a CSV of the official splits: same metrics."""
    from medmnist import INFO

    names = [INFO["breastmnist"]["label"][str(i)] for i in range(2)]
    out = tmp_path / "breast_png"
    rows = []
    with np.load(real_data / "breastmnist.npz") as npz:
        for split in ("train", "val", "test"):
            (out / split).mkdir(parents=True)
            for i, (image, label) in enumerate(
                zip(npz[f"{split}_images"], npz[f"{split}_labels"][:, 0], strict=True)
            ):
                Image.fromarray(image).save(out / split / f"{i:04d}.png")
                rows.append([f"{split}/{i:04d}.png", names[label], split])
    with open(out / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "split"], *rows])

    common = short_trainer_args(1, train_batches=6, batch_size=16, verify_md5=True)
    main(["fit", "-c", RECIPE, f"--data.root={real_data}", f"--data.cache_dir={tmp_path / 'c1'}",
          f"--run.dir={tmp_path / 'npz'}", *common])  # fmt: skip
    main(["fit", "-c", RECIPE, "--data", "ImageDataModule", f"--data.path={out / 'labels.csv'}",
          "--data.modality=ultrasound", "--data.positive_class=malignant",
          f"--data.cache_dir={tmp_path / 'c2'}", f"--run.dir={tmp_path / 'png'}", *common])  # fmt: skip
    npz_metrics = runs.read_metrics(tmp_path / "npz")
    png_metrics = runs.read_metrics(tmp_path / "png")
    for stage in ("val", "test"):
        a, b = npz_metrics[stage], png_metrics[stage]
        assert a.keys() == b.keys() and len(a) > 5
        for key in a:
            same = (math.isnan(a[key]) and math.isnan(b[key])) or abs(a[key] - b[key]) <= 1e-6
            assert same, f"{stage}/{key}: npz {a[key]} vs png {b[key]}"
    assert png_metrics["positive_class"] == npz_metrics["positive_class"] == "malignant"
