"""Do the maps mean anything? Model randomisation (Adebayo et al., 2018) on real BreastMNIST
test images, and localisation against ground truth on a synthetic set whose label is a bright
mark at a random position. Tiny ViTs trained for seconds with a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from scipy.stats import spearmanr

from medvit.explain import LOCALISING, RANDOMISATION_SENSITIVE
from medvit.explain.explainer import Explainer


def tiny_vit(seed: int, patch_size: int = 4) -> torch.nn.Module:
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


def train(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, flip: bool = False
) -> torch.nn.Module:
    """A few epochs of AdamW (one-cycle) on ``(x, y)``, optionally with random horizontal
    flips; the network in eval mode."""
    lr, batches = 3e-3, -(-len(x) // 32)
    opt = torch.optim.AdamW(net.parameters(), lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * batches)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            xb = x[batch]
            if flip:
                flipped = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
                xb = torch.where(flipped, xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(net(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval()


def marked_set(n: int, seed: int, size: int = 28, mark: int = 8):
    """Noise images; odd ones (class 1) carry a bright ``mark`` x ``mark`` square at a random
    position. Returns images, labels and each square's top-left corner."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    corners = rng.integers(0, size - mark + 1, (n, 2))
    for i in np.flatnonzero(y):
        r, c = corners[i]
        x[i, 0, r : r + mark, c : c + mark] += 2.0
    return torch.from_numpy(x), torch.from_numpy(y), corners


@pytest.fixture(scope="module")
def marked_model():
    x, y, _ = marked_set(512, seed=0)
    return train(tiny_vit(0), x, y, epochs=6)


# Grad-CAM does not claim localisation: its peak fell on the mark in 0% of these images after
# 3 epochs and in 94% after 6 (README), so this test would pass or fail by training length.
@pytest.mark.parametrize("method", LOCALISING)
def test_map_peaks_fall_inside_the_mark(marked_model, method):
    x, y, corners = marked_set(128, seed=1)
    with torch.no_grad():
        assert (marked_model(x).argmax(1) == y).float().mean() > 0.95  # it learnt the mark
    marked = y == 1
    maps = Explainer(marked_model, method)(x[marked], y[marked]).maps.numpy()
    hits = []
    for heat, (r, c) in zip(maps, corners[marked.numpy()], strict=True):
        pr, pc = np.unravel_index(heat.argmax(), heat.shape)
        hits.append(r <= pr < r + 8 and c <= pc < c + 8)
    assert np.mean(hits) >= 0.9, f"{method}: peak inside the mark in {np.mean(hits):.0%}"


@pytest.fixture(scope="module")
def breast(real_data):
    with np.load(real_data / "breastmnist.npz") as npz:
        data = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}

    def scaled(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[:, None].astype(np.float32) / 127.5 - 1)

    x, y = scaled(data["train_images"]), torch.from_numpy(data["train_labels"][:, 0]).long()
    xt, yt = scaled(data["test_images"]), torch.from_numpy(data["test_labels"][:, 0]).long()
    return x, y, xt, yt


@pytest.fixture(scope="module")
def breast_model(breast):
    """A tiny ViT briefly trained on BreastMNIST (28 px, patch 7: it learns fastest); its test
    AUROC checked (~0.75)."""
    from sklearn.metrics import roc_auc_score

    x, y, xt, yt = breast
    net = train(tiny_vit(0, patch_size=7), x, y, epochs=15, flip=True)
    with torch.no_grad():
        probs = net(xt).softmax(1)[:, 1].numpy()
    assert roc_auc_score(yt.numpy(), probs) > 0.7  # it learnt something
    return net


@pytest.mark.slow
# Grad-CAM fails it here (mean Spearman ~0.6 on this 4 x 4 grid; ~-0.25 with patch 4): the
# README says so, and it is not tested as passing.
@pytest.mark.parametrize("method", RANDOMISATION_SENSITIVE)
def test_maps_of_a_trained_model_differ_from_a_randomised_one(breast, breast_model, method):
    images = breast[2][:64]
    randomised = tiny_vit(seed=1, patch_size=7).eval()  # the same architecture, re-initialised
    ours = Explainer(breast_model, method)(images)
    theirs = Explainer(randomised, method)(images, ours.targets).maps.numpy()
    pairs = zip(ours.maps.numpy(), theirs, strict=True)
    rho = np.nanmean([spearmanr(a.ravel(), b.ravel())[0] for a, b in pairs])
    assert rho < 0.5, f"{method}: mean Spearman rank correlation {rho:.2f}"
