"""``medvit export``: a checkpoint as a self-describing ONNX model (fp32 or int8).

:mod:`.metadata` (what the model carries, torch-free), :mod:`.onnx_export` (export, checks,
parity), :mod:`.quantize` (onnxruntime int8 and the test-AUC gate), :mod:`.runtime` (``medvit
predict`` on ``.onnx`` files with onnxruntime, no Lightning) and :mod:`.cli` (the command).
Nothing heavy is imported here, so ``medvit export --help`` stays quick.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """``medvit export``: see :func:`medvit.export.cli.main`."""
    from medvit.export.cli import main as cli_main

    cli_main(argv)
