"""Small numerical pieces of training: the temperature fit (calibration) and the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["fit_temperature", "warmup_cosine"]


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, task: str) -> float:
    """The temperature T > 0 that minimises the NLL of ``logits / T`` (Guo et al. 2017).

    Args:
        logits: (N, C) logits.
        target: (N,) class indices, or (N, C) 0/1 labels for multi-label.
        task: the module's task (multi-label uses a sigmoid per label).
    """
    # Validation hooks run in inference mode, where autograd is off even under enable_grad.
    with torch.inference_mode(False), torch.enable_grad():
        logits, target = logits.detach().clone().double(), target.detach().clone()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

        def nll() -> torch.Tensor:
            optimizer.zero_grad()
            scaled = logits / log_t.exp()
            if task == "multilabel":
                loss = F.binary_cross_entropy_with_logits(scaled, target.double())
            else:
                loss = F.cross_entropy(scaled, target.long().reshape(-1))
            loss.backward()
            return loss

        optimizer.step(nll)
        return float(log_t.detach().exp())


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
