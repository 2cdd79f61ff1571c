"""A 3D Vision Transformer for volumes: timm's ViT with a 3D patch embedding.

Why timm's blocks with our own 3D embedding rather than MONAI's ``ViT(spatial_dims=3)``:

- Everything past the embedding is the same timm ``VisionTransformer`` the 2D path trains:
  its blocks and fused attention, ``forward_features``/``forward_head``, head, pooling options,
  weight init, ``no_weight_decay`` and ``group_matcher`` (so AdamW's exclusions and layer-wise
  decay find ``pos_embed``, ``cls_token`` and the patch embedding by name), and every timm model
  name (``vit_tiny_patch16_224``, ``vit_small_patch16_224.augreg_in21k``...) chooses the width
  and depth. Explanations, distillation and export code that handles a timm ViT in 2D
  handles this one: only ``patch_embed.grid_size`` has a third entry.
- A 2D timm checkpoint maps onto it key for key, so starting from ImageNet weights is an I3D
  inflation of one kernel and one position table (:func:`inflate_state_dict`); MONAI's ViT
  names and shapes its tensors differently and has no pretrained 2D weights to start from.
- MONAI's ``ViT(classification=True)`` ends its classification head with ``nn.Tanh`` by
  default (``post_activation="Tanh"``): logits squeezed into (-1, 1) make cross-entropy unable
  to reach confident probabilities (at most e^2 / (e^2 + 1) = 0.88 for two classes) and break
  the temperature scaling and thresholds medvit fits on logits. Here the head is timm's plain
  linear layer, as in 2D.

The patch embedding (:class:`PatchEmbed3D`) is a ``Conv3d`` with kernel = stride = patch, passed
to timm as ``embed_layer``; tokens run over the patch grid (depth, height, width) in row-major
order. The patch follows the cube's side unless given (:func:`default_patch_size_3d`: 4 for
28^3, 8 for 64^3).
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import VisionTransformer, adapt_input_conv
from torch import nn

from medvit.models.vit import check_vit_args, warn_if_unfused
from medvit.models.weights import (
    attach_load_summary,
    cfg_names,
    read_state_dict,
    resolve_weights_file,
)

STEMS = ("patch", "conv")

__all__ = [
    "PatchEmbed3D",
    "create_vit3d",
    "default_patch_size_3d",
    "inflate_patch_weight",
    "inflate_state_dict",
    "sincos_3d_pos_embed",
]


def default_patch_size_3d(img_size: int) -> int:
    """The patch of a cube of side ``img_size``: the smallest of 4, 8, 16 (then the side)
    that divides it and leaves at most 8 patches per axis (<= 512 tokens): 4 for 28, 8 for 64."""
    for patch in (4, 8, 16):
        if img_size % patch == 0 and img_size // patch <= 8:
            return patch
    divisors = [p for p in (4, 8, 16) if img_size % p == 0]
    return divisors[-1] if divisors else img_size


def sincos_3d_pos_embed(
    grid_size: tuple[int, int, int], dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding, shape (D*H*W, dim), row-major over the patch grid.

    The 3D extension of :func:`~medvit.models.vit.sincos_2d_pos_embed`: three equal channel
    blocks of ``d`` channels (the largest even ``d <= dim / 3``) encode depth (z), rows (y) and
    columns (x), each with the 1D transformer encoding ``PE(pos, 2i) = sin(pos / T^(2i/d))``,
    ``PE(pos, 2i+1) = cos(pos / T^(2i/d))``. When ``dim`` is not a multiple of 6 the last
    ``dim - 3d`` channels are zero. Every row then has squared norm ``3d / 2``, and the dot
    product of two rows depends only on their offset.

    Args:
        grid_size: Patch grid as (D, H, W).
        dim: Embedding width, >= 6.
        temperature: The base ``T`` of the frequency progression.

    Returns:
        A float32 tensor of shape (D*H*W, dim); row ``(z * H + y) * W + x`` is patch (z, y, x).

    Raises:
        ValueError: If ``dim`` < 6 or the grid is not three positive ints.
    """
    if dim < 6:
        raise ValueError(
            f"3D sin-cos position embedding needs an embedding dim >= 6 (a sin/cos pair per "
            f"axis), got {dim}."
        )
    if len(tuple(grid_size)) != 3:
        raise ValueError(f"grid_size must be three positive ints, got {tuple(grid_size)}.")
    depth, height, width = (int(s) for s in grid_size)
    if min(depth, height, width) < 1:
        raise ValueError(f"grid_size must be three positive ints, got {tuple(grid_size)}.")
    axis_dim = dim // 3 // 2 * 2
    exponent = torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim  # 2i / d
    inv_freq = temperature**-exponent

    def encode(length: int) -> torch.Tensor:
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq
        return torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(length, axis_dim)

    shape = (depth, height, width, axis_dim)
    emb_z = encode(depth)[:, None, None, :].expand(shape)
    emb_y = encode(height)[None, :, None, :].expand(shape)
    emb_x = encode(width)[None, None, :, :].expand(shape)
    pos = torch.cat((emb_z, emb_y, emb_x), dim=-1).reshape(depth * height * width, 3 * axis_dim)
    pos = torch.nn.functional.pad(pos, (0, dim - 3 * axis_dim))  # zero channels, if any
    return pos.to(torch.float32)


class PatchEmbed3D(nn.Module):
    """Volume (B, C, D, H, W) -> patch tokens (B, N, embed_dim), for timm's ``embed_layer``.

    Accepts the keyword arguments timm's ``VisionTransformer`` passes to its embedding; the
    cube side ``img_size`` and ``patch_size`` are ints (or 3-tuples). ``grid_size`` is the
    3-tuple (D', H', W') of patches per axis and ``num_patches`` their product.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 28,
        patch_size: int | tuple[int, int, int] = 4,
        in_chans: int = 1,
        embed_dim: int = 192,
        norm_layer: Any = None,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device: Any = None,
        dtype: Any = None,
        stem: str = "patch",
        **unused: Any,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}.")
        if unused.get("output_fmt") not in (None, "NCHW") or unused.get("strict_img_size") is False:
            raise ValueError("PatchEmbed3D does not support dynamic_img_size; build with it off.")
        if dynamic_img_pad:
            raise ValueError("PatchEmbed3D does not support dynamic_img_pad.")
        self.img_size = _triple(img_size)
        self.patch_size = _triple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        self.num_patches = math.prod(self.grid_size)
        self.in_chans = in_chans
        self.dynamic_img_size = False
        self.stem_type = stem
        if stem == "conv":
            # Early convolutions (Xiao et al. 2021, "Early convolutions help transformers see
            # better"): log2(patch) 3x3x3 stride-2 convolutions reach the patch grid, then a
            # 1x1x1 projection to embed_dim takes the place of the patchify kernel.
            self.stem, stem_out = _conv_stem(in_chans, embed_dim, self.patch_size, device, dtype)
            kernel = 1
        else:
            self.stem, stem_out, kernel = nn.Identity(), in_chans, self.patch_size
        self.proj = nn.Conv3d(
            stem_out,
            embed_dim,
            kernel_size=kernel,
            stride=kernel,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int, int]:
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or tuple(x.shape[1:]) != (self.in_chans, *self.img_size):
            side = "x".join(map(str, self.img_size))
            raise ValueError(
                f"this 3D model takes volumes (B, {self.in_chans}, {side.replace('x', ', ')}), "
                f"got a tensor of shape {tuple(x.shape)}"
                + (": a 2D image needs a 2D model (spatial_dims 2)." if x.ndim == 4 else ".")
            )
        x = self.proj(self.stem(x))  # (B, E, D', H', W')
        x = x.flatten(2).transpose(1, 2)  # (B, D'*H'*W', E), row-major over (z, y, x)
        return self.norm(x)


def _conv_stem(
    in_chans: int, embed_dim: int, patch: tuple[int, int, int], device: Any, dtype: Any
) -> tuple[nn.Sequential, int]:
    """Stride-2 3x3x3 conv + GroupNorm + GELU layers from ``in_chans`` to the patch grid.

    Widths double up to ``embed_dim / 2`` at the last layer (16, 32 for width 64 and patch 4);
    returns the stem and its output width. GroupNorm, not BatchNorm: the output of a sample does not depend on its batch, so DDP
    and one process compute the same thing.
    """
    side = patch[0]
    if len(set(patch)) != 1 or side < 2 or side & (side - 1):
        raise ValueError(
            f"stem='conv' needs a cubic patch that is a power of 2 (2, 4, 8, 16), got {patch}."
        )
    layers = side.bit_length() - 1  # stride-2 steps to reach the patch grid
    widths = [max(8, embed_dim // 2 ** (layers - i)) for i in range(layers)]
    modules: list[nn.Module] = []
    for width in widths:
        modules += [
            nn.Conv3d(
                in_chans, width, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype
            ),
            nn.GroupNorm(min(8, width // 4), width, device=device, dtype=dtype),
            nn.GELU(),
        ]
        in_chans = width
    return nn.Sequential(*modules), in_chans


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected an int or three ints, got {value}.")
    return value  # type: ignore[return-value]


def create_vit3d(
    model_name: str = "vit_tiny_patch16_224",
    *,
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 28,
    patch_size: int | None = None,
    pos_embed: str = "sincos",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool | str | os.PathLike[str] = False,
    replace_pretrained_pos_embed: bool = False,
    stem: str = "patch",
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Build a timm Vision Transformer for (B, in_chans, S, S, S) volumes, S = ``img_size``.

    The arguments are :func:`~medvit.models.vit.create_vit`'s, with these differences:

    Args:
        model_name: a timm ViT; its width, depth and heads are used (its 2D patch size is not).
        patch_size: cube side of a patch; ``None`` follows ``img_size``
            (:func:`default_patch_size_3d`: 4 for 28, 8 for 64).
        pos_embed: ``"learn"`` or ``"sincos"`` (fixed 3D table, :func:`sincos_3d_pos_embed`,
            prefix slots zero, not trained).
        pretrained: ``True``: timm's hub weights of ``model_name`` (2D, needs network); or a local
            ``.safetensors``/``.pth`` state dict of a 2D timm ViT (or of this 3D model). 2D weights
            are inflated (:func:`inflate_state_dict`): the patch kernel is resampled to the patch
            size and repeated over depth / p, the position table is resampled to (H', W') and
            repeated over depth; the head is replaced when its size differs.
        stem: ``"patch"`` (one Conv3d, kernel = stride = patch, as a 2D ViT) or ``"conv"``
            (stride-2 3x3x3 convolutions down to the patch grid, then a 1x1x1 projection: the
            "early convolutions" stem, for training from scratch on small sets).

    Returns:
        The model; with pretrained weights ``model.pretrained_summary`` says what was loaded.

    Raises:
        ValueError: For a bad argument, a side the patch does not divide, or weights that do
            not fit (naming the first mismatching key).
    """
    check_vit_args(
        num_classes, in_chans, img_size, patch_size, pos_embed, drop_rate, drop_path_rate
    )
    patch = default_patch_size_3d(img_size) if patch_size is None else int(patch_size)
    if img_size % patch:
        raise ValueError(
            f"img_size {img_size} is not divisible by the 3D patch size {patch}: the patch grid "
            f"would drop the last {img_size % patch} voxel(s) per axis. "
            f"Pick a patch that divides {img_size} (or --model.patch_size null to follow it)."
        )
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}.")
    if stem == "conv" and pretrained is not False:
        raise ValueError(
            "stem='conv' has no 2D counterpart to inflate from pretrained weights; use "
            "stem='patch' with --model.pretrained, or train the conv stem from scratch."
        )
    weights_file = resolve_weights_file(pretrained)
    if pos_embed == "sincos" and pretrained is not False and not replace_pretrained_pos_embed:
        raise ValueError(
            "pos_embed='sincos' would overwrite the pretrained (inflated) position embedding; "
            "use pos_embed='learn', or replace it on purpose with "
            "replace_pretrained_pos_embed=True."
        )
    kwargs = dict(
        timm_kwargs,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=patch,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        embed_layer=partial(PatchEmbed3D, stem=stem),
        dynamic_img_size=False,  # timm's dynamic path resamples a 2D table
    )
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{model_name!r} is not a timm VisionTransformer; create_vit3d needs one.")
    if pos_embed == "sincos" and model.pos_embed is None:
        raise ValueError(
            f"{model_name!r} has no absolute position embedding to replace with sincos."
        )
    summary = None
    if pretrained is not False:
        if weights_file is None:
            source = timm.create_model(model_name, pretrained=True).state_dict()  # online only
            where = f"timm hub weights of {model_name}"
        else:
            source, where = read_state_dict(weights_file), str(weights_file)
        state, summary = inflate_state_dict(source, model, where)
        model.load_state_dict(state)
        summary["source"] = where
    if pos_embed == "sincos":
        set_sincos_3d_pos_embed(model)
    attach_load_summary(model, summary)
    warn_if_unfused(model)
    return model


def set_sincos_3d_pos_embed(model: VisionTransformer) -> None:
    """Overwrite ``model.pos_embed`` with the fixed 3D sin-cos table (prefix slots 0) and freeze it."""
    grid = tuple(model.patch_embed.grid_size)
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    table = sincos_3d_pos_embed(grid, model.embed_dim)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, num_prefix:] = table.to(model.pos_embed)
    model.pos_embed.requires_grad_(False)


def inflate_patch_weight(weight: torch.Tensor, patch: int, in_chans: int) -> torch.Tensor:
    """I3D inflation of a 2D patch kernel (O, C, p, p) into a 3D one (O, in_chans, q, q, q).

    The kernel is resampled to ``q`` (timm's pseudo-inverse resampling, as for a 2D patch change),
    its input channels adapted (3 -> 1 sums them, as timm does), then repeated over depth and
    divided by ``q``: on a volume that is constant along depth, the 3D convolution then gives
    exactly the 2D convolution of one slice.
    """
    if weight.ndim != 4:
        raise ValueError(
            f"expected a 2D patch kernel (O, C, p, p), got shape {tuple(weight.shape)}."
        )
    if tuple(weight.shape[2:]) != (patch, patch):
        weight = resample_patch_embed(weight, [patch, patch], verbose=False)
    if weight.shape[1] != in_chans:
        weight = adapt_input_conv(in_chans, weight)
    return weight.unsqueeze(2).repeat(1, 1, patch, 1, 1) / patch


def inflate_state_dict(
    source: dict[str, torch.Tensor], model: VisionTransformer, where: str = "the weights"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit a 2D (or 3D) timm ViT state dict to the 3D ``model``.

    Returns ``(state_dict, summary)``: a complete state dict for ``model`` and the
    ``load_summary``-style record (loaded / adapted / new / unused keys).

    Raises:
        ValueError: When a body tensor is missing or has another shape (another architecture).
    """
    target = model.state_dict()
    state, adapted, new, loaded = {}, {}, [], []
    classifiers = cfg_names(model.pretrained_cfg, "classifier") or ("head",)
    embed = model.patch_embed
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    for key, want in target.items():
        value = source.get(key)
        is_head = key.rsplit(".", 1)[0] in classifiers
        if value is None or (is_head and tuple(value.shape) != tuple(want.shape)):
            if not is_head:
                raise ValueError(
                    f"{where} lacks {key!r} of this 3D ViT (or it is not a timm ViT of the same "
                    f"width and depth): it would stay randomly initialised."
                )
            state[key] = want
            new.append(key)
            continue
        old_shape = tuple(value.shape)
        if key == "patch_embed.proj.weight" and value.ndim == 4:
            value = inflate_patch_weight(value, embed.patch_size[0], embed.in_chans)
            adapted[key] = f"{old_shape} -> {tuple(value.shape)}: inflated over depth (I3D)"
        elif key == "pos_embed" and tuple(value.shape) != tuple(want.shape):
            value = _inflate_pos_embed(value, embed.grid_size, prefix)
            grid = "x".join(map(str, embed.grid_size))
            adapted[key] = f"{old_shape} -> {tuple(value.shape)}: resampled and repeated to {grid}"
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"Cannot load {where} into this 3D ViT: {key!r} has shape {old_shape} in the file "
                f"but {tuple(want.shape)} in the model. Was it saved from another architecture?"
            )
        if key not in adapted:
            loaded.append(key)
        state[key] = value.to(want.dtype)
    unused = [k for k in source if k not in target]
    return state, {"loaded": loaded, "adapted": adapted, "new": new, "unused": unused}


def _inflate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int, int], prefix: int
) -> torch.Tensor:
    """(1, prefix + g*g, E) 2D table -> (1, prefix + D'*H'*W', E): resample to (H', W'), repeat
    over depth (every slice gets the in-plane position of the 2D model)."""
    tokens = pos_embed.shape[1] - prefix
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not a square 2D grid.")
    depth, height, width = grid
    plane = resample_abs_pos_embed(
        pos_embed, new_size=[height, width], old_size=[side, side], num_prefix_tokens=prefix
    )
    head, body = plane[:, :prefix], plane[:, prefix:]
    body = (
        body[:, None]
        .expand(1, depth, height * width, body.shape[-1])
        .reshape(1, -1, body.shape[-1])
    )
    return torch.cat((head, body), dim=1)


def is_3d_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True when the patch kernel in ``state`` is 3D."""
    weight = state.get("patch_embed.proj.weight")
    return weight is not None and weight.ndim == 5
