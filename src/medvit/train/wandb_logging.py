"""Weights & Biases: medvit's logger (privacy switches, offline checkpoints) and test-time media."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from medvit import runs

if TYPE_CHECKING:
    from medvit.evaluate import plots

# Config keys whose string values are file-system paths (the CLI config and the data hparams).
PATH_KEYS = frozenset(
    {
        "root",
        "cache_dir",
        "folds_file",
        "dir",
        "default_root_dir",
        "dirpath",
        "ckpt_path",
        "save_dir",
        "pretrained",
    }
)
REDACTED = "<path not logged>"
# meta.json fields that go to the wandb config: no host name, command line or paths.
META_KEYS = (
    "git_sha",
    "git_dirty",
    "device",
    "accelerator",
    "num_devices",
    "num_nodes",
    "world_size",
    "strategy",
    "precision",
    "python",
    "torch",
    "lightning",
)


def redact_paths(config: Any, key: str | None = None) -> Any:
    """A copy of ``config`` with the values of path keys (``data.root``, ``run.dir``...) redacted.

    Folder names can carry patient or site identifiers, so paths stay on the machine unless the
    logger is created with ``log_paths=True``. Booleans (``pretrained: false``) are kept.
    """
    if isinstance(config, Mapping):
        return {k: redact_paths(v, str(k)) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact_paths(v, key) for v in config]
    if key in PATH_KEYS and isinstance(config, (str, os.PathLike)) and str(config):
        return REDACTED
    return config


class MedViTWandbLogger(WandbLogger):
    """``WandbLogger`` with medvit's switches.

    Differences from Lightning's logger: the hyper-parameters are the run's whole resolved CLI
    config (``config.yaml`` in the run folder, when it exists) plus the model/data hparams, with
    paths redacted; ``log_model=True`` logs the best checkpoint only (aliases ``best`` and
    ``latest``), and also works offline (the artifact is stored in the offline run and uploaded
    by ``wandb sync``), where Lightning refuses it.

    Args:
        log_predictions: allow :class:`WandbTestMedia` to log thumbnails of misclassified test
            images (identified only by split and index).
        log_paths: log file-system paths in the config and wandb's system metadata (command
            line, working directory, host name). Off: config paths are replaced by a marker and
            wandb's metadata is not collected.
        **kwargs: passed to :class:`lightning.pytorch.loggers.WandbLogger`.
    """

    def __init__(
        self, log_predictions: bool = False, log_paths: bool = False, **kwargs: Any
    ) -> None:
        log_model = kwargs.get("log_model", False)
        if kwargs.get("offline") and log_model:
            # Lightning rejects this pair although wandb stores artifacts offline for a later sync.
            kwargs["log_model"] = False
        if not log_paths and "settings" not in kwargs:
            import wandb

            # wandb's system metadata holds the command line (data paths), working directory and
            # host name; the config gets the useful part of meta.json instead. System metrics
            # (CPU, GPU, memory) are separate and stay on.
            kwargs["settings"] = wandb.Settings(x_disable_meta=True)
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes anonymous=None to wandb.init, which wandb >= 0.19 answers
            # with "The anonymous setting has no effect and will be removed" on every run. None
            # means "not set", so leaving the key out changes nothing but the notice.
            self._wandb_init.pop("anonymous", None)
        self._log_model = log_model
        self.log_predictions = log_predictions
        self.log_paths = log_paths

    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        if self._log_model is not True or not getattr(checkpoint_callback, "best_model_path", ""):
            super()._scan_and_log_checkpoints(checkpoint_callback)
            return
        # log_model=True: the best checkpoint only. Lightning would upload last.ckpt as well,
        # doubling the upload (about 1 GB per copy for a ViT-Base with its optimiser state).
        last = checkpoint_callback.last_model_path
        checkpoint_callback.last_model_path = ""
        try:
            super()._scan_and_log_checkpoints(checkpoint_callback)
        finally:
            checkpoint_callback.last_model_path = last

    def _resolved_config(self) -> dict[str, Any]:
        return runs.read_yaml(Path(self.save_dir or ".") / runs.CONFIG_FILE)

    def _meta(self) -> dict[str, Any]:
        meta = runs.read_meta(Path(self.save_dir or "."))
        return {k: meta[k] for k in META_KEYS if k in meta}

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """Log the resolved CLI config (nested), the model/data hparams (flat) and ``meta``.

        ``meta`` is the run's git SHA, device and versions from ``meta.json``; paths are
        redacted unless ``log_paths``.
        """
        params = dict(vars(params) if not isinstance(params, Mapping) else params)
        params.update(self._resolved_config())
        meta = self._meta()
        if meta:
            params["meta"] = meta
        if not self.log_paths:
            params = redact_paths(params)
        super().log_hyperparams(params)


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _thumbnail(image: Any, mean: Any, std: Any) -> np.ndarray:
    """A dataset item, normalised, back to uint8: an image (C, H, W) as (H, W) or (H, W, 3); a
    volume (C, D, H, W) as its mid axial, coronal and sagittal slices side by side."""
    from medvit.evaluate.case_plots import denormalize, slices_strip, to_uint8

    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().float().cpu().numpy()
    x = denormalize(image, mean, std)
    return slices_strip(x) if x.ndim == 4 else to_uint8(x)


def _run_dir(trainer: L.Trainer) -> Path:
    """The run folder: where the run's recorder and gallery write, else the trainer's root."""
    for callback in trainer.callbacks:
        run_dir = getattr(callback, "run_dir", None)
        if isinstance(run_dir, Path):
            return run_dir
    return Path(trainer.default_root_dir)


class WandbTestMedia(L.Callback):
    """After ``trainer.test``, log plots of the test predictions to every wandb logger.

    Keys: ``test/confusion_matrix`` and ``test/confusion_matrix_normalized`` (images),
    ``test/roc``, ``test/pr``, ``test/reliability`` (images of the :mod:`medvit.evaluate.plots` figures)
    and, for single-label tasks, ``test/confusion_matrix_table`` (wandb's interactive confusion
    matrix). When a logger has ``log_predictions`` set, also ``test/misclassified``: a table
    with columns split, index, thumbnail, label, prediction, probabilities (a volume's
    thumbnail: its mid axial, coronal and sagittal slices side by side), and ``test/gallery``:
    the run's gallery pictures (``gallery/*.json``: the most confident misclassified cases,
    and explanation overlays when written), with columns section, kind, index, label,
    prediction, probability, picture, caption. Runs on global rank 0 only, and does nothing
    without a ``WandbLogger``. The gallery writers must run before it (earlier callbacks).

    Args:
        max_images: at most this many misclassified images in the table (lowest indices first).
        dpi: resolution of the plot images.
    """

    def __init__(self, max_images: int = 100, dpi: int = 100) -> None:
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}.")
        self.max_images = max_images
        self.dpi = dpi

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = _wandb_loggers(trainer)
        if (
            not trainer.is_global_zero
            or not loggers
            or getattr(pl_module, "test_predictions", None) is None
        ):
            return
        import wandb

        from medvit.evaluate import plots  # matplotlib only when there is something to plot

        preds = plots.Predictions.from_module(pl_module)
        media = self.media(preds)
        media.update(self.curve_panels(preds))
        if preds.task != "multilabel":
            media["test/confusion_matrix_table"] = wandb.plot.confusion_matrix(
                y_true=preds.target.tolist(),
                preds=preds.predicted.tolist(),
                class_names=preds.class_names,
                title="Test confusion matrix",
            )
        tables = {}
        if any(getattr(lg, "log_predictions", False) for lg in loggers):
            tables["test/misclassified"] = self.misclassified_table(trainer, preds)
            gallery = self.gallery_table(_run_dir(trainer))
            if gallery is not None:
                tables["test/gallery"] = gallery
        for logger in loggers:
            row = dict(media)
            if getattr(logger, "log_predictions", False):
                row.update(tables)
            row["trainer/global_step"] = trainer.global_step
            logger.experiment.log(row)

    def media(self, preds: plots.Predictions) -> dict[str, Any]:
        """The plot images as ``wandb.Image`` by key."""
        import wandb
        from PIL import Image

        from medvit.evaluate import plots

        figures = {
            "test/confusion_matrix": plots.confusion_figure(preds),
            "test/confusion_matrix_normalized": plots.confusion_figure(preds, normalize="true"),
            "test/roc": plots.roc_figure(preds),
            "test/pr": plots.pr_figure(preds),
            "test/reliability": plots.reliability_figure(preds),
        }
        out = {}
        for key, fig in figures.items():
            image = Image.open(io.BytesIO(plots.figure_to_png(fig, dpi=self.dpi)))
            out[key] = wandb.Image(image.convert("RGB"), caption=key.split("/")[-1])
        return out

    def curve_panels(self, preds: plots.Predictions, max_points: int = 500) -> dict[str, Any]:
        """ROC, PR and reliability as native wandb line plots, which overlay across runs.

        The curves are the report's own (``plots.roc_curves`` etc.), each thinned to at most
        ``max_points`` points with its ends kept.
        """
        import wandb

        from medvit.evaluate import plots

        def thin(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
            keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), max_points)).round())
            keep = keep.astype(int)
            return x[keep].tolist(), y[keep].tolist()

        out = {}
        for key, curves, stat, xname, title in (
            ("test/roc_curve", plots.roc_curves(preds), "AUC", "1 - specificity", "Test ROC"),
            ("test/pr_curve", plots.pr_curves(preds), "AP", "recall", "Test precision-recall"),
        ):
            if curves:
                lines = [thin(np.asarray(c[1]), np.asarray(c[2])) for c in curves]
                out[key] = wandb.plot.line_series(
                    xs=[x for x, _ in lines],
                    ys=[y for _, y in lines],
                    keys=[f"{c[0]} ({stat} {c[3]:.3f})" for c in curves],
                    title=title,
                    xname=xname,
                )
        bins = plots.calibration_bins(preds)
        filled = np.isfinite(bins["confidence"])
        if filled.any():
            conf = bins["confidence"][filled].tolist()
            out["test/reliability_curve"] = wandb.plot.line_series(
                xs=[conf, [0.0, 1.0]],
                ys=[bins["accuracy"][filled].tolist(), [0.0, 1.0]],
                keys=[f"observed (ECE {bins['ece']:.3f})", "perfectly calibrated"],
                title="Test reliability",
                xname=str(bins["xlabel"]),
            )
        return out

    def misclassified_table(self, trainer: L.Trainer, preds: plots.Predictions) -> Any:
        """``wandb.Table`` of misclassified test images, identified only by split and index."""
        import wandb

        loader = trainer.test_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError("log_predictions needs trainer.test_dataloaders with a dataset.")
        hparams = (
            getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule is not None else {}
        )
        mean, std = hparams.get("mean"), hparams.get("std")
        predicted = preds.predicted
        if preds.task == "multilabel":
            wrong = np.flatnonzero((predicted != preds.target).any(axis=1))
        else:
            wrong = np.flatnonzero(predicted != preds.target)
        names = preds.class_names

        def describe(value: np.ndarray | int) -> str:
            if preds.task == "multilabel":
                return (
                    "; ".join(n for n, v in zip(names, np.ravel(value), strict=True) if v)
                    or "(none)"
                )
            return names[int(value)]

        table = wandb.Table(
            columns=["split", "index", "thumbnail", "label", "prediction", "probabilities"]
        )
        for row in wrong[: self.max_images]:
            index = int(preds.index[row])
            image = dataset[index][0]
            probs = {n: round(float(p), 4) for n, p in zip(names, preds.probs[row], strict=True)}
            table.add_data(
                "test",
                index,
                wandb.Image(_thumbnail(image, mean, std)),
                describe(preds.target[row]),
                describe(predicted[row]),
                json.dumps(probs),
            )
        return table

    def gallery_table(self, run_dir: Path) -> Any:
        """``wandb.Table`` of a run folder's gallery pictures (``runs.read_gallery``), or None.

        One row per entry of every section (``misclassified``, ``explained``), in the order the
        gallery lists them; identified by split and index only.
        """
        import wandb

        gallery = runs.read_gallery(run_dir)
        rows = [(section, e) for section, entries in gallery.items() for e in entries]
        if not rows:
            return None
        table = wandb.Table(
            columns=[
                "section",
                "kind",
                "index",
                "label",
                "prediction",
                "probability",
                "picture",
                "caption",
            ]
        )
        for section, entry in rows:
            caption = str(entry.get("caption") or "")
            table.add_data(
                section,
                str(entry.get("kind") or ""),
                int(entry["index"]),
                str(entry["true"]),
                str(entry["predicted"]),
                float(entry["probability"]),
                wandb.Image(str(run_dir / entry["image"]), caption=caption or None),
                caption,
            )
        return table
