"""The network of a run: any timm model, built by one factory.

:func:`create_network` picks the builder from the model's family:

- a timm ``VisionTransformer`` (``vit_*``, ``deit_*``, distilled DeiTs, hybrids) in 2D:
  :func:`medvit.models.vit.create_vit` (patch size, sin-cos position embedding, weight files
  adapted to the patch grid);
- ``spatial_dims=3``: :func:`medvit.models.vit3d.create_vit3d` (a ViT with a 3D patch embedding);
- any other timm model (``resnet18``, ``efficientnet_lite0``, ``convnext_atto``...):
  ``timm.create_model`` with ``num_classes`` and ``in_chans``.

The rule for the ViT-only options with a non-ViT network: ``patch_size`` and ``pos_embed``
describe patch tokens, which a CNN has none of; they are ignored (the module says so once).
Everything else (dropout, stochastic depth where the model has it, local weight files, layer
decay in the optimiser) applies to every family.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.models import VisionTransformer

from medvit.models.vit import check_model_name, create_vit
from medvit.models.weights import attach_load_summary, create_with_weights, resolve_weights_file

__all__ = ["create_network", "is_vit", "check_model_name"]


def is_vit(model_name: str) -> bool:
    """Whether ``model_name`` builds a timm ``VisionTransformer`` (checked on the meta device)."""
    check_model_name(model_name, family="")
    with torch.device("meta"):
        return isinstance(timm.create_model(model_name), VisionTransformer)


def create_network(
    model_name: str,
    *,
    spatial_dims: int = 2,
    num_classes: int,
    in_chans: int,
    img_size: int,
    patch_size: int | None = None,
    pos_embed: str = "learn",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool | str | os.PathLike[str] = False,
    replace_pretrained_pos_embed: bool = False,
    stem: str = "patch",
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """Build ``model_name`` for ``img_size`` inputs with ``in_chans`` channels and ``num_classes``.

    Args:
        model_name: any timm model name, optionally with a pretrained tag.
        spatial_dims: 2 for images, 3 for volumes (ViTs only).
        num_classes: outputs of the classifier.
        in_chans: input channels.
        img_size: input side in pixels (a CNN takes any size; a ViT's patch size must divide it).
        patch_size: ViTs: patch side; ``None`` keeps the model's. Ignored for other networks.
        pos_embed: ViTs: ``learn`` or ``sincos``. Ignored for other networks.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, for models that have it (an error otherwise when > 0).
        pretrained: ``False``, ``True`` (timm hub weights, needs internet) or a local weight file
            (read with ``torch.load(weights_only=True)``; input channels adapted, a classifier
            of another size replaced, any other missing tensor refused).
        replace_pretrained_pos_embed: ViTs: see :func:`medvit.models.vit.create_vit`.
        stem: 3D ViTs: ``patch`` or ``conv`` (see :func:`medvit.models.vit3d.create_vit3d`);
            2D networks take ``patch`` only.
        **timm_kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: an unknown model name, a 3D request for a non-ViT, a model that does not
            take an argument, or a weight file that does not fit.
    """
    check_model_name(model_name, family="")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    vit_args = dict(
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=patch_size,
        pos_embed=pos_embed,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        pretrained=pretrained,
        replace_pretrained_pos_embed=replace_pretrained_pos_embed,
        **timm_kwargs,
    )
    vit = is_vit(model_name)
    if spatial_dims == 3:
        if not vit:
            raise ValueError(
                f"{model_name!r} is not a timm VisionTransformer; 3D volumes need a ViT (e.g. "
                "vit_tiny_patch16_224), whose patch embedding medvit makes 3D."
            )
        # Hook for the 3D builder (models/vit3d.py); imported here so 2D runs never need it.
        from medvit.models.vit3d import create_vit3d

        return create_vit3d(model_name, stem=stem, **vit_args)
    if stem != "patch":
        raise ValueError(
            f"stem={stem!r} is a 3D ViT option (volumes, spatial_dims 3); 2D networks take "
            "stem='patch'."
        )
    if vit:
        return create_vit(model_name, **vit_args)
    return create_timm_model(
        model_name,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        pretrained=pretrained,
        **timm_kwargs,
    )


def create_timm_model(
    model_name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool | str | os.PathLike[str] = False,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """A non-ViT timm model (a CNN, usually) with ``num_classes`` outputs and ``in_chans`` inputs.

    ``img_size`` is passed only to models whose constructor takes it (some transformers do);
    ``drop_path_rate`` only when > 0, so that models without stochastic depth still build.
    """
    check_model_name(model_name, family="")
    weights_file = resolve_weights_file(pretrained)
    kwargs: dict[str, Any] = dict(
        timm_kwargs, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    skeleton = _skeleton(model_name, kwargs, img_size)
    _check_input_size(skeleton, model_name, in_chans, img_size)
    model, summary = create_with_weights(model_name, pretrained, weights_file, skeleton, kwargs)
    attach_load_summary(model, summary)
    return model


def _skeleton(model_name: str, kwargs: dict[str, Any], img_size: int) -> torch.nn.Module:
    """Build on the meta device (no storage) to check the arguments; adds ``img_size`` in place
    to ``kwargs`` when the model takes it."""
    with torch.device("meta"):
        try:
            skeleton = timm.create_model(model_name, img_size=img_size, **kwargs)
            kwargs["img_size"] = img_size
            return skeleton
        except TypeError:
            pass  # most CNNs take any input size and have no img_size argument
        try:
            return timm.create_model(model_name, **kwargs)
        except TypeError as err:
            raise ValueError(
                f"timm model {model_name!r} does not take these arguments "
                f"({', '.join(sorted(kwargs))}): {err}. drop_path_rate needs a model with "
                "stochastic depth (set --model.drop_path_rate 0)."
            ) from None


def _check_input_size(
    skeleton: torch.nn.Module, model_name: str, in_chans: int, img_size: int
) -> None:
    """Run the meta skeleton on one input: a network that shrinks ``img_size`` below a kernel
    (e.g. convnext at 28 px) fails here in one line instead of at the first training step."""
    try:
        with torch.no_grad():
            skeleton.eval()(torch.empty(1, in_chans, img_size, img_size, device="meta"))
    except RuntimeError as err:
        raise ValueError(
            f"timm model {model_name!r} cannot take {img_size} px inputs "
            f"({str(err).splitlines()[0]}); use larger images (--data.size) or another model."
        ) from None
