"""What can be wrong with a data source, and the checks that find it (no decoding, no torch).

:func:`validate` collects every problem of a :class:`~medvit.data.sources.Table`; :func:`check`
raises them as one :class:`DataSourceError`, each kind with its first 20 paths and a count.
"""

from __future__ import annotations

import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medvit.data.sources import Table

__all__ = [
    "MAX_LISTED",
    "DataSourceError",
    "Problem",
    "abs_path",
    "bad_files",
    "check",
    "drop",
    "row_problem",
    "show_path",
    "validate",
]

#: Paths listed per problem kind; the count always gives the full number.
MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One kind of problem in a data source, with everything it concerns.

    Attributes:
        kind: what is wrong, plural (``"missing files"``, ``"unknown labels"``, ...).
        items: what to show, one entry per path (or class, column, patient), as the user wrote it.
        hint: one clause on why or what to do, shown after the kind.
        paths: absolute paths of the table rows concerned (what :func:`drop` takes).
        skippable: a bad file that ``on_bad_file=skip`` may leave out; other problems always stop.
    """

    kind: str
    items: tuple[str, ...]
    hint: str = ""
    paths: tuple[Path, ...] = ()
    skippable: bool = False

    def __str__(self) -> str:
        n = len(self.items)
        shown = ", ".join(self.items[:MAX_LISTED])
        more = f", first {MAX_LISTED} shown" if n > MAX_LISTED else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.kind}{hint} [{n}{more}]: {shown}"


class DataSourceError(ValueError):
    """Everything wrong with a data source, one line per kind of problem."""

    def __init__(self, source: Path | str, problems: Sequence[Problem]) -> None:
        self.source = Path(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} in the data:\n{lines}")


def show_path(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def abs_path(path: Path | str) -> Path:
    # normpath, not resolve(): "a/../b.png" and "./b.png" compare equal, symlinks stay as given.
    return Path(os.path.normpath(os.path.abspath(path)))


def row_problem(
    kind: str, paths: Sequence[Path], root: Path, hint: str = "", values: Sequence[str] = ()
) -> Problem:
    items = [show_path(p, root) for p in paths]
    if values:
        items = [f"{i} ({v})" for i, v in zip(items, values, strict=True)]
    return Problem(kind, tuple(items), hint, tuple(paths))


def validate(table: Table) -> list[Problem]:
    """Every problem of ``table``: its unparsable rows, then what a stat of each file finds.

    Kinds: missing files (or not a regular file; for volumes a folder is a DICOM series), empty (0-byte) files, duplicate paths, empty
    classes (a class, or finding, with no sample among the rows kept), fewer than 2 classes, no
    samples, patients whose rows have conflicting explicit splits. Files are not decoded; the
    paths of rows left out while parsing are stat'ed too, so one error lists everything.
    """
    problems = list(table.problems)
    missing, empty = [], []
    left_out = [p for prob in table.problems if not prob.skippable for p in prob.paths]
    flagged = set(left_out)
    for p in dict.fromkeys([*table.paths, *left_out]):
        try:
            st = os.stat(p)
        except OSError:
            missing.append(p)
            continue
        if stat.S_ISDIR(st.st_mode) and (table.spatial_dims == 3 or p in flagged):
            continue  # a DICOM series folder (its decoding checks it), or already reported
        if not stat.S_ISREG(st.st_mode):
            missing.append(p)
        elif st.st_size == 0:
            empty.append(p)
    root = table.root
    if missing:
        hint = "not found, or not a regular file"
        problems.append(replace(row_problem("missing files", missing, root, hint), skippable=True))
    if empty:
        problems.append(replace(row_problem("empty files", empty, root, "0 bytes"), skippable=True))
    counts = Counter(table.paths)
    dups = [p for p in dict.fromkeys(table.paths) if counts[p] > 1]
    if dups:
        problems.append(
            row_problem("duplicate paths", dups, root, "listed twice or more",
                         [f"{counts[p]} rows" for p in dups])
        )  # fmt: skip
    if not len(table):
        problems.append(Problem("no samples", (str(table.source or root),)))
    elif table.task != "multilabel" and len(table.class_names) < 2:
        problems.append(Problem("too few classes", tuple(table.class_names), "need at least 2"))
    if len(table):
        labels = np.asarray(table.labels)
        if table.task == "multilabel":
            per_class = (labels != 0).sum(0)
        else:
            per_class = np.bincount(labels, minlength=len(table.class_names))
        hollow = tuple(n for n, c in zip(table.class_names, per_class, strict=False) if c == 0)
        if hollow:
            problems.append(Problem("empty classes", hollow, "no usable sample has them"))
    if table.splits is not None and table.patient_ids is not None:
        seen: dict[str, set[str]] = defaultdict(set)
        for pid, split in zip(table.patient_ids, table.splits, strict=True):
            seen[str(pid)].add(str(split))
        leaks = [(pid, s) for pid, s in seen.items() if len(s) > 1]
        if leaks:
            items = tuple(f"{pid} ({', '.join(sorted(s))})" for pid, s in leaks)
            problems.append(Problem("patients in several splits", items, "a patient leak"))
    return problems


def check(table: Table) -> Table:
    """Return ``table`` when :func:`validate` finds nothing; else raise one DataSourceError."""
    problems = validate(table)
    if problems:
        raise DataSourceError(table.source or table.root, problems)
    return table


def bad_files(problems: Iterable[Problem]) -> list[Path]:
    """Paths of the skippable problems (missing, empty, unreadable files), each once."""
    return list(dict.fromkeys(p for prob in problems if prob.skippable for p in prob.paths))


def drop(table: Table, bad_paths: Iterable[Path | str]) -> Table:
    """A copy of ``table`` without the rows of ``bad_paths`` (``on_bad_file=skip``).

    Class names stay, so a class emptied by the drop is still reported by :func:`validate`.

    Paths of rows already left out (``Table.problems``) are accepted and change nothing.

    Raises:
        ValueError: a path that is not in the table (a caller bug, named).
    """
    bad = {abs_path(table.root / p) for p in bad_paths}
    unknown = bad - set(table.paths) - {p for prob in table.problems for p in prob.paths}
    if unknown:
        raise ValueError(f"not in the table: {', '.join(sorted(map(str, unknown))[:MAX_LISTED])}")
    keep = np.array([p not in bad for p in table.paths], dtype=bool)
    take = lambda a: None if a is None else np.asarray(a)[keep]  # noqa: E731
    return replace(
        table,
        paths=[p for p, k in zip(table.paths, keep, strict=True) if k],
        labels=np.asarray(table.labels)[keep],
        patient_ids=take(table.patient_ids),
        splits=take(table.splits),
        extra={k: v[keep] for k, v in table.extra.items()},
    )
