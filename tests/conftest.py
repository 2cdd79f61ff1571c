"""Shared fixtures: synthetic MedMNIST-format files and the real files CI provides."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from medmnist import INFO

# Two cores are shared by the test process, DataLoader workers and DDP ranks.
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

REAL_DATA_ENV = "MEDVIT_TEST_DATA"


def make_medmnist_npz(
    path: Path,
    flag: str,
    size: int = 28,
    n: tuple[int, int, int] = (40, 12, 16),
    seed: int = 0,
    learnable: bool = True,
) -> Path:
    """Write a small file in the official MedMNIST format (keys, dtypes, label layout).

    With ``learnable``, each class gets a distinct bright square so a model can fit it.
    """
    info = INFO[flag]
    rng = np.random.default_rng(seed)
    n_classes = len(info["label"])
    multilabel = info["task"].startswith("multi-label")
    shape = (size, size) if info["n_channels"] == 1 else (size, size, 3)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        if multilabel:
            labels = (rng.random((count, n_classes)) < 0.3).astype(np.uint8)
        else:
            labels = (np.arange(count) % n_classes).reshape(-1, 1).astype(np.uint8)
            rng.shuffle(labels)
        images = rng.integers(0, 60, size=(count, *shape), dtype=np.uint8)
        if learnable:
            cell = max(2, size // max(4, n_classes))
            for i in range(count):
                active = np.flatnonzero(labels[i]) if multilabel else labels[i]
                for c in active:
                    r, q = divmod(int(c), max(1, size // cell))
                    images[i, r * cell : (r + 1) * cell, q * cell : (q + 1) * cell] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def synthetic_root(tmp_path: Path):
    """Factory: ``synthetic_root(flag, size=28, **kw)`` -> folder holding ``{flag}[_size].npz``."""

    def make(flag: str, size: int = 28, **kwargs) -> Path:
        name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
        make_medmnist_npz(tmp_path / "medmnist" / name, flag, size, **kwargs)
        return tmp_path / "medmnist"

    return make


def short_breast_fit(tmp: Path, *extra: str) -> Path:
    """Fit 2 epochs (then test) on a small synthetic BreastMNIST file in ``tmp``; the run folder.

    Positive class malignant (index 0); ``extra`` are more ``medvit fit`` options.
    """
    from medvit.cli import main

    make_medmnist_npz(tmp / "data" / "breastmnist.npz", "breastmnist", n=(48, 24, 30))
    main(
        [
            "fit",
            f"--data.root={tmp / 'data'}",
            "--data.verify_md5=false",
            "--data.num_workers=0",
            "--data.global_batch_size=8",
            "--model.patch_size=7",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--run.root={tmp / 'runs'}",
            *extra,
        ]
    )
    (run_dir,) = (tmp / "runs" / "breastmnist").iterdir()
    return run_dir


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Folder of the official MedMNIST files (set by .ci/run).

    Tests skip when ``MEDVIT_TEST_DATA`` is unset, and fail when it is set but the file is not
    there: a CI whose data went missing must not turn its real-data tests into silent skips.
    """
    root = os.environ.get(REAL_DATA_ENV)
    if not root:
        pytest.skip(f"{REAL_DATA_ENV} is not set (a folder holding breastmnist.npz)")
    if not (Path(root) / "breastmnist.npz").is_file():
        pytest.fail(f"{REAL_DATA_ENV}={root} but {Path(root) / 'breastmnist.npz'} does not exist")
    return Path(root)


class StopAtEpoch(L.Callback):
    """Raise at the start of ``epoch``, as a crash or a killed job would (for resume tests)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"interrupted at epoch {self.epoch}")
