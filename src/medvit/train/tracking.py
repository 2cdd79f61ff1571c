"""Experiment tracking: CSV always, Weights & Biases when asked (offline unless logged in)."""

from __future__ import annotations

import csv
import netrc
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from medvit.fileio import atomic_write, atomic_write_text

WandbMode = Literal["auto", "offline", "online", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)


@dataclass
class WandbOptions:
    """Weights & Biases settings (``--wandb.*``).

    Args:
        enabled: log to wandb as well as to CSV.
        project: wandb project.
        entity: wandb team or user; ``None`` is your default entity.
        group: run group; ``None``: none. ``medvit cv`` sets it to the CV's name for its folds
            and summary run, so a grouped view holds one CV and never single runs.
        name: run name; ``None`` uses the run directory's name.
        job_type: wandb job type, e.g. ``train`` or ``fold``.
        tags: run tags.
        mode: ``auto`` (online when an API key is configured, else offline), ``offline``,
            ``online`` or ``disabled``. A ``WANDB_MODE`` environment variable wins over ``auto``.
        log_model: upload the best checkpoint as a wandb artifact at the end of training.
        log_predictions: log a table of misclassified test images (thumbnails, identified only by
            split and index). Off by default: images leave the machine when online.
        log_paths: let wandb record file paths, the command line and the host name. Off by
            default: paths can name patients or sites.
    """

    enabled: bool = False
    project: str = "medvit"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    job_type: str | None = "train"
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = "auto"
    log_model: bool = False
    log_predictions: bool = False
    log_paths: bool = False


def has_wandb_credentials() -> bool:
    """True when ``wandb login`` (netrc) or ``WANDB_API_KEY`` provides an API key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
        auth = netrc.netrc(path).authenticators(
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        )
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str) -> str:
    """Turn ``auto`` into ``online`` or ``offline``; never go online without credentials."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got '{mode}'.")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "online", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if has_wandb_credentials() else "offline"


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        # A resumed run appends to its history instead of wiping it.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, "rb+") as fh:
                # A run killed in the middle of appending left half a row: drop it.
                data = fh.read()
                if data and not data.endswith(b"\n"):
                    fh.truncate(data.rfind(b"\n") + 1)
            with open(self.metrics_file_path, newline="") as fh:
                self.metrics_keys = next(csv.reader(fh), [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place when a metric appears: atomically here, so a
        # kill during the rewrite cannot cost the history.
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        with atomic_write(self.metrics_file_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class RunCSVLogger(CSVLogger):
    """CSV logger writing ``metrics.csv`` straight into a run folder and appending on resume."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run folder, so a resumed fit continues the same wandb run."""
    path = Path(run_dir) / ".wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, run_id + "\n")
    return run_id


def build_loggers(run_dir: Path, experiment: str, wandb: WandbOptions) -> list[Logger]:
    """CSV logger writing into ``run_dir`` (always first), then wandb if enabled."""
    loggers: list[Logger] = [RunCSVLogger(run_dir)]
    if wandb.enabled:
        from medvit.train.wandb_logging import MedViTWandbLogger

        mode = resolve_wandb_mode(wandb.mode)
        if mode != "disabled":
            loggers.append(
                MedViTWandbLogger(
                    id=wandb_run_id(run_dir),
                    resume="allow",
                    save_dir=str(run_dir),
                    project=wandb.project,
                    entity=wandb.entity,
                    group=wandb.group,
                    name=wandb.name or f"{experiment}/{run_dir.name}",
                    job_type=wandb.job_type,
                    tags=list(wandb.tags) or None,
                    offline=mode == "offline",
                    log_model=wandb.log_model,
                    log_predictions=wandb.log_predictions,
                    log_paths=wandb.log_paths,
                )
            )
    return loggers
