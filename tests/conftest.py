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
    if flag.endswith("3d"):  # grey volumes (N, D, H, W); the squares below become slabs
        shape = (size, size, size)
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


def short_trainer_args(
    epochs: int | None,
    *extra: str,
    train_batches: int | None = None,
    val_batches: int | None = None,
    batch_size: int | None = 8,
    num_workers: int | None = 0,
    patch_size: int | None = 7,
    verify_md5: bool = False,
    progress_bar: bool = False,
) -> list[str]:
    """``medvit`` options of a short, quiet run; ``extra`` come last, so they can override.

    Args:
        epochs: ``--trainer.max_epochs``; ``None`` leaves it to the caller or the config.
        *extra: more options, appended as given.
        train_batches: ``--trainer.limit_train_batches``; ``None``: every batch.
        val_batches: ``--trainer.limit_val_batches``; ``None``: every batch.
        batch_size: ``--data.global_batch_size``; ``None`` leaves the config's.
        num_workers: ``--data.num_workers``; ``None`` leaves it to the caller or the config.
        patch_size: ``--model.patch_size``, 7 by default (a 4 x 4 token grid at 28 px, a fast
            model); ``None`` leaves the config's (the recipe's model).
        verify_md5: ``False`` skips the MD5 check (files made by :func:`make_medmnist_npz`
            are not the official ones); ``True`` leaves the default (checked).
        progress_bar: ``False`` turns the bar off; ``True`` leaves Lightning's default (on).
            The model summary is always off (it only prints).
    """
    args = [] if epochs is None else [f"--trainer.max_epochs={epochs}"]
    if train_batches is not None:
        args.append(f"--trainer.limit_train_batches={train_batches}")
    if val_batches is not None:
        args.append(f"--trainer.limit_val_batches={val_batches}")
    if not progress_bar:
        args.append("--trainer.enable_progress_bar=false")
    args.append("--trainer.enable_model_summary=false")
    if num_workers is not None:
        args.append(f"--data.num_workers={num_workers}")
    if batch_size is not None:
        args.append(f"--data.global_batch_size={batch_size}")
    if not verify_md5:
        args.append("--data.verify_md5=false")
    if patch_size is not None:
        args.append(f"--model.patch_size={patch_size}")
    return [*args, *extra]


@pytest.fixture(scope="session")
def short_trainer():
    """``short_trainer(epochs, *extra, **options)``: :func:`short_trainer_args` in a test."""
    return short_trainer_args


def short_trainer_kwargs(epochs: int, **extra) -> dict:
    """``lightning.Trainer`` keywords of a short, quiet run: no logger, checkpoints, bar or
    model summary; ``extra`` are more keywords (they override these)."""
    return {
        "max_epochs": epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **extra,
    }


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
            f"--run.root={tmp / 'runs'}",
            *short_trainer_args(2, *extra),
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
