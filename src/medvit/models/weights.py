"""Weights for timm models: local files read safely, adapted by timm's loader, summarised.

One loader serves every builder (2D ViTs, 3D ViTs, any timm network): a local
``.safetensors``/``.pth`` file is read with ``torch.load(weights_only=True)`` first, then goes
through timm's own pretrained loader, so position-embedding and patch-kernel resampling,
input-channel adaptation and classifier replacement happen exactly as timm does them. What the
file gave (tensors loaded as they are, adapted, new, unused) is kept as
``model.pretrained_summary`` and printed once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch

from medvit.models.checkpoint import load_checkpoint

__all__ = [
    "attach_load_summary",
    "cfg_names",
    "create_with_weights",
    "format_load_summary",
    "load_summary",
    "read_state_dict",
    "resolve_weights_file",
]


def resolve_weights_file(pretrained: bool | str | os.PathLike[str]) -> Path | None:
    """Return the local weight file named by ``pretrained``, or None for True/False."""
    if isinstance(pretrained, bool):
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(
            f"pretrained must be True, False or a path to a weight file, got {pretrained!r}."
        )
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Pretrained weight file not found: {str(path)!r}.")
    return path


def read_state_dict(weights_file: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``weights_file``, read by timm's loader, or a ValueError naming it."""
    # The file is read with torch.load(weights_only=True) (or as safetensors) before timm sees
    # it: a pickle that would run code is refused here, whatever timm's own default.
    load_checkpoint(weights_file, mmap=True)
    try:
        return timm.models.load_state_dict(str(weights_file), weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Cannot read weights from {str(weights_file)!r}: not a state dict timm can load "
            f"({type(err).__name__}: {err})."
        ) from err


def create_with_weights(
    model_name: str,
    pretrained: bool | str | os.PathLike[str],
    weights_file: Path | None,
    skeleton: torch.nn.Module,
    build_kwargs: dict[str, Any],
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """``timm.create_model`` without weights, with timm's hub weights, or from ``weights_file``.

    A local file goes through timm's loader (position/patch embeddings and input channels
    adapted, a classifier of another size replaced). Returns the model and what the weights gave
    (:func:`load_summary`; ``None`` without weights).

    Raises:
        ValueError: the file does not fit ``model_name``, or it lacks a tensor besides the head.
    """
    if weights_file is None:
        model = timm.create_model(model_name, pretrained=bool(pretrained), **build_kwargs)
        return model, ({"source": f"timm hub weights of {model_name}"} if pretrained else None)
    file_state = read_state_dict(weights_file)
    overlay = dict(
        _checkpoint_cfg(file_state, skeleton),
        **(build_kwargs.pop("pretrained_cfg_overlay", None) or {}),
        file=str(weights_file),
    )
    drops_head = build_kwargs["num_classes"] != overlay["num_classes"]
    try:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, **build_kwargs
        )
    except Exception as err:
        raise ValueError(
            _describe_load_failure(weights_file, model_name, skeleton, drops_head, err)
        ) from err
    summary = load_summary(file_state, model, drops_head=drops_head)
    summary["source"] = str(weights_file)
    # timm loads non-strictly when it replaces the head: a file missing a body tensor would
    # leave that tensor at its random init without a word. Only the head may be new.
    classifiers = cfg_names(skeleton.pretrained_cfg, "classifier")
    body = [k for k in summary["new"] if k.rsplit(".", 1)[0] not in classifiers]
    if body:
        raise ValueError(
            f"{str(weights_file)!r} lacks {len(body)} tensor(s) of {model_name!r} besides "
            f"the head (first: {body[:3]}); they would stay randomly initialised. Was it "
            "saved from another architecture?"
        )
    return model, summary


def attach_load_summary(model: torch.nn.Module, summary: dict[str, Any] | None) -> None:
    """Keep ``summary`` as ``model.pretrained_summary`` and print it once (rank 0 only)."""
    if summary is None:
        return
    model.pretrained_summary = summary
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        print(format_load_summary(summary))


def load_summary(
    file_state: dict[str, torch.Tensor], model: torch.nn.Module, drops_head: bool
) -> dict[str, Any]:
    """Which of ``model``'s tensors came from ``file_state`` as they are, adapted, or not at all.

    Returns:
        ``{"loaded": [keys], "adapted": {key: how}, "new": [keys], "unused": [file keys]}``:
        adapted tensors changed shape on the way (position embedding resampled to the patch
        grid, patch kernel resampled, input channels summed or repeated); new ones (a replaced
        classifier, tokens the file lacks) are freshly initialised.
    """
    classifiers = cfg_names(model.pretrained_cfg, "classifier")
    loaded, adapted, new = [], {}, []
    for key, param in model.state_dict().items():
        source = file_state.get(key)
        if source is None or (drops_head and key.rsplit(".", 1)[0] in classifiers):
            new.append(key)
        elif tuple(source.shape) != tuple(param.shape):
            adapted[key] = _how_adapted(key, tuple(source.shape), tuple(param.shape), model)
        else:
            loaded.append(key)
    used = set(loaded) | set(adapted)
    unused = [k for k in file_state if k not in used]
    return {"loaded": loaded, "adapted": adapted, "new": new, "unused": unused}


def format_load_summary(summary: dict[str, Any]) -> str:
    """The printed form of ``load_summary`` (one line, plus one per adapted or new tensor)."""
    if "loaded" not in summary:
        return f"Pretrained weights: {summary['source']}."
    lines = [
        f"Pretrained weights from {summary['source']}: {len(summary['loaded'])} tensors loaded "
        f"as they are, {len(summary['adapted'])} adapted, {len(summary['new'])} newly "
        f"initialised, {len(summary['unused'])} in the file unused."
    ]
    lines += [f"  adapted {key}: {how}" for key, how in summary["adapted"].items()]
    if summary["new"]:
        lines.append(f"  newly initialised: {', '.join(summary['new'])}")
    if summary["unused"]:
        lines.append(f"  unused from the file: {', '.join(summary['unused'])}")
    return "\n".join(lines)


def cfg_names(cfg: dict[str, Any], key: str) -> tuple[str, ...]:
    """Module names stored under ``key`` in a timm pretrained cfg (a str or a sequence)."""
    names = cfg.get(key) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _how_adapted(key: str, old: tuple[int, ...], new: tuple[int, ...], model: Any) -> str:
    """A few words on what timm did to one tensor, e.g. ``resampled 14x14 -> 7x7``."""
    change = f"{old} -> {new}"
    if key == "pos_embed":
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        side = int(round((old[1] - prefix) ** 0.5))
        grid = "x".join(map(str, model.patch_embed.grid_size))
        return f"{change}: resampled from a {side}x{side} to a {grid} patch grid"
    if len(old) == 4 and len(new) == 4:
        parts = []
        if old[2:] != new[2:]:
            parts.append(f"kernel resampled {old[2]}x{old[3]} -> {new[2]}x{new[3]}")
        if old[1] != new[1]:
            parts.append(f"input channels {old[1]} -> {new[1]}")
        return f"{change}: " + ", ".join(parts)
    return change


def _checkpoint_cfg(
    state_dict: dict[str, torch.Tensor], skeleton: torch.nn.Module
) -> dict[str, Any]:
    """Pretrained-cfg entries describing the file itself: classifier size and input channels.

    timm decides whether to drop the classifier and how to adapt input channels by comparing
    the target with the *registry* cfg (1000 classes, 3 channels for ImageNet tags). A local
    file, e.g. from an earlier 9-class 1-channel run, would lose its matching head and fail the
    channel adaptation, so timm is told what the file actually holds.
    """
    cfg = skeleton.pretrained_cfg
    heads = [
        state_dict[f"{name}.weight"]
        for name in cfg_names(cfg, "classifier")
        if f"{name}.weight" in state_dict
    ]
    # No classifier in the file (e.g. a num_classes=0 backbone): 0 makes timm load non-strictly.
    source = {"num_classes": int(heads[0].shape[0]) if heads else 0}
    for name in cfg_names(cfg, "first_conv"):
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.ndim == 4:
            # (C, H, W): keep the registry's H, W, timm infers the source patch grid from them
            source["input_size"] = (int(weight.shape[1]), *cfg["input_size"][1:])
            break
    return source


def _describe_load_failure(
    weights_file: Path,
    model_name: str,
    skeleton: torch.nn.Module,
    drops_head: bool,
    err: Exception,
) -> str:
    """Explain why timm could not load ``weights_file``, naming the first mismatching key.

    Replays timm's load on the meta skeleton: the same state-dict reader and the model's own
    checkpoint filter (position/patch embedding resampling), then compares shapes, allowing
    the two adaptations timm applies afterwards (input channels, dropped classifier).
    """
    intro = f"Cannot load weights from {str(weights_file)!r} into {model_name!r}"
    state_dict = timm.models.load_state_dict(str(weights_file), weights_only=True)  # checked
    filter_fn = getattr(
        sys.modules.get(_model_module(model_name, skeleton)), "checkpoint_filter_fn", None
    )
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, skeleton)
        except Exception as filter_err:
            return f"{intro}: timm could not adapt it ({type(filter_err).__name__}: {filter_err})."

    cfg = skeleton.pretrained_cfg
    classifiers = cfg_names(cfg, "classifier")
    first_convs = {f"{name}.weight" for name in cfg_names(cfg, "first_conv")}
    expected = skeleton.state_dict()
    # Model order, not file order: safetensors sorts keys, and the first layer is the clearest hint.
    for key, param in expected.items():
        value = state_dict.get(key)
        if not hasattr(value, "shape") or (drops_head and key.rsplit(".", 1)[0] in classifiers):
            continue
        got, want = tuple(value.shape), tuple(param.shape)
        if key in first_convs and len(got) == len(want) == 4:
            # timm adapts input channels after filtering; only compare the other dims
            got, want = got[:1] + got[2:], want[:1] + want[2:]
        if got != want:
            return (
                f"{intro}: first mismatching key {key!r} has shape {tuple(value.shape)} in the "
                f"file (after timm's resampling) but {tuple(param.shape)} in the model. "
                f"Was the file saved from a different architecture?"
            )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if drops_head:
        missing = [k for k in missing if k.rsplit(".", 1)[0] not in classifiers]
    if missing or unexpected:
        return (
            f"{intro}: keys do not match (missing from file: {missing[:5]}, "
            f"unexpected in file: {unexpected[:5]})."
        )
    return f"{intro}: {type(err).__name__}: {err}"


def _model_module(model_name: str, skeleton: torch.nn.Module) -> str:
    """Module that registers ``model_name`` (its checkpoint filter lives there, e.g. deit)."""
    source, model_id = timm.models.parse_model_name(model_name)
    if source is None:
        arch = timm.models.split_model_name_tag(model_id)[0]
        return timm.models.model_entrypoint(arch).__module__
    return type(skeleton).__module__
