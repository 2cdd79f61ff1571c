"""Data-parallel runs on CPU (gloo) reproduce the single-process ones.

- ``torchrun --nproc_per_node 2 -m medvit fit`` (through ``scripts/torchrun_fit.sh``) on real
  BreastMNIST: the same validation and test metrics and the same best weights as one process,
  up to float reduction order. The global batch is the same (32 = 2 x 16), the seeded sampler
  gives each global batch the same samples, augmentation seeds depend only on (seed, epoch,
  index), DDP averages the two per-rank mean losses' gradients (= the mean over 32), and
  dropout/drop-path are off.
- ``medvit test --trainer.devices 2 --trainer.strategy ddp`` (Lightning's own launcher) of a
  checkpoint gives the 1-process test metrics and predictions on a test split of an odd size:
  a padding sampler would count a sample twice and write 32 predictions for 31 samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import short_trainer_args

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Metrics after a few identical steps differ only by float reduction order (all-reduce vs one
# process): weights agree to ~1e-6, so probabilities do too. A threshold metric (acc, f1, sens)
# or AUROC moves only if a probability crosses a threshold or a tie flips; one flipped pair in
# AUROC on BreastMNIST's test split (42 x 114 pairs) moves it by 2e-4, so 2e-3 allows a few flips
# but catches any real difference (a wrong batch, a repeated sample, a different LR).
METRIC_TOL = 2e-3
# Four AdamW steps at a warm-up LR of at most 1e-3 move weights by up to ~4e-3; a different
# batch or LR shows at that scale, float reduction order at ~1e-6.
WEIGHT_TOL = 1e-5
FIT_ARGS = [
    "-c",
    str(REPO / "configs/experiment/breastmnist.yaml"),
    # batch size pinned: the experiment config may change
    *short_trainer_args(1, train_batches=4, batch_size=32, patch_size=None, verify_md5=True),
    "--trainer.accelerator=cpu",
    "--model.drop_path_rate=0",
    "--model.drop_rate=0",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])),
    )
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run ``cmd`` to completion; its output, or a failure showing the output's tail."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env={**_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def run_medvit(args: list[str], cwd: Path) -> str:
    """``python -m medvit ARGS`` (Lightning launches extra processes itself for ``ddp``)."""
    return run([sys.executable, "-m", "medvit", *args], cwd)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _assert_close(a: dict[str, float], b: dict[str, float], tol: float, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: metric names differ: {sorted(a)} vs {sorted(b)}"
    diffs = {k: abs(a[k] - b[k]) for k in a}
    assert max(diffs.values()) <= tol, f"{what}: differences over {tol}: {diffs}"


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def fits(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-process fit and a ``torchrun --nproc_per_node 2`` fit of the same configuration."""
    tmp = tmp_path_factory.mktemp("ddp_fit")
    common = [*FIT_ARGS, f"--data.root={real_data}", f"--data.cache_dir={tmp / 'mmap'}"]
    single, ddp = tmp / "runs" / "single", tmp / "runs" / "ddp"
    run_medvit(["fit", *common, f"--run.dir={single}"], cwd=tmp)
    # The documented launcher: torchrun with a c10d rendezvous, here one node with 2 processes.
    launch = {
        "NNODES": "1",
        "GPUS_PER_NODE": "2",
        "ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RUN_ID": "test-ddp",
        "RUN_DIR": str(ddp),
        "PYTHON": sys.executable,
    }
    out = run(["bash", str(REPO / "scripts" / "torchrun_fit.sh"), *common], cwd=tmp, env=launch)
    return {"single": single, "ddp": ddp, "tmp": tmp, "ddp_output": out, "common": common}


def test_torchrun_fit_matches_single_process(fits: dict) -> None:
    single, ddp = _metrics(fits["single"]), _metrics(fits["ddp"])
    meta = json.loads((fits["ddp"] / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "DDPStrategy", meta
    assert json.loads((fits["single"] / "meta.json").read_text())["world_size"] == 1
    assert single["best_epoch"] == ddp["best_epoch"] == 0
    _assert_close(single["val"], ddp["val"], METRIC_TOL, "val")
    _assert_close(single["test"], ddp["test"], METRIC_TOL, "test")
    # Not a vacuous comparison: the metrics come from a real model on the 156 test images.
    assert 0.0 < single["test"]["auroc"] < 1.0 and single["test"]["loss"] > 0


def test_torchrun_fit_has_the_same_best_weights(fits: dict) -> None:
    a = _state_dict(fits["single"] / "checkpoints" / "best.ckpt")
    b = _state_dict(fits["ddp"] / "checkpoints" / "best.ckpt")
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= WEIGHT_TOL, f"best weights differ by {diff} (max abs)"
    # Training did move the weights, so equal weights are not the initial ones.
    ckpt = torch.load(
        fits["ddp"] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False
    )
    assert ckpt["global_step"] == 4


def test_two_nodes_equal_one_node_with_two_processes(fits: dict) -> None:
    # Two torchrun launches on localhost stand in for two machines: --nnodes 2, one process
    # each, meeting at one c10d rendezvous (the first to bind the port hosts it).
    two_nodes = fits["tmp"] / "two_nodes"  # not under runs/, which holds exactly two folders
    launch = {
        "NNODES": "2",
        "GPUS_PER_NODE": "1",
        "ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RUN_ID": "test-two-nodes",
        "RUN_DIR": str(two_nodes),
        "PYTHON": sys.executable,
    }
    cmd = ["bash", str(REPO / "scripts" / "torchrun_fit.sh"), *fits["common"]]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=fits["tmp"],
            env={**_env(), **launch},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, out in zip(nodes, outs, strict=True):
        assert node.returncode == 0, f"a node failed:\n{out[-6000:]}"
    meta = json.loads((two_nodes / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["num_nodes"] == 2, meta
    # Same ranks, same shards, same all-reduce as 1 node x 2 processes: the same numbers.
    a = _state_dict(fits["ddp"] / "checkpoints" / "best.ckpt")
    b = _state_dict(two_nodes / "checkpoints" / "best.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between 2 nodes and 1 node x 2 processes"
    assert _metrics(fits["ddp"])["test"] == _metrics(two_nodes)["test"]


def test_torchrun_writes_one_run_folder(fits: dict) -> None:
    runs = fits["single"].parent
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]
    names = sorted(p.name for p in fits["ddp"].iterdir())
    for name in ("config.yaml", "meta.json", "metrics.csv", "metrics.json", "test_predictions.npz"):
        assert name in names, names
    assert sorted(p.name for p in (fits["ddp"] / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    # Only rank 0 prints the summary.
    assert fits["ddp_output"].count("Run directory:") == 1


def test_ddp_test_of_a_checkpoint_is_exact_on_an_odd_test_split(
    synthetic_root, tmp_path: Path
) -> None:
    root = synthetic_root("breastmnist", n=(64, 20, 31))
    data = [
        f"--data.root={root}",
        "--data.verify_md5=false",
        "--data.download=false",
        f"--data.cache_dir={tmp_path / 'mmap'}",
    ]
    fit_dir = tmp_path / "runs" / "fit"
    run_medvit(
        ["fit", *FIT_ARGS, *data, "--trainer.limit_train_batches=1", f"--run.dir={fit_dir}"],
        cwd=tmp_path,
    )
    ckpt = fit_dir / "checkpoints" / "best.ckpt"
    test_args = ["test", "-c", str(fit_dir / "config.yaml"), f"--ckpt_path={ckpt}"]
    one, two = tmp_path / "runs" / "test1", tmp_path / "runs" / "test2"
    run_medvit([*test_args, f"--run.dir={one}"], cwd=tmp_path)
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    run_medvit([*test_args, *ddp, f"--run.dir={two}"], cwd=tmp_path)

    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    m1, m2 = _metrics(one)["test"], _metrics(two)["test"]
    # Same weights, same samples, each counted once: equal up to float noise of batch shapes.
    _assert_close(m1, m2, 1e-6, "test")
    p1, p2 = np.load(one / "test_predictions.npz"), np.load(two / "test_predictions.npz")
    np.testing.assert_array_equal(p1["index"], np.arange(31))
    np.testing.assert_array_equal(p2["index"], np.arange(31))
    np.testing.assert_array_equal(p1["target"], p2["target"])
    np.testing.assert_allclose(p1["probs"], p2["probs"], rtol=0, atol=1e-6)


def test_ddp_with_augmentation_on_the_device_matches_one_process(
    synthetic_root, tmp_path: Path
) -> None:
    # Each rank augments its half of the global batch on its own device; every image's
    # parameters and noise come from its own seed, so the two halves equal the whole batch.
    root = synthetic_root("breastmnist", n=(64, 20, 20))
    args = [
        "fit",
        *FIT_ARGS,
        f"--data.root={root}",
        "--data.verify_md5=false",
        "--data.download=false",
        f"--data.cache_dir={tmp_path / 'mmap'}",
        "--data.augment_on=device",
        "--data.augmentation=ultrasound",  # flip, affine, speckle and Rician noise, blur, gamma
    ]
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    run_medvit([*args, f"--run.dir={one}"], cwd=tmp_path)
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    run_medvit([*args, *ddp, f"--run.dir={two}"], cwd=tmp_path)

    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    _assert_close(_metrics(one)["val"], _metrics(two)["val"], METRIC_TOL, "val")
    a = _state_dict(one / "checkpoints" / "best.ckpt")
    b = _state_dict(two / "checkpoints" / "best.ckpt")
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= WEIGHT_TOL, f"best weights differ by {diff} (max abs)"
    ckpt = torch.load(one / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 64 images, global batch 32

    # Not vacuous: with this run's data settings the training batches are really augmented.
    from medvit.data.batch_transforms import BatchAugment
    from medvit.data.medmnist import MedMNISTDataModule

    data = yaml.safe_load((one / "config.yaml").read_text())["data"]
    dm = MedMNISTDataModule(**data)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    augmented = dm.on_after_batch_transfer(batch, 0)[0]
    ref = dm.batch_augment
    assert ref.preset == "ultrasound", ref
    raw = BatchAugment(
        "none",
        ref.img_size,
        ref.in_chans,
        ref.mean.flatten().tolist(),
        (1 / ref.inv_std).flatten().tolist(),
    )(batch[0], batch[3])
    assert augmented.shape == raw.shape == (32, 1, 28, 28)
    changed = (augmented - raw).abs().flatten(1).amax(1) > 1e-3
    # Each of the six ops fires with p 0.2-0.5: about 92% of images change.
    assert changed.sum() >= 24, f"only {int(changed.sum())} of 32 images were augmented"


def test_ddp_in_3d_matches_one_process(real_data: Path, tmp_path: Path) -> None:
    # The 3D recipe on real AdrenalMNIST3D volumes (its conv stem: GroupNorm, no batch
    # statistics), with its 3D augmentation (flip, affine, elastic, intensity) in the workers:
    # 2 CPU processes reproduce 1, as in 2D.
    args = [
        "fit",
        "-c",
        str(REPO / "configs/experiment/adrenalmnist3d.yaml"),
        *short_trainer_args(
            1, train_batches=4, val_batches=None, batch_size=16, patch_size=None, verify_md5=True
        ),
        "--trainer.accelerator=cpu",
        "--model.drop_path_rate=0",
        "--model.drop_rate=0",
        f"--data.root={real_data}",
        f"--data.cache_dir={tmp_path / 'mmap'}",
    ]
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    run_medvit([*args, f"--run.dir={one}"], cwd=tmp_path)
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    run_medvit([*args, *ddp, f"--run.dir={two}"], cwd=tmp_path)

    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    _assert_close(_metrics(one)["val"], _metrics(two)["val"], METRIC_TOL, "val")
    # After 4 steps many test probabilities sit close to the operating threshold, where float
    # reduction order can flip one case of the op_* metrics; the probabilities themselves agree.
    test_one, test_two = _metrics(one)["test"], _metrics(two)["test"]
    for key in ("auroc", "loss", "acc"):
        assert abs(test_one[key] - test_two[key]) <= METRIC_TOL, (key, test_one, test_two)
    p1, p2 = np.load(one / "test_predictions.npz"), np.load(two / "test_predictions.npz")
    np.testing.assert_array_equal(p1["index"], p2["index"])
    np.testing.assert_allclose(p1["probs"], p2["probs"], rtol=0, atol=1e-5)
    a = _state_dict(one / "checkpoints" / "best.ckpt")
    b = _state_dict(two / "checkpoints" / "best.ckpt")
    assert a["net.patch_embed.proj.weight"].ndim == 5  # a 3D model
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= WEIGHT_TOL, f"best weights differ by {diff} (max abs)"
    ckpt = torch.load(one / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert 0.0 < _metrics(one)["test"]["auroc"] < 1.0
