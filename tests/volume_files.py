"""Volumes written at test time: a synthetic CT DICOM series (pydicom) and NIfTI files (nibabel).

Shared by tests/test_volumes.py and tests/test_predict_volumes.py; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The 3D NIfTI files that ship with nibabel's tests (shape, zooms as nibabel reports them).
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"


def write_series(
    folder: Path,
    n_slices: int = 6,
    *,
    rows: int = 8,
    columns: int = 6,
    gap: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.5, 0.7),
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    names: list[str] | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """A CT series: slice ``k`` (by position) holds HU ``100 * k`` everywhere but its first row.

    Row 0 of every slice is HU ``-1000`` (air), so min..max scaling is not degenerate. Slices
    are stored at z = ``gap * k`` (k in position order) under ``names`` (default
    ``slice{k}.dcm``), with ``RescaleIntercept`` -1024. Returns ``folder``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"slice{k}.dcm" for k in range(n_slices)]
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = n_slices - k  # deliberately the reverse of the position order
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, gap * k]
        ds.PixelSpacing = list(pixel_spacing)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        hu = np.full((rows, columns), 100 * k, np.int32)
        hu[0] = -1000
        ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / names[k], enforce_file_format=True)
    return folder


def write_nifti(path: Path, values: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    """``values`` (x, y, z) as a NIfTI file with a diagonal (RAS) affine of ``zooms``."""
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(values, np.diag([*zooms, 1.0])), path)
    return path
