"""``medvit report``: one self-contained HTML file for run folders and CV folders.

The report reads only the files in the folders, through :mod:`medvit.runs` (``config.yaml``,
``meta.json``, ``metrics.json``, ``metrics.csv``, ``test_predictions.npz``; for CV
``cv_summary.json``, ``cv_config.json``, the fold runs and ``ensemble_test_predictions.npz``),
so it works for runs made on another machine. Figures are embedded as PNG data URIs and the
page loads nothing from the network. Neither it nor the figures import torch.

- :mod:`~medvit.report.loading`: which folders, and reading them;
- :mod:`~medvit.report.run`, :mod:`~medvit.report.cv`, :mod:`~medvit.report.compare`: what the
  page says about a run folder, a CV folder, and several folders side by side;
- :mod:`~medvit.report.tables`: tables, cells, figures, metric names, number printing;
- ``templates/report.html.j2`` (with ``report.css`` and ``report.js``): the page itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined
from tqdm.auto import tqdm

from medvit.cli import exit_with_user_error, show_tracebacks
from medvit.fileio import atomic_write_text
from medvit.report.compare import comparison_section
from medvit.report.cv import cv_section
from medvit.report.loading import expand_parents, load
from medvit.report.run import run_section
from medvit.report.tables import metric_name, slug
from medvit.runs import CVRun

__all__ = [
    "DEFAULT_OUTPUT",
    "build_report",
    "default_output",
    "expand_parents",
    "main",
    "metric_name",
    "write_report",
]

DEFAULT_OUTPUT = "report.html"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("medvit.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    # The embedded JSON (``|tojson``) keeps the key order stable between reports.
    env.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": str}
    return env


def build_report(dirs: Sequence[str | Path], progress: bool | None = None) -> str:
    """The HTML report of run folders and/or CV folders.

    Args:
        dirs: run folders (``metrics.json`` / ``config.yaml``), CV folders (``cv_summary.json``),
            or folders holding such folders (each is compared).
        progress: show a progress bar; default when there are more than two folders.

    Returns:
        A self-contained HTML document.
    """
    items = load(dirs, progress)
    show = len(items) > 2 if progress is None else progress
    kinds = ["cv" if isinstance(item, CVRun) else "run" for item in items]
    anchors = [
        f"{kind}-{i}-{slug(item.label)}"
        for i, (kind, item) in enumerate(zip(kinds, items, strict=True))
    ]
    sections = [
        cv_section(item, anchor) if isinstance(item, CVRun) else run_section(item, anchor)
        for item, anchor in tqdm(
            list(zip(items, anchors, strict=True)),
            desc="plotting",
            disable=not show,
            file=sys.stderr,
        )
    ]
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = {
        "generated": generated,
        "dirs": [
            {
                "label": item.label,
                "kind": kind,
                **({"summary": item.summary} if kind == "cv" else {"metrics": item.metrics}),
            }
            for item, kind in zip(items, kinds, strict=True)
        ],
    }
    title = (
        "medvit report — "
        + ", ".join(item.label for item in items[:3])
        + (" …" if len(items) > 3 else "")
    )
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            generated=generated,
            compare=comparison_section(items, anchors) if len(items) > 1 else None,
            sections=sections,
            data=data,
        )
    )


def default_output(dirs: Sequence[str | Path]) -> Path:
    """``<dir>/report.html`` for one folder, ``./report.html`` for several."""
    return Path(dirs[0]) / DEFAULT_OUTPUT if len(dirs) == 1 else Path(DEFAULT_OUTPUT)


def write_report(
    dirs: Sequence[str | Path], output: str | Path | None = None, progress: bool | None = None
) -> Path:
    """Build the report and write it; returns the output path."""
    out = Path(output) if output is not None else default_output(dirs)
    text = build_report(dirs, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out


def main(argv: list[str] | None = None) -> None:
    """``medvit report DIR [DIR...] [-o report.html]``."""
    parser = argparse.ArgumentParser(
        prog="medvit report",
        description=(
            "Write one self-contained HTML report (plots and data embedded) for run folders and "
            "CV folders; several folders get a side-by-side comparison."
        ),
    )
    parser.add_argument("dirs", nargs="+", help="run folders or CV folders (with cv_summary.json)")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="HTML file (default: <dir>/report.html for one folder, ./report.html for several)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.dirs, args.output, progress=False if args.no_progress else None)
    except ValueError as err:  # a missing or malformed file: a user problem, not a bug
        if show_tracebacks():
            raise
        exit_with_user_error(err)
    size = out.stat().st_size / 1024
    print(f"Wrote {out} ({size:.0f} KiB)", file=sys.stderr)
