"""MedMNIST files on disk: locating, downloading, MD5 checks and memory-mapped copies.

Downloads go through torchvision's ``download_url`` and ``check_integrity``; what this module
adds is atomicity, a timeout and messages that say where to put a file by hand.

A 224 px MedMNIST set is tens of GB once decoded, so nothing here decodes a whole split into
RAM: the `.npy` members of the `.npz` archive are streamed once into a cache folder and then
opened with ``np.load(mmap_mode="r")``, which DataLoader workers share through the page cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medvit.fileio import atomic_write_text

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
_CHUNK = 1 << 20


class DataFileError(ValueError):
    """A data file is missing, corrupt or not in the MedMNIST format."""


def size_suffix(size: int) -> str:
    """MedMNIST's suffix for an image size, in file names and ``INFO`` keys: none for 28 px."""
    return "" if size == 28 else f"_{size}"


def file_name(flag: str, size: int) -> str:
    """MedMNIST's file name for a flag at a size, e.g. ``pathmnist_224.npz``."""
    return f"{flag}{size_suffix(size)}.npz"


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


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give new sockets a timeout: torchvision's ``download_url`` opens its connections without
    one, so a server that stops answering would hang the run instead of failing."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download(url: str, dest: Path, md5: str | None, timeout: float = 15.0) -> Path:
    """Download ``url`` to ``dest`` with torchvision's ``download_url``, and check its MD5.

    The bytes go to ``dest.part``, which becomes ``dest`` only once complete and checked, so an
    interrupted or refused download never leaves a half-written file at ``dest``.

    Raises:
        DataFileError: when the server cannot be reached (naming the URL and where to put the
            file by hand) or the downloaded bytes have the wrong MD5.
    """
    # torchvision imports torch: only pay for it when there is something to download.
    from torchvision.datasets.utils import check_integrity, download_url

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    # download_url keeps an existing file when no MD5 is given: not a .part a killed run left.
    tmp.unlink(missing_ok=True)
    try:
        with _socket_timeout(timeout):
            download_url(url, str(tmp.parent), tmp.name)
    except (OSError, http.client.HTTPException, RecursionError) as err:
        # OSError covers URLError, refused connections and timeouts; HTTPException a connection
        # cut mid-body; RecursionError a redirect loop.
        tmp.unlink(missing_ok=True)
        raise DataFileError(
            f"Could not download {dest.name} from {url} ({err}). Without network access, "
            f"download it elsewhere and put it at {dest}, or point --data.root (or the "
            f"MEDVIT_DATA_DIR environment variable) at a folder that holds it."
        ) from err
    if md5 is not None and not check_integrity(str(tmp), md5):
        got = md5sum(tmp)
        tmp.unlink(missing_ok=True)
        raise DataFileError(
            f"{url} downloaded with MD5 {got}, expected {md5}; the file was discarded. "
            "Try again, or download it by hand."
        )
    os.replace(tmp, dest)
    return dest


def _identity(path: Path) -> dict[str, object]:
    """What changes whenever a file's content may have changed, without reading it.

    The inode and ctime are part of it: ``touch -d``, ``cp -p`` or ``rsync -t`` can give a new
    file the old size and mtime, but a write (or a rename over the path) always sets a new
    ctime, which user space cannot set back.
    """
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "dev": st.st_dev,
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def content_md5(path: Path, record_dir: Path, progress: bool = True) -> str:
    """MD5 of a file's content, remembered in ``record_dir`` while the file stays the same.

    Hashing a 224 px file takes tens of seconds, so every run must not pay it again: the digest
    is recorded next to the caches with the file's identity (path, inode, size, mtime, ctime;
    see :func:`_identity`) and read back while that identity holds. Any write to the file
    changes its ctime, so a replaced file is hashed again, even with the old size and mtime.
    """
    key = _identity(path)
    tag = hashlib.sha1(key["path"].encode()).hexdigest()[:8]
    record = record_dir / f"{path.name}.{tag}.md5.json"
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            if isinstance(saved, dict) and saved.get("key") == key and saved.get("md5"):
                return str(saved["md5"])
        except (OSError, ValueError):
            pass
    got = md5sum(path, progress=progress)
    if _identity(path) != key:
        raise DataFileError(f"{path} changed while it was being read; try again.")
    try:
        record_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({"key": key, "md5": got}))
    except OSError:
        pass  # an unwritable cache folder only costs a new hash next time
    return got


def verify_md5(path: Path, expected: str, stamp_dir: Path) -> str:
    """Check a file's MD5 against the official one; returns it.

    The digest comes from :func:`content_md5`, so it is computed once per file content.
    """
    got = content_md5(path, stamp_dir)
    if got != expected:
        raise DataFileError(
            f"{path} has MD5 {got}, but the official MedMNIST file has {expected}. "
            "The file is corrupt or not the official one: delete it so it is downloaded again, "
            "or pass --data.verify_md5 false for a file of your own in the same format."
        )
    return got


def mmap_dir_for(npz: Path, cache_root: Path) -> Path:
    """Cache folder for one archive, keyed by its content (MD5), so a replaced file is redone."""
    return cache_root / f"{npz.stem}-{content_md5(npz, cache_root)[:16]}"


# Lock files (open for the life of the process) of the cache folders this process reads, so a
# prune by another process leaves them alone; DataLoader workers inherit them through fork.
_IN_USE: dict[Path, int] = {}
_COMPLETE = "complete"
#: Marks a decode cache of own images (data/decode.py); its staleness is its key, not an MD5.
DECODE_MANIFEST = "manifest.json"
_LOCK = ".lock"


def _flock(path: Path, how: int) -> int | None:
    """An fd of ``path`` locked with ``how`` (``fcntl.LOCK_*``), or None when it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        # A file system without flock: run unlocked rather than not at all.
        return fd
    return fd


def _hold(folder: Path) -> bool:
    """Mark a complete cache ``folder`` as in use by this process until it exits (shared lock).

    Returns False when the folder is not usable: incomplete, or being deleted by a prune.
    """
    if folder in _IN_USE:
        return True
    try:
        fd = _flock(folder / _LOCK, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return (folder / _COMPLETE).is_file()  # read-only cache: nobody can prune it either
    if fd is None:
        return False  # a prune holds it: it is being deleted
    if not (folder / _COMPLETE).is_file():
        os.close(fd)
        return False
    _IN_USE[folder] = fd
    return True


# Cache folders are "{stem}-{16 hex digits of the MD5}"; an unpack in progress (or one that
# died) is mkdtemp's "{stem}-{digest}.{random}".
_PARTIAL = re.compile(r"^(?P<stem>.+)-[0-9a-f]{16}\.[^.]+$")


def release_caches() -> None:
    """Drop this process's claims on the cache folders it read (see :func:`_hold`).

    For tests and long-lived processes (a notebook) that know they no longer read them.
    """
    while _IN_USE:
        os.close(_IN_USE.popitem()[1])


def cache_source(folder: Path) -> str | None:
    """The archive path a complete cache folder was unpacked from, or None."""
    try:
        return (folder / _COMPLETE).read_text().strip() or None
    except OSError:
        return None


def remove_cache(folder: Path) -> bool:
    """Delete a cache folder unless a process holds it; returns whether it was deleted."""
    try:
        fd = _flock(folder / _LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fd = -1  # no lock file could be made (e.g. a partial folder): nobody can hold it
    if fd is None:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        if fd >= 0:
            os.close(fd)
    return not folder.exists()


def prune_caches(cache_root: Path, source: Path | None = None, keep: Path | None = None) -> list:
    """Delete stale cache folders under ``cache_root``; returns the deleted folders.

    Stale: a folder of ``source`` other than ``keep`` (the file was replaced), a folder whose
    archive no longer exists or now has another content, or the partial folder of an unpack
    that died. With ``source`` only that archive's folders are looked at. Folders in use by a
    running process (see :func:`_hold`) are kept.
    """
    if not cache_root.is_dir():
        return []
    src = source.resolve() if source is not None else None
    removed = []
    for folder in sorted(cache_root.iterdir()):
        if not folder.is_dir() or folder == keep or folder.name.startswith("."):
            continue
        if src is not None and not folder.name.startswith(f"{src.stem}-"):
            continue
        if src is None and (folder / DECODE_MANIFEST).is_file():
            # A decode cache of own images, whose name is a key over its files, not an MD5: the
            # decoder prunes its stale ones itself (with ``source``).
            continue
        partial = _PARTIAL.match(folder.name)
        if partial:
            if src is not None:
                stale = True  # the caller holds this archive's unpack lock: nobody writes it
            else:
                unpack_lock = _unpack_lock(cache_root, partial["stem"], blocking=False)
                if unpack_lock is None:
                    continue  # being unpacked right now
                stale = True
                os.close(unpack_lock)
        else:
            recorded = cache_source(folder)
            if recorded is None:
                continue  # not one of ours
            if src is not None:
                stale = Path(recorded).resolve() == src
            else:
                path = Path(recorded)
                try:
                    digest = content_md5(path, cache_root, progress=False) if path.is_file() else ""
                except (OSError, DataFileError):
                    continue
                stale = folder.name != f"{path.stem}-{digest[:16]}"
        if stale and remove_cache(folder):
            removed.append(folder)
    if src is None:  # MD5 records of files that are gone
        for record in cache_root.glob("*.md5.json"):
            try:
                source = Path(json.loads(record.read_text())["key"]["path"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not source.is_file():
                record.unlink(missing_ok=True)
                removed.append(record)
    return removed


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cache_main(argv: list[str] | None = None) -> None:
    """``medvit cache [--cache_dir DIR] [--prune]``: list the unpack caches, or delete stale ones."""
    import argparse

    default = Path(os.environ.get("MEDVIT_DATA_DIR") or "data") / "mmap"
    parser = argparse.ArgumentParser(
        prog="medvit cache",
        description="The unpacked-array caches of MedMNIST files: list them, or with --prune "
        "delete those whose file is gone or was replaced, and unpacks that died halfway. "
        "Caches a running medvit process reads are kept.",
    )
    parser.add_argument(
        "--cache_dir",
        default=str(default),
        help=f"cache folder (default: $MEDVIT_DATA_DIR/mmap or data/mmap, here {default}); "
        "the --data.cache_dir of the runs",
    )
    parser.add_argument("--prune", action="store_true", help="delete the stale caches")
    args = parser.parse_args(argv)
    root = Path(args.cache_dir)
    if not root.is_dir():
        parser.error(f"{root} is not a folder; pass the --data.cache_dir of your runs.")
    if args.prune:
        sizes = {p: _folder_size(p) for p in root.iterdir() if p.is_dir()}
        removed = prune_caches(root)
        for path in removed:
            print(f"removed {path}")
        freed = sum(sizes.get(p, 0) for p in removed)
        print(f"{len(removed)} stale entries removed from {root}, {freed / 2**20:.1f} MiB freed.")
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        source = cache_source(folder)
        state = "partial" if _PARTIAL.match(folder.name) else (source or "unknown source")
        print(f"{_folder_size(folder) / 2**20:10.1f} MiB  {folder.name}  {state}")


def _unpack_lock(cache_root: Path, stem: str, blocking: bool = True) -> int | None:
    """Hold the lock that lets one process at a time unpack archives named ``stem``.

    Returns None when ``blocking`` is false and another process holds it (or no lock file can
    be made, e.g. in a read-only folder, where nothing is unpacked anyway).
    """
    how = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        return _flock(cache_root / f".{stem}.unpack.lock", how)
    except OSError:
        return None


def extract_npz(npz: Path, out_dir: Path) -> Path:
    """Stream each member of ``npz`` into ``out_dir/{key}.npy`` without decoding it in memory.

    The members go to a temporary folder that is renamed to ``out_dir`` once complete and
    removed when anything fails, so a failed unpack leaves nothing behind. One process at a time
    unpacks a given archive name (a lock in the cache folder); the one that made a new folder
    deletes that archive's older ones (see :func:`prune_caches`).

    Raises:
        DataFileError: when the archive is unreadable, lacks one of the MedMNIST keys, holds a
            corrupt member, or would not fit on the cache's disk.
    """
    if (out_dir / _COMPLETE).is_file() and _hold(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = _unpack_lock(out_dir.parent, npz.stem)
    try:
        # Another process may have finished it meanwhile.
        if not ((out_dir / _COMPLETE).is_file() and _hold(out_dir)):
            _unpack(npz, out_dir)
            prune_caches(out_dir.parent, source=npz, keep=out_dir)
            _hold(out_dir)
    finally:
        if lock is not None:
            os.close(lock)
    return out_dir


# What a damaged archive raises from zipfile, zlib and struct while being opened or read.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    struct.error,
    OverflowError,
    UnicodeDecodeError,
)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def check_free_space(need: int, folder: Path, what: str) -> None:
    """Refuse to write ``need`` bytes into ``folder`` when its disk has less free space.

    Args:
        need: bytes about to be written.
        folder: where they go.
        what: the start of the message, ending in a verb (``"x.npz unpacks to"``).
    """
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DataFileError(
            f"{what} {need / 2**30:.2f} GiB, but {folder} has {free / 2**30:.2f} GiB free; "
            "free some space or choose --data.cache_dir."
        )


@contextmanager
def building(out: Path, source: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to build a cache in; on success it is marked complete
    (recording ``source``, see :func:`cache_source`) and renamed over ``out``, so a reader never
    sees a half-built cache. On any error the temporary folder is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        yield tmp
        (tmp / _COMPLETE).write_text(str(Path(source).resolve()))
        if out.exists():  # a folder without its marker (left by a crash): replace it
            shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _unpack(npz: Path, out_dir: Path) -> None:
    try:
        zf = zipfile.ZipFile(npz)
    except (*_ZIP_ERRORS, OSError) as err:
        raise DataFileError(f"{npz} is not a readable .npz archive ({_one_line(err)}).") from err
    with zf:
        members = {Path(name).stem: name for name in zf.namelist() if name.endswith(".npy")}
        missing = [key for key in KEYS if key not in members]
        if missing:
            raise DataFileError(
                f"{npz} lacks the key(s) {missing}; a MedMNIST file holds {list(KEYS)} "
                f"(found {sorted(members)})."
            )
        total = sum(zf.getinfo(members[key]).file_size for key in KEYS)
        check_free_space(total, out_dir.parent, f"{npz} unpacks to")
        with (
            building(out_dir, npz) as tmp,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"unpack {npz.name}",
                disable=total < (256 << 20),
            ) as bar,
        ):
            for key in KEYS:
                try:
                    with zf.open(members[key]) as src, open(tmp / f"{key}.npy", "wb") as dst:
                        while chunk := src.read(_CHUNK * 8):
                            dst.write(chunk)
                            bar.update(len(chunk))
                except _ZIP_ERRORS as err:
                    raise DataFileError(
                        f"{npz}: member '{members[key]}' is corrupt ({_one_line(err)}); "
                        "the file is damaged: download it again or rewrite it."
                    ) from err
                except OSError as err:
                    raise DataFileError(
                        f"Could not unpack {npz} member '{members[key]}' into "
                        f"{out_dir.parent} ({_one_line(err)}); free some space or choose "
                        "--data.cache_dir."
                    ) from err


def open_arrays(folder: Path, npz: Path) -> dict[str, np.ndarray]:
    """Memory-map every split array of an extracted archive."""
    arrays = {}
    for key in KEYS:
        try:
            with np.errstate(over="ignore"):  # a header with huge dimensions: the error says it
                arrays[key] = np.load(folder / f"{key}.npy", mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError, TypeError, OverflowError, MemoryError) as err:
            raise DataFileError(
                f"{npz}: key '{key}' is not a plain numeric array ({_one_line(err)})."
            ) from err
    return arrays
