"""Hostile and broken inputs: no code from checkpoints, resume in place, one-line errors.

A checkpoint is a pickle, and a pickle can call any function while it is read. The tests here
plant a payload that creates a marker file when unpickled and check, for every entry point
that reads a checkpoint or weight file, that the file is refused in one ``medvit: error:``
line and that the marker never appears. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set while
they run: torch then fully unpickles every load that does not pass ``weights_only=True``
itself, so a load relying on torch's default would run the payload.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_medmnist_npz, short_trainer_args

from medvit.cli import main
from medvit.cv import runner
from medvit.data.files import DataFileError
from medvit.data.medmnist import MedMNISTDataModule
from medvit.evaluate import predict

REPO = Path(__file__).resolve().parents[1]
QUICK = short_trainer_args(None, train_batches=2)  # each test sets its own epochs


class Payload:
    """Pickles as a call to ``exec`` that creates ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def poison(obj: dict, dst: Path, marker: Path) -> Path:
    """Save ``obj`` plus the payload: a full unpickling of ``dst`` creates ``marker``."""
    torch.save({**obj, "payload": Payload(marker)}, dst)
    return dst


def last_error_line(capsys, exc_info) -> str:
    """The single ``medvit: error:`` line a refused input must end in (exit code 2)."""
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("medvit: error: "), err[-3000:]
    return line


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs of a tiny fit that stores as much as a real run does beyond tensors.

    Layer decay (per-group optimiser state), balanced class weights, and the freeze/unfreeze
    callback (its own state) all go into ``last.ckpt``; returns (data root, run dir).
    """
    tmp = tmp_path_factory.mktemp("safety")
    make_medmnist_npz(tmp / "data" / "breastmnist.npz", "breastmnist", n=(32, 12, 12))
    finetune = {"class_path": "medvit.train.callbacks.ViTFinetuning", "init_args": {}}
    main(
        [
            "fit",
            f"--data.root={tmp / 'data'}",
            f"--run.root={tmp / 'runs'}",
            "--trainer.max_epochs=2",
            "--model.layer_decay=0.75",
            "--model.class_weights=balanced",
            f"--trainer.callbacks+={json.dumps(finetune)}",
            *QUICK,
        ]
    )
    (run_dir,) = (tmp / "runs" / "breastmnist").iterdir()
    return tmp / "data", run_dir


@pytest.fixture
def hostile(fitted, tmp_path, monkeypatch):
    """A medvit checkpoint carrying the payload, and the marker it would create."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    real = torch.load(fitted[1] / "checkpoints" / "best.ckpt", weights_only=True)
    return poison(real, tmp_path / "hostile.ckpt", marker), marker


# ------------------------------------------------------------------------ checkpoints hold data
def _plain(value, where: str) -> None:
    """Assert ``value`` is made of what the restricted unpickler accepts without allowlists."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            _plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (str, int, float, bool, torch.Tensor)), (
            f"{where} is a {type(value).__name__}"
        )


@pytest.mark.parametrize("name", ["best.ckpt", "last.ckpt"])
def test_medvit_checkpoints_are_plain_data(fitted, name):
    ckpt = torch.load(fitted[1] / "checkpoints" / name, weights_only=True)
    for key in ("hyper_parameters", "datamodule_hyper_parameters", "callbacks", "loops"):
        _plain(ckpt[key], key)
    assert ckpt["hyper_parameters"]["class_names"] == ["malignant", "normal, benign"]
    assert any(k.startswith("ViTFinetuning") for k in ckpt["callbacks"]), list(ckpt["callbacks"])


def test_normal_checkpoints_still_load_everywhere(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    data_root, run_dir = fitted
    best = run_dir / "checkpoints" / "best.ckpt"
    model, data_hp = predict.load_model(best)
    assert data_hp["flag"] == "breastmnist" and model.hparams.num_classes == 2
    main(
        ["validate", "-c", str(run_dir / "config.yaml"), "--ckpt_path", str(best)]
        + [f"--run.root={tmp_path / 'runs'}"]
    )
    assert "val metrics:" in capsys.readouterr().out
    # A plain state dict of the same network as --model.pretrained (timm's loader).
    weights = tmp_path / "net.pth"
    state = torch.load(best, weights_only=True)["state_dict"]
    torch.save(
        {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}, weights
    )
    main(
        ["validate", f"--data.root={data_root}", f"--model.pretrained={weights}"]
        + [f"--run.root={tmp_path / 'runs'}", *QUICK]
    )
    assert "val metrics:" in capsys.readouterr().out


# ------------------------------------------------------------------------ hostile checkpoints
@pytest.mark.parametrize("command", ["predict", "test", "validate", "fit"])
def test_code_in_a_checkpoint_never_runs(command, fitted, hostile, tmp_path, capsys):
    data_root, run_dir = fitted
    ckpt, marker = hostile
    if command == "predict":
        argv = ["predict", "--ckpt_path", str(ckpt), f"{data_root / 'breastmnist.npz'}:test"]
    else:
        argv = [command, "-c", str(run_dir / "config.yaml"), "--ckpt_path", str(ckpt)]
        argv.append(f"--run.root={tmp_path / 'runs'}")
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    line = last_error_line(capsys, exc_info)
    assert not marker.exists(), f"medvit {command} ran code from the checkpoint"
    assert f"refused to load {ckpt}" in line and "weights_only=True" in line
    assert not (tmp_path / "runs").exists(), "refused before a run folder was made"


def test_code_in_a_pretrained_weight_file_never_runs(fitted, hostile, tmp_path, capsys):
    _, marker = hostile
    state = torch.load(fitted[1] / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    weights = poison(
        {"model": {k.removeprefix("net."): v for k, v in state.items()}},
        tmp_path / "weights.pth",
        marker,
    )
    with pytest.raises(SystemExit) as exc_info:
        main(
            ["fit", f"--data.root={fitted[0]}", f"--model.pretrained={weights}"]
            + [f"--run.root={tmp_path / 'runs'}", "--trainer.max_epochs=1", *QUICK]
        )
    line = last_error_line(capsys, exc_info)
    assert not marker.exists(), "--model.pretrained ran code from the weight file"
    assert f"refused to load {weights}" in line


@pytest.mark.parametrize("command", ["test", "predict"])
def test_truncated_checkpoint_is_one_line(command, fitted, tmp_path, capsys):
    data_root, run_dir = fitted
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes((run_dir / "checkpoints" / "best.ckpt").read_bytes()[:4096])
    if command == "predict":
        argv = ["predict", "--ckpt_path", str(bad), f"{data_root / 'breastmnist.npz'}:test"]
    else:
        argv = ["test", "-c", str(run_dir / "config.yaml"), "--ckpt_path", str(bad)]
        argv.append(f"--run.root={tmp_path / 'runs'}")
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert f"cannot read {bad}" in last_error_line(capsys, exc_info)


def test_checkpoint_of_another_model_is_one_line(fitted, tmp_path, capsys):
    """A 28 px checkpoint tested at 56 px: Lightning's traceback lists every key; one line."""
    _, run_dir = fitted
    best = run_dir / "checkpoints" / "best.ckpt"
    with pytest.raises(SystemExit) as exc_info:
        # --force skips the checkpoint-vs-data check (tests/test_cli_voice.py), which would
        # refuse the size first: the weights must still not fit.
        main(
            ["test", "-c", str(run_dir / "config.yaml"), "--ckpt_path", str(best)]
            + ["--data.img_size=56", f"--run.root={tmp_path / 'runs'}", "--force=true"]
        )
    line = last_error_line(capsys, exc_info)
    assert f"{best} does not fit this model: 'net.pos_embed' has shape" in line


@pytest.mark.slow
def test_cv_resume_never_runs_code_from_a_fold_checkpoint(fitted, tmp_path, monkeypatch):
    """A CV whose folds left ``last.ckpt`` files is rerun; the files carry the payload.

    The first CV run is a stand-in that leaves fold 0 checkpointed but unfinished (as an
    interrupted CV does) and fold 1 finished; the rerun is the real command, whose fold processes resume with
    ``medvit fit --ckpt_path <fold>/checkpoints/last.ckpt``.
    """
    data_root, run_dir = fitted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    real = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "pwned"

    def first_attempt(cmd: list[str], log_path: Path) -> int:
        fold_dir = Path(cmd[cmd.index("--run.dir") + 1])
        (fold_dir / "checkpoints").mkdir(parents=True)
        if fold_dir.name == "r0-f1":  # finished: the rerun skips it
            (fold_dir / "metrics.json").write_text(json.dumps({"val": {}, "test": {"auroc": 0.5}}))
            return 0
        (fold_dir / "config.yaml").write_text("interrupted: true\n")
        poison(real, fold_dir / "checkpoints" / "last.ckpt", marker)
        return 1

    argv = [f"--data.root={data_root}", "--trainer.max_epochs=1", *QUICK]
    config = runner.resolve_fit_config(argv)  # once: the config of every fold
    monkeypatch.setattr(runner, "resolve_fit_config", lambda fit_args: config)
    argv += ["--folds", "2", "--cv-dir", str(tmp_path / "cv")]
    with monkeypatch.context() as patch:
        patch.setattr(runner, "launch", first_attempt)
        assert runner.run_cv(argv) == 1
    assert runner.run_cv(argv) == 1  # a real fold process resumes r0-f0 and refuses its checkpoint
    assert not marker.exists(), "a resumed CV fold ran code from its checkpoint"
    log = (tmp_path / "cv" / "logs" / "r0-f0.log").read_text()
    ckpt = tmp_path / "cv" / "runs" / "r0-f0" / "checkpoints" / "last.ckpt"
    assert f"--ckpt_path {ckpt}" in log, "the rerun resumed the fold"
    assert f"medvit: error: refused to load {ckpt}" in log and "Traceback" not in log


# --------------------------------------------------------------------------------- resume
def _val_auroc_by_epoch(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return {
            int(r["epoch"]): float(r["val/auroc"]) for r in csv.DictReader(fh) if r.get("val/auroc")
        }


def _checkpoint_state(ckpt: dict) -> dict:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return state


@pytest.mark.parametrize("spelling", ["absolute", "relative-from-elsewhere", "old-checkpoint"])
def test_resume_continues_best_and_last_in_place(spelling, tmp_path, monkeypatch):
    """A fit killed in epoch 2 resumed with the README command, the run folder spelled otherwise.

    ``old-checkpoint``: the checkpoint stores its folder relative to the first working
    directory, as medvit wrote checkpoints before it resolved run folders.
    """
    make_medmnist_npz(tmp_path / "data" / "breastmnist.npz", "breastmnist", n=(32, 12, 12))
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    stop = {"class_path": "conftest.StopAtEpoch", "init_args": {"epoch": 2}}
    where = {
        "absolute": "--run.root=runs",  # the default: a relative root, a new timestamped folder
        "relative-from-elsewhere": "--run.dir=runs/x",
        "old-checkpoint": f"--run.dir={work / 'runs' / 'x'}",
    }[spelling]
    with pytest.raises(RuntimeError, match="interrupted at epoch 2"):
        main(
            ["fit", f"--data.root={tmp_path / 'data'}", where]
            + ["--trainer.max_epochs=3", "--model.drop_path_rate=0", *QUICK]
            + [f"--trainer.callbacks+={json.dumps(stop)}"]
        )
    (run_dir,) = {p.parent.parent for p in (work / "runs").rglob("last.ckpt")}
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    if spelling == "old-checkpoint":
        ckpt = torch.load(last, weights_only=True)
        state = _checkpoint_state(ckpt)
        for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(key):
                state[key] = os.path.relpath(state[key], work)
        state["best_k_models"] = {
            os.path.relpath(k, work): v for k, v in state["best_k_models"].items()
        }
        assert state["dirpath"] == "runs/x/checkpoints"
        torch.save(ckpt, last)
        prefix = Path("runs") / "x"
    elif spelling == "absolute":
        prefix = run_dir
    else:
        monkeypatch.chdir(elsewhere)
        prefix = Path("..") / "work" / "runs" / "x"
    # README: medvit fit -c <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt
    main(
        ["fit", "-c", str(prefix / "config.yaml")]
        + ["--ckpt_path", str(prefix / "checkpoints" / "last.ckpt"), "--trainer.callbacks=null"]
    )
    assert not list(elsewhere.iterdir()), "the resumed run went into the working directory"
    assert {p.parent.parent for p in (work / "runs").rglob("*.ckpt")} == {run_dir}
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert files == ["best.ckpt", "last.ckpt"], files
    final = torch.load(last, weights_only=True)
    assert final["epoch"] == 2
    aurocs = _val_auroc_by_epoch(run_dir)
    assert sorted(aurocs) == [0, 1, 2], aurocs
    best_epoch = max(aurocs, key=lambda e: (aurocs[e], -e))  # the first epoch with the top score
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == best_epoch, (aurocs, best["epoch"])
    state = _checkpoint_state(final)
    assert float(state["best_model_score"]) == pytest.approx(aurocs[best_epoch], abs=1e-6)
    assert Path(state["best_model_path"]) == (run_dir / "checkpoints" / "best.ckpt").resolve()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == best_epoch and metrics["epochs_trained"] == 3


def test_last_checkpoint_is_the_latest_epoch_when_the_best_is_older(tmp_path):
    """Lightning 2.6 wrote ``last.ckpt`` only with a new best, so a resume redid epochs.

    Monitoring ``epoch`` in ``min`` mode makes epoch 0 the best for sure.
    """
    make_medmnist_npz(tmp_path / "data" / "breastmnist.npz", "breastmnist", n=(16, 8, 8))
    main(
        ["fit", f"--data.root={tmp_path / 'data'}", f"--run.dir={tmp_path / 'run'}"]
        + ["--trainer.max_epochs=3", "--checkpoint.monitor=epoch", "--checkpoint.mode=min"]
        + ["--run.test_after_fit=false", *QUICK]
    )
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(folder / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2


# ------------------------------------------------------------------------------ data checks
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_empty_split_is_refused_before_training(split, tmp_path, capsys):
    n = {"train": 24, "val": 8, "test": 8}
    n[split] = 0
    make_medmnist_npz(tmp_path / "data" / "breastmnist.npz", "breastmnist", n=tuple(n.values()))
    with pytest.raises(SystemExit) as exc_info:
        main(
            ["fit", f"--data.root={tmp_path / 'data'}", f"--run.root={tmp_path / 'runs'}"]
            + ["--trainer.max_epochs=1", *QUICK]
        )
    line = last_error_line(capsys, exc_info)
    assert f"the {split} split(s) hold fewer than 2 samples" in line
    counts = {"train": "train: 24 (12, 12)", "val": "val: 8 (4, 4)", "test": "test: 8 (4, 4)"}
    counts[split] = f"{split}: 0 (0, 0)"
    assert all(c in line for c in counts.values()), line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


def test_class_missing_from_val_is_a_warning(tmp_path):
    path = make_medmnist_npz(tmp_path / "breastmnist.npz", "breastmnist", n=(24, 8, 8))
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["val_labels"][:] = 1  # no "malignant" (class 0) in val
    np.savez(path, **arrays)
    dm = MedMNISTDataModule(root=str(tmp_path), verify_md5=False, num_workers=0)
    with pytest.warns(UserWarning, match=r"the val split has no samples of \['malignant'\].*AUROC"):
        dm.prepare_data()


def test_read_only_data_and_working_folders_name_cache_dir(tmp_path, monkeypatch, capsys):
    """A read-only data folder and a read-only working directory, simulated.

    chmod cannot make them read-only here: root ignores permissions (``os.access(p, W_OK)`` is
    True and ``mkdir`` succeeds in a 0o555 folder as root, which CI containers often are). So
    ``os.access`` reports the data folder read-only, as it does for any other user, and the
    working directory holds a regular file named ``data``, so that the fallback cache folder
    ``data/mmap`` cannot be created there, as in a read-only folder. The same on any user.
    """
    import medvit.data.medmnist as medmnist

    data = tmp_path / "ro"
    make_medmnist_npz(data / "breastmnist.npz", "breastmnist", n=(24, 8, 8))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "data").write_text("not a folder")
    real_access = os.access

    def access(path, mode, **kwargs):
        if Path(path) == data and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(medmnist.os, "access", access)
    with pytest.raises(SystemExit) as exc_info:
        main(
            ["fit", f"--data.root={data}", f"--run.root={tmp_path / 'runs'}"]
            + ["--trainer.max_epochs=1", *QUICK]
        )
    line = last_error_line(capsys, exc_info)
    assert "cache in data/mmap" in line and f"data folder {data} is not writable" in line
    assert "Point --data.cache_dir at a writable folder" in line
    # An explicit cache folder that cannot be made is named too.
    (tmp_path / "file").write_text("x")
    dm = MedMNISTDataModule(root=str(data), verify_md5=False, cache_dir=str(tmp_path / "file/c"))
    with pytest.raises(DataFileError, match=r"cache in .*file/c: .*--data.cache_dir"):
        dm.prepare_data()


# ------------------------------------------------------------------------ report and predict
@pytest.fixture
def run_folder(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted[1], run, ignore=shutil.ignore_patterns("*.ckpt"))
    return run


def test_report_on_corrupt_config_is_one_line(run_folder, capsys):
    (run_folder / "config.yaml").write_text("model: [unclosed\n  lr: 1\n")
    with pytest.raises(SystemExit) as exc_info:
        main(["report", str(run_folder), "--no-progress"])
    line = last_error_line(capsys, exc_info)
    assert f"{run_folder / 'config.yaml'} is not valid YAML" in line


@pytest.mark.parametrize("defect", ["garbage", "shape", "object"])
def test_report_on_a_bad_predictions_file_names_it(defect, run_folder, capsys):
    preds = run_folder / "test_predictions.npz"
    if defect == "garbage":
        preds.write_bytes(b"PK\x03\x04 not really a zip")
    elif defect == "shape":
        np.savez(preds, probs=np.zeros(5), target=np.zeros(5, dtype=int))
    else:
        np.savez(preds, probs=np.array([{"a": 1}], dtype=object), target=np.zeros(1))
    with pytest.raises(SystemExit) as exc_info:
        main(["report", str(run_folder), "--no-progress"])
    assert str(preds) in last_error_line(capsys, exc_info)


def test_predict_on_an_object_array_names_the_file(fitted, tmp_path, capsys):
    bad = tmp_path / "objects.npz"
    np.savez(bad, test_images=np.array([{"x": 1}, None], dtype=object))
    ckpt = fitted[1] / "checkpoints" / "best.ckpt"
    with pytest.raises(SystemExit) as exc_info:
        main(["predict", "--ckpt_path", str(ckpt), f"{bad}:test"])
    line = last_error_line(capsys, exc_info)
    assert str(bad) in line and "test_images" in line
