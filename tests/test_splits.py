"""Fold assignment: disjoint, covering, stratified, group-aware, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from medvit.evaluate.splits import make_folds, make_repeated_folds


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
    assert (counts > 0).all() and (np.abs(counts - expected) <= 0.15 * expected + 2).all(), counts
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
    # Whole groups are stratified on their label presence (see _group_presence_per_fold).
    present, per_fold = _group_presence_per_fold(y, groups, folds, 5)
    mean = present.sum(0) / 5
    assert (per_fold > 0).all()
    assert (np.abs(per_fold - mean) <= 0.15 * mean + 2).all(), per_fold


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


# ------------------------------------------------------------------------ class-size edges
@pytest.mark.parametrize("k", [2, 5, 10])
def test_a_class_with_exactly_n_folds_members_gets_one_per_fold(k: int) -> None:
    labels = np.array([0] * 40 + [1] * 25 + [2] * k)
    for seed in range(3):
        folds = make_folds(labels, k, seed=seed)
        np.testing.assert_array_equal(np.bincount(folds[labels == 2], minlength=k), np.ones(k))
    y = np.zeros((60, 3), dtype=int)
    y[:30, 0], y[20:50, 1], y[[3, 11, 27, 38, 44, 51, 55, 57, 58, 59][:k], 2] = 1, 1, 1
    folds = make_folds(y, k, seed=0, multilabel=True)
    np.testing.assert_array_equal(np.bincount(folds[y[:, 2] == 1], minlength=k), np.ones(k))


@pytest.mark.parametrize("k", [2, 5, 10])
def test_a_class_with_n_folds_minus_one_members_is_refused(k: int) -> None:
    labels = np.array([0] * 40 + [1] * 25 + [2] * (k - 1))
    with pytest.raises(ValueError, match=f"class 2 has {k - 1} member.*n_folds={k}"):
        make_folds(labels, k, seed=0)
    groups = np.arange(len(labels)) // 2
    with pytest.raises(ValueError, match=f"class 2 has {k - 1} member"):
        make_folds(labels, k, seed=0, groups=groups)
    y = np.zeros((60, 3), dtype=int)
    y[:30, 0], y[20:50, 1], y[: k - 1, 2] = 1, 1, 1
    with pytest.raises(ValueError, match=f"label 2 has {k - 1} member"):
        make_folds(y, k, seed=0, multilabel=True)
    # A label nobody has cannot be stratified and is allowed (it harms no fold more than another).
    y[:, 2] = 0
    assert set(make_folds(y, k, seed=0, multilabel=True).tolist()) == set(range(k))


# ------------------------------------------------------- groups whose members differ in labels
def _group_presence_per_fold(
    y: np.ndarray, groups: np.ndarray, folds: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's label union (by plain loops) and, per fold, how many groups have each label."""
    union: dict = {}
    fold_of: dict = {}
    for row, g, f in zip(y, groups, folds, strict=True):
        union[g] = union.get(g, np.zeros(y.shape[1], dtype=int)) | (row != 0)
        fold_of[g] = f
    names = sorted(union)
    present = np.array([union[g] for g in names])
    group_fold = np.array([fold_of[g] for g in names])
    return present, np.stack([present[group_fold == f].sum(0) for f in range(k)])


def _reference_group_folds(present: np.ndarray, member_of: np.ndarray, k: int, seed: int):
    """Folds from iterstrat called directly on the groups' label unions."""
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    group_fold = np.full(len(present), -1)
    for fold, (_, test) in enumerate(splitter.split(np.zeros((len(present), 1)), present)):
        group_fold[test] = fold
    return group_fold[member_of]


def test_a_group_has_the_union_of_its_members_labels() -> None:
    # Hand-made: three labels, patients with one to three images of different findings.
    rows = {
        "p0": [[1, 0, 0], [0, 1, 0]],  # union 1 1 0
        "p1": [[0, 0, 1], [0, 0, 0], [0, 0, 0]],  # union 0 0 1 (last member has nothing)
        "p2": [[1, 1, 0]],  # union 1 1 0
        "p3": [[0, 1, 0], [0, 0, 1]],  # union 0 1 1
        "p4": [[1, 0, 0], [1, 0, 1], [0, 0, 0]],  # union 1 0 1
        "p5": [[0, 0, 0], [0, 1, 0]],  # union 0 1 0
        "p6": [[1, 0, 1]],  # union 1 0 1
        "p7": [[0, 0, 1], [1, 0, 0]],  # union 1 0 1
        "p8": [[0, 1, 0], [0, 1, 0], [1, 0, 0]],  # union 1 1 0
        "p9": [[0, 0, 1], [0, 1, 0]],  # union 0 1 1
    }
    union = np.array(
        [
            [1, 1, 0],
            [0, 0, 1],
            [1, 1, 0],
            [0, 1, 1],
            [1, 0, 1],
            [0, 1, 0],
            [1, 0, 1],
            [1, 0, 1],
            [1, 1, 0],
            [0, 1, 1],
        ]
    )
    y = np.array([r for g in rows.values() for r in g])
    groups = np.array([name for name, g in rows.items() for _ in g])
    member_of = np.array([int(name[1:]) for name in groups])
    for seed in range(4):
        folds = make_folds(y, 2, seed=seed, groups=groups, multilabel=True)
        present, _ = _group_presence_per_fold(y, groups, folds, 2)
        np.testing.assert_array_equal(present, union)
        np.testing.assert_array_equal(folds, _reference_group_folds(union, member_of, 2, seed))


def _patients(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """120 patients with 2-3 images each; finding 3 is seen only on a patient's first image."""
    rng = np.random.default_rng(seed)
    rows, groups = [], []
    for p in range(120):
        for i in range(int(rng.integers(2, 4))):
            row = (rng.random(4) < [0.4, 0.3, 0.15, 0.0]).astype(int)
            row[3] = i == 0 and rng.random() < 0.4
            rows.append(row)
            groups.append(f"patient-{p:03d}")
    return np.array(rows), np.array(groups)


def test_multilabel_groups_are_stratified_on_their_label_union() -> None:
    y, groups = _patients(5)
    folds = make_folds(y, 5, seed=0, groups=groups, multilabel=True)
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1, g
    present, per_fold = _group_presence_per_fold(y, groups, folds, 5)
    # Groups, and then images, spread evenly per label: within 15% of the mean plus 2.
    mean = present.sum(0) / 5
    assert (np.abs(per_fold - mean) <= 0.15 * mean + 2).all(), per_fold
    positives = np.stack([y[folds == f].sum(0) for f in range(5)])
    mean = y.sum(0) / 5
    assert (np.abs(positives - mean) <= 0.15 * mean + 2).all(), positives
    _, member_of = np.unique(groups, return_inverse=True)
    np.testing.assert_array_equal(folds, _reference_group_folds(present, member_of, 5, 0))


def test_single_label_groups_with_mixed_labels_stay_whole_and_stratified() -> None:
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(90), 3)
    # Each patient's three images mostly share a class, but a third of them mix two classes.
    labels = np.repeat(rng.choice(3, 90, p=[0.5, 0.3, 0.2]), 3)
    mixed = rng.random(90) < 0.35
    labels[np.flatnonzero(mixed) * 3 + 2] = (labels[np.flatnonzero(mixed) * 3 + 2] + 1) % 3
    folds = make_folds(labels, 5, seed=1, groups=groups)
    assert (folds.reshape(90, 3) == folds.reshape(90, 3)[:, :1]).all()
    counts = _per_fold_counts(folds, labels, 5)
    expected = np.bincount(labels)[:, None] / 5
    assert (np.abs(counts - expected) <= 0.15 * expected + 2).all(), counts


# ------------------------------------------------------------------ properties (Hypothesis)
# derandomize: the same examples on every run, so CI cannot flake; max_examples keeps it fast.
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@st.composite
def fold_problems(draw: st.DrawFn, multilabel: bool) -> tuple:
    k = draw(st.integers(2, 5))
    n = draw(st.integers(3 * k, 80))
    if multilabel:
        n_labels = draw(st.integers(2, 4))
        prevalence = draw(st.lists(st.floats(0.05, 0.7), min_size=n_labels, max_size=n_labels))
        bits = draw(st.lists(st.floats(0, 1), min_size=n * n_labels, max_size=n * n_labels))
        y = (np.array(bits).reshape(n, n_labels) < prevalence).astype(int)
    else:
        top = draw(st.integers(1, 3))
        y = np.array(draw(st.lists(st.integers(0, top), min_size=n, max_size=n)))
    groups = None
    if draw(st.booleans()):
        n_groups = draw(st.integers(k, n))
        groups = np.array(draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)))
    return y, k, groups, draw(st.integers(0, 2**16))


def _too_small(y: np.ndarray, k: int, multilabel: bool) -> bool:
    if multilabel:
        counts = y.sum(0)
        return bool(((counts > 0) & (counts < k)).any())
    return bool((np.unique(y, return_counts=True)[1] < k).any())


def _check_invariants(y, k, groups, folds, multilabel: bool) -> None:
    # Disjoint (one fold id per sample) and covering (every sample in a fold, every fold used).
    assert folds.shape == (len(y),) and set(folds.tolist()) == set(range(k))
    if groups is not None:
        for g in np.unique(groups):
            assert len(set(folds[groups == g].tolist())) == 1, f"group {g} split"
    if multilabel and groups is not None:
        # Stratified at the group level, on each group's label union.
        present, per_fold = _group_presence_per_fold(y, groups, folds, k)
        mean = present.sum(0) / k
        assert (np.abs(per_fold - mean) <= 0.15 * mean + 2).all(), per_fold
    elif multilabel:
        # Iterative stratification balances rare labels first; common co-occurring labels may
        # drift by a few samples (3.5 at worst in 1500 random problems).
        positives = np.stack([y[folds == f].sum(0) for f in range(k)])
        mean = y.sum(0) / k
        assert (np.abs(positives - mean) <= 0.15 * mean + 4).all(), positives
    else:
        counts = np.stack([np.bincount(folds[y == c], minlength=k) for c in np.unique(y)])
        if groups is None:
            assert (counts.max(1) - counts.min(1) <= 1).all(), counts
        else:
            # Whole groups move together: off by at most the largest group (+15% of the mean).
            mean = np.bincount(y)[np.unique(y)][:, None] / k
            slack = 0.15 * mean + np.bincount(groups).max()
            assert (np.abs(counts - mean) <= slack).all(), counts


@PROPERTY
@given(fold_problems(multilabel=False))
def test_property_single_label_folds(problem) -> None:
    y, k, groups, seed = problem
    assume(groups is None or len(np.unique(groups)) >= k)
    if _too_small(y, k, multilabel=False):
        with pytest.raises(ValueError, match="fewer than n_folds"):
            make_folds(y, k, seed, groups=groups)
        return
    folds = make_folds(y, k, seed, groups=groups)
    _check_invariants(y, k, groups, folds, multilabel=False)
    np.testing.assert_array_equal(folds, make_folds(y, k, seed, groups=groups))


@PROPERTY
@given(fold_problems(multilabel=True))
def test_property_multilabel_folds(problem) -> None:
    y, k, groups, seed = problem
    assume(groups is None or len(np.unique(groups)) >= k)
    if _too_small(y, k, multilabel=True):
        with pytest.raises(ValueError, match="fewer than n_folds"):
            make_folds(y, k, seed, groups=groups, multilabel=True)
        return
    folds = make_folds(y, k, seed, groups=groups, multilabel=True)
    _check_invariants(y, k, groups, folds, multilabel=True)


# ---------------------------------------------------------------- boundaries of the arguments
def test_smallest_accepted_inputs() -> None:
    # Exactly n_folds samples of one class: one sample per fold.
    np.testing.assert_array_equal(np.sort(make_folds(np.zeros(3, int), 3, seed=0)), [0, 1, 2])
    # repeats defaults to 1 and repeats=1 is accepted.
    labels = np.array([0, 1] * 6)
    assert make_repeated_folds(labels, 3, seed=0).shape == (1, 12)
    np.testing.assert_array_equal(
        make_repeated_folds(labels, 3, seed=0, repeats=1)[0], make_folds(labels, 3, seed=0)
    )


def test_multilabel_needs_an_indicator_matrix_of_at_least_two_labels() -> None:
    for bad in (np.array([0, 1] * 10), np.array([[0], [1]] * 10)):
        with pytest.raises(ValueError, match="multi-label folds need an \\(N, L\\) indicator"):
            make_folds(bad, 2, seed=0, multilabel=True)


class _LosesASample:
    """A splitter that breaks the contract make_folds relies on: sample (or group) 0 is in no
    validation fold."""

    def __init__(self, n_splits: int, **_: object) -> None:
        self.n_splits = n_splits

    def split(self, x, y, groups=None):
        rest = np.arange(1, len(x))
        for part in np.array_split(rest, self.n_splits):
            yield np.setdiff1d(rest, part), part


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("StratifiedKFold", {}), ("MultilabelStratifiedKFold", {"multilabel": True, "groups": True})],
)
def test_a_sample_left_without_a_fold_is_an_error(monkeypatch, name, kwargs) -> None:
    import medvit.evaluate.splits

    monkeypatch.setattr(medvit.evaluate.splits, name, _LosesASample)
    y = np.eye(3, dtype=int)[np.arange(30) % 3] if kwargs.get("multilabel") else np.arange(30) % 3
    groups = np.arange(30) // 2 if kwargs.get("groups") else None
    with pytest.raises(RuntimeError, match="some samples got no fold"):
        make_folds(y, 3, seed=0, groups=groups, multilabel=kwargs.get("multilabel", False))
