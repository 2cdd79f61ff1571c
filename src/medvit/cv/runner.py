"""Running a CV: the fit config, the CV folder (checked and locked), one process per fold, resume.

:func:`run` is ``medvit cv`` after its options are parsed: resolve the ``medvit fit`` config
in this process, lock and check the CV folder, launch each unfinished fold as a
``python -m medvit.cv.foldproc fit`` process (resuming from its ``last.ckpt`` when it has one),
then summarize (:mod:`medvit.cv.summary`).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from medvit import runs
from medvit.cv import parse_args
from medvit.cv.foldproc import PARENT_ENV
from medvit.cv.plan import (
    FoldPlan,
    FoldRun,
    fold_teachers,
    groups_fingerprint,
    load_groups,
    load_pool,
    plan_folds,
)
from medvit.cv.summary import format_table, log_wandb_summary, summarize, wandb_sync_command
from medvit.data.selection import data_init_args

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
    "data.decode_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "progress_bar",
)


# ------------------------------------------------------------------------------- fit config
class _Parsed(Exception):
    """Stops the LightningCLI right after parsing; carries its parser and the namespace."""


def resolve_fit_config(fit_args: list[str]) -> dict[str, Any]:
    """The resolved ``medvit fit`` config of ``fit_args``, as ``--print_config`` prints it.

    Parsed in this process by the ``medvit fit`` LightningCLI, stopped right after parsing:
    nothing is seeded, instantiated or read from a checkpoint.

    Raises:
        ValueError: the arguments do not parse (one line naming the option).
    """
    from argparse import ArgumentError

    from lightning.pytorch.cli import LightningCLI

    from medvit.train.cli import MedViTCLI

    class ParseOnly(MedViTCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            # LightningCLI's parsing alone: MedViTCLI's own checks read --ckpt_path, which a CV
            # refuses (and each fold process checks again).
            LightningCLI.parse_arguments(self, parser, args)
            raise _Parsed(parser, self.config)

    with warnings.catch_warnings():
        # sys.argv holds `medvit cv ...`, not these arguments; that is intended here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            ParseOnly(args=["fit", *fit_args], parser_kwargs={"exit_on_error": False})
        except _Parsed as parsed:
            parser, namespace = parsed.args
        except ArgumentError as err:
            raise ValueError(
                f"`medvit fit {shlex.join(fit_args)}` does not parse: {runs.one_line(err)}"
            ) from None
    config = (yaml.safe_load(parser.dump(namespace, skip_unset=False)) or {}).get("fit")
    if not isinstance(config, dict) or "data" not in config:
        raise ValueError(f"`medvit fit {shlex.join(fit_args)}` gives no data config.")
    return config


def _data_key(key: str) -> str:
    """``data.init_args.X`` (a config selecting a data class) -> ``data.X``, for key checks."""
    return "data." + key[len("data.init_args.") :] if key.startswith("data.init_args.") else key


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
        if not any(
            _data_key(k) == v_key or _data_key(k).startswith(f"{v_key}.") for v_key in VOLATILE_KEYS
        )
    }
    text = json.dumps(kept, sort_keys=True, default=str)
    return kept, hashlib.sha256(text.encode()).hexdigest()


def experiment_of(config: dict[str, Any]) -> str:
    """Experiment name of a resolved fit config, as ``medvit fit`` names it: the MedMNIST flag,
    or the data's name (a folder's name, a CSV file's stem) for ``--data ImageDataModule``."""
    run, data = config.get("run") or {}, data_init_args(config["data"])
    name = data.get("flag") or (runs.source_name(data["path"]) if data.get("path") else "data")
    return runs.experiment_name(run.get("name"), name, data.get("size"))


def _check_fit_config(config: dict[str, Any]) -> None:
    """Refuse fit settings that would break the per-fold layout or never finish a fold."""
    flat = {_data_key(k): v for k, v in _flatten(config).items()}
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


# ------------------------------------------------------------------------------- directory
def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_cv_dir(cv_dir: Path, cv_config: dict[str, Any], folds_text: str) -> None:
    """Create the CV directory, or check that an existing one was made by the same setup.

    Raises:
        ValueError: the directory holds a CV of another config, other folds or other settings.
    """
    if (cv_dir / runs.CV_CONFIG).is_file():
        old = runs.read_cv_config(cv_dir)
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
        folds_path = cv_dir / runs.FOLDS_FILE
        if folds_path.is_file() and _sha256(folds_path.read_bytes()) != old.get("folds_sha256"):
            raise ValueError(
                f"{folds_path} was modified after the CV started; restore it (delete it and "
                "rerun to have it rewritten) or use another --cv-dir."
            )
        if not folds_path.is_file():  # deleted: the recomputed folds are the recorded ones
            runs.write_folds(folds_path, folds_text)
        old.setdefault("invocations", []).append(cv_config["invocations"][0])
        runs.write_cv_config(cv_dir, old)
        return
    fold_dirs = cv_dir / runs.CV_RUNS_DIR
    if fold_dirs.is_dir() and any(fold_dirs.iterdir()):
        raise ValueError(
            f"{cv_dir} has fold runs but no {runs.CV_CONFIG}, so it cannot be checked; use "
            "another --cv-dir or delete it."
        )
    cv_dir.mkdir(parents=True, exist_ok=True)
    (cv_dir / runs.CV_LOGS_DIR).mkdir(exist_ok=True)
    runs.write_folds(cv_dir / runs.FOLDS_FILE, folds_text)
    runs.write_cv_config(cv_dir, cv_config)


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
        self.path = cv_dir / runs.LOCK_FILE
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

    On an exception (Ctrl-C, or SIGTERM turned into SystemExit by :func:`medvit.cv.main`) the
    child is terminated too, so an interrupted CV never leaves a fold training in the
    background. When this process is killed outright, the child kills itself
    (:mod:`medvit.cv.foldproc`).
    """
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
    teacher: Path | None = None,
) -> list[str]:
    """The ``python -m medvit.cv.foldproc fit`` command of one fold (``medvit fit`` that dies
    with this process)."""
    name = f"fold-{run.fold}" if repeats == 1 else f"r{run.repeat}-fold-{run.fold}"
    cmd = [sys.executable, "-m", "medvit.cv.foldproc", "fit", *fit_args]
    cmd += ["--data.folds_file", str(folds_file), "--data.fold", str(run.fold)]
    cmd += ["--data.repeat", str(run.repeat), "--run.dir", str(run_dir)]
    cmd += ["--wandb.group", wandb_group, "--wandb.job_type", "fold", "--wandb.name", name]
    if resume:
        cmd += ["--ckpt_path", str(runs.last_checkpoint(run_dir))]
    if teacher is not None:
        cmd += ["--model.teacher", str(teacher)]
    return cmd


# ------------------------------------------------------------------------------------- run
def run_cv(argv: list[str]) -> int:
    """:func:`run` of a ``medvit cv`` command line (without the words ``medvit cv``)."""
    args, fit_args = parse_args(argv)
    return run(args, argv, fit_args)


def run(args: argparse.Namespace, argv: list[str], fit_args: list[str]) -> int:
    """Run (or resume) a cross-validation; return 0 when every fold finished, else 1.

    Args:
        args: the CV options (:func:`medvit.cv.parse_args`).
        argv: the whole command line, recorded in ``cv_config.json``.
        fit_args: the ``medvit fit`` arguments of every fold.

    Raises:
        ValueError: bad options, a changed setup under an existing CV directory, bad group file,
            or another CV running in the same directory (:class:`CVDirBusy`).
    """
    global _LOCK
    if args.folds < 2:
        raise ValueError(f"--folds must be >= 2, got {args.folds}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}.")
    lock = None
    if args.cv_dir:  # known before the config: a busy folder is refused at once
        lock = CVDirLock(Path(args.cv_dir))
        lock.acquire()
    try:
        print("Resolving the fit config...", flush=True)
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


def _cv_config(
    args: argparse.Namespace,
    argv: list[str],
    fit_args: list[str],
    config: dict[str, Any],
    experiment: str,
    plan: FoldPlan,
    folds_text: str,
) -> dict[str, Any]:
    """The content of ``cv_config.json`` for this invocation."""
    kept, fit_hash = config_fingerprint(config)
    group_sha = groups_fingerprint(args.group_by, plan.groups, plan.pool) if args.group_by else None
    return {
        "experiment": experiment,
        "command": ["medvit", "cv", *argv],
        "fit_args": fit_args,
        "folds": args.folds,
        "repeats": args.repeats,
        "seed": args.seed,
        "pool": args.pool,
        "group_by": args.group_by,
        "group_by_sha256": group_sha,
        "task": plan.pool.task,
        "pool_size": len(plan.pool.index),
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


def _run_locked(
    args: argparse.Namespace,
    argv: list[str],
    fit_args: list[str],
    config: dict[str, Any],
    experiment: str,
    cv_dir: Path,
) -> int:
    """The part of :func:`run` that runs under the CV directory's lock."""
    pool = load_pool(config["data"], args.pool)
    groups = load_groups(args.group_by, pool) if args.group_by else None
    plan = plan_folds(pool, args.folds, args.seed, args.repeats, groups)
    folds_text = plan.csv_text()
    cv_config = _cv_config(args, argv, fit_args, config, experiment, plan, folds_text)
    teachers = {}
    if getattr(args, "teacher_cv", None):  # checked before the CV folder is written
        teachers = fold_teachers(Path(args.teacher_cv), plan, cv_config["folds_sha256"])
        cv_config["teacher_cv"] = str(Path(args.teacher_cv).resolve())
    prepare_cv_dir(cv_dir, cv_config, folds_text)
    folds_file = cv_dir / runs.FOLDS_FILE
    wandb_config = config.get("wandb") or {}
    group = wandb_config.get("group") or experiment
    n_pool = len(pool.index)
    print(
        f"CV of {experiment}: {args.folds} folds x {args.repeats} repeat(s) of the {args.pool} "
        f"pool ({n_pool} samples; test = official test) in {cv_dir}",
        flush=True,
    )
    failures: dict[str, str] = {}
    for job in plan.runs:
        run_dir = runs.fold_run_dir(cv_dir, job.name)
        log_path = runs.fold_log(cv_dir, job.name)
        tag = f"[{job.name}: fold {job.fold + 1}/{args.folds}, repeat {job.repeat + 1}/{args.repeats}]"
        if runs.is_finished(run_dir):
            print(f"{tag} finished earlier, skipped", flush=True)
            continue
        resume = runs.last_checkpoint(run_dir).is_file()
        if not resume and run_dir.exists():
            # Started but never checkpointed: nothing to keep (the log stays in logs/).
            shutil.rmtree(run_dir)
        n_val = plan.n_val(job)
        what = "resuming from checkpoints/last.ckpt" if resume else "training"
        print(f"{tag} {what} ({n_pool - n_val} train / {n_val} val)... log: {log_path}", flush=True)
        cmd = fold_command(
            fit_args, job, folds_file, run_dir, group, args.repeats, resume, teachers.get(job.name)
        )
        t0 = time.time()
        code = launch(cmd, log_path)
        took = f"{time.time() - t0:.0f}s"
        if code == 0 and runs.is_finished(run_dir):
            metrics = runs.read_metrics(run_dir)
            shown = "  ".join(
                f"{s}/auroc={metrics[s]['auroc']:.4f}"
                for s in ("val", "test")
                if "auroc" in metrics.get(s, {})
            )
            print(f"{tag} done in {took}: {shown}", flush=True)
        else:
            reason = f"exit code {code}" if code != 0 else "exited without test metrics"
            failures[job.name] = f"failed ({reason})"
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
        "fit_config_sha256": cv_config["fit_config_sha256"],
    }
    summary = summarize(cv_dir, plan.runs, failures, info, plan.sizes())
    wandb_dir = log_wandb_summary(summary, wandb_config, group, cv_dir)
    print()
    print(format_table(summary))
    print(f"Summary: {cv_dir / runs.SUMMARY_JSON} and {cv_dir / runs.SUMMARY_CSV}")
    if wandb_dir:
        print(f"wandb summary run: {wandb_dir}")
    sync = wandb_sync_command(cv_dir, wandb_config)
    if sync:
        print(f"The wandb runs are offline; upload them all with:\n  {sync}")
    if summary["missing"]:
        print(
            f"{len(summary['missing'])} of {len(plan.runs)} runs are missing; the statistics "
            "above cover the finished runs only. Rerun the same command to resume.",
            file=sys.stderr,
        )
        return 1
    return 0
