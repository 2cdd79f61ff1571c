"""3D training throughput and peak memory of the default 3D recipe's model, on this machine.

Times full training steps (forward, loss, backward, AdamW step) of ``ViTClassifier`` with
``spatial_dims=3`` on random volumes of the cube side asked for (the recipe's model, conv stem
and patch rule: patch 4 at 28^3, 8 at 64^3; ``--stem patch`` for one patchify Conv3d), and the per-volume cost of the flag's 3D augmentation preset
in one worker. Peak memory is the process's maximum resident set size (CPU) or the CUDA
allocator's peak. Run one size per process so each peak is its own:

    python benchmarks/throughput3d.py --img-size 28 --threads 1
    python benchmarks/throughput3d.py --img-size 64 --threads 1 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--model", default="test_vit")
    parser.add_argument("--stem", default="conv", choices=("conv", "patch"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="adrenal3d")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from medvit.data.transforms import build_transforms
    from medvit.models.module import ViTClassifier

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    module = ViTClassifier(
        num_classes=2,
        in_chans=1,
        img_size=args.img_size,
        task="binary",
        spatial_dims=3,
        model_name=args.model,
        patch_size=None,
        stem=args.stem,
    ).to(device)
    net = module.net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    side = args.img_size
    x = torch.randn(args.batch_size, 1, side, side, side, device=device)
    y = torch.randint(0, 2, (args.batch_size,), device=device)

    def step() -> None:
        loss = module.loss(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start

    transform = build_transforms(args.preset, side, train=True, seed=0)
    volume = np.random.default_rng(0).integers(0, 256, (side,) * 3, dtype=np.uint8)
    n = 20
    start = time.perf_counter()
    for _ in range(n):
        transform(volume)
    augment_s = (time.perf_counter() - start) / n

    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report = {
        "img_size": side,
        "patch_size": tuple(net.patch_embed.patch_size),
        "tokens": net.patch_embed.num_patches,
        "model": args.model,
        "stem": args.stem,
        "device": str(device),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "train_volumes_per_s": round(args.batch_size * args.steps / train_s, 2),
        "augment_ms_per_volume": round(augment_s * 1000, 2),
        "peak_memory_mib": round(peak_mib, 1),
    }
    print(json.dumps(report))
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
