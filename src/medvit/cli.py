"""The ``medvit`` command: LightningCLI for fit/validate/test, plus predict, cv and report."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from medvit.callbacks import METRICS_FILE, RunRecorder
from medvit.data.files import DataFileError
from medvit.data.medmnist import MedMNISTDataModule
from medvit.models.module import ViTClassifier
from medvit.tracking import WandbOptions, build_loggers
from medvit.wandb_logging import WandbTestMedia

RUN_DIR_ENV = "MEDVIT_RUN_DIR"
EXTRA_COMMANDS = ("predict", "cv", "report", "cache")


def experiment_name(config: Any) -> str:
    """``--run.name``, else the dataset flag with its size (``breastmnist`` or ``pathmnist_224``)."""
    if config.run.name:
        return config.run.name
    flag, size = config.data.flag, config.data.size
    return flag if size == 28 else f"{flag}_{size}"


def new_run_dir(root: str | os.PathLike, name: str, suffix: str = "") -> Path:
    """A fresh ``{root}/{name}/{timestamp}{suffix}`` folder name (not created here)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name / f"{stamp}{suffix}"
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{n}")
        n += 1
    return path


def _run_dir_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """The run folder of ``<run>/checkpoints/x.ckpt``, so a resumed fit continues in place."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    run_dir = path.parent.parent
    if path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        return run_dir
    return None


class MedViTCLI(LightningCLI):
    """``medvit fit|validate|test``: the data config decides the model's classes, channels, size and task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault(
            "trainer_defaults",
            {
                "callbacks": [
                    LearningRateMonitor(logging_interval="epoch"),
                    RunRecorder(),
                    WandbTestMedia(),
                ]
            },
        )
        kwargs.setdefault("parser_kwargs", {"description": "Train ViTs on medical images."})
        self.run_dir: Path | None = None
        super().__init__(ViTClassifier, MedMNISTDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict has its own command (images or npz files -> CSV); see medvit.predict.
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: Any) -> None:
        for key in ("num_classes", "in_chans", "img_size", "task", "class_names"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/auroc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument("--run.root", type=str, default="runs", help="Folder of run folders.")
        parser.add_argument(
            "--run.name", type=str | None, default=None, help="Experiment name (default: flag)."
        )
        parser.add_argument(
            "--run.dir", type=str | None, default=None, help="Exact run folder (default: new one)."
        )
        parser.add_argument(
            "--run.test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint and write test metrics.",
        )
        parser.add_argument("--wandb", type=WandbOptions, default=WandbOptions())

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        if self.subcommand not in (None, "fit") and config.get("ckpt_path"):
            # Weights come from the checkpoint; do not fetch or read pretrained weights again.
            config.model.pretrained = False

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        data, model = self.datamodule, self.model
        if data.hparams.mean is None and model.hparams.pretrained:
            # A pretrained backbone expects its own normalisation (timm's data config).
            from timm.data import resolve_model_data_config

            cfg = resolve_model_data_config(model.net)
            mean, std = list(cfg["mean"]), list(cfg["std"])
            if data.in_chans == 1:
                mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
            data.hparams.mean, data.hparams.std = mean, std

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._subconfig()
        name = experiment_name(config)
        resumed = (
            _run_dir_of_checkpoint(config.get("ckpt_path")) if self.subcommand == "fit" else None
        )
        if config.run.dir:
            run_dir = Path(config.run.dir)
        elif resumed is not None:
            run_dir = resumed
        elif os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK") not in (None, "0"):
            # A DDP child started by Lightning: same folder as its parent (rank 0 decides anyway).
            run_dir = Path(os.environ[RUN_DIR_ENV])
        else:
            suffix = "" if self.subcommand in (None, "fit") else f"-{self.subcommand}"
            run_dir = new_run_dir(config.run.root, name, suffix)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        self.run_dir = run_dir
        if (
            self.subcommand == "fit"
            and config.get("ckpt_path")
            and (run_dir / "config.yaml").exists()
        ):
            # Resuming in place: the saved config is replaced by the resumed run's.
            self.save_config_kwargs["overwrite"] = True
        kwargs.setdefault("default_root_dir", str(run_dir))
        if config.trainer.get("logger") in (None, True):
            wandb = config.wandb
            wandb = wandb if isinstance(wandb, WandbOptions) else WandbOptions(**vars(wandb))
            kwargs["logger"] = build_loggers(run_dir, name, wandb)
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        config = self.config["fit"]
        if config.run.test_after_fit and not self.trainer.fast_dev_run:
            ckpt = self.trainer.checkpoint_callback
            ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        self._print_summary()

    def after_test(self) -> None:
        self._print_summary()

    def after_validate(self) -> None:
        self._print_summary()

    def _print_summary(self) -> None:
        # log_dir is a broadcast from rank 0 under DDP: every rank must take part in it.
        run_dir = Path(self.trainer.log_dir)
        if not self.trainer.is_global_zero:
            return
        path = run_dir / METRICS_FILE
        if path.is_file():
            metrics = json.loads(path.read_text())
            for stage in ("val", "test"):
                if stage in metrics:
                    values = "  ".join(f"{k}={v:.4f}" for k, v in metrics[stage].items())
                    print(f"{stage} metrics: {values}")
        print(f"Run directory: {run_dir}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medvit`` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in EXTRA_COMMANDS:
        command, rest = words[0], words[1:]
        if command == "predict":
            from medvit.predict import main as predict_main

            predict_main(rest)
        elif command == "cv":
            from medvit.cv import main as cv_main

            cv_main(rest)
        elif command == "cache":
            from medvit.data.files import cache_main

            cache_main(rest)
        else:
            from medvit.report import main as report_main

            report_main(rest)
        return
    try:
        # args=None lets LightningCLI read sys.argv itself (passing both only earns a warning).
        MedViTCLI(args=argv)
    except DataFileError as err:
        # A missing or malformed data file is a user problem, not a bug: no traceback.
        print(f"medvit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
