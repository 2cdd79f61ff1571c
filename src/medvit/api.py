"""The Python front door: ``fit`` as ``medvit fit`` does, and get the run folder back.

    from medvit import api

    run = api.fit("configs/experiment/breastmnist.yaml", trainer__max_epochs=2)
    run.metrics["test"]["auroc"], run.best_checkpoint, run.predictions()

A notebook gets the same run folder as the command line (config, metrics, checkpoints, test
predictions, loggers, callbacks): no Trainer, RunRecorder or ModelCheckpoint to wire by hand.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medvit.runs import Run

__all__ = ["Run", "RunFolder", "cli_args", "fit"]


#: The run folder :func:`fit` returns: :class:`medvit.runs.Run` (``.metrics``, ``.meta``,
#: ``.config``, ``.best_checkpoint``, ``.predictions()``...), under the name notebooks use.
RunFolder = Run


def _value(value: Any) -> str:
    """A Python value as jsonargparse reads it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def cli_args(
    config: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> list[str]:
    """``medvit fit`` arguments: ``-c`` per config file, then ``--key=value`` per override.

    ``kwargs`` name dotted keys with ``__`` (``trainer__max_epochs=2`` is
    ``--trainer.max_epochs=2``); ``overrides`` takes dotted keys as they are.
    """
    files = [] if config is None else [config] if isinstance(config, (str, os.PathLike)) else config
    args = ["fit"]
    for file in files:
        args += ["-c", str(file)]
    items = {**(overrides or {}), **{k.replace("__", "."): v for k, v in kwargs.items()}}
    args += [f"--{key}={_value(value)}" for key, value in items.items()]
    return args


def fit(
    config: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Run:
    """Train (and test the best checkpoint) exactly as ``medvit fit`` does; return its folder.

    Args:
        config: a config file, or several applied in order (as repeated ``-c``).
        overrides: ``{"trainer.max_epochs": 2, "model.lr": 3e-4}``.
        **kwargs: the same with ``__`` for the dots: ``trainer__max_epochs=2``.

    Returns:
        The run folder, e.g. ``Run('runs/breastmnist/20261130-101500')``, read lazily.
    """
    from medvit.quiet import silence_known_noise
    from medvit.train.cli import MedViTCLI

    silence_known_noise()
    with warnings.catch_warnings():
        # Passing args while sys.argv holds the notebook kernel's own is exactly the intent here.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
        cli = MedViTCLI(args=cli_args(config, overrides, **kwargs))
    return Run(Path(cli.run_dir))
