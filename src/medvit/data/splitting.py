"""Seeded, stratified, patient-grouped train/val/test splits of a data source's rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medvit.data.sources import Table

__all__ = ["SPLIT_NAMES", "make_splits", "with_splits"]

SPLIT_NAMES = ("train", "val", "test")


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
