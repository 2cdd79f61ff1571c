"""Run- and CV-folder file names and their JSON, YAML and CSV readers and writers."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medvit.fileio import atomic_write, atomic_write_text

__all__ = [
    "CONFIG_FILE",
    "HPARAMS_FILE",
    "METRICS_CSV",
    "METRICS_FILE",
    "META_FILE",
    "PREDICTIONS_FILE",
    "CHECKPOINT_DIR",
    "LAST_CHECKPOINT",
    "RUN_MARKERS",
    "CV_CONFIG",
    "FOLDS_FILE",
    "SUMMARY_JSON",
    "SUMMARY_CSV",
    "ENSEMBLE_FILE",
    "LOCK_FILE",
    "CV_RUNS_DIR",
    "CV_LOGS_DIR",
    "experiment_name",
    "data_name",
    "source_name",
    "new_run_dir",
    "last_checkpoint",
    "run_dir_of_checkpoint",
    "fold_name",
    "fold_run_dir",
    "fold_log",
    "one_line",
    "write_json",
    "read_json",
    "read_yaml",
    "read_metrics",
    "write_metrics",
    "read_meta",
    "write_meta",
    "is_finished",
    "folds_csv_text",
    "write_folds",
    "read_folds",
    "read_cv_config",
    "write_cv_config",
    "write_cv_summary",
    "read_cv_summary",
    "cv_summary_columns",
    "write_cv_summary_csv",
    "SPLITS_FILE",
    "SKIPPED_FILE",
    "write_splits",
    "read_splits",
    "write_skipped_files",
    "read_skipped_files",
    "GALLERY_DIR",
    "GALLERY_SECTIONS",
    "gallery_image_path",
    "write_gallery",
    "read_gallery",
]

# ------------------------------------------------------------------------------ file names
CONFIG_FILE = "config.yaml"
HPARAMS_FILE = "hparams.yaml"
METRICS_CSV = "metrics.csv"
METRICS_FILE = "metrics.json"
META_FILE = "meta.json"
PREDICTIONS_FILE = "test_predictions.npz"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RUN_MARKERS = (METRICS_FILE, CONFIG_FILE)  # a folder with either is a run folder

CV_CONFIG = "cv_config.json"
FOLDS_FILE = "folds.csv"
SUMMARY_JSON = "cv_summary.json"
SUMMARY_CSV = "cv_summary.csv"
ENSEMBLE_FILE = "ensemble_test_predictions.npz"
LOCK_FILE = "cv.lock"
CV_RUNS_DIR = "runs"
CV_LOGS_DIR = "logs"


# ------------------------------------------------------------------------------ run names
def experiment_name(run_name: str | None, flag: str, size: int) -> str:
    """``--run.name``, else the dataset flag with its size (``breastmnist`` or ``pathmnist_224``)."""
    if run_name:
        return run_name
    return flag if size == 28 else f"{flag}_{size}"


def data_name(data_args: Mapping[str, Any]) -> str | None:
    """How messages name the data of DataModule arguments: ``pathmnist_64``, ``chest_xray``.

    A MedMNIST flag with its size (none at 28 px), else the name of the own-data folder or CSV.
    """
    if data_args.get("flag"):
        size = data_args.get("size")
        return data_args["flag"] + ("" if size in (None, 28) else f"_{size}")
    if data_args.get("path"):
        return Path(str(data_args["path"]).rstrip("/")).name
    return None


def source_name(path: str | os.PathLike) -> str:
    """The name of own data in run-folder names: a folder's name, or a CSV file's stem."""
    path = Path(str(path).rstrip("/\\"))
    return path.name if path.is_dir() else path.stem


def new_run_dir(root: str | os.PathLike, name: str, suffix: str = "") -> Path:
    """A fresh ``{root}/{name}/{timestamp}{suffix}`` folder name (not created here)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name / f"{stamp}{suffix}"
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{n}")
        n += 1
    return path


def last_checkpoint(run_dir: Path) -> Path:
    """``{run_dir}/checkpoints/last.ckpt`` (it may not exist yet)."""
    return run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT


def run_dir_of_checkpoint(path: Path) -> Path | None:
    """The run folder holding ``<run>/checkpoints/x.ckpt``, or None for a checkpoint elsewhere."""
    run_dir = path.parent.parent
    if path.parent.name == CHECKPOINT_DIR and (run_dir / CONFIG_FILE).is_file():
        return run_dir
    return None


def fold_name(repeat: int, fold: int) -> str:
    """The name of one CV run: ``r{repeat}-f{fold}``."""
    return f"r{repeat}-f{fold}"


def fold_run_dir(cv_dir: Path, name: str) -> Path:
    """The run folder of CV run ``name`` (``runs/r0-f1``)."""
    return cv_dir / CV_RUNS_DIR / name


def fold_log(cv_dir: Path, name: str) -> Path:
    """The log of CV run ``name`` (``logs/r0-f1.log``)."""
    return cv_dir / CV_LOGS_DIR / f"{name}.log"


# ------------------------------------------------------------------------------ JSON, YAML
def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically, so a report never reads a half-written file."""
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object; ``{}`` when the file is absent; a ValueError naming a broken file."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {one_line(err)}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object.")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping; ``{}`` when the file is absent or not a mapping."""
    if not path.is_file():
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid YAML: {one_line(err)}") from err
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``metrics.json`` (``{}`` when absent)."""
    return read_json(run_dir / METRICS_FILE)


def write_metrics(run_dir: Path, metrics: Mapping[str, Any]) -> None:
    """Replace a run folder's ``metrics.json``."""
    write_json(run_dir / METRICS_FILE, metrics)


def read_meta(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``meta.json`` (``{}`` when absent)."""
    return read_json(run_dir / META_FILE)


def write_meta(run_dir: Path, meta: Mapping[str, Any]) -> None:
    """Replace a run folder's ``meta.json``."""
    write_json(run_dir / META_FILE, meta)


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its ``metrics.json`` has test metrics (an unreadable one is not)."""
    try:
        return bool(read_metrics(run_dir).get("test"))
    except (OSError, ValueError):
        return False


def _csv_text(header: list[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text (``\n`` line ends) of a header and rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _csv_rows(path: Path, need: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV written here; a ValueError naming the file when a column is missing."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not set(need) <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} needs the columns {sorted(need)}, has {reader.fieldnames}.")
        return list(reader)


# ------------------------------------------------------------------------------ folds.csv
def folds_csv_text(
    split: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    groups: np.ndarray | None = None,
) -> str:
    """``folds.csv`` content: one row per (repeat, pool sample), labels (and group) for audit.

    Args:
        split: (N,) official split of each pool sample (``train`` or ``val``).
        index: (N,) index within that split.
        labels: (N,) class indices or (N, L) multi-label 0/1 labels.
        folds: (R, N) validation fold of each sample, per repeat.
        groups: (N,) group ids (patients), when the folds are grouped.
    """
    flat = labels.reshape(len(labels), -1)  # (N, 1) or (N, L)
    label_cols = ["label"] if labels.ndim == 1 else [f"label_{i}" for i in range(flat.shape[1])]
    header = ["split", "index", "repeat", "fold", *label_cols]
    label_rows = flat.tolist()
    rows = (
        [s, idx, r, fold_of[i], *label_rows[i], *([groups[i]] if groups is not None else [])]
        for r, fold_of in enumerate(folds.tolist())
        for i, (s, idx) in enumerate(zip(split.tolist(), index.tolist(), strict=True))
    )
    return _csv_text([*header, *(["group"] if groups is not None else [])], rows)


def write_folds(path: Path, text: str) -> None:
    """Write ``folds.csv`` text (from :func:`folds_csv_text`) atomically."""
    atomic_write_text(path, text)


def read_folds(path: str | os.PathLike, repeat: int = 0) -> dict[str, np.ndarray]:
    """Rows of a ``folds.csv`` (columns ``split,index,repeat,fold``) for one repeat."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"folds file {path} does not exist.")
    rows = [
        r
        for r in _csv_rows(path, ("split", "index", "repeat", "fold"))
        if int(r["repeat"]) == repeat
    ]
    if not rows:
        raise ValueError(f"{path} has no rows for repeat {repeat}.")
    return {
        "split": np.array([r["split"] for r in rows]),
        "index": np.array([int(r["index"]) for r in rows], dtype=np.int64),
        "fold": np.array([int(r["fold"]) for r in rows], dtype=np.int64),
    }


# ------------------------------------------------------------------------------ CV files
def read_cv_config(cv_dir: Path) -> dict[str, Any]:
    """``cv_config.json`` (``{}`` when absent)."""
    return read_json(cv_dir / CV_CONFIG)


def write_cv_config(cv_dir: Path, config: Mapping[str, Any]) -> None:
    """Replace ``cv_config.json``."""
    write_json(cv_dir / CV_CONFIG, config)


def write_cv_summary(cv_dir: Path, summary: Mapping[str, Any]) -> None:
    """Write ``cv_summary.json`` and its table ``cv_summary.csv``.

    The schema: ``runs`` (one entry per finished run: ``run``, ``repeat``, ``fold``,
    ``run_dir``, ``val``, ``test``, ...), ``missing`` (``run``, ``repeat``, ``fold``,
    ``reason``, ``log``), ``val`` and ``test`` (metric -> ``mean``, ``std``, ``ci95_low``,
    ``ci95_high``, ``n``), ``ensemble`` (``n_models``, ``models``, ``predictions``, ``test``;
    or null), ``runs_expected``, ``runs_completed``, ``complete`` and ``ci_method``.
    """
    write_json(cv_dir / SUMMARY_JSON, summary)
    write_cv_summary_csv(cv_dir / SUMMARY_CSV, summary)


def read_cv_summary(cv_dir: Path) -> dict[str, Any]:
    """``cv_summary.json`` with every key of the schema present (see :func:`write_cv_summary`)."""
    summary = read_json(cv_dir / SUMMARY_JSON)
    for key in ("runs", "missing"):
        summary[key] = list(summary.get(key) or [])
    for key in ("val", "test"):
        summary[key] = dict(summary.get(key) or {})
    summary["ensemble"] = summary.get("ensemble") or None
    summary.setdefault("runs_completed", len(summary["runs"]))
    summary.setdefault("runs_expected", len(summary["runs"]) + len(summary["missing"]))
    return summary


# ------------------------------------------------------------------------------ CV summary table
_NO_STATS = {"mean": None, "std": None, "ci95_low": None, "ci95_high": None, "n": 0}


def cv_summary_columns(summary: Mapping[str, Any]) -> list[str]:
    """Metric columns of a CV summary: ``val/<metric>``, then ``test/<metric>`` (ensemble's too)."""
    test = set(summary["test"]) | set((summary["ensemble"] or {}).get("test", {}))
    return [f"val/{m}" for m in summary["val"]] + [f"test/{m}" for m in sorted(test)]


def write_cv_summary_csv(path: Path, summary: Mapping[str, Any]) -> None:
    """``cv_summary.csv``: every run (a missing one with its reason), mean/std/ci95, ensemble."""
    columns = cv_summary_columns(summary)
    rows = []
    for r in summary["runs"]:
        values = {f"{s}/{m}": v for s in ("val", "test") for m, v in r[s].items()}
        rows.append(
            {"run": r["run"], "repeat": r["repeat"], "fold": r["fold"], "status": "ok", **values}
        )
    for m in summary["missing"]:
        rows.append(
            {"run": m["run"], "repeat": m["repeat"], "fold": m["fold"], "status": m["reason"]}
        )
    for stat in ("mean", "std", "ci95_low", "ci95_high"):
        row = {"run": stat, "status": f"n={summary['runs_completed']}"}
        for col in columns:
            stage, metric = col.split("/", 1)
            row[col] = summary[stage].get(metric, _NO_STATS)[stat]
        rows.append(row)
    if summary["ensemble"]:
        ens = summary["ensemble"]
        row = {"run": "ensemble", "status": f"n_models={ens['n_models']}"}
        row.update({f"test/{m}": v for m, v in ens["test"].items()})
        rows.append(row)
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["run", "repeat", "fold", "status", *columns], restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


# ------------------------------------------------------------------------------ own data
#: The train/val/test split medvit made for a data source without one (``ImageDataModule``).
SPLITS_FILE = "splits.csv"
#: Files left out of training with ``--data.on_bad_file skip``, and why.
SKIPPED_FILE = "skipped_files.csv"


def write_splits(
    path: Path, paths: list[str], splits: np.ndarray, patient_ids: np.ndarray | None = None
) -> None:
    """``splits.csv``: ``path,split[,patient_id]``, one row per sample (paths as the source has them)."""
    header = ["path", "split", *(["patient_id"] if patient_ids is not None else [])]
    rows = (
        [name, split, *([patient_ids[i]] if patient_ids is not None else [])]
        for i, (name, split) in enumerate(zip(paths, np.asarray(splits).tolist(), strict=True))
    )
    atomic_write_text(path, _csv_text(header, rows))


def read_splits(path: str | os.PathLike) -> dict[str, str]:
    """``{path: split}`` from a ``splits.csv`` (:func:`write_splits`)."""
    path = Path(path)
    rows = {r["path"]: r["split"] for r in _csv_rows(path, ("path", "split"))}
    bad = sorted({s for s in rows.values() if s not in ("train", "val", "test")})
    if bad:
        raise ValueError(f"{path}: unknown split names {bad}; expected train, val or test.")
    return rows


def write_skipped_files(path: Path, rows: list[tuple[str, str]]) -> None:
    """``skipped_files.csv``: ``path,reason``, one row per file left out of training."""
    atomic_write_text(path, _csv_text(["path", "reason"], rows))


def read_skipped_files(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(path, reason)]`` from a ``skipped_files.csv`` (:func:`write_skipped_files`)."""
    return [(r["path"], r["reason"]) for r in _csv_rows(Path(path), ("path", "reason"))]


# ------------------------------------------------------------------------------ gallery
#: Pictures of test cases written at test time (the report and wandb show them; no torch needed).
GALLERY_DIR = "gallery"
#: ``misclassified``: the most confident wrong test cases (3D: mid axial, coronal, sagittal
#: slices); ``explained``: per class, the most confident correct and wrong cases with overlays.
GALLERY_SECTIONS = ("misclassified", "explained")
_GALLERY_KEYS = ("image", "index", "true", "predicted", "probability")


def _check_section(section: str) -> None:
    if section not in GALLERY_SECTIONS:
        raise ValueError(
            f"Unknown gallery section {section!r}; expected one of {GALLERY_SECTIONS}."
        )


def gallery_image_path(run_dir: Path, section: str, name: str) -> Path:
    """Where a gallery picture ``name`` (a file name, e.g. ``test_00017.png``) of ``section`` goes."""
    _check_section(section)
    if Path(name).name != name:
        raise ValueError(f"A gallery image name is a plain file name, got {name!r}.")
    return Path(run_dir) / GALLERY_DIR / section / name


def write_gallery(run_dir: Path, section: str, entries: Sequence[Mapping[str, Any]]) -> None:
    """``gallery/{section}.json``: one entry per picture, written after the pictures.

    Each entry has ``image`` (a path relative to ``run_dir``, from :func:`gallery_image_path`),
    ``index`` (the test sample's index), ``true`` and ``predicted`` (class names),
    ``probability`` (of the predicted class) and optionally ``caption``, ``method``, ``kind``.
    """
    _check_section(section)
    run_dir = Path(run_dir)
    for i, entry in enumerate(entries):
        missing = [k for k in _GALLERY_KEYS if k not in entry]
        if missing:
            raise ValueError(f"Gallery entry {i} of {section!r} lacks {missing}.")
        if not (run_dir / entry["image"]).is_file():
            raise ValueError(f"Gallery entry {i} of {section!r}: {entry['image']} is not a file.")
    # An empty section (a test without mistakes) has no pictures, hence no folder yet.
    (run_dir / GALLERY_DIR).mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / GALLERY_DIR / f"{section}.json", {"section": section, "entries": list(entries)}
    )


def read_gallery(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{section: entries}`` for each section written (:func:`write_gallery`); missing ones left out.

    Entries whose picture is gone are dropped, so a reader never shows a broken image.
    """
    run_dir = Path(run_dir)
    out: dict[str, list[dict[str, Any]]] = {}
    for section in GALLERY_SECTIONS:
        path = run_dir / GALLERY_DIR / f"{section}.json"
        if path.is_file():
            entries = read_json(path).get("entries", [])
            out[section] = [e for e in entries if (run_dir / e["image"]).is_file()]
    return out
