"""Cross-validation folds: stratified, optionally grouped (patients), deterministic per seed.

Pure NumPy / scikit-learn (no torch), so folds can be made and audited without a GPU stack.

Rules, shared by every dataset (MedMNIST or a user's own with patient ids):

- Single-label: ``StratifiedKFold``; with groups ``StratifiedGroupKFold`` (no group is split
  across folds; stratification is then as good as the group sizes allow).
- Multi-label: iterative stratification (``MultilabelStratifiedKFold``). With groups, each group
  gets the union of its members' labels (a label is "present" in a group when any member has it)
  and whole groups are stratified on those presence vectors; sample-level label frequencies then
  stay close to the pool's when groups are of similar size.
- A class (or multi-label label) with fewer members than folds is refused: some validation fold
  would have none, leaving its per-class metrics (and macro AUROC) undefined. Merge the class,
  use fewer folds, or drop its samples from the pool.
- Repeat ``r`` of a repeated k-fold uses seed ``seed + r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


def _single_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"single-label folds need labels of shape (N,) or (N, 1), got {labels.shape}; "
            "pass multilabel=True for an (N, L) indicator matrix."
        )
    return labels


def _check_class_sizes(labels: np.ndarray, n_folds: int, multilabel: bool) -> None:
    if multilabel:
        names, counts = np.arange(labels.shape[1]), (labels != 0).sum(axis=0)
        what = "label"
        # A label never present cannot be stratified and leaves no fold worse off than another.
        small = [(n, c) for n, c in zip(names, counts, strict=True) if 0 < c < n_folds]
    else:
        names, counts = np.unique(labels, return_counts=True)
        what = "class"
        small = [(n, c) for n, c in zip(names, counts, strict=True) if c < n_folds]
    if small:
        listed = ", ".join(f"{what} {n!s} has {int(c)}" for n, c in small)
        raise ValueError(
            f"{listed} member(s) in the pool, fewer than n_folds={n_folds}: some validation fold "
            f"would have none. Use fewer folds, merge the {what}, or drop its samples."
        )


def make_folds(
    labels: np.ndarray | Sequence,
    n_folds: int,
    seed: int,
    groups: np.ndarray | Sequence | None = None,
    multilabel: bool = False,
) -> np.ndarray:
    """Assign every sample to one of ``n_folds`` validation folds.

    Folds are disjoint, cover all samples, are stratified by label and, with ``groups``, never
    split a group. The same inputs and seed always give the same folds.

    Args:
        labels: class per sample, shape (N,) or (N, 1); or for ``multilabel`` a 0/1 matrix
            (N, L).
        n_folds: number of folds (>= 2).
        seed: random seed of the shuffle.
        groups: optional group id per sample (e.g. patient), shape (N,); any hashable values.
        multilabel: ``labels`` is a multi-label indicator matrix.

    Returns:
        Integer array (N,) of fold ids in ``[0, n_folds)``.

    Raises:
        ValueError: ``n_folds < 2``; fewer samples or groups than folds; ``groups`` of another
            length than ``labels``; a class (or label) with fewer members than folds.
    """
    if int(n_folds) != n_folds or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds}.")
    n_folds = int(n_folds)
    labels = np.asarray(labels)
    if multilabel:
        if labels.ndim != 2 or labels.shape[1] < 2:
            raise ValueError(
                f"multi-label folds need an (N, L) indicator matrix with L >= 2, got {labels.shape}."
            )
        labels = (labels != 0).astype(np.int64)
    else:
        labels = _single_labels(labels)
    n = len(labels)
    if n < n_folds:
        raise ValueError(f"{n} samples cannot fill n_folds={n_folds} folds.")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.ndim != 1 or len(groups) != n:
            raise ValueError(
                f"groups has shape {groups.shape}; expected one group id per sample ({n},)."
            )
        n_groups = len(np.unique(groups))
        if n_groups < n_folds:
            raise ValueError(
                f"{n_groups} distinct groups cannot fill n_folds={n_folds} folds without "
                "splitting a group; use fewer folds."
            )
    _check_class_sizes(labels, n_folds, multilabel)

    folds = np.full(n, -1, dtype=np.int64)
    x = np.zeros((n, 1))  # scikit-learn splitters only look at len(X)
    if multilabel and groups is not None:
        uniq, member_of = np.unique(groups, return_inverse=True)
        present = np.zeros((len(uniq), labels.shape[1]), dtype=np.int64)
        np.maximum.at(present, member_of, labels)
        splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        group_fold = np.full(len(uniq), -1, dtype=np.int64)
        for fold, (_, test) in enumerate(splitter.split(np.zeros((len(uniq), 1)), present)):
            group_fold[test] = fold
        folds = group_fold[member_of]
    else:
        if multilabel:
            splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        elif groups is not None:
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        else:
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for fold, (_, test) in enumerate(splitter.split(x, labels, groups)):
            folds[test] = fold
    if (folds < 0).any():  # a splitter contract we rely on; cheap to check
        raise RuntimeError("internal error: some samples got no fold")
    return folds


def make_repeated_folds(
    labels: np.ndarray | Sequence,
    n_folds: int,
    seed: int,
    repeats: int = 1,
    groups: np.ndarray | Sequence | None = None,
    multilabel: bool = False,
) -> np.ndarray:
    """Folds of ``repeats`` independent k-fold splits, repeat ``r`` seeded with ``seed + r``.

    Args:
        labels: as in :func:`make_folds`.
        n_folds: folds per repeat.
        seed: seed of repeat 0.
        repeats: number of repeats (>= 1).
        groups: as in :func:`make_folds`.
        multilabel: as in :func:`make_folds`.

    Returns:
        Integer array (repeats, N) of fold ids.
    """
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats}.")
    return np.stack(
        [
            make_folds(labels, n_folds, seed + r, groups=groups, multilabel=multilabel)
            for r in range(int(repeats))
        ]
    )
