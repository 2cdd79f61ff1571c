"""MedMNIST files on disk: locating, downloading, MD5 checks and memory-mapped copies.

A 224 px MedMNIST set is tens of GB once decoded, so nothing here decodes a whole split into
RAM: the `.npy` members of the `.npz` archive are streamed once into a cache folder and then
opened with ``np.load(mmap_mode="r")``, which DataLoader workers share through the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
_CHUNK = 1 << 20


class DataFileError(ValueError):
    """A data file is missing, corrupt or not in the MedMNIST format."""


def file_name(flag: str, size: int) -> str:
    """MedMNIST's file naming: the 28 px file has no size suffix."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def md5sum(path: Path, progress: bool = True) -> str:
    """MD5 of a file, read in chunks (with a progress bar for files over 256 MiB)."""
    digest = hashlib.md5()
    total = path.stat().st_size
    with (
        open(path, "rb") as fh,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"md5 {path.name}",
            disable=not progress or total < (256 << 20),
        ) as bar,
    ):
        while chunk := fh.read(_CHUNK * 8):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None, timeout: float = 15.0) -> Path:
    """Download ``url`` to ``dest`` atomically, with a progress bar, and check its MD5.

    Raises:
        DataFileError: when the server cannot be reached (naming the URL and where to put the
            file by hand) or the downloaded bytes have the wrong MD5.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise DataFileError(
            f"Could not download {dest.name} from {url} ({err}). Without network access, "
            f"download it elsewhere and put it at {dest}, or point --data.root (or the "
            f"MEDVIT_DATA_DIR environment variable) at a folder that holds it."
        ) from err
    if md5 is not None:
        got = md5sum(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataFileError(
                f"{url} downloaded with MD5 {got}, expected {md5}; the file was discarded. "
                "Try again, or download it by hand."
            )
    os.replace(tmp, dest)
    return dest


def verify_md5(path: Path, expected: str, stamp_dir: Path) -> None:
    """Check a file's MD5 once; later calls trust a stamp keyed by size and mtime.

    Hashing a 224 px file takes tens of seconds, so every run must not pay it again.
    """
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp = stamp_dir / f"{path.name}.md5.json"
    if stamp.is_file():
        try:
            saved = json.loads(stamp.read_text())
            if saved.get("key") == key and saved.get("md5") == expected:
                return
        except (OSError, json.JSONDecodeError):
            pass
    got = md5sum(path)
    if got != expected:
        raise DataFileError(
            f"{path} has MD5 {got}, but the official MedMNIST file has {expected}. "
            "The file is corrupt or not the official one: delete it so it is downloaded again, "
            "or pass --data.verify_md5 false for a file of your own in the same format."
        )
    stamp_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(stamp, json.dumps({"key": key, "md5": got}))


def mmap_dir_for(npz: Path, cache_root: Path) -> Path:
    """Cache folder for one archive, keyed by its size and mtime so a replaced file is redone."""
    st = npz.stat()
    tag = hashlib.sha1(f"{npz.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_root / f"{npz.stem}-{tag}"


def extract_npz(npz: Path, out_dir: Path) -> Path:
    """Stream each member of ``npz`` into ``out_dir/{key}.npy`` without decoding it in memory.

    Raises:
        DataFileError: when the archive is unreadable or lacks one of the MedMNIST keys.
    """
    if (out_dir / "complete").is_file():
        return out_dir
    try:
        zf = zipfile.ZipFile(npz)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataFileError(f"{npz} is not a readable .npz archive ({err}).") from err
    with zf:
        members = {Path(name).stem: name for name in zf.namelist() if name.endswith(".npy")}
        missing = [key for key in KEYS if key not in members]
        if missing:
            raise DataFileError(
                f"{npz} lacks the key(s) {missing}; a MedMNIST file holds {list(KEYS)} "
                f"(found {sorted(members)})."
            )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
        total = sum(zf.getinfo(members[key]).file_size for key in KEYS)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"unpack {npz.name}",
            disable=total < (256 << 20),
        ) as bar:
            for key in KEYS:
                with zf.open(members[key]) as src, open(tmp / f"{key}.npy", "wb") as dst:
                    while chunk := src.read(_CHUNK * 8):
                        dst.write(chunk)
                        bar.update(len(chunk))
        (tmp / "complete").write_text(str(npz))
    if out_dir.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def open_arrays(folder: Path, npz: Path) -> dict[str, np.ndarray]:
    """Memory-map every split array of an extracted archive."""
    arrays = {}
    for key in KEYS:
        try:
            arrays[key] = np.load(folder / f"{key}.npy", mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise DataFileError(
                f"{npz}: key '{key}' is not a plain numeric array ({err})."
            ) from err
    return arrays


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
