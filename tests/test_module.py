"""ViTClassifier: loss per task, metrics, parameter groups and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvit.models.metrics import build_metrics
from medvit.models.module import ViTClassifier, warmup_cosine

# label_smoothing 0: the loss tests compare with plain cross-entropy (the recipe default is 0.1).
SMALL = dict(img_size=28, patch_size=7, model_name="vit_tiny_patch16_224", label_smoothing=0.0)


def make(task: str = "binary", num_classes: int = 2, **kwargs) -> ViTClassifier:
    return ViTClassifier(num_classes=num_classes, task=task, in_chans=1, **{**SMALL, **kwargs})


@pytest.mark.parametrize(
    ("task", "classes"), [("binary", 2), ("multiclass", 5), ("ordinal", 5), ("multilabel", 4)]
)
def test_loss_and_probabilities_per_task(task, classes):
    torch.manual_seed(0)
    model = make(task, classes)
    logits = torch.randn(6, classes)
    if task == "multilabel":
        target = (torch.rand(6, classes) > 0.5).float()
        expected = F.binary_cross_entropy_with_logits(logits, target)
        probs = model.probabilities(logits)
        assert torch.allclose(probs, logits.sigmoid())
    else:
        target = torch.randint(0, classes, (6,))
        expected = F.cross_entropy(logits, target)
        assert torch.allclose(model.probabilities(logits).sum(1), torch.ones(6))
    assert torch.allclose(model.loss(logits, target), expected)


def test_label_smoothing_and_class_weights():
    model = make(label_smoothing=0.1, class_weights=[1.0, 3.0])
    logits, target = torch.randn(8, 2), torch.randint(0, 2, (8,))
    expected = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 3.0]), label_smoothing=0.1)
    assert torch.allclose(model.loss(logits, target), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "regression"}, "task must be one of"),
        ({"num_classes": 3}, "binary task has num_classes=2"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"layer_decay": 1.5}, "layer_decay"),
        ({"class_weights": "inverse"}, "class_weights must be"),
        ({"class_weights": [1.0]}, "1 class_weights for 2 classes"),
        ({"class_names": ["a"]}, "1 class_names for 2 classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"task": "binary", "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make(**args)


def _optimizer(model: ViTClassifier, max_epochs: int = 10, steps: int = 100):
    class FakeTrainer:
        estimated_stepping_batches = steps

    FakeTrainer.max_epochs = max_epochs
    model.trainer = FakeTrainer()  # type: ignore[assignment]
    return model.configure_optimizers()


def _names_by_group(model, optimizer):
    names = {id(p): n for n, p in model.net.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def test_no_weight_decay_on_norms_biases_pos_embed_cls_token():
    model = make()
    opt = _optimizer(model)["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    for group, names in zip(opt.param_groups, _names_by_group(model, opt), strict=True):
        for name in names:
            no_decay = (
                name.endswith(".bias") or "norm" in name or name in ("pos_embed", "cls_token")
            )
            assert (group["weight_decay"] == 0.0) == no_decay, name


def test_layer_decay_scales_learning_rates():
    model = make(layer_decay=0.5, lr=1e-3)
    opt = _optimizer(model)["optimizer"]
    by_name = {}
    for group, names in zip(opt.param_groups, _names_by_group(model, opt), strict=True):
        for name in names:
            by_name[name] = group["initial_lr"]  # lr before the warm-up factor
    assert by_name["head.weight"] == pytest.approx(1e-3)
    assert by_name["blocks.11.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5)
    assert by_name["patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**13)


def test_sincos_position_embedding_is_not_optimised():
    model = make(pos_embed="sincos")
    opt = _optimizer(model)["optimizer"]
    names = {n for group in _names_by_group(model, opt) for n in group}
    assert "pos_embed" not in names and "cls_token" in names


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110, 0.01)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.01)
    sched = _optimizer(make(warmup_epochs=1), max_epochs=10, steps=100)["lr_scheduler"]
    assert sched["interval"] == "step"


def test_binary_metrics_match_definitions():
    metrics = build_metrics("binary", 2, prefix="val/")
    probs = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.1, 0.2])
    target = torch.tensor([1, 1, 1, 0, 0, 0])
    metrics.update(probs, target)
    out = {k: float(v) for k, v in metrics.compute().items()}
    sens, spec = 2 / 3, 2 / 3
    assert out["val/sens"] == pytest.approx(sens) and out["val/spec"] == pytest.approx(spec)
    assert out["val/bal_acc"] == pytest.approx((sens + spec) / 2)
    assert out["val/acc"] == pytest.approx(4 / 6)
    # AUROC: pairs (pos, neg) ranked correctly: 0.9,0.8 beat all; 0.3 beats 0.1, 0.2 -> 8/9
    assert out["val/auroc"] == pytest.approx(8 / 9)
    assert set(out) == {
        f"val/{k}" for k in ("auroc", "acc", "bal_acc", "f1", "sens", "spec", "ece")
    }


def test_multiclass_ordinal_and_multilabel_metric_keys():
    probs = torch.softmax(torch.randn(20, 5), 1)
    target = torch.arange(20) % 5
    ordinal = build_metrics("ordinal", 5, prefix="test/")
    ordinal.update(probs, target)
    out = ordinal.compute()
    assert {"test/qwk", "test/mae", "test/bal_acc"} <= set(out)
    assert float(out["test/mae"]) == pytest.approx(
        (probs.argmax(1) - target).abs().float().mean().item()
    )
    multilabel = build_metrics("multilabel", 3, prefix="val/")
    multilabel.update(torch.rand(10, 3), (torch.rand(10, 3) > 0.5).long())
    assert set(multilabel.compute()) == {
        f"val/{k}" for k in ("auroc", "acc", "bal_acc", "f1", "ece")
    }


def test_features_and_forward_shapes():
    model = make("multiclass", 4)
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 4)
    assert model.features(x).shape == (3, 192)


def test_a_compiled_fit_saves_a_checkpoint_that_loads_uncompiled(tmp_path):
    import lightning as L

    model = make("multiclass", 4, compile=True)
    model.setup("fit")  # where a fit compiles the network (in place)
    assert model.net._compiled_call_impl is not None, "setup('fit') did not compile the network"
    # The checkpoint's keys are the plain network's ("net.*", no "_orig_mod."): test and
    # predict load it into an uncompiled model with strict loading.
    plain_keys = set(make("multiclass", 4).state_dict())
    assert set(model.state_dict()) == plain_keys
    path = tmp_path / "compiled.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    loaded = ViTClassifier.load_from_checkpoint(path, map_location="cpu", pretrained=False)
    assert loaded.net._compiled_call_impl is None  # only a fit compiles
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        # forward() itself bypasses the compiled call: both run the same eager network.
        assert torch.equal(loaded.net.forward(x), model.net.forward(x))
