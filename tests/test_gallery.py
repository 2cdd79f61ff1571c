"""The test-time gallery: which cases, their pictures (2D and 3D), and the files it leaves."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import short_breast_fit
from PIL import Image

from medvit import runs
from medvit.evaluate import case_plots
from medvit.evaluate.cases import misclassified_cases, ranked_cases
from medvit.evaluate.figures import figure_to_png
from medvit.train.gallery import TestGallery, case_sample, write_gallery_section


# ----------------------------------------------------------------------------- the fit
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A short BreastMNIST fit and test (synthetic file, 2 epochs); its run folder."""
    return short_breast_fit(tmp_path_factory.mktemp("gallery"))


def test_fit_writes_the_most_confident_misclassified_test_cases(fitted: Path):
    with np.load(fitted / runs.PREDICTIONS_FILE) as npz:
        probs, target, index = npz["probs"], npz["target"].astype(int), npz["index"]
        names = [str(n) for n in npz["class_names"]]
    predicted = probs.argmax(1)
    confidence = probs[np.arange(len(probs)), predicted]
    wrong = np.flatnonzero(predicted != target)
    assert len(wrong) > 0, "the short fit made no mistake: nothing to check"

    entries = json.loads((fitted / "gallery" / "misclassified.json").read_text())["entries"]
    assert entries == runs.read_gallery(fitted)["misclassified"]
    assert len(entries) == min(12, len(wrong))
    shown = []
    for entry in entries:
        (row,) = np.flatnonzero(index == entry["index"])
        assert predicted[row] != target[row], entry  # truly misclassified
        assert entry["true"] == names[target[row]]
        assert entry["predicted"] == names[predicted[row]]
        assert entry["probability"] == pytest.approx(confidence[row], abs=1e-6)
        assert entry["image"] == f"gallery/misclassified/test_{entry['index']:05d}.png"
        shown.append(row)
    # Most confident first, and none left out that is more confident than one shown.
    shown_conf = confidence[shown]
    assert list(shown_conf) == sorted(shown_conf, reverse=True)
    left_out = np.setdiff1d(wrong, shown)
    if len(left_out):
        assert confidence[left_out].max() <= shown_conf.min() + 1e-12
    # The pictures and nothing else: no temporary file left behind.
    folder = fitted / "gallery" / "misclassified"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        Path(e["image"]).name for e in entries
    )


def test_gallery_pictures_show_the_test_item_as_the_model_saw_it(fitted: Path):
    """Each picture is the rendering of that test item, un-normalised: the file's pixels."""
    from medvit.data.medmnist import MedMNISTDataModule

    data_root = fitted.parents[2] / "data"
    dm = MedMNISTDataModule(root=str(data_root), verify_md5=False, num_workers=0)
    dm.setup("test")
    with np.load(data_root / "breastmnist.npz") as npz:
        raw = npz["test_images"]
    for entry in runs.read_gallery(fitted)["misclassified"][:3]:
        sample = case_sample(dm.data_test, entry["index"], dm.hparams.mean, dm.hparams.std)
        assert sample.shape == (1, 28, 28)
        # Before normalisation: the stored uint8 image on the [0, 1] scale.
        np.testing.assert_allclose(sample[0] * 255, raw[entry["index"]], atol=0.01)
        title = f"true: {entry['true']} · predicted: {entry['predicted']}"
        assert (fitted / entry["image"]).read_bytes() == case_plots.case_png(sample, title)


@pytest.mark.slow
def test_a_ddp_test_writes_the_same_gallery_once(fitted: Path, tmp_path: Path):
    """``medvit test`` on 2 CPU processes: rank 0 writes the one-process gallery, nothing else."""
    out = tmp_path / "ddp-test"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    cmd = [sys.executable, "-m", "medvit", "test", "-c", str(fitted / "config.yaml")]
    cmd += [f"--ckpt_path={fitted / 'checkpoints' / 'best.ckpt'}", f"--run.dir={out}"]
    cmd += ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2
    one, two = (runs.read_gallery(d)["misclassified"] for d in (fitted, out))
    assert [e["index"] for e in two] == [e["index"] for e in one]
    for a, b in zip(one, two, strict=True):
        assert b["probability"] == pytest.approx(a["probability"], abs=1e-5)
        assert (out / b["image"]).read_bytes() == (fitted / a["image"]).read_bytes()
    # Nothing but each section's folder, its json and the pictures its entries name (the
    # explained section of the ExplainedGallery callback included), written once.
    sections = runs.read_gallery(out)
    expected = [name for s in sections for name in (s, f"{s}.json")]
    expected += [Path(e["image"]).name for entries in sections.values() for e in entries]
    assert sorted(p.name for p in (out / "gallery").rglob("*")) == sorted(expected)


# ----------------------------------------------------------------------------- selection
def test_multilabel_cases_are_ranked_by_their_largest_label_error():
    target = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    probs = np.array(
        [
            [0.9, 0.1, 0.1],  # correct
            [0.2, 0.3, 0.1],  # label 1 missed: error 0.7
            [0.1, 0.95, 0.8],  # label 1 false positive: error 0.95
            [0.6, 0.45, 0.2],  # label 1 missed: error 0.55
            [0.1, 0.1, 0.1],  # correct
        ]
    )
    preds = runs.Predictions(probs, target, ["a", "b", "c"], "multilabel", index=np.arange(5))
    cases = misclassified_cases(preds, 12)
    assert [c.index for c in cases] == [2, 1, 3]
    assert [c.score for c in cases] == pytest.approx([0.95, 0.7, 0.55])
    first = cases[0]
    assert (first.true, first.predicted) == ("c", "b; c")
    assert first.probability == pytest.approx(0.95)  # of the worst label, b
    assert "worst label b" in first.caption
    assert [c.index for c in ranked_cases(preds, wrong=False, n=5)] == [0, 4]
    assert [c.index for c in misclassified_cases(preds, 2)] == [2, 1]


def test_single_label_ties_go_to_the_lower_index_and_classes_can_be_chosen():
    probs = np.array([[0.2, 0.8], [0.75, 0.25], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])
    target = np.array([0, 1, 0, 1, 0])
    preds = runs.Predictions(probs, target, ["x", "y"], "binary", index=np.array([4, 3, 2, 1, 0]))
    assert [c.index for c in misclassified_cases(preds)] == [2, 4, 3]
    assert [c.index for c in ranked_cases(preds, wrong=True, n=5, true_class=1)] == [3]
    assert [c.index for c in ranked_cases(preds, wrong=False, n=5)] == [0, 1]
    with pytest.raises(ValueError, match="n must be"):
        ranked_cases(preds, wrong=True, n=-1)


# ----------------------------------------------------------------------------- 3D pictures
def _panels(fig) -> list[np.ndarray]:
    """The pixels inside each axes of a rendered figure, left to right (grey, uint8)."""
    png = figure_to_png(fig, dpi=int(fig.dpi))
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    out = []
    for ax in sorted(fig.axes, key=lambda a: a.get_window_extent().x0):
        box = ax.get_window_extent()
        top, bottom = grey.shape[0] - box.y1, grey.shape[0] - box.y0
        # 2 px in from the frame, which is drawn on the edge.
        out.append(grey[int(top) + 2 : int(bottom) - 2, int(box.x0) + 2 : int(box.x1) - 2])
    return out


@pytest.mark.parametrize(
    ("voxel", "panel", "where"),
    [
        # A mark in the mid axial plane only (d = D // 2): (row h, column w), from the top.
        ((10, 3, 20), 0, (3, 20)),
        # In the mid coronal plane only (h = H // 2): (row d from the bottom, column w).
        ((4, 12, 6), 1, (4, 6)),
        # In the mid sagittal plane only (w = W // 2): (row d from the bottom, column h).
        ((15, 5, 14), 2, (15, 5)),
    ],
)
def test_volume_slices_figure_shows_each_mid_slice_in_its_panel(voxel, panel, where):
    d, h, w = 20, 24, 28  # three different sides: a transposed slice would not fit its panel
    volume = np.full((1, d, h, w), 0.2, dtype=np.float32)
    volume[(0, *voxel)] = 1.0
    fig = case_plots.volume_slices_figure(volume, title="true: a · predicted: b")
    titles = [ax.get_title() for ax in sorted(fig.axes, key=lambda a: a.get_window_extent().x0)]
    assert titles == ["axial (D = 10)", "coronal (H = 12)", "sagittal (W = 14)"]
    panels = _panels(fig)
    sides = [(h, w), (d, w), (d, h)]
    for i, pixels in enumerate(panels):
        rows, cols = sides[i]
        # Each panel keeps its slice's aspect ratio.
        assert pixels.shape[1] / pixels.shape[0] == pytest.approx(cols / rows, rel=0.06)
        if i != panel:
            assert pixels.max() < 120, f"panel {i} shows the mark meant for panel {panel}"
            continue
        bright = np.argwhere(pixels > 200)
        assert len(bright), f"panel {i} lacks the mark"
        y, x = bright.mean(axis=0) / pixels.shape
        row, col = where
        expect_y = (row + 0.5) / rows if i == 0 else 1 - (row + 0.5) / rows  # bottom-up
        assert (y, x) == pytest.approx((expect_y, (col + 0.5) / cols), abs=0.04)
    # The same slices, as arrays and as the wandb thumbnail strip.
    slices = case_plots.mid_slices(volume)
    assert {k: v.shape for k, v in slices.items()} == {
        "axial": (1, h, w),
        "coronal": (1, d, w),
        "sagittal": (1, d, h),
    }
    strip = case_plots.slices_strip(volume)
    assert strip.shape == (max(h, d), w + w + h + 4) and strip.dtype == np.uint8
    assert int((strip == 255).sum()) == 1


def test_a_3d_case_is_drawn_as_slices_and_a_2d_one_as_an_image():
    rgb = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    image = Image.open(io.BytesIO(case_plots.case_png(rgb, "t")))
    volume = Image.open(io.BytesIO(case_plots.case_png(np.zeros((1, 8, 8, 8)), "t")))
    assert volume.width > 2 * volume.height  # three panels side by side
    assert 0.8 < image.width / image.height < 1.2
    normalised = (rgb - 0.5) / 0.25
    np.testing.assert_allclose(case_plots.denormalize(normalised, [0.5], [0.25]), rgb, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(C, D, H, W\)"):
        case_plots.denormalize(np.zeros((28, 28)))


# ----------------------------------------------------------------------------- the writer
class _Volumes:
    """A test split of (1, D, H, W) volumes, normalised with mean 0.5 and std 0.5."""

    def __init__(self, n: int) -> None:
        self.volumes = np.full((n, 1, 6, 8, 10), 0.3, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int):
        return (self.volumes[i] - 0.5) / 0.5, 0, i


def _trainer(tmp_path: Path, dataset, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        is_global_zero=rank_zero,
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        test_dataloaders=[SimpleNamespace(dataset=dataset)],
        datamodule=SimpleNamespace(hparams={"mean": None, "std": None}),
    )


def _module(probs: np.ndarray, target: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(
        test_predictions={"probs": probs, "target": target, "index": np.arange(len(target))},
        hparams={"class_names": ["a", "b", "c"], "task": "multiclass"},
    )


def test_writer_draws_volumes_as_slices_only_on_rank_zero_and_drops_stale_pictures(tmp_path):
    probs = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    target = np.array([0, 0, 1, 0])
    module = _module(probs, target)
    data = _Volumes(4)
    data.volumes[3, 0, 3, 4, :] = 1.0  # a bright row in case 3's mid axial slice

    gallery = TestGallery(max_cases=2)
    other = tmp_path / "rank1"
    gallery.setup(_trainer(other, data, rank_zero=False), module, "test")
    gallery.on_test_end(_trainer(other, data, rank_zero=False), module)
    assert not other.exists()  # only rank 0 writes

    stale = runs.gallery_image_path(tmp_path, "misclassified", "test_00099.png")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    trainer = _trainer(tmp_path, data)
    gallery.setup(trainer, module, "test")
    gallery.on_test_end(trainer, module)
    entries = runs.read_gallery(tmp_path)["misclassified"]
    assert [e["index"] for e in entries] == [3, 0]  # 0.8 before 0.7; case 2 (0.6) left out
    assert [(e["true"], e["predicted"]) for e in entries] == [("a", "c"), ("a", "b")]
    assert not stale.exists()
    with Image.open(tmp_path / entries[0]["image"]) as im:
        assert im.width > 2 * im.height  # the three slices side by side
    sample = case_sample(data, 3, None, None)
    expected = case_plots.case_png(sample, "true: a · predicted: c")
    assert (tmp_path / entries[0]["image"]).read_bytes() == expected

    # A test without mistakes leaves an empty section (the report says so), no old pictures.
    module = _module(np.eye(3)[[0, 0, 1, 0]], target)
    gallery.on_test_end(trainer, module)
    assert runs.read_gallery(tmp_path) == {"misclassified": []}
    assert list(stale.parent.iterdir()) == []


def test_a_first_test_without_mistakes_writes_an_empty_section(tmp_path):
    module = _module(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]))
    trainer = _trainer(tmp_path / "run", _Volumes(3))
    gallery = TestGallery()
    gallery.setup(trainer, module, "test")
    gallery.on_test_end(trainer, module)
    assert runs.read_gallery(tmp_path / "run") == {"misclassified": []}


def test_a_gallery_that_cannot_be_drawn_warns_instead_of_failing_the_run(tmp_path):
    module = _module(np.eye(3)[[1, 0]], np.array([0, 1]))
    trainer = _trainer(tmp_path, None)
    gallery = TestGallery()
    gallery.setup(trainer, module, "test")
    with pytest.warns(UserWarning, match="gallery of .* was not written: .*test_dataloaders"):
        gallery.on_test_end(trainer, module)
    assert runs.read_gallery(tmp_path) == {}
    with pytest.raises(ValueError, match="max_cases"):
        TestGallery(max_cases=-1)


def test_write_gallery_section_refuses_an_entry_without_its_picture(tmp_path):
    entry = {"image": "gallery/misclassified/x.png", "index": 0, "true": "a", "predicted": "b"}
    with pytest.raises(ValueError, match="lacks"):
        write_gallery_section(tmp_path, "misclassified", [entry])
    with pytest.raises(ValueError, match="is not a file"):
        write_gallery_section(tmp_path, "misclassified", [{**entry, "probability": 0.9}])
    assert not (tmp_path / "gallery" / "misclassified.json").exists()


def test_the_gallery_of_a_real_3d_test_split_shows_each_volume_as_the_model_saw_it(
    real_data, tmp_path
):
    """AdrenalMNIST3D's test split: the pictures are the volumes' mid slices, un-normalised."""
    from medvit.data.medmnist import MedMNISTDataModule

    dm = MedMNISTDataModule(
        flag="adrenalmnist3d",
        root=str(real_data),
        cache_dir=str(tmp_path / "cache"),
        num_workers=0,
        global_batch_size=8,
    )
    dm.setup("test")
    assert dm.spatial_dims == 3
    n = len(dm.data_test)
    rng = np.random.default_rng(0)
    p = rng.uniform(0.55, 0.95, n)
    target = dm.data_test.labels()[:, 0].astype(int)
    probs = np.where(target[:, None] == 0, np.c_[1 - p, p], np.c_[p, 1 - p])  # all wrong
    module = SimpleNamespace(
        test_predictions={"probs": probs, "target": target, "index": np.arange(n)},
        hparams={"class_names": dm.class_names, "task": "binary"},
    )
    trainer = _trainer(tmp_path / "run", None)
    trainer.test_dataloaders = [dm.test_dataloader()]
    trainer.datamodule = dm
    gallery = TestGallery(max_cases=3)
    gallery.setup(trainer, module, "test")
    gallery.on_test_end(trainer, module)
    entries = runs.read_gallery(tmp_path / "run")["misclassified"]
    assert [e["index"] for e in entries] == np.argsort(-p, kind="stable")[:3].tolist()
    with np.load(real_data / "adrenalmnist3d.npz") as npz:
        raw = npz["test_images"]
    for entry in entries:
        sample = case_sample(dm.data_test, entry["index"], dm.hparams.mean, dm.hparams.std)
        assert sample.shape == (1, 28, 28, 28)
        np.testing.assert_allclose(sample[0] * 255, raw[entry["index"]], atol=0.01)
        title = f"true: {entry['true']} · predicted: {entry['predicted']}"
        png = (tmp_path / "run" / entry["image"]).read_bytes()
        assert png == case_plots.case_png(sample, title)
        with Image.open(io.BytesIO(png)) as im:
            assert im.width > 2 * im.height
