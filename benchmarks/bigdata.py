"""Memory of training on a big 224 px set: flat as the file grows, not multiplied by workers.

For each dataset size it writes a synthetic MedMNIST-format file (uncompressed ``np.savez``,
random 224 px images), unpacks it once into memory-mapped ``.npy`` files (timed, in its own
process), then runs a few steps of ``medvit fit`` per DataLoader worker count and samples the
memory of the training process and all its workers every ``--interval`` seconds:

- RSS summed over processes: counts a shared page once per process that maps it, so it
  overstates forked workers (they share the parent's pages copy-on-write) and the page cache of
  the memory-mapped file;
- PSS summed: each shared page split between its sharers, the honest total;
- USS summed: pages private to each process (what a worker really adds).

    python benchmarks/bigdata.py --samples 2000 8000 32000 --workers 0 2 8 --out bigdata.json

Files are deleted when a size is done; the largest default (32k samples) is 4.8 GB on disk,
about 10 GB while its unpacked copy exists.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# ``python benchmarks/X.py`` puts benchmarks/ first on sys.path, so sibling scripts import by
# name; that is also why no script may share a package's name (no benchmarks/medmnist.py).
from pipeline import machine_info, write_report, write_synthetic_npz  # noqa: E402

MIB = 2**20


class TreeMemory:
    """Samples RSS, PSS and USS of a process and all its descendants in a background thread.

    Keeps the peak of each sum over the samples, and the peak of the root process alone.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = {"rss": 0, "pss": 0, "uss": 0, "root_rss": 0, "root_pss": 0, "processes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = {"rss": 0, "pss": 0, "uss": 0}
            counted = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue  # a worker that just exited
                counted += 1
                total["rss"] += info.rss
                total["pss"] += info.pss
                total["uss"] += info.uss
                if proc.pid == self.root.pid:
                    self.peak["root_rss"] = max(self.peak["root_rss"], info.rss)
                    self.peak["root_pss"] = max(self.peak["root_pss"], info.pss)
            for key, value in total.items():
                self.peak[key] = max(self.peak[key], value)
            self.peak["processes"] = max(self.peak["processes"], counted)
            self.samples += 1
            self._stop.wait(self.interval)

    def peaks_mb(self) -> dict[str, float]:
        out = {f"peak_{k}_mb": v / MIB for k, v in self.peak.items() if k != "processes"}
        out["processes"] = self.peak["processes"]
        out["samples"] = self.samples
        return out


def run_monitored(cmd: list[str], env: dict[str, str], interval: float, timeout: float) -> dict:
    """Run ``cmd``, sampling its process tree; fail with its output if it fails.

    Returns the peaks (MB), the wall time and the command's output (``output``).
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        with TreeMemory(proc.pid, interval) as mem:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        log.seek(0)
        output = log.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{output[-4000:]}")
    return {"wall_s": time.perf_counter() - t0, **mem.peaks_mb(), "output": output}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        NO_ALBUMENTATIONS_UPDATE="1",
    )
    return env


UNPACK = """
import sys, time
from medvit.data.medmnist import MedMNISTDataModule
dm = MedMNISTDataModule(flag=sys.argv[1], size=int(sys.argv[2]), root=sys.argv[3],
                        cache_dir=sys.argv[4], download=False, verify_md5=False)
t = time.perf_counter(); dm.prepare_data(); print(f"UNPACK_S {time.perf_counter() - t:.3f}")
"""


def fit_command(
    args: argparse.Namespace, root: Path, cache: Path, workers: int, run_dir: Path
) -> list[str]:
    """A short ``medvit fit`` on the synthetic file: ``--steps`` steps, 2 validation batches."""
    return [
        sys.executable,
        "-m",
        "medvit",
        "fit",
        f"--seed_everything={args.seed}",
        f"--data.flag={args.flag}",
        f"--data.size={args.size}",
        f"--data.root={root}",
        f"--data.cache_dir={cache}",
        "--data.download=false",
        "--data.verify_md5=false",
        f"--data.num_workers={workers}",
        f"--data.global_batch_size={args.batch_size}",
        f"--model.model_name={args.model}",
        f"--model.patch_size={args.patch_size}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={args.steps}",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
        "--run.test_after_fit=false",
        f"--run.dir={run_dir}",
    ]


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def bench_size(args: argparse.Namespace, n_train: int, workdir: Path) -> list[dict[str, Any]]:
    """Write, unpack and train on one dataset size; return one result row per worker count."""
    from medvit.data.files import file_name

    n_eval = max(args.batch_size * 2, n_train // 10)
    root, cache = workdir / f"n{n_train}", workdir / f"n{n_train}-mmap"
    path = root / file_name(args.flag, args.size)
    t = time.perf_counter()
    write_synthetic_npz(path, args.flag, args.size, (n_train, n_eval, n_eval), seed=args.seed)
    write_s = time.perf_counter() - t
    file_gb = path.stat().st_size / 1e9
    env = child_env(args.threads)
    try:
        unpack = run_monitored(
            [sys.executable, "-c", UNPACK, args.flag, str(args.size), str(root), str(cache)],
            env,
            args.interval,
            args.timeout,
        )
        # The unpack itself, without the interpreter's start-up and imports.
        unpack_s = float(unpack["output"].split("UNPACK_S")[-1].split()[0])
        rows = []
        for workers in args.workers:
            run_dir = workdir / f"run-n{n_train}-w{workers}"
            mem = run_monitored(
                fit_command(args, root, cache, workers, run_dir), env, args.interval, args.timeout
            )
            mem.pop("output")
            steps = _steps_done(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            rows.append(
                {
                    "n_train": n_train,
                    "n_total": n_train + 2 * n_eval,
                    "file_gb": file_gb,
                    "write_s": write_s,
                    "unpack_s": unpack_s,
                    "unpack_peak_rss_mb": unpack["peak_rss_mb"],
                    "num_workers": workers,
                    "train_steps": steps,
                    **mem,
                }
            )
            print(markdown_row(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def _steps_done(run_dir: Path) -> int | None:
    """Training steps recorded in the run's ``metrics.csv`` (proof that training ran)."""
    import csv

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh) if row.get("step")]
    return max(steps) + 1 if steps else None


MARKDOWN_HEADER = (
    "| train samples | file GB | unpack s | workers | processes | peak RSS sum MB | peak PSS sum MB "
    "| peak USS sum MB | main RSS MB |\n|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(r: dict[str, Any]) -> str:
    """One row of the memory table (see ``MARKDOWN_HEADER``)."""
    return (
        f"| {r['n_train']} | {r['file_gb']:.2f} | {r['unpack_s']:.1f} | {r['num_workers']} "
        f"| {r['processes']} | {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} "
        f"| {r['peak_uss_mb']:.0f} | {r['peak_root_rss_mb']:.0f} |"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flag", default="pathmnist", help="MedMNIST flag of the synthetic file.")
    parser.add_argument("--size", type=int, default=224, choices=(28, 64, 128, 224))
    parser.add_argument(
        "--samples", type=int, nargs="+", default=[2000, 8000, 32000], help="Train sizes."
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="Training steps per run.")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs.")
    parser.add_argument("--interval", type=float, default=0.2, help="Memory sampling period (s).")
    parser.add_argument("--timeout", type=float, default=1800, help="Per run, in seconds.")
    parser.add_argument("--workdir", default=None, help="Scratch folder (default: a temp folder).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (size, workers) pair and print the markdown table."""
    args = build_parser().parse_args(argv)
    channels = 3 if args.flag in ("pathmnist", "dermamnist", "bloodmnist", "retinamnist") else 1
    biggest_gb = max(args.samples) * 1.2 * args.size**2 * channels / 1e9
    parent = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    if free_gb(parent) < 2.5 * biggest_gb:
        raise ValueError(
            f"{parent} has {free_gb(parent):.1f} GB free; the largest size needs about "
            f"{2.5 * biggest_gb:.1f} GB (file + unpacked copy). Lower --samples or pick --workdir."
        )
    print(MARKDOWN_HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medvit-bigdata-", dir=parent) as tmp:
        for n in sorted(args.samples):
            rows.extend(bench_size(args, n, Path(tmp)))
    report = {
        "benchmark": "bigdata",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows,
    }
    if args.out:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
