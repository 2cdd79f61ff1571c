"""medvit.data.readers: one file -> uint8 pixels, on real DICOM files shipped with pydicom.

Only files inside pydicom's wheel are used (get_testdata_file would download others).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

from medvit.data.readers import (
    ImageReadError,
    is_dicom,
    is_image_file,
    load_image,
    read_pixels,
    to_channels,
    to_uint8,
)

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CT = DICOM_DIR / "CT_small.dcm"  # CT, signed 16-bit, rescale, no window
MR = DICOM_DIR / "MR_small.dcm"  # MR, signed 16-bit, window 600/1600
CR_MONO1 = DICOM_DIR / "dicomdirtests" / "77654033" / "CR1" / "6154"  # CR, MONOCHROME1, no suffix
US_RGB = DICOM_DIR / "examples_rgb_color.dcm"  # ultrasound, RGB
US_PALETTE = DICOM_DIR / "examples_palette.dcm"  # ultrasound, PALETTE COLOR
US_MULTIFRAME = DICOM_DIR / "examples_ybr_color.dcm"  # ultrasound, 30 frames
RT_PLAN = DICOM_DIR / "rtplan.dcm"  # no pixel data
NIFTI_3D = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


def _window_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range of pydicom's apply_windowing (PS3.3 C.11.2.1.2), derived by hand."""
    bits = ds.BitsStored
    low, high = (
        (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    )
    if "RescaleSlope" in ds:
        low = low * ds.RescaleSlope + ds.RescaleIntercept
        high = high * ds.RescaleSlope + ds.RescaleIntercept
    return float(low), float(high)


def _to_255(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def test_shipped_files_are_the_modalities_the_tests_claim():
    assert [pydicom.dcmread(p).Modality for p in (CT, MR, CR_MONO1, US_RGB, US_PALETTE)] == [
        "CT",
        "MR",
        "CR",
        "US",
        "US",
    ]


def test_ct_without_window_maps_its_hounsfield_range_to_0_255():
    ds = pydicom.dcmread(CT)
    assert "WindowCenter" not in ds and "RescaleIntercept" in ds
    hu = apply_modality_lut(ds.pixel_array, ds)
    expected = _to_255(hu, hu.min(), hu.max())
    got = read_pixels(CT)
    assert got.dtype == np.uint8 and got.shape == (128, 128)
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0 and got.max() == 255


def test_ct_window_override_matches_pydicom_windowing_of_the_rescaled_values():
    ds = pydicom.dcmread(CT)
    hu = apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    expected = _to_255(apply_windowing(hu, ds), *_window_range(ds))
    got = read_pixels(CT, window=(40, 400))
    np.testing.assert_array_equal(got, expected)
    # Soft-tissue window by hand: below -160 HU is black, above 240 HU white.
    assert (got[hu <= 40 - 0.5 - 399 / 2] == 0).all() and (
        got[hu > 40 - 0.5 + 399 / 2] == 255
    ).all()
    assert 0 < (got == 0).sum() < got.size and not np.array_equal(got, read_pixels(CT))


def test_mr_uses_the_files_own_window_as_pydicom_applies_it():
    ds = pydicom.dcmread(MR)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    expected = _to_255(voi, *_window_range(ds))
    got = read_pixels(MR)
    np.testing.assert_array_equal(got, expected)
    # The window is not the image's min..max: the darkest pixel (127) is not black.
    assert ds.pixel_array.min() == 127 and got.min() == expected.min() > 0


def test_monochrome1_cr_without_suffix_is_found_by_magic_and_inverted(tmp_path):
    assert CR_MONO1.suffix == "" and is_dicom(CR_MONO1)
    ds = pydicom.dcmread(CR_MONO1)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) != 1
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    inverted = 255 - _to_255(voi, *_window_range(ds))
    got = read_pixels(CR_MONO1)
    np.testing.assert_array_equal(got, inverted)
    # The same pixels declared MONOCHROME2 read as the exact negative.
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "mono2.dcm")
    np.testing.assert_array_equal(got, 255 - read_pixels(tmp_path / "mono2.dcm"))
    # Bright stored values (dense tissue in MONOCHROME1) come out dark.
    raw = ds.pixel_array
    assert got[raw == raw.max()].max() < got[raw == raw.min()].min()


def test_ultrasound_rgb_is_read_as_its_pixels_and_converted_to_grey_by_luma():
    ds = pydicom.dcmread(US_RGB)
    got = read_pixels(US_RGB)
    np.testing.assert_array_equal(got, ds.pixel_array)
    grey = load_image(US_RGB, None, 1)
    rgb = ds.pixel_array.astype(np.int64)
    luma = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000
    assert grey.shape == (240, 320) and np.abs(grey - luma).max() <= 1


def test_ultrasound_palette_colour_applies_the_palette():
    ds = pydicom.dcmread(US_PALETTE)
    rgb16 = apply_color_lut(ds.pixel_array, ds)
    assert rgb16.dtype == np.uint16
    got = read_pixels(US_PALETTE)
    np.testing.assert_array_equal(got, np.rint(rgb16 * (255 / 65535)).astype(np.uint8))


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm"])
def test_multi_frame_dicom_is_refused_naming_the_file(name):
    with pytest.raises(ImageReadError, match="multi-frame") as info:
        read_pixels(DICOM_DIR / name)
    assert info.value.kind == "multi_frame" and name in str(info.value)
    assert "\n" not in str(info.value)


def test_dicom_without_pixel_data_is_refused_naming_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"rtplan\.dcm: DICOM file has no pixel data"):
        read_pixels(RT_PLAN)
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    ds.save_as(tmp_path / "header_only.dcm")
    with pytest.raises(
        ImageReadError, match="header_only.dcm: DICOM file has no pixel data"
    ) as info:
        read_pixels(tmp_path / "header_only.dcm")
    assert info.value.kind == "no_pixel_data"


def test_suffixless_dicom_copy_reads_like_the_original(tmp_path):
    copy = tmp_path / "IM0001"
    shutil.copyfile(MR, copy)
    assert is_dicom(copy) and is_image_file(copy)
    np.testing.assert_array_equal(read_pixels(copy), read_pixels(MR))
    png = tmp_path / "noext"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(png, format="PNG")
    assert not is_dicom(png) and not is_image_file(png)
    assert read_pixels(png).tolist() == [[7] * 4] * 4  # Pillow still reads it by content


def test_truncated_and_fake_dicom_are_read_errors(tmp_path):
    with pytest.raises(ImageReadError, match=r"MR_truncated\.dcm: cannot decode") as info:
        read_pixels(DICOM_DIR / "MR_truncated.dcm")
    assert info.value.kind == "unreadable"
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(ImageReadError, match=r"fake\.dcm: not a DICOM file"):
        read_pixels(fake)


def test_dcm_without_preamble_is_read_by_its_suffix(tmp_path):
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(MR.read_bytes()[132:])  # no 128-byte preamble, no "DICM"
    shutil.copyfile(bare, tmp_path / "bare")
    assert is_dicom(bare) and not is_dicom(tmp_path / "bare")  # suffix-less needs the magic
    np.testing.assert_array_equal(read_pixels(bare), read_pixels(MR))
    with pytest.raises(ImageReadError, match=r"ExplVR_LitEndNoMeta\.dcm: DICOM file has no pixel"):
        read_pixels(DICOM_DIR / "ExplVR_LitEndNoMeta.dcm")


def test_nifti_2d_applies_scaling_and_puts_x_along_columns(tmp_path):
    data = np.arange(12, dtype=np.int16).reshape(3, 4)  # (x=3, y=4)
    image = nibabel.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(2.0, -100.0)
    path = tmp_path / "slice.nii.gz"
    nibabel.save(image, path)
    got = read_pixels(path)
    values = (data * 2.0 - 100.0).T  # rows y, columns x
    assert got.shape == (4, 3)
    np.testing.assert_array_equal(got, _to_255(values, values.min(), values.max()))
    # The window applies to the scaled values: -100..-78 with centre -90.5, width 2 -> threshold.
    windowed = read_pixels(path, window=(-90, 2))
    np.testing.assert_array_equal(windowed, np.where(values > -90.5, 255, 0))


def test_nifti_single_slice_of_a_real_volume_reads_and_more_slices_are_refused(tmp_path):
    volume = nibabel.load(NIFTI_3D)
    assert volume.ndim == 3 and volume.shape[2] > 1
    with pytest.raises(ImageReadError, match=r"anatomical\.nii: NIfTI image of shape .* not 2D"):
        read_pixels(NIFTI_3D)
    one = np.asarray(volume.dataobj)[:, :, 5:6]
    nibabel.save(nibabel.Nifti1Image(one, volume.affine), tmp_path / "one.nii")
    values = one[:, :, 0].T.astype(np.float64)
    np.testing.assert_array_equal(
        read_pixels(tmp_path / "one.nii"), _to_255(values, values.min(), values.max())
    )


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_scales_the_full_16_bit_range(tmp_path, suffix):
    values = np.array([[0, 256, 32768, 65535], [1000, 2000, 3000, 40000]], np.uint16)
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # really stored as 16 bits
    expected = [[0, 1, 128, 255], [4, 8, 12, 156]]  # rint(v * 255 / 65535)
    assert read_pixels(path).tolist() == expected
    # A dark 16-bit image stays dark (Pillow's own convert("L") would clip it to white).
    assert load_image(path, None, 1).tolist() == expected


def test_rgba_is_kept_by_read_pixels_and_composited_on_black_by_to_channels(tmp_path):
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0, 0] = (200, 100, 50, 128)  # half transparent
    pixels[0, 1] = (10, 20, 30, 255)  # opaque
    pixels[1, 0] = (255, 255, 255, 0)  # fully transparent white
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)
    np.testing.assert_array_equal(read_pixels(path), pixels)
    rgb = load_image(path, None, 3)
    assert rgb[0, 0].tolist() == [100, 50, 25]  # colour * 128 / 255, rounded
    assert rgb[0, 1].tolist() == [10, 20, 30] and rgb[1, 0].tolist() == [0, 0, 0]
    grey = load_image(path, None, 1)
    assert grey[0, 1] == 18 and grey[1, 0] == 0  # 10*.299 + 20*.587 + 30*.114 = 18.15


def test_medmnist_size_png_reads_back_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    got = load_image(tmp_path / "grey.png", 28, 1)
    assert got.dtype == np.uint8 and got.shape == (28, 28)
    np.testing.assert_array_equal(got, grey)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png", 28, 3), rgb)


def test_resize_averages_areas_down_and_is_bilinear_up(tmp_path):
    blocks = np.kron(np.array([[0, 100], [50, 200]], np.uint8), np.ones((2, 2), np.uint8))
    Image.fromarray(blocks).save(tmp_path / "blocks.png")
    assert load_image(tmp_path / "blocks.png", 2, 1).tolist() == [[0, 100], [50, 200]]
    assert load_image(tmp_path / "blocks.png", 2, 3)[1, 1].tolist() == [200, 200, 200]
    small = np.array([[0, 100], [50, 200]], np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    up = load_image(tmp_path / "small.png", 4, 1)
    expected = np.asarray(Image.fromarray(small).resize((4, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(up, expected)
    assert up[0, 0] == 0 and up[3, 3] == 200 and 0 < up[1, 1] < 200


def test_channel_conversion_between_grey_and_rgb():
    grey = np.array([[0, 128], [255, 7]], np.uint8)
    three = to_channels(grey, 3)
    assert three.shape == (2, 2, 3) and (three == grey[:, :, None]).all()
    np.testing.assert_array_equal(to_channels(three, 1)[:, :, 0], grey)  # equal R=G=B: exact
    rgb = np.array([[[10, 20, 30], [255, 0, 0]]], np.uint8)
    assert to_channels(rgb, 1)[:, :, 0].tolist() == [[18, 76]]  # 255 * .299 = 76.2
    with pytest.raises(ValueError, match="in_chans must be 1 or 3, got 2"):
        to_channels(grey, 2)


@pytest.mark.parametrize(
    ("name", "content", "kind", "reason"),
    [
        ("empty.png", b"", "empty", "file is empty"),
        ("empty.dcm", b"", "empty", "file is empty"),
        ("garbage.png", b"\x00\x01 definitely not an image" * 4, "unreadable", "not an image"),
        ("truncated.png", None, "unreadable", "cannot decode"),
    ],
)
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path, name, content, kind, reason):
    path = tmp_path / name
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(
            tmp_path / "full.png"
        )
        data = (tmp_path / "full.png").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        load_image(path, 28, 1)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message
    assert info.value.kind == kind and info.value.path == path
    assert isinstance(info.value, ValueError)


def test_missing_file_and_error_pickling(tmp_path):
    with pytest.raises(ImageReadError, match="missing.png: file not found") as info:
        read_pixels(tmp_path / "missing.png")
    copy = pickle.loads(pickle.dumps(info.value))  # crosses decoding worker processes
    assert (str(copy), copy.kind, copy.path) == (
        str(info.value),
        "missing",
        tmp_path / "missing.png",
    )


def test_window_must_have_a_width_of_at_least_one():
    with pytest.raises(ValueError, match="window width must be a finite number >= 1"):
        read_pixels(CT, window=(40, 0))
    with pytest.raises(ValueError, match=r"window must be \(center, width\)"):
        read_pixels(CT, window=(40,))


def test_to_uint8_rules():
    assert to_uint8(np.array([0, 65535, 32768], np.uint16)).tolist() == [0, 255, 128]
    assert to_uint8(np.array([-10, 0, 10], np.int16)).tolist() == [0, 128, 255]  # min..max
    assert to_uint8(np.array([0.5, 1.0, 1.5])).tolist() == [0, 128, 255]
    assert to_uint8(np.array([True, False])).tolist() == [255, 0]
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_uint8(np.array([0.0, np.nan]))


def test_voi_lut_sequence_is_preferred_to_the_window_and_scaled_by_its_depth(tmp_path):
    ds = pydicom.dcmread(MR)  # has a window too; the LUT must win, as in apply_voi_lut
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", [4095 - v for v in range(4096)])  # an inverting 12-bit LUT
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "voi_lut.dcm")
    ds = pydicom.dcmread(tmp_path / "voi_lut.dcm")
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    got = read_pixels(tmp_path / "voi_lut.dcm")
    np.testing.assert_array_equal(got, _to_255(voi, 0, 4095))
    raw = ds.pixel_array.astype(np.int64)
    np.testing.assert_array_equal(got, np.rint((4095 - raw) * 255 / 4095).astype(np.uint8))


def test_dicom_colour_ybr_and_16_32_bit_rgb_read_as_8_bit_rgb():
    rgb8 = read_pixels(DICOM_DIR / "SC_rgb_rle.dcm")
    assert rgb8[0, 0].tolist() == [255, 0, 0] and rgb8[50, 50].tolist() == [128, 128, 255]
    for name in ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"):  # full-range 16/32-bit
        np.testing.assert_array_equal(read_pixels(DICOM_DIR / name), rgb8)
    ybr = read_pixels(DICOM_DIR / "SC_ybr_full_422_uncompressed.dcm").astype(int)
    assert np.abs(ybr - rgb8).mean() < 1  # converted to RGB (subsampled chroma rounds)


def test_jpeg_bmp_and_palette_png_read_as_pillow_decodes_them(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(read_pixels(tmp_path / "a.bmp"), rgb)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    with Image.open(tmp_path / "a.jpg") as image:
        np.testing.assert_array_equal(read_pixels(tmp_path / "a.jpg"), np.asarray(image))
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.save(tmp_path / "p.png")
    assert read_pixels(tmp_path / "p.png")[0].tolist() == [[10, 20, 30], [200, 100, 0]]
    palette.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent -> RGBA
    assert read_pixels(tmp_path / "pt.png")[0].tolist() == [[10, 20, 30, 0], [200, 100, 0, 255]]


def test_compressed_dicom_decodes_to_the_same_pixels_and_multipage_tiff_is_refused(tmp_path):
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):  # RLE, JPEG 2000 lossless
        np.testing.assert_array_equal(read_pixels(DICOM_DIR / name), read_pixels(MR))
    pages = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 20)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageReadError, match=r"stack\.tif: image has 2 frames") as info:
        read_pixels(tmp_path / "stack.tif")
    assert info.value.kind == "multi_frame"


def test_float_tiff_maps_its_own_min_max_and_nifti_names_are_recognised(tmp_path):
    image = np.linspace(-1.0, 3.0, 28 * 28, dtype=np.float32).reshape(28, 28)
    Image.fromarray(image).save(tmp_path / "float.tiff")
    expected = np.rint((image.astype(np.float64) + 1) * 255 / 4).astype(np.uint8)
    np.testing.assert_array_equal(read_pixels(tmp_path / "float.tiff"), expected)
    names = ["a.nii", "b.NII.GZ", "c.dcm", "d.PNG", "e.tif", "f.txt", "g.gz"]
    assert [is_image_file(tmp_path / n) for n in names] == [True] * 5 + [False] * 2
