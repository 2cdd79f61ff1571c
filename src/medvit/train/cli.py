"""``medvit fit|validate|test``: the LightningCLI, its run folder, and checkpoint checks.

The ``medvit`` command itself (help, dispatch, one-line errors) is :mod:`medvit.cli`, which
imports this module only for these three commands.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from medvit import runs
from medvit.data.arrays import ArrayDataModule
from medvit.data.images import ImageDataModule
from medvit.data.medmnist import MedMNISTDataModule
from medvit.data.selection import (  # describe_training_data: still importable from here
    data_class_requested,
    data_init_args,
    data_label,
    describe_training_data,
)
from medvit.explain.gallery import ExplainedGallery
from medvit.models.checkpoint import CheckpointError, is_local_file_path, load_checkpoint
from medvit.models.distill import expected_of, read_teacher_checkpoint
from medvit.models.module import ViTClassifier
from medvit.train.callbacks import RunRecorder
from medvit.train.gallery import TestGallery
from medvit.train.progress import DEFAULT_REFRESH_RATE, LossProgressBar
from medvit.train.tracking import WandbOptions, build_loggers
from medvit.train.wandb_logging import WandbTestMedia

RUN_DIR_ENV = "MEDVIT_RUN_DIR"
#: The DataModules ``--data CLASS`` selects by name (imported above so jsonargparse knows them).
DATA_CLASSES = (MedMNISTDataModule, ImageDataModule)


def checkpoint_data_mismatch(
    ckpt_path: str | os.PathLike, ckpt: dict[str, Any], data: Any
) -> str | None:
    """A one-line description of how a checkpoint's training data differ from ``data``, or None.

    Compares the checkpoint's ``hyper_parameters`` (classes, task, channels, image size, which
    ``medvit fit`` stores) with the data module's. A checkpoint without them (not written by
    medvit) is left to the weight-shape check.
    """
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "num_classes" not in hp:
        return None
    saved = (hp.get("task"), hp.get("num_classes"), hp.get("in_chans"), hp.get("img_size"))
    saved_names = list(hp["class_names"]) if hp.get("class_names") else None
    wanted = (data.task, data.num_classes, data.in_chans, data.img_size)
    dims = (hp.get("spatial_dims", 2), getattr(data, "spatial_dims", 2))
    if dims[0] != dims[1]:
        kind = {2: "2D images", 3: "3D volumes"}
        return (
            f"checkpoint {ckpt_path} is a model of {kind.get(dims[0], dims[0])} but the data "
            f"are {kind.get(dims[1], dims[1])}: a {dims[0]}D model cannot read them. Use data "
            "of the kind it was trained on (-c <run>/config.yaml)."
        )
    if saved == wanted and (saved_names is None or saved_names == list(data.class_names)):
        return None
    data_hp = ckpt.get("datamodule_hyper_parameters") or {}
    trained_on = data_label(data_hp)
    if trained_on is None:
        trained_on = "other data"
        if data_hp.get("size") not in (None, 28):
            trained_on += f"_{data_hp['size']}"
    name = data_label(data.hparams)
    return (
        f"checkpoint {ckpt_path} was trained on "
        f"{describe_training_data(trained_on, saved[0], saved_names, *saved[1:])} but the data "
        f"is {describe_training_data(name, wanted[0], data.class_names, *wanted[1:])}. Use the "
        "data it was trained on (-c <run>/config.yaml), or --force true to use it anyway."
    )


def _run_dir_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """The run folder of ``<run>/checkpoints/x.ckpt`` (resolved), so a resumed fit continues in place."""
    if not ckpt_path or not is_local_file_path(ckpt_path):
        return None
    return runs.run_dir_of_checkpoint(Path(ckpt_path).expanduser().resolve())


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` always holds the latest validated epoch.

    Lightning 2.6 writes ``last.ckpt`` only at steps where a top-k checkpoint is written: with
    ``save_top_k=1`` an epoch that did not improve the monitored metric left ``last.ckpt`` at
    the best epoch, and a resume from it redid the epochs since. Its state keeps
    ModelCheckpoint's key, so checkpoints of either class resume each other.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # Skipped when a checkpoint was already written at this step (the top-k one, or last).
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)


class CheckpointFolderFollowsRun(L.Callback):
    """Keep ``best.ckpt``/``last.ckpt`` state when resuming a checkpoint whose folder moved.

    ModelCheckpoint stores its folder, as spelled when it wrote the checkpoint, and drops its
    best/last state on resume when the spelling differs (then writing ``best-v1.ckpt``). medvit
    now resolves run folders, but checkpoints written before it did hold relative folders, and a
    run folder may have been moved or copied. When the checkpoint being resumed lies in this
    run's checkpoint folder, the stored paths are rewritten to that folder before
    ModelCheckpoint reads them (Lightning calls every ``on_load_checkpoint`` first).
    """

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        ckpt_path = trainer.ckpt_path
        if not ckpt_path or not is_local_file_path(ckpt_path):
            return
        here = Path(ckpt_path).resolve().parent
        states = checkpoint.get("callbacks") or {}
        if trainer.state.fn != "fit":
            # test/validate write no checkpoint: the checkpoint callback's saved state (folder,
            # best/last paths) means nothing there, and restoring it only warns "dirpath has
            # changed" when another run's checkpoint is evaluated.
            for callback in trainer.checkpoint_callbacks:
                states.pop(callback.state_key, None)
            return
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            old = state.get("dirpath") if isinstance(state, dict) else None
            new = callback.dirpath
            if not old or not new or old == new or Path(new).resolve() != here:
                continue

            def moved(path: Any, old: str = old, new: str = new) -> Any:
                if isinstance(path, str) and path and Path(path).parent == Path(old):
                    return str(Path(new) / Path(path).name)
                return path

            state["dirpath"] = new
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = moved(state[key])
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}


class MedViTCLI(LightningCLI):
    """``medvit fit|validate|test``: the data config decides the model's classes, channels, size and task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(
            "save_config_kwargs", {"overwrite": False, "config_filename": runs.CONFIG_FILE}
        )
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault(
            "trainer_defaults",
            {
                "callbacks": [
                    LearningRateMonitor(logging_interval="epoch"),
                    RunRecorder(),
                    TestGallery(),  # these two before WandbTestMedia, which logs their pictures
                    ExplainedGallery(),
                    WandbTestMedia(),
                    CheckpointFolderFollowsRun(),
                ]
            },
        )
        kwargs.setdefault("parser_kwargs", {"description": "Train ViTs on medical images."})
        self.run_dir: Path | None = None
        # The --ckpt_path checkpoint, read safely once while parsing; checked again for fit.
        self._checkpoint: dict[str, Any] | None = None
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        # --data CLASS: LightningCLI's subclass mode, MedMNISTDataModule its default class.
        self.data_subclass_mode = isinstance(argv, (list, tuple)) and data_class_requested(argv)
        data_class: type = MedMNISTDataModule
        if self.data_subclass_mode:
            kwargs["subclass_mode_data"] = True
            data_class = ArrayDataModule
        super().__init__(ViTClassifier, data_class, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict has its own command (images or npz files -> CSV); see medvit.evaluate.predict.
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: Any) -> None:
        if self.data_subclass_mode:
            # A config's data arguments without class_path (the experiment configs) are
            # MedMNISTDataModule's, until --data names another class.
            parser.set_defaults(
                {"data": {"class_path": f"{MedMNISTDataModule.__module__}.MedMNISTDataModule"}}
            )
        for key in ("num_classes", "in_chans", "img_size", "task", "class_names", "spatial_dims"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.link_arguments("data.positive_index", "model.positive_class", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
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
        parser.add_argument(
            "--force",
            type=bool,
            default=False,
            help="Use --ckpt_path even if its classes, task, channels or image size differ "
            "from the data's.",
        )
        parser.add_argument(
            "--progress_bar.refresh_rate",
            type=int,
            default=DEFAULT_REFRESH_RATE,
            help="Steps between progress-bar updates (each one waits for the device).",
        )

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None:
            return
        if config.get("weights_only") is False:
            raise CheckpointError(
                "--weights_only false is not supported: medvit loads checkpoints with "
                "torch.load(weights_only=True) only, so that a checkpoint cannot run code."
            )
        teacher = (config.get("model") or {}).get("teacher")
        if subcommand == "fit" and teacher:
            # A missing teacher or one of other data is refused before any data or model work.
            read_teacher_checkpoint(teacher, expected_of(self._data_for_check(config.data)))
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and is_local_file_path(ckpt_path):
            # Refuse a missing, corrupt or code-carrying checkpoint in one line, before Lightning
            # reads it (LightningCLI reads its hyper-parameters right after parsing). mmap: the
            # check costs no tensor reads.
            ckpt = self._checkpoint = load_checkpoint(ckpt_path, mmap=True)
            if not config.get("force"):
                # A checkpoint of another dataset would run and file its numbers under this
                # data's name. The data module's constructor only validates its arguments.
                data = self._data_for_check(config.data)
                problem = checkpoint_data_mismatch(ckpt_path, ckpt, data)
                if problem:
                    raise CheckpointError(problem)

    @staticmethod
    def _data_for_check(data_config: Any) -> ArrayDataModule:
        """The configured DataModule, built only to compare it with a checkpoint."""
        if "class_path" not in data_config:
            return MedMNISTDataModule(**data_config.as_dict())
        from jsonargparse import Namespace
        from jsonargparse._util import import_object

        init = data_init_args(data_config)
        init = init.as_dict() if isinstance(init, Namespace) else dict(init)
        return import_object(data_config.class_path)(**init)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # Lightning passes weights_only=None on to torch.load, which the environment variable
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns into a full (code-running) unpickling.
        if "weights_only" in inspect.signature(getattr(self.trainer, subcommand)).parameters:
            kwargs["weights_only"] = True
        return kwargs

    def _check_checkpoint_fits_model(self) -> None:
        """Refuse, in one line, a checkpoint whose weights do not fit the configured model.

        Lightning would stop with a traceback listing every key, e.g. for a checkpoint of a
        28 px run tested with a 64 px config.
        """
        ckpt_path = self._subconfig().get("ckpt_path")
        if self._checkpoint is None:  # no local --ckpt_path (parse_arguments read it otherwise)
            return
        saved = self._checkpoint.get("state_dict")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{ckpt_path} holds no model weights (no 'state_dict').")
        expected = self.model.state_dict()
        for key, param in expected.items():
            value = saved.get(key)
            if value is None:
                break
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{ckpt_path} does not fit this model: '{key}' has shape "
                    f"{tuple(value.shape)} in the checkpoint but {tuple(param.shape)} in the model. "
                    "Use the config of the run that wrote it (-c <run>/config.yaml)."
                )
        optional = getattr(self.model, "optional_state_keys", ())  # filled in on load
        missing = [k for k in expected if k not in saved and k not in optional]
        unexpected = [k for k in saved if k not in expected]
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt_path} does not fit this model (missing from the checkpoint: "
                f"{missing[:3]}, not in the model: {unexpected[:3]}). Use the config of the run "
                "that wrote it (-c <run>/config.yaml)."
            )

    def before_fit(self) -> None:
        self._check_checkpoint_fits_model()

    def before_validate(self) -> None:
        self._check_checkpoint_fits_model()

    def before_test(self) -> None:
        self._check_checkpoint_fits_model()

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
        data_args = data_init_args(config.data)
        flag = data_args.get("flag") or self.datamodule.dataset_name
        name = runs.experiment_name(config.run.name, flag, data_args.get("size"))
        resumed = (
            _run_dir_of_checkpoint(config.get("ckpt_path")) if self.subcommand == "fit" else None
        )
        # Paths are resolved once, here: the checkpoint callback stores its folder in every
        # checkpoint and drops its state (best/last, then writing best-v1.ckpt) when a resume
        # spells the folder differently (relative vs absolute, another working directory).
        if config.run.dir:
            run_dir = Path(config.run.dir).expanduser().resolve()
            if (
                resumed is not None
                and run_dir != resumed
                and not Path(config.run.dir).is_absolute()
            ):
                # A relative run.dir (read back from the run's config.yaml) names the run being
                # resumed, whatever the working directory of the resuming command.
                run_dir = resumed
        elif resumed is not None:
            run_dir = resumed
        elif os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK") not in (None, "0"):
            # A DDP child started by Lightning: same folder as its parent (rank 0 decides anyway).
            run_dir = Path(os.environ[RUN_DIR_ENV])
        else:
            suffix = "" if self.subcommand in (None, "fit") else f"-{self.subcommand}"
            run_dir = runs.new_run_dir(Path(config.run.root).expanduser().resolve(), name, suffix)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        self.run_dir = run_dir
        if isinstance(self.datamodule, ImageDataModule):
            # Where a made train/val/test split is written and read back (on resume), and
            # where a checkpoint's run keeps it (medvit test writes a new folder).
            self.datamodule.run_dir = run_dir
            self.datamodule.source_run_dir = _run_dir_of_checkpoint(config.get("ckpt_path"))
        if (
            self.subcommand == "fit"
            and config.get("ckpt_path")
            and (run_dir / runs.CONFIG_FILE).exists()
        ):
            # Resuming in place: the saved config is replaced by the resumed run's.
            self.save_config_kwargs["overwrite"] = True
        kwargs.setdefault("default_root_dir", str(run_dir))
        self._add_progress_bar(config, kwargs)
        if config.trainer.get("logger") in (None, True):
            wandb = config.wandb
            wandb = wandb if isinstance(wandb, WandbOptions) else WandbOptions(**vars(wandb))
            kwargs["logger"] = build_loggers(run_dir, name, wandb)
        return super().instantiate_trainer(**kwargs)

    def _add_progress_bar(self, config: Any, kwargs: dict[str, Any]) -> None:
        """medvit's bar (see ``medvit.train.progress``) unless the bar is off or the user gave one."""
        if config.trainer.get("enable_progress_bar") is False:
            return
        trainer_init = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_init.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if not any(isinstance(c, ProgressBar) for c in callbacks):
            bar = LossProgressBar(refresh_rate=config.progress_bar.refresh_rate)
            kwargs["callbacks"] = [*callbacks, bar]

    def after_fit(self) -> None:
        config = self.config["fit"]
        if config.run.test_after_fit and not self.trainer.fast_dev_run:
            ckpt = self.trainer.checkpoint_callback
            ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
            kwargs = {}
            if "weights_only" in inspect.signature(self.trainer.test).parameters:
                kwargs["weights_only"] = True
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, **kwargs)
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
        metrics = runs.read_metrics(run_dir)
        if metrics:
            for stage in ("val", "test"):
                if stage in metrics:
                    values = "  ".join(f"{k}={v:.4f}" for k, v in metrics[stage].items())
                    print(f"{stage} metrics: {values}")
        print(f"Run directory: {run_dir}")


def distill_main(argv: list[str] | None = None) -> None:
    """``medvit distill ... --teacher CKPT``: ``medvit fit`` of a student that learns from
    ``CKPT`` too (``--model.teacher``); see :mod:`medvit.models.distill`."""
    from medvit.cli import exit_with_user_error, is_user_error, show_tracebacks

    words = list(sys.argv[2:] if argv is None else argv)
    args, teacher = [], None
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--teacher" and i + 1 < len(words):
            teacher, i = words[i + 1], i + 2
            continue
        if word.startswith("--teacher="):
            teacher = word.split("=", 1)[1]
        else:
            args.append(word)
        i += 1
    if teacher is None and not any(w in ("-h", "--help") for w in args):
        exit_with_user_error(
            ValueError(
                "medvit distill needs --teacher CKPT: a medvit checkpoint of the same data, e.g. "
                "runs/breastmnist/<teacher run>/checkpoints/best.ckpt."
            )
        )
    if teacher is not None:
        args += ["--model.teacher", teacher]
    if any(w in ("-h", "--help") for w in args):
        print("medvit distill [fit options] --teacher CKPT: medvit fit with --model.teacher CKPT.")
    # sys.argv stays as it is (Lightning's DDP launcher restarts it in each rank), so the CLI
    # gets both: its warning about that is expected here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        MedViTCLI(args=["fit", *args])
    except (ValueError, FileNotFoundError) as err:
        if show_tracebacks() or not is_user_error(err):
            raise
        exit_with_user_error(err)
