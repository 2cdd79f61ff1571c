"""The medvit command: every config parses, fit/test/predict through LightningCLI write a run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import short_trainer_args
from PIL import Image

from medvit.cli import MedViTCLI, main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiment").glob("*.yaml"))
QUICK = short_trainer_args(1, train_batches=2, val_batches=2, patch_size=None, verify_md5=True)


class ParseOnly(MedViTCLI):
    """Parse and link arguments, instantiate nothing (no weights, no data)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    return ParseOnly(args=list(args), run=False).config


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_configs_parse(experiment):
    config = parse("-c", str(experiment))
    assert config.data.flag == experiment.stem
    assert config.model.model_name.startswith(("vit_", "test_vit"))  # test_vit: the 3D recipe


@pytest.mark.parametrize(
    "extra",
    sorted((ROOT / "configs").glob("*/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_every_config_file_parses_with_the_default_experiment(extra):
    base = ROOT / "configs" / "experiment" / "breastmnist.yaml"
    group = extra.parent.name
    if group == "experiment":
        config = parse("-c", str(extra))
    elif group == "model":
        config = parse("-c", str(base), "--model", str(extra))
        assert config.model.model_name == yaml.safe_load(extra.read_text())["model_name"]
    elif group == "sweep":
        sweep = yaml.safe_load(extra.read_text())
        assert "${args}" in sweep["command"] and "fit" in sweep["command"]
        # Each swept parameter must be a medvit fit option.
        args = [
            f"--{k}={v['values'][0] if 'values' in v else v.get('min', v.get('value'))}"
            for k, v in sweep["parameters"].items()
        ]
        config = parse("-c", str(base), *args)
    elif group == "data":  # own data: selects ImageDataModule (subclass mode) over the recipe
        config = parse("-c", str(base), "-c", str(extra))
        assert config.data.class_path == "medvit.data.images.ImageDataModule"
        assert config.data.init_args.path
        return
    else:
        config = parse("-c", str(base), "-c", str(extra))
    assert config.data.flag


def test_links_from_data_to_model(synthetic_root, tmp_path):
    root = synthetic_root("dermamnist", n=(16, 8, 8))
    cli = MedViTCLI(
        args=[
            "--data.flag=dermamnist",
            f"--data.root={root}",
            "--data.verify_md5=false",
            "--model.patch_size=7",
            f"--run.root={tmp_path}",
        ],
        run=False,
    )
    hp = cli.model.hparams
    assert (hp.num_classes, hp.in_chans, hp.img_size, hp.task) == (7, 3, 28, "multiclass")
    assert hp.class_names == cli.datamodule.class_names


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short fit on a synthetic RGB multi-class set; returns (data root, run dir)."""
    from conftest import make_medmnist_npz

    tmp = tmp_path_factory.mktemp("fit")
    make_medmnist_npz(tmp / "data" / "dermamnist.npz", "dermamnist", n=(32, 16, 15))
    main(
        [
            "fit",
            "--data.flag=dermamnist",
            f"--data.root={tmp / 'data'}",
            "--data.verify_md5=false",
            "--model.patch_size=7",
            f"--run.root={tmp / 'runs'}",
            *QUICK,
        ]
    )
    (run_dir,) = (tmp / "runs" / "dermamnist").iterdir()
    return tmp / "data", run_dir


def test_fit_writes_a_complete_run_folder(fitted):
    _, run_dir = fitted
    for name in (
        "config.yaml",
        "meta.json",
        "metrics.json",
        "metrics.csv",
        "test_predictions.npz",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert len(meta["git_sha"]) == 40 or meta["git_sha"] == "unknown"
    assert meta["duration_s"] > 0 and meta["world_size"] == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["val"]) >= {"auroc", "acc", "bal_acc", "f1", "ece", "loss"}
    assert set(metrics["test"]) >= {"auroc", "acc", "bal_acc", "f1", "ece", "loss"}
    assert metrics["best_checkpoint"] == "checkpoints/best.ckpt"
    preds = np.load(run_dir / "test_predictions.npz")
    assert preds["probs"].shape == (15, 7) and preds["index"].tolist() == list(range(15))
    assert np.allclose(preds["probs"].sum(1), 1, atol=1e-5)
    assert preds["class_names"].tolist()[0].startswith("actinic")
    # The accuracy written equals the one recomputed from the saved predictions.
    acc = (preds["probs"].argmax(1) == preds["target"]).mean()
    assert metrics["test"]["acc"] == pytest.approx(acc, abs=1e-6)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["flag"] == "dermamnist" and config["run"]["dir"] is None


def test_test_subcommand_reproduces_fit_test_metrics(fitted, tmp_path):
    _, run_dir = fitted
    main(
        [
            "test",
            "-c",
            str(run_dir / "config.yaml"),
            "--ckpt_path",
            str(run_dir / "checkpoints" / "best.ckpt"),
            f"--run.root={tmp_path}",
        ]
    )
    (test_dir,) = (tmp_path / "dermamnist").iterdir()
    assert test_dir.name.endswith("-test")
    fit_metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    test_metrics = json.loads((test_dir / "metrics.json").read_text())["test"]
    assert test_metrics == pytest.approx(fit_metrics, abs=1e-6)


def test_predict_npz_split_and_image_files(fitted, tmp_path):
    data_root, run_dir = fitted
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    out = tmp_path / "pred.csv"
    main(
        [
            "predict",
            "--ckpt_path",
            str(ckpt),
            f"{data_root / 'dermamnist.npz'}:test",
            "-o",
            str(out),
        ]
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 15
    names = np.load(run_dir / "test_predictions.npz")["class_names"].tolist()
    prob_cols = [f"prob_{n}" for n in names]
    assert list(rows[0])[:2] == ["source", "index"] and set(prob_cols) <= set(rows[0])
    probs = np.array([[float(r[c]) for c in prob_cols] for r in rows])
    saved = np.load(run_dir / "test_predictions.npz")["probs"]
    assert np.allclose(probs, saved, atol=1e-5)
    assert [r["prediction"] for r in rows] == [names[i] for i in saved.argmax(1)]
    # The same images as PNG files give the same probabilities.
    images = np.load(data_root / "dermamnist.npz")["test_images"][:3]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(image).save(files[-1])
    rows = __import__("medvit.evaluate.predict", fromlist=["predict"]).predict(
        ckpt, [str(f) for f in files], tmp_path / "png.csv"
    )
    assert np.allclose([[r[c] for c in prob_cols] for r in rows], saved[:3], atol=1e-5)


def test_predict_bad_inputs(fitted, tmp_path, capsys):
    _, run_dir = fitted
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(tmp_path / "nope.ckpt"), "x.png"])
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                "--ckpt_path",
                str(run_dir / "checkpoints/best.ckpt"),
                str(tmp_path / "notes.txt"),
            ]
        )
    assert "expected an image" in capsys.readouterr().err


def test_missing_data_fails_before_training_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                f"--data.root={tmp_path}",
                "--data.download=false",
                f"--run.root={tmp_path / 'runs'}",
                *QUICK,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'breastmnist.npz'} does not exist" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="nope.safetensors"):
        MedViTCLI(
            args=[
                "--model.pretrained",
                str(tmp_path / "nope.safetensors"),
                f"--run.root={tmp_path}",
            ],
            run=False,
        )


def test_every_third_party_import_is_declared():
    """An import under src/ that only works because another package pulls it in breaks later."""
    import ast
    import re
    import sys
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    distributions = packages_distributions()
    missing = {}
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "medvit":
                    continue
                dists = {norm(d) for d in distributions.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def test_configs_saved_before_the_move_to_train_still_name_the_finetuning_callback(tmp_path):
    """A run's config.yaml from before 0.2 says medvit.callbacks.ViTFinetuning; it must resume."""
    from medvit.train.callbacks import ViTFinetuning

    old = tmp_path / "config.yaml"
    old.write_text(
        "trainer:\n  callbacks:\n  - class_path: medvit.callbacks.ViTFinetuning\n"
        "    init_args:\n      unfreeze_at_epoch: 2\n"
    )
    cli = MedViTCLI(
        args=["-c", str(old), "--trainer.logger=false", f"--run.root={tmp_path}"], run=False
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ViTFinetuning)]
    assert callback.unfreeze_at_epoch == 2
