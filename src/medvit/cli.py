"""The ``medvit`` command: help, dispatch to each command, and one-line user errors.

This module is light on purpose: ``medvit --help``, ``medvit report ...`` and ``medvit cv
--help`` must not pay for torch, Lightning, timm, MONAI or albumentations. Each command's
module is imported only in the branch that runs it: ``fit``/``validate``/``test`` are the
LightningCLI in :mod:`medvit.train.cli`; ``predict``, ``cv``, ``report`` and ``cache`` have
their own ``main``.

``medvit.cli.MedViTCLI`` (and the other names of :mod:`medvit.train.cli` in ``_FORWARDED``)
still work: they are imported from there on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

#: LightningCLI's commands (``MedViTCLI.subcommands()``; a test keeps the two equal).
TRAIN_COMMANDS = ("fit", "validate", "test")
#: medvit's own commands: ``module:function`` that takes the remaining arguments.
EXTRA_COMMANDS = {
    # A checkpoint runs in medvit.evaluate.predict, an .onnx model with onnxruntime (no Lightning).
    "predict": "medvit.export.runtime:predict_main",
    "cv": "medvit.cv:main",
    "report": "medvit.report:main",
    "cache": "medvit.data.files:cache_main",
    "export": "medvit.export:main",
    "explain": "medvit.explain.cli:main",
    "distill": "medvit.train.cli:distill_main",
}
#: Set to 1 to see the traceback of a user error instead of its one line.
DEBUG_ENV = "MEDVIT_DEBUG"
#: One line per command for ``medvit --help`` (a command missing here still gets listed).
COMMAND_HELP = {
    "fit": "train a model, test its best checkpoint, write a run folder",
    "validate": "evaluate a checkpoint on the validation split (--ckpt_path)",
    "test": "evaluate a checkpoint on the test split (--ckpt_path)",
    "predict": "class probabilities of images, volumes (NIfTI, DICOM series), folders, CSV listings or an npz split; from a checkpoint or an .onnx",
    "cv": "k-fold cross-validation of fit (one fit per fold, ensemble on test)",
    "report": "summarise run folders (or a folder of them) as one HTML page (tables, plots)",
    "cache": "list the unpacked-data caches, or delete stale ones (--prune)",
    "export": "a checkpoint as a self-describing ONNX model (fp32, or int8 gated on test AUC)",
    "explain": "heat maps of where the model looked (attention rollout, Grad-CAM) as overlays",
    "distill": "fit a student that also learns from a teacher checkpoint (--teacher CKPT)",
}
#: Option prefixes ``--help-short`` keeps: medvit's own groups and the essential Lightning ones.
SHORT_HELP_OPTIONS = (
    "-c",
    "--config",
    "--model.",
    "--data.",
    "--run.",
    "--wandb.",
    "--progress_bar.",
    "--ckpt_path",
    "--force",
    "--seed_everything",
    "--trainer.max_epochs",
    "--trainer.accelerator",
    "--trainer.devices",
    "--trainer.precision",
    "--checkpoint.monitor",
    "--checkpoint.mode",
    "--checkpoint.save_top_k",
)
#: Names of :mod:`medvit.train.cli` that ``medvit.cli`` still answers (imported on first use).
_FORWARDED = frozenset(
    {
        "MedViTCLI",
        "RunCheckpoint",
        "CheckpointFolderFollowsRun",
        "RUN_DIR_ENV",
        "checkpoint_data_mismatch",
        "describe_training_data",
    }
)


def __getattr__(name: str) -> Any:
    # Only the listed names: a probe for any other attribute must not import torch.
    if name in _FORWARDED:
        from medvit.train import cli as train_cli

        return getattr(train_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def commands() -> list[str]:
    """Every ``medvit`` command: LightningCLI's subcommands, then medvit's own."""
    return [*TRAIN_COMMANDS, *EXTRA_COMMANDS]


def main_help() -> str:
    """``medvit --help``: every command with one line, and where to find their options."""
    names = commands()
    width = max(map(len, names)) + 2
    lines = [
        f"usage: medvit {{{','.join(names)}}} ...",
        "",
        "Train ViTs on medical images (MedMNIST) and evaluate them.",
        "",
        "commands:",
        *(f"  {n:<{width}}{COMMAND_HELP.get(n, '')}".rstrip() for n in names),
        "",
        "Options of a command: medvit COMMAND --help. medvit's own options only (model, data,",
        "run, wandb, essentials): medvit fit --help-short (also validate, test).",
        f"Errors are one line; {DEBUG_ENV}=1 shows their traceback.",
    ]
    return "\n".join(lines)


def short_help(subcommand: str) -> str:
    """``medvit SUBCOMMAND --help-short``: the full help filtered to ``SHORT_HELP_OPTIONS``.

    The full help lists all of Lightning's Trainer and ModelCheckpoint options first (~900
    lines); this keeps medvit's own groups and a few essential Lightning options, in order.
    """
    import contextlib
    import io

    from medvit.train.cli import MedViTCLI

    buffer = io.StringIO()
    argv, sys.argv = sys.argv, sys.argv[:1]  # args= alone, without Lightning's warning
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            MedViTCLI(args=[subcommand, "--help"])
    finally:
        sys.argv = argv
    out = [f"usage: medvit {subcommand} [options]  (all options: medvit {subcommand} --help)"]
    header: str | None = None
    keep = False
    for line in buffer.getvalue().splitlines():
        if line and not line.startswith(" "):
            header, keep = line, False  # a group's title; printed with its first kept option
        elif line.startswith("  -"):
            option = line.split()[0].rstrip(",")
            keep = option.startswith(SHORT_HELP_OPTIONS) and not option.endswith(".help")
            if keep and header is not None:
                out += ["", header]
                header = None
            if keep:
                out.append(line)
        elif line.startswith("    ") and keep:
            out.append(line)  # the kept option's description continues
    return "\n".join(out)


def _raised_by_medvit(err: BaseException) -> bool:
    """True when ``err`` was raised by medvit's own code (its argument and data checks)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent  # src/medvit
    return package in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user's mistake (one line) rather than a bug (traceback).

    A user's mistake is a data or checkpoint file problem, or a ValueError/FileNotFoundError
    that medvit's own validation raised (e.g. a 3D flag, an unknown positive class). The same
    types raised inside torch, numpy or Lightning may be bugs and keep their traceback.
    """
    # Imported here: the checkpoint module needs torch, which only the training commands load.
    from medvit.data.files import DataFileError
    from medvit.models.checkpoint import CheckpointError

    if isinstance(err, (DataFileError, CheckpointError)):
        return True
    return isinstance(err, (ValueError, FileNotFoundError)) and _raised_by_medvit(err)


def show_tracebacks() -> bool:
    """``MEDVIT_DEBUG`` is set (not 0): a user error shows its traceback instead of one line."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_with_user_error(err: BaseException) -> NoReturn:
    """Print ``err`` as the one line ``medvit: error: ...`` and exit with status 2."""
    print(f"medvit: error: {' '.join(str(err).split())}", file=sys.stderr)
    raise SystemExit(2) from None


def onnx_given_to_training(words: list[str]) -> str | None:
    """The ``.onnx`` file given to ``fit``/``validate``/``test`` as ``--ckpt_path`` or ``-c``."""
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if name in ("--ckpt_path", "-c", "--config"):
            value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
            if value.lower().endswith(".onnx"):
                return value
    return None


def _run_extra(command: str, args: list[str]) -> None:
    """Import ``command``'s module (only now) and run its ``main`` on ``args``."""
    module, _, function = EXTRA_COMMANDS[command].partition(":")
    getattr(importlib.import_module(module), function)(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medvit`` console script."""
    from medvit.quiet import silence_known_noise

    silence_known_noise()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(main_help(), file=sys.stdout if words else sys.stderr)
        if not words:
            raise SystemExit(2)
        return
    if "--help-short" in words and words[0] in TRAIN_COMMANDS:
        print(short_help(words[0]))
        return
    if words[0] in EXTRA_COMMANDS:
        _run_extra(words[0], words[1:])
        return
    onnx_file = onnx_given_to_training(words)
    if onnx_file is not None:
        exit_with_user_error(
            ValueError(
                f"{onnx_file} is an ONNX model (medvit export), which medvit {words[0]} cannot "
                "train or evaluate; give the .ckpt it was exported from, or predict with it: "
                f"medvit predict --ckpt_path {onnx_file} INPUT..."
            )
        )
    from medvit.train.cli import MedViTCLI

    try:
        # args=None lets LightningCLI read sys.argv itself (passing both only earns a warning).
        MedViTCLI(args=argv)
    except (ValueError, FileNotFoundError) as err:
        # A user's mistake (missing data, a 3D flag, a checkpoint of other data) is one line;
        # a bug keeps its traceback, and MEDVIT_DEBUG=1 shows it for user errors too.
        if show_tracebacks() or not is_user_error(err):
            raise
        exit_with_user_error(err)


if __name__ == "__main__":
    main()
