"""Maps for a batch: one forward (and for class-specific methods one backward) pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from medvit.explain.attention import capture_attention, check_explainable
from medvit.explain.methods import HEAD_FUSIONS, METHODS, grad_rollout, gradcam, rollout, to_maps


@dataclass
class Explanation:
    """Maps ``(B, *spatial)`` in [0, 1], the logits ``(B, C)`` and the class explained ``(B,)``."""

    maps: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


def check_method(method: str, fusion: str = "mean", discard_ratio: float = 0.0) -> None:
    """One-line errors for an unknown method, head fusion or discard ratio."""
    if method not in METHODS:
        raise ValueError(f"Unknown explanation method {method!r}; expected one of {METHODS}.")
    if fusion not in HEAD_FUSIONS:
        raise ValueError(f"Unknown head fusion {fusion!r}; expected one of {HEAD_FUSIONS}.")
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio}.")


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


class Explainer:
    """Explains a timm ViT's predictions with one of :data:`~medvit.explain.methods.METHODS`.

    Args:
        model: a timm ViT, or a module holding one as ``.net`` (a ``ViTClassifier``).
        method: ``rollout``, ``grad_rollout`` or ``gradcam``.
        fusion: rollout's head fusion (``mean``, ``max``, ``min``).
        discard_ratio: rollout's fraction of weakest attention dropped per layer.

    Raises:
        NoAttentionError: the model has no ViT attention layers (e.g. a CNN).
        ValueError: an unknown method or fusion.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "grad_rollout",
        fusion: str = "mean",
        discard_ratio: float = 0.9,
    ) -> None:
        check_method(method, fusion, discard_ratio)
        self.net = check_explainable(model)
        self.method, self.fusion, self.discard_ratio = method, fusion, discard_ratio
        embed = self.net.patch_embed
        self.grid = tuple(int(g) for g in embed.grid_size)
        self.num_prefix = int(self.net.num_prefix_tokens)
        self.class_token = getattr(self.net, "cls_token", None) is not None and (
            getattr(self.net, "global_pool", "token") == "token"
        )
        # The embedding's own count (a conv stem feeds ``proj`` its features, not the input).
        proj = getattr(embed, "proj", None)
        self.in_chans = getattr(embed, "in_chans", None) or getattr(proj, "in_channels", None)
        img_size = getattr(embed, "img_size", None)
        dynamic = getattr(embed, "dynamic_img_size", False) or getattr(
            embed, "dynamic_img_pad", False
        )
        self.img_size = None if dynamic or img_size is None else tuple(int(s) for s in img_size)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        # forward() rather than __call__: a network compiled in place (``--model.compile``)
        # runs eagerly here, so the switched attention path and the hooks are what runs.
        return self.net.forward(x)

    def check_input(self, x: torch.Tensor) -> None:
        """A one-line error for a batch of the wrong rank, channel count or size."""
        want = (self.in_chans or "C", *(self.img_size or ("...",) * len(self.grid)))
        shape = tuple(x.shape[1:])
        bad = x.ndim != 2 + len(self.grid)
        bad = bad or (self.in_chans is not None and shape[0] != self.in_chans)
        bad = bad or (self.img_size is not None and shape[1:] != self.img_size)
        if bad:
            raise ValueError(
                f"images of shape {shape} (channels, size) do not fit the model, which takes "
                f"{want}."
            )

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> Explanation:
        """Maps for ``x`` ``(B, C, *spatial)``; ``targets``: class indices, None = predicted."""
        self.check_input(x)
        compute: Callable[[torch.Tensor, torch.Tensor | None], Explanation]
        compute = self._rollout if self.method == "rollout" else self._gradient
        with _eval_mode(self.net):
            out = compute(x, targets)
        return Explanation(to_maps(out.maps, self.grid, x.shape[2:]), out.logits, out.targets)

    def _rollout(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        with torch.no_grad(), capture_attention(self.net) as attentions:
            logits = self._eager(x.to(next(self.net.parameters()).dtype))
        rel = rollout(
            attentions, self.num_prefix, self.fusion, self.discard_ratio, self.class_token
        )
        targets = logits.argmax(1) if targets is None else targets.to(logits.device)
        return Explanation(rel, logits.detach(), targets)

    def _gradient(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        tokens: list[torch.Tensor] = []
        last = self.net.blocks[-1]
        # pytorch-grad-cam's ViT example's layer: the tokens entering the last attention.
        where = getattr(last, "norm1", last)
        hook = where.register_forward_hook(lambda _m, _a, out: tokens.append(out))
        try:
            # Lightning runs test hooks in inference mode, whose tensors autograd refuses:
            # leave it, and work on clones made outside it.
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                capture_attention(self.net) as attentions,
            ):
                # Gradients flow from the input, so frozen weights still get a graph; and
                # autograd.grad leaves the parameters' .grad alone.
                dtype = next(self.net.parameters()).dtype
                logits = self._eager(x.clone().to(dtype).requires_grad_(True))
                targets = logits.argmax(1) if targets is None else targets.clone()
                targets = targets.to(logits.device)
                score = logits.gather(1, targets.long().view(-1, 1)).sum()
                if self.method == "gradcam":
                    (grad,) = torch.autograd.grad(score, tokens[-1])
                    rel = gradcam(tokens[-1].detach(), grad, self.num_prefix)
                else:
                    grads = torch.autograd.grad(score, attentions)
                    attns = [a.detach() for a in attentions]
                    rel = grad_rollout(attns, grads, self.num_prefix, self.class_token)
        finally:
            hook.remove()
        return Explanation(rel.detach(), logits.detach(), targets)
