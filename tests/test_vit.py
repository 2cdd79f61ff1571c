"""Tests for medvit.models.vit: sin-cos embeddings, timm ViT construction and local weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv

from medvit.models.vit import POS_EMBEDS, create_vit, sincos_2d_pos_embed, uses_fused_attention

torch.set_num_threads(1)

TINY = "vit_tiny_patch16_224"
TINY_DIM = 192


def _reference_pe(pos: int, channel: int, axis_dim: int) -> float:
    """The classic 1D transformer encoding, written out from the formula."""
    i = channel // 2
    angle = pos / 10000 ** (2 * i / axis_dim)
    return math.sin(angle) if channel % 2 == 0 else math.cos(angle)


# --- sincos_2d_pos_embed ---------------------------------------------------------------------


def test_sincos_shape_and_dtype():
    pe = sincos_2d_pos_embed((3, 5), 16)
    assert pe.shape == (15, 16)
    assert pe.dtype == torch.float32


@pytest.mark.parametrize(
    ("row", "col", "channel"),
    [(0, 0, 0), (0, 0, 1), (1, 2, 0), (2, 4, 3), (2, 1, 7), (1, 3, 8), (2, 4, 9), (0, 4, 14)],
)
def test_sincos_matches_formula(row: int, col: int, channel: int):
    height, width, dim = 3, 5, 16
    axis_dim = dim // 2
    pe = sincos_2d_pos_embed((height, width), dim)
    value = pe[row * width + col, channel].item()  # row-major over the grid
    if channel < axis_dim:  # first half: row (y)
        expected = _reference_pe(row, channel, axis_dim)
    else:  # second half: column (x)
        expected = _reference_pe(col, channel - axis_dim, axis_dim)
    assert value == pytest.approx(expected, abs=1e-6)


def test_sincos_halves_depend_on_one_axis_each():
    height, width, dim = 4, 6, 32
    pe = sincos_2d_pos_embed((height, width), dim).reshape(height, width, dim)  # (H, W, dim)
    rows, cols = pe[..., : dim // 2], pe[..., dim // 2 :]
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # constant along columns
    assert torch.equal(cols, cols[:1].expand_as(cols))  # constant along rows
    # ... and they do vary along their own axis
    assert not torch.equal(rows[0], rows[1])
    assert not torch.equal(cols[:, 0], cols[:, 1])


def test_sincos_large_positions_use_low_frequencies():
    pe = sincos_2d_pos_embed((64, 1), 8)
    # channel 2 of the row half has angle pos / 10000^(2/4) = pos / 100
    assert pe[63, 2].item() == pytest.approx(math.sin(0.63), abs=1e-6)


@pytest.mark.parametrize("dim", [6, 10, 0, 190])
def test_sincos_rejects_dim_not_multiple_of_4(dim: int):
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed((2, 2), dim)


# --- create_vit: shapes and position embeddings ----------------------------------------------


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
@pytest.mark.parametrize(
    ("img_size", "patch_size", "in_chans"), [(28, 4, 1), (28, 7, 3), (64, 8, 1)]
)
def test_create_vit_shapes_and_pos_embed_training(
    img_size: int, patch_size: int, in_chans: int, pos_embed: str
):
    torch.manual_seed(0)
    num_classes = 5
    model = create_vit(
        TINY,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=patch_size,
        pos_embed=pos_embed,
    )
    grid = img_size // patch_size
    assert isinstance(model, timm.models.VisionTransformer)
    assert model.patch_embed.grid_size == (grid, grid)
    assert model.patch_embed.proj.in_channels == in_chans
    assert model.pos_embed.shape == (1, grid * grid + 1, TINY_DIM)

    x = torch.randn(2, in_chans, img_size, img_size)
    feats = model.forward_features(x)
    assert feats.shape == (2, grid * grid + model.num_prefix_tokens, TINY_DIM)
    logits = model(x)
    assert logits.shape == (2, num_classes)

    before = model.pos_embed.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5, momentum=0.9, weight_decay=0.1)
    logits.sum().backward()
    opt.step()
    if pos_embed == "sincos":
        assert isinstance(model.pos_embed, torch.nn.Parameter)
        assert not model.pos_embed.requires_grad
        assert model.pos_embed.grad is None
        assert torch.equal(model.pos_embed, before)
        assert torch.equal(before[0, 0], torch.zeros(TINY_DIM))  # cls slot
        assert torch.equal(before[0, 1:], sincos_2d_pos_embed((grid, grid), TINY_DIM))
    else:
        assert model.pos_embed.requires_grad
        assert model.pos_embed.grad is not None
        assert not torch.equal(model.pos_embed, before)


def test_sincos_with_no_embed_class_and_registers():
    model = create_vit(
        TINY,
        num_classes=2,
        in_chans=1,
        img_size=16,
        patch_size=4,
        pos_embed="sincos",
        no_embed_class=True,
        reg_tokens=2,
        depth=1,
    )
    # no_embed_class: pos_embed covers patches only, prefix tokens are concatenated after
    assert model.pos_embed.shape == (1, 16, TINY_DIM)
    assert torch.equal(model.pos_embed[0], sincos_2d_pos_embed((4, 4), TINY_DIM))
    assert model.forward_features(torch.randn(1, 1, 16, 16)).shape == (1, 16 + 3, TINY_DIM)


def test_state_dict_keys_do_not_depend_on_pos_embed():
    kwargs = dict(num_classes=2, in_chans=1, img_size=16, patch_size=4, depth=1)
    learn = create_vit(TINY, pos_embed="learn", **kwargs)
    sincos = create_vit(TINY, pos_embed="sincos", **kwargs)
    assert learn.state_dict().keys() == sincos.state_dict().keys()
    learn.load_state_dict(sincos.state_dict())


def test_drop_rates_reach_timm():
    model = create_vit(TINY, num_classes=2, img_size=32, drop_rate=0.3, drop_path_rate=0.2)
    assert model.head_drop.p == 0.3
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


# --- fused attention -------------------------------------------------------------------------


def test_fused_attention_on_by_default():
    model = create_vit(TINY, num_classes=2, img_size=32, depth=2)
    assert uses_fused_attention(model)
    model.blocks[1].attn.fused_attn = False
    assert not uses_fused_attention(model)
    assert not uses_fused_attention(torch.nn.Linear(2, 2))


def test_warns_when_timm_disables_fused_attention(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("timm.layers.config._USE_FUSED_ATTN", 0)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention") as record:
        model = create_vit(TINY, num_classes=2, img_size=32, depth=1)
    assert not uses_fused_attention(model)
    # Attributed to the caller's line, not to medvit's internals.
    assert Path(record[0].filename) == Path(__file__)


# --- local pretrained weights ----------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A seeded vit_tiny (224 px, patch 16, 3 channels, 1000 classes) saved in three forms."""
    torch.manual_seed(1234)
    model = timm.create_model(TINY, num_classes=1000).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("weights")
    files = {
        "safetensors": root / "vit_tiny.safetensors",
        "pth": root / "vit_tiny.pth",
        "wrapped_pth": root / "vit_tiny_wrapped.pth",
    }
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["pth"])
    torch.save({"state_dict": state, "epoch": 3}, files["wrapped_pth"])
    return {"model": model, "state": state, "files": files}


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "wrapped_pth"])
def test_pretrained_file_is_adapted_by_timm(source: dict, fmt: str):
    state = source["state"]
    torch.manual_seed(0)
    model = create_vit(
        TINY, num_classes=2, in_chans=1, img_size=28, patch_size=4, pretrained=source["files"][fmt]
    )
    loaded = model.state_dict()

    # transformer body is copied verbatim
    body = [k for k in state if k.startswith(("blocks.", "norm.")) or k == "cls_token"]
    assert len(body) > 100
    for key in body:
        assert torch.equal(loaded[key], state[key]), key

    # head: the 1000-way classifier is dropped and a fresh 2-way one initialised
    assert model.head.weight.shape == (2, TINY_DIM)
    assert not torch.equal(model.head.weight, state["head.weight"][:2])
    assert torch.equal(model.head.bias, torch.zeros(2))

    # position embedding: 14x14 grid (+cls) resampled by timm to 7x7 (+cls)
    expected_pos = resample_abs_pos_embed(
        state["pos_embed"], new_size=(7, 7), old_size=(14, 14), num_prefix_tokens=1
    )
    assert model.pos_embed.shape == (1, 50, TINY_DIM)
    assert torch.equal(model.pos_embed.detach(), expected_pos)
    assert torch.equal(model.pos_embed[0, 0], state["pos_embed"][0, 0])  # cls slot untouched

    # patch embedding: kernel 16 -> 4 resampled, then 3 -> 1 channels summed by timm
    kernel = resample_patch_embed(state["patch_embed.proj.weight"], (4, 4))  # (D, 3, 4, 4)
    expected_proj = adapt_input_conv(1, kernel, base_chans=3)  # (D, 1, 4, 4)
    assert model.patch_embed.proj.weight.shape == (TINY_DIM, 1, 4, 4)
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), expected_proj)
    torch.testing.assert_close(expected_proj, kernel.sum(dim=1, keepdim=True))
    assert torch.equal(model.patch_embed.proj.bias, state["patch_embed.proj.bias"])

    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 2)


def test_pretrained_same_architecture_reproduces_outputs(source: dict):
    model = create_vit(
        TINY, num_classes=1000, in_chans=3, img_size=224, pretrained=source["files"]["safetensors"]
    ).eval()
    for key, value in source["state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), source["model"](x))


def test_pretrained_with_sincos_keeps_body_and_fixes_pos_embed(source: dict):
    model = create_vit(
        TINY,
        num_classes=2,
        in_chans=1,
        img_size=28,
        patch_size=4,
        pos_embed="sincos",
        pretrained=str(source["files"]["safetensors"]),
        replace_pretrained_pos_embed=True,
    )
    assert torch.equal(model.blocks[0].attn.qkv.weight, source["state"]["blocks.0.attn.qkv.weight"])
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 1:], sincos_2d_pos_embed((7, 7), TINY_DIM))


def test_sincos_over_pretrained_weights_is_refused_unless_asked_for(source: dict):
    with pytest.raises(ValueError, match="would overwrite the pretrained position embedding"):
        create_vit(
            TINY,
            num_classes=2,
            img_size=28,
            patch_size=4,
            pos_embed="sincos",
            pretrained=source["files"]["safetensors"],
        )


def test_load_summary_names_loaded_adapted_and_new_tensors(source: dict, capsys):
    model = create_vit(
        TINY,
        num_classes=2,
        in_chans=1,
        img_size=28,
        patch_size=4,
        pretrained=source["files"]["pth"],
    )
    summary = model.pretrained_summary
    state = source["state"]
    assert summary["source"] == str(source["files"]["pth"])
    assert set(summary["adapted"]) == {"pos_embed", "patch_embed.proj.weight"}
    assert "14x14 to a 7x7 patch grid" in summary["adapted"]["pos_embed"]
    assert summary["adapted"]["patch_embed.proj.weight"] == (
        "(192, 3, 16, 16) -> (192, 1, 4, 4): kernel resampled 16x16 -> 4x4, input channels 3 -> 1"
    )
    assert summary["new"] == ["head.weight", "head.bias"]  # 1000 classes -> 2
    assert summary["unused"] == ["head.weight", "head.bias"]
    # Everything else came over unchanged, and the three lists cover the model exactly once.
    assert len(summary["loaded"]) == len(state) - 4
    keys = summary["loaded"] + list(summary["adapted"]) + summary["new"]
    assert sorted(keys) == sorted(model.state_dict())
    printed = capsys.readouterr().out
    assert f"{len(state) - 4} tensors loaded as they are, 2 adapted, 2 newly initialised" in printed
    assert "adapted pos_embed: (1, 197, 192) -> (1, 50, 192)" in printed


def test_finetune_config_over_the_recipe_keeps_the_pretrained_pos_embed(
    source: dict, synthetic_root, short_trainer, tmp_path: Path
):
    """The README's combination: the recipe's sincos must not overwrite pretrained weights."""
    from medvit.cli import MedViTCLI

    root = synthetic_root("breastmnist", n=(8, 4, 4))
    repo = Path(__file__).resolve().parents[1]
    cli = MedViTCLI(
        args=[
            "-c",
            str(repo / "configs" / "experiment" / "breastmnist.yaml"),
            "--model",
            str(repo / "configs" / "model" / "vit_small_in21k_finetune.yaml"),
            f"--model.model_name={TINY}",  # the file's architecture (a small file for the test)
            f"--model.pretrained={source['files']['safetensors']}",
            f"--data.root={root}",
            "--data.img_size=32",
            f"--run.root={tmp_path / 'runs'}",
            *short_trainer(1, train_batches=1, val_batches=1, batch_size=None, patch_size=None),
        ],
        run=False,
    )
    net = cli.model.net
    expected = resample_abs_pos_embed(
        source["state"]["pos_embed"], new_size=(2, 2), old_size=(14, 14), num_prefix_tokens=1
    )
    assert torch.equal(net.pos_embed.detach(), expected) and net.pos_embed.requires_grad
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    meta = json.loads((Path(cli.trainer.log_dir) / "meta.json").read_text())
    assert set(meta["pretrained_weights"]["adapted"]) == {"pos_embed", "patch_embed.proj.weight"}


def test_own_checkpoint_keeps_matching_head(tmp_path: Path):
    """A file from an earlier 1-channel 3-class run reloads completely, head included."""
    config = dict(num_classes=3, in_chans=1, img_size=28, patch_size=4, depth=2)
    torch.manual_seed(0)
    trained = create_vit(TINY, **config).eval()
    path = tmp_path / "run.pth"
    torch.save({"model": trained.state_dict()}, path)

    torch.manual_seed(1)
    same = create_vit(TINY, pretrained=path, **config).eval()
    for key, value in trained.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(same(x), trained(x))

    other_head = create_vit(TINY, pretrained=path, **(config | dict(num_classes=2)))
    assert other_head.head.weight.shape == (2, TINY_DIM)
    assert torch.equal(other_head.blocks[1].mlp.fc2.weight, trained.blocks[1].mlp.fc2.weight)


def test_one_channel_file_into_three_channel_model(tmp_path: Path):
    source = create_vit(TINY, num_classes=2, in_chans=1, img_size=28, patch_size=4, depth=1)
    path = tmp_path / "gray.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_vit(
        TINY, num_classes=2, in_chans=3, img_size=28, patch_size=4, depth=1, pretrained=path
    )
    gray = source.patch_embed.proj.weight.detach()  # (D, 1, 4, 4)
    expected = adapt_input_conv(3, gray, base_chans=1)  # (D, 3, 4, 4)
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), expected)
    torch.testing.assert_close(expected, gray.repeat(1, 3, 1, 1) / 3)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(
        ValueError, match=r"Unknown timm model 'vit_tiny_patch61_224'.*vit_tiny_patch16_224"
    ):
        create_vit("vit_tiny_patch61_224", num_classes=2)


def test_non_vit_model_is_rejected():
    with pytest.raises(ValueError, match="'resnet18' is not a timm VisionTransformer.*ResNet"):
        create_vit("resnet18", num_classes=2)


def test_img_size_not_divisible_by_patch():
    with pytest.raises(
        ValueError, match=r"img_size 30 is not divisible by the patch size 4: .*7x7"
    ):
        create_vit(TINY, num_classes=2, img_size=30, patch_size=4)


def test_img_size_not_divisible_by_default_patch():
    with pytest.raises(ValueError, match=r"img_size 28 .* patch size 16.*1x1"):
        create_vit(TINY, num_classes=2, img_size=28)


def test_missing_weight_file(tmp_path: Path):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/weights.safetensors"):
        create_vit(TINY, num_classes=2, img_size=28, patch_size=4, pretrained=missing)


@pytest.mark.parametrize(
    "target", [dict(img_size=224), dict(img_size=28, patch_size=4, in_chans=1)]
)
def test_wrong_architecture_file_names_first_mismatch(tmp_path: Path, target: dict):
    path = tmp_path / "vit_small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", depth=1).state_dict(), str(path))
    pattern = r"vit_small\.safetensors.*'cls_token'.*\(1, 1, 384\).*\(1, 1, 192\)"
    with pytest.raises(ValueError, match=pattern):
        create_vit(TINY, num_classes=2, pretrained=path, **target)


def test_unreadable_file(tmp_path: Path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        create_vit(TINY, num_classes=2, img_size=32, pretrained=path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pos_embed="rope"), "pos_embed must be one of"),
        (dict(num_classes=0), "num_classes must be >= 1"),
        (dict(in_chans=0), "in_chans must be >= 1"),
        (dict(drop_rate=1.0), r"drop_rate must lie in \[0, 1\)"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must lie in \[0, 1\)"),
        (dict(patch_size=0), "patch_size must be >= 1"),
        (dict(pretrained=3), "pretrained must be True, False or a path"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str):
    args = dict(num_classes=2, img_size=32) | kwargs
    with pytest.raises(ValueError, match=match):
        create_vit(TINY, **args)


def test_smallest_valid_arguments_are_accepted():
    assert sincos_2d_pos_embed((1, 3), 8).shape == (3, 8)
    assert sincos_2d_pos_embed((3, 1), 8).shape == (3, 8)
    for empty in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="grid_size must be positive"):
            sincos_2d_pos_embed(empty, 8)
    one_pixel = create_vit(TINY, num_classes=2, in_chans=1, img_size=1, patch_size=1, depth=1)
    assert one_pixel.pos_embed.shape == (1, 2, TINY_DIM)
    model = create_vit(TINY, num_classes=1, in_chans=1, img_size=4, patch_size=1, depth=1)
    assert model.head.out_features == 1 and model.patch_embed.proj.in_channels == 1
    assert model.pos_embed.shape == (1, 1 + 16, TINY_DIM)


def test_default_input_is_224_px_rgb():
    model = create_vit(TINY, num_classes=2, depth=1)
    assert model.patch_embed.proj.in_channels == 3
    assert tuple(model.patch_embed.img_size) == (224, 224)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_backbone_file_without_a_classifier_loads(tmp_path: Path, num_classes: int):
    config = dict(img_size=28, patch_size=4, depth=1)
    backbone = create_vit(TINY, num_classes=2, **config)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    model = create_vit(TINY, num_classes=num_classes, pretrained=path, **config)
    assert model.head.out_features == num_classes
    assert torch.equal(model.blocks[0].mlp.fc1.weight, backbone.blocks[0].mlp.fc1.weight)


def test_file_without_the_patch_embedding_names_the_missing_key(tmp_path: Path):
    config = dict(num_classes=2, img_size=28, patch_size=4, depth=1)
    state = create_vit(TINY, **config).state_dict()
    del state["patch_embed.proj.weight"]
    path = tmp_path / "no_patch_embed.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing from file: \\['patch_embed.proj.weight'\\]"):
        create_vit(TINY, pretrained=path, **config)


def _save_without(tmp_path: Path, model: torch.nn.Module, *drop: str) -> Path:
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    return path


def test_load_failure_names_the_mismatch_not_the_adapted_input_channels(tmp_path: Path):
    # A 1-channel file for another head with one wrong block shape: timm adapts the input
    # channels and drops the head, so the message must name only the block weight.
    # The file's 8x8 patch grid is resampled to 7x7 by timm's checkpoint filter first.
    config = dict(img_size=28, patch_size=4, depth=1)
    state = create_vit(TINY, num_classes=3, in_chans=1, **(config | dict(img_size=32))).state_dict()
    state["blocks.0.norm1.weight"] = torch.ones(100)
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"first mismatching key 'blocks\.0\.norm1\.weight'"):
        create_vit(TINY, num_classes=2, in_chans=3, pretrained=path, **config)


def test_load_failure_with_a_kept_head_names_its_missing_key(tmp_path: Path):
    config = dict(num_classes=2, img_size=28, patch_size=4, depth=1)
    path = _save_without(tmp_path, create_vit(TINY, **config), "head.bias")
    with pytest.raises(ValueError, match=r"missing from file: \['head\.bias'\],"):
        create_vit(TINY, pretrained=path, **config)


def test_checkpoint_filter_is_looked_up_where_the_model_is_registered():
    from medvit.models.weights import _model_module

    skeleton = create_vit(TINY, num_classes=2, img_size=32, depth=1)
    assert _model_module("deit_tiny_patch16_224", skeleton) == "timm.models.deit"
    assert _model_module(TINY, skeleton) == "timm.models.vision_transformer"


def test_sincos_needs_an_embed_dim_divisible_by_4_up_front():
    config = dict(num_classes=2, img_size=28, patch_size=4, depth=1, embed_dim=198, num_heads=3)
    assert create_vit(TINY, pos_embed="learn", **config).embed_dim == 198
    with pytest.raises(ValueError, match="pos_embed='sincos' needs an embed dim divisible by 4"):
        create_vit(TINY, pos_embed="sincos", **config)


def test_unknown_model_name_suggests_at_most_five_names():
    with pytest.raises(ValueError, match="Did you mean") as err:
        create_vit("vit_base_patch16", num_classes=2)
    names = str(err.value).split("Did you mean: ")[1].split("?")[0].split(", ")
    assert len(names) == 5 and all("vit_" in n for n in names), names


def test_load_failure_names_unexpected_keys(tmp_path: Path):
    config = dict(num_classes=2, img_size=28, patch_size=4, depth=1)
    state = create_vit(TINY, **config).state_dict()
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing from file: \[\], unexpected in file: \['extra"):
        create_vit(TINY, pretrained=path, **config)


def test_a_file_missing_a_body_tensor_is_refused_even_when_the_head_is_replaced(tmp_path: Path):
    source = create_vit(TINY, num_classes=3, in_chans=1, img_size=28, patch_size=4, depth=1)
    state = {k: v for k, v in source.state_dict().items() if k != "blocks.0.norm1.weight"}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*blocks\.0\.norm1\.weight"):
        create_vit(
            TINY, num_classes=2, in_chans=1, img_size=28, patch_size=4, depth=1, pretrained=path
        )
