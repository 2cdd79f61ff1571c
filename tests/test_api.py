"""The Python API: recipe defaults in one place, and api.fit gives the CLI's run folder."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from medvit import api
from medvit.models.module import ViTClassifier

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "experiment" / "breastmnist.yaml"


def test_module_defaults_are_the_default_recipe():
    defaults = {
        name: p.default
        for name, p in inspect.signature(ViTClassifier).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    recipe = yaml.safe_load(RECIPE.read_text())["model"]
    assert recipe, RECIPE
    for key, value in recipe.items():
        assert defaults[key] == value, (
            f"ViTClassifier({key}={defaults[key]!r}) but recipe {value!r}"
        )


def test_the_data_arguments_have_no_silent_default():
    with pytest.raises(TypeError, match="num_classes.*in_chans.*img_size.*task"):
        ViTClassifier()


def test_cli_args_spell_overrides_as_the_command_line():
    args = api.cli_args(
        ["a.yaml", "b.yaml"],
        {"data.root": "/x"},
        trainer__max_epochs=2,
        model__pretrained=False,
        wandb__tags=["a", "b"],
        run__name=None,
    )
    assert args == [
        "fit",
        "-c",
        "a.yaml",
        "-c",
        "b.yaml",
        "--data.root=/x",
        "--trainer.max_epochs=2",
        "--model.pretrained=false",
        '--wandb.tags=["a", "b"]',
        "--run.name=null",
    ]


def test_fit_returns_the_same_run_folder_as_the_cli(synthetic_root, tmp_path):
    root = synthetic_root("breastmnist", n=(24, 8, 10))
    run = api.fit(
        RECIPE,
        {"data.root": str(root), "run.root": str(tmp_path / "runs")},
        data__verify_md5=False,
        data__num_workers=0,
        data__global_batch_size=8,
        model__patch_size=7,
        trainer__max_epochs=1,
        trainer__enable_progress_bar=False,
    )
    assert run.path.parent == tmp_path / "runs" / "breastmnist"
    for name in ("config.yaml", "meta.json", "metrics.json", "test_predictions.npz"):
        assert (run.path / name).is_file(), name
    assert run.best_checkpoint == run.path / "checkpoints" / "best.ckpt"
    assert run.best_checkpoint.is_file()
    assert run.config["model"]["patch_size"] == 7 and run.config["trainer"]["max_epochs"] == 1
    assert run.metrics["positive_class"] == "malignant"
    preds = run.predictions()
    assert preds.probs.shape == (10, 2) and preds.positive == 0


def test_known_noise_is_silenced_and_nothing_else(synthetic_root, tmp_path, caplog, recwarn):
    import logging
    import warnings

    root = synthetic_root("breastmnist", n=(8, 4, 4))
    caplog.set_level(logging.INFO)
    api.fit(
        overrides={"data.root": str(root), "run.root": str(tmp_path / "runs")},
        data__verify_md5=False,
        data__num_workers=0,
        data__global_batch_size=4,
        model__patch_size=7,
        trainer__max_epochs=1,
        trainer__enable_progress_bar=False,
    )
    assert "litlogger" not in caplog.text
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    assert "GPU available" in caplog.text  # Lightning's other notices still show
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown", UserWarning, stacklevel=1)
