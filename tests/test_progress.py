"""The training progress bar reads the loss only when it refreshes (no device sync per step)."""

from __future__ import annotations

import pytest
import torch
from conftest import short_trainer_args

from medvit.cli import MedViTCLI
from medvit.train.progress import LossProgressBar


class CountingLoss(torch.Tensor):
    """A loss tensor that counts how often it is turned into a Python number."""

    reads = 0

    def __float__(self) -> float:
        CountingLoss.reads += 1
        return super().__float__()


def build(root, tmp_path, *extra: str) -> MedViTCLI:
    return MedViTCLI(
        args=[
            "--data.flag=breastmnist",
            f"--data.root={root}",
            f"--run.root={tmp_path / 'runs'}",
            "--run.test_after_fit=false",
            # The bar is what these tests look at: Lightning's default (on) unless ``extra``.
            *short_trainer_args(1, *extra, val_batches=0, batch_size=4, progress_bar=True),
        ],
        run=False,
    )


def test_bar_shows_the_loss_every_refresh_rate_steps_only(synthetic_root, tmp_path, monkeypatch):
    root = synthetic_root("breastmnist", n=(28, 8, 8))
    cli = build(root, tmp_path, "--progress_bar.refresh_rate=3")
    (bar,) = [c for c in cli.trainer.callbacks if isinstance(c, LossProgressBar)]
    assert bar.refresh_rate == 3

    # The module hands the bar its loss as a counting tensor; count the bar's reads of it.
    module = cli.model
    step = module.training_step

    def counting_step(batch, batch_idx):
        loss = step(batch, batch_idx)
        module.last_train_loss = module.last_train_loss.as_subclass(CountingLoss)
        return loss

    monkeypatch.setattr(module, "training_step", counting_step)
    CountingLoss.reads = 0
    cli.trainer.fit(module, datamodule=cli.datamodule)
    # 28 samples / batch 4 = 7 steps: refreshes at steps 3, 6 and the last one (7), and once at
    # the epoch's end; with Lightning's prog_bar logging it would be read after all 7 steps.
    assert CountingLoss.reads == 4
    assert "loss" in bar.train_progress_bar.postfix
    # The step loss is not a progress-bar metric (Lightning would read it after every step).
    assert not any(k.startswith("train/loss") for k in cli.trainer.progress_bar_metrics)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [((), 1), (("--trainer.enable_progress_bar=false",), 0)],
    ids=["default", "bar-off"],
)
def test_one_medvit_bar_unless_disabled(synthetic_root, tmp_path, extra, expected):
    root = synthetic_root("breastmnist", n=(8, 4, 4))
    cli = build(root, tmp_path, *extra)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, LossProgressBar)]
    assert len(bars) == expected


def test_training_step_never_reads_a_tensor_on_the_host(synthetic_root, tmp_path, monkeypatch):
    """A host read (``bool(t)``, ``t.item()``, ``float(t)``) is a device sync on a GPU: none per step."""
    root = synthetic_root("breastmnist", n=(12, 4, 4))
    cli = build(root, tmp_path, "--trainer.enable_progress_bar=false")
    module, reads = cli.model, []
    step = module.training_step

    def watched_step(batch, batch_idx):
        with monkeypatch.context() as m:
            for name in ("__bool__", "item", "__float__", "tolist"):
                original = getattr(torch.Tensor, name)

                def spy(self, *a, _name=name, _original=original, **k):
                    reads.append(_name)
                    return _original(self, *a, **k)

                m.setattr(torch.Tensor, name, spy)
            return step(batch, batch_idx)

    monkeypatch.setattr(module, "training_step", watched_step)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3 and reads == []


def test_a_nan_training_loss_stops_the_fit_at_the_epoch_end(synthetic_root, tmp_path, monkeypatch):
    root = synthetic_root("breastmnist", n=(12, 4, 4))
    cli = build(root, tmp_path, "--trainer.enable_progress_bar=false")
    module = cli.model
    monkeypatch.setattr(module, "loss", lambda logits, y: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="training loss of epoch 0 is nan"):
        cli.trainer.fit(module, datamodule=cli.datamodule)
