"""The 3D ViT: 3D sin-cos positions, the Conv3d patch embedding, I3D inflation, training."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import short_trainer_args
from safetensors.torch import save_file

from medvit.models.module import ViTClassifier
from medvit.models.vit3d import (
    create_vit3d,
    default_patch_size_3d,
    inflate_patch_weight,
    sincos_3d_pos_embed,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "experiment" / "adrenalmnist3d.yaml"


# --------------------------------------------------------------------------- 3D sin-cos
@pytest.mark.parametrize("dim", [192, 64])
def test_sincos_3d_shape_norms_and_translation_invariance(dim):
    grid = (3, 4, 5)
    pos = sincos_3d_pos_embed(grid, dim)
    assert pos.shape == (60, dim) and pos.dtype == torch.float32
    axis = dim // 3 // 2 * 2
    # Every row: one sin/cos pair per frequency and axis, so |PE|^2 = 3 * axis / 2.
    assert torch.allclose(pos.norm(dim=1) ** 2, torch.full((60,), 1.5 * axis), atol=1e-4)
    assert (pos[:, 3 * axis :] == 0).all()  # 64 = 3 * 20 + 4 zero channels
    table = pos.view(*grid, dim)
    # The depth block depends on z only, the row block on y only, the column block on x only.
    assert torch.equal(table[:, :1, :1, :axis].expand(3, 4, 5, axis), table[..., :axis])
    assert torch.equal(
        table[:1, :, :1, axis : 2 * axis].expand(3, 4, 5, axis), table[..., axis : 2 * axis]
    )
    assert torch.equal(
        table[:1, :1, :, 2 * axis : 3 * axis].expand(3, 4, 5, axis), table[..., 2 * axis : 3 * axis]
    )
    # Dot products depend only on the offset between patches, and are largest at offset 0.
    gram = pos @ pos.T
    a, b = table[0, 1, 2] @ table[1, 2, 3], table[1, 2, 2] @ table[2, 3, 3]
    assert torch.allclose(a, b, atol=1e-4)
    assert (gram.diagonal()[:, None] >= gram - 1e-4).all()
    off = gram - torch.diag(gram.diagonal())
    assert off.max() < gram.diagonal().min() - 1e-3  # distinct patches are told apart
    with pytest.raises(ValueError, match="dim >= 6"):
        sincos_3d_pos_embed(grid, 4)
    with pytest.raises(ValueError, match="three positive ints"):
        sincos_3d_pos_embed((3, 4), 12)


def test_sincos_3d_gram_is_the_sum_of_cosines_of_offsets():
    # PE(a) . PE(b) = sum over axes and frequencies w of cos(w * (a - b)): sin and cos of one
    # angle are an orthonormal pair, so the table is a sum of three 1D shift-invariant kernels.
    grid, dim = (4, 3, 5), 96
    pos = sincos_3d_pos_embed(grid, dim).double()
    axis = dim // 3
    freqs = 10000.0 ** -(torch.arange(0, axis, 2, dtype=torch.float64) / axis)
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij"), -1
    ).reshape(-1, 3)
    offsets = coords[:, None, :] - coords[None, :, :]  # (N, N, 3)
    expected = torch.cos(offsets[..., None] * freqs).sum(dim=(-1, -2))
    assert torch.allclose(pos @ pos.T, expected, atol=1e-9)


# --------------------------------------------------------------------------------- model
def test_create_vit3d_follows_the_cube_and_meets_the_token_contract():
    assert default_patch_size_3d(28) == 4 and default_patch_size_3d(64) == 8
    model = create_vit3d("test_vit", num_classes=3, in_chans=1, img_size=28)
    assert model.patch_embed.grid_size == (7, 7, 7) and model.num_prefix_tokens == 1
    x = torch.randn(2, 1, 28, 28, 28)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 343, 64)
    assert model.forward_head(tokens).shape == model(x).shape == (2, 3)
    # Fixed table: prefix slot zero, the grid rows the 3D table, not trained.
    assert not model.pos_embed.requires_grad
    assert (model.pos_embed[0, 0] == 0).all()
    assert torch.equal(model.pos_embed[0, 1:], sincos_3d_pos_embed((7, 7, 7), 64))
    big = create_vit3d("test_vit", num_classes=2, img_size=64, pos_embed="learn")
    assert big.patch_embed.grid_size == (8, 8, 8) and big.pos_embed.requires_grad
    with pytest.raises(ValueError, match="not divisible by the 3D patch size 5"):
        create_vit3d("test_vit", num_classes=2, img_size=28, patch_size=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pos_embed="rope"), "pos_embed must be one of"),
        (dict(num_classes=0), "num_classes must be >= 1"),
        (dict(patch_size=0), "patch_size must be >= 1"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must lie in \[0, 1\)"),
    ],
)
def test_the_3d_builder_checks_its_arguments_as_the_2d_one(kwargs, message):
    args = dict(num_classes=2, img_size=28) | kwargs
    with pytest.raises(ValueError, match=message):
        create_vit3d("test_vit", **args)


def test_a_2d_input_to_a_3d_model_is_one_clear_error():
    model = create_vit3d("test_vit", num_classes=2, img_size=28)
    with pytest.raises(ValueError, match=r"takes volumes \(B, 1, 28, 28, 28\).*2D model"):
        model(torch.randn(2, 1, 28, 28))


def test_conv_stem_reaches_the_patch_grid_and_keeps_samples_independent():
    model = create_vit3d("test_vit", num_classes=2, img_size=28, stem="conv").eval()
    embed = model.patch_embed
    assert embed.grid_size == (7, 7, 7) and model.pos_embed.shape == (1, 1 + 343, 64)
    convs = [m for m in embed.stem if isinstance(m, torch.nn.Conv3d)]
    # patch 4: two stride-2 3x3x3 convolutions (28 -> 14 -> 7), widths 16 and 32, then 1x1x1.
    assert [(c.stride, c.kernel_size, c.out_channels) for c in convs] == [
        ((2, 2, 2), (3, 3, 3), 16),
        ((2, 2, 2), (3, 3, 3), 32),
    ]
    assert embed.proj.weight.shape == (64, 32, 1, 1, 1)
    x = torch.randn(3, 1, 28, 28, 28)
    assert embed(x).shape == (3, 343, 64)
    # GroupNorm, not BatchNorm: a volume's logits do not depend on the rest of its batch, which
    # is what keeps DDP (a per-rank batch) equal to one process.
    with torch.no_grad():
        assert torch.allclose(model(x)[1:2], model(x[1:2]), atol=1e-5)
    assert create_vit3d(
        "test_vit", num_classes=2, img_size=64, stem="conv"
    ).patch_embed.grid_size == (
        8,
        8,
        8,
    )
    with pytest.raises(ValueError, match="power of 2"):
        create_vit3d("test_vit", num_classes=2, img_size=28, patch_size=7, stem="conv")
    with pytest.raises(ValueError, match="stem must be one of"):
        create_vit3d("test_vit", num_classes=2, img_size=28, stem="hybrid")


def test_conv_stem_is_refused_with_pretrained_weights_and_for_2d_networks(tmp_path):
    from medvit.models.networks import create_network

    with pytest.raises(ValueError, match="stem='conv' has no 2D counterpart"):
        create_vit3d("test_vit", num_classes=2, img_size=28, stem="conv", pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="3D ViT option"):
        create_network(
            "test_vit", num_classes=2, in_chans=1, img_size=28, patch_size=4, stem="conv"
        )


def test_inflated_conv_on_a_depth_constant_volume_is_the_2d_conv():
    weight = torch.randn(16, 1, 4, 4)
    inflated = inflate_patch_weight(weight, 4, in_chans=1)
    assert inflated.shape == (16, 1, 4, 4, 4)
    image = torch.randn(2, 1, 28, 28)
    volume = image[:, :, None].expand(2, 1, 28, 28, 28)
    out3d = F.conv3d(volume, inflated, stride=4)  # (2, 16, 7, 7, 7)
    out2d = F.conv2d(image, weight, stride=4)  # (2, 16, 7, 7)
    for z in range(7):
        assert torch.allclose(out3d[:, :, z], out2d, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_start_from_a_2d_timm_checkpoint(tmp_path, suffix):
    # A tiny 2D ViT of the same width and depth, 3 channels, 16 px, patch 4, 10 classes.
    torch.manual_seed(0)
    vit2d = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=10)
    path = tmp_path / f"vit2d{suffix}"
    state = {k: v.contiguous() for k, v in vit2d.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = create_vit3d(
        "test_vit",
        num_classes=2,
        img_size=28,
        patch_size=4,
        pretrained=str(path),
        pos_embed="learn",
    )
    summary = model.pretrained_summary
    assert set(summary["adapted"]) == {"patch_embed.proj.weight", "pos_embed"}
    assert set(summary["new"]) == {"head.weight", "head.bias"}
    assert torch.equal(model.blocks[3].attn.qkv.weight, vit2d.blocks[3].attn.qkv.weight)
    # A grey volume constant along depth: each slice's tokens are the 2D model's tokens of that
    # image (its kernel summed over RGB, as timm adapts 3 -> 1 channels).
    image = torch.randn(1, 1, 28, 28)
    proj = vit2d.patch_embed.proj
    with torch.no_grad():
        tokens3d = model.patch_embed(image[:, :, None].expand(1, 1, 28, 28, 28))
        ref = F.conv2d(image, proj.weight.sum(1, keepdim=True), proj.bias, stride=4)
    ref = ref.flatten(2).transpose(1, 2)  # (1, 49, 64)
    assert torch.allclose(tokens3d.view(1, 7, 49, 64), ref[:, None].expand(1, 7, 49, 64), atol=1e-4)
    # The position table: the 2D 4x4 grid resampled to 7x7 and repeated over the 7 slices.
    grid = model.pos_embed[0, 1:].view(7, 49, 64)
    assert torch.equal(grid[0], grid[6]) and torch.equal(
        model.pos_embed[0, 0], vit2d.pos_embed[0, 0]
    )


def test_a_checkpoint_of_another_architecture_names_the_key(tmp_path):
    other = timm.create_model("test_vit3", img_size=16, patch_size=4, num_classes=2)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    with pytest.raises(ValueError, match="lacks|has shape"):
        create_vit3d(
            "test_vit", num_classes=2, img_size=28, pretrained=str(path), pos_embed="learn"
        )


def test_optimiser_still_excludes_positions_and_tokens_from_weight_decay():
    module = ViTClassifier(
        num_classes=2,
        in_chans=1,
        img_size=28,
        task="binary",
        spatial_dims=3,
        model_name="test_vit",
        patch_size=None,
        pos_embed="learn",
        layer_decay=0.75,
    )
    assert module.net.patch_embed.grid_size == (7, 7, 7)
    module.trainer = SimpleNamespace(
        estimated_stepping_batches=10, max_epochs=1, precision_plugin=None, gradient_clip_val=None
    )  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.net.named_parameters()}
    decay_of = {
        names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]
    }
    assert decay_of["pos_embed"] == decay_of["cls_token"] == 0.0
    assert decay_of["patch_embed.proj.weight"] > 0 and decay_of["patch_embed.proj.bias"] == 0.0
    # Layer decay puts the embedding (stem) in the lowest-rate group.
    scale_of = {
        names[id(p)]: g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]
    }
    assert scale_of["pos_embed"] == scale_of["patch_embed.proj.weight"] == min(scale_of.values())
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        ViTClassifier(num_classes=2, in_chans=1, img_size=28, task="binary", spatial_dims=4)


def test_a_2d_checkpoint_is_refused_for_3d_data():
    from medvit.train.cli import checkpoint_data_mismatch

    hp = {"task": "binary", "num_classes": 2, "in_chans": 1, "img_size": 28}
    data = SimpleNamespace(
        task="binary",
        num_classes=2,
        in_chans=1,
        img_size=28,
        spatial_dims=3,
        class_names=["normal", "hyperplasia"],
        hparams={"flag": "adrenalmnist3d"},
    )
    problem = checkpoint_data_mismatch("x.ckpt", {"hyper_parameters": hp}, data)
    assert problem and "model of 2D images but the data are 3D volumes" in problem
    hp["spatial_dims"] = 3
    assert checkpoint_data_mismatch("x.ckpt", {"hyper_parameters": hp}, data) is None


# ------------------------------------------------------------------------ end to end (slow)
def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_fit_the_3d_recipe_on_real_adrenalmnist3d(real_data, tmp_path):
    from medvit.cli import main

    run_dir = tmp_path / "run"
    main(
        [
            "fit",
            "-c",
            str(RECIPE),
            f"--data.root={real_data}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--run.dir={run_dir}",
            *short_trainer_args(
                2, train_batches=3, val_batches=2, patch_size=None, verify_md5=True
            ),
        ]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["test"]["auroc"] <= 1 and metrics["test"]["loss"] > 0
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["spatial_dims"] == 3
    # The recipe's conv stem: 28 -> 14 -> 7 by two stride-2 convolutions, then a 1x1x1 projection.
    state = ckpt["state_dict"]
    assert state["net.patch_embed.stem.0.weight"].shape == (16, 1, 3, 3, 3)
    assert state["net.patch_embed.stem.3.weight"].shape == (32, 16, 3, 3, 3)
    assert state["net.patch_embed.proj.weight"].shape == (64, 32, 1, 1, 1)
    assert state["net.pos_embed"].shape == (1, 1 + 7**3, 64)


@pytest.mark.slow
def test_the_recipe_runs_another_flag_at_64_with_only_the_data_changed(synthetic_root, tmp_path):
    from medvit.cli import main

    root = synthetic_root("organmnist3d", 64, n=(11, 11, 11))
    run_dir = tmp_path / "run"
    main(
        [
            "fit",
            "-c",
            str(RECIPE),
            "--data.flag=organmnist3d",
            "--data.size=64",
            f"--data.root={root}",
            f"--run.dir={run_dir}",
            *short_trainer_args(1, train_batches=2, batch_size=4, patch_size=None),
        ]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "auroc" in metrics["test"]
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    # patch_size null: the patch followed the cube, 8 at 64^3: three stride-2 convolutions of the
    # conv stem (64 -> 32 -> 16 -> 8), an 8x8x8 grid.
    state = ckpt["state_dict"]
    assert state["net.patch_embed.stem.6.weight"].shape == (32, 16, 3, 3, 3)
    assert state["net.pos_embed"].shape == (1, 1 + 8**3, 64)
    assert ckpt["hyper_parameters"]["num_classes"] == 11
