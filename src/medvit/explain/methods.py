"""Relevance of each patch token, and from tokens to maps on the input grid.

Every function works on any number of spatial axes: the patch grid is
``model.patch_embed.grid_size`` (2 axes for images, 3 for volumes) and the first
``model.num_prefix_tokens`` tokens (class token, registers) are left out of the map.

- :func:`rollout`: attention rollout (Abnar & Zuidema, 2020): the attention of every layer,
  heads fused by mean, max or min, the residual added as an identity, multiplied through the
  layers; optionally the weakest ``discard_ratio`` of each token's attention to the patches dropped
  first (per row; jacobgil/vit-explain drops it over the whole matrix). Not class-specific.
- :func:`grad_rollout`: class-specific, in the manner of Chefer et al. (2021, "Generic
  Attention-model Explainability"): each layer's attention weighted by its gradient for the
  target class, positive part averaged over heads, accumulated as ``R += A_bar @ R``.
- :func:`gradcam`: Grad-CAM (Selvaraju et al., 2017) on the tokens entering the last block's
  attention (as pytorch-grad-cam's ViT example, ``blocks[-1].norm1``): channel weights are the
  mean gradient over the patch tokens; the map is ``relu(sum_c w_c A_c)`` per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medvit.explain import HEAD_FUSIONS, METHODS

__all__ = ["METHODS", "fuse_heads", "grad_rollout", "gradcam", "rollout", "to_maps"]


def fuse_heads(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    """``(B, heads, N, N)`` -> ``(B, N, N)`` by mean, max or min over the heads."""
    if fusion == "mean":
        return attn.mean(1)
    if fusion == "max":
        return attn.amax(1)
    if fusion == "min":
        return attn.amin(1)
    raise ValueError(f"head fusion must be one of {HEAD_FUSIONS}, got {fusion!r}.")


def _source(n: int, num_prefix: int, class_token: bool, like: torch.Tensor) -> torch.Tensor:
    """The output's row weights ``(B, N)``: the class token, or (pooled models without one) the
    mean of the patch tokens."""
    v = torch.zeros(like.shape[0], n, device=like.device, dtype=torch.float32)
    if class_token:
        v[:, 0] = 1
    else:
        v[:, num_prefix:] = 1 / (n - num_prefix)
    return v


def _through(v: torch.Tensor, matrices: Sequence[torch.Tensor], residual: bool) -> torch.Tensor:
    """``v @ M_L @ ... @ M_1`` (``residual``: ``v @ (I + M_L) ... (I + M_1)``), one row at a
    time: O(L N^2), where the full product of rollout would cost O(L N^3) (3137 tokens of a
    224 px image with patch 4 take seconds that way)."""
    for m in reversed(matrices):
        step = torch.bmm(v[:, None], m)[:, 0]
        v = v + step if residual else step
    return v


def rollout(
    attentions: Sequence[torch.Tensor],
    num_prefix: int,
    fusion: str = "mean",
    discard_ratio: float = 0.0,
    class_token: bool = True,
) -> torch.Tensor:
    """Attention rollout: relevance ``(B, P)`` of the ``P`` patch tokens.

    Args:
        attentions: per layer ``(B, heads, N, N)``, in forward order.
        num_prefix: prefix tokens before the patches (class token, registers).
        fusion: how heads are fused: ``mean``, ``max`` or ``min``.
        discard_ratio: the fraction of each fused row's smallest attentions to patches set to
            zero (attention to prefix tokens is kept), in [0, 1).
        class_token: read the class token's row; else the mean of the patch rows.
    """
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio}.")
    n = attentions[0].shape[-1]
    eye = torch.eye(n, device=attentions[0].device, dtype=torch.float32)
    layers = []
    for attn in attentions:
        a = fuse_heads(attn.float(), fusion)
        k = int((n - num_prefix) * discard_ratio)
        if k:
            # Per row: each token keeps its strongest links to patches (prefix columns kept).
            patches = a[:, :, num_prefix:]
            low = patches.kthvalue(k, dim=-1, keepdim=True).values
            patches.masked_fill_(patches <= low, 0)  # a is fuse_heads' new tensor: in place
        a = (a + eye) / 2
        layers.append(a / a.sum(-1, keepdim=True))
    v = _through(_source(n, num_prefix, class_token, attentions[0]), layers, residual=False)
    return v[:, num_prefix:]


def grad_rollout(
    attentions: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    num_prefix: int,
    class_token: bool = True,
) -> torch.Tensor:
    """Gradient-weighted rollout (Chefer et al., 2021): relevance ``(B, P)`` of the patches.

    Args:
        attentions: per layer ``(B, heads, N, N)``, in forward order.
        gradients: the target score's gradient with respect to each of them.
        num_prefix: prefix tokens before the patches.
        class_token: read the class token's row; else the mean of the patch rows.
    """
    n = attentions[0].shape[-1]
    layers = [
        (attn.float() * grad.float()).clamp(min=0).mean(1)
        for attn, grad in zip(attentions, gradients, strict=True)
    ]
    v = _through(_source(n, num_prefix, class_token, attentions[0]), layers, residual=True)
    return v[:, num_prefix:]


def gradcam(tokens: torch.Tensor, gradients: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Grad-CAM on tokens ``(B, N, D)`` and their gradient: relevance ``(B, P)`` of the patches."""
    acts = tokens[:, num_prefix:].float()
    weights = gradients[:, num_prefix:].float().mean(1, keepdim=True)  # (B, 1, D)
    return (acts * weights).sum(-1).clamp(min=0)


def to_maps(relevance: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Patch relevance ``(B, P)`` as maps ``(B, *size)`` on the input grid, each in [0, 1].

    The ``P`` tokens are laid out row-major on ``grid`` (timm's order), upsampled (bi- or
    trilinear) to ``size`` and min-max scaled per map; a constant map becomes all zeros.
    """
    grid, size = tuple(int(g) for g in grid), tuple(int(s) for s in size)
    if relevance.shape[1] != _prod(grid):
        raise ValueError(f"{relevance.shape[1]} patch tokens do not fill a {grid} patch grid.")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(grid)]
    maps = relevance.float().reshape(relevance.shape[0], 1, *grid)
    maps = F.interpolate(maps, size=size, mode=mode, align_corners=False)[:, 0]
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.amin(1).view(-1, *[1] * len(size))
    span = (flat.amax(1).view(-1, *[1] * len(size)) - low).clamp(min=1e-12)
    return ((maps - low) / span).clamp(0, 1)


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
