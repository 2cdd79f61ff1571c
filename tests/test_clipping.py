"""Gradient clipping with the fused AdamW that medvit uses on CUDA, under bf16-mixed precision."""

from __future__ import annotations

import lightning as L
import torch
from conftest import short_trainer_kwargs

from medvit.models.module import ViTClassifier


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [
            (torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 2, (4,), generator=g), None)
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        x, y, _ = self.items[i]
        return x, y, torch.arange(4)


def train(fused: bool, clip: float | None) -> dict[str, torch.Tensor]:
    """Three bf16-mixed steps from the same weights; the trained weights."""
    torch.manual_seed(0)
    module = ViTClassifier(
        num_classes=2,
        in_chans=1,
        img_size=28,
        task="binary",
        patch_size=7,
        model_name="vit_tiny_patch16_224",
        fused_optimizer=fused,
        warmup_epochs=0,
        drop_path_rate=0.0,
    )
    trainer = L.Trainer(
        **short_trainer_kwargs(
            1,
            accelerator="cpu",
            precision="bf16-mixed",
            gradient_clip_val=clip,
            limit_val_batches=0,
        )
    )
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fused_adamw_clips_under_bf16_like_the_foreach_kernel():
    # Lightning alone raises "does not allow for gradient clipping" here (seen on an H200).
    fused = train(fused=True, clip=0.01)
    foreach = train(fused=False, clip=0.01)
    unclipped = train(fused=True, clip=None)
    # The two AdamW kernels round differently (up to ~7e-6 here); clipping moves weights by ~1e-3.
    for key, value in fused.items():
        torch.testing.assert_close(value, foreach[key], rtol=0, atol=2e-5, equal_nan=True, msg=key)
    # The clip is real: with it the weights end far from where they end without it.
    moved = max((fused[k] - unclipped[k]).abs().max().item() for k in fused if k.startswith("net."))
    assert moved > 1e-4
