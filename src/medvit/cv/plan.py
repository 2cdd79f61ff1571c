"""The fold plan of a CV: the pool of samples, their groups (patients), and the folds.

The folds themselves come from :func:`medvit.evaluate.splits.make_repeated_folds`; this module
reads what they are made of and names the runs they give. ``folds.csv`` is written by
:mod:`medvit.runs` (:func:`~medvit.runs.folds_csv_text`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
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
    """The samples that are split into folds: official split and index, labels, task."""

    split: np.ndarray
    index: np.ndarray
    labels: np.ndarray
    task: str
    class_names: list[str]
    split_sizes: dict[str, int]

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


def load_pool(data_config: dict[str, Any], pool: str) -> Pool:
    """Labels of the pool (official train, or train then val) read through the DataModule."""
    from medvit.data.medmnist import MedMNISTDataModule

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got '{pool}'.")
    keys = ("flag", "size", "root", "download", "verify_md5", "cache_dir", "base_url")
    dm = MedMNISTDataModule(**{k: data_config[k] for k in keys if k in data_config})
    dm.prepare_data()
    dm.setup("fit")
    sizes = {"train": len(dm.data_train), "val": len(dm.data_val)}
    parts = [("train", dm.data_train.labels())]
    if pool == "train+val":
        parts.append(("val", dm.data_val.labels()))
    split = np.concatenate([np.full(len(lab), name) for name, lab in parts])
    index = np.concatenate([np.arange(len(lab)) for _, lab in parts])
    labels = np.concatenate([lab for _, lab in parts]).astype(np.int64)
    return Pool(split, index, labels, dm.task, dm.class_names, sizes)


def load_groups(path: str | os.PathLike, pool: Pool) -> np.ndarray:
    """Group id per pool sample from a CSV (``split,index,group``) or an ``.npy`` file.

    An ``.npy`` holds one id per pool sample in pool order (train, then val); for
    ``--pool train`` an array covering train+val is accepted and cut to train.
    """
    path = Path(path)
    if not path.is_file():
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
