"""End to end on the official BreastMNIST file: learning, exact resume, determinism."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import short_trainer_args

from medvit.cli import main

pytestmark = pytest.mark.slow

EXACT = [  # no stochastic depth: a resumed run must then match an uninterrupted one bit for bit
    "--model.drop_path_rate=0",
    # workers: each test sets its own
    *short_trainer_args(
        2, train_batches=3, batch_size=32, num_workers=None, patch_size=None, verify_md5=True
    ),
]


def fit(real_data: Path, run_dir: Path, *args: str) -> dict:
    main(
        [
            "fit",
            "-c",
            "configs/experiment/breastmnist.yaml",
            f"--data.root={real_data}",
            f"--data.cache_dir={run_dir.parent / 'cache'}",
            f"--run.dir={run_dir}",
            *args,
        ]
    )
    return json.loads((run_dir / "metrics.json").read_text())


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


SEEDS = (0, 1)


@pytest.fixture(scope="module")
def recipe_runs(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The default recipe for 10 epochs, one process per seed, side by side.

    At 28 px a run keeps about one core busy whatever its thread count, so two single-threaded
    processes finish both seeds in the time of one.
    """
    tmp = tmp_path_factory.mktemp("recipe")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo / "src"), env.get("PYTHONPATH")]))
    procs = {}
    for seed in SEEDS:
        run_dir = tmp / f"seed{seed}"
        cmd = [
            sys.executable,
            "-m",
            "medvit",
            "fit",
            "-c",
            str(repo / "configs/experiment/breastmnist.yaml"),
            f"--data.root={real_data}",
            f"--data.cache_dir={tmp / f'cache{seed}'}",  # no two processes unpacking one file
            f"--run.dir={run_dir}",
            f"--seed_everything={seed}",
            *short_trainer_args(10, batch_size=None, patch_size=None, verify_md5=True),
        ]
        log = open(tmp / f"seed{seed}.log", "w")  # noqa: SIM115 - closed below
        procs[seed] = (subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=log), log)
    for seed, (proc, log) in procs.items():
        code = proc.wait(timeout=1800)
        log.close()
        out = (tmp / f"seed{seed}.log").read_text()
        assert code == 0, f"seed {seed} failed:\n{out[-4000:]}"
    return {seed: tmp / f"seed{seed}" for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_default_recipe_learns(recipe_runs, seed):
    metrics = json.loads((recipe_runs[seed] / "metrics.json").read_text())
    # Chance is AUROC 0.5 and accuracy 0.73 (the majority class, 114 of 156 test images).
    assert metrics["test"]["auroc"] >= 0.70, metrics["test"]
    assert metrics["val"]["auroc"] >= 0.70, metrics["val"]
    assert metrics["epochs_trained"] == 10


def test_resume_from_last_checkpoint_is_exact(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    straight = fit(real_data, tmp_path / "straight", *EXACT, "--data.num_workers=0")
    interrupted = tmp_path / "interrupted"
    stop = '--trainer.callbacks+={"class_path": "conftest.StopAtEpoch", "init_args": {"epoch": 1}}'
    with pytest.raises(RuntimeError, match="interrupted at epoch 1"):
        fit(real_data, interrupted, *EXACT, "--data.num_workers=0", stop)
    assert not (interrupted / "metrics.json").exists() or "test" not in json.loads(
        (interrupted / "metrics.json").read_text()
    )
    # Resume in place: `medvit fit -c <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt`.
    main(
        [
            "fit",
            "-c",
            str(interrupted / "config.yaml"),
            "--ckpt_path",
            str(interrupted / "checkpoints" / "last.ckpt"),
            "--trainer.callbacks=null",
        ]
    )
    resumed = json.loads((interrupted / "metrics.json").read_text())
    assert resumed["test"] == pytest.approx(straight["test"], abs=1e-6)
    # The best epoch survives the interruption (RunRecorder state lives in the checkpoint).
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["val"] == pytest.approx(straight["val"], abs=1e-6)
    a = weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = weights(interrupted / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(interrupted / "metrics.csv", newline="") as fh:
        epochs = {row["epoch"] for row in csv.DictReader(fh) if row.get("val/auroc")}
    assert epochs == {"0", "1"}, "the resumed run appends to the interrupted run's history"


def test_same_seed_same_metrics_whatever_the_worker_count(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    quick = [*EXACT, "--model.drop_path_rate=0.1"]
    a = fit(real_data, tmp_path / "a", *quick, "--data.num_workers=0")
    b = fit(real_data, tmp_path / "b", *quick, "--data.num_workers=2")
    assert a["test"] == b["test"] and a["val"] == b["val"]
    c = fit(real_data, tmp_path / "c", *quick, "--data.num_workers=0", "--seed_everything=7")
    assert c["test"] != a["test"], "another seed gives another run"
