"""ViTFinetuning: the backbone stays frozen until its epoch, then trains on the LR schedule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import short_trainer_kwargs

from medvit.data.medmnist import MedMNISTDataModule
from medvit.models.module import ViTClassifier
from medvit.train.callbacks import ViTFinetuning


class Snapshot(L.Callback):
    """Copies of a backbone weight and the head weight at the end of every training epoch."""

    def __init__(self) -> None:
        self.backbone: list[torch.Tensor] = []
        self.head: list[torch.Tensor] = []
        self.lrs: list[list[float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backbone.append(pl_module.net.blocks[0].attn.qkv.weight.detach().clone())
        self.head.append(pl_module.net.head.weight.detach().clone())
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_backbone_frozen_then_unfrozen_on_schedule(synthetic_root, tmp_path):
    root = synthetic_root("breastmnist", n=(32, 8, 8))
    data = MedMNISTDataModule(
        root=str(root),
        verify_md5=False,
        num_workers=0,
        global_batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )
    model = ViTClassifier(
        num_classes=2,
        in_chans=1,
        img_size=28,
        task="binary",
        patch_size=7,
        pos_embed="sincos",
        warmup_epochs=0,
    )
    start = model.net.blocks[0].attn.qkv.weight.detach().clone()
    head0 = model.net.head.weight.detach().clone()
    snap = Snapshot()
    trainer = L.Trainer(
        **short_trainer_kwargs(
            3, callbacks=[ViTFinetuning(unfreeze_at_epoch=1), snap], default_root_dir=tmp_path
        )
    )
    trainer.fit(model, datamodule=data)
    assert torch.equal(snap.backbone[0], start), "backbone must not move while frozen"
    assert not torch.equal(snap.head[0], head0), "the head trains from the start"
    assert not torch.equal(snap.backbone[1], snap.backbone[0]), "backbone trains once unfrozen"
    assert not model.net.pos_embed.requires_grad, "a sin-cos embedding stays fixed"
    # The added backbone group follows the cosine schedule like the others.
    assert len(snap.lrs[1]) > len(snap.lrs[0])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(trainer.optimizers[0].param_groups)
    assert snap.lrs[2][-1] < snap.lrs[1][-1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unfreeze_at_epoch"):
        ViTFinetuning(unfreeze_at_epoch=-1)
    with pytest.raises(ValueError, match="backbone_lr_ratio"):
        ViTFinetuning(backbone_lr_ratio=0)
