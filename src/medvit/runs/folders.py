"""Readers of whole folders: a run folder (``Run``) and a CV folder (``CVRun``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from medvit.runs.layout import (
    CONFIG_FILE,
    ENSEMBLE_FILE,
    HPARAMS_FILE,
    METRICS_CSV,
    PREDICTIONS_FILE,
    RUN_MARKERS,
    SUMMARY_JSON,
    data_name,
    fold_run_dir,
    read_cv_config,
    read_cv_summary,
    read_meta,
    read_metrics,
    read_yaml,
)
from medvit.runs.predictions import Predictions, read_predictions


# ------------------------------------------------------------------------------ readers
class Run:
    """A run folder, read lazily: each file on first use, then kept.

    Args:
        path: the run folder.
        label: a short name for tables and reports (default: the folder's name).
    """

    def __init__(self, path: str | Path, label: str = "") -> None:
        self.path = Path(path)
        self.label = label or self.path.name

    @classmethod
    def load(cls, path: str | Path, label: str = "") -> Run:
        """Read a run folder now, so a broken file fails here with its name."""
        run = cls(path, label)
        run.metrics, run.config, run.hparams, run.meta, run.predictions()  # noqa: B018
        return run

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: best-epoch validation and test metrics, checkpoints, positive class."""
        return read_metrics(self.path)

    @cached_property
    def meta(self) -> dict[str, Any]:
        """``meta.json``: command, git SHA, device, timings."""
        return read_meta(self.path)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved ``config.yaml``."""
        return read_yaml(self.path / CONFIG_FILE)

    @cached_property
    def hparams(self) -> dict[str, Any]:
        """The module's ``hparams.yaml``."""
        return read_yaml(self.path / HPARAMS_FILE)

    @property
    def metrics_csv(self) -> Path | None:
        """``metrics.csv`` when it has content."""
        path = self.path / METRICS_CSV
        return path if path.is_file() and path.stat().st_size else None

    def predictions(self) -> Predictions | None:
        """The test predictions (None when the run was not tested)."""
        if "_predictions" not in self.__dict__:
            self._predictions = read_predictions(self.path / PREDICTIONS_FILE)
        return self._predictions

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint with the best validation metric, if the fit wrote one."""
        name = self.metrics.get("best_checkpoint")
        return self.path / name if name else None

    @property
    def data_name(self) -> str:
        """The data's name, as messages give it: ``breastmnist``, ``pathmnist_64``, ``chest_xray``."""
        args = {k: self.setting(f"data.{k}") for k in ("flag", "size", "path")}
        return data_name(args) or "?"

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A resolved config value (``model.lr``), else the flat hparams value (``lr``).

        A section saved as ``{class_path, init_args}`` (``--data ImageDataModule``) is looked
        into: ``data.path`` finds ``data.init_args.path``.
        """
        node: Any = self.config
        for part in dotted.split("."):
            if isinstance(node, Mapping) and part not in node:
                node = node.get("init_args")
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is None:
            node = self.hparams.get(dotted.split(".")[-1])
        return default if node is None else node


def find_fold_dir(cv_dir: Path, entry: Mapping[str, Any]) -> Path | None:
    """A CV run's folder: as recorded (relative to the CV folder, or absolute), else runs/<name>."""
    candidates = []
    if entry.get("run_dir"):
        recorded = Path(entry["run_dir"])
        candidates += [recorded] if recorded.is_absolute() else [cv_dir / recorded, recorded]
    # Absolute paths from another machine do not exist here: fall back to the standard layout.
    candidates.append(fold_run_dir(cv_dir, str(entry["run"])))
    return next((c for c in candidates if c.is_dir()), None)


@dataclass
class CVRun:
    """What a CV folder holds: its summary, config, the finished runs and the ensemble."""

    path: Path
    label: str
    summary: dict[str, Any]
    config: dict[str, Any]
    folds: list[tuple[str, Run | None]]
    ensemble: Predictions | None

    @classmethod
    def load(cls, path: str | Path, label: str = "") -> CVRun:
        """Read a CV folder and the run folders of its finished runs."""
        path = Path(path)
        summary = read_cv_summary(path)
        folds = []
        for entry in summary["runs"]:
            run_dir = find_fold_dir(path, entry)
            name = str(entry["run"])
            folds.append((name, Run.load(run_dir, name) if run_dir is not None else None))
        return cls(
            path=path,
            label=label or path.name,
            summary=summary,
            config=read_cv_config(path),
            folds=folds,
            ensemble=read_predictions(path / ENSEMBLE_FILE),
        )

    def first_run(self) -> Run | None:
        """The first run whose folder was found (all runs share data and model settings)."""
        return next((run for _, run in self.folds if run is not None), None)


def detect(path: str | Path) -> str:
    """``"cv"`` for a CV folder, ``"run"`` for a run folder; a ValueError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory.")
    if (path / SUMMARY_JSON).is_file():
        return "cv"
    if any((path / name).is_file() for name in RUN_MARKERS):
        return "run"
    raise ValueError(
        f"{path} is neither a run folder (no {' or '.join(RUN_MARKERS)}) nor a CV folder "
        f"(no {SUMMARY_JSON})."
    )
