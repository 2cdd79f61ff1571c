"""Decode image files once into memory-mapped split arrays: the cache of your own images.

:class:`~medvit.data.images.ImageDataModule` trains from the same format as the MedMNIST path:
a folder with ``{split}_images.npy`` (uint8, (N, size, size) grey or (N, size, size, 3) RGB) and
``{split}_labels.npy`` per split (volumes: (N, size, size, size) grey, decoded by
:func:`medvit.data.volumes.load_volume`), opened with ``np.load(mmap_mode="r")`` so DataLoader workers
share the page cache. Each file is decoded (:func:`medvit.data.readers.load_image`) once, in
several processes, with a progress bar.

The cache folder is ``{cache_root}/images/{name}-{key}``. The key is a SHA-256 over every file's
path, size and modification time (ns), its label and split, and the decoding options (size,
channels, DICOM window, format version), so any change to them builds a new folder (and deletes
the older ones of the same source). A build goes to a temporary folder that is renamed into
place once complete (with a ``complete`` marker, as the ``.npz`` unpack caches of
:mod:`medvit.data.files`), under the same lock, so an interrupted build is never reused and a
second process waits for the first. Files that fail to decode are left out of the arrays and
recorded in the folder's ``manifest.json``; the DataModule decides whether that is an error.
No torch here: this module runs in the decoding processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medvit.data.files import (
    _COMPLETE,
    DECODE_MANIFEST,
    SPLITS,
    DataFileError,
    _hold,
    _unpack_lock,
    building,
    check_free_space,
    prune_caches,
)
from medvit.data.readers import ImageReadError, load_image

__all__ = ["CACHE_VERSION", "IMAGES_DIR", "DecodedArrays", "cache_key", "decode_to_cache"]

#: Bumped when the decoded bytes of the same file and options change (a reader fix).
CACHE_VERSION = 1
#: Subfolder of the cache root holding the decode caches (apart from the ``.npz`` unpacks).
IMAGES_DIR = "images"
MANIFEST = DECODE_MANIFEST
#: Below this many files decoding stays in the calling process (a pool costs more).
_MIN_FILES_FOR_POOL = 64
#: Volumes take longer each, but a spawned worker first imports torch (seconds).
_MIN_VOLUMES_FOR_POOL = 32
#: Rows copied at a time when failed rows are squeezed out of a split array.
_COPY_ROWS = 4096


@dataclass
class DecodedArrays:
    """A complete decode cache.

    Attributes:
        folder: the cache folder (``{split}_images.npy``, ``{split}_labels.npy``).
        failed: ``(path, reason, kind)`` of every file that could not be decoded (left out).
        built: whether this call decoded the files (False: an existing cache was reused).
    """

    folder: Path
    failed: list[tuple[Path, str, str]]
    built: bool


def cache_key(
    paths: list[Path],
    labels: np.ndarray,
    splits: np.ndarray,
    size: int,
    channels: int,
    window: tuple[float, float] | None,
    spacing: tuple[float, ...] | None = None,
    spatial_dims: int = 2,
    crop_pad: bool = False,
) -> str:
    """SHA-256 over the files (path, size, mtime), labels, splits and decoding options."""
    digest = hashlib.sha256()
    options = {"version": CACHE_VERSION, "size": size, "channels": channels, "window": window}
    if spatial_dims == 3:  # added only for volumes, so the keys of 2D caches stay as they were
        options.update(spatial_dims=3, spacing=spacing, crop_pad=crop_pad)
    digest.update(json.dumps(options, sort_keys=True).encode())
    for path, split in zip(paths, np.asarray(splits).tolist(), strict=True):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{stamp}\0{split}\n".encode())
    labels = np.ascontiguousarray(np.asarray(labels, dtype=np.int64).reshape(len(paths), -1))
    digest.update(str(labels.shape).encode())
    digest.update(labels.tobytes())
    return digest.hexdigest()


# Options of the decoding processes (set once per process by the pool's initializer):
# size, channels, window, and for volumes the target spacing (else None), spatial dims, crop_pad.
_OPTIONS: tuple = (0, 1, None, None, 2, False)


def _init_worker(*options) -> None:
    global _OPTIONS
    _OPTIONS = options
    if options[4] == 3 and multiprocessing.parent_process() is not None:
        import torch

        torch.set_num_threads(1)  # one volume per process; the processes fill the cores


def _decode(job: tuple[int, str]) -> tuple[int, np.ndarray | None, str, str]:
    """``(row, pixels, "", "")`` or ``(row, None, reason, kind)``; never raises for a bad file."""
    row, path = job
    size, channels, window, spacing, spatial_dims, crop_pad = _OPTIONS
    try:
        if spatial_dims == 3:
            from medvit.data.volumes import load_volume

            return row, load_volume(path, size, spacing, window, crop_pad), "", ""
        return row, load_image(path, size, channels, window), "", ""
    except ImageReadError as err:
        return row, None, err.reason, err.kind
    except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
        return row, None, " ".join(f"{type(err).__name__}: {err}".split()), "unreadable"


def _decoded(paths: list[Path], options: tuple, workers: int, desc: str):
    """Yield ``_decode`` results for every path (any order), in ``workers`` processes."""
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    volumes = options[4] == 3
    least = _MIN_VOLUMES_FOR_POOL if volumes else _MIN_FILES_FOR_POOL
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=len(jobs) < 256 or None)
    with bar:
        if workers <= 1 or len(jobs) < least:
            _init_worker(*options)
            for job in jobs:
                yield _decode(job)
                bar.update()
            return
        # fork: 2D workers only use numpy, Pillow, pydicom and nibabel (no CUDA, no torch).
        # Volumes resample with MONAI (torch), which is not safe in a child forked from a process
        # that ran torch's thread pools: spawn fresh ones, one torch thread each.
        ctx = multiprocessing.get_context("spawn" if volumes else "fork")
        chunk = 1 if volumes else max(1, min(64, len(jobs) // (workers * 8)))
        with ctx.Pool(workers, initializer=_init_worker, initargs=options) as pool:
            for result in pool.imap_unordered(_decode, jobs, chunksize=chunk):
                yield result
                bar.update()


def decode_to_cache(
    paths: list[Path],
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    name: str,
    source: Path,
    cache_root: Path,
    size: int,
    channels: int,
    window: tuple[float, float] | None = None,
    workers: int = 1,
    spacing: tuple[float, ...] | None = None,
    spatial_dims: int = 2,
    crop_pad: bool = False,
) -> DecodedArrays:
    """The decode cache of these files, labels and splits: reused when complete, else built.

    Args:
        paths: absolute path of every sample.
        labels: (N,) class per sample or (N, L) 0/1 for multi-label.
        splits: (N,) ``train``/``val``/``test`` per sample; a split keeps the order of ``paths``.
        name: the source's short name (the folder's name prefix).
        source: the folder or CSV file read (recorded; older caches of it are deleted).
        cache_root: the cache root; the folder goes under ``cache_root/images``.
        size: decode size (square; for volumes the cube's side); channels: 1 (grey) or 3
            (RGB); window: DICOM window.
        workers: decoding processes.
        spacing: volumes: the target voxel spacing in mm (D, H, W), or None (resize only).
        spatial_dims: 2 (images, :func:`~medvit.data.readers.load_image`) or 3 (volumes,
            :func:`~medvit.data.volumes.load_volume`: (N, size, size, size) grey arrays).
        crop_pad: volumes: crop/pad to the cube instead of resizing (after the spacing step).

    Raises:
        DataFileError: the cache folder cannot be written or the disk is too small.
    """
    labels = np.asarray(labels, dtype=np.int64)
    labels = labels.reshape(len(paths), -1)  # (N, 1) or (N, L), as MedMNIST's
    splits = np.asarray(splits).astype(str)
    if spatial_dims == 3 and channels != 1:
        raise ValueError(f"volumes are decoded grey (channels=1), got channels={channels}")
    key = cache_key(paths, labels, splits, size, channels, window, spacing, spatial_dims, crop_pad)
    options = (size, channels, window, spacing, spatial_dims, crop_pad)
    root = Path(cache_root) / IMAGES_DIR
    out = root / f"{name}-{key[:16]}"
    if (out / _COMPLETE).is_file() and _hold(out):
        return DecodedArrays(out, _read_failed(out), built=False)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataFileError(
            f"Cannot create the decode cache {root}: {err.strerror or err}. Point "
            "--data.cache_dir at a writable folder."
        ) from err
    lock = _unpack_lock(root, name)
    try:
        # Another process may have built it while this one waited for the lock.
        if (out / _COMPLETE).is_file() and _hold(out):
            return DecodedArrays(out, _read_failed(out), built=False)
        _build(out, paths, labels, splits, source, options, workers)
        prune_caches(root, source=Path(source), keep=out)
        _hold(out)
    finally:
        if lock is not None:
            os.close(lock)
    return DecodedArrays(out, _read_failed(out), built=True)


def _read_failed(folder: Path) -> list[tuple[Path, str, str]]:
    manifest = json.loads((folder / MANIFEST).read_text())
    return [(Path(f["path"]), f["reason"], f["kind"]) for f in manifest["failed"]]


def _shape(options: tuple) -> tuple[int, ...]:
    size, channels, _, _, spatial_dims, _ = options
    if spatial_dims == 3:
        return (size, size, size)
    return (size, size) if channels == 1 else (size, size, channels)


def _build(out, paths, labels, splits, source, options, workers) -> None:
    need = len(paths) * int(np.prod(_shape(options))) + labels.nbytes
    check_free_space(need, out.parent, f"Decoding {len(paths)} images at {options[0]} px needs")
    try:
        _write_arrays(out, paths, labels, splits, source, options, workers)
    except OSError as err:
        raise DataFileError(
            f"Could not write the decode cache in {out.parent} ({err.strerror or err}); free "
            "some space or choose --data.cache_dir."
        ) from err


def _write_arrays(out, paths, labels, splits, source, options, workers) -> None:
    shape = _shape(options)
    size, channels, window, spacing, spatial_dims, crop_pad = options
    with building(out, source) as tmp:
        rows = {s: np.flatnonzero(splits == s) for s in SPLITS}
        position = np.zeros(len(paths), dtype=np.int64)  # row within its split
        for s in SPLITS:
            position[rows[s]] = np.arange(len(rows[s]))
        arrays = {
            s: np.lib.format.open_memmap(
                tmp / f"{s}_images.npy", mode="w+", dtype=np.uint8, shape=(len(rows[s]), *shape)
            )
            for s in SPLITS
        }
        ok = np.ones(len(paths), dtype=bool)
        failed = []
        for i, pixels, reason, kind in _decoded(
            paths, options, workers, f"decode {Path(source).name}"
        ):
            if pixels is None:
                ok[i] = False
                failed.append({"path": str(paths[i]), "reason": reason, "kind": kind})
            else:
                arrays[splits[i]][position[i]] = pixels
        counts = {}
        for s in SPLITS:
            keep = ok[rows[s]]
            images = arrays.pop(s)
            if not keep.all():
                images = _squeeze(tmp / f"{s}_images.npy", images, keep)
            images.flush()
            del images
            np.save(tmp / f"{s}_labels.npy", labels[rows[s]][keep])
            counts[s] = int(keep.sum())
        failed.sort(key=lambda f: f["path"])
        manifest = {
            "source": str(source),
            "size": size,
            "channels": channels,
            "window": window,
            "spacing": spacing,
            "spatial_dims": spatial_dims,
            "crop_pad": crop_pad,
            "version": CACHE_VERSION,
            "counts": counts,
            "paths": {s: [str(paths[i]) for i in rows[s] if ok[i]] for s in SPLITS},
            "failed": failed,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))


def _squeeze(path: Path, images: np.memmap, keep: np.ndarray) -> np.memmap:
    """``images`` without the rows of failed files, rewritten at ``path`` in chunks."""
    tmp_path = path.with_name(path.stem + ".squeeze.npy")
    out = np.lib.format.open_memmap(
        tmp_path, mode="w+", dtype=images.dtype, shape=(int(keep.sum()), *images.shape[1:])
    )
    good = np.flatnonzero(keep)
    for start in range(0, len(good), _COPY_ROWS):
        chunk = good[start : start + _COPY_ROWS]
        out[start : start + len(chunk)] = images[chunk]
    out.flush()
    del images
    os.replace(tmp_path, path)
    return out
