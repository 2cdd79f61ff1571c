"""Volumes: NIfTI (nibabel's own test files), synthetic DICOM series, MONAI resampling, HU windows,
and ImageDataModule decoding them into (N, D, H, W) uint8 cubes."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest
from PIL import Image
from volume_files import NIBABEL_DATA, write_nifti, write_series

from medvit.data.decode import MANIFEST
from medvit.data.images import ImageDataModule
from medvit.data.readers import ImageReadError
from medvit.data.sources import DataSourceError, load_table
from medvit.data.volumes import (
    item_dims,
    load_volume,
    parse_spacing,
    read_volume,
    resample,
    to_uint8_volume,
)

# ------------------------------------------------------------------------------ NIfTI


def test_nibabel_anatomical_reads_canonical_zyx_with_spacing():
    path = NIBABEL_DATA / "anatomical.nii"
    volume = read_volume(path)
    image = nibabel.as_closest_canonical(nibabel.load(path))
    assert volume.values.shape == (25, 41, 33)  # (z, y, x) of a (33, 41, 25) file
    assert volume.values.dtype == np.float32
    assert volume.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(volume.values, image.get_fdata().transpose(2, 1, 0))
    cube = load_volume(path, 28)
    assert cube.shape == (28, 28, 28) and cube.dtype == np.uint8
    assert cube.min() == 0 and cube.max() == 255


def test_flipped_nifti_reads_the_same_volume(tmp_path):
    """An LAS file and its RAS copy (x flipped in data and affine) give one canonical volume."""
    image = nibabel.load(NIBABEL_DATA / "anatomical.nii")
    data = np.asarray(image.dataobj, dtype=np.float32)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = data.shape[0] - 1
    flipped = nibabel.Nifti1Image(data[::-1].copy(), image.affine @ flip)
    nibabel.save(flipped, tmp_path / "flipped.nii.gz")
    assert nibabel.aff2axcodes(flipped.affine) != nibabel.aff2axcodes(image.affine)
    np.testing.assert_array_equal(
        read_volume(tmp_path / "flipped.nii.gz").values,
        read_volume(NIBABEL_DATA / "anatomical.nii").values,
    )


@pytest.mark.parametrize(("name", "count"), [("example4d.nii.gz", 2), ("functional.nii", 20)])
def test_nifti_time_series_is_refused(name, count):
    with pytest.raises(ImageReadError, match=f"holds {count} volumes") as info:
        load_volume(NIBABEL_DATA / name, 16)
    assert info.value.kind == "dimensions" and name in str(info.value)


@pytest.mark.parametrize("extra", [(1,), (1, 1)])
def test_4d_nifti_with_one_volume_is_a_volume(tmp_path, extra):
    values = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, *extra)
    path = write_nifti(tmp_path / "one.nii.gz", values)
    volume = read_volume(path).values
    np.testing.assert_array_equal(volume, values.reshape(4, 5, 6).transpose(2, 1, 0))


def test_2d_files_are_refused_where_a_volume_is_expected(tmp_path):
    flat = write_nifti(tmp_path / "flat.nii.gz", np.ones((8, 9, 1), np.float32))
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    for path in (flat, png):
        with pytest.raises(ImageReadError, match="2D image") as info:
            load_volume(path, 8)
        assert info.value.kind == "dimensions" and path.name in str(info.value)
    assert item_dims(flat) == 2 and item_dims(png) == 2
    assert item_dims(NIBABEL_DATA / "anatomical.nii") == 3


def test_nan_voxels_are_refused():
    # nibabel ships a resampled volume whose outside is NaN
    with pytest.raises(ImageReadError, match="NaN"):
        load_volume(NIBABEL_DATA / "resampled_anat_moved.nii", 8)


# -------------------------------------------------------------------------- DICOM series


def test_dicom_series_sorted_by_position_not_file_order(tmp_path):
    ordered = write_series(tmp_path / "ordered", 6)
    shuffled = write_series(
        tmp_path / "shuffled", 6, names=["b.dcm", "e.dcm", "a.dcm", "f.dcm", "c.dcm", "d.dcm"]
    )
    a, b = read_volume(ordered), read_volume(shuffled)
    assert a.values.shape == (6, 8, 6)
    assert a.spacing == pytest.approx((2.5, 0.5, 0.7))
    # slice k holds HU 100 k (rescale intercept -1024 applied); row 0 is air
    np.testing.assert_array_equal(a.values[:, 3, 2], [0, 100, 200, 300, 400, 500])
    assert (a.values[:, 0] == -1000).all()
    np.testing.assert_array_equal(a.values, b.values)
    assert item_dims(shuffled) == 3


def test_hu_window_numbers(tmp_path):
    """DICOM's LINEAR window (40, 400) on HU 0, 100, ... with a cube size needing no resize."""
    folder = write_series(tmp_path / "ct", 8, rows=8, columns=8, gap=1.0, pixel_spacing=(1, 1))
    cube = load_volume(folder, 8, window="40,400")
    hu = np.arange(8) * 100.0
    expected = np.clip(np.rint(((hu - 39.5) / 399 + 0.5) * 255), 0, 255)
    expected[hu > 239.5] = 255
    np.testing.assert_array_equal(cube[:, 3, 3], expected)
    assert list(expected[:3]) == [102, 166, 230]
    assert (cube[:, 0] == 0).all()  # -1000 HU is below the window
    # no window: the volume's own -1000..700 HU onto 0..255
    plain = load_volume(folder, 8)
    np.testing.assert_array_equal(plain[:, 3, 3], np.rint((hu + 1000) * 255 / 1700))


def test_series_window_is_used_and_the_override_wins(tmp_path):
    folder = write_series(
        tmp_path / "ct", 8, rows=8, columns=8, gap=1.0, pixel_spacing=(1, 1), window=(300, 200)
    )
    own = load_volume(folder, 8)
    assert own[0, 3, 3] == 0 and own[4, 3, 3] == 255  # HU 0 below, HU 400 above 200..400
    assert 0 < own[3, 3, 3] < 255
    np.testing.assert_array_equal(
        load_volume(folder, 8, window=(40, 400))[:3, 3, 3], [102, 166, 230]
    )


def test_series_errors_name_the_folder(tmp_path):
    mixed = write_series(tmp_path / "mixed", 3)
    write_series(mixed, 2, series_uid="1.2.3.4", names=["x0.dcm", "x1.dcm"])
    sizes = write_series(tmp_path / "sizes", 3)
    write_series(sizes, 1, rows=10, names=["big.dcm"])
    single = write_series(tmp_path / "single", 1)
    cases = [
        (mixed, "2 series \\(SeriesInstanceUID\\) mixed"),
        (sizes, "different sizes \\(Rows x Columns: 10x6, 8x6\\)"),
        (single, "a single slice"),
    ]
    for folder, message in cases:
        with pytest.raises(ImageReadError, match=message) as info:
            load_volume(folder, 8)
        assert str(info.value).startswith(str(folder)) and "\n" not in str(info.value)
        assert info.value.kind == "series"


def test_dicomdir_is_not_a_slice(tmp_path):
    import shutil

    folder = write_series(tmp_path / "media", 3)
    shutil.copy(folder / "slice0.dcm", folder / "DICOMDIR")  # any DICOM file by that name
    assert read_volume(folder).values.shape == (3, 8, 6)


def test_series_without_positions_is_refused(tmp_path):
    import pydicom

    folder = write_series(tmp_path / "nopos", 3)
    ds = pydicom.dcmread(folder / "slice1.dcm")
    del ds.ImagePositionPatient
    ds.save_as(folder / "slice1.dcm")
    with pytest.raises(ImageReadError, match="without ImagePositionPatient.*slice1.dcm"):
        read_volume(folder)


def test_series_of_mixed_orientations_is_refused(tmp_path):
    import pydicom

    folder = write_series(tmp_path / "tilted", 3)
    ds = pydicom.dcmread(folder / "slice2.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series
    ds.save_as(folder / "slice2.dcm")
    with pytest.raises(ImageReadError, match="different orientations.*slice2.dcm"):
        read_volume(folder)


# ------------------------------------------------------------------------------ resampling


def test_spacing_2_1_1_to_1_doubles_depth():
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 10, 10)).copy()
    out = resample(ramp, (2.0, 1.0, 1.0), 10, target_spacing=(1.0, 1.0, 1.0))
    assert out.shape == (10, 10, 10)  # 5 slices of 2 mm -> 10 of 1 mm, no resize needed
    # voxel centres: new slice k at (k + 0.5) mm = old index (k + 0.5) / 2 - 0.5, border-clamped
    expected = np.clip((np.arange(10) + 0.5) / 2 - 0.5, 0, 4)
    np.testing.assert_allclose(out[:, 4, 4], expected, atol=1e-5)
    np.testing.assert_allclose(out[:, 0, 0], out[:, 9, 9])  # in-plane untouched


@pytest.mark.parametrize("target", [None, (1.0, 1.0, 1.0), (3.0, 0.5, 2.0)])
def test_constant_volume_stays_constant(target):
    out = resample(np.full((6, 7, 9), 37.5, np.float32), (2.0, 1.5, 1.0), 12, target)
    assert out.shape == (12, 12, 12)
    np.testing.assert_allclose(out, 37.5, rtol=1e-4)
    # LINEAR window (37.5, 10): ((37.5 - 37) / 9 + 0.5) * 255 = 141.7 everywhere
    assert (to_uint8_volume(out, (37.5, 10)) == 142).all()


@pytest.mark.parametrize(
    ("spacing", "shape", "message"),
    [
        ((0.0, 1.0, 1.0), (8, 8, 8), "spacing .* is not three numbers > 0"),
        ((float("nan"), 1.0, 1.0), (8, 8, 8), "spacing .* is not three numbers > 0"),
        ((1.0, 1.0, 1.0), (3, 64, 64), "shape \\(3, 64, 64\\) to a 64\\^3 cube.*>= 8 voxels"),
        ((1.0, 1.0, 1.0), (1, 8, 8), ">= 2 voxels"),
    ],
)
def test_volumes_that_cannot_be_resampled(spacing, shape, message):
    size = max(shape)
    with pytest.raises(ImageReadError, match=message) as info:
        resample(np.zeros(shape, np.float32), spacing, size, name="ct.nii.gz")
    assert info.value.kind == "resample" and str(info.value).startswith("ct.nii.gz: ")


def test_thin_after_spacing_is_refused():
    # 10 slices of 1 mm resampled to 4 mm leave 2 slices: too few for a 28 cube (needs 4)
    with pytest.raises(ImageReadError, match="at spacing \\(4.0, 1.0, 1.0\\) mm"):
        resample(np.zeros((10, 28, 28), np.float32), (1, 1, 1), 28, (4.0, 1.0, 1.0))


def test_parse_spacing():
    assert parse_spacing(None) is None
    assert parse_spacing(1.5) == (1.5, 1.5, 1.5)
    assert parse_spacing("2,1,1") == (2.0, 1.0, 1.0)
    assert parse_spacing([3, 1, 1]) == (3.0, 1.0, 1.0)
    for bad in (0, "1,2", [1, -1, 1], "a"):
        with pytest.raises(ValueError, match="spacing must be one or three numbers > 0"):
            parse_spacing(bad)


# ------------------------------------------------------------------ ImageDataModule on volumes


def _volume_csv(root, n=10, bad=None):
    """A CSV of NIfTI volumes and DICOM series folders, labels alternating 0/1."""
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(n):
        if i % 3 == 0:
            write_series(root / f"series{i}", 4 + i % 2)
            rows.append(f"series{i},{i % 2}")
        else:
            values = rng.random((10, 12, 9)).astype(np.float32) * 1000
            write_nifti(root / f"vol{i}.nii.gz", values, (1.0, 1.0, 2.0))
            rows.append(f"vol{i}.nii.gz,{i % 2}")
    if bad is not None:
        rows.append(f"{bad},1")
    (root / "volumes.csv").write_text("\n".join(rows) + "\n")
    return root / "volumes.csv"


def test_image_datamodule_decodes_volumes_into_uint8_cubes(tmp_path):
    csv_file = _volume_csv(tmp_path / "data")
    dm = ImageDataModule(
        str(csv_file), size=16, spacing=1.0, cache_dir=str(tmp_path / "cache"),
        decode_workers=0, val_fraction=0.2, test_fraction=0.2,
    )  # fmt: skip
    assert dm.spatial_dims == 3 and dm.in_chans == 1 and dm.img_size == 16
    dm.prepare_data()
    arrays = {s: np.load(dm._folder / f"{s}_images.npy", mmap_mode="r") for s in dm._split_sizes}
    assert sum(len(a) for a in arrays.values()) == 10
    for a in arrays.values():
        assert a.dtype == np.uint8 and a.shape[1:] == (16, 16, 16)
    manifest = json.loads((dm._folder / MANIFEST).read_text())
    assert manifest["spatial_dims"] == 3 and manifest["spacing"] == [1.0, 1.0, 1.0]
    assert manifest["crop_pad"] is False
    # the cached cube is what load_volume (which predict uses) gives for the same file
    names, _ = dm.split_samples("train")
    first = tmp_path / "data" / names[0]
    np.testing.assert_array_equal(arrays["train"][0], load_volume(first, 16, 1.0))


def test_bad_series_is_one_error_naming_the_folder(tmp_path):
    root = tmp_path / "data"
    bad = write_series(root / "badseries", 3)
    write_series(bad, 1, rows=10, names=["big.dcm"])
    csv_file = _volume_csv(root, bad="badseries")
    dm = ImageDataModule(str(csv_file), size=8, cache_dir=str(tmp_path / "cache"), decode_workers=0)
    with pytest.raises(DataSourceError, match="DICOM series folders that cannot be stacked") as e:
        dm.prepare_data()
    assert "badseries (DICOM series folder: slices of different sizes" in str(e.value)
    skip = ImageDataModule(
        str(csv_file), size=8, cache_dir=str(tmp_path / "cache"), decode_workers=0,
        on_bad_file="skip",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="badseries"):
        skip.prepare_data()
    assert sum(skip._split_sizes.values()) == 10


def test_mixing_images_and_volumes_is_one_error(tmp_path):
    root = tmp_path / "data"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root.mkdir() or root / "x.png")
    csv_file = _volume_csv(root, bad="x.png")
    table = load_table(csv_file)
    assert table.spatial_dims == 3
    dm = ImageDataModule(str(csv_file), size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataSourceError, match="2D images and 3D volumes mixed.*: x.png"):
        dm.prepare_data()
    with pytest.raises(DataSourceError, match="3D volumes in a 2D source") as info:
        ImageDataModule(str(csv_file), size=8, spatial_dims=2).prepare_data()
    assert len(info.value.problems) == 1  # series folders are not also "missing files"


def test_class_folders_of_series_with_spatial_dims_3(tmp_path):
    root = tmp_path / "classes"
    for c in ("benign", "malignant"):
        for k in range(2):
            write_series(root / c / f"patient{k}", 3)
    write_nifti(root / "benign" / "extra.nii.gz", np.ones((6, 6, 6), np.float32))
    table = load_table(root, spatial_dims=3)
    assert table.spatial_dims == 3 and not table.problems
    assert table.rel_paths() == [
        "benign/extra.nii.gz", "benign/patient0", "benign/patient1",
        "malignant/patient0", "malignant/patient1",
    ]  # fmt: skip
    assert table.labels.tolist() == [0, 0, 0, 1, 1]
    # without spatial_dims the DICOM slices are 2D images beside a volume: one clear problem
    auto = load_table(root)
    (problem,) = auto.problems
    assert problem.kind == "2D images and 3D volumes mixed"
    assert "--data.spatial_dims 3" in problem.hint


def test_crop_pad_keeps_the_physical_scale():
    values = np.arange(4 * 6 * 10, dtype=np.float32).reshape(4, 6, 10) + 5
    out = resample(values, (1.0, 1.0, 1.0), 8, crop_pad=True)
    assert out.shape == (8, 8, 8)
    # D padded 2 + 2, H padded 1 + 1, W cropped 1 + 1: voxels unchanged, padding the minimum
    np.testing.assert_array_equal(out[2:6, 1:7, :], values[:, :, 1:9])
    assert (out[:2] == 5).all() and (out[:, 0] == 5).all()
    spaced = resample(values, (2.0, 1.0, 1.0), 8, (1.0, 1.0, 1.0), crop_pad=True)
    assert spaced.shape == (8, 8, 8)  # 4 slices of 2 mm are 8 of 1 mm: no padding along D
    np.testing.assert_allclose(spaced[:, 0], spaced.min())  # padded with the minimum
    assert spaced.min() == pytest.approx(5) and spaced.max() > 200


@pytest.mark.slow
def test_volumes_decode_in_spawned_processes_as_in_one(tmp_path, monkeypatch):
    """The pool for volumes (spawned: MONAI runs torch) gives the in-process bytes."""
    from medvit.data import decode

    csv_file = _volume_csv(tmp_path / "data", n=6)
    options = {"size": 12, "spacing": 1.5, "val_fraction": 0.2, "test_fraction": 0.2}
    one = ImageDataModule(str(csv_file), cache_dir=str(tmp_path / "a"), decode_workers=0, **options)
    one.prepare_data()
    monkeypatch.setattr(decode, "_MIN_VOLUMES_FOR_POOL", 2)
    pool = ImageDataModule(
        str(csv_file), cache_dir=str(tmp_path / "b"), decode_workers=2, **options
    )
    pool.prepare_data()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(
            np.load(one._folder / f"{split}_images.npy"),
            np.load(pool._folder / f"{split}_images.npy"),
        )
