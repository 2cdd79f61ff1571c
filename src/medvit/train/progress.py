"""The training progress bar: shows the running loss without a host sync on every step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# Steps between progress-bar refreshes. Each refresh reads the loss from the device (a host sync
# that stops the CPU from queueing the next step); benchmarks/RESULTS.md §6 has the cost per step.
DEFAULT_REFRESH_RATE = 10


class LossProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, plus the last training loss, read only when the bar refreshes.

    Logging the step loss with ``prog_bar=True`` would make Lightning turn it into a Python float
    after every step, a device sync per step whether or not a bar is shown. The module keeps the
    loss as a tensor (``last_train_loss``) and this bar reads it every ``refresh_rate`` steps.
    """

    def __init__(self, refresh_rate: int = DEFAULT_REFRESH_RATE, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None and trainer.training:
            metrics["loss"] = f"{float(loss):.3f}"
        return metrics
