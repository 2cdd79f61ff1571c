"""Own data vs MedMNIST: a CSV of PNG files, decoded once, trains as fast as the ``.npz``.

1. Export: the BreastMNIST file (``--root``; without it a synthetic file in the same format) is
   written out as one PNG per image plus ``labels.csv`` (``path,label,split`` with the official
   splits), what a user brings to ``medvit fit --data ImageDataModule --data.path labels.csv``.
2. Decode: ``ImageDataModule.prepare_data()`` on an empty cache (check the table, decode every
   PNG into the memory-mapped uint8 arrays) with 1 and ``--decode-workers`` processes: images/s
   and images/s per core of this one-time cost.
3. Training: ``medvit fit -c configs/experiment/breastmnist.yaml`` built by ``MedViTCLI`` as the
   command builds it, once on the ``.npz`` and once with ``--data ImageDataModule --data.path
   labels.csv --data.modality ultrasound`` (the flag's preset), same seed and model, runs
   alternating (ABBA). Epochs after the first are timed (no validation); the ratio PNG/npz is the
   median of the per-repeat ratios, in wall time and in CPU time (process and DataLoader workers;
   steadier on shared cores). Both runs train on the same bytes in the same order, so their
   final weights are compared too.

    python benchmarks/own_data.py --root /work/shared/data/medmnist --repeats 4 --epochs 3 \
        --out benchmarks/results/own_data/breastmnist_28.json
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin, on CPUs shared with DataLoader workers and others.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pipeline import machine_info, write_report, write_synthetic_npz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "experiment" / "breastmnist.yaml"
FLAG = "breastmnist"
SPLITS = ("train", "val", "test")
GOAL = 0.95


def npz_name(size: int) -> str:
    return f"{FLAG}.npz" if size == 28 else f"{FLAG}_{size}.npz"


def export_pngs(npz_path: Path, out: Path) -> Path:
    """One PNG per image of every split and ``labels.csv`` (``path,label,split``); the CSV."""
    from medmnist import INFO
    from PIL import Image

    names = INFO[FLAG]["label"]
    rows = []
    with np.load(npz_path) as npz:
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"][:, 0]
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                Image.fromarray(image).save(out / split / f"{i:05d}.png")
                rows.append([f"{split}/{i:05d}.png", names[str(int(label))], split])
    with open(out / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "split"], *rows])
    return out / "labels.csv"


def measure_decode(csv_path: Path, size: int, workers: int, cache: Path) -> dict[str, Any]:
    """One cache build of ``csv_path`` into the empty folder ``cache``: time and rates."""
    from medvit.data import decode
    from medvit.data.files import release_caches
    from medvit.data.images import ImageDataModule

    dm = ImageDataModule(str(csv_path), size=size, decode_workers=workers, cache_dir=str(cache))
    t0 = time.perf_counter()
    dm.prepare_data()
    took = time.perf_counter() - t0
    n = len(dm.table)
    release_caches()
    # Few files are decoded in this process: a pool would cost more than it saves.
    cores = 1 if workers <= 1 or n < getattr(decode, "_MIN_FILES_FOR_POOL", 0) else workers
    return {
        "decode_workers": workers,
        "processes": cores,
        "images": n,
        "seconds": took,
        "images_per_s": n / took,
        "images_per_s_per_core": n / took / cores,
    }


class EpochTimer(L.Callback):
    """Wall and CPU time (this process and its DataLoader workers) and images of each epoch."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.epochs: list[dict[str, float]] = []

    def _cpu(self) -> float:
        import psutil

        total = sum(self.proc.cpu_times()[:2])
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                total += sum(child.cpu_times()[:2])
        return total

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._wall, self._cpu0, self._images = time.perf_counter(), self._cpu(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self._images += len(args[1][0])  # (outputs, batch, batch_idx): images of the batch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        wall, cpu = time.perf_counter() - self._wall, self._cpu() - self._cpu0
        self.epochs.append({"wall_s": wall, "cpu_s": cpu, "images": self._images})


def fit_args(args: argparse.Namespace, source: str, data: dict[str, Path], run_dir: Path) -> list:
    """``medvit fit`` arguments of one training run on ``source`` (``npz`` or ``png``)."""
    out = [
        "fit",
        "-c",
        str(RECIPE),
        f"--seed_everything={args.seed}",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
        f"--run.dir={run_dir}",
        "--run.test_after_fit=false",
    ]
    if source == "npz":
        out += [f"--data.root={data['root']}", "--data.download=false", "--data.verify_md5=false"]
    else:
        out += ["--data", "ImageDataModule", f"--data.path={data['csv']}"]
        out += ["--data.modality=ultrasound", "--data.decode_workers=0"]
    out += [f"--data.size={args.size}", f"--data.cache_dir={data['cache'] / source}"]
    out += [f"--data.global_batch_size={args.batch_size}", f"--data.num_workers={args.num_workers}"]
    if args.patch_size is not None:
        out.append(f"--model.patch_size={args.patch_size}")
    return out


def train_once(argv: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Build ``medvit fit`` from ``argv``, fit with an :class:`EpochTimer`; timings and weights."""
    from medvit.data.files import release_caches
    from medvit.train.cli import MedViTCLI

    class BuildOnlyCLI(MedViTCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            pass

    cli = BuildOnlyCLI(args=argv)
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timed = timer.epochs[1:]  # the first epoch starts the workers and fills the page cache
    images = sum(e["images"] for e in timed)
    result = {
        "epochs": timer.epochs,
        "images_per_s": images / sum(e["wall_s"] for e in timed),
        "images_per_cpu_s": images / sum(e["cpu_s"] for e in timed),
    }
    weights = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    del cli
    release_caches()
    return result, weights


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference between two state dicts (NaN where both are NaN counts as equal)."""
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        diff = (x - y).abs()
        diff[torch.isnan(x) & torch.isnan(y)] = 0.0
        worst = max(worst, float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0)
    return worst


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Export, decode, train; the report."""
    if args.root is not None:
        root = Path(args.root)
        if not (root / npz_name(args.size)).is_file():
            raise ValueError(f"{root / npz_name(args.size)} does not exist.")
    else:
        root = work / "npz"
        n_eval = max(4, args.n_train // 4)
        write_synthetic_npz(
            root / npz_name(args.size), FLAG, args.size, (args.n_train, n_eval, n_eval)
        )
    t0 = time.perf_counter()
    csv_path = export_pngs(root / npz_name(args.size), work / "png")
    export_s = time.perf_counter() - t0

    decode = []
    for workers in sorted({1, args.decode_workers}):
        tries = [
            measure_decode(csv_path, args.size, workers, work / f"decode-{workers}-{i}")
            for i in range(args.decode_repeats)
        ]
        best = max(tries, key=lambda r: r["images_per_s"])  # the least disturbed build
        decode.append({**best, "images_per_s_all": [r["images_per_s"] for r in tries]})

    data = {"root": root, "csv": csv_path, "cache": work / "cache"}
    runs: dict[str, list[dict[str, Any]]] = {"npz": [], "png": []}
    weight_diff = []
    for r in range(args.repeats):
        # ABBA: a slow spell of the shared machine hits both sources alike.
        order = ("npz", "png") if r % 2 == 0 else ("png", "npz")
        weights = {}
        for source in order:
            result, weights[source] = train_once(
                fit_args(args, source, data, work / "runs" / f"{source}-{r}")
            )
            runs[source].append(result)
        weight_diff.append(max_abs_diff(weights["npz"], weights["png"]))
    ratios = [
        p["images_per_s"] / n["images_per_s"] for p, n in zip(runs["png"], runs["npz"], strict=True)
    ]
    cpu_ratios = [
        p["images_per_cpu_s"] / n["images_per_cpu_s"]
        for p, n in zip(runs["png"], runs["npz"], strict=True)
    ]
    result = {
        "images": {s: len(list((work / "png" / s).iterdir())) for s in SPLITS},
        "export_s": export_s,
        "decode": decode,
        "train": {
            source: {
                "images_per_s_median": statistics.median(r["images_per_s"] for r in rs),
                "images_per_cpu_s_median": statistics.median(r["images_per_cpu_s"] for r in rs),
                "runs": rs,
            }
            for source, rs in runs.items()
        },
        "ratio_png_over_npz": statistics.median(ratios),
        "ratios": ratios,
        "ratio_cpu_time": statistics.median(cpu_ratios),
        "ratios_cpu_time": cpu_ratios,
        "max_abs_weight_diff": weight_diff,
        "goal": GOAL,
    }
    result["meets_goal"] = result["ratio_png_over_npz"] >= GOAL
    return result


def markdown(report: dict[str, Any]) -> str:
    """The RESULTS.md rows of a report."""
    r, a = report["result"], report["config"]
    lines = [
        "| decode processes | images | s | images/s | images/s per core |",
        "|---|---|---|---|---|",
    ]
    for d in r["decode"]:
        lines.append(
            f"| {d['processes']} | {d['images']} | {d['seconds']:.2f} "
            f"| {d['images_per_s']:.0f} | {d['images_per_s_per_core']:.0f} |"
        )
    t = r["train"]
    lines += [
        "",
        "| px | batch | workers | repeats x timed epochs | npz img/s | PNG img/s "
        "| PNG/npz (wall, median) | PNG/npz (CPU time) | max weight diff |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {a['size']} | {a['batch_size']} | {a['num_workers']} | {a['repeats']} x "
        f"{a['epochs'] - 1} | {t['npz']['images_per_s_median']:.1f} "
        f"| {t['png']['images_per_s_median']:.1f} | {r['ratio_png_over_npz']:.3f} "
        f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) | {r['ratio_cpu_time']:.3f} "
        f"| {max(r['max_abs_weight_diff']):.1e} |",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", default=None, help=f"Folder with the real {FLAG} file (default: synthetic)."
    )
    parser.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224))
    parser.add_argument("--n-train", type=int, default=256, help="Synthetic train samples.")
    parser.add_argument("--decode-workers", type=int, default=2, help="Besides 1 process.")
    parser.add_argument("--decode-repeats", type=int, default=2, help="Builds per worker count.")
    parser.add_argument("--repeats", type=int, default=4, help="Training runs per source (ABBA).")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per run; the first untimed.")
    parser.add_argument("--batch-size", type=int, default=16, help="The recipe's: 16.")
    parser.add_argument("--num-workers", type=int, default=1, help="The recipe's: 1.")
    parser.add_argument("--patch-size", type=int, default=None, help="Default: the recipe's (4).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the process.")
    parser.add_argument("--workdir", default=None, help="Temporary files here (default: /tmp).")
    parser.add_argument("--out", default=None, help="Write the report as JSON here.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the markdown rows; return the report."""
    args = build_parser().parse_args(argv)
    if args.epochs < 2 or args.repeats < 1:
        raise ValueError("--epochs must be >= 2 (the first is not timed) and --repeats >= 1.")
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one table, not 8 banners
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*limit_val_batches=0.*")
    with tempfile.TemporaryDirectory(prefix="medvit-own-data-", dir=args.workdir) as tmp:
        result = run(args, Path(tmp))
    report = {
        "benchmark": "own_data",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "data": f"real {FLAG} ({args.root})" if args.root else f"synthetic ({args.n_train} train)",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "result": result,
    }
    print(markdown(report))
    if args.out:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
