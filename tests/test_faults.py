"""Fault injection: full disks, ``kill -9`` of ``medvit fit`` and ``medvit cv``, hostile files.

Modelled on crash tests of systems that must survive faults (SQLite's, Lightning's fault-tolerant
training tests):

- writes: a disk that fills up in the middle of a write leaves the old file whole and no
  temporary file behind;
- ``fit``: the process is killed (SIGKILL) at five seeded random points (mid-epoch and in the
  middle of writing a checkpoint in both epochs, mid-test), each time resumed with the
  README's command; the final ``metrics.json`` and best weights equal those of an
  uninterrupted run;
- ``cv``: killed during a fold and during the summary, then rerun: no fold process outlives it,
  each fold is counted once, the summary equals an uninterrupted CV's;
- data: a seeded fuzz loop over mutated ``.npz`` files: each case loads correctly or ends in
  one ``DataFileError`` line; tracebacks, hangs and memory blow-ups fail.

``MEDVIT_FAULT_SEED`` (default 0) picks the kill points and the mutants, ``MEDVIT_FUZZ_CASES``
(default 300) the number of mutants. The kill tests run the real BreastMNIST file (slow).
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import psutil
import pytest
import torch
from conftest import short_trainer_args

from medvit import cv
from medvit.data.files import DataFileError, release_caches
from medvit.data.medmnist import MedMNISTDataModule
from medvit.fileio import atomic_write, atomic_write_text
from medvit.runs import FOLDS_FILE, SUMMARY_CSV, SUMMARY_JSON, write_cv_summary_csv, write_json

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ disk full
class DiskFull:
    """Within ``with DiskFull():``, every file opened for writing runs out of space after
    ``after`` bytes: it gets the first bytes, then ``OSError(ENOSPC)``, as on a full disk.

    ``open`` itself is patched (``builtins.open`` and ``io.open``, which ``pathlib``,
    ``os.fdopen``, ``numpy`` and ``zipfile`` all use), so old and new write paths are both hit.
    """

    def __init__(self, after: int = 10) -> None:
        self.after = after
        self.hits = 0

    def __enter__(self) -> DiskFull:
        self._saved = builtins.open, io.open
        real = io.open

        def open_(file, mode="r", *args, **kwargs):
            fh = real(file, mode, *args, **kwargs)
            if not any(c in mode for c in "wax+"):
                return fh
            write = fh.write

            def limited(data):
                room = self.after - fh.tell()
                if len(data) > room:
                    self.hits += 1
                    write(data[: max(0, room)])
                    fh.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return write(data)

            fh.write = limited
            return fh

        builtins.open = io.open = open_
        return self

    def __exit__(self, *exc) -> None:
        builtins.open, io.open = self._saved


def _no_temp_files(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert left == [], f"temporary files left behind: {left}"


def test_atomic_write_keeps_old_file_when_disk_fills(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old,content\n1,2\n")
    with (
        DiskFull(after=8),
        pytest.raises(OSError) as err,
        atomic_write(target, "w", newline="") as fh,
    ):
        fh.write("new,content\n" * 100)
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old,content\n1,2\n"
    _no_temp_files(tmp_path)


def test_atomic_write_replaces_and_keeps_umask_permissions(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    _no_temp_files(tmp_path)


def test_metrics_json_survives_a_full_disk(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"val": {"auroc": 0.5}})
    with DiskFull(after=5), pytest.raises(OSError):
        write_json(path, {"val": {"auroc": 0.9}, "test": {"auroc": 0.8}})
    assert json.loads(path.read_text()) == {"val": {"auroc": 0.5}}
    _no_temp_files(tmp_path)


def test_cv_summary_csv_survives_a_full_disk(tmp_path):
    summary = {
        "runs": [{"run": "r0-f0", "repeat": 0, "fold": 0, "val": {"auroc": 0.7}, "test": {}}],
        "missing": [],
        "runs_completed": 1,
        "val": {"auroc": {"mean": 0.7, "std": None, "ci95_low": None, "ci95_high": None}},
        "test": {},
        "ensemble": None,
    }
    path = tmp_path / SUMMARY_CSV
    write_cv_summary_csv(path, summary)
    before = path.read_bytes()
    summary["runs"][0]["val"]["auroc"] = 0.8
    with DiskFull(after=20), pytest.raises(OSError):
        write_cv_summary_csv(path, summary)
    assert path.read_bytes() == before
    _no_temp_files(tmp_path)


def test_report_html_survives_a_full_disk(tmp_path, monkeypatch):
    from medvit import report

    out = tmp_path / "report.html"
    out.write_text("<html>old report</html>")
    monkeypatch.setattr(report, "build_report", lambda dirs, progress=None: "<html>" + "x" * 999)
    with DiskFull(after=100), pytest.raises(OSError):
        report.write_report([tmp_path], out)
    assert out.read_text() == "<html>old report</html>"
    _no_temp_files(tmp_path)


def test_predictions_npz_survives_a_full_disk(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from medvit.runs import PREDICTIONS_FILE
    from medvit.train.callbacks import RunRecorder

    path = tmp_path / PREDICTIONS_FILE
    path.write_bytes(b"old predictions")
    recorder = RunRecorder(command=["medvit"])
    recorder.run_dir = tmp_path
    monkeypatch.setattr(recorder, "_update_meta", lambda *a, **k: None)
    trainer = SimpleNamespace(is_global_zero=True, callback_metrics={}, ckpt_path=None)
    module = SimpleNamespace(
        test_predictions={
            "index": np.arange(1000),
            "probs": np.full((1000, 2), 0.5, np.float32),
            "target": np.zeros(1000, np.int64),
        },
        hparams={"class_names": ["a", "b"], "task": "binary"},
    )
    with DiskFull(after=4096), pytest.raises(OSError):
        recorder.on_test_end(trainer, module)
    assert path.read_bytes() == b"old predictions"
    _no_temp_files(tmp_path)


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_metrics_csv_resumes_after_a_kill_mid_append(tmp_path):
    from medvit.train.tracking import RunCSVLogger

    logger = RunCSVLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    with open(tmp_path / "metrics.csv", "a") as fh:
        fh.write("0,0.7")  # the killed process's half row
    resumed = RunCSVLogger(tmp_path)  # a resumed run appends to the same file
    resumed.log_metrics({"train/loss": 0.5}, step=1)
    resumed.save()
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert rows[0] == ["step", "train/loss"]
    assert rows[1:] == [["0", "1.0"], ["1", "0.5"]]


def test_metrics_csv_header_rewrite_survives_a_full_disk(tmp_path):
    from medvit.train.tracking import RunCSVLogger

    logger = RunCSVLogger(tmp_path)
    for step in range(50):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.save()
    before = (tmp_path / "metrics.csv").read_bytes()
    logger.log_metrics({"val/auroc": 0.6}, step=50)  # a new column: the file is rewritten
    with DiskFull(after=100), pytest.raises(OSError):
        logger.save()
    assert (tmp_path / "metrics.csv").read_bytes() == before
    _no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- cv locking
def test_second_cv_on_a_locked_folder_is_refused_naming_the_pid(tmp_path, capsys):
    cv_dir = tmp_path / "cv"
    with cv.CVDirLock(cv_dir):
        with pytest.raises(SystemExit) as exit_:
            cv.main(["--cv-dir", str(cv_dir), "-c", "config.yaml"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("medvit cv: error: ") and "\n" not in err
        assert f"(PID {os.getpid()})" in err
        with pytest.raises(ValueError) as err:
            cv.CVDirLock(cv_dir).acquire()
        message = str(err.value)
        assert f"PID {os.getpid()}" in message and str(cv_dir) in message
        assert "\n" not in message
    cv.CVDirLock(cv_dir).acquire()  # released on exit: the next CV may run


# ------------------------------------------------------------------ dying with the parent
_CHILD = """
import sys, time
import medvit.cv.foldproc as fp
if sys.argv[1] == "watchdog-only":
    fp.sys = type("NotLinux", (), {"platform": "other"})  # no prctl: the watchdog must do it
fp.die_with_parent(interval=0.2)
print("armed", flush=True)
time.sleep(60)
"""
_PARENT = """
import os, subprocess, sys
env = dict(os.environ, MEDVIT_FOLD_PARENT=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env,
                         stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("mode", ["prctl", "watchdog-only"])
def test_fold_process_dies_with_its_parent(mode):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD, mode], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child, timeout=0.3)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone(child, timeout=5), f"the child outlived its parent ({mode})"
    finally:
        parent.kill()
        parent.wait()


# ------------------------------------------------------------------------- kill -9 of fit
class KillPoint(L.Callback):
    """Test helper run inside ``medvit fit``: stop at the next planned point to be killed there.

    ``plan`` is a JSON list of points, each ``{"hook": "train_batch", "epoch": e, "batch": b}``,
    ``{"hook": "save", "epoch": e, "nth": n}`` (the n-th checkpoint written in epoch e) or
    ``{"hook": "test_batch", "batch": b}``. Point ``i`` is done once ``{plan}.{i}`` exists; at
    the first point not done, the process writes that file (its PID and where it stopped) and
    sleeps, so the test's SIGKILL lands exactly there. A point the run has passed without
    reaching it (e.g. a second save in an epoch without a new best) is marked missed.

    At a ``save`` point the checkpoint file is half written (flushed to disk) when the process
    stops: every file opened for writing until then gets half its bytes, then the pause.
    """

    def __init__(self, plan: str) -> None:
        self.plan = Path(plan)
        self.saves: dict[int, int] = {}

    def _next(self) -> tuple[int, dict] | None:
        for i, point in enumerate(json.loads(self.plan.read_text())):
            if not Path(f"{self.plan}.{i}").exists():
                return i, point
        return None

    def _stop(self, i: int, where: str) -> None:
        Path(f"{self.plan}.{i}").write_text(json.dumps({"pid": os.getpid(), "where": where}))
        time.sleep(600)  # bounded, so a test that dies cannot leave it forever

    def _due(self, hook: str, trainer: L.Trainer) -> tuple[int, dict] | None:
        nxt = self._next()
        if nxt is None:
            return None
        i, point = nxt
        testing = trainer.state.fn == "test"
        passed = (
            not testing and point["hook"] != "test_batch" and point["epoch"] < trainer.current_epoch
        )
        if passed or (testing and point["hook"] != "test_batch"):  # the run went past it
            Path(f"{self.plan}.{i}").write_text(json.dumps({"missed": True}))
            return self._due(hook, trainer)
        if point["hook"] != hook:
            return None
        return nxt if hook == "test_batch" or point["epoch"] == trainer.current_epoch else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        due = self._due("train_batch", trainer)
        if due and due[1]["batch"] == batch_idx:
            self._stop(due[0], f"epoch {trainer.current_epoch} batch {batch_idx}")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        due = self._due("test_batch", trainer)
        if due and due[1]["batch"] == batch_idx:
            self._stop(due[0], f"test batch {batch_idx}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        epoch = trainer.current_epoch
        self.saves[epoch] = self.saves.get(epoch, 0) + 1
        due = self._due("save", trainer)
        if due and due[1]["nth"] == self.saves[epoch]:
            self._half_write_then_stop(due[0], epoch)

    def _half_write_then_stop(self, i: int, epoch: int) -> None:
        real = io.open

        def open_(file, mode="r", *args, **kwargs):
            fh = real(file, mode, *args, **kwargs)
            if "w" in mode and "b" in mode:
                write = fh.write

                def half(data):
                    write(bytes(data)[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                    name = (
                        os.readlink(f"/proc/self/fd/{fh.fileno()}")
                        if sys.platform.startswith("linux")
                        else file
                    )
                    self._stop(i, f"epoch {epoch} save {self.saves[epoch]}: half of {name}")

                fh.write = half
            return fh

        builtins.open = io.open = open_


FIT = [
    "-c",
    str(REPO / "configs" / "experiment" / "breastmnist.yaml"),
    "--model.drop_path_rate=0",  # no stochastic depth: the resumed run must match bit for bit
    *short_trainer_args(2, train_batches=3, batch_size=32, patch_size=None, verify_md5=True),
]


def _env(real_data: Path, tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline")
    # The system temp folder of the processes under test: a killed save must not leave a
    # half-written checkpoint there (nothing else cleans it on a cluster node).
    (tmp / "systmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp / "systmp")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH")])
    )
    env["MEDVIT_DATA_DIR"] = str(real_data)
    return env


def _medvit(*args: str) -> list[str]:
    return [sys.executable, "-m", "medvit", *args]


def _run_until_killed(cmd, env, cwd, plan: Path, n_points: int, log: Path) -> dict | None:
    """Run ``cmd``; SIGKILL it when it stops at a planned point. Returns that point's record,
    or None when the process ended by itself (asserting it succeeded)."""
    done_before = {i for i in range(n_points) if Path(f"{plan}.{i}").exists()}
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        try:
            while True:
                for i in range(n_points):
                    marker = Path(f"{plan}.{i}")
                    if i in done_before or not marker.exists():
                        continue
                    record = json.loads(marker.read_text() or "{}")
                    done_before.add(i)
                    if record.get("missed"):
                        continue
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return {"point": i, **record}
                if proc.poll() is not None:
                    assert proc.returncode == 0, f"{cmd} failed:\n{log.read_text()[-4000:]}"
                    return None
                assert time.time() < deadline, f"{cmd} hangs:\n{log.read_text()[-4000:]}"
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _kill_plan(seed: int) -> list[dict]:
    """Five seeded random points: mid-epoch, mid-checkpoint-write, in both epochs, mid-test."""
    rng = random.Random(seed)
    nth = rng.sample([1, 2], 2)  # best.ckpt or last.ckpt: each is cut in one of the epochs
    return [
        {"hook": "train_batch", "epoch": 0, "batch": rng.randrange(3)},
        {"hook": "save", "epoch": 0, "nth": nth[0]},
        {"hook": "train_batch", "epoch": 1, "batch": rng.randrange(3)},
        {"hook": "save", "epoch": 1, "nth": nth[1]},
        {"hook": "test_batch", "batch": rng.randrange(5)},
    ]


def _best_weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_fit_killed_at_random_points_resumes_to_the_same_result(real_data, tmp_path):
    env = _env(real_data, tmp_path)
    straight_dir = tmp_path / "straight"
    straight_cmd = _medvit("fit", *FIT, f"--run.dir={straight_dir}")
    straight_cmd += [f"--data.cache_dir={tmp_path / 'cache-straight'}"]
    with open(tmp_path / "straight.log", "w") as out:  # side by side with the killed runs
        straight = subprocess.Popen(
            straight_cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    seed = int(os.environ.get("MEDVIT_FAULT_SEED", "0"))
    plan = tmp_path / "plan.json"
    points = _kill_plan(seed)
    plan.write_text(json.dumps(points))
    kill = {"class_path": "test_faults.KillPoint", "init_args": {"plan": str(plan)}}
    run_dir = tmp_path / "killed"
    first = _medvit(
        "fit", *FIT, f"--run.dir={run_dir}", f"--trainer.callbacks=[{json.dumps(kill)}]"
    )
    first += [f"--data.cache_dir={tmp_path / 'cache'}"]
    # The README's resume command (same spelling of the run folder as the first run).
    resume = _medvit(
        "fit",
        "-c",
        str(run_dir / "config.yaml"),
        "--ckpt_path",
        str(run_dir / "checkpoints" / "last.ckpt"),
    )
    log = tmp_path / "killed.log"
    survived = []
    for _ in range(len(points) + 1):
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            cmd = resume
        else:  # killed before the first checkpoint: nothing to resume, start over
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = first
        record = _run_until_killed(cmd, env, tmp_path, plan, len(points), log)
        if record is None:
            break
        survived.append(record)
        # A kill never leaves a truncated checkpoint where a resume would read it.
        for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
            torch.load(ckpt, map_location="cpu", weights_only=True)
    else:
        pytest.fail(f"the run never finished:\n{log.read_text()[-4000:]}")
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-4000:]
    print(f"fit: survived {len(survived)} kill points: {[r['where'] for r in survived]}")
    assert len(survived) >= 5, survived
    a = json.loads((straight_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert b == a, (a, b)
    wa, wb = _best_weights(straight_dir), _best_weights(run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    big = [p.name for p in (tmp_path / "systmp").rglob("*") if p.stat().st_size > 100_000]
    assert big == [], f"half-written checkpoints left in the temp folder: {big}"

    # medvit predict onto an existing CSV while the disk fills: the old CSV stays whole.
    from medvit.evaluate.predict import predict

    out = tmp_path / "predictions.csv"
    predict(straight_dir / "checkpoints" / "best.ckpt", [f"{real_data}/breastmnist.npz:val"], out)
    before = out.read_bytes()
    with DiskFull(after=2000), pytest.raises(OSError):
        predict(run_dir / "checkpoints" / "best.ckpt", [f"{real_data}/breastmnist.npz:test"], out)
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".predictions.csv*"))


# -------------------------------------------------------------------------- kill -9 of cv
def cv_main_pausing_in_summary(marker: str, argv: list[str]) -> None:
    """``medvit cv`` that stops in the middle of writing its summary (for the test to kill it).

    Run as ``python -c "import test_faults; test_faults.cv_main_pausing_in_summary(...)"``:
    ``cv_summary.json`` is already written, ``cv_summary.csv`` not yet.
    """
    from medvit.runs import layout

    write_csv = layout.write_cv_summary_csv

    def paused(path, summary):
        if not Path(marker).exists():
            Path(marker).write_text(json.dumps({"pid": os.getpid()}))
            time.sleep(600)
        write_csv(path, summary)

    layout.write_cv_summary_csv = paused
    cv.main(argv)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended before {path.name}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"never reached {path.name}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    time.sleep(0.2)  # the marker is written in one go, but let the writer finish
    return json.loads(path.read_text())


def _gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` ends (or is a zombie: dead, waiting for a reaper) within ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_cv_killed_during_a_fold_and_the_summary(real_data, tmp_path):
    env = _env(real_data, tmp_path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"hook": "train_batch", "epoch": 1, "batch": 1}]))
    kill = {"class_path": "test_faults.KillPoint", "init_args": {"plan": str(plan)}}
    cv_dir = tmp_path / "cv"
    fit_args = [*FIT, "--trainer.limit_val_batches=3", f"--trainer.callbacks=[{json.dumps(kill)}]"]
    argv = [*fit_args, "--folds", "2", "--cv-dir", str(cv_dir)]
    log = tmp_path / "cv.log"

    procs: list[subprocess.Popen] = []  # killed at the end whatever happens
    fold_pid = None
    try:
        # 1. kill -9 the CV while fold 1 (r0-f0) is in its second epoch.
        with open(log, "w") as out:
            first = subprocess.Popen(
                _medvit("cv", *argv), cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        procs.append(first)
        fold_pid = _wait_for(Path(f"{plan}.0"), first, log)["pid"]
        # Meanwhile the same fold, uninterrupted, for the expected summary (folds.csv exists).
        straight_f0 = tmp_path / "straight-f0"
        with open(tmp_path / "straight.log", "w") as out:
            straight = subprocess.Popen(
                _medvit(
                    "fit",
                    *FIT,
                    "--trainer.limit_val_batches=3",
                    f"--data.folds_file={cv_dir / FOLDS_FILE}",
                    "--data.fold=0",
                    f"--run.dir={straight_f0}",
                ),
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(straight)
        # A second CV on the same folder is refused, naming the PID holding it.
        second = subprocess.run(
            _medvit("cv", *argv), cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert second.returncode != 0
        assert second.stderr.strip() == (
            f"medvit cv: error: {cv_dir} is in use by another medvit cv (PID {first.pid}); "
            "wait for it to finish or stop it, then rerun."
        ), second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert _gone(fold_pid, timeout=10), f"fold process {fold_pid} outlived the killed CV"
        survived = ["fold r0-f0 mid-epoch"]

        # 2. Rerun; kill -9 it in the middle of writing the summary.
        marker = tmp_path / "summary.paused"
        code = (
            f"import test_faults; test_faults.cv_main_pausing_in_summary({str(marker)!r}, {argv!r})"
        )
        with open(log, "a") as out:
            rerun = subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(rerun)
        _wait_for(marker, rerun, log)
        rerun.send_signal(signal.SIGKILL)
        rerun.wait()
        survived.append("summary, between cv_summary.json and cv_summary.csv")
        assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if fold_pid is not None and not _gone(fold_pid, timeout=0.1):
            os.kill(fold_pid, signal.SIGKILL)

    # 3. Rerun to completion: both folds were finished, only the summary is written.
    final = subprocess.run(
        _medvit("cv", *argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert final.stdout.count("finished earlier, skipped") == 2
    print(f"cv: survived {len(survived)} kill points: {survived}")

    summary = json.loads((cv_dir / SUMMARY_JSON).read_text())
    assert [r["run"] for r in summary["runs"]] == ["r0-f0", "r0-f1"]  # each fold once
    assert summary["complete"] and summary["runs_completed"] == 2
    # The uninterrupted CV: the same summary over the uninterrupted fold 1 (fold 2 never was).
    expected_dir = tmp_path / "expected"
    shutil.copytree(cv_dir, expected_dir)
    shutil.rmtree(expected_dir / "runs" / "r0-f0")
    shutil.copytree(straight_f0, expected_dir / "runs" / "r0-f0")
    runs = [cv.FoldRun(0, 0), cv.FoldRun(0, 1)]
    info = {k: summary[k] for k in ("experiment", "folds", "repeats", "seed", "pool", "task")}
    sizes = {r["run"]: (r["n_train"], r["n_val"]) for r in summary["runs"]}
    expected = cv.summarize(expected_dir, runs, info=info, sizes=sizes)
    for key in ("runs", "val", "test", "ensemble", "complete", "missing"):
        assert summary[key] == expected[key], key
    with open(cv_dir / SUMMARY_CSV, newline="") as fh:
        assert [row["run"] for row in csv.DictReader(fh)][:2] == ["r0-f0", "r0-f1"]
    assert not [p for p in cv_dir.rglob("*.tmp")], "temporary files left in the CV folder"


# ------------------------------------------------------------------------------ data fuzz
FUZZ_CASES = int(os.environ.get("MEDVIT_FUZZ_CASES", "300"))
DTYPES = ["float32", "int64", "int8", "bool", "<U3", "complex64", ">u2", "V4", "f2,u1", "M8[s]"]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def _raw_npy(header: str, data: bytes, magic: bytes = b"\x93NUMPY\x01\x00") -> bytes:
    """A .npy with a hand-written header dict (lies about shape or dtype allowed)."""
    head = header.encode("latin1")
    pad = 64 - (len(magic) + 2 + len(head) + 1) % 64
    head += b" " * pad + b"\n"
    return magic + len(head).to_bytes(2, "little") + head + data


def _zip(members: dict[str, bytes], compress: bool) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _base_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for split, n in zip(("train", "val", "test"), (8, 4, 4), strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    return arrays


def _mutant(rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded mutation of a valid BreastMNIST file: (description, file bytes)."""
    arrays = _base_arrays(rng)
    members = {f"{k}.npy": _npy(v) for k, v in arrays.items()}
    compress = bool(rng.integers(2))
    key = str(rng.choice(list(arrays)))
    kind = str(
        rng.choice(
            [
                "flip",
                "flip",
                "flip",
                "truncate",
                "truncate",
                "dtype",
                "shape",
                "huge",
                "header",
                "labels",
                "members",
                "zipfield",
                "junk",
            ]
        )
    )
    if kind in ("flip", "truncate", "zipfield"):
        data = bytearray(_zip(members, compress))
        if kind == "flip":
            for _ in range(int(rng.integers(1, 24))):
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
            return f"{kind} compress={compress}", bytes(data)
        if kind == "truncate":
            cut = int(rng.integers(0, len(data)))
            return f"truncate at {cut}/{len(data)}", bytes(data[:cut])
        # A field of a zip header: sizes, offsets, flags, compression method, name lengths.
        headers = [i for i in range(len(data) - 4) if data[i : i + 2] == b"PK"]
        at = int(rng.choice(headers)) + int(rng.integers(4, 30))
        width = int(rng.choice([1, 2, 4]))
        value = int(rng.choice([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, int(rng.integers(2**31))]))
        data[at : at + width] = (value & (2 ** (8 * width) - 1)).to_bytes(width, "little")
        return f"zip field at {at} = {value:#x} ({width} B)", bytes(data)
    if kind == "dtype":
        dtype = str(rng.choice(DTYPES))
        members[f"{key}.npy"] = _npy(np.zeros(arrays[key].shape[:1] + (2,), dtype=dtype))
        if rng.integers(2):
            members[f"{key}.npy"] = _npy(np.array([{"x": 1}, None], dtype=object))
            dtype = "object"
        return f"{key} dtype {dtype}", _zip(members, compress)
    if kind == "shape":
        ndim = int(rng.integers(0, 5))
        shape = tuple(int(rng.choice([0, 1, 3, 28, 29])) for _ in range(ndim))
        members[f"{key}.npy"] = _npy(np.zeros(shape, dtype=arrays[key].dtype))
        return f"{key} shape {shape}", _zip(members, compress)
    if kind == "huge":
        n = int(rng.choice([2**31, 10**12, 2**62, 2**63 - 1]))
        shape = (n, 28, 28) if key.endswith("images") else (n, 1)
        header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
        members[f"{key}.npy"] = _raw_npy(header, b"\x00" * 784)
        return f"{key} claims shape {shape}", _zip(members, compress)
    if kind == "header":
        shape = arrays[key].shape
        header = str(
            rng.choice(
                [
                    f"{{'descr': '|u1', 'fortran_order': True, 'shape': {shape}, }}",
                    f"{{'descr': 'zz9', 'fortran_order': False, 'shape': {shape}, }}",
                    f"{{'descr': '|u1', 'shape': {shape}, }}",
                    "{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 28, 28), }",
                    f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, 'x': 1}}",
                    "[1, 2, 3]",
                    "{'descr': '|u1', 'fortran_order': False, 'shape': 'abc', }",
                    "not python at all (",
                    "{'descr': '|u1', 'fortran_order': False, 'shape': (1e300, 28), }",
                ]
            )
        )
        magic = bytes(
            rng.choice([b"\x93NUMPY\x01\x00", b"\x93NUMPY\x09\x00", b"\x93NUMPX\x01\x00"])
        )
        members[f"{key}.npy"] = _raw_npy(header, arrays[key].tobytes(), magic)
        return f"{key} header {header!r} magic {magic!r}", _zip(members, compress)
    if kind == "labels":
        key = key.replace("images", "labels")
        bad = np.array(rng.choice([-1, 2, 255, 2**40]), dtype=np.int64)
        labels = arrays[key].astype(rng.choice(["int8", "int64", "uint64"]))
        labels[int(rng.integers(len(labels)))] = bad.astype(labels.dtype)
        members[f"{key}.npy"] = _npy(labels)
        return f"{key} holds {int(bad)}", _zip(members, compress)
    if kind == "members":
        what = str(rng.choice(["drop", "rename", "extra", "dir", "dup"]))
        if what == "drop":
            members.pop(f"{key}.npy")
        elif what == "rename":
            members[f"{key}.txt"] = members.pop(f"{key}.npy")
        elif what == "extra":
            members["../../evil.npy"] = b"x" * 10
        elif what == "dir":
            members[f"sub/{key}.npy"] = members.pop(f"{key}.npy")
        else:
            members[f"a/{key}.npy"] = _npy(np.zeros(3, np.uint8))
        return f"members {what} {key}", _zip(members, compress)
    junk = bytes(rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8))
    return f"junk {len(junk)} bytes", (b"PK\x03\x04" if rng.integers(2) else b"") + junk


class _Hang(Exception):
    pass


def _load(root: Path, cache: Path) -> None:
    """What ``medvit fit`` does with the file before training, plus one read per split."""
    dm = MedMNISTDataModule(
        flag="breastmnist",
        root=str(root),
        cache_dir=str(cache),
        verify_md5=False,
        download=False,
        num_workers=0,
        global_batch_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    for data in (dm.data_train, dm.data_val, dm.data_test):
        if len(data):
            data[len(data) - 1]


def test_fuzzed_npz_files_load_or_fail_in_one_line(tmp_path):
    """Seeded mutants of a valid file: each loads, or raises one ``DataFileError`` line naming
    the file. Another exception type (a traceback for the user), more than 10 s (a hang) or
    more than 1 GiB of new memory (``RLIMIT_DATA``: a MemoryError) is a failure."""
    import resource

    seed = int(os.environ.get("MEDVIT_FAULT_SEED", "0"))
    rng = np.random.default_rng(seed)
    root, npz = tmp_path / "root", tmp_path / "root" / "breastmnist.npz"
    root.mkdir()
    failures, outcomes = [], {"loaded": 0, "refused": 0}

    def alarm(signum, frame):
        raise _Hang()

    with open("/proc/self/status") as fh:
        vm_data = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmData"))
    limits = resource.getrlimit(resource.RLIMIT_DATA)
    previous = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data + (1 << 30), limits[1]))
    try:
        for case in range(FUZZ_CASES):
            what, data = _mutant(rng)
            npz.write_bytes(data)
            cache = tmp_path / f"cache{case}"
            signal.setitimer(signal.ITIMER_REAL, 10)
            try:
                _load(root, cache)
                outcomes["loaded"] += 1
            except DataFileError as err:
                message = str(err)
                if "\n" in message or str(npz) not in message:
                    failures.append((case, what, f"unclear message: {message!r}"))
                outcomes["refused"] += 1
            except _Hang:
                failures.append((case, what, "hang (> 10 s)"))
            except BaseException as err:  # noqa: BLE001 - any other type is what we look for
                failures.append((case, what, f"{type(err).__name__}: {err}"[:300]))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                release_caches()
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, limits)
        signal.signal(signal.SIGALRM, previous)
    print(f"fuzz: {FUZZ_CASES} cases, {outcomes}, {len(failures)} failures")
    assert not failures, "\n".join(map(str, failures[:20]))
    assert outcomes["refused"] > FUZZ_CASES // 2 and outcomes["loaded"] > 0
