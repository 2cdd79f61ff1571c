"""Data pipeline throughput alone: memory-mapped read + augmentation + collate, with workers.

It runs medvit's own training DataLoader (``MedMNISTDataModule.train_dataloader``: the seeded
sampler, the flag's augmentation preset, default collate) and times batches after the workers
have started. Without ``--root`` it writes a synthetic file in the MedMNIST format first.
Each batch is moved to ``--device``; with ``--augment-on device`` the workers only read uint8
images and the preset runs there on the whole batch (the DataModule's
``on_after_batch_transfer``), and that time is reported separately.

    python benchmarks/pipeline.py --flag pathmnist --size 224 --batch-size 64 --num-workers 8
    python benchmarks/pipeline.py --flag pathmnist --size 224 --batch-size 256 \
        --num-workers 8 --augment-on workers device --device cuda

The helpers here (machine description, synthetic MedMNIST files) are shared with
``throughput.py`` and ``bigdata.py``.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin, on CPUs shared with DataLoader workers and others.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from medmnist import INFO  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or whatever ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: host, CPU, cores, GPU, library versions, UTC date."""
    import lightning

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def write_synthetic_npz(
    path: str | os.PathLike,
    flag: str,
    size: int,
    n: tuple[int, int, int],
    seed: int = 0,
    chunk: int = 1024,
    progress: bool | None = None,
) -> Path:
    """Write an uncompressed ``np.savez`` file in the MedMNIST format with random images.

    Images go to a temporary memory-mapped ``.npy`` first, chunk by chunk, and ``np.savez`` streams
    them into the archive, so a file of tens of GB never has to fit in RAM.

    Args:
        path: the ``.npz`` to write (e.g. ``{root}/pathmnist_224.npz``).
        flag: MedMNIST flag: decides channels, label layout and number of classes.
        size: image side in pixels.
        n: samples in (train, val, test).
        seed: seed of the random images and labels.
        chunk: images generated per step.
        progress: show a progress bar; ``None``: only for files over 256 MiB.
    """
    if flag not in INFO:
        raise ValueError(f"Unknown MedMNIST flag '{flag}'.")
    info = INFO[flag]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if info["n_channels"] == 1 else (size, size, 3)
    n_classes = len(info["label"])
    multilabel = info["task"].startswith("multi-label")
    if progress is None:
        progress = sum(n) * int(np.prod(shape)) > (256 << 20)
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synthetic-") as tmp:
        for split, count in zip(SPLITS, n, strict=True):
            images = np.lib.format.open_memmap(
                Path(tmp) / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(count, *shape)
            )
            desc = f"synthetic {split} {path.name}"
            for start in tqdm(range(0, count, chunk), desc=desc, disable=not progress, leave=False):
                stop = min(count, start + chunk)
                images[start:stop] = rng.integers(
                    0, 256, size=(stop - start, *shape), dtype=np.uint8
                )
            images.flush()
            if multilabel:
                labels = (rng.random((count, n_classes)) < 0.3).astype(np.uint8)
            else:
                labels = rng.integers(0, n_classes, size=(count, 1), dtype=np.uint8)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        part = path.with_name(path.name + ".part.npz")
        np.savez(part, **arrays)
        del arrays
        os.replace(part, path)
    return path


def make_datamodule(
    root: str | os.PathLike,
    flag: str,
    size: int,
    batch_size: int,
    num_workers: int,
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> Any:
    """medvit's DataModule on a local file (no download, no MD5: synthetic files are allowed).

    ``options`` are further ``MedMNISTDataModule`` arguments (``img_size``, ``augmentation``,
    ``augment_on``, ``pin_memory``, ...).
    """
    from medvit.data.medmnist import MedMNISTDataModule

    return MedMNISTDataModule(
        flag=flag,
        size=size,
        root=str(root),
        global_batch_size=batch_size,
        num_workers=num_workers,
        download=False,
        verify_md5=False,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        **options,
    )


def measure_pipeline(
    root: str | os.PathLike,
    flag: str,
    size: int,
    batch_size: int,
    num_workers: int,
    batches: int = 30,
    warmup_batches: int = 3,
    device: str = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """Images per second of medvit's training data path alone, up to batches on ``device``.

    Read + augment + collate in the workers, then the move to ``device`` and, with
    ``augment_on="device"``, the batched augmentation there. The first ``warmup_batches``
    (worker start-up, page-cache misses) are not timed; the loader runs as many epochs as needed
    to deliver ``batches`` timed batches. ``options`` go to :func:`make_datamodule`.
    """
    if batches < 1 or warmup_batches < 0:
        raise ValueError(
            f"batches must be >= 1 and warmup_batches >= 0, got {batches}, {warmup_batches}."
        )
    dm = make_datamodule(root, flag, size, batch_size, num_workers, **options)
    pin_memory = dm.hparams.pin_memory
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t_unpack = time.perf_counter()
    dm.prepare_data()
    unpack_s = time.perf_counter() - t_unpack
    dm.setup("fit")
    loader = dm.train_dataloader()
    if len(loader) == 0:
        raise ValueError(
            f"the train split of {dm.path} has {len(dm.data_train)} samples: fewer than one batch "
            f"of {batch_size}."
        )
    needed = warmup_batches + batches
    t_start = time.perf_counter()
    seen, images, t0, first_batch_s = 0, 0, None, None
    on_device_s = 0.0  # transfer + batched augmentation, timed batches only
    shape = None
    epoch = 0
    while seen < needed:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            t_dev = time.perf_counter()
            # The hooks and the transfer in Lightning's order (seeds stay on the host).
            batch = dm.on_before_batch_transfer(batch, 0)
            batch = [
                b.to(dev, non_blocking=pin_memory) if isinstance(b, torch.Tensor) else b
                for b in batch
            ]
            x = dm.on_after_batch_transfer(batch, 0)[0]
            sync()
            if seen >= warmup_batches:
                on_device_s += time.perf_counter() - t_dev
            seen += 1
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t_start
                shape = list(x.shape)
            if seen == warmup_batches:
                t0 = time.perf_counter()
            elif seen > warmup_batches:
                if t0 is None:  # no warm-up asked for: time from the first batch on
                    t0 = t_start
                images += len(x)
            if seen >= needed:
                break
        epoch += 1
    elapsed = time.perf_counter() - t0
    del loader  # stops persistent workers
    ips = images / elapsed
    return {
        "flag": flag,
        "size": size,
        "img_size": dm.img_size,
        "in_chans": dm.in_chans,
        "augmentation": dm.hparams.augmentation or _preset(flag),
        "augment_on": dm.hparams.augment_on,
        "device": str(dev),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "batches_timed": batches,
        "batch_shape": shape,
        "images_per_s": ips,
        "batch_ms": 1000.0 * elapsed / batches,
        "images_per_s_per_worker": ips / max(1, num_workers),
        "on_device_ms_per_batch": 1000.0 * on_device_s / batches,
        # What the loader alone delivers (exact with 0 workers, a lower bound with more).
        "loader_images_per_s": images / max(elapsed - on_device_s, 1e-9),
        "first_batch_s": first_batch_s,
        "prepare_s": unpack_s,
    }


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """A benchmark's report as indented JSON (values JSON lacks, such as paths, as strings)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def _preset(flag: str) -> str:
    from medvit.data.transforms import preset_for_flag

    return preset_for_flag(flag)


def ensure_data(
    root: str | os.PathLike | None, flag: str, size: int, n_train: int, workdir: Path
) -> Path:
    """``root`` if it holds the flag's file, else a folder with a synthetic one in ``workdir``."""
    from medvit.data.files import file_name

    if root is not None:
        if not (Path(root) / file_name(flag, size)).is_file():
            raise ValueError(f"{Path(root) / file_name(flag, size)} does not exist.")
        return Path(root)
    folder = workdir / "data"
    n_eval = max(1, n_train // 8)
    write_synthetic_npz(folder / file_name(flag, size), flag, size, (n_train, n_eval, n_eval))
    return folder


def markdown_row(result: dict[str, Any]) -> str:
    """One row of the pipeline table (see ``MARKDOWN_HEADER``)."""
    r = result
    return (
        f"| {r['flag']} | {r['size']}->{r['img_size']} | {r['augmentation']} "
        f"| {r['augment_on']} | {r['device']} | {r['batch_size']} | {r['num_workers']} "
        f"| {r['images_per_s']:.0f} | {r['images_per_s_per_worker']:.0f} "
        f"| {r['loader_images_per_s']:.0f} | {r['on_device_ms_per_batch']:.1f} "
        f"| {r['first_batch_s']:.1f} |"
    )


MARKDOWN_HEADER = (
    "| flag | px (file->model) | augmentation | augment on | device | batch | workers | images/s "
    "| per worker | loader alone images/s | on-device ms/batch | first batch (s) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--flag", default="pathmnist", help="MedMNIST flag (decides preset, channels)."
    )
    parser.add_argument("--size", type=int, default=28, choices=SIZES, help="File image size.")
    parser.add_argument(
        "--img-size", type=int, default=None, help="Model input size (default: size)."
    )
    parser.add_argument("--in-chans", type=int, default=None, choices=(1, 3))
    parser.add_argument("--augmentation", default=None, help="Preset (default: the flag's).")
    parser.add_argument(
        "--augment-on",
        nargs="+",
        default=["workers"],
        choices=("workers", "device"),
        help="Where training augmentation runs; one run per value.",
    )
    parser.add_argument("--device", default="cpu", help="Where batches go (cpu, cuda).")
    parser.add_argument("--pin-memory", action="store_true", help="Pinned host batches.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--num-workers", type=int, nargs="+", default=[2], help="One run per value."
    )
    parser.add_argument("--batches", type=int, default=30, help="Timed batches per run.")
    parser.add_argument("--warmup-batches", type=int, default=3)
    parser.add_argument(
        "--root", default=None, help="Folder with the real file (default: synthetic)."
    )
    parser.add_argument("--n-train", type=int, default=2048, help="Synthetic train samples.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process.")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline benchmark for each worker count; print a markdown table."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medvit-pipeline-") as tmp:
        root = ensure_data(args.root, args.flag, args.size, args.n_train, Path(tmp))
        results = [
            measure_pipeline(
                root,
                args.flag,
                args.size,
                args.batch_size,
                workers,
                batches=args.batches,
                warmup_batches=args.warmup_batches,
                img_size=args.img_size,
                in_chans=args.in_chans,
                augmentation=args.augmentation,
                cache_dir=Path(tmp) / "mmap",
                pin_memory=args.pin_memory,
                augment_on=where,
                device=args.device,
            )
            for where in args.augment_on
            for workers in args.num_workers
        ]
    report = {
        "benchmark": "pipeline",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "data": "real" if args.root else f"synthetic ({args.n_train} train samples)",
        "results": results,
    }
    print(MARKDOWN_HEADER)
    for r in results:
        print(markdown_row(r))
    if args.out:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
