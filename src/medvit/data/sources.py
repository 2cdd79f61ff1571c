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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medvit.data.problems import (
    MAX_LISTED,
    DataSourceError,
    Problem,
    abs_path,
    bad_files,
    check,
    drop,
    row_problem,
    show_path,
    validate,
)
from medvit.data.readers import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    is_dicom,
    is_image_file,
    is_nifti,
)
from medvit.data.splitting import SPLIT_NAMES, make_splits, with_splits

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
    "with_spatial_dims",
    "with_splits",
]

TASKS = ("binary", "multiclass", "multilabel", "ordinal")

# Spellings of split names found in the wild (Kaggle folders, CSV columns), case-insensitive.
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
_SPLIT_ALIASES.update({s: s for s in SPLIT_NAMES})


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
        spatial_dims: 2 for images, 3 for volumes (NIfTI volumes, DICOM series folders); see
            :func:`with_spatial_dims`.
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
    spatial_dims: int = 2

    def __len__(self) -> int:
        return len(self.paths)

    def rel_paths(self) -> list[str]:
        """Paths as the user wrote them: relative to ``root`` when inside it, else absolute."""
        return [show_path(p, self.root) for p in self.paths]


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
    path: Path | str,
    task: str | None = None,
    class_names: Sequence[str] | None = None,
    series: bool = False,
) -> Table:
    """Read a folder of class folders, optionally under ``train/``, ``val/`` and ``test/``.

    Args:
        path: the folder.
        task: ``binary``, ``multiclass`` or ``ordinal``; default binary for 2 classes, else
            multiclass.
        class_names: the classes in label order; a class folder not in it is reported as an
            unknown label, a name without files as an empty class. Default: the folder names.
        series: volumes: the DICOM files of each folder are one item, the folder (a DICOM
            series); NIfTI files stay items of their own.

    Raises:
        DataSourceError: no such folder, no class folders, or split folders mixed with others.
    """
    root = abs_path(path)
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
                if series and is_dicom(f) and not is_nifti(f):
                    found.append((split, class_dir.name, f.parent))
                elif is_image_file(f):
                    found.append((split, class_dir.name, f))
    found = list(dict.fromkeys(found))  # a series folder once
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
        problems.append(row_problem("unknown labels", unknown, root, hint))
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
    file = abs_path(path)
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
            rows.append((r, abs_path(root / r[col[path_column]])))
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
            show_path(p, root) + (f" ({v})" if v else "") if p is not None else where
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


def load_table(path: Path | str, spatial_dims: int | None = None, **options) -> Table:
    """Read a folder (:func:`scan_folder`) or a CSV/TSV file (:func:`read_csv`) of images or volumes.

    Args:
        path: the folder or file.
        spatial_dims: 2 (images), 3 (volumes) or None (found from the items, see
            :func:`with_spatial_dims`). With 3, a folder's DICOM files are grouped into one
            series per folder.
        **options: passed on; a folder takes only ``task`` and ``class_names``.
    """
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}.")
    if Path(path).is_dir():
        # Column options left at read_csv's defaults are fine: a caller may always pass them all.
        defaults = {k: v.default for k, v in inspect.signature(read_csv).parameters.items()}
        csv_only = {k for k, v in options.items() if k not in ("task", "class_names")}
        changed = sorted(k for k in csv_only if k not in defaults or options[k] != defaults[k])
        if changed:
            raise ValueError(f"{path} is a folder; options {changed} are for a CSV file.")
        table = scan_folder(
            path, options.get("task"), options.get("class_names"), series=spatial_dims == 3
        )
    else:
        table = read_csv(path, **options)
    return with_spatial_dims(table, spatial_dims)


def with_spatial_dims(table: Table, spatial_dims: int | None = None) -> Table:
    """``table`` marked as images (2) or volumes (3); items of the other kind are a problem.

    An item is a volume when it is a folder (a DICOM series) or a NIfTI file with more than one
    slice (:func:`medvit.data.volumes.item_dims`); other files are images. With
    ``spatial_dims=None`` the items decide; a source with both is one problem ("2D images and
    3D volumes mixed") listing the fewer kind, so the error names the odd ones out.
    """
    from medvit.data.volumes import item_dims

    dims = [item_dims(p) for p in table.paths]
    n3, n2 = dims.count(3), dims.count(2)
    chosen = spatial_dims or (3 if n3 > n2 else 2)
    odd = [p for p, d in zip(table.paths, dims, strict=True) if d is not None and d != chosen]
    problems = list(table.problems)
    if odd:
        if spatial_dims is None:
            kind = "2D images and 3D volumes mixed"
            hint = f"{n2} images, {n3} volumes; a source holds one kind"
        else:
            kind = "2D images in a 3D source" if chosen == 3 else "3D volumes in a 2D source"
            hint = f"spatial_dims={chosen}"
        if chosen == 2 and any(is_dicom(p) for p in table.paths):
            hint += "; --data.spatial_dims 3 reads each folder of DICOM files as one series"
        problems.append(row_problem(kind, odd, table.root, hint))
    return replace(table, spatial_dims=chosen, problems=problems)
