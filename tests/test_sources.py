"""Data sources: folders and CSV/TSV files as a table of samples, their checks, and the splits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medvit.data.sources import (
    MAX_LISTED,
    DataSourceError,
    Problem,
    Table,
    bad_files,
    check,
    drop,
    load_table,
    make_splits,
    read_csv,
    scan_folder,
    validate,
    with_splits,
)

FAKE_PNG = b"\x89PNG\r\n\x1a\n fake"  # never decoded here: only the file's existence and size


def touch(path: Path, content: bytes = FAKE_PNG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def write_csv(path: Path, header: str, rows: list[str], sep: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header.replace(",", sep)] + [r.replace(",", sep) for r in rows]))
    return path


def error_of(table: Table) -> str:
    with pytest.raises(DataSourceError) as info:
        check(table)
    return str(info.value)


def problem(problems: list[Problem], kind: str) -> Problem:
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, [p.kind for p in problems]
    return found[0]


# --- folders -------------------------------------------------------------------------------------


def test_folder_of_class_folders(tmp_path: Path) -> None:
    for name in ("b.png", "a.PNG", "deep/c.jpg"):
        touch(tmp_path / "pneumonia" / name)
    touch(tmp_path / "normal" / "x.tiff")
    touch(tmp_path / "normal" / "1.2.840.10008.5", b"\0" * 128 + b"DICM" + b"rest")
    touch(tmp_path / "normal" / "notes.txt", b"not an image")
    touch(tmp_path / "normal" / ".DS_Store", b"junk")
    touch(tmp_path / "normal" / "noext", b"\0" * 200)  # no DICOM magic: not an image
    table = scan_folder(tmp_path)
    assert table.class_names == ["normal", "pneumonia"] and table.task == "binary"
    assert table.rel_paths() == [
        "normal/1.2.840.10008.5",
        "normal/x.tiff",
        "pneumonia/a.PNG",
        "pneumonia/b.png",
        "pneumonia/deep/c.jpg",
    ]
    assert table.labels.tolist() == [0, 0, 1, 1, 1] and table.labels.dtype == np.int64
    assert table.splits is None and table.patient_ids is None and table.root == tmp_path
    assert validate(table) == [] and check(table) is table


def test_folder_with_split_folders(tmp_path: Path) -> None:
    for split in ("train", "Valid", "test"):
        for c, n in (("cat", 2), ("dog", 1), ("eel", 1)):
            for i in range(n):
                touch(tmp_path / split / c / f"{i}.png")
    table = load_table(tmp_path)
    assert table.class_names == ["cat", "dog", "eel"] and table.task == "multiclass"
    assert table.splits.tolist() == ["train"] * 4 + ["val"] * 4 + ["test"] * 4
    assert table.rel_paths()[4:8] == ["Valid/cat/0.png", "Valid/cat/1.png", "Valid/dog/0.png",
                                      "Valid/eel/0.png"]  # fmt: skip
    assert table.labels.tolist() == [0, 0, 1, 2] * 3


def test_folder_grades_sort_numerically_for_ordinal(tmp_path: Path) -> None:
    for grade in ("0", "2", "10", "1"):
        touch(tmp_path / grade / "a.png")
    table = scan_folder(tmp_path, task="ordinal")
    assert table.class_names == ["0", "1", "2", "10"] and table.task == "ordinal"
    assert table.labels.tolist() == [0, 1, 2, 3]
    assert table.rel_paths() == ["0/a.png", "1/a.png", "2/a.png", "10/a.png"]


def test_folder_mixing_split_and_class_folders_is_refused(tmp_path: Path) -> None:
    touch(tmp_path / "train" / "a" / "0.png")
    touch(tmp_path / "benign" / "0.png")
    with pytest.raises(DataSourceError, match=r"folders beside train/val/test .*\]: benign"):
        scan_folder(tmp_path)


# --- CSV and TSV ---------------------------------------------------------------------------------


def test_csv_with_class_names_patients_splits_and_extra_columns(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / "img" / f"{i}.png")
    absolute = touch(tmp_path / "elsewhere" / "z.png")
    csv = write_csv(
        tmp_path / "data" / "labels.csv",
        "path,label,patient_id,split,age",
        ["../img/0.png,nevus,p1,train,31", "../img/1.png,melanoma,p1,train,31",
         "../img/2.png,nevus,p2,Validation,40", f"{absolute},keratosis,p3,test,52",
         "../img/3.png, melanoma ,p4,TEST,60"],
    )  # fmt: skip
    table = read_csv(csv)
    assert table.class_names == ["keratosis", "melanoma", "nevus"] and table.task == "multiclass"
    assert table.labels.tolist() == [2, 1, 2, 0, 1]
    assert table.root == csv.parent and table.paths[0] == tmp_path / "img" / "0.png"
    assert table.paths[3] == absolute and table.rel_paths()[3] == str(absolute)
    assert table.patient_ids.tolist() == ["p1", "p1", "p2", "p3", "p4"]
    assert table.splits.tolist() == ["train", "train", "val", "test", "test"]
    assert list(table.extra) == ["age"] and table.extra["age"].tolist() == ["31", "31", "40",
                                                                            "52", "60"]  # fmt: skip
    assert validate(table) == []


def test_csv_integer_labels_are_used_as_given(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / f"{i}.png")
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label", [
        "0.png,2", "1.png,0", "2.png,1", "3.png,1.0"]))  # fmt: skip
    assert table.class_names == ["0", "1", "2"] and table.labels.tolist() == [2, 0, 1, 1]
    assert table.task == "multiclass" and table.patient_ids is None and table.splits is None
    assert validate(table) == []


def test_csv_integer_labels_with_a_gap_is_an_empty_class(tmp_path: Path) -> None:
    # A gap is reported, never renumbered: label 3 must stay class 3 for the user's other tools.
    for i in range(3):
        touch(tmp_path / f"{i}.png")
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label", ["0.png,0", "1.png,1", "2.png,3"]))
    assert table.class_names == ["0", "1", "2", "3"] and table.labels.tolist() == [0, 1, 3]
    assert "empty classes (no usable sample has them) [1]: 2" in error_of(table)


def test_csv_multilabel_findings_auto_and_named(tmp_path: Path) -> None:
    for i in range(3):
        touch(tmp_path / f"{i}.png")
    rows = ["0.png,1,0,1.0,0,p1", "1.png,0,1,0,1,p2", "2.png,0,0,0,1,p3"]
    csv = write_csv(tmp_path / "l.csv", "path,Effusion,Mass,Nodule,sex,patient_id", rows)
    auto = read_csv(csv)
    assert read_csv(csv, task="multilabel").class_names == auto.class_names
    assert auto.task == "multilabel" and auto.class_names == ["Effusion", "Mass", "Nodule", "sex"]
    assert auto.labels.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1]]
    named = read_csv(csv, label_columns=["Nodule", "Mass"])
    assert named.class_names == ["Nodule", "Mass"] and named.task == "multilabel"
    assert named.labels.tolist() == [[1, 0], [0, 1], [0, 0]]
    assert named.extra["sex"].tolist() == ["0", "1", "1"] and "Effusion" in named.extra
    assert validate(named) == []  # a finding no row has would be an empty class; both occur


def test_csv_ordinal_grades(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / f"{i}.png")
    csv = write_csv(tmp_path / "l.csv", "path,grade", ["0.png,0", "1.png,4", "2.png,2",
                                                     "3.png,1"])  # fmt: skip
    table = read_csv(csv, label_column="grade", task="ordinal")
    assert table.task == "ordinal" and table.class_names == ["0", "1", "2", "3", "4"]
    assert table.labels.tolist() == [0, 4, 2, 1]
    assert "empty classes (no usable sample has them) [1]: 3" in error_of(table)
    named = read_csv(csv, label_column="grade", task="ordinal", class_names=list("ABCDE"))
    assert named.class_names == list("ABCDE") and named.labels.tolist() == [0, 4, 2, 1]


def test_tsv_and_custom_column_names(tmp_path: Path) -> None:
    for i in range(3):
        touch(tmp_path / "x" / f"{i}.dcm")
    rows = ["x/0.dcm,no,s1,train", "x/1.dcm,yes,s2,val", "x/2.dcm,yes,s3,test"]
    header = "file,finding,subject,fold"
    options = dict(path_column="file", label_column="finding", patient_column="subject",
                   split_column="fold")  # fmt: skip
    for name, sep in (("l.tsv", "\t"), ("l.txt", "\t"), ("semi.csv", ";")):
        table = read_csv(write_csv(tmp_path / name, header, rows, sep), **options)
        assert table.class_names == ["no", "yes"] and table.task == "binary", name
        assert table.labels.tolist() == [0, 1, 1] and table.rel_paths()[2] == "x/2.dcm", name
        assert table.patient_ids.tolist() == ["s1", "s2", "s3"], name
        assert table.splits.tolist() == ["train", "val", "test"] and table.extra == {}, name


def test_load_table_dispatches_and_refuses_csv_options_for_a_folder(tmp_path: Path) -> None:
    for c in ("a", "b", "c"):
        touch(tmp_path / "imgs" / c / "0.png")
    csv = write_csv(tmp_path / "l.csv", "path,label", ["imgs/a/0.png,a", "imgs/b/0.png,b"])
    assert load_table(csv).rel_paths() == ["imgs/a/0.png", "imgs/b/0.png"]
    # Options left at their defaults are fine for a folder; a CSV-only choice is a mistake.
    assert load_table(tmp_path / "imgs", path_column="path", task=None).class_names == list("abc")
    with pytest.raises(ValueError, match=r"is a folder; options \['label_column'\] are for a CSV"):
        load_table(tmp_path / "imgs", label_column="diagnosis")
    with pytest.raises(ValueError, match="task='binary' needs 2 classes, found 3"):
        load_table(tmp_path / "imgs", task="binary")
    with pytest.raises(ValueError, match="task must be one of binary, multiclass"):
        load_table(csv, task="regression")
    with pytest.raises(DataSourceError, match=r"no such file \[1\]: .*nothere.csv"):
        load_table(tmp_path / "nothere.csv")


# --- bad input: one DataSourceError listing everything -------------------------------------------


def test_missing_files_are_listed_first_20_with_count(tmp_path: Path) -> None:
    touch(tmp_path / "here.png")
    rows = ["here.png,a", "here.png,b"] + [f"gone/{i:02d}.png,a" for i in range(25)]
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label", rows))
    message = error_of(table)
    kind = "missing files (not found, or not a regular file)"
    assert f"{kind} [25, first {MAX_LISTED} shown]: gone/00.png, gone/01.png" in message
    assert "gone/19.png" in message and "gone/20.png" not in message
    assert message.startswith(f"{tmp_path / 'l.csv'}: 2 problems in the data:")
    assert "duplicate paths (listed twice or more) [1]: here.png (2 rows)" in message
    missing = problem(validate(table), "missing files")
    assert missing.skippable and len(missing.paths) == 25


def test_empty_files(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "ok.png")
    touch(tmp_path / "a" / "zero.png", b"")
    touch(tmp_path / "b" / "ok.png")
    message = error_of(scan_folder(tmp_path))
    assert "1 problem in the data" in message
    assert "empty files (0 bytes) [1]: a/zero.png" in message


def test_unknown_labels_not_in_class_names(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / f"{i}.png")
    rows = ["0.png,benign", "1.png,malignant", "2.png,malign", "3.png,"]
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label", rows),
                     class_names=["benign", "malignant"])  # fmt: skip
    assert table.rel_paths() == ["0.png", "1.png"]  # the unknown rows are left out
    message = error_of(table)
    assert "unknown labels (not in class_names ['benign', 'malignant']" in message
    assert "[2]: 2.png (malign), 3.png (empty)" in message


def test_unknown_labels_in_finding_columns_and_grades(tmp_path: Path) -> None:
    for i in range(3):
        touch(tmp_path / f"{i}.png")
    findings = write_csv(tmp_path / "f.csv", "path,A,B", ["0.png,1,0", "1.png,-1,1", "2.png,0,"])
    message = error_of(read_csv(findings, label_columns=["A", "B"]))
    assert "unknown labels (finding columns take 0 or 1) [2]: 1.png (A=-1), 2.png (B=empty)" in (
        message
    )
    grades = write_csv(tmp_path / "g.csv", "path,label", ["0.png,1", "1.png,0", "2.png,1.5"])
    message = error_of(read_csv(grades, task="ordinal"))
    assert "unknown labels (labels must be integers >= 0) [1]: 2.png (1.5)" in message


def test_unknown_class_folder_and_empty_class_folder(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "0.png")
    touch(tmp_path / "b" / "0.png")
    touch(tmp_path / "zz" / "0.png")
    (tmp_path / "empty").mkdir()
    table = scan_folder(tmp_path, class_names=["a", "b", "c"])
    message = error_of(table)
    assert "unknown labels (class folders not in class_names ['a', 'b', 'c']) [1]: zz/0.png" in (
        message
    )
    assert "empty classes (no usable sample has them) [1]: c" in message
    assert "empty classes (no usable sample has them) [1]: empty" in error_of(scan_folder(tmp_path))


def test_class_name_without_rows_is_an_empty_class(tmp_path: Path) -> None:
    touch(tmp_path / "0.png")
    touch(tmp_path / "1.png")
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label", ["0.png,a", "1.png,c"]),
                     class_names=["a", "b", "c"])  # fmt: skip
    assert table.labels.tolist() == [0, 2]
    assert "empty classes (no usable sample has them) [1]: b" in error_of(table)


def test_duplicate_paths_over_20(tmp_path: Path) -> None:
    rows = []
    for i in range(23):
        touch(tmp_path / f"{i:02d}.png")
        rows += [f"{i:02d}.png,a", f"./{i:02d}.png,b"]  # the same file, written two ways
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label", rows))
    message = error_of(table)
    assert "duplicate paths (listed twice or more) [23, first 20 shown]: 00.png (2 rows)" in message
    assert "19.png (2 rows)" in message and "20.png" not in message
    assert len(problem(validate(table), "duplicate paths").paths) == 23


def test_csv_without_the_named_columns_names_its_columns(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "l.csv", "file,diagnosis,age", ["0.png,a,3"])
    with pytest.raises(DataSourceError) as info:
        read_csv(csv)
    assert "missing columns (columns found: file, diagnosis, age) [2]: path, label" in str(
        info.value
    )
    with pytest.raises(DataSourceError, match=r"\[1\]: subject"):
        read_csv(csv, path_column="file", label_column="diagnosis", patient_column="subject")
    with pytest.raises(DataSourceError, match=r"\[2\]: X, Y"):
        read_csv(csv, path_column="file", label_columns=["X", "Y", "age"])


def test_unknown_split_values(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / f"{i}.png")
    rows = ["0.png,a,train", "1.png,b,holdout", "2.png,a,", "3.png,b,test"]
    message = error_of(read_csv(write_csv(tmp_path / "l.csv", "path,label,split", rows)))
    assert "unknown splits (column 'split' takes train, val, test) [2]: 1.png (holdout), " in (
        message
    )
    assert "2.png (empty)" in message


def test_patient_in_two_explicit_splits_is_a_leak(tmp_path: Path) -> None:
    for i in range(5):
        touch(tmp_path / f"{i}.png")
    rows = ["0.png,a,p1,train", "1.png,b,p1,test", "2.png,a,p2,val", "3.png,b,p2,val",
            "4.png,a,p3,train"]  # fmt: skip
    message = error_of(read_csv(write_csv(tmp_path / "l.csv", "path,label,patient_id,split", rows)))
    assert "patients in several splits (a patient leak) [1]: p1 (test, train)" in message


def test_every_problem_in_one_error(tmp_path: Path) -> None:
    touch(tmp_path / "ok.png")
    touch(tmp_path / "zero.png", b"")
    rows = ["ok.png,a,p1,train", "zero.png,a,p2,train", "gone.png,b,p3,nope", "ok.png,a,p1,train",
            "x.png,a,,val", "short.png"]  # fmt: skip
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label,patient_id,split", rows))
    problems = validate(table)
    assert sorted(p.kind for p in problems) == sorted([
        "malformed rows", "unknown splits", "missing patient ids", "missing files",
        "empty files", "duplicate paths", "empty classes"])  # fmt: skip
    # Class b's only row was left out for its split, so b has no usable sample either.
    assert problem(problems, "empty classes").items == ("b",)
    # gone.png is left out for its split and still reported missing: nothing hides behind another.
    assert problem(problems, "missing files").items == ("gone.png", "x.png")
    assert problem(problems, "malformed rows").items == ("line 7",)
    assert "7 problems in the data" in error_of(table)


def test_too_few_classes_no_samples_empty_paths_and_an_absent_finding(tmp_path: Path) -> None:
    touch(tmp_path / "only" / "0.png")
    assert "too few classes (need at least 2) [1]: only" in error_of(scan_folder(tmp_path))
    header_only = write_csv(tmp_path / "h.csv", "path,label", [])
    assert f"no samples [1]: {header_only}" in error_of(read_csv(header_only))
    rows = ["only/0.png,1,0,0", ",0,1,0", "only/0.png,1,0,0"]
    table = read_csv(write_csv(tmp_path / "f.csv", "path,A,B,C", rows))
    message = error_of(table)
    assert "empty paths (column 'path') [1]: line 3" in message
    # B's only positive row has no path, and no row has C: neither can be learned or measured.
    assert "empty classes (no usable sample has them) [2]: B, C" in message
    assert "duplicate paths (listed twice or more) [1]: only/0.png (2 rows)" in message


def test_drop_leaves_out_bad_files_for_skip(tmp_path: Path) -> None:
    for i in range(4):
        touch(tmp_path / "c" / f"{i}.png", b"" if i == 1 else FAKE_PNG)
        touch(tmp_path / "d" / f"{i}.png")
    (tmp_path / "c" / "2.png").unlink()
    rows = [f"c/{i}.png,c,p{i},train" for i in range(4)] + [f"d/{i}.png,d,q{i},test"
                                                            for i in range(4)]  # fmt: skip
    table = read_csv(write_csv(tmp_path / "l.csv", "path,label,patient_id,split,note", [
        r + f",n{i}" for i, r in enumerate(rows)]))  # fmt: skip
    bad = bad_files(validate(table))
    assert [p.name for p in bad] == ["2.png", "1.png"]  # missing, then empty
    kept = drop(table, bad)
    assert kept.rel_paths() == ["c/0.png", "c/3.png"] + [f"d/{i}.png" for i in range(4)]
    assert kept.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert kept.patient_ids.tolist() == ["p0", "p3", "q0", "q1", "q2", "q3"]
    assert kept.splits.tolist() == ["train"] * 2 + ["test"] * 4
    assert kept.extra["note"].tolist() == ["n0", "n3", "n4", "n5", "n6", "n7"]
    assert validate(kept) == [] and len(table) == 8  # the original is untouched
    assert drop(table, ["c/0.png"]).rel_paths()[0] == "c/1.png"  # relative to the root too
    with pytest.raises(ValueError, match="not in the table: .*nowhere.png"):
        drop(table, ["nowhere.png"])


# --- splits --------------------------------------------------------------------------------------


def _fractions(splits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.array([(splits[mask] == s).mean() for s in ("train", "val", "test")])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    val=st.sampled_from([0.0, 0.1, 0.15, 0.25]),
    test=st.sampled_from([0.1, 0.2, 0.3]),
    n_patients=st.integers(5, 120),
    multilabel=st.booleans(),
)
def test_no_patient_in_two_splits(
    seed: int, val: float, test: float, n_patients: int, multilabel: bool
) -> None:
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, n_patients, size=300).astype(str)
    labels = (
        (rng.random((300, 4)) < [0.5, 0.3, 0.1, 0.05]).astype(np.int64)
        if multilabel
        else rng.choice(3, size=300, p=[0.6, 0.3, 0.1])
    )
    splits = make_splits(labels, patients, val, test, seed)
    assert splits.shape == (300,) and set(splits) <= {"train", "val", "test"}
    for pid in np.unique(patients):
        assert len(set(splits[patients == pid])) == 1, pid
    if val == 0:
        assert "val" not in splits
    if n_patients >= 60:  # patients small enough for every split (~5 rows each; val >= 30 rows)
        assert set(splits) == ({"train", "val", "test"} if val else {"train", "test"})
    np.testing.assert_array_equal(splits, make_splits(labels, patients, val, test, seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("val", "test"), [(0.1, 0.2), (0.15, 0.15), (0.2, 0.1)])
def test_splits_are_stratified_with_and_without_patients(seed: int, val: float, test: float):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=600, p=[0.6, 0.3, 0.1])
    target = np.array([1 - val - test, val, test])
    rows = make_splits(labels, None, val, test, seed)
    for c in range(3):  # one row per patient: within one sample per class and split
        counts = _fractions(rows, labels == c) * (labels == c).sum()
        assert np.abs(counts - target * (labels == c).sum()).max() <= 1.5, (c, counts)
    patients = rng.integers(0, 200, size=600)  # ~3 rows per patient, mixed classes
    grouped = make_splits(labels, patients, val, test, seed)
    for c in range(3):
        got = _fractions(grouped, labels == c)
        assert np.abs(got - target).max() <= 0.035, (c, got)  # random: ~0.09
    assert np.abs(_fractions(grouped, np.ones(600, bool)) - target).max() <= 0.03


def test_multilabel_splits_keep_finding_frequencies() -> None:
    rng = np.random.default_rng(5)
    labels = (rng.random((800, 5)) < [0.4, 0.2, 0.1, 0.05, 0.0]).astype(np.int64)
    patients = rng.integers(0, 300, size=800)
    splits = make_splits(labels, patients, 0.1, 0.2, seed=3)
    target = np.array([0.7, 0.1, 0.2])
    for j in range(4):
        got = _fractions(splits, labels[:, j] == 1)
        assert np.abs(got - target).max() <= 0.03, (j, got)
    got = _fractions(splits, labels.sum(1) == 0)  # rows with no finding are stratified too
    assert np.abs(got - target).max() <= 0.03, got


def test_splits_are_seeded_and_a_rare_class_reaches_every_split() -> None:
    labels = np.array([0] * 50 + [1] * 3)
    a, b = make_splits(labels, None, 0.1, 0.2, seed=4), make_splits(labels, None, 0.1, 0.2, 4)
    np.testing.assert_array_equal(a, b)
    assert (a != make_splits(labels, None, 0.1, 0.2, seed=5)).sum() > 5
    assert sorted(a[labels == 1]) == ["test", "train", "val"]
    # Patient ids are compared as strings and their row order does not matter.
    pids = np.arange(53)[::-1]
    np.testing.assert_array_equal(make_splits(labels, pids, 0.1, 0.2, 4),
                                  make_splits(labels, pids.astype(str), 0.1, 0.2, 4))  # fmt: skip


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to less than 1"):
        make_splits([0, 1, 0, 1], None, 0.5, 0.5)
    with pytest.raises(ValueError, match="must be >= 0"):
        make_splits([0, 1], None, -0.1, 0.2)


def test_with_splits_keeps_explicit_splits_and_carves_val_from_train(tmp_path: Path) -> None:
    for split, n in (("train", 40), ("test", 10)):
        for c in ("a", "b"):
            for i in range(n // 2):
                touch(tmp_path / split / c / f"{i}.png")
    table = scan_folder(tmp_path)
    carved = with_splits(table, val_fraction=0.1, seed=0)
    assert (carved.splits == "val").sum() == 5 and (carved.splits == "test").sum() == 10
    assert (carved.splits[table.splits == "test"] == "test").all()  # test is kept as given
    assert sorted(carved.labels[carved.splits == "val"].tolist())[::4] == [0, 1]
    assert with_splits(table, val_fraction=0.0).splits is table.splits
    full = with_splits(carved, 0.3, 0.3)
    assert full is carved  # explicit splits with val: used as given
    made = with_splits(replace(table, splits=None), 0.2, 0.2)
    assert sorted(np.unique(made.splits, return_counts=True)[1].tolist()) == [10, 10, 30]
