"""``medvit.explain``: attention capture that leaves fused attention on, map shapes for every
method on 2D and 3D patch grids with prefix tokens, ``medvit explain``, ``predict --explain``,
its errors before any work, and the report's explained gallery."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from medvit.cli import main
from medvit.explain.attention import NoAttentionError, attention_layers, capture_attention
from medvit.explain.explainer import Explainer
from medvit.explain.gallery import pick_cases
from medvit.explain.methods import METHODS
from medvit.models.module import ViTClassifier
from medvit.models.vit import uses_fused_attention

NAMES = ["malignant", "normal, benign"]


def tiny_vit(img_size: int = 28, patch_size: int = 4, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 3, **kwargs}
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, in_chans=1, **kwargs
    ).eval()


class PatchEmbed3d(nn.Module):
    """A stand-in 3D patch embedding: what ``create_vit3d`` gives (a 3-tuple ``grid_size``)."""

    def __init__(self, size: int = 16, patch: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.img_size, self.grid_size = (size,) * 3, (size // patch,) * 3
        self.num_patches = (size // patch) ** 3
        self.proj = nn.Conv3d(1, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def tiny_vit3d(**kwargs) -> nn.Module:
    net = tiny_vit(img_size=64, patch_size=8, **kwargs)  # 8 x 8 = 64 tokens = 4 x 4 x 4
    net.patch_embed = PatchEmbed3d()
    return net.eval()


def test_capture_switches_fused_attention_off_only_inside_and_back_on_exceptions():
    net = tiny_vit()
    assert uses_fused_attention(net)
    with capture_attention(net) as attentions:
        assert not any(layer.fused_attn for layer in attention_layers(net))
        net(torch.randn(2, 1, 28, 28))
    assert uses_fused_attention(net)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 50, 50)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 2, 50))  # softmaxed rows
    with pytest.raises(RuntimeError, match="boom"), capture_attention(net):
        raise RuntimeError("boom")
    assert uses_fused_attention(net)
    for method in METHODS:
        Explainer(net, method)(torch.randn(1, 1, 28, 28))
        assert uses_fused_attention(net)
    # no hook left behind: a plain forward records nothing any more
    assert not any(layer.attn_drop._forward_pre_hooks for layer in attention_layers(net))


def test_captured_attention_is_what_the_fused_path_computes():
    net = tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        fused = net(x)
        with capture_attention(net):
            unfused = net(x)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("img_size", "patch_size", "extra"),
    [
        (28, 4, {}),
        (28, 4, {"reg_tokens": 4}),
        (28, 4, {"class_token": False, "global_pool": "avg"}),
        (224, 16, {}),
        (224, 16, {"reg_tokens": 2}),
        (224, 4, {}),
    ],
)
def test_maps_have_the_input_size_in_0_1(method, img_size, patch_size, extra):
    net = tiny_vit(img_size, patch_size, **extra)
    explanation = Explainer(net, method)(torch.randn(2, 1, img_size, img_size))
    maps = explanation.maps
    assert maps.shape == (2, img_size, img_size)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all()
    assert torch.allclose(maps.amax((1, 2)), torch.ones(2))  # each map scaled to [0, 1]
    assert explanation.logits.shape == (2, 3) and explanation.targets.shape == (2,)


@pytest.mark.parametrize("method", METHODS)
def test_maps_on_a_3d_patch_grid(method):
    net = tiny_vit3d(reg_tokens=1)
    explanation = Explainer(net, method)(torch.randn(2, 1, 16, 16, 16))
    assert explanation.maps.shape == (2, 16, 16, 16)
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1


def test_rollouts_equal_the_full_matrix_products_of_their_papers():
    from medvit.explain.methods import grad_rollout, rollout

    torch.manual_seed(0)
    attns = [torch.rand(2, 3, 6, 6).softmax(-1) for _ in range(3)]
    grads = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    eye = torch.eye(6)
    joint, chefer = eye.expand(2, 6, 6), eye.expand(2, 6, 6)
    for a, g in zip(attns, grads, strict=True):
        fused = (a.amax(1) + eye) / 2
        joint = (fused / fused.sum(-1, keepdim=True)) @ joint  # Abnar & Zuidema
        chefer = chefer + (a * g).clamp(min=0).mean(1) @ chefer  # Chefer et al. 2021
    # two prefix tokens (class token, one register); the class token's row over the patches
    torch.testing.assert_close(rollout(attns, 2, "max"), joint[:, 0, 2:])
    torch.testing.assert_close(grad_rollout(attns, grads, 2), chefer[:, 0, 2:])
    # without a class token: the mean of the patch rows
    torch.testing.assert_close(rollout(attns, 0, "max", class_token=False), joint.mean(1))


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("method", METHODS)
def test_maps_of_medvits_3d_vit(method, stem):
    from medvit.models.vit3d import create_vit3d

    torch.manual_seed(0)
    net = create_vit3d(
        num_classes=2, img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, stem=stem
    )
    assert tuple(net.patch_embed.grid_size) == (4, 4, 4)
    maps = Explainer(net.eval(), method)(torch.randn(2, 1, 16, 16, 16)).maps
    assert maps.shape == (2, 16, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    assert uses_fused_attention(net)


def test_prefix_tokens_are_left_out_and_patches_read_row_major():
    # A relevance of one patch token lands on that patch's pixels, whatever the prefix.
    from medvit.explain.methods import to_maps

    rel = torch.zeros(1, 49)
    rel[0, 3 * 7 + 5] = 1  # row 3, column 5 of a 7 x 7 grid
    peak = np.unravel_index(to_maps(rel, (7, 7), (28, 28))[0].argmax(), (28, 28))
    assert 12 <= peak[0] < 16 and 20 <= peak[1] < 24


def test_class_specific_methods_follow_the_target_and_leave_grads_alone():
    net = tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    for method in ("grad_rollout", "gradcam"):
        a = Explainer(net, method)(x, torch.tensor([0, 0])).maps
        b = Explainer(net, method)(x, torch.tensor([2, 2])).maps
        assert not torch.allclose(a, b)
    assert all(p.grad is None for p in net.parameters())
    # rollout is not class-specific
    a = Explainer(net, "rollout")(x, torch.tensor([0, 0])).maps
    torch.testing.assert_close(a, Explainer(net, "rollout")(x, torch.tensor([2, 2])).maps)


def test_refuses_unknown_method_a_cnn_and_wrong_images():
    with pytest.raises(ValueError, match="Unknown explanation method 'lrp'"):
        Explainer(tiny_vit(), "lrp")
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(NoAttentionError, match="no ViT attention layers"):
        Explainer(cnn)
    with pytest.raises(ValueError, match=r"\(3, 28, 28\).*\(1, 28, 28\)"):
        Explainer(tiny_vit())(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(1, 32, 32\)"):
        Explainer(tiny_vit())(torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------------------ commands
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A medvit checkpoint of a tiny grey 28 px BreastMNIST model (untrained)."""
    torch.manual_seed(0)
    model = ViTClassifier(
        num_classes=2, in_chans=1, img_size=28, task="binary", class_names=NAMES, patch_size=7
    )
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "datamodule_hyper_parameters": {"flag": "breastmnist", "size": 28},
        },
        path,
    )
    return path


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    """A PNG, a folder with a PNG and an unreadable file, and an npz test split of 3."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "scans").mkdir()
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "scans/b.png")
    (tmp_path / "scans/broken.png").write_bytes(b"not a png")
    images = rng.integers(0, 255, (3, 28, 28), dtype=np.uint8)
    np.savez(
        tmp_path / "breastmnist.npz", test_images=images, test_labels=np.array([[0], [1], [1]])
    )
    return [str(tmp_path / "a.png"), str(tmp_path / "scans"), f"{tmp_path}/breastmnist.npz:test"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_explain_command_writes_overlays_maps_and_csv(ckpt, inputs, tmp_path):
    out = tmp_path / "explain"
    main(["explain", "--ckpt_path", str(ckpt), *inputs, "-o", str(out), "--method", "rollout"])
    rows = read_rows(out / "explained.csv")
    assert len(rows) == 6
    broken = [r for r in rows if r["source"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["error"].startswith("cannot read image")
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 5 and all((out / r["overlay"]).is_file() for r in ok)
    assert all(r["target"] == r["prediction"] and r["method"] == "rollout" for r in ok)
    assert [r["label_name"] for r in rows[-3:]] == ["malignant", "normal, benign", "normal, benign"]
    with Image.open(out / ok[0]["overlay"]) as picture:
        assert picture.width > 3 * 100  # three panels
    with np.load(out / "maps.npz") as npz:
        maps, sources = npz["maps"], list(npz["source"])
    assert maps.shape == (6, 28, 28) and sources == [r["source"] for r in rows]
    broken_row = sources.index(broken[0]["source"])
    assert np.isnan(maps[broken_row]).all()
    good = np.delete(maps, broken_row, axis=0)
    assert good.min() >= 0 and good.max() <= 1


def test_explain_target_true_and_a_class_name(ckpt, inputs, tmp_path):
    out = tmp_path / "explain"
    main(["explain", "--ckpt_path", str(ckpt), *inputs, "-o", str(out), "--target", "true"])
    rows = read_rows(out / "explained.csv")
    assert [r["target"] for r in rows[-3:]] == ["malignant", "normal, benign", "normal, benign"]
    assert rows[0]["error"] == "no true label to explain"  # a.png has no label
    main(["explain", "--ckpt_path", str(ckpt), *inputs, "-o", str(out), "--target", "malignant"])
    assert {r["target"] for r in read_rows(out / "explained.csv") if not r["error"]} == {
        "malignant"
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "lrp"], "Unknown explanation method 'lrp'"),
        (["--target", "benign"], "Unknown --target 'benign'.*malignant, normal, benign"),
        (["--fusion", "median"], "Unknown head fusion 'median'"),
    ],
)
def test_explain_refuses_bad_requests_before_any_work(
    ckpt, inputs, tmp_path, capsys, options, message
):
    out = tmp_path / "explain"
    with pytest.raises(SystemExit):
        main(["explain", "--ckpt_path", str(ckpt), *inputs, "-o", str(out), *options])
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not out.exists()


def test_explain_refuses_npz_images_of_another_size_or_channels(ckpt, tmp_path, capsys):
    for name, shape in (("rgb.npz", (2, 28, 28, 3)), ("big.npz", (2, 64, 64))):
        np.savez(tmp_path / name, test_images=np.zeros(shape, np.uint8))
        with pytest.raises(SystemExit):
            main(
                [
                    "explain",
                    "--ckpt_path",
                    str(ckpt),
                    str(tmp_path / name),
                    "-o",
                    str(tmp_path / "o"),
                ]
            )
        err = capsys.readouterr().err
        assert f"{shape[1:]} images" in err and "(28, 28) (28 px, 1 channel)" in err
    assert not (tmp_path / "o").exists()


def test_explain_refuses_a_network_without_attention(ckpt, inputs, tmp_path, capsys, monkeypatch):
    import medvit.evaluate.predict as predict_module

    load_model = predict_module.load_model

    def as_cnn(path):
        model, data_hp = load_model(path)
        model.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return model, data_hp

    monkeypatch.setattr(predict_module, "load_model", as_cnn)
    for command in (["explain", "-o", str(tmp_path / "o")], ["predict", "--explain", "o"]):
        with pytest.raises(SystemExit):
            main([*command, "--ckpt_path", str(ckpt), *inputs])
        assert "(Sequential) has no ViT attention layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_explain_writes_the_csv_and_an_overlay_per_input(ckpt, inputs, tmp_path):
    out = tmp_path / "overlays"
    main(
        [
            "predict",
            "--ckpt_path",
            str(ckpt),
            *inputs,
            "-o",
            str(tmp_path / "p.csv"),
            "--explain",
            str(out),
        ]
    )
    predictions = read_rows(tmp_path / "p.csv")
    explained = read_rows(out / "explained.csv")
    assert [r["source"] for r in predictions] == [r["source"] for r in explained]
    assert [r["prediction"] for r in predictions] == [r["prediction"] for r in explained]
    assert len(list(out.glob("*.png"))) == 5  # every readable input


# ------------------------------------------------------------------------------ gallery
def test_pick_cases_per_class_most_confident_correct_and_wrong():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.95, 0.05]])
    target = np.array([0, 0, 0, 1, 1])
    picks = {
        (p["cls"], p["kind"]): (p["row"], p["explain"]) for p in pick_cases(probs, target, "binary")
    }
    assert picks == {
        (0, "correct"): (0, 0),
        (0, "wrong"): (2, 1),
        (1, "correct"): (3, 1),
        (1, "wrong"): (4, 0),
    }
    multi = pick_cases(np.array([[0.9, 0.2], [0.7, 0.6]]), np.array([[1, 0], [0, 0]]), "multilabel")
    assert {(p["cls"], p["kind"], p["row"]) for p in multi} == {
        (0, "correct", 0),
        (0, "wrong", 1),
        (1, "wrong", 1),
    }


@pytest.mark.slow
def test_fit_writes_the_explained_gallery(tmp_path):
    from conftest import short_breast_fit

    from medvit import runs

    run_dir = short_breast_fit(tmp_path)
    gallery = runs.read_gallery(run_dir)["explained"]
    assert 2 <= len(gallery) <= 4  # two classes, a correct and a wrong case each where any
    for entry in gallery:
        assert (run_dir / entry["image"]).is_file() and entry["method"] == "grad_rollout"
        assert entry["kind"] in ("correct", "wrong")
        assert (entry["true"] == entry["predicted"]) == (entry["kind"] == "correct")
    listed = json.loads((run_dir / "gallery" / "explained.json").read_text())
    assert listed["section"] == "explained"


def test_explain_help_imports_no_torch(tmp_path):
    from test_cli_voice import _loaded_heavy_modules

    assert _loaded_heavy_modules(["explain", "--help"], tmp_path) == []


def _gallery_call(tmp_path, net: nn.Module, rank_zero: bool = True):
    """Run ExplainedGallery.on_test_end on a stand-in trainer and module; the run folder."""
    from types import SimpleNamespace

    from medvit.explain.gallery import ExplainedGallery

    dataset = [(torch.randn(1, 28, 28), 0) for _ in range(4)]
    module = SimpleNamespace(
        net=net,
        device=torch.device("cpu"),
        hparams={"task": "binary", "class_names": NAMES},
        test_predictions={
            "index": np.arange(4),
            "probs": np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]),
            "target": np.array([0, 0, 1, 1]),
        },
    )
    trainer = SimpleNamespace(
        is_global_zero=rank_zero,
        test_dataloaders=SimpleNamespace(dataset=dataset),
        datamodule=None,
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
    )
    ExplainedGallery().on_test_end(trainer, module)
    return tmp_path


def test_gallery_skips_a_network_without_attention_with_one_log_line(tmp_path, caplog):
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with caplog.at_level("INFO", logger="medvit.explain.gallery"):
        run_dir = _gallery_call(tmp_path, cnn)
    assert [r.message for r in caplog.records] == [
        "No attention layers in the network: no explained test-case gallery."
    ]
    assert not (run_dir / "gallery").exists()


def test_gallery_is_written_on_rank_zero_only(tmp_path):
    from medvit import runs

    net = tiny_vit(num_classes=2)
    assert not (_gallery_call(tmp_path / "r1", net, rank_zero=False)).exists()
    run_dir = _gallery_call(tmp_path / "r0", net)
    entries = runs.read_gallery(run_dir)["explained"]
    assert {(e["index"], e["kind"]) for e in entries} == {
        (0, "correct"),
        (1, "wrong"),
        (2, "correct"),
        (3, "wrong"),
    }
    assert uses_fused_attention(net)


def test_overlay_of_a_volume_has_a_row_per_mid_slice():
    import io

    from medvit.explain.overlay import overlay_png

    flat = Image.open(
        io.BytesIO(overlay_png(np.random.rand(1, 16, 16), np.random.rand(16, 16), "t"))
    )
    cube = np.random.rand(16, 16, 16)
    volume = Image.open(io.BytesIO(overlay_png(np.random.rand(1, 16, 16, 16), cube, "t")))
    assert volume.width == flat.width and volume.height > 2.5 * flat.height


@pytest.mark.slow
def test_a_3d_fit_writes_the_explained_gallery_of_volumes(synthetic_root, short_trainer, tmp_path):
    from medvit import runs

    root = synthetic_root("adrenalmnist3d", 28, n=(16, 8, 12))
    run_dir = tmp_path / "run"
    main(["fit", "--data.flag=adrenalmnist3d", f"--data.root={root}", f"--run.dir={run_dir}"]
         + short_trainer(1, batch_size=4))  # fmt: skip
    entries = runs.read_gallery(run_dir)["explained"]
    assert entries and all(e["method"] == "grad_rollout" for e in entries)
    with Image.open(run_dir / entries[0]["image"]) as picture:
        assert picture.height > 2 * picture.width / 3  # three rows: axial, coronal, sagittal
