"""``medvit cv``: stratified (grouped, repeated) k-fold cross-validation of ``medvit fit``.

One CV folder holds everything (``cv_runs/<experiment>`` unless ``--cv-dir``; its file names,
readers and writers live in :mod:`medvit.runs`)::

    cv_config.json                  the command, CV settings and fingerprints of config and folds
    folds.csv                       split,index,repeat,fold,label...[,group] of every pool sample
    runs/r{R}-f{K}/                 one normal medvit run folder per (repeat, fold)
    logs/r{R}-f{K}.log              stdout and stderr of that fold's process
    cv_summary.json, cv_summary.csv per-fold metrics, mean, std, 95% CI, ensemble test metrics
    ensemble_test_predictions.npz   test probabilities averaged over the fold models

Each fold is a separate ``python -m medvit.cv.foldproc fit`` process (``medvit fit`` with its
own DDP group and wandb run) that dies with the CV process, even on ``kill -9``. The CV folder is
locked (``cv.lock``) while a CV runs in it, so a second ``medvit cv`` there refuses to start.
Rerunning the same command skips finished folds, resumes half-finished ones from
``checkpoints/last.ckpt`` and refuses to mix in a changed config or changed folds.

The package, by job:

- ``plan``: the pool of samples (official train[+val]), group ids, the folds;
- ``runner``: the fit config, the CV folder (checked, locked), the fold processes, resume;
- ``summary``: statistics over folds, the ensemble, ``cv_summary.*``, the table, wandb;
- ``foldproc``: entry point of one fold process;
- this module: the command line only. ``medvit cv --help`` imports neither torch nor numpy;
  the names of the modules above are reachable from here (``medvit.cv.summarize``) and are
  imported on first use. Patch them in their own module (``medvit.cv.runner.launch``).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Any

POOLS = ("train+val", "train")
# Set by medvit cv for every fold; a user value would be silently overridden or break the layout.
RESERVED_ARGS = (
    "--run.dir",
    "--data.folds_file",
    "--data.fold",
    "--data.repeat",
    "--ckpt_path",
    "--wandb.name",
    "--wandb.job_type",
    "--print_config",
)
# Public names of the submodules, imported when first asked for.
_EXPORTS = {
    "plan": ("FoldPlan", "FoldRun", "Pool", "load_groups", "load_pool", "plan_folds"),
    "runner": (
        "VOLATILE_KEYS",
        "CVDirBusy",
        "CVDirLock",
        "config_fingerprint",
        "experiment_of",
        "fold_command",
        "launch",
        "prepare_cv_dir",
        "resolve_fit_config",
        "run_cv",
    ),
    "summary": (
        "CI_METHOD",
        "METRIC_RANGES",
        "aggregate",
        "ensemble_metrics",
        "ensemble_predictions",
        "format_table",
        "log_wandb_summary",
        "summarize",
        "wandb_sync_command",
    ),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


def build_parser() -> argparse.ArgumentParser:
    """Parser of the CV options; every other argument goes to ``medvit fit``."""
    parser = argparse.ArgumentParser(
        prog="medvit cv",
        description=(
            "k-fold cross-validation of `medvit fit`: stratified folds of the official train+val "
            "pool, one fit process per fold, the official test set evaluated by every fold model "
            "and by their ensemble. Arguments not listed here go to `medvit fit` (e.g. -c CONFIG, "
            "--trainer.max_epochs 10)."
        ),
        allow_abbrev=False,  # a fit option must never be taken for an abbreviated CV option
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds k (default 5)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fold split; repeat r uses seed + r"
    )
    parser.add_argument("--repeats", type=int, default=1, help="repeated k-fold: R x k runs")
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="FILE",
        help="group ids, e.g. patients; no group is split across folds: a column of the data "
        "(--group-by patient_id with --data ImageDataModule), or a CSV (columns split,index,"
        "group) or .npy (one id per pool sample, pool order: train then val) file",
    )
    parser.add_argument(
        "--pool", choices=POOLS, default="train+val", help="samples to split (default train+val)"
    )
    parser.add_argument(
        "--cv-dir", default=None, help="CV directory (default cv_runs/<experiment>)"
    )
    parser.add_argument(
        "--teacher-cv",
        "--teacher_cv",
        dest="teacher_cv",
        default=None,
        metavar="DIR",
        help="distil each fold from the same fold of this teacher CV (same folds; its "
        "runs/<fold>/checkpoints/best.ckpt), so no teacher saw its student's validation fold",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` into CV options and ``medvit fit`` arguments; refuse reserved fit options."""
    parser = build_parser()
    args, fit_args = parser.parse_known_args(argv)
    for arg in fit_args:
        key = arg.split("=", 1)[0].replace("--data.init_args.", "--data.", 1)
        if key in RESERVED_ARGS:
            parser.error(f"{key} is set by medvit cv for each fold; leave it out.")
    if args.teacher_cv and any(a.split("=", 1)[0] == "--model.teacher" for a in fit_args):
        parser.error("--teacher-cv gives each fold its teacher; leave out --model.teacher.")
    if fit_args and fit_args[0] == "fit":
        parser.error("write `medvit cv -c CONFIG ...`, without the word `fit`.")
    return args, fit_args


def main(argv: list[str] | None = None) -> None:
    """``medvit cv [--folds K] [--seed S] [--repeats R] [--group-by F] [--pool P] FIT_ARGS...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, fit_args = parse_args(argv)  # --help and CV option mistakes end here, before imports
    from medvit.cv.runner import CVDirBusy, run

    def on_sigterm(signum: int, frame: Any) -> None:
        # A SystemExit unwinds through launch(), which terminates the running fold first.
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = run(args, argv, fit_args)
    except CVDirBusy as err:  # not a usage mistake: one line, no usage text
        print(f"medvit cv: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:
        build_parser().error(str(err))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        sys.exit(code)
