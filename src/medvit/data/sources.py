"""Your own images as a table of samples: read a folder or a CSV/TSV, validate it, split it.

Pure NumPy / csv / scikit-learn (no torch, no image decoding), so a data source can be checked
in a second before anything heavy starts. Decoding lives in :mod:`medvit.data.readers`.

Sources:

- A folder with one subfolder per class (the ImageFolder convention), optionally under
  ``train/``, ``val/`` (or ``valid/``, ``validation/``) and ``test/``. Class folders are searched
  recursively; hidden files are skipped; a file counts when its suffix is an image, DICOM or
  NIfTI suffix, or when it carries the DICOM magic ``DICM`` at byte 128 (PACS exports name files
  by UID, with no or a numeric suffix). Class names are the folder names sorted, numerically
  when all are integers (so grade folders ``0`` .. ``10`` keep their order).
- A CSV or TSV with a path column (relative to the CSV file; absolute allowed) and either a label
  column of class names or integers, one 0/1 column per finding (multi-label), or an integer
  grade with ``task="ordinal"``. Optional columns ``patient_id`` and ``split``. Integer labels are
  used as given: classes are ``0 .. max`` and an integer missing in between is an *empty class*
  (an error, not a silent renumbering, so class ids always mean what the file says).

Every problem found is collected, and :func:`check` raises one :class:`DataSourceError` listing
each kind with its first 20 paths and a count. Rows that cannot be parsed (an unknown label or
split, an empty path) are left out of the :class:`Table` and kept in ``Table.problems``.
"""

from __future__ import annotations

import csv
import inspect
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_LISTED",
    "NIFTI_SUFFIXES",
    "SPLIT_NAMES",
    "TASKS",
    "DataSourceError",
    "Problem",
    "Table",
    "bad_files",
    "check",
    "drop",
    "load_table",
    "make_splits",
    "read_csv",
    "scan_folder",
    "validate",
    "with_splits",
]

# Local copies of the suffixes medvit.data.readers decodes (kept equal; merged with readers.py).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SPLIT_NAMES = ("train", "val", "test")
TASKS = ("binary", "multiclass", "multilabel", "ordinal")
#: Paths listed per problem kind; the count always gives the full number.
MAX_LISTED = 20

# Spellings of split names found in the wild (Kaggle folders, CSV columns), case-insensitive.
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
_SPLIT_ALIASES.update({s: s for s in SPLIT_NAMES})


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


@dataclass
class Table:
    """The samples of a data source: one row per image file.

    Attributes:
        root: the folder paths are relative to (the scanned folder, or the CSV's folder).
        paths: absolute path per row.
        labels: (N,) int64 class per row, or (N, L) 0/1 int64 for ``multilabel``.
        class_names: names of classes (or findings for ``multilabel``), index = label.
        task: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        patient_ids: (N,) str patient per row, or None.
        splits: (N,) str ``train``/``val``/``test`` per row when the source gives them, or None.
        extra: other CSV columns, (N,) str each, kept for the prediction output.
        source: the folder or file read, for messages.
        problems: rows that could not be parsed (left out of the table); see :func:`validate`.
    """

    root: Path
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    task: str
    patient_ids: np.ndarray | None = None
    splits: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    source: Path | None = None
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def rel_paths(self) -> list[str]:
        """Paths as the user wrote them: relative to ``root`` when inside it, else absolute."""
        return [_show(p, self.root) for p in self.paths]


def _show(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _abs(path: Path | str) -> Path:
    # normpath, not resolve(): "a/../b.png" and "./b.png" compare equal, symlinks stay as given.
    return Path(os.path.normpath(os.path.abspath(path)))


def _is_int(text: str) -> bool:
    try:
        return float(text) == int(float(text))
    except (ValueError, OverflowError):
        return False


def _class_order(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return names


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES):
        return True
    return _has_dicom_magic(path)


def _task(task: str | None, n_classes: int, source: Path) -> str:
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}.")
    if task == "multilabel":
        raise ValueError(
            f"{source}: task='multilabel' needs one 0/1 column per finding (label_columns=[...]), "
            "not a single label column."
        )
    if task == "binary" and n_classes != 2:
        raise ValueError(f"{source}: task='binary' needs 2 classes, found {n_classes}.")
    return task or ("binary" if n_classes == 2 else "multiclass")


def scan_folder(
    path: Path | str, task: str | None = None, class_names: Sequence[str] | None = None
) -> Table:
    """Read a folder of class folders, optionally under ``train/``, ``val/`` and ``test/``.

    Args:
        path: the folder.
        task: ``binary``, ``multiclass`` or ``ordinal``; default binary for 2 classes, else
            multiclass.
        class_names: the classes in label order; a class folder not in it is reported as an
            unknown label, a name without files as an empty class. Default: the folder names.

    Raises:
        DataSourceError: no such folder, no class folders, or split folders mixed with others.
    """
    root = _abs(path)
    if not root.is_dir():
        raise DataSourceError(root, [Problem("no such folder", (str(path),))])
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_ALIASES]
    if split_dirs and len(split_dirs) != len(subdirs):
        others = tuple(d.name for d in subdirs if d not in split_dirs)
        raise DataSourceError(
            root,
            [Problem("folders beside train/val/test", others, "move them into a split folder")],
        )
    layout = [(_SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs] or [(None, root)]
    found: list[tuple[str | None, str, Path]] = []  # (split, class, file)
    folder_names: set[str] = set()
    for split, base in layout:
        for class_dir in sorted(d for d in base.iterdir() if d.is_dir()):
            if class_dir.name.startswith("."):
                continue
            folder_names.add(class_dir.name)
            for f in sorted(class_dir.rglob("*")):
                parts = f.relative_to(class_dir).parts
                if any(p.startswith(".") for p in parts) or not f.is_file():
                    continue
                if _is_image_file(f):
                    found.append((split, class_dir.name, f))
    if not folder_names:
        where = "train/, val/, test/" if split_dirs else str(root)
        raise DataSourceError(
            root, [Problem("no class folders", (where,), "expected one subfolder per class")]
        )
    names = list(class_names) if class_names is not None else _class_order(folder_names)
    index = {n: i for i, n in enumerate(names)}
    unknown = [f for _, c, f in found if c not in index]
    # Rows in split order (train, val, test), then class order, then path: stable and readable.
    rank = {s: i for i, s in enumerate((None, *SPLIT_NAMES))}
    rows = sorted(((s, index[c], f) for s, c, f in found if c in index),
                  key=lambda row: (rank[row[0]], row[1], row[2]))  # fmt: skip
    problems = []
    if unknown:
        hint = f"class folders not in class_names {names}"
        problems.append(_row_problem("unknown labels", unknown, root, hint))
    return Table(
        root=root,
        paths=[f for _, _, f in rows],
        labels=np.array([c for _, c, _ in rows], dtype=np.int64),
        class_names=names,
        task=_task(task, len(names), root),
        splits=np.array([s for s, _, _ in rows], dtype=str) if split_dirs else None,
        source=root,
        problems=problems,
    )


def _row_problem(
    kind: str, paths: Sequence[Path], root: Path, hint: str = "", values: Sequence[str] = ()
) -> Problem:
    items = [_show(p, root) for p in paths]
    if values:
        items = [f"{i} ({v})" for i, v in zip(items, values, strict=True)]
    return Problem(kind, tuple(items), hint, tuple(paths))


def _sniff_delimiter(path: Path, header: str) -> str:
    if path.name.lower().endswith((".tsv", ".tab")):
        return "\t"
    return max((",", "\t", ";"), key=header.count)  # ties keep the comma, the first


def read_csv(
    path: Path | str,
    path_column: str = "path",
    label_column: str = "label",
    label_columns: Sequence[str] | None = None,
    patient_column: str = "patient_id",
    split_column: str = "split",
    task: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Table:
    """Read a CSV or TSV listing image paths with their labels.

    The delimiter is a tab for ``.tsv``/``.tab`` files, else whichever of ``,``, tab or ``;``
    the header uses most. Cells are stripped; a UTF-8 byte-order mark is ignored.

    Labels, in this order of precedence:

    - ``label_columns`` given: one 0/1 column per finding, task ``multilabel``.
    - ``label_column`` present: class names, or integers (classes ``0 .. max``); with
      ``task="ordinal"`` integer grades. With ``class_names``, a value is a name from it or an
      integer index into it.
    - Otherwise every column (other than path, patient and split) whose cells are all 0/1 is a
      finding, when there are at least two (exclude a 0/1 column such as ``sex`` by naming the
      findings in ``label_columns``).

    ``patient_column`` and ``split_column`` are optional under their default names; a column
    named otherwise must exist. Split values are ``train``, ``val``, ``test`` (also ``training``,
    ``valid``, ``validation``, ``testing``; any case). Every other column is kept in ``extra``.

    Raises:
        DataSourceError: the file is missing or empty, or lacks a named column (the message
            lists the columns it has). Problems in rows are returned in ``Table.problems``.
        ValueError: an unknown ``task``, or one the labels cannot have.
    """
    file = _abs(path)
    if not file.is_file():
        raise DataSourceError(file, [Problem("no such file", (str(path),))])
    with open(file, newline="", encoding="utf-8-sig") as f:
        delimiter = _sniff_delimiter(file, f.readline())
        f.seek(0)
        rows = [r for r in csv.reader(f, delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise DataSourceError(file, [Problem("empty file", (str(path),), "no header row")])
    header = [h.strip() for h in rows[0]]
    cells = [[c.strip() for c in r] for r in rows[1:]]
    col = {h: i for i, h in enumerate(header)}
    # The default patient and split columns are optional; a name the user chose must exist.
    named = [c for c, d in ((patient_column, "patient_id"), (split_column, "split")) if c != d]
    wanted = [path_column, *named]
    findings = list(label_columns) if label_columns is not None else None
    auto = label_column not in col and label_column == "label" and task in (None, "multilabel")
    if findings is None and auto:
        findings = _zero_one_columns(header, cells, {path_column, patient_column, split_column})
        findings = findings if len(findings) >= 2 else None
    wanted += findings if findings is not None else [label_column]
    absent = [c for c in wanted if c not in col]
    if absent:
        hint = f"columns found: {', '.join(header)}"
        raise DataSourceError(file, [Problem("missing columns", tuple(absent), hint)])
    return _parse_rows(
        file, header, cells, path_column, label_column, findings, patient_column, split_column,
        task, class_names,
    )  # fmt: skip


def _zero_one(text: str) -> int | None:
    return int(float(text)) if _is_int(text) and float(text) in (0.0, 1.0) else None


def _zero_one_columns(header: list[str], cells: list[list[str]], reserved: set[str]) -> list[str]:
    rows = [r for r in cells if len(r) == len(header)]
    return [
        h
        for i, h in enumerate(header)
        if h not in reserved and rows and all(_zero_one(r[i]) is not None for r in rows)
    ]


def _parse_rows(
    file: Path,
    header: list[str],
    cells: list[list[str]],
    path_column: str,
    label_column: str,
    findings: list[str] | None,
    patient_column: str,
    split_column: str,
    task: str | None,
    class_names: Sequence[str] | None,
) -> Table:
    root, col = file.parent, {h: i for i, h in enumerate(header)}
    if findings is not None and task not in (None, "multilabel"):
        raise ValueError(f"{file}: 0/1 finding columns make a multilabel task, not {task!r}.")
    if findings is not None and class_names is not None:
        raise ValueError(f"{file}: class_names is for a label column; findings are column names.")
    bad: dict[tuple[str, str], list[tuple[str, Path | None, str]]] = defaultdict(list)
    rows: list[tuple[list[str], Path]] = []
    for line, r in enumerate(cells, start=2):
        if len(r) != len(header):
            bad["malformed rows", f"expected {len(header)} cells"].append(
                (f"line {line}", None, "")
            )
        elif not r[col[path_column]]:
            bad["empty paths", f"column '{path_column}'"].append((f"line {line}", None, ""))
        else:
            rows.append((r, _abs(root / r[col[path_column]])))
    # Labels are resolved over every well-formed row, so class names do not depend on which rows
    # have other problems; a row with any problem is then left out.
    flagged = np.zeros(len(rows), dtype=bool)
    if findings is not None:
        values = [[_zero_one(r[col[h]]) for h in findings] for r, _ in rows]
        for k, ((r, path), v) in enumerate(zip(rows, values, strict=True)):
            for h, x in zip(findings, v, strict=True):
                if x is None:
                    bad["unknown labels", "finding columns take 0 or 1"].append(
                        ("", path, f"{h}={r[col[h]] or 'empty'}")
                    )
                    flagged[k] = True
        names, task = list(findings), "multilabel"
    else:
        raw = [r[col[label_column]] for r, _ in rows]
        names, values, hint = _label_index(raw, task, class_names)
        task = _task(task, len(names), file)
        for k, ((_, path), value, i) in enumerate(zip(rows, raw, values, strict=True)):
            if i < 0:
                bad["unknown labels", hint].append(("", path, value or "empty"))
                flagged[k] = True
    for k, (r, path) in enumerate(rows):
        if split_column in col and r[col[split_column]].lower() not in _SPLIT_ALIASES:
            hint = f"column '{split_column}' takes {', '.join(SPLIT_NAMES)}"
            bad["unknown splits", hint].append(("", path, r[col[split_column]] or "empty"))
            flagged[k] = True
        if patient_column in col and not r[col[patient_column]]:
            bad["missing patient ids", f"column '{patient_column}'"].append(("", path, ""))
            flagged[k] = True
    kept = [row for row, f in zip(rows, flagged, strict=True) if not f]
    labels = np.array([v for v, f in zip(values, flagged, strict=True) if not f], np.int64)
    if findings is not None:
        labels = labels.reshape(len(kept), len(findings))
    problems = []
    for (kind, hint), entries in bad.items():
        items = tuple(
            _show(p, root) + (f" ({v})" if v else "") if p is not None else where
            for where, p, v in entries
        )
        problems.append(Problem(kind, items, hint, tuple(p for _, p, _ in entries if p)))
    used = {path_column, label_column, patient_column, split_column, *(findings or ())}
    column = lambda h: np.array([r[col[h]] for r, _ in kept], dtype=str)  # noqa: E731
    return Table(
        root=root,
        paths=[p for _, p in kept],
        labels=labels,
        class_names=names,
        task=task,
        patient_ids=column(patient_column) if patient_column in col else None,
        splits=(
            np.array([_SPLIT_ALIASES[r[col[split_column]].lower()] for r, _ in kept], dtype=str)
            if split_column in col
            else None
        ),
        extra={h: column(h) for h in header if h not in used},
        source=file,
        problems=problems,
    )


def _label_index(
    raw: list[str], task: str | None, class_names: Sequence[str] | None
) -> tuple[list[str], list[int], str]:
    """Class names, the class index per value (-1: unknown) and what an unknown value misses."""
    ints = [int(float(v)) if _is_int(v) else None for v in raw]
    if class_names is not None:
        names = list(class_names)
        lookup = {n: i for i, n in enumerate(names)}
        in_range = [i if i is not None and 0 <= i < len(names) else -1 for i in ints]
        if task == "ordinal":
            return names, in_range, f"grades 0..{len(names) - 1}"
        index = [lookup.get(v, k) for v, k in zip(raw, in_range, strict=True)]
        return names, index, f"not in class_names {names} nor an index into it"
    if task == "ordinal" or (raw and all(i is not None for i in ints)):
        index = [i if i is not None and i >= 0 else -1 for i in ints]
        names = [str(i) for i in range(max(index, default=-1) + 1)]
        return names, index, "labels must be integers >= 0"
    names = sorted({v for v in raw if v})
    lookup = {n: i for i, n in enumerate(names)}
    return names, [lookup.get(v, -1) for v in raw], "empty label"


def load_table(path: Path | str, **options) -> Table:
    """Read a folder (:func:`scan_folder`) or a CSV/TSV file (:func:`read_csv`).

    Args:
        path: the folder or file.
        **options: passed on; a folder takes only ``task`` and ``class_names``.
    """
    if Path(path).is_dir():
        # Column options left at read_csv's defaults are fine: a caller may always pass them all.
        defaults = {k: v.default for k, v in inspect.signature(read_csv).parameters.items()}
        csv_only = {k for k, v in options.items() if k not in ("task", "class_names")}
        changed = sorted(k for k in csv_only if k not in defaults or options[k] != defaults[k])
        if changed:
            raise ValueError(f"{path} is a folder; options {changed} are for a CSV file.")
        return scan_folder(path, options.get("task"), options.get("class_names"))
    return read_csv(path, **options)


def validate(table: Table) -> list[Problem]:
    """Every problem of ``table``: its unparsable rows, then what a stat of each file finds.

    Kinds: missing files (or not a regular file), empty (0-byte) files, duplicate paths, empty
    classes (a class, or finding, with no sample among the rows kept), fewer than 2 classes, no
    samples, patients whose rows have conflicting explicit splits. Files are not decoded; the
    paths of rows left out while parsing are stat'ed too, so one error lists everything.
    """
    problems = list(table.problems)
    missing, empty = [], []
    left_out = [p for prob in table.problems if not prob.skippable for p in prob.paths]
    for p in dict.fromkeys([*table.paths, *left_out]):
        try:
            st = os.stat(p)
        except OSError:
            missing.append(p)
            continue
        if not stat.S_ISREG(st.st_mode):
            missing.append(p)
        elif st.st_size == 0:
            empty.append(p)
    root = table.root
    if missing:
        hint = "not found, or not a regular file"
        problems.append(replace(_row_problem("missing files", missing, root, hint), skippable=True))
    if empty:
        problems.append(
            replace(_row_problem("empty files", empty, root, "0 bytes"), skippable=True)
        )
    counts = Counter(table.paths)
    dups = [p for p in dict.fromkeys(table.paths) if counts[p] > 1]
    if dups:
        problems.append(
            _row_problem("duplicate paths", dups, root, "listed twice or more",
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
    bad = {_abs(table.root / p) for p in bad_paths}
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


def make_splits(
    labels: np.ndarray | Sequence,
    patient_ids: np.ndarray | Sequence | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """A seeded, stratified, patient-grouped train/val/test split.

    Whole patients are assigned (every row is its own patient without ``patient_ids``), so no
    patient is in two splits. The assignment is iterative stratification (Sechidis et al., 2011)
    over patients, with unequal split sizes: the class (or finding) with the fewest unassigned
    samples goes first, each of its patients to the split that most lacks it. Before that, a
    split that has none of the class yet takes the patient when it fits (train, then test, then
    val), so every class is in every split when it has a patient for each. Multi-label rows with
    no finding count as one more class. Class counts per split end within a patient or two of
    ``fraction * class count``.

    Args:
        labels: (N,) class per row (or (N, 1)), or (N, L) 0/1 for multi-label.
        patient_ids: (N,) patient per row, any values compared as strings, or None.
        val_fraction: share of rows for ``val`` (0 for none).
        test_fraction: share of rows for ``test`` (0 for none).
        seed: the same labels, patients and seed always give the same split.

    Returns:
        (N,) str array of ``train``, ``val`` and ``test``.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and "
            "sum to less than 1."
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    n = len(labels)
    if labels.ndim == 1:
        _, klass = np.unique(labels, return_inverse=True)
        onehot = np.zeros((n, int(klass.max(initial=0)) + 1), dtype=np.int64)
        onehot[np.arange(n), klass] = 1
    else:
        onehot = (labels != 0).astype(np.int64)
        onehot = np.column_stack([onehot, onehot.sum(1) == 0]).astype(np.int64)
    if patient_ids is None:
        member = np.arange(n)
    else:
        patient_ids = np.asarray(patient_ids).astype(str)
        if patient_ids.shape != (n,):
            raise ValueError(f"patient_ids has shape {patient_ids.shape}; expected ({n},).")
        _, member = np.unique(patient_ids, return_inverse=True)
    n_groups = int(member.max(initial=-1)) + 1
    counts = np.zeros((n_groups, onehot.shape[1]), dtype=np.int64)
    np.add.at(counts, member, onehot)
    sizes = np.bincount(member, minlength=n_groups)
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    want, want_size = fractions[:, None] * counts.sum(0), fractions * n
    have, have_size = np.zeros_like(want), np.zeros(3)
    split_of = np.full(n_groups, -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    while (split_of < 0).any():
        unplaced = order[split_of[order] < 0]
        remaining = counts[unplaced].sum(0).astype(float)
        remaining[remaining == 0] = np.inf
        label = int(np.argmin(remaining))  # every group has a class, so one remains
        for g in unplaced[counts[unplaced, label] > 0]:
            split = next(
                (
                    s
                    for s in (0, 2, 1)  # train, test, val: the order a scarce class fills them
                    if fractions[s] > 0
                    and have[s, label] == 0
                    and sizes[g] <= np.ceil(want_size[s] - have_size[s])
                ),
                None,
            )
            if split is None:
                need = np.where(fractions > 0, want[:, label] - have[:, label], -np.inf)
                best = np.flatnonzero(np.isclose(need, need.max()))
                if len(best) > 1:
                    room = (want_size - have_size)[best]
                    best = best[np.isclose(room, room.max())]
                split = int(best[0] if len(best) == 1 else rng.choice(best))
            split_of[g] = split
            have[split] += counts[g]
            have_size[split] += sizes[g]
    return np.array(SPLIT_NAMES)[split_of[member]] if n else np.array([], dtype=str)


def with_splits(
    table: Table, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> Table:
    """``table`` with a split per row: the given splits, or :func:`make_splits`'s.

    Explicit splits are kept as they are. When they have no ``val`` rows (a ``train``/``test``
    folder) and ``val_fraction > 0``, ``val`` is carved out of ``train`` the same way, by
    patient, ``val_fraction`` being a share of all rows; ``test`` is never invented.
    """
    if table.splits is None:
        splits = make_splits(table.labels, table.patient_ids, val_fraction, test_fraction, seed)
        return replace(table, splits=splits)
    train = table.splits == "train"
    if (table.splits == "val").any() or val_fraction == 0 or not train.any():
        return table
    share = val_fraction / train.mean()
    if share >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} of all rows exceeds the train split ({train.mean():.2f})."
        )
    pids = None if table.patient_ids is None else table.patient_ids[train]
    splits = table.splits.copy()
    splits[train] = make_splits(np.asarray(table.labels)[train], pids, share, 0.0, seed)
    return replace(table, splits=splits)
