"""Notices a medvit user cannot act on, silenced where they arise; each entry says why it is safe.

Only these exact messages are dropped: every other warning, and these same ones outside the
``medvit`` command and :func:`medvit.api.fit`, still show.
"""

from __future__ import annotations

import logging
import warnings


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def silence_known_noise() -> None:
    """Drop the known messages that carry no information for a medvit run (idempotent)."""
    # Lightning advertises its LitLogger service on every fit. medvit already logs to CSV (and
    # wandb when enabled), so the tip asks nothing of a medvit user.
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in log.filters):
        log.addFilter(_DropLitLoggerTip())
    # torch 2.14 deprecated `isinstance(x, LeafSpec)`, which Lightning 2.6's _pytree still calls
    # while it moves batches; the check still works, and only a Lightning release can change it.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
