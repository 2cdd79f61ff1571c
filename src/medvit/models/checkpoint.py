"""Reading checkpoints and weight files without running code from them.

A ``.ckpt``/``.pth`` file is a pickle, and a pickle can call any Python function while it is
read. Users load checkpoints from colleagues and the internet, so medvit reads every such file
with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors, containers and
plain values only) or as ``.safetensors``. What medvit itself stores in a checkpoint beyond
tensors (hyper-parameters, class names, callback states) is plain data that this loader accepts.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

#: ``ckpt_path`` values Lightning resolves itself (not files).
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class CheckpointError(ValueError):
    """A checkpoint or weight file is missing, unreadable, or holds more than plain data."""


def is_local_file_path(path: str | os.PathLike) -> bool:
    """True for a local path (not a Lightning keyword such as ``last``, nor a URL)."""
    text = str(path)
    return text not in CKPT_KEYWORDS and "://" not in text


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint or weight file as plain data, never running code from it.

    Args:
        path: a ``.ckpt``/``.pth``/``.bin`` file written by ``torch.save``, or a ``.safetensors``
            file.
        map_location: passed to ``torch.load``.
        mmap: memory-map the tensors instead of reading them (cheap checks of big files).

    Returns:
        The loaded object (a dict for every checkpoint medvit or timm writes).

    Raises:
        CheckpointError: one line naming the file when it does not exist, cannot be read, or
            holds pickled objects other than tensors and plain values (which could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as err:
            raise CheckpointError(
                f"cannot read {path} as safetensors ({type(err).__name__}: {_one_line(err)})."
            ) from err
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if mmap and "mmap" in str(err):  # an old (non-zip) torch.save format: no mmap
                return torch.load(path, map_location=map_location, weights_only=True)
            raise
    except pickle.UnpicklingError as err:
        found = re.findall(r"Unsupported globals?:(?: GLOBAL)?\s*([\w.]+)", str(err))
        if not found:
            raise CheckpointError(f"cannot read {path}: {_one_line(err)}") from err
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects "
            f"({', '.join(dict.fromkeys(found))}) that are not tensors or plain values, and "
            "reading them could run code. medvit reads checkpoints with "
            "torch.load(weights_only=True) only; use a checkpoint written by medvit fit, or a "
            ".safetensors file."
        ) from err
    except Exception as err:  # the restricted unpickler ran no code; any failure is a bad file
        raise CheckpointError(
            f"cannot read {path}: not a checkpoint written by torch.save, or truncated "
            f"({type(err).__name__}: {_one_line(err)})."
        ) from err
