"""The fold plan of a CV: the pool of samples, their groups (patients), and the folds.

The folds themselves come from :func:`medvit.evaluate.splits.make_repeated_folds`; this module
reads what they are made of and names the runs they give. ``folds.csv`` is written by
:mod:`medvit.runs` (:func:`~medvit.runs.folds_csv_text`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvit import runs
from medvit.cv import POOLS


@dataclass(frozen=True)
class FoldRun:
    """One training run of a CV: validation fold ``fold`` of repeat ``repeat``."""

    repeat: int
    fold: int

    @property
    def name(self) -> str:
        return runs.fold_name(self.repeat, self.fold)


@dataclass
class Pool:
    """The samples that are split into folds: official split and index, labels, task.

    ``columns`` holds, per pool sample, the values of the data's columns a CV may group by
    (``--group-by patient_id``): the patient column and the other CSV columns of an
    ``ImageDataModule``; none for MedMNIST.
    """

    split: np.ndarray
    index: np.ndarray
    labels: np.ndarray
    task: str
    class_names: list[str]
    split_sizes: dict[str, int]
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"


@dataclass
class FoldPlan:
    """The folds of every repeat over one pool: which runs a CV has and what each trains on.

    Args:
        pool: the samples split into folds.
        folds: (R, N) validation fold of each pool sample, per repeat.
        groups: (N,) group id of each pool sample, when no group may be split across folds.
        k: number of folds.
    """

    pool: Pool
    folds: np.ndarray
    groups: np.ndarray | None
    k: int

    @property
    def repeats(self) -> int:
        return len(self.folds)

    @property
    def runs(self) -> list[FoldRun]:
        """Every run of the CV, repeat by repeat."""
        return [FoldRun(r, k) for r in range(self.repeats) for k in range(self.k)]

    def n_val(self, run: FoldRun) -> int:
        """Validation samples of ``run`` (the rest of the pool trains)."""
        return int((self.folds[run.repeat] == run.fold).sum())

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Run name -> (training samples, validation samples)."""
        n = len(self.pool.index)
        return {run.name: (n - self.n_val(run), self.n_val(run)) for run in self.runs}

    def csv_text(self) -> str:
        """The ``folds.csv`` content of this plan (labels and groups included for audit)."""
        labels = self.pool.labels
        if not self.pool.multilabel:  # one ``label`` column, whatever the stored shape (N, 1)
            labels = labels.reshape(len(labels))
        return runs.folds_csv_text(
            self.pool.split, self.pool.index, labels, self.folds, self.groups
        )


#: MedMNISTDataModule arguments that say which data is read (not how it is loaded).
_MEDMNIST_KEYS = ("flag", "size", "root", "download", "verify_md5", "cache_dir", "base_url")
#: Arguments a CV sets per fold; the pool is the data without them.
_FOLD_KEYS = ("folds_file", "fold", "repeat")


def build_datamodule(data_config: dict[str, Any]) -> Any:
    """The DataModule of a resolved fit config's ``data``, without fold arguments.

    ``data`` is MedMNISTDataModule's arguments, or ``{class_path, init_args}`` when the
    command selects a class (``--data ImageDataModule``).
    """
    if "class_path" not in data_config:
        from medvit.data.medmnist import MedMNISTDataModule

        return MedMNISTDataModule(**{k: data_config[k] for k in _MEDMNIST_KEYS if k in data_config})
    class_path = str(data_config["class_path"])
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"data class_path {class_path!r} cannot be imported.") from None
    init = dict(data_config.get("init_args") or {})
    if class_name == "MedMNISTDataModule":
        init = {k: v for k, v in init.items() if k in _MEDMNIST_KEYS}
    return cls(**{k: v for k, v in init.items() if k not in _FOLD_KEYS})


def _data_columns(dm: Any, parts: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Values of the data's columns per pool sample (``parts``: split name, labels), in pool
    order: the patient column (from :meth:`split_samples`) and the source's other columns."""
    if not hasattr(dm, "split_samples"):
        return {}
    files: list[str] = []
    patients: list[str] | None = []
    for name, _ in parts:
        names, pids = dm.split_samples(name)
        files += names
        patients = None if pids is None or patients is None else patients + pids
    columns: dict[str, np.ndarray] = {}
    table = getattr(dm, "table", None)
    if table is not None and table.extra:
        row_of = {p: i for i, p in enumerate(table.rel_paths())}
        rows = np.array([row_of[f] for f in files], dtype=np.int64)
        columns.update({k: np.asarray(v).astype(str)[rows] for k, v in table.extra.items()})
    if patients is not None:
        columns[str(dm.hparams.patient_column)] = np.array(patients, dtype=str)
    return columns


def load_pool(data_config: dict[str, Any], pool: str) -> Pool:
    """Labels of the pool (official train, or train then val) read through the DataModule.

    The DataModule is the fit config's (MedMNIST, or the class ``--data`` selects, e.g.
    ``ImageDataModule``, whose images are decoded into its cache here, once for every fold).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got '{pool}'.")
    dm = build_datamodule(data_config)
    dm.prepare_data()
    dm.setup("fit")
    sizes = {"train": len(dm.data_train), "val": len(dm.data_val)}
    parts = [("train", dm.data_train.labels())]
    if pool == "train+val":
        parts.append(("val", dm.data_val.labels()))
    split = np.concatenate([np.full(len(lab), name) for name, lab in parts])
    index = np.concatenate([np.arange(len(lab)) for _, lab in parts])
    labels = np.concatenate([lab for _, lab in parts]).astype(np.int64)
    columns = _data_columns(dm, parts)
    return Pool(split, index, labels, dm.task, dm.class_names, sizes, columns)


def groups_fingerprint(group_by: str, groups: np.ndarray, pool: Pool) -> str:
    """SHA-256 of what ``--group-by`` names: the file's bytes, or a data column's values."""
    if group_by in pool.columns:
        text = "\n".join([f"column:{group_by}", *groups.tolist()])
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(Path(group_by).read_bytes()).hexdigest()


def load_groups(path: str | os.PathLike, pool: Pool) -> np.ndarray:
    """Group id per pool sample: a column of the data, a CSV (``split,index,group``) or ``.npy``.

    A column name (``patient_id``) takes the values the DataModule has for each pool sample
    (:attr:`Pool.columns`): the grouping of its own split, so no patient is in two folds. An
    ``.npy`` holds one id per pool sample in pool order (train, then val); for ``--pool train``
    an array covering train+val is accepted and cut to train.
    """
    if str(path) in pool.columns:
        return pool.columns[str(path)]
    path = Path(path)
    if not path.is_file():
        if path.suffix not in (".csv", ".npy") and len(path.parts) == 1:
            have = ", ".join(sorted(pool.columns)) or "none; MedMNIST has no patient ids"
            raise ValueError(
                f"--group-by {path}: no such file, and not a column of the data (its columns: "
                f"{have}). Give a CSV (split,index,group) or .npy file, or a column name."
            )
        raise ValueError(f"--group-by file {path} does not exist.")
    n = len(pool.index)
    if path.suffix == ".npy":
        groups = np.load(path, allow_pickle=False)
        n_all = pool.split_sizes["train"] + pool.split_sizes["val"]
        if groups.ndim == 1 and len(groups) == n_all and n == pool.split_sizes["train"]:
            groups = groups[:n]
        if groups.ndim != 1 or len(groups) != n:
            raise ValueError(
                f"{path} has shape {groups.shape}; expected one group id per pool sample ({n},), "
                "in pool order (official train, then val)."
            )
        return groups.astype(str)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"split", "index", "group"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} needs the columns {sorted(need)}, has {reader.fieldnames}.")
        table = {(r["split"], int(r["index"])): r["group"] for r in reader}
    keys = list(zip(pool.split.tolist(), pool.index.tolist(), strict=True))
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(
            f"{path} has no group for {len(missing)} pool sample(s), e.g. split={missing[0][0]} "
            f"index={missing[0][1]}; every pool sample needs one."
        )
    return np.array([table[k] for k in keys])


def plan_folds(
    pool: Pool, k: int, seed: int, repeats: int, groups: np.ndarray | None = None
) -> FoldPlan:
    """Stratified (grouped) folds of ``pool``, ``repeats`` times (repeat ``r`` uses seed + r)."""
    # scikit-learn loads only when a CV runs, not for `medvit cv --help`.
    from medvit.evaluate.splits import make_repeated_folds

    folds = make_repeated_folds(
        pool.labels, k, seed, repeats, groups=groups, multilabel=pool.multilabel
    )
    return FoldPlan(pool, folds, groups, k)


def fold_teachers(teacher_cv: Path, plan: FoldPlan, folds_sha256: str) -> dict[str, Path]:
    """Each fold's teacher: ``best.ckpt`` of the same fold of the CV in ``teacher_cv``.

    Raises:
        ValueError: ``teacher_cv`` is not a CV folder, its folds differ from these (a teacher
            would have trained on its student's validation samples), or a fold lacks its
            checkpoint.
    """
    if not (teacher_cv / runs.CV_CONFIG).is_file():
        raise ValueError(f"--teacher-cv {teacher_cv}: no {runs.CV_CONFIG}; not a medvit cv folder.")
    if runs.read_cv_config(teacher_cv).get("folds_sha256") != folds_sha256:
        raise ValueError(
            f"--teacher-cv {teacher_cv} has other folds than this CV (data, --folds, --seed, "
            "--repeats, --pool or --group-by differ): a teacher would have trained on its "
            "student's validation fold. Use the same CV options as the teacher's."
        )
    teachers = {}
    for job in plan.runs:
        path = runs.fold_run_dir(teacher_cv, job.name) / runs.CHECKPOINT_DIR / "best.ckpt"
        if not path.is_file():
            raise ValueError(f"--teacher-cv: fold {job.name} has no teacher checkpoint {path}.")
        teachers[job.name] = path.resolve()
    return teachers
