"""MedMNISTDataModule: formats of every task, errors on bad files, download, memory mapping."""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_medmnist_npz

from medvit.data.files import (
    DataFileError,
    download,
    md5sum,
    prune_caches,
    release_caches,
    verify_md5,
)
from medvit.data.medmnist import FLAGS_2D, MedMNISTDataModule

CASES = [
    # flag, size, task, classes, channels
    ("breastmnist", 28, "binary", 2, 1),
    ("dermamnist", 28, "multiclass", 7, 3),
    ("chestmnist", 28, "multilabel", 14, 1),
    ("retinamnist", 28, "ordinal", 5, 3),
    ("pathmnist", 64, "multiclass", 9, 3),
    ("organamnist", 128, "multiclass", 11, 1),
    ("bloodmnist", 224, "multiclass", 8, 3),
]


def module(root: Path, flag: str, size: int = 28, **kwargs) -> MedMNISTDataModule:
    kwargs.setdefault("verify_md5", False)
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("global_batch_size", 8)
    return MedMNISTDataModule(
        flag=flag, size=size, root=str(root), cache_dir=str(root / "cache"), **kwargs
    )


@pytest.mark.parametrize(("flag", "size", "task", "classes", "channels"), CASES)
def test_every_task_and_channel_count(synthetic_root, flag, size, task, classes, channels):
    n = (10, 4, 6) if size >= 128 else (24, 8, 10)
    root = synthetic_root(flag, size, n=n)
    dm = module(root, flag, size)
    assert (dm.task, dm.num_classes, dm.in_chans, dm.img_size) == (task, classes, channels, size)
    assert len(dm.class_names) == classes
    dm.prepare_data()
    dm.setup("fit")
    assert dm.data_test is None, "fit must not open the test split"
    assert (len(dm.data_train), len(dm.data_val)) == n[:2]
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (8, channels, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1.01 and x.max() <= 1.01
    if task == "multilabel":
        assert y.shape == (8, classes) and y.dtype == torch.float32
        assert set(y.unique().tolist()) <= {0.0, 1.0}
    else:
        assert y.shape == (8,) and y.dtype == torch.long
        assert y.min() >= 0 and y.max() < classes
    dm.setup("test")
    x, y, index = next(iter(dm.test_dataloader()))
    assert index.tolist() == list(range(len(index))), "test items keep their split order"


def test_grey_images_fed_as_three_channels(synthetic_root):
    root = synthetic_root("pneumoniamnist")
    dm = module(root, "pneumoniamnist", in_chans=3)
    dm.prepare_data()
    dm.setup("fit")
    x, _, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1] == 3
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_rgb_cannot_be_fed_as_one_channel(tmp_path):
    with pytest.raises(ValueError, match="RGB"):
        MedMNISTDataModule(flag="dermamnist", root=str(tmp_path), in_chans=1)


def test_resize_to_model_size(synthetic_root):
    root = synthetic_root("breastmnist")
    dm = module(root, "breastmnist", img_size=64)
    dm.prepare_data()
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (64, 64)


def test_unknown_and_3d_flags_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="Known 2D flags"):
        MedMNISTDataModule(flag="breastmnis", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"size must be one of \(28, 64\) for adrenalmnist3d"):
        MedMNISTDataModule(flag="adrenalmnist3d", size=128, root=str(tmp_path))
    with pytest.raises(ValueError, match="size must be one of"):
        MedMNISTDataModule(flag="breastmnist", size=32, root=str(tmp_path))
    assert len(FLAGS_2D) == 12


def test_global_batch_must_divide_world_size(synthetic_root):
    root = synthetic_root("breastmnist")
    dm = module(root, "breastmnist", global_batch_size=10)

    class FakeTrainer:
        world_size = 4

    dm.trainer = FakeTrainer()
    dm.prepare_data()
    with pytest.raises(ValueError, match="not divisible by the number of devices"):
        dm.setup("fit")
    FakeTrainer.world_size = 2
    dm.setup("fit")
    assert dm.batch_size_per_device == 5


def test_missing_file_without_download_names_file_and_url(tmp_path):
    dm = MedMNISTDataModule(flag="breastmnist", root=str(tmp_path), download=False)
    with pytest.raises(DataFileError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "breastmnist.npz") in message
    assert "zenodo.org" in message and "MEDVIT_DATA_DIR" in message


def test_unreachable_server_fails_fast_with_where_to_put_file(tmp_path):
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    dm = MedMNISTDataModule(flag="breastmnist", root=str(tmp_path), base_url="http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DataFileError) as err:
        dm.prepare_data()
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "http://127.0.0.1:9/breastmnist.npz" in message
    assert str(tmp_path / "breastmnist.npz") in message
    assert not (tmp_path / "breastmnist.npz").exists() and not list(tmp_path.glob("*.part"))


@pytest.fixture
def http_server(tmp_path):
    """Serve a folder on 127.0.0.1; yields (folder, base_url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_local_server_without_md5(http_server, tmp_path):
    served, url = http_server
    make_medmnist_npz(served / "dermamnist.npz", "dermamnist")
    dm = module(tmp_path / "root", "dermamnist", base_url=url)
    dm.prepare_data()
    assert md5sum(tmp_path / "root" / "dermamnist.npz") == md5sum(served / "dermamnist.npz")
    dm.setup("fit")
    assert len(dm.data_train) == 40


def test_download_with_wrong_md5_is_discarded(http_server, tmp_path):
    served, url = http_server
    make_medmnist_npz(served / "breastmnist.npz", "breastmnist")
    dm = MedMNISTDataModule(flag="breastmnist", root=str(tmp_path / "root"), base_url=url)
    with pytest.raises(DataFileError, match="expected 750601b1f35ba3300ea97c75c52ff8f6"):
        dm.prepare_data()
    assert not (tmp_path / "root" / "breastmnist.npz").exists()


def test_download_of_official_file_is_md5_checked(http_server, real_data, tmp_path):
    served, url = http_server
    (served / "breastmnist.npz").write_bytes((real_data / "breastmnist.npz").read_bytes())
    dm = MedMNISTDataModule(
        flag="breastmnist", root=str(tmp_path / "root"), base_url=url, num_workers=0
    )
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val)) == (546, 78)


def test_download_replaces_a_part_file_left_by_a_killed_run(http_server, tmp_path):
    served, url = http_server
    (served / "x.npz").write_bytes(b"the served bytes")
    dest = tmp_path / "root" / "x.npz"
    dest.parent.mkdir()
    dest.with_name("x.npz.part").write_bytes(b"half")
    download(f"{url}/x.npz", dest, md5=None)
    assert dest.read_bytes() == b"the served bytes"
    assert not dest.with_name("x.npz.part").exists()


def test_stalled_download_times_out_leaving_no_file_and_says_where_to_put_it(tmp_path):
    """A server that promises 1 MiB, sends 10 bytes, then stops answering."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            release.wait(10)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x.npz"
    dest = tmp_path / "root" / "x.npz"
    try:
        start = time.monotonic()
        with pytest.raises(DataFileError, match="put it at") as err:
            download(url, dest, md5=None, timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert url in str(err.value) and str(dest) in str(err.value)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


def test_existing_file_with_wrong_md5_is_refused(synthetic_root):
    root = synthetic_root("breastmnist")
    dm = module(root, "breastmnist", verify_md5=True)
    with pytest.raises(DataFileError, match="MD5 .* but the official MedMNIST file has"):
        dm.prepare_data()


def _rewrite(path: Path, **changes) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"val_labels": None}, r"lacks the key\(s\) \['val_labels'\]"),
        (
            {"train_images": np.zeros((40, 28, 28, 3), np.uint8)},
            r"'train_images' has shape \(40, 28, 28, 3\)",
        ),
        ({"test_images": np.zeros((16, 28, 28), np.float32)}, r"'test_images' .* dtype float32"),
        ({"val_labels": np.zeros((12,), np.uint8)}, r"'val_labels' has shape \(12,\)"),
        (
            {"train_labels": np.full((40, 1), 7, np.uint8)},
            r"'train_labels' holds values in \[7, 7\]",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_key(synthetic_root, change, match):
    root = synthetic_root("breastmnist")
    _rewrite(root / "breastmnist.npz", **change)
    dm = module(root, "breastmnist")
    with pytest.raises(DataFileError, match=match):
        dm.prepare_data()


def test_not_a_zip_is_refused(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file")
    dm = module(tmp_path, "breastmnist")
    with pytest.raises(DataFileError, match="not a readable .npz"):
        dm.prepare_data()


def test_arrays_are_memory_mapped_and_not_pickled(synthetic_root):
    root = synthetic_root("pathmnist", 64, n=(64, 8, 8))
    dm = module(root, "pathmnist", 64)
    dm.prepare_data()
    dm.setup("fit")
    data = dm.data_train
    data[0]
    assert isinstance(data._array("train_images"), np.memmap)
    # A worker receives paths, not the split: the pickle stays tiny next to 64 * 64*64*3 bytes.
    assert len(pickle.dumps(data)) < data._array("train_images").nbytes / 20


def test_replaced_file_is_unpacked_again(synthetic_root):
    root = synthetic_root("breastmnist", n=(20, 4, 4))
    dm = module(root, "breastmnist")
    dm.prepare_data()
    time.sleep(0.01)
    make_medmnist_npz(root / "breastmnist.npz", "breastmnist", n=(30, 4, 4))
    dm = module(root, "breastmnist")
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.data_train) == 30


def _same_size_other_content(path: Path) -> None:
    """Rewrite ``path`` with other pixels but the same size and mtime (touch -d, cp -p)."""
    st = path.stat()
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["train_images"] = 255 - arrays["train_images"]
    np.savez(path, **arrays)  # stored, not compressed: the size stays the same
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _stored_npz(path: Path) -> None:
    """Rewrite ``path`` uncompressed, so other content can keep the same size."""
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.savez(path, **arrays)


def test_same_size_and_mtime_other_content_is_served_fresh(synthetic_root):
    root = synthetic_root("breastmnist", n=(20, 4, 4))
    npz = root / "breastmnist.npz"
    _stored_npz(npz)
    dm = module(root, "breastmnist")
    dm.prepare_data()
    dm.setup("fit")
    old = np.array(dm.data_train._array("train_images"))
    release_caches()  # as if that run had ended
    _same_size_other_content(npz)
    dm = module(root, "breastmnist")
    dm.prepare_data()
    dm.setup("fit")
    np.testing.assert_array_equal(dm.data_train._array("train_images"), 255 - old)
    # The old file's cache was pruned when the new one was made.
    caches = [p.name for p in (root / "cache").iterdir() if p.is_dir()]
    assert len(caches) == 1, caches


def test_md5_record_is_keyed_by_content(synthetic_root):
    root = synthetic_root("breastmnist", n=(20, 4, 4))
    npz = root / "breastmnist.npz"
    _stored_npz(npz)
    official = md5sum(npz)  # this file plays the official one
    verify_md5(npz, official, root / "cache")
    _same_size_other_content(npz)
    with pytest.raises(DataFileError, match="MD5"):
        verify_md5(npz, official, root / "cache")


def _corrupt_member(path: Path, member: str) -> None:
    """Flip bytes inside one member's compressed data (its CRC then no longer matches)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    header = 30 + len(info.filename.encode()) + len(info.extra)  # local file header
    start = info.header_offset + header + info.compress_size // 2
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_member_one_line_and_no_partial_folder(synthetic_root):
    root = synthetic_root("breastmnist", n=(20, 4, 4))
    npz = root / "breastmnist.npz"
    _stored_npz(npz)
    _corrupt_member(npz, "val_images.npy")
    for _ in range(2):  # every try, not only the first
        dm = module(root, "breastmnist")
        with pytest.raises(DataFileError) as err:
            dm.prepare_data()
        message = str(err.value)
        assert "\n" not in message
        assert str(npz) in message and "val_images.npy" in message and "corrupt" in message
    assert [p.name for p in (root / "cache").iterdir() if p.is_dir()] == []


def test_corrupt_compressed_member_is_one_line(synthetic_root):
    root = synthetic_root("breastmnist", n=(20, 4, 4))  # savez_compressed: deflate errors
    npz = root / "breastmnist.npz"
    _corrupt_member(npz, "train_images.npy")
    with pytest.raises(DataFileError, match="member 'train_images.npy' is corrupt"):
        module(root, "breastmnist").prepare_data()
    assert [p.name for p in (root / "cache").iterdir() if p.is_dir()] == []


def test_prune_keeps_current_and_in_use_caches(synthetic_root, tmp_path):
    root = synthetic_root("breastmnist", n=(20, 4, 4))
    cache = root / "cache"
    dm = module(root, "breastmnist")
    dm.prepare_data()
    current = next(p for p in cache.iterdir() if p.is_dir())
    # Leftovers: a cache of a file that is gone, one of a replaced file, a dead partial unpack.
    gone = synthetic_root("dermamnist", n=(8, 4, 4))
    module(gone, "dermamnist").prepare_data()  # same cache folder (root / "cache")
    (gone / "dermamnist.npz").unlink()
    gone_cache = next(p.name for p in cache.iterdir() if p.name.startswith("dermamnist-"))
    old = cache / "breastmnist-0123456789abcdef"
    old.mkdir()
    (old / "complete").write_text(str((root / "breastmnist.npz").resolve()))
    partial = cache / "breastmnist-0123456789abcdef.x1y2z3"
    partial.mkdir()
    record = next(p.name for p in cache.glob("dermamnist.npz.*.md5.json"))
    release_caches()
    removed = prune_caches(cache)
    assert sorted(p.name for p in removed) == sorted([old.name, partial.name, gone_cache, record])
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert left == [current.name]
    # A cache some process holds (here this one, through the DataModule) survives a prune
    # even when it is stale: its file is replaced while a run still reads it.
    dm = module(root, "breastmnist")
    dm.prepare_data()
    make_medmnist_npz(root / "breastmnist.npz", "breastmnist", n=(30, 4, 4))
    assert prune_caches(cache) == []
    assert current.is_dir()


def test_cache_prune_command(synthetic_root, capsys):
    from medvit.cli import main

    root = synthetic_root("breastmnist", n=(20, 4, 4))
    cache = root / "cache"
    module(root, "breastmnist").prepare_data()
    release_caches()
    make_medmnist_npz(root / "breastmnist.npz", "breastmnist", n=(30, 4, 4))
    module(root, "breastmnist").prepare_data()  # replaced: a new cache, the old one pruned
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    (root / "breastmnist.npz").unlink()  # gone: its cache is stale too, once nobody reads it
    main(["cache", "--cache_dir", str(cache)])
    assert "breastmnist-" in capsys.readouterr().out
    main(["cache", "--cache_dir", str(cache), "--prune"])
    out = capsys.readouterr().out
    assert "1 stale entries removed" in out and ".md5.json" in out, out  # the file's MD5 record
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # this process still reads it
    release_caches()
    main(["cache", "--cache_dir", str(cache), "--prune"])
    out = capsys.readouterr().out
    assert "1 stale entries removed" in out and "breastmnist-" in out, out
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_folds_file_replaces_train_val_and_keeps_test(synthetic_root, tmp_path):
    root = synthetic_root("breastmnist", n=(20, 6, 8))
    folds = tmp_path / "folds.csv"
    rows = ["split,index,repeat,fold"]
    rows += [f"train,{i},0,{i % 2}" for i in range(20)] + [f"val,{i},0,{i % 2}" for i in range(6)]
    folds.write_text("\n".join(rows) + "\n")
    dm = module(root, "breastmnist", folds_file=str(folds), fold=1)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (13, 13, 8)
    train = {
        (int(s), int(i))
        for s, i in zip(dm.data_train._split_of, dm.data_train._index_of, strict=True)
    }
    val = {
        (int(s), int(i)) for s, i in zip(dm.data_val._split_of, dm.data_val._index_of, strict=True)
    }
    assert not train & val and len(train | val) == 26
    with pytest.raises(ValueError, match="no fold 5"):
        module(root, "breastmnist", folds_file=str(folds), fold=5).setup("fit")


def test_class_counts(synthetic_root):
    root = synthetic_root("dermamnist", n=(21, 7, 7))
    dm = module(root, "dermamnist")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_counts("train").tolist() == [3] * 7


def test_real_breastmnist_official_splits(real_data, tmp_path):
    dm = MedMNISTDataModule(
        flag="breastmnist", root=str(real_data), cache_dir=str(tmp_path), num_workers=0
    )
    dm.prepare_data()  # MD5 check of the official file
    dm.setup()
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (546, 78, 156)
    assert dm.class_counts("test").tolist() == [42, 114]
    with zipfile.ZipFile(real_data / "breastmnist.npz") as zf:
        assert "train_images.npy" in zf.namelist()
