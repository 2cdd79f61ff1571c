"""``medvit explain --ckpt_path CKPT INPUT... -o DIR [--method M] [--target T]``."""

from __future__ import annotations

import argparse

from medvit.explain import HEAD_FUSIONS, METHODS


def parser() -> argparse.ArgumentParser:
    """The command line (no torch imported)."""
    p = argparse.ArgumentParser(
        prog="medvit explain",
        description=(
            "Where did the model look? Heat maps of a checkpoint's predictions for images, "
            "DICOM/NIfTI files, folders, CSV/TSV listings or an npz split: an overlay PNG per "
            "input, the raw maps (maps.npz) and explained.csv."
        ),
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by medvit fit")
    p.add_argument(
        "inputs", nargs="+", help="as medvit predict's (files, folders, file.npz[:split])"
    )
    p.add_argument("-o", "--output", required=True, help="folder for overlays, maps and CSV")
    p.add_argument(
        "--method",
        default="grad_rollout",
        help=f"one of {', '.join(METHODS)} (default: grad_rollout, class-specific)",
    )
    p.add_argument(
        "--target",
        default="predicted",
        help="the class the map is for: predicted (default), true (labelled inputs), or a "
        "class name",
    )
    p.add_argument(
        "--fusion", default="mean", help=f"rollout's head fusion: {', '.join(HEAD_FUSIONS)}"
    )
    p.add_argument(
        "--discard_ratio",
        type=float,
        default=0.9,
        help="rollout: fraction of each layer's weakest attention dropped (default 0.9)",
    )
    p.add_argument(
        "--window",
        default=None,
        metavar="CENTER,WIDTH",
        help="DICOM/NIfTI window in the file's units, as medvit predict's",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--force", action="store_true", help="explain npz inputs of another dataset anyway"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``medvit explain``."""
    p = parser()
    args = p.parse_args(argv)
    window = None
    if args.window is not None:
        try:
            window = tuple(float(v) for v in args.window.split(","))
        except ValueError:
            window = ()
        if len(window) != 2:
            p.error(f"--window: expected CENTER,WIDTH (e.g. 40,400), got {args.window!r}")
    try:
        from medvit.explain.run import explain

        explain(
            args.ckpt_path,
            args.inputs,
            args.output,
            method=args.method,
            target=args.target,
            batch_size=args.batch_size,
            device=args.device,
            force=args.force,
            window=window,
            fusion=args.fusion,
            discard_ratio=args.discard_ratio,
        )
    except ValueError as err:  # CheckpointError and NoAttentionError included: user problems
        from medvit.cli import exit_with_user_error, show_tracebacks

        if show_tracebacks():
            raise
        exit_with_user_error(err)
