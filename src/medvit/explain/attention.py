"""The attention matrices of a timm ViT, captured only while explaining.

timm's attention layers run ``F.scaled_dot_product_attention`` (``fused_attn``), which never
forms the attention matrix. :func:`capture_attention` switches them to timm's own unfused path
for the duration of a ``with`` block, records the softmaxed matrices with
hooks on each layer's ``attn_drop``, and restores every switch and removes every hook on leaving,
exception or not, so training keeps its fused kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class NoAttentionError(ValueError):
    """The network has no timm attention layers to explain (e.g. a CNN)."""


def unwrap(net: nn.Module) -> nn.Module:
    """The timm model inside a ``torch.compile`` wrapper or a ViTClassifier (``.net``)."""
    net = getattr(net, "net", net)
    return getattr(net, "_orig_mod", net)


def attention_layers(net: nn.Module) -> list[nn.Module]:
    """The attention layers of ``net`` in forward order: modules with ``fused_attn`` and
    ``attn_drop`` (timm's ``Attention``), whose unfused path softmaxes into ``attn_drop``."""
    return [
        m
        for m in net.modules()
        if isinstance(getattr(m, "fused_attn", None), bool) and hasattr(m, "attn_drop")
    ]


def check_explainable(net: nn.Module, where: str = "the network") -> nn.Module:
    """The timm ViT inside ``net``, or a one-line error saying why it cannot be explained.

    Raises:
        NoAttentionError: no attention layers, no patch embedding with a grid, or no
            ``num_prefix_tokens`` (what maps tokens back onto the image).
    """
    inner = unwrap(net)
    grid = getattr(getattr(inner, "patch_embed", None), "grid_size", None)
    if not attention_layers(inner) or grid is None or not hasattr(inner, "num_prefix_tokens"):
        raise NoAttentionError(
            f"{where} ({type(inner).__name__}) has no ViT attention layers with a patch grid; "
            "attention rollout and ViT Grad-CAM explain timm VisionTransformers only."
        )
    return inner


@contextmanager
def capture_attention(net: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, forward passes of ``net`` append their attention matrices.

    The matrices are the softmaxed ``(B, heads, N, N)`` of each layer in forward order, as
    they enter ``attn_drop`` (so dropout does not touch them), still part of the autograd
    graph when the forward pass builds one: ``torch.autograd.grad(score, attentions)`` gives
    their gradients without touching the parameters' ``.grad``.

    Args:
        net: a timm ViT (or a module holding one as ``.net``).

    Yields:
        The list the forward passes run in the block fill.
    """
    layers = attention_layers(unwrap(net))
    if not layers:
        raise NoAttentionError(f"{type(unwrap(net)).__name__} has no attention layers.")
    captured: list[torch.Tensor] = []
    saved = [layer.fused_attn for layer in layers]
    handles = []

    def record(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])

    try:
        for layer in layers:
            layer.fused_attn = False
            handles.append(layer.attn_drop.register_forward_pre_hook(record))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for layer, flag in zip(layers, saved, strict=True):
            layer.fused_attn = flag
