"""The run folder and the CV folder: their file names, readers and writers, in one place.

Import from here (``from medvit import runs``); ``layout`` holds the names and file
readers/writers, ``predictions`` the ``Predictions`` type, ``folders`` the ``Run``/``CVRun`` readers.

A run folder (``medvit fit``, ``runs/<experiment>/<timestamp>``)::

    config.yaml             the resolved config (written by LightningCLI under CONFIG_FILE)
    hparams.yaml            the module's hyper-parameters (Lightning's CSV logger)
    metrics.csv             per-step and per-epoch logged values (RunCSVLogger)
    metrics.json            best-epoch val metrics, test metrics, checkpoints  (write_metrics)
    meta.json               command, git SHA, host, device, timings             (write_meta)
    test_predictions.npz    index, probs and target of every test sample (write_predictions)
    gallery/{section}.json  pictures of test cases for the report (write_gallery); pictures
                            in gallery/{section}/
    checkpoints/            best.ckpt, last.ckpt
    wandb/                  the offline wandb run, when wandb is on

A CV folder (``medvit cv``, ``cv_runs/<experiment>``)::

    cv_config.json                  the command, CV settings and fingerprints (write_cv_config)
    folds.csv                       split,index,repeat,fold,label...[,group] (write_folds)
    runs/r{R}-f{K}/                 one run folder per (repeat, fold)
    logs/r{R}-f{K}.log              stdout and stderr of that fold's process
    cv_summary.json, cv_summary.csv per-fold metrics and their statistics (write_cv_summary)
    ensemble_test_predictions.npz   test probabilities averaged over the fold models
    cv.lock                         held while a ``medvit cv`` runs in the folder

Everything here is numpy, json and yaml: ``medvit report`` reads run folders without torch.
Every writer is atomic (:mod:`medvit.fileio`), so a reader never sees half a file.
"""

from medvit.runs.folders import CVRun, Run, detect, find_fold_dir
from medvit.runs.layout import *  # noqa: F403
from medvit.runs.layout import __all__ as _layout_all
from medvit.runs.predictions import TASKS, Predictions, read_predictions, write_predictions

__all__ = [
    *_layout_all,
    "TASKS",
    "CVRun",
    "Predictions",
    "Run",
    "detect",
    "find_fold_dir",
    "read_predictions",
    "write_predictions",
]
