"""One CLI voice: every command in ``medvit --help``, ``--help-short``, user errors as one line,
checkpoints refused on other data (unless ``--force``), and no wandb anonymous-mode notice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import short_trainer_args

from medvit.cli import EXTRA_COMMANDS, MedViTCLI, is_user_error, main

QUICK = short_trainer_args(1, train_batches=2, val_batches=2)


@pytest.fixture(scope="module")
def breast_run(tmp_path_factory):
    """A short BreastMNIST fit on synthetic files; returns (data root, best.ckpt)."""
    from conftest import make_medmnist_npz

    tmp = tmp_path_factory.mktemp("voice")
    for flag in ("breastmnist", "pneumoniamnist"):
        make_medmnist_npz(tmp / "data" / f"{flag}.npz", flag, n=(16, 8, 8))
    main(["fit", f"--data.root={tmp / 'data'}", f"--run.root={tmp / 'runs'}", *QUICK])
    (run_dir,) = (tmp / "runs" / "breastmnist").iterdir()
    return tmp / "data", run_dir / "checkpoints" / "best.ckpt"


# ----------------------------------------------------------------- checkpoint <-> data checks
@pytest.mark.parametrize("subcommand", ["test", "validate", "fit"])
def test_checkpoint_of_other_data_is_one_line_and_writes_nothing(
    breast_run, subcommand, tmp_path, capsys
):
    data_root, ckpt = breast_run
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                subcommand,
                "--ckpt_path",
                str(ckpt),
                "--data.flag=pneumoniamnist",
                f"--data.root={data_root}",
                f"--run.root={tmp_path / 'runs'}",
                *QUICK,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"medvit: error: checkpoint {ckpt} was trained on breastmnist (binary")
    assert "'malignant', 'normal, benign'; 1 channel, 28 px) but the data is pneumoniamnist" in err
    assert "--force" in err
    assert not (tmp_path / "runs").exists()


def test_force_uses_the_checkpoint_on_other_data(breast_run, tmp_path):
    data_root, ckpt = breast_run
    main(
        [
            "test",
            "--ckpt_path",
            str(ckpt),
            "--data.flag=pneumoniamnist",
            f"--data.root={data_root}",
            f"--run.root={tmp_path}",
            "--force=true",
            *QUICK,
        ]
    )
    (run_dir,) = (tmp_path / "pneumoniamnist").iterdir()
    assert (run_dir / "metrics.json").is_file()


def test_checkpoint_of_other_size_or_channels_is_refused(breast_run, tmp_path, capsys):
    data_root, ckpt = breast_run
    with pytest.raises(SystemExit):
        main(["test", "--ckpt_path", str(ckpt), f"--data.root={data_root}", "--data.in_chans=3"])
    err = capsys.readouterr().err
    assert "1 channel, 28 px) but the data is breastmnist (binary" in err and "3 channels" in err


# ------------------------------------------------------------------------------------ help
def test_help_lists_every_command_with_one_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == {"fit", "validate", "test", *EXTRA_COMMANDS}
    for line in out.splitlines():
        if line.startswith("  "):
            assert len(line.split()) > 2, f"no description: {line!r}"
    assert "--help-short" in out and "MEDVIT_DEBUG" in out


def test_help_short_shows_medvits_own_options(capsys):
    main(["fit", "--help-short"])
    out = capsys.readouterr().out
    for option in (
        "--data.flag",
        "--data.positive_class",
        "--model.model_name",
        "--model.lr",
        "--run.root",
        "--wandb.enabled",
        "--checkpoint.monitor",
        "--progress_bar.refresh_rate",
        "--trainer.max_epochs",
        "--ckpt_path",
        "--force",
    ):
        assert f"  {option}" in out, option
    assert "--trainer.gradient_clip_val" not in out and "--checkpoint.dirpath" not in out
    assert out.count("\n") < 400


def test_fixed_choices_are_listed_and_checked_by_the_parser(capsys):
    main(["fit", "--help-short"])
    out = capsys.readouterr().out
    assert "--model.pos_embed {auto,learn,sincos}" in out
    assert "--wandb.mode {auto,offline,online,disabled}" in out
    assert "Literal['balanced']" in " ".join(out.split())  # class_weights
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--wandb.mode=sometimes"])
    assert exit_info.value.code == 2
    assert "Expected a typing.Literal['auto', 'offline', 'online', 'disabled']" in (
        capsys.readouterr().err
    )


# ------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.flag=organmnist3d", "--data.size=128"], "size must be one of (28, 64)"),
        (["--data.flag=nosuchmnist"], "Unknown MedMNIST flag 'nosuchmnist'"),
        (["--data.positive_class=nosuch"], "positive_class 'nosuch' is not a class"),
        (["--data.download=false"], "breastmnist.npz does not exist"),
    ],
    ids=["3d-size", "unknown-flag", "positive-class", "missing-file"],
)
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--data.root={tmp_path}", f"--run.root={tmp_path / 'runs'}", *args, *QUICK])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("medvit: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_medvit_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVIT_DEBUG", "1")
    with pytest.raises(ValueError, match="size must be one of"):
        main(["fit", "--data.flag=organmnist3d", "--data.size=128", f"--run.root={tmp_path}"])


@pytest.mark.slow
def test_the_command_prints_one_line_or_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "medvit", "fit", "--data.flag=organmnist3d", "--data.size=128"]
    env = {**os.environ, "MEDVIT_DEBUG": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("medvit: error: size must be one of")
    env["MEDVIT_DEBUG"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr


def test_bugs_keep_their_traceback():
    from medvit.data.medmnist import MedMNISTDataModule

    try:
        MedMNISTDataModule(flag="nosuchmnist")
    except ValueError as err:
        assert is_user_error(err)  # raised by medvit's own validation
    try:
        np.ones(3).reshape(2, 2)  # a ValueError raised outside medvit: a bug, not a user error
    except ValueError as err:
        assert not is_user_error(err)
    try:
        {}["key"]
    except KeyError as err:
        assert not is_user_error(err)


# ------------------------------------------------------------------------------------ wandb
def test_offline_wandb_prints_no_anonymous_notice(tmp_path, monkeypatch):
    import wandb

    from medvit.train.wandb_logging import MedViTWandbLogger

    notices: list[str] = []
    real = wandb.termwarn
    monkeypatch.setattr(wandb, "termwarn", lambda msg, *a, **k: notices.append(str(msg)))
    logger = MedViTWandbLogger(offline=True, save_dir=str(tmp_path), project="medvit-test")
    try:
        assert logger.experiment is not None
    finally:
        wandb.finish()
        monkeypatch.setattr(wandb, "termwarn", real)
    assert not [n for n in notices if "anonymous" in n], notices


def test_parse_only_accepts_force():
    class ParseOnly(MedViTCLI):
        def instantiate_classes(self) -> None:
            pass

    assert ParseOnly(args=[], run=False).config.force is False
    assert ParseOnly(args=["--force=true"], run=False).config.force is True


# ------------------------------------------------------------------------------ front door
def test_the_static_command_table_is_what_main_dispatches():
    import importlib

    from medvit import cli

    # The front door lists the LightningCLI's commands without importing it: keep them equal.
    assert tuple(MedViTCLI.subcommands()) == cli.TRAIN_COMMANDS
    assert cli.commands() == [*MedViTCLI.subcommands(), *EXTRA_COMMANDS]
    assert set(cli.COMMAND_HELP) == set(cli.commands())
    for command, target in EXTRA_COMMANDS.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), command
    # The old address of the LightningCLI's names (medvit.cli.MedViTCLI) still answers.
    from medvit.train import cli as train_cli

    for name in cli._FORWARDED:
        assert getattr(cli, name) is getattr(train_cli, name), name
    with pytest.raises(AttributeError):
        cli.no_such_name  # noqa: B018


HEAVY = ("torch", "lightning", "timm", "monai", "albumentations")


def _loaded_heavy_modules(args: list[str], tmp_path) -> list[str]:
    """Run ``medvit ARGS`` in a fresh interpreter; the heavy packages it imported."""
    out = tmp_path / "loaded.json"
    code = (
        "import json, sys\n"
        "from medvit.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        f"open({str(out)!r}, 'w').write(json.dumps(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    return json.loads(out.read_text())


def _small_run_folder(path):
    """A finished binary run folder as ``medvit fit`` writes it (no training needed)."""
    from medvit import runs

    path.mkdir(parents=True)
    (path / runs.CONFIG_FILE).write_text("data:\n  flag: breastmnist\n  size: 28\n")
    runs.write_metrics(path, {"val": {"auroc": 0.8}, "test": {"auroc": 0.75}})
    runs.write_meta(path, {"command": ["medvit", "fit"], "duration_s": 1.0})
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1], size=20)
    runs.write_predictions(
        path / runs.PREDICTIONS_FILE,
        probs=probs,
        target=np.arange(20) % 2,
        index=np.arange(20),
        class_names=["malignant", "normal, benign"],
        task="binary",
        positive_class=0,
    )
    return path


@pytest.mark.parametrize(
    "args",
    [["--help"], ["cv", "--help"], ["report", "RUN"], ["report", "MISSING"]],
    ids=["help", "cv-help", "report", "report-missing-folder"],
)
def test_light_commands_do_not_import_torch_and_co(args, tmp_path):
    run = tmp_path / "run"
    if "RUN" in args:
        args = ["report", str(_small_run_folder(run)), "--no-progress"]
    if "MISSING" in args:
        args = ["report", str(tmp_path / "no_such_run")]
    assert _loaded_heavy_modules(args, tmp_path) == []
    if run.is_dir():
        assert (run / "report.html").is_file()  # the whole report was written
