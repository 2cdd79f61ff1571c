"""Which folders a report covers, and reading them (through :mod:`medvit.runs`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from medvit.runs import CVRun, Run, detect


def expand_parents(paths: Sequence[Path]) -> list[Path]:
    """Each path as given, except a folder of run/CV folders, which becomes its sub-folders.

    ``medvit report runs/breastmnist/`` then compares every run of that experiment (sorted by
    name, i.e. by start time). A folder that is neither, and holds none, stays as given, so that
    :func:`medvit.runs.detect` names what is missing.
    """
    out: list[Path] = []
    for path in paths:
        try:
            detect(path)
            out.append(path)
            continue
        except ValueError:
            pass
        children = []
        for child in sorted(path.iterdir()) if path.is_dir() else []:
            try:
                detect(child)
                children.append(child)
            except ValueError:
                continue
        out += children or [path]
    return out


def labels(paths: Sequence[Path]) -> list[str]:
    """Shortest distinct trailing path parts, e.g. ``breastmnist/20250101-120000``."""
    resolved = [p.resolve() for p in paths]
    for depth in range(2, 12):
        names = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in resolved]


def load(dirs: Sequence[str | Path], progress: bool | None = None) -> list[Run | CVRun]:
    """The run and CV folders of ``dirs`` (parents expanded), read now.

    Every folder is checked before any is read, so a wrong path fails at once; a broken file
    is a ValueError naming it.

    Args:
        dirs: run folders, CV folders, or folders holding such folders.
        progress: show a progress bar; default when there are more than two folders.
    """
    if not dirs:
        raise ValueError("No folders given.")
    paths = expand_parents([Path(d) for d in dirs])
    kinds = [detect(p) for p in paths]  # fail before any slow work
    show = len(paths) > 2 if progress is None else progress
    items: list[Run | CVRun] = []
    for path, kind, label in tqdm(
        list(zip(paths, kinds, labels(paths), strict=True)),
        desc="reading",
        disable=not show,
        file=sys.stderr,
    ):
        items.append(CVRun.load(path, label) if kind == "cv" else Run.load(path, label))
    return items
