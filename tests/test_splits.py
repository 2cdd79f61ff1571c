"""Fold assignment: disjoint, covering, stratified, group-aware, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from medvit.splits import make_folds, make_repeated_folds


@pytest.fixture
def labels() -> np.ndarray:
    """Imbalanced 3-class labels, 203 samples (not a multiple of the fold count)."""
    rng = np.random.default_rng(0)
    return rng.choice(3, size=203, p=[0.6, 0.3, 0.1])


def _per_fold_counts(folds: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(classes, folds) sample counts."""
    return np.stack([np.bincount(folds[labels == c], minlength=k) for c in np.unique(labels)])


@pytest.mark.parametrize("k", [2, 5, 10])
def test_folds_cover_disjoint_and_stratified(labels: np.ndarray, k: int) -> None:
    folds = make_folds(labels, k, seed=0)
    assert folds.shape == labels.shape and folds.dtype.kind == "i"
    # One fold id per sample makes folds disjoint; every id in range and used makes them cover.
    assert set(folds.tolist()) == set(range(k))
    sizes = np.bincount(folds, minlength=k)
    assert sizes.sum() == len(labels) and sizes.max() - sizes.min() <= 3
    counts = _per_fold_counts(folds, labels, k)
    # Stratified: each class is spread over the folds within one sample.
    assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all(), counts


def test_labels_of_shape_n_by_1_are_accepted(labels: np.ndarray) -> None:
    np.testing.assert_array_equal(
        make_folds(labels.reshape(-1, 1), 5, seed=3), make_folds(labels, 5, seed=3)
    )


def test_folds_are_deterministic_and_seeded(labels: np.ndarray) -> None:
    a, b = make_folds(labels, 5, seed=7), make_folds(labels, 5, seed=7)
    np.testing.assert_array_equal(a, b)
    c = make_folds(labels, 5, seed=8)
    assert (a != c).mean() > 0.5


def test_repeats_differ_and_follow_seed_plus_r(labels: np.ndarray) -> None:
    folds = make_repeated_folds(labels, 4, seed=10, repeats=3)
    assert folds.shape == (3, len(labels))
    for r in range(3):
        np.testing.assert_array_equal(folds[r], make_folds(labels, 4, seed=10 + r))
        counts = _per_fold_counts(folds[r], labels, 4)
        assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all()
    # Different repeats put a sample with different companions: co-assignment differs.
    same = [folds[r][:, None] == folds[r][None, :] for r in range(3)]
    assert (same[0] != same[1]).mean() > 0.3 and (same[1] != same[2]).mean() > 0.3
    np.testing.assert_array_equal(make_repeated_folds(labels, 4, 10, 3), folds)


def test_groups_are_never_split(labels: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    groups = np.array([f"patient-{g}" for g in rng.integers(0, 60, size=len(labels))])
    folds = make_folds(labels, 5, seed=0, groups=groups)
    assert set(folds.tolist()) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1, g
    # Still stratified as far as whole groups allow: every class in every fold, none far off.
    counts = _per_fold_counts(folds, labels, 5)
    expected = np.bincount(labels)[:, None] / 5
    assert (counts > 0).all() and (np.abs(counts - expected) <= 0.5 * expected + 2).all(), counts
    np.testing.assert_array_equal(folds, make_folds(labels, 5, seed=0, groups=groups))


def test_multilabel_keeps_label_frequencies() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.05, 0.2, 0.03]).astype(np.uint8)
    folds = make_folds(y, 5, seed=0, multilabel=True)
    assert set(folds.tolist()) == set(range(5))
    positives = np.stack([y[folds == k].sum(0) for k in range(5)])
    # Iterative stratification: each label's positives are spread within one or two per fold.
    assert (positives.max(0) - positives.min(0) <= 2).all(), positives
    np.testing.assert_array_equal(folds, make_folds(y, 5, seed=0, multilabel=True))


def test_multilabel_with_groups_keeps_groups_whole() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random((300, 4)) < [0.5, 0.3, 0.2, 0.1]).astype(np.uint8)
    groups = rng.integers(0, 100, size=300)
    folds = make_folds(y, 5, seed=0, groups=groups, multilabel=True)
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1
    positives = np.stack([y[folds == k].sum(0) for k in range(5)])
    assert (positives > 0).all()
    assert (np.abs(positives - y.sum(0) / 5) <= 0.4 * y.sum(0) / 5 + 3).all(), positives


def test_errors_are_explicit(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="n_folds must be an integer >= 2"):
        make_folds(labels, 1, seed=0)
    small = np.array([0] * 20 + [1] * 20 + [2] * 3)
    with pytest.raises(ValueError, match="class 2 has 3 member"):
        make_folds(small, 5, seed=0)
    with pytest.raises(ValueError, match="distinct groups"):
        make_folds(labels, 5, seed=0, groups=np.arange(len(labels)) % 4)
    with pytest.raises(ValueError, match="one group id per sample"):
        make_folds(labels, 5, seed=0, groups=np.arange(10))
    with pytest.raises(ValueError, match="samples cannot fill"):
        make_folds(np.array([0, 1, 0]), 4, seed=0)
    with pytest.raises(ValueError, match="multilabel=True"):
        make_folds(np.zeros((10, 3)), 2, seed=0)
    with pytest.raises(ValueError, match="label 1 has 2 member"):
        y = np.zeros((30, 3), dtype=int)
        y[:15, 0], y[:2, 1], y[10:, 2] = 1, 1, 1
        make_folds(y, 5, seed=0, multilabel=True)
    with pytest.raises(ValueError, match="repeats must be"):
        make_repeated_folds(labels, 5, seed=0, repeats=0)
