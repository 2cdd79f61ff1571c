"""Callbacks: the run directory's records, and a freeze/unfreeze fine-tuning schedule."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BaseFinetuning

from medvit import runs
from medvit.fileio import atomic_write


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit SHA and dirty flag of the repository holding ``path`` (this package by default)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha or "unknown", "git_dirty": bool(status) if status is not None else None}


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            value = value.item() if isinstance(value, torch.Tensor) else value
            out[key.removeprefix(prefix)] = float(value)
    return dict(sorted(out.items()))


def _positive_class(pl_module: L.LightningModule) -> dict[str, Any]:
    """``{"positive_class": name}`` for a binary task: what sens/spec/F1/op_* are about."""
    hp = pl_module.hparams
    if hp.get("task") != "binary":
        return {}
    index = hp.get("positive_class", 1)
    names = hp.get("class_names") or ["0", "1"]
    return {"positive_class": names[index]}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but atomic in the checkpoint's own folder (fsynced).

    Lightning writes a checkpoint to a temporary file in the system temp folder and moves it.
    When that folder is on another file system than the run (a local ``/tmp`` and a shared
    ``runs/``, as on most clusters), the move is a copy into ``last.ckpt`` itself, so a kill
    during it leaves a truncated checkpoint that cannot be resumed; and every kill during a save
    leaves a checkpoint-sized file in ``/tmp``. Here the temporary file is
    ``checkpoints/.{name}.tmp``, renamed over the checkpoint, and reused by the next save.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb", fixed_temp=True) as fh:
            torch.save(checkpoint, fh)
        if path.parent not in self._swept:
            # Half-written checkpoints of a killed run (a resume runs in the same folder).
            self._swept.add(path.parent)
            for stale in path.parent.glob(".*.ckpt.tmp"):
                stale.unlink(missing_ok=True)


class RunRecorder(L.Callback):
    """Keeps a run directory self-describing: ``meta.json``, ``metrics.json`` and predictions.

    ``metrics.json`` holds the validation metrics of the best epoch (by ``monitor``), the test
    metrics and the best checkpoint; ``test_predictions.npz`` holds every test sample's index,
    probabilities and target (gathered over all ranks), which reports and CV ensembles read.
    Only global rank 0 writes.

    Args:
        monitor: validation metric that defines the best epoch.
        mode: ``max`` or ``min``.
        command: the command line to record; defaults to ``sys.argv``.
    """

    def __init__(
        self,
        monitor: str = "val/auroc",
        mode: Literal["max", "min"] = "max",
        command: list[str] | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'.")
        self.monitor, self.mode = monitor, mode
        self.command = command if command is not None else list(sys.argv)
        self.run_dir: Path | None = None
        self._best: float | None = None
        self._t0 = time.time()

    def state_dict(self) -> dict[str, Any]:
        # Saved in checkpoints, so a resumed run still knows the best epoch before the interruption.
        return {"best": self._best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best = state_dict.get("best")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # trainer.log_dir is broadcast from rank 0, so every rank agrees on the folder.
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._update_meta(trainer, stage=stage, started=True)

    def _update_meta(self, trainer: L.Trainer, stage: str, started: bool = False) -> None:
        meta = runs.read_meta(self.run_dir)
        if started and "started" not in meta:
            meta.update(
                {
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": self.command,
                    **git_info(),
                    "host": socket.gethostname(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "lightning": L.__version__,
                }
            )
        device = trainer.strategy.root_device
        meta.update(
            {
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or device.type,
                "accelerator": device.type,
                "num_devices": trainer.num_devices,
                "num_nodes": trainer.num_nodes,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "precision": str(trainer.precision),
                "stages": sorted(set(meta.get("stages", [])) | {stage}),
            }
        )
        summary = getattr(trainer.lightning_module, "pretrained_summary", None)
        if stage == "fit" and summary is not None:
            meta["pretrained_weights"] = summary  # what the weight file gave (models/vit.py)
        teacher = getattr(trainer.lightning_module, "teacher_info", None)
        if stage == "fit" and teacher is not None:
            meta["teacher"] = teacher  # distillation: which teacher, its metrics, its cost
        if not started:
            meta["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            meta["duration_s"] = round(meta.get("duration_s", 0.0) + time.time() - self._t0, 1)
            self._t0 = time.time()
        runs.write_meta(self.run_dir, meta)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = self._best is None or (
            value > self._best if self.mode == "max" else value < self._best
        )
        if trainer.state.fn == "validate" or better:
            self._best = value
            metrics = runs.read_metrics(self.run_dir)
            metrics["val"] = _scalars(trainer.callback_metrics, "val/")
            metrics["val"].pop("auroc_best", None)
            metrics["best_epoch"] = trainer.current_epoch
            metrics["monitor"] = self.monitor
            metrics.update(_positive_class(pl_module))
            runs.write_metrics(self.run_dir, metrics)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = runs.read_metrics(self.run_dir)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            metrics["best_checkpoint"] = os.path.relpath(ckpt.best_model_path, self.run_dir)
        metrics["epochs_trained"] = trainer.current_epoch
        runs.write_metrics(self.run_dir, metrics)
        self._update_meta(trainer, stage="fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = runs.read_metrics(self.run_dir)
        metrics["test"] = _scalars(trainer.callback_metrics, "test/")
        ckpt = trainer.ckpt_path
        if ckpt and Path(ckpt).resolve().is_relative_to(self.run_dir.resolve()):
            ckpt = os.path.relpath(ckpt, self.run_dir)
        metrics["test_checkpoint"] = ckpt
        metrics.update(_positive_class(pl_module))
        runs.write_metrics(self.run_dir, metrics)
        preds = getattr(pl_module, "test_predictions", None)
        if preds is not None:
            names = pl_module.hparams.get("class_names") or [
                str(i) for i in range(preds["probs"].shape[1])
            ]
            runs.write_predictions(
                self.run_dir / runs.PREDICTIONS_FILE,
                probs=preds["probs"],
                target=preds["target"],
                index=preds["index"],
                class_names=names,
                task=pl_module.hparams.get("task", ""),
                positive_class=pl_module.hparams.get("positive_class", 1),
            )
        self._update_meta(trainer, stage="test")


class ViTFinetuning(BaseFinetuning):
    """Train only the head for ``unfreeze_at_epoch`` epochs, then the whole ViT.

    Args:
        unfreeze_at_epoch: epoch at which the backbone joins training.
        backbone_lr_ratio: backbone learning rate as a fraction of the head's current rate when
            it is unfrozen (a gentle start protects pretrained features).
    """

    def __init__(self, unfreeze_at_epoch: int = 1, backbone_lr_ratio: float = 0.1) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0:
            raise ValueError(f"unfreeze_at_epoch must be >= 0, got {unfreeze_at_epoch}.")
        if not 0 < backbone_lr_ratio <= 1:
            raise ValueError(f"backbone_lr_ratio must lie in (0, 1], got {backbone_lr_ratio}.")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_ratio = backbone_lr_ratio

    @staticmethod
    def _backbone(pl_module: L.LightningModule) -> list[torch.nn.Module]:
        net = pl_module.net
        # A distilled DeiT has two heads (class and distillation): both are heads.
        heads = net.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        return [m for m in net.children() if not any(m is h for h in heads)]

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.unfreeze_at_epoch > 0:
            self.freeze(self._backbone(pl_module))

    def finetune_function(
        self, pl_module: L.LightningModule, current_epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        if current_epoch != self.unfreeze_at_epoch or self.unfreeze_at_epoch == 0:
            return
        n_groups = len(optimizer.param_groups)
        self.unfreeze_and_add_param_group(
            self._backbone(pl_module),
            optimizer,
            initial_denom_lr=1.0 / self.backbone_lr_ratio,
            train_bn=True,
        )
        # A fixed sin-cos position embedding must stay frozen after the unfreeze.
        if pl_module.hparams.get("pos_embed") == "sincos":
            pl_module.net.pos_embed.requires_grad_(False)
        # torch schedulers zip base_lrs with param_groups: without this the new groups would be
        # silently left out of the warm-up/cosine schedule.
        for config in pl_module.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if sched.optimizer is optimizer and hasattr(sched, "base_lrs"):
                for group in optimizer.param_groups[n_groups:]:
                    group.setdefault("initial_lr", group["lr"])
                    sched.base_lrs.append(group["initial_lr"])
                if hasattr(sched, "lr_lambdas"):
                    sched.lr_lambdas.extend(
                        [sched.lr_lambdas[0]]
                        * (len(optimizer.param_groups) - len(sched.lr_lambdas))
                    )
