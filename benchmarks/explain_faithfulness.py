"""Are the explanation maps faithful? Deletion and insertion AUC per method on BreastMNIST test
images, against a random map and a centre blob, plus model randomisation (Adebayo et al., 2018).

Deletion (Petsiuk et al., 2018): the pixels are replaced by the image's mean in the map's order,
most relevant first, in ``--steps`` equal steps; the curve is the probability of the class the
map explains (the predicted one) and its AUC (mean over the steps, trapezoid) should be LOW for
a faithful map. Insertion: starting from a blurred copy (Gaussian, sigma ``--blur``), the real
pixels come back in the map's order; the AUC should be HIGH. A map is only worth something when
it beats the baselines: a uniformly random map, and a centred Gaussian blob (what a "the lesion
is in the middle" prior gives on MedMNIST's centred crops). Randomisation: mean Spearman rank
correlation between the maps of the model and of the same architecture re-initialised (it
should be far below 1; the tests require < 0.5).

The model is a tiny ViT (28 px, patch 4, 3 blocks) trained here for ``--epochs`` on BreastMNIST
train with a plain loop, or a medvit checkpoint (``--ckpt_path``, evaluated at its own size).

    python benchmarks/explain_faithfulness.py --root /work/shared/data/medmnist \\
        --out benchmarks/results/explain/breastmnist_28.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from medvit.explain.explainer import Explainer  # noqa: E402
from medvit.explain.methods import METHODS  # noqa: E402

BASELINES = ("random", "centre_blob")


def tiny_vit(seed: int, patch_size: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=2,
        in_chans=1,
        img_size=28,
        patch_size=patch_size,
        embed_dim=32,
        depth=3,
        num_heads=2,
    )


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """AdamW, one-cycle schedule, random horizontal flips; the network in eval mode."""
    lr, batches = 3e-3, -(-len(x) // 32)
    opt = torch.optim.AdamW(net.parameters(), lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * batches)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            flipped = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
            xb = torch.where(flipped, x[batch].flip(-1), x[batch])
            loss = F.cross_entropy(net(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(B, C, H, W)`` (reflect padding), separable."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def centre_blob(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * (h / 4) ** 2)))


@torch.no_grad()
def curves(
    model: Any, x: torch.Tensor, maps: np.ndarray, targets: torch.Tensor, steps: int, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC per image ``(N,)`` each."""
    n, _, h, w = x.shape
    fractions = np.linspace(0, 1, steps + 1)
    blurred = blur(x, sigma)
    mean = x.mean((1, 2, 3), keepdim=True).expand_as(x)
    deletion, insertion = np.zeros(n), np.zeros(n)
    for i in range(n):
        order = np.argsort(-maps[i].ravel(), kind="stable")
        ranks = np.empty(h * w, int)
        ranks[order] = np.arange(h * w)
        ranks = torch.from_numpy(ranks.reshape(1, 1, h, w))
        # step k: the k-th fraction's most relevant pixels deleted (inserted)
        shown = torch.stack([ranks < round(f * h * w) for f in fractions])[:, 0]  # (S, 1, H, W)
        deleted = torch.where(shown, mean[i], x[i])
        inserted = torch.where(shown, x[i], blurred[i])
        probs = model(torch.cat((deleted, inserted)).float()).softmax(1)[:, int(targets[i])]
        d, ins = probs[: steps + 1].numpy(), probs[steps + 1 :].numpy()
        deletion[i] = np.trapezoid(d, fractions)
        insertion[i] = np.trapezoid(ins, fractions)
    return deletion, insertion


def load_data(root: Path, limit: int | None) -> tuple[torch.Tensor, ...]:
    with np.load(root / "breastmnist.npz") as npz:
        data = {k: npz[k] for k in npz.files}

    def scaled(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[:, None].astype(np.float32) / 127.5 - 1)

    xt, yt = scaled(data["test_images"]), torch.from_numpy(data["test_labels"][:, 0]).long()
    if limit:
        xt, yt = xt[:limit], yt[:limit]
    x, y = scaled(data["train_images"]), torch.from_numpy(data["train_labels"][:, 0]).long()
    return x, y, xt, yt


def from_checkpoint(ckpt_path: str, root: Path, limit: int | None):
    """A medvit checkpoint's model and the BreastMNIST test split as its evaluation sees it."""
    from medvit.data.transforms import build_transforms
    from medvit.evaluate.predict import load_model

    model, data_hp = load_model(ckpt_path)
    hp = model.hparams
    flag = data_hp.get("flag") or "breastmnist"
    size = data_hp.get("size") or 28
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    with np.load(root / name) as npz:
        images, labels = npz["test_images"], npz["test_labels"][:, 0]
    if limit:
        images, labels = images[:limit], labels[:limit]
    mean, std = data_hp.get("mean") or [0.5], data_hp.get("std") or [0.5]
    transform = build_transforms(
        "none", hp.img_size, False, in_chans=hp.in_chans, mean=mean, std=std
    )
    xt = torch.stack([transform(im) for im in images])
    return model.eval(), xt, torch.from_numpy(labels).long()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("MEDVIT_TEST_DATA", "data")))
    p.add_argument("--ckpt_path", default=None, help="a medvit checkpoint (default: train one)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=28, help="deletion/insertion steps")
    p.add_argument("--blur", type=float, default=5.0, help="insertion's start: blur sigma (px)")
    p.add_argument("--limit", type=int, default=None, help="first N test images only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.ckpt_path:
        model, xt, yt = from_checkpoint(args.ckpt_path, args.root, args.limit)
        randomised = None
        described = f"checkpoint {args.ckpt_path}"
    else:
        x, y, xt, yt = load_data(args.root, args.limit)
        model = train(tiny_vit(0, args.patch_size), x, y, args.epochs)
        randomised = tiny_vit(1, args.patch_size).eval()
        described = (
            f"tiny ViT (28 px, patch {args.patch_size}, 3 blocks, dim 32), {args.epochs} epochs"
        )
    with torch.no_grad():
        probs = model(xt).softmax(1)
    from sklearn.metrics import roc_auc_score

    auroc = float(roc_auc_score(yt.numpy(), probs[:, 1].numpy()))
    targets = probs.argmax(1)
    size = tuple(xt.shape[2:])
    rng = np.random.default_rng(0)
    all_maps = {
        "random": rng.random((len(xt), *size)),
        "centre_blob": np.broadcast_to(centre_blob(size), (len(xt), *size)),
    }
    rho: dict[str, float] = {}
    for method in METHODS:
        ours = Explainer(model, method)(xt, targets)
        all_maps[method] = ours.maps.numpy()
        if randomised is not None:
            theirs = Explainer(randomised, method)(xt, targets).maps.numpy()
            pairs = zip(all_maps[method], theirs, strict=True)
            rho[method] = float(np.nanmean([spearmanr(a.ravel(), b.ravel())[0] for a, b in pairs]))
    net = getattr(model, "net", model)
    rows = []
    for name in (*METHODS, *BASELINES):
        deletion, insertion = curves(net, xt, all_maps[name], targets, args.steps, args.blur)
        rows.append(
            {
                "map": name,
                "deletion_auc": float(deletion.mean()),
                "deletion_sem": float(deletion.std(ddof=1) / np.sqrt(len(deletion))),
                "insertion_auc": float(insertion.mean()),
                "insertion_sem": float(insertion.std(ddof=1) / np.sqrt(len(insertion))),
                "randomisation_spearman": rho.get(name),
            }
        )
    report = {
        "model": described,
        "test_images": len(xt),
        "test_auroc": auroc,
        "steps": args.steps,
        "blur_sigma": args.blur,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
    }
    print(f"{described}; test AUROC {auroc:.3f}; {len(xt)} test images")
    print(
        "| map | deletion AUC (lower is better) | insertion AUC (higher is better) | ins - del | randomisation Spearman |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        spear = "" if r["randomisation_spearman"] is None else f"{r['randomisation_spearman']:.2f}"
        print(
            f"| {r['map']} | {r['deletion_auc']:.3f} ± {r['deletion_sem']:.3f} | "
            f"{r['insertion_auc']:.3f} ± {r['insertion_sem']:.3f} | "
            f"{r['insertion_auc'] - r['deletion_auc']:+.3f} | {spear} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
