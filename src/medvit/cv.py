"""``medvit cv``: stratified (grouped, repeated) k-fold cross-validation of ``medvit fit``.

One CV directory holds everything (``cv_runs/<experiment>`` unless ``--cv-dir``)::

    cv_config.json                  the command, CV settings and fingerprints of config and folds
    folds.csv                       split,index,repeat,fold,label...[,group] of every pool sample
    runs/r{R}-f{K}/                 one normal medvit run folder per (repeat, fold)
    logs/r{R}-f{K}.log              stdout and stderr of that fold's process
    cv_summary.json, cv_summary.csv per-fold metrics, mean, std, 95% CI, ensemble test metrics
    ensemble_test_predictions.npz   test probabilities averaged over the fold models

Each fold is a separate ``python -m medvit.foldproc fit`` process (``medvit fit`` with its own
DDP group and wandb run) that dies with the CV process, even on ``kill -9``. The CV directory is
locked (``cv.lock``) while a CV runs in it, so a second ``medvit cv`` there refuses to start.
Rerunning the same command skips finished folds, resumes half-finished ones from
``checkpoints/last.ckpt`` and refuses to mix in a changed config or changed folds.
"""

from __future__ import annotations

import argparse
import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medvit.evaluate.splits import make_repeated_folds
from medvit.fileio import atomic_write, atomic_write_text
from medvit.runs import METRICS_FILE, PREDICTIONS_FILE, write_json

POOLS = ("train+val", "train")
CV_CONFIG = "cv_config.json"
FOLDS_FILE = "folds.csv"
SUMMARY_JSON = "cv_summary.json"
SUMMARY_CSV = "cv_summary.csv"
ENSEMBLE_FILE = "ensemble_test_predictions.npz"
LOCK_FILE = "cv.lock"
# Set by medvit cv for every fold; a user value would be silently overridden or break the layout.
RESERVED_ARGS = (
    "--run.dir",
    "--data.folds_file",
    "--data.fold",
    "--data.repeat",
    "--ckpt_path",
    "--wandb.name",
    "--wandb.job_type",
    "--print_config",
)
# Settings that say where files live or how progress is shown, not what is trained: they may
# change between an interrupted CV run and its resumption without invalidating finished folds.
VOLATILE_KEYS = (
    "run",
    "wandb",
    "ckpt_path",
    "data.folds_file",
    "data.fold",
    "data.repeat",
    "data.root",
    "data.cache_dir",
    "data.download",
    "data.base_url",
    "data.num_workers",
    "data.pin_memory",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "progress_bar",
)


@dataclass(frozen=True)
class FoldRun:
    """One training run of a CV: validation fold ``fold`` of repeat ``repeat``."""

    repeat: int
    fold: int

    @property
    def name(self) -> str:
        return f"r{self.repeat}-f{self.fold}"


@dataclass
class Pool:
    """The samples that are split into folds: official split and index, labels, task."""

    split: np.ndarray
    index: np.ndarray
    labels: np.ndarray
    task: str
    class_names: list[str]
    split_sizes: dict[str, int]

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"


# ------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    """Parser of the CV options; every other argument goes to ``medvit fit``."""
    parser = argparse.ArgumentParser(
        prog="medvit cv",
        description=(
            "k-fold cross-validation of `medvit fit`: stratified folds of the official train+val "
            "pool, one fit process per fold, the official test set evaluated by every fold model "
            "and by their ensemble. Arguments not listed here go to `medvit fit` (e.g. -c CONFIG, "
            "--trainer.max_epochs 10)."
        ),
        allow_abbrev=False,  # a fit option must never be taken for an abbreviated CV option
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds k (default 5)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fold split; repeat r uses seed + r"
    )
    parser.add_argument("--repeats", type=int, default=1, help="repeated k-fold: R x k runs")
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="FILE",
        help="CSV (columns split,index,group) or .npy (one id per pool sample, pool order: "
        "train then val) of group ids, e.g. patients; no group is split across folds",
    )
    parser.add_argument(
        "--pool", choices=POOLS, default="train+val", help="samples to split (default train+val)"
    )
    parser.add_argument(
        "--cv-dir", default=None, help="CV directory (default cv_runs/<experiment>)"
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` into CV options and ``medvit fit`` arguments; refuse reserved fit options."""
    parser = build_parser()
    args, fit_args = parser.parse_known_args(argv)
    for arg in fit_args:
        key = arg.split("=", 1)[0]
        if key in RESERVED_ARGS:
            parser.error(f"{key} is set by medvit cv for each fold; leave it out.")
    if fit_args and fit_args[0] == "fit":
        parser.error("write `medvit cv -c CONFIG ...`, without the word `fit`.")
    return args, fit_args


# ------------------------------------------------------------------------------- fit config
def resolve_fit_config(fit_args: list[str]) -> dict[str, Any]:
    """The resolved ``medvit fit`` config of ``fit_args`` (``--print_config`` in a subprocess)."""
    cmd = [sys.executable, "-m", "medvit", "fit", *fit_args, "--print_config"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ValueError(f"`medvit fit {shlex.join(fit_args)}` does not parse:\n{tail}")
    config = yaml.safe_load(proc.stdout)
    if not isinstance(config, dict) or "data" not in config:
        raise ValueError(f"`medvit fit --print_config` printed no config:\n{proc.stdout[-2000:]}")
    return config


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_fingerprint(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The config without :data:`VOLATILE_KEYS` (flattened, dotted keys) and its SHA-256."""
    flat = _flatten(config)
    kept = {
        k: v
        for k, v in flat.items()
        if not any(k == v_key or k.startswith(f"{v_key}.") for v_key in VOLATILE_KEYS)
    }
    text = json.dumps(kept, sort_keys=True, default=str)
    return kept, hashlib.sha256(text.encode()).hexdigest()


def experiment_of(config: dict[str, Any]) -> str:
    """Experiment name of a resolved fit config, as ``medvit fit`` names it."""
    from medvit.runs import experiment_name

    run, data = config.get("run") or {}, config["data"]
    return experiment_name(run.get("name"), data["flag"], data["size"])


def _check_fit_config(config: dict[str, Any]) -> None:
    """Refuse fit settings that would break the per-fold layout or never finish a fold."""
    flat = _flatten(config)
    for key in ("data.folds_file", "data.fold", "run.dir", "ckpt_path", "checkpoint.dirpath"):
        if flat.get(key) is not None:
            raise ValueError(
                f"the fit config sets {key}={flat[key]!r}; medvit cv sets it per fold. "
                "Remove it from the config."
            )
    if flat.get("run.test_after_fit") is False:
        raise ValueError(
            "run.test_after_fit is false; medvit cv needs every fold's test metrics and "
            "predictions. Remove --run.test_after_fit false."
        )


# ------------------------------------------------------------------------------- pool, folds
def load_pool(data_config: dict[str, Any], pool: str) -> Pool:
    """Labels of the pool (official train, or train then val) read through the DataModule."""
    from medvit.data.medmnist import MedMNISTDataModule

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got '{pool}'.")
    keys = ("flag", "size", "root", "download", "verify_md5", "cache_dir", "base_url")
    dm = MedMNISTDataModule(**{k: data_config[k] for k in keys if k in data_config})
    dm.prepare_data()
    dm.setup("fit")
    sizes = {"train": len(dm.data_train), "val": len(dm.data_val)}
    parts = [("train", dm.data_train.labels())]
    if pool == "train+val":
        parts.append(("val", dm.data_val.labels()))
    split = np.concatenate([np.full(len(lab), name) for name, lab in parts])
    index = np.concatenate([np.arange(len(lab)) for _, lab in parts])
    labels = np.concatenate([lab for _, lab in parts]).astype(np.int64)
    return Pool(split, index, labels, dm.task, dm.class_names, sizes)


def load_groups(path: str | os.PathLike, pool: Pool) -> np.ndarray:
    """Group id per pool sample from a CSV (``split,index,group``) or an ``.npy`` file.

    An ``.npy`` holds one id per pool sample in pool order (train, then val); for
    ``--pool train`` an array covering train+val is accepted and cut to train.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--group-by file {path} does not exist.")
    n = len(pool.index)
    if path.suffix == ".npy":
        groups = np.load(path, allow_pickle=False)
        n_all = pool.split_sizes["train"] + pool.split_sizes["val"]
        if groups.ndim == 1 and len(groups) == n_all and n == pool.split_sizes["train"]:
            groups = groups[:n]
        if groups.ndim != 1 or len(groups) != n:
            raise ValueError(
                f"{path} has shape {groups.shape}; expected one group id per pool sample ({n},), "
                "in pool order (official train, then val)."
            )
        return groups.astype(str)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"split", "index", "group"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} needs the columns {sorted(need)}, has {reader.fieldnames}.")
        table = {(r["split"], int(r["index"])): r["group"] for r in reader}
    keys = list(zip(pool.split.tolist(), pool.index.tolist(), strict=True))
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(
            f"{path} has no group for {len(missing)} pool sample(s), e.g. split={missing[0][0]} "
            f"index={missing[0][1]}; every pool sample needs one."
        )
    return np.array([table[k] for k in keys])


def folds_csv_text(pool: Pool, folds: np.ndarray, groups: np.ndarray | None) -> str:
    """``folds.csv`` content: one row per (repeat, pool sample), labels (and group) for audit."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if pool.multilabel:
        label_cols = [f"label_{i}" for i in range(pool.labels.shape[1])]
    else:
        label_cols = ["label"]
    writer.writerow(
        [
            "split",
            "index",
            "repeat",
            "fold",
            *label_cols,
            *(["group"] if groups is not None else []),
        ]
    )
    labels = pool.labels.reshape(len(pool.labels), -1).tolist()
    for r, fold_of in enumerate(folds.tolist()):
        for i, (split, index) in enumerate(
            zip(pool.split.tolist(), pool.index.tolist(), strict=True)
        ):
            extra = [groups[i]] if groups is not None else []
            writer.writerow([split, index, r, fold_of[i], *labels[i], *extra])
    return buf.getvalue()


def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# ------------------------------------------------------------------------------- directory
def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_cv_dir(cv_dir: Path, cv_config: dict[str, Any], folds_text: str) -> None:
    """Create the CV directory, or check that an existing one was made by the same setup.

    Raises:
        ValueError: the directory holds a CV of another config, other folds or other settings.
    """
    path = cv_dir / CV_CONFIG
    if path.is_file():
        old = json.loads(path.read_text())
        problems = []
        for key in ("folds", "repeats", "seed", "pool", "group_by_sha256"):
            if old.get(key) != cv_config[key]:
                problems.append(f"{key}: {old.get(key)!r} -> {cv_config[key]!r}")
        if old.get("fit_config_sha256") != cv_config["fit_config_sha256"]:
            diff = _differences(old.get("fit_config", {}), cv_config["fit_config"])
            problems.append("fit config changed: " + ("; ".join(diff[:10]) or "(hash only)"))
        elif old.get("folds_sha256") != cv_config["folds_sha256"]:
            problems.append("folds.csv would differ (data, labels or groups changed)")
        if problems:
            raise ValueError(
                f"{cv_dir} already holds a CV run with another setup, so its finished folds "
                "would not be comparable:\n  " + "\n  ".join(problems) + "\nUse another "
                "--cv-dir (or --run.name), or delete the directory to start over."
            )
        folds_path = cv_dir / FOLDS_FILE
        if folds_path.is_file() and _sha256(folds_path.read_bytes()) != old.get("folds_sha256"):
            raise ValueError(
                f"{folds_path} was modified after the CV started; restore it (delete it and "
                "rerun to have it rewritten) or use another --cv-dir."
            )
        if not folds_path.is_file():  # deleted: the recomputed folds are the recorded ones
            atomic_write_text(folds_path, folds_text)
        old.setdefault("invocations", []).append(cv_config["invocations"][0])
        write_json(path, old)
        return
    runs = cv_dir / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        raise ValueError(
            f"{cv_dir} has fold runs but no {CV_CONFIG}, so it cannot be checked; use another "
            "--cv-dir or delete it."
        )
    cv_dir.mkdir(parents=True, exist_ok=True)
    (cv_dir / "logs").mkdir(exist_ok=True)
    atomic_write_text(cv_dir / FOLDS_FILE, folds_text)
    write_json(path, cv_config)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's ``metrics.json``, or None when missing or unreadable."""
    path = run_dir / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(run_dir: Path) -> bool:
    """A fold is finished once its ``metrics.json`` has test metrics."""
    metrics = read_metrics(run_dir)
    return bool(metrics and metrics.get("test"))


# --------------------------------------------------------------------------------- locking
class CVDirBusy(ValueError):
    """Another ``medvit cv`` holds the CV directory."""


class CVDirLock:
    """An exclusive ``flock`` on ``{cv_dir}/cv.lock`` holding the PID of the CV that owns it.

    The kernel drops the lock when the last process holding the file closes it, whatever way
    it ends (``kill -9`` included), so a stale lock file never blocks a rerun. Fold processes
    inherit the descriptor: the folder stays locked while any fold of this CV still runs.
    """

    def __init__(self, cv_dir: Path) -> None:
        self.path = cv_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or refuse, naming the PID that holds it.

        Raises:
            CVDirBusy: another process holds the lock.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CVDirBusy(
                f"{self.path.parent} is in use by another medvit cv (PID {holder}); wait for it "
                "to finish or stop it, then rerun."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> CVDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# The lock of the CV this process runs, passed on to its fold processes (see CVDirLock).
_LOCK: CVDirLock | None = None


# ----------------------------------------------------------------------------- fold process
def launch(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` with stdout and stderr appended to ``log_path``; return its exit code.

    On an exception (Ctrl-C, or SIGTERM turned into SystemExit by :func:`main`) the child is
    terminated too, so an interrupted CV never leaves a fold training in the background. When
    this process is killed outright, the child kills itself (:mod:`medvit.foldproc`).
    """
    from medvit.foldproc import PARENT_ENV

    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    # Each fold starts its own wandb service. One inherited from this process (a notebook or a
    # test that used wandb) would outlive a killed fold and still hold its run ID, so the
    # fold's resumed run would be refused with "run ID ... is in use".
    env.pop("WANDB_SERVICE", None)
    keep = (_LOCK.fd,) if _LOCK is not None and _LOCK.fd is not None else ()
    with open(log_path, "a") as log:
        stamp = datetime.now().isoformat(timespec="seconds")
        log.write(f"\n===== {stamp} $ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=keep)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def fold_command(
    fit_args: list[str],
    run: FoldRun,
    folds_file: Path,
    run_dir: Path,
    wandb_group: str,
    repeats: int,
    resume: bool,
) -> list[str]:
    """The ``python -m medvit.foldproc fit`` command of one fold (``medvit fit`` that dies with
    this process)."""
    name = f"fold-{run.fold}" if repeats == 1 else f"r{run.repeat}-fold-{run.fold}"
    cmd = [sys.executable, "-m", "medvit.foldproc", "fit", *fit_args]
    cmd += ["--data.folds_file", str(folds_file), "--data.fold", str(run.fold)]
    cmd += ["--data.repeat", str(run.repeat), "--run.dir", str(run_dir)]
    cmd += ["--wandb.group", wandb_group, "--wandb.job_type", "fold", "--wandb.name", name]
    if resume:
        cmd += ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    return cmd


# ---------------------------------------------------------------------------------- summary
# The range each metric can take; confidence intervals are clipped to it.
_UNIT = (0.0, 1.0)
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("auroc", "acc", "bal_acc", "f1", "sens", "spec", "ece", "threshold"), _UNIT),
    **dict.fromkeys(("op_acc", "op_sens", "op_spec", "op_ppv", "op_npv", "op_f1"), _UNIT),
    "qwk": (-1.0, 1.0),
    "mae": (0.0, math.inf),
    "loss": (0.0, math.inf),
}
CI_METHOD = (
    "95% Student-t interval of the mean over runs (t(0.975, n-1) * std / sqrt(n), std with "
    "ddof=1), clipped to the metric's range (e.g. [0, 1] for AUROC, accuracy and ECE)"
)


def aggregate(values: list[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and 95% Student-t confidence interval of the mean.

    Args:
        values: one value per run.
        bounds: the metric's range; the interval is clipped to it (see ``METRIC_RANGES``).
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else None
    if n < 2:
        return {"mean": mean, "std": None, "ci95_low": None, "ci95_high": None, "n": n}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    low, high = bounds or (-math.inf, math.inf)
    ci_low, ci_high = max(mean - half, low), min(mean + half, high)
    return {"mean": mean, "std": std, "ci95_low": ci_low, "ci95_high": ci_high, "n": n}


def ensemble_predictions(paths: list[Path]) -> dict[str, np.ndarray]:
    """Average ``probs`` of several ``test_predictions.npz`` files, aligned by ``index``."""
    merged: dict[str, np.ndarray] | None = None
    total = None
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            order = np.argsort(npz["index"], kind="stable")
            index, probs, target = npz["index"][order], npz["probs"][order], npz["target"][order]
            if merged is None:
                merged = {
                    "index": index,
                    "target": target,
                    "class_names": npz["class_names"],
                    "task": npz["task"],
                    "positive_class": npz.get("positive_class", 1),
                }
                total = probs.astype(np.float64)
                continue
            if not np.array_equal(index, merged["index"]) or not np.array_equal(
                target, merged["target"]
            ):
                raise ValueError(
                    f"{path} covers other test samples (or targets) than {paths[0]}; the fold "
                    "models were not tested on the same test set."
                )
            total += probs
    if merged is None:
        raise ValueError("no test predictions to ensemble")
    merged["probs"] = (total / len(paths)).astype(np.float32)
    return merged


def ensemble_metrics(preds: dict[str, np.ndarray]) -> dict[str, float]:
    """Test metrics of averaged probabilities, with the metrics every fold run reports."""
    import torch

    from medvit.models.metrics import build_metrics

    task = str(preds["task"])
    probs = torch.from_numpy(np.asarray(preds["probs"], dtype=np.float32))
    target = torch.from_numpy(np.asarray(preds["target"])).long()
    metrics = build_metrics(task, probs.shape[1], prefix="test/")
    if task == "binary":  # about the positive class, as each fold's own metrics
        pos = int(preds.get("positive_class", 1))
        probs, target = probs[:, pos], (target == pos).long()
    metrics.update(probs, target)
    return {k.removeprefix("test/"): float(v) for k, v in sorted(metrics.compute().items())}


def summarize(
    cv_dir: Path,
    runs: list[FoldRun],
    failures: dict[str, str] | None = None,
    info: dict[str, Any] | None = None,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Collect fold metrics, aggregate them, build the ensemble and write the summary files.

    Args:
        cv_dir: the CV directory.
        runs: every run the CV should have, finished or not.
        failures: run name -> why it is missing (e.g. ``exit code 1``), for this invocation.
        info: extra top-level fields (experiment, folds, seed, ...).
        sizes: run name -> (training samples, validation samples), recorded per run.

    Returns:
        The content of ``cv_summary.json``.
    """
    failures = failures or {}
    done, missing = [], []
    for run in runs:
        run_dir = cv_dir / "runs" / run.name
        metrics = read_metrics(run_dir)
        if metrics and metrics.get("test"):
            done.append((run, run_dir, metrics))
        else:
            missing.append(
                {
                    "run": run.name,
                    "repeat": run.repeat,
                    "fold": run.fold,
                    "reason": failures.get(run.name, "not finished"),
                    "log": str(cv_dir / "logs" / f"{run.name}.log"),
                }
            )
    per_run = [
        {
            "run": run.name,
            "repeat": run.repeat,
            "fold": run.fold,
            "run_dir": os.path.relpath(run_dir, cv_dir),
            "n_train": (sizes or {}).get(run.name, (None, None))[0],
            "n_val": (sizes or {}).get(run.name, (None, None))[1],
            "best_epoch": metrics.get("best_epoch"),
            "val": metrics.get("val", {}),
            "test": metrics.get("test", {}),
        }
        for run, run_dir, metrics in done
    ]
    summary: dict[str, Any] = dict(info or {})
    summary.update(
        {
            "runs_expected": len(runs),
            "runs_completed": len(done),
            "complete": not missing,
            "missing": missing,
            "runs": per_run,
        }
    )
    for stage in ("val", "test"):
        names = sorted({m for r in per_run for m in r[stage]})
        summary[stage] = {
            m: aggregate([r[stage][m] for r in per_run if m in r[stage]], METRIC_RANGES.get(m))
            for m in names
        }
    summary["ci_method"] = CI_METHOD
    summary["ensemble"] = None
    pred_paths = [run_dir / PREDICTIONS_FILE for _, run_dir, _ in done]
    pred_paths = [p for p in pred_paths if p.is_file()]
    if pred_paths:
        preds = ensemble_predictions(pred_paths)
        with atomic_write(cv_dir / ENSEMBLE_FILE, "wb") as fh:
            np.savez(fh, **preds)
        summary["ensemble"] = {
            "n_models": len(pred_paths),
            "models": [os.path.relpath(p.parent, cv_dir) for p in pred_paths],
            "predictions": ENSEMBLE_FILE,
            "test": ensemble_metrics(preds),
        }
    write_json(cv_dir / SUMMARY_JSON, summary)
    _write_summary_csv(cv_dir / SUMMARY_CSV, summary)
    return summary


def _metric_columns(summary: dict[str, Any]) -> list[str]:
    test = set(summary["test"]) | set((summary["ensemble"] or {}).get("test", {}))
    return [f"val/{m}" for m in summary["val"]] + [f"test/{m}" for m in sorted(test)]


_NO_STATS = {"mean": None, "std": None, "ci95_low": None, "ci95_high": None, "n": 0}


def _write_summary_csv(path: Path, summary: dict[str, Any]) -> None:
    """Rows: every run (missing ones with a reason), then mean/std/ci95 rows and the ensemble."""
    columns = _metric_columns(summary)
    rows = []
    for r in summary["runs"]:
        values = {f"{s}/{m}": v for s in ("val", "test") for m, v in r[s].items()}
        rows.append(
            {"run": r["run"], "repeat": r["repeat"], "fold": r["fold"], "status": "ok", **values}
        )
    for m in summary["missing"]:
        rows.append(
            {"run": m["run"], "repeat": m["repeat"], "fold": m["fold"], "status": m["reason"]}
        )
    for stat in ("mean", "std", "ci95_low", "ci95_high"):
        row = {"run": stat, "status": f"n={summary['runs_completed']}"}
        for col in columns:
            stage, metric = col.split("/", 1)
            row[col] = summary[stage].get(metric, _NO_STATS)[stat]
        rows.append(row)
    if summary["ensemble"]:
        ens = summary["ensemble"]
        row = {"run": "ensemble", "status": f"n_models={ens['n_models']}"}
        row.update({f"test/{m}": v for m, v in ens["test"].items()})
        rows.append(row)
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["run", "repeat", "fold", "status", *columns], restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: metric, mean ± std, 95% CI, per-run values, ensemble."""

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    names = [r["run"] for r in summary["runs"]]
    lines = [
        f"Cross-validation {summary.get('experiment', '')}: {summary['runs_completed']}/"
        f"{summary['runs_expected']} runs complete; per run: {' '.join(names) or '-'}",
        f"{'metric':<16}{'mean ± std':<22}{'95% CI':<22}{'ensemble':<10}per run",
    ]
    for col in _metric_columns(summary):
        stage, metric = col.split("/", 1)
        agg = summary[stage].get(metric, _NO_STATS)
        spread = f"{num(agg['mean'])} ± {num(agg['std'])}"
        ci = f"[{num(agg['ci95_low'])}, {num(agg['ci95_high'])}]"
        ens = (
            summary["ensemble"]["test"].get(metric)
            if stage == "test" and summary["ensemble"]
            else None
        )
        values = " ".join(num(r[stage].get(metric)) for r in summary["runs"])
        lines.append(
            f"{col:<16}{spread:<22}{ci:<22}{num(ens) if ens is not None else '':<10}{values}"
        )
    for m in summary["missing"]:
        lines.append(f"MISSING {m['run']}: {m['reason']}; log: {m['log']}")
    lines.append(f"95% CI: {summary.get('ci_method', CI_METHOD)}.")
    n = len(summary["runs"])
    if 1 < n < 5:
        from scipy import stats

        lines.append(
            f"Only {n} runs: t(0.975, {n - 1}) = {stats.t.ppf(0.975, n - 1):.1f} makes the "
            "interval wide. --folds 5, or --repeats 3 for a steadier mean, gives a more useful "
            "estimate."
        )
    return "\n".join(lines)


def wandb_sync_command(cv_dir: Path, wandb_config: dict[str, Any]) -> str | None:
    """The ``wandb sync`` command for this CV's offline runs (folds and summary), if any."""
    from medvit.train.tracking import resolve_wandb_mode

    if not wandb_config.get("enabled"):
        return None
    if resolve_wandb_mode(wandb_config.get("mode", "auto")) != "offline":
        return None
    runs = sorted(cv_dir.glob("**/wandb/offline-run-*"))
    if not runs:
        return None
    return "wandb sync " + " ".join(shlex.quote(str(r)) for r in runs)


def log_wandb_summary(
    summary: dict[str, Any], wandb_config: dict[str, Any], group: str, cv_dir: Path
) -> str | None:
    """Log the aggregated metrics and the per-run table to a ``cv-summary`` wandb run.

    Returns:
        The wandb run's local directory, or None when wandb is off or disabled.
    """
    from medvit.train.tracking import resolve_wandb_mode

    if not wandb_config.get("enabled"):
        return None
    mode = resolve_wandb_mode(wandb_config.get("mode", "auto"))
    if mode == "disabled":
        return None
    import wandb

    info_keys = ("experiment", "folds", "repeats", "seed", "pool", "group_by")
    run = wandb.init(
        project=wandb_config.get("project"),
        entity=wandb_config.get("entity"),
        group=group,
        job_type="cv-summary",
        name="cv-summary",
        tags=list(wandb_config.get("tags") or []) or None,
        mode=mode,
        dir=str(cv_dir),
        config={k: summary.get(k) for k in info_keys},
    )
    try:
        values: dict[str, Any] = {
            "runs_completed": summary["runs_completed"],
            "runs_expected": summary["runs_expected"],
        }
        for stage in ("val", "test"):
            for metric, agg in summary[stage].items():
                for stat in ("mean", "std", "ci95_low", "ci95_high"):
                    if agg[stat] is not None:
                        values[f"{stage}/{metric}_{stat}"] = agg[stat]
        if summary["ensemble"]:
            for metric, value in summary["ensemble"]["test"].items():
                values[f"ensemble/test/{metric}"] = value
        columns = ["run", "repeat", "fold", *_metric_columns(summary)]
        table = wandb.Table(
            columns=columns,
            data=[
                [r["run"], r["repeat"], r["fold"]]
                + [r[c.split("/", 1)[0]].get(c.split("/", 1)[1]) for c in columns[3:]]
                for r in summary["runs"]
            ],
        )
        run.log({"folds": table})
        run.summary.update(values)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


# ------------------------------------------------------------------------------------- main
def run_cv(argv: list[str]) -> int:
    """Run (or resume) a cross-validation; return 0 when every fold finished, else 1.

    Raises:
        ValueError: bad options, a changed setup under an existing CV directory, bad group file,
            or another CV running in the same directory.
    """
    global _LOCK
    args, fit_args = parse_args(argv)
    if args.folds < 2:
        raise ValueError(f"--folds must be >= 2, got {args.folds}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}.")
    lock = None
    if args.cv_dir:  # known before the config: a busy folder is refused at once
        lock = CVDirLock(Path(args.cv_dir))
        lock.acquire()
    try:
        print("Resolving the fit config (medvit fit --print_config)...", flush=True)
        config = resolve_fit_config(fit_args)
        _check_fit_config(config)
        experiment = experiment_of(config)
        cv_dir = Path(args.cv_dir) if args.cv_dir else Path("cv_runs") / experiment
        if lock is None:
            lock = CVDirLock(cv_dir)
            lock.acquire()
        _LOCK = lock
        return _run_locked(args, argv, fit_args, config, experiment, cv_dir)
    finally:
        _LOCK = None
        if lock is not None:
            lock.release()


def _run_locked(
    args: argparse.Namespace,
    argv: list[str],
    fit_args: list[str],
    config: dict[str, Any],
    experiment: str,
    cv_dir: Path,
) -> int:
    """The part of :func:`run_cv` that runs under the CV directory's lock."""
    pool = load_pool(config["data"], args.pool)
    groups = load_groups(args.group_by, pool) if args.group_by else None
    folds = make_repeated_folds(
        pool.labels, args.folds, args.seed, args.repeats, groups=groups, multilabel=pool.multilabel
    )
    folds_text = folds_csv_text(pool, folds, groups)
    kept, fit_hash = config_fingerprint(config)
    group_sha = _sha256(Path(args.group_by).read_bytes()) if args.group_by else None
    cv_config = {
        "experiment": experiment,
        "command": ["medvit", "cv", *argv],
        "fit_args": fit_args,
        "folds": args.folds,
        "repeats": args.repeats,
        "seed": args.seed,
        "pool": args.pool,
        "group_by": args.group_by,
        "group_by_sha256": group_sha,
        "task": pool.task,
        "pool_size": len(pool.index),
        "fit_config_sha256": fit_hash,
        "folds_sha256": _sha256(folds_text),
        "fit_config": kept,
        "invocations": [
            {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": ["medvit", "cv", *argv],
            }
        ],
    }
    prepare_cv_dir(cv_dir, cv_config, folds_text)
    folds_file = cv_dir / FOLDS_FILE
    wandb_config = config.get("wandb") or {}
    group = wandb_config.get("group") or experiment
    runs = [FoldRun(r, k) for r in range(args.repeats) for k in range(args.folds)]
    print(
        f"CV of {experiment}: {args.folds} folds x {args.repeats} repeat(s) of the {args.pool} "
        f"pool ({len(pool.index)} samples; test = official test) in {cv_dir}",
        flush=True,
    )
    failures: dict[str, str] = {}
    for run in runs:
        run_dir = cv_dir / "runs" / run.name
        log_path = cv_dir / "logs" / f"{run.name}.log"
        tag = f"[{run.name}: fold {run.fold + 1}/{args.folds}, repeat {run.repeat + 1}/{args.repeats}]"
        if is_finished(run_dir):
            print(f"{tag} finished earlier, skipped", flush=True)
            continue
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        if not resume and run_dir.exists():
            # Started but never checkpointed: nothing to keep (the log stays in logs/).
            shutil.rmtree(run_dir)
        n_val = int((folds[run.repeat] == run.fold).sum())
        what = "resuming from checkpoints/last.ckpt" if resume else "training"
        print(
            f"{tag} {what} ({len(pool.index) - n_val} train / {n_val} val)... log: {log_path}",
            flush=True,
        )
        cmd = fold_command(fit_args, run, folds_file, run_dir, group, args.repeats, resume)
        t0 = time.time()
        code = launch(cmd, log_path)
        took = f"{time.time() - t0:.0f}s"
        if code == 0 and is_finished(run_dir):
            metrics = read_metrics(run_dir) or {}
            shown = "  ".join(
                f"{s}/auroc={metrics[s]['auroc']:.4f}"
                for s in ("val", "test")
                if "auroc" in metrics.get(s, {})
            )
            print(f"{tag} done in {took}: {shown}", flush=True)
        else:
            reason = f"exit code {code}" if code != 0 else "exited without test metrics"
            failures[run.name] = f"failed ({reason})"
            print(f"{tag} FAILED ({reason}) after {took}; log: {log_path}", flush=True)
    info = {
        "experiment": experiment,
        "cv_dir": str(cv_dir),
        "folds": args.folds,
        "repeats": args.repeats,
        "seed": args.seed,
        "pool": args.pool,
        "group_by": args.group_by,
        "task": pool.task,
        "class_names": pool.class_names,
        "fit_config_sha256": fit_hash,
    }
    n_val = {run.name: int((folds[run.repeat] == run.fold).sum()) for run in runs}
    sizes = {name: (len(pool.index) - n, n) for name, n in n_val.items()}
    summary = summarize(cv_dir, runs, failures, info, sizes)
    wandb_dir = log_wandb_summary(summary, wandb_config, group, cv_dir)
    print()
    print(format_table(summary))
    print(f"Summary: {cv_dir / SUMMARY_JSON} and {cv_dir / SUMMARY_CSV}")
    if wandb_dir:
        print(f"wandb summary run: {wandb_dir}")
    sync = wandb_sync_command(cv_dir, wandb_config)
    if sync:
        print(f"The wandb runs are offline; upload them all with:\n  {sync}")
    if summary["missing"]:
        print(
            f"{len(summary['missing'])} of {len(runs)} runs are missing; the statistics above "
            "cover the finished runs only. Rerun the same command to resume.",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """``medvit cv [--folds K] [--seed S] [--repeats R] [--group-by F] [--pool P] FIT_ARGS...``."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def on_sigterm(signum: int, frame: Any) -> None:
        # A SystemExit unwinds through launch(), which terminates the running fold first.
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = run_cv(argv)
    except CVDirBusy as err:  # not a usage mistake: one line, no usage text
        print(f"medvit cv: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:
        build_parser().error(str(err))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
