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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunFolder", "cli_args", "fit"]


@dataclass(frozen=True)
class RunFolder:
    """A run folder written by ``medvit fit`` (or :func:`fit`), read lazily."""

    path: Path

    def _json(self, name: str) -> dict[str, Any]:
        file = self.path / name
        return json.loads(file.read_text()) if file.is_file() else {}

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: best-epoch validation and test metrics, checkpoints, positive class."""
        return self._json("metrics.json")

    @property
    def meta(self) -> dict[str, Any]:
        """``meta.json``: git SHA, command, device, timings."""
        return self._json("meta.json")

    @property
    def config(self) -> dict[str, Any]:
        """The resolved ``config.yaml``."""
        return yaml.safe_load((self.path / "config.yaml").read_text())

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint with the best validation AUROC, if the fit wrote one."""
        name = self.metrics.get("best_checkpoint")
        return self.path / name if name else None

    def predictions(self) -> Any:
        """The test predictions as :class:`medvit.evaluate.plots.Predictions`."""
        from medvit.evaluate.plots import Predictions

        return Predictions.load(self.path / "test_predictions.npz")


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
) -> RunFolder:
    """Train (and test the best checkpoint) exactly as ``medvit fit`` does; return its folder.

    Args:
        config: a config file, or several applied in order (as repeated ``-c``).
        overrides: ``{"trainer.max_epochs": 2, "model.lr": 3e-4}``.
        **kwargs: the same with ``__`` for the dots: ``trainer__max_epochs=2``.

    Returns:
        The run folder, e.g. ``RunFolder(path=runs/breastmnist/20261130-101500)``.
    """
    from medvit.cli import MedViTCLI
    from medvit.quiet import silence_known_noise

    silence_known_noise()
    with warnings.catch_warnings():
        # Passing args while sys.argv holds the notebook kernel's own is exactly the intent here.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
        cli = MedViTCLI(args=cli_args(config, overrides, **kwargs))
    return RunFolder(Path(cli.run_dir))
