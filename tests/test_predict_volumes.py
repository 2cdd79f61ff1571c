"""``medvit predict`` on volumes: NIfTI files, DICOM series folders, 3D npz splits, wrong dims."""

from __future__ import annotations

import numpy as np
import pytest
from lightning.fabric.utilities.data import AttributeDict
from PIL import Image
from volume_files import NIBABEL_DATA, write_nifti, write_series

from medvit.data.readers import ImageReadError
from medvit.data.volumes import load_volume
from medvit.evaluate.predict_inputs import Decoding, collect, decoding_for

VOLUMES = Decoding(size=12, in_chans=1, window=None, spatial_dims=3, spacing=(2.0, 2.0, 2.0))
IMAGES = Decoding(size=12, in_chans=1, window=None)


@pytest.fixture
def volume_inputs(tmp_path):
    """A NIfTI file, a series folder, a folder of volumes (one bad series) and a 3D npz."""
    nifti = write_nifti(tmp_path / "ct_001.nii.gz", np.random.default_rng(0).random((9, 10, 11)))
    series = write_series(tmp_path / "series_dir", 5)
    folder = tmp_path / "batch"
    write_series(folder / "a" / "s1", 4)
    bad = write_series(folder / "a" / "s2", 2)
    write_series(bad, 1, series_uid="1.2.3.9", names=["other.dcm"])
    write_nifti(folder / "b.nii.gz", np.ones((6, 6, 6), np.float32) * np.arange(6))
    rng = np.random.default_rng(1)
    npz = tmp_path / "vols.npz"
    np.savez(
        npz,
        test_images=rng.integers(0, 256, (3, 8, 8, 8), dtype=np.uint8),
        test_labels=np.array([[0], [1], [1]]),
    )
    return tmp_path, nifti, series, folder, npz


def test_volume_inputs_are_collected_as_volumes(volume_inputs):
    tmp_path, nifti, series, folder, npz = volume_inputs
    specs = [str(nifti), str(series), str(folder), f"{npz}:test"]
    items = collect(specs, VOLUMES, "binary", ["no", "yes"], force=False)
    sources = [i.source for i in items]
    assert sources == [
        str(nifti), str(series),  # a series folder is ONE input
        str(folder / "a" / "s1"), str(folder / "a" / "s2"), str(folder / "b.nii.gz"),
        "vols.npz:test", "vols.npz:test", "vols.npz:test",
    ]  # fmt: skip
    assert [i.label for i in items[-3:]] == [[0], [1], [1]]
    for item in (items[0], items[1], items[2], items[4], items[5]):
        cube = item.load()
        assert cube.shape == (12, 12, 12) and cube.dtype == np.uint8
    # decoded with the checkpoint's settings, exactly as the training cache does
    np.testing.assert_array_equal(items[0].load(), load_volume(nifti, 12, 2.0))
    with pytest.raises(ImageReadError, match="2 series"):  # reported in its row by predict
        items[3].load()


def test_wrong_dimensions_are_one_clear_error(volume_inputs, tmp_path):
    _, nifti, _, folder, npz = volume_inputs
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    with pytest.raises(ValueError, match="x.png is a 2D image, but the checkpoint is a 3D model"):
        collect([str(png)], VOLUMES, "binary", ["no", "yes"], force=False)
    with pytest.raises(
        ValueError, match="ct_001.nii.gz is a 3D volume, but the checkpoint is a 2D"
    ):
        collect([str(nifti)], IMAGES, "binary", ["no", "yes"], force=False)
    with pytest.raises(ValueError, match="are 3D volumes, but the checkpoint is a 2D model"):
        collect([f"{npz}:test"], IMAGES, "binary", ["no", "yes"], force=False)
    flat = tmp_path / "flat.npz"
    np.savez(flat, test_images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="are 2D images, but the checkpoint is a 3D model"):
        collect([str(flat)], VOLUMES, "binary", ["no", "yes"], force=False)
    only_images = tmp_path / "pngs"
    only_images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(only_images / "y.png")
    with pytest.raises(ValueError, match="No volumes"):
        collect([str(only_images)], VOLUMES, "binary", ["no", "yes"], force=False)


def test_class_folders_of_series_are_labelled(tmp_path):
    for c in ("no", "yes"):
        write_series(tmp_path / "data" / c / "p0", 3)
    items = collect([str(tmp_path / "data")], VOLUMES, "binary", ["no", "yes"], force=False)
    assert [i.label for i in items] == [0, 1]


def test_decoding_follows_the_checkpoint():
    hp = AttributeDict(spatial_dims=3, in_chans=1, img_size=28)
    data_hp = {"size": 32, "spacing": [1.5, 1.0, 1.0], "window": "40,400", "crop_pad": True}
    expected = Decoding(32, 1, (40.0, 400.0), 3, (1.5, 1.0, 1.0), crop_pad=True)
    assert decoding_for(hp, data_hp, None) == expected
    assert decoding_for(hp, data_hp, (0, 100)).window == (0.0, 100.0)
    flat = decoding_for(AttributeDict(in_chans=3, img_size=28), {"size": 28}, None)
    assert flat.spatial_dims == 2 and flat.spacing is None and flat.in_chans == 3


def test_nibabel_volume_in_a_listing(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,label\n{NIBABEL_DATA / 'anatomical.nii'},yes\n")
    (item,) = collect([str(listing)], VOLUMES, "binary", ["no", "yes"], force=False)
    assert item.label == 1 and item.load().shape == (12, 12, 12)


@pytest.mark.slow
def test_fit_on_volumes_csv_then_predict_volumes(tmp_path, capsys):
    """``medvit fit -c adrenalmnist3d.yaml --data ImageDataModule --data.path volumes.csv``, then
    ``medvit predict`` on a NIfTI file, a series folder, a folder with a bad series and a 3D npz."""
    from conftest import short_trainer_args

    from medvit import runs
    from medvit.cli import main

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(16):
        if i % 4 == 0:
            write_series(root / f"series{i}", 4)
            rows.append(f"series{i},{'yes' if i % 8 else 'no'}")
        else:
            values = rng.random((10, 12, 9)).astype(np.float32) + (i % 2)
            write_nifti(root / f"vol{i}.nii.gz", values, (1.0, 1.0, 2.0))
            rows.append(f"vol{i}.nii.gz,{'yes' if i % 2 else 'no'}")
    (root / "volumes.csv").write_text("\n".join(rows) + "\n")
    main(
        ["fit", "-c", "configs/experiment/adrenalmnist3d.yaml", "--data", "ImageDataModule",
         f"--data.path={root / 'volumes.csv'}", "--data.size=16", "--data.spacing=2",
         f"--data.cache_dir={tmp_path / 'cache'}", f"--run.root={tmp_path / 'runs'}",
         "--data.decode_workers=0",
         *short_trainer_args(1, batch_size=4, verify_md5=True, patch_size=None)]
    )  # fmt: skip
    (run_dir,) = (tmp_path / "runs" / "volumes_16").iterdir()
    assert runs.read_metrics(run_dir)["test"]["auroc"] >= 0
    (ckpt,) = (run_dir / "checkpoints").glob("best*.ckpt")

    batch = tmp_path / "batch"
    write_series(batch / "good", 4)
    broken = write_series(batch / "broken", 2)
    write_series(broken, 1, rows=10, names=["big.dcm"])
    npz = tmp_path / "vols.npz"
    np.savez(npz, test_images=rng.integers(0, 256, (2, 16, 16, 16), dtype=np.uint8))
    out = tmp_path / "predictions.csv"
    main(["predict", f"--ckpt_path={ckpt}", str(root / "vol1.nii.gz"), str(root / "series0"),
          str(batch), f"{npz}:test", "-o", str(out)])  # fmt: skip
    table = [line.split(",") for line in out.read_text().splitlines()]
    header, body = table[0], table[1:]
    col = {h: i for i, h in enumerate(header)}
    assert [r[col["source"]] for r in body] == [
        str(root / "vol1.nii.gz"), str(root / "series0"),
        str(batch / "broken"), str(batch / "good"), "vols.npz:test", "vols.npz:test",
    ]  # fmt: skip
    for r in body:
        broken_row = r[col["source"]].endswith("broken")
        assert (r[col["prediction"]] == "") == broken_row
        if broken_row:
            assert "slices of different sizes" in r[col["error"]]
        else:
            p = float(r[col["prob_no"]]) + float(r[col["prob_yes"]])
            assert abs(p - 1) < 1e-4 and r[col["prediction"]] in ("no", "yes")
    # medvit explain takes the same volume inputs: 3D maps at the decode size, one overlay each
    explained = tmp_path / "explain"
    main(["explain", f"--ckpt_path={ckpt}", str(root / "vol1.nii.gz"), str(root / "series0"),
          "-o", str(explained), "--method", "rollout"])  # fmt: skip
    maps = np.load(explained / "maps.npz")
    assert maps["maps"].shape == (2, 16, 16, 16)
    assert np.isfinite(maps["maps"]).all() and maps["maps"].min() >= 0 and maps["maps"].max() <= 1
    assert len(list(explained.glob("*.png"))) == 2
    # a 2D image given to the 3D checkpoint is one error, not rows
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", f"--ckpt_path={ckpt}", str(png)])
    assert "x.png is a 2D image, but the checkpoint is a 3D model" in capsys.readouterr().err
