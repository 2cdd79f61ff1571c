"""Vision Transformer construction on top of timm, with fixed sin-cos position embeddings.

Everything architectural comes from ``timm.create_model``; this module validates the
arguments up front (with messages that say what to change) and optionally swaps the learned
position embedding for a fixed 2D sin-cos table. Weight files go through
:mod:`medvit.models.weights` (timm's own loader, so position-embedding resampling,
patch-embedding resampling, input-channel adaptation and classifier replacement all happen
exactly as timm does them).
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from typing import Any, Literal, get_args

import timm
import torch
from timm.models import VisionTransformer

from medvit.models.weights import (
    attach_load_summary,
    create_with_weights,
    resolve_weights_file,
)

__all__ = [
    "POS_EMBEDS",
    "create_vit",
    "sincos_2d_pos_embed",
    "uses_fused_attention",
]

_logger = logging.getLogger(__name__)

#: How the position embedding is made (``create_vit(pos_embed=...)``).
PosEmbed = Literal["learn", "sincos"]
POS_EMBEDS: tuple[str, ...] = get_args(PosEmbed)


def sincos_2d_pos_embed(
    grid_size: tuple[int, int], dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding, shape (H*W, dim), row-major over the patch grid.

    Each axis uses the classic 1D transformer encoding with ``d = dim / 2`` channels:
    ``PE(pos, 2i) = sin(pos / T^(2i/d))`` and ``PE(pos, 2i+1) = cos(pos / T^(2i/d))``.
    Channels ``[0, dim/2)`` encode the row (y) index and ``[dim/2, dim)`` the column (x) index.

    Args:
        grid_size: Patch grid as (H, W) = (rows, columns).
        dim: Embedding width; must be divisible by 4 (two axes, each a sin/cos pair).
        temperature: The base ``T`` of the frequency progression.

    Returns:
        A float32 tensor of shape (H*W, dim); row ``r * W + c`` belongs to patch (r, c).

    Raises:
        ValueError: If ``dim`` is not a positive multiple of 4 or the grid is not positive.
    """
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(
            f"sin-cos position embedding needs an embedding dim divisible by 4 "
            f"(half per axis, split into sin/cos pairs), got {dim}."
        )
    height, width = (int(s) for s in grid_size)
    if height < 1 or width < 1:
        raise ValueError(f"grid_size must be positive, got {tuple(grid_size)}.")
    axis_dim = dim // 2
    # float64 so large positions / small frequencies keep full float32 accuracy after the cast.
    exponent = torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim  # 2i / d
    inv_freq = temperature**-exponent  # (d/2,)

    def encode(length: int) -> torch.Tensor:
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # (L, d/2)
        # stack+reshape interleaves so that channel 2i is sin and 2i+1 is cos of the same angle
        return torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(length, axis_dim)  # (L, d)

    emb_y = encode(height)[:, None, :].expand(height, width, axis_dim)  # (H, W, d)
    emb_x = encode(width)[None, :, :].expand(height, width, axis_dim)  # (H, W, d)
    pos = torch.cat((emb_y, emb_x), dim=-1).reshape(height * width, dim)  # (H*W, dim)
    return pos.to(torch.float32)


def uses_fused_attention(model: torch.nn.Module) -> bool:
    """True if every attention layer in ``model`` runs F.scaled_dot_product_attention."""
    flags = [
        m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)
    ]
    return bool(flags) and all(flags)


def create_vit(
    model_name: str = "vit_tiny_patch16_224",
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 224,
    patch_size: int | None = None,
    pos_embed: PosEmbed = "learn",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool | str | os.PathLike[str] = False,
    replace_pretrained_pos_embed: bool = False,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Build a timm Vision Transformer for ``img_size`` inputs with ``in_chans`` channels.

    Args:
        model_name: A timm model name from the VisionTransformer family, optionally with a
            pretrained tag (``vit_small_patch16_224.augreg_in21k``).
        num_classes: Outputs of the classification head (>= 1).
        in_chans: Input image channels (>= 1).
        img_size: Square input side in pixels; must be divisible by the patch size.
        patch_size: Patch side in pixels; ``None`` keeps the model's own.
        pos_embed: ``"learn"`` keeps timm's learned absolute embedding; ``"sincos"`` replaces it
            with a fixed 2D sin-cos table (prefix-token slots zero) that is not trained.
        drop_rate: Dropout before the classifier head, in [0, 1).
        drop_path_rate: Stochastic-depth rate of the last block, in [0, 1).
        pretrained: ``False`` for random init, ``True`` for timm's default hub weights of
            ``model_name`` (needs network), or a path to a local ``.safetensors``/``.pth``/``.bin``
            state dict (optionally wrapped under ``state_dict``/``model``). Local files go
            through timm's loader, which resamples position and patch embeddings to this grid
            and patch size, adapts input channels (3 -> 1 sums the kernel) and replaces a
            classifier whose size differs from ``num_classes`` (one of equal size is kept).
        replace_pretrained_pos_embed: With ``pretrained`` weights, ``pos_embed="sincos"`` is
            refused, because it would overwrite the pretrained position embedding; set this to
            replace it on purpose.
        **timm_kwargs: Passed unchanged to ``timm.create_model`` (e.g. ``global_pool="avg"``).

    Returns:
        The model, with fused scaled-dot-product attention enabled as timm configures it. With a
        local weight file, ``model.pretrained_summary`` says which tensors were loaded as they
        are, adapted or newly initialised (see ``load_summary``); it is also printed once.

    Raises:
        ValueError: For an unknown or non-ViT model, an invalid argument, an image size that
            the patch size does not divide, or a weight file that cannot fit the architecture.
            A weight file holding pickled objects other than tensors and plain values is
            refused (:class:`~medvit.models.checkpoint.CheckpointError`) before anything reads it.
        FileNotFoundError: If ``pretrained`` names a file that does not exist.
    """
    check_vit_args(
        num_classes, in_chans, img_size, patch_size, pos_embed, drop_rate, drop_path_rate
    )
    weights_file = resolve_weights_file(pretrained)
    if pos_embed == "sincos" and pretrained is not False and not replace_pretrained_pos_embed:
        raise ValueError(
            "pos_embed='sincos' would overwrite the pretrained position embedding with a fixed "
            "table. Keep the pretrained one (resampled to this patch grid) with pos_embed='learn' "
            "(configs/model/vit_small_in21k_finetune.yaml sets it), or replace it on purpose "
            "with replace_pretrained_pos_embed=True."
        )
    check_model_name(model_name)

    build_kwargs: dict[str, Any] = dict(
        timm_kwargs,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if patch_size is not None:
        build_kwargs["patch_size"] = patch_size

    # A meta-device build allocates no storage, so the architecture (ViT family, patch grid,
    # embed dim) is validated before paying for real weights or reading a weight file.
    skeleton = _build_skeleton(model_name, build_kwargs)
    _check_patch_grid(skeleton, img_size)
    if pos_embed == "sincos":
        _check_sincos_fits(model_name, skeleton)

    model, summary = create_with_weights(
        model_name, pretrained, weights_file, skeleton, build_kwargs
    )

    if pos_embed == "sincos":
        _set_sincos_pos_embed(model)
        if summary is not None and "pos_embed" in summary.get("adapted", {}):
            summary["adapted"]["pos_embed"] = "replaced by the fixed sin-cos table (not trained)"
    attach_load_summary(model, summary)
    warn_if_unfused(model)
    return model


def warn_if_unfused(model: torch.nn.Module) -> None:
    """Warn when timm built attention without F.scaled_dot_product_attention."""
    if not uses_fused_attention(model):
        warnings.warn(
            "timm built attention without F.scaled_dot_product_attention (TIMM_FUSED_ATTN=0 or "
            "exportable layer config?); training will be slower and use more memory.",
            stacklevel=3,
        )


def check_vit_args(
    num_classes: int,
    in_chans: int,
    img_size: int,
    patch_size: int | None,
    pos_embed: str,
    drop_rate: float,
    drop_path_rate: float,
) -> None:
    """Reject argument values timm would accept silently or fail on obscurely."""
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}.")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}.")
    if patch_size is not None and patch_size < 1:
        raise ValueError(f"patch_size must be >= 1 or None, got {patch_size}.")
    for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {rate}.")


def check_model_name(model_name: str, family: str = "vit") -> None:
    """Fail in one line, with close names, when timm's registry does not know ``model_name``.

    Args:
        model_name: a timm name, optionally with a pretrained tag.
        family: the wildcard that close names are drawn from (``vit``: ``*vit*``; ``""``: all).
    """
    source, model_id = timm.models.parse_model_name(model_name)
    if source is not None:
        return  # hf-hub: / local-dir: names are resolved by timm itself
    arch, _ = timm.models.split_model_name_tag(model_id)
    if timm.is_model(arch):
        return
    pattern = f"*{family}*" if family else "*"
    close = difflib.get_close_matches(arch, timm.list_models(pattern), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = f"timm.list_models('*{family or 'resnet'}*')"
    raise ValueError(f"Unknown timm model {model_name!r}.{hint} List them with {listing}.")


def _build_skeleton(model_name: str, build_kwargs: dict[str, Any]) -> VisionTransformer:
    """Build ``model_name`` on the meta device and make sure it is a timm VisionTransformer."""
    not_vit = (
        f"{model_name!r} is not a timm VisionTransformer; create_vit supports the "
        f"VisionTransformer family (vit_*, deit_*, vit hybrids), e.g. 'vit_tiny_patch16_224'."
    )
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(model_name, **build_kwargs)
    except Exception:
        # Non-ViT constructors often reject ViT-only kwargs (img_size, patch_size); tell the
        # caller the real problem instead of a TypeError about a keyword.
        with torch.device("meta"):
            bare = timm.create_model(model_name)
        if not isinstance(bare, VisionTransformer):
            raise ValueError(f"{not_vit} Got {type(bare).__name__}.") from None
        raise
    if not isinstance(skeleton, VisionTransformer):
        raise ValueError(f"{not_vit} Got {type(skeleton).__name__}.")
    return skeleton


def _check_patch_grid(skeleton: VisionTransformer, img_size: int) -> None:
    """Require that patches tile the image exactly (timm would crop the remainder silently)."""
    embed = skeleton.patch_embed
    if hasattr(embed, "backbone"):
        # Hybrid embeddings reduce by the CNN stem's stride times their own patch size.
        stride, what = tuple(embed.feat_ratio(as_scalar=False)), "total stride (CNN stem x patch)"
    else:
        stride, what = tuple(embed.patch_size), "patch size"
    if any(img_size % s for s in stride):
        grid = "x".join(str(img_size // s) for s in stride)
        size = stride[0] if stride[0] == stride[1] else "x".join(map(str, stride))
        raise ValueError(
            f"img_size {img_size} is not divisible by the {what} {size}: the patch grid "
            f"would be {grid} and the last {img_size % stride[0]} pixel row(s)/column(s) would "
            f"be dropped. Pick a patch size that divides {img_size} or resize the images."
        )


def _check_sincos_fits(model_name: str, skeleton: VisionTransformer) -> None:
    """Make sure a sin-cos table can replace this model's position embedding."""
    if skeleton.pos_embed is None:
        raise ValueError(
            f"{model_name!r} has no absolute position embedding to replace with sincos."
        )
    if skeleton.embed_dim % 4 != 0:
        raise ValueError(
            f"pos_embed='sincos' needs an embed dim divisible by 4; {model_name!r} has "
            f"{skeleton.embed_dim}."
        )


def _set_sincos_pos_embed(model: VisionTransformer) -> None:
    """Overwrite ``model.pos_embed`` with the fixed sin-cos table and freeze it."""
    grid = tuple(model.patch_embed.grid_size)
    # With no_embed_class the prefix tokens (cls/registers) carry no position slot at all.
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    table = sincos_2d_pos_embed(grid, model.embed_dim)  # (H*W, D)
    expected = (1, num_prefix + table.shape[0], model.embed_dim)
    if tuple(model.pos_embed.shape) != expected:
        raise ValueError(
            f"Unexpected pos_embed shape {tuple(model.pos_embed.shape)} for grid {grid} with "
            f"{num_prefix} prefix slot(s); expected {expected}."
        )
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, num_prefix:] = table.to(model.pos_embed)
    # Kept as an nn.Parameter (not a buffer) so state-dict keys match timm's and the learned variant.
    model.pos_embed.requires_grad_(False)
