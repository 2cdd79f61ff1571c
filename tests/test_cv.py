"""``medvit cv``: folds file, per-fold runs, resume, refusal of a changed setup, summary, wandb.

Fast tests replace the fold process by a fake that writes a run folder, so the orchestration
(skip, resume, failure, summary) is checked in seconds on synthetic data; the slow tests run
the real command on BreastMNIST, interrupt it with a signal during fold 2 and resume it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import yaml
from conftest import short_trainer_args
from scipy import stats
from sklearn.metrics import roc_auc_score

from medvit import cv
from medvit.cv import runner
from medvit.data.medmnist import MedMNISTDataModule
from medvit.runs import read_folds

REPO = Path(__file__).resolve().parents[1]


class PauseOnce(L.Callback):
    """Test helper run inside a fold process: pause one fold so the test can kill the CV.

    At the start of epoch ``epoch`` of the run folder named ``run`` (after the previous epoch's
    ``last.ckpt`` was written), create ``marker`` holding this process id and sleep, once: when
    ``marker`` already exists the callback does nothing, so the resumed fold trains normally.
    """

    def __init__(self, marker: str, run: str = "r0-f1", epoch: int = 1, seconds: float = 600):
        self.marker, self.run, self.epoch, self.seconds = Path(marker), run, epoch, seconds

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        here = Path(trainer.default_root_dir).name
        if here == self.run and trainer.current_epoch == self.epoch and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(self.seconds)  # bounded, so a test that dies cannot leave it forever


# ------------------------------------------------------------------------------- fast tests
def _config(root: Path, **changes: Any) -> dict[str, Any]:
    """A resolved fit config as ``medvit fit --print_config`` gives it (the parts cv reads)."""
    config: dict[str, Any] = {
        "seed_everything": 42,
        "trainer": {"max_epochs": 1, "devices": 1, "enable_progress_bar": None},
        "model": {"model_name": "vit_tiny_patch16_224", "lr": 0.001},
        "data": {
            "flag": "breastmnist",
            "size": 28,
            "root": str(root),
            "global_batch_size": 8,
            "num_workers": 0,
            "download": False,
            "verify_md5": False,
            "cache_dir": None,
            "base_url": None,
            "folds_file": None,
            "fold": None,
            "repeat": 0,
        },
        "checkpoint": {"dirpath": None, "save_last": True, "monitor": "val/auroc"},
        "run": {"root": "runs", "name": None, "dir": None, "test_after_fit": True},
        "wandb": {"enabled": False, "project": "medvit", "mode": "auto", "group": None},
        "ckpt_path": None,
    }
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


class FakeFit:
    """Stands in for ``launch``: writes a finished (or failed, checkpointed) run folder."""

    def __init__(self, fail: dict[str, bool] | None = None, n_test: int = 16) -> None:
        self.fail = fail or {}  # run name -> leave a last.ckpt before failing
        self.n_test = n_test
        self.calls: list[dict[str, Any]] = []

    def __call__(self, cmd: list[str], log_path: Path) -> int:
        def opt(flag: str) -> str | None:
            return cmd[cmd.index(flag) + 1] if flag in cmd else None

        run_dir = Path(opt("--run.dir"))
        name = run_dir.name
        self.calls.append(
            {
                "run": name,
                "cmd": cmd,
                "ckpt_path": opt("--ckpt_path"),
                "existed": run_dir.exists(),
                "wandb_name": opt("--wandb.name"),
            }
        )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as fh:
            fh.write(f"fake fit {name}\n")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text("fake: true\n")
        repeat, fold = int(opt("--data.repeat")), int(opt("--data.fold"))
        val = {"auroc": 0.6 + 0.05 * fold + 0.01 * repeat, "acc": 0.7 - 0.02 * fold, "loss": 0.5}
        if name in self.fail:
            if self.fail[name]:
                (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
            (run_dir / "metrics.json").write_text(json.dumps({"val": val}))
            return 1
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
        # Predictions stored in a shuffled order: the ensemble must align them by index.
        rng = np.random.default_rng(100 * repeat + fold)
        index = rng.permutation(self.n_test)
        target = index % 2
        p1 = np.clip(0.3 + 0.4 * target + rng.normal(0, 0.25, self.n_test), 0.01, 0.99)
        probs = np.stack([1 - p1, p1], axis=1).astype(np.float32)
        np.savez(
            run_dir / "test_predictions.npz",
            index=index,
            probs=probs,
            target=target,
            class_names=np.array(["malignant", "normal, benign"]),
            task=np.array("binary"),
        )
        test = {"auroc": float(roc_auc_score(target, p1)), "acc": 0.5 + 0.1 * fold, "loss": 0.4}
        (run_dir / "metrics.json").write_text(
            json.dumps({"val": val, "best_epoch": 0, "test": test})
        )
        return 0


@pytest.fixture
def fake_cv(synthetic_root, monkeypatch, tmp_path):
    """Factory running ``run_cv`` on synthetic BreastMNIST with a fake fit (no subprocess)."""
    root = synthetic_root("breastmnist", n=(40, 12, 16))

    def run(argv: list[str], fit: FakeFit, **config_changes: Any) -> int:
        monkeypatch.setattr(
            runner, "resolve_fit_config", lambda args: _config(root, **config_changes)
        )
        monkeypatch.setattr(runner, "launch", fit)
        return runner.run_cv(["--cv-dir", str(tmp_path / "cv"), *argv])

    run.root = root
    run.cv_dir = tmp_path / "cv"
    return run


def test_parse_args_separates_cv_and_fit_options() -> None:
    args, fit_args = cv.parse_args(
        ["-c", "x.yaml", "--folds", "3", "--trainer.max_epochs", "1", "--seed=4", "--pool", "train"]
    )
    assert (args.folds, args.seed, args.repeats, args.pool) == (3, 4, 1, "train")
    assert fit_args == ["-c", "x.yaml", "--trainer.max_epochs", "1"]
    for reserved in (["--run.dir", "x"], ["--data.fold=1"], ["--ckpt_path", "a.ckpt"]):
        with pytest.raises(SystemExit):
            cv.parse_args(["-c", "x.yaml", *reserved])


def test_config_fingerprint_ignores_only_volatile_keys(tmp_path: Path) -> None:
    base = cv.config_fingerprint(_config(tmp_path))[1]
    same = _config(tmp_path, **{"data.num_workers": 4, "run.name": "x", "wandb.enabled": True})
    assert cv.config_fingerprint(same)[1] == base
    kept, changed = cv.config_fingerprint(_config(tmp_path, **{"model.lr": 0.01}))
    assert changed != base and kept["model.lr"] == 0.01 and "data.root" not in kept


def test_aggregate_matches_student_t() -> None:
    values = [0.81, 0.84, 0.79, 0.86, 0.83]
    agg = cv.aggregate(values)
    sem = np.std(values, ddof=1) / np.sqrt(5)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=sem)
    assert agg["n"] == 5 and agg["mean"] == pytest.approx(np.mean(values))
    assert agg["std"] == pytest.approx(np.std(values, ddof=1))
    assert (agg["ci95_low"], agg["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    one = cv.aggregate([0.8])
    assert one["mean"] == 0.8 and one["std"] is None and one["ci95_low"] is None


def test_confidence_intervals_stay_inside_each_metrics_range() -> None:
    # Two folds: t(0.975, 1) = 12.7, so the raw interval leaves [0, 1] (seen: acc up to 1.147,
    # ECE down to -0.80).
    acc = cv.aggregate([0.95, 0.70], cv.METRIC_RANGES["acc"])
    ece = cv.aggregate([0.02, 0.30], cv.METRIC_RANGES["ece"])
    qwk = cv.aggregate([-0.9, 0.9], cv.METRIC_RANGES["qwk"])
    assert (acc["ci95_low"], acc["ci95_high"]) == (0.0, 1.0)
    assert (ece["ci95_low"], ece["ci95_high"]) == (0.0, 1.0)
    assert (qwk["ci95_low"], qwk["ci95_high"]) == (-1.0, 1.0)
    # Inside the range nothing changes.
    narrow = cv.aggregate([0.81, 0.84, 0.79, 0.86, 0.83], cv.METRIC_RANGES["auroc"])
    assert narrow == cv.aggregate([0.81, 0.84, 0.79, 0.86, 0.83])
    summary = {
        "runs": [
            {"run": f"fold-{i}", "fold": i, "val": {"acc": v}, "test": {}}
            for i, v in enumerate((0.95, 0.70))
        ],
        "runs_completed": 2,
        "runs_expected": 2,
        "val": {"acc": acc},
        "test": {},
        "ensemble": None,
        "missing": [],
        "ci_method": cv.CI_METHOD,
    }
    table = cv.format_table(summary)
    assert "clipped to the metric's range" in table
    assert "Only 2 runs: t(0.975, 1) = 12.7" in table and "--repeats 3" in table


def test_offline_cv_prints_one_wandb_sync_command_for_every_run(tmp_path) -> None:
    runs = [
        tmp_path / "runs" / "fold-0" / "wandb" / "offline-run-20261130_000000-a",
        tmp_path / "runs" / "fold-1" / "wandb" / "offline-run-20261130_000001-b",
        tmp_path / "wandb" / "offline-run-20261130_000002-summary",
    ]
    for run in runs:
        run.mkdir(parents=True)
    offline = {"enabled": True, "mode": "offline"}
    command = cv.wandb_sync_command(tmp_path, offline)
    assert command == "wandb sync " + " ".join(str(r) for r in sorted(runs))
    assert cv.wandb_sync_command(tmp_path, {"enabled": False, "mode": "offline"}) is None
    assert cv.wandb_sync_command(tmp_path, {"enabled": True, "mode": "disabled"}) is None


def test_cv_writes_folds_runs_and_summary_and_resumes(fake_cv, capsys) -> None:
    fit = FakeFit(fail={"r0-f1": True, "r1-f0": False})
    code = fake_cv(["--folds", "2", "--repeats", "2", "--seed", "3"], fit)
    cv_dir = fake_cv.cv_dir
    assert code == 1
    assert [c["run"] for c in fit.calls] == ["r0-f0", "r0-f1", "r1-f0", "r1-f1"]
    assert [c["wandb_name"] for c in fit.calls] == [
        "r0-fold-0",
        "r0-fold-1",
        "r1-fold-0",
        "r1-fold-1",
    ]
    first = fit.calls[0]["cmd"]
    assert first[first.index("--data.folds_file") + 1] == str(cv_dir / "folds.csv")
    assert first[first.index("--wandb.group") + 1] == "breastmnist"
    assert first[first.index("--wandb.job_type") + 1] == "fold"
    assert all(c["ckpt_path"] is None for c in fit.calls)

    # folds.csv: every pool sample once per repeat, its official label, stratified folds.
    with open(cv_dir / "folds.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        assert reader.fieldnames == ["split", "index", "repeat", "fold", "label"]
    with np.load(fake_cv.root / "breastmnist.npz") as npz:
        official = {s: npz[f"{s}_labels"][:, 0] for s in ("train", "val")}
    for r in (0, 1):
        mine = [row for row in rows if row["repeat"] == str(r)]
        keys = sorted((row["split"], int(row["index"])) for row in mine)
        assert keys == sorted([("train", i) for i in range(40)] + [("val", i) for i in range(12)])
        assert all(int(row["label"]) == official[row["split"]][int(row["index"])] for row in mine)
        counts = np.zeros((2, 2), dtype=int)
        for row in mine:
            counts[int(row["label"]), int(row["fold"])] += 1
        assert (np.abs(counts[:, 0] - counts[:, 1]) <= 1).all()
    # The DataModule consumes it: fold 1 of repeat 1 is the validation set, the rest trains.
    dm = MedMNISTDataModule(
        root=str(fake_cv.root),
        verify_md5=False,
        download=False,
        num_workers=0,
        folds_file=str(cv_dir / "folds.csv"),
        fold=1,
        repeat=1,
    )
    dm.setup("fit")
    folds_r1 = read_folds(cv_dir / "folds.csv", repeat=1)
    assert len(dm.data_val) == (folds_r1["fold"] == 1).sum()
    assert len(dm.data_train) + len(dm.data_val) == 52

    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["runs_expected"] == 4 and summary["runs_completed"] == 2
    done = {r["run"]: r for r in summary["runs"]}
    n_val = {
        (r, k): sum(row["repeat"] == str(r) and row["fold"] == str(k) for row in rows)
        for r in (0, 1)
        for k in (0, 1)
    }
    assert (done["r0-f0"]["n_train"], done["r0-f0"]["n_val"]) == (52 - n_val[0, 0], n_val[0, 0])
    assert (done["r1-f1"]["n_train"], done["r1-f1"]["n_val"]) == (52 - n_val[1, 1], n_val[1, 1])
    assert not summary["complete"]
    missing = {m["run"]: m for m in summary["missing"]}
    assert set(missing) == {"r0-f1", "r1-f0"}
    assert missing["r0-f1"]["reason"] == "failed (exit code 1)"
    assert Path(missing["r0-f1"]["log"]) == cv_dir / "logs" / "r0-f1.log"
    assert Path(missing["r0-f1"]["log"]).read_text().startswith("fake fit r0-f1")
    # The statistics cover the finished runs only, and say so.
    assert summary["test"]["auroc"]["n"] == 2
    out = capsys.readouterr()
    assert "MISSING r0-f1: failed (exit code 1)" in out.out
    assert "[r0-f1: fold 2/2, repeat 1/2] FAILED (exit code 1)" in out.out
    assert "2 of 4 runs are missing" in out.err

    # Rerun: finished runs are skipped; a checkpointed run resumes; a stale one starts over.
    (cv_dir / "runs" / "r1-f0" / "junk.txt").write_text("stale")
    fit2 = FakeFit()
    assert fake_cv(["--folds", "2", "--repeats", "2", "--seed", "3"], fit2) == 0
    calls = {c["run"]: c for c in fit2.calls}
    assert sorted(calls) == ["r0-f1", "r1-f0"]
    assert calls["r0-f1"]["ckpt_path"] == str(
        cv_dir / "runs" / "r0-f1" / "checkpoints" / "last.ckpt"
    )
    assert calls["r1-f0"]["ckpt_path"] is None and not calls["r1-f0"]["existed"]
    assert "finished earlier, skipped" in capsys.readouterr().out
    config = json.loads((cv_dir / "cv_config.json").read_text())
    assert len(config["invocations"]) == 2 and config["folds"] == 2 and config["repeats"] == 2

    # Summary against the per-run files.
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["complete"] and summary["missing"] == [] and summary["runs_completed"] == 4
    metrics = {
        name: json.loads((cv_dir / "runs" / name / "metrics.json").read_text())
        for name in ("r0-f0", "r0-f1", "r1-f0", "r1-f1")
    }
    for stage in ("val", "test"):
        for metric in ("auroc", "acc", "loss"):
            values = [m[stage][metric] for m in metrics.values()]
            agg = summary[stage][metric]
            assert agg["mean"] == pytest.approx(np.mean(values))
            assert agg["std"] == pytest.approx(np.std(values, ddof=1))
            half = stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
            assert agg["ci95_high"] == pytest.approx(np.mean(values) + half)
    # Ensemble: the probabilities averaged per test index over the four models.
    probs = []
    for name in metrics:
        with np.load(cv_dir / "runs" / name / "test_predictions.npz") as npz:
            order = np.argsort(npz["index"])
            probs.append(npz["probs"][order])
            target = npz["target"][order]
    mean_probs = np.mean(probs, axis=0)
    with np.load(cv_dir / "ensemble_test_predictions.npz") as npz:
        np.testing.assert_array_equal(npz["index"], np.arange(16))
        np.testing.assert_allclose(npz["probs"], mean_probs, rtol=1e-6)
        assert str(npz["task"]) == "binary" and list(npz["target"]) == list(target)
    ens = summary["ensemble"]
    assert ens["n_models"] == 4
    assert ens["test"]["auroc"] == pytest.approx(roc_auc_score(target, mean_probs[:, 1]), abs=1e-6)
    assert ens["test"]["acc"] == pytest.approx(((mean_probs[:, 1] > 0.5) == target).mean())
    # CSV: one row per run, then the statistics and the ensemble.
    with open(cv_dir / "cv_summary.csv", newline="") as fh:
        table = {row["run"]: row for row in csv.DictReader(fh)}
    assert list(table) == [
        "r0-f0",
        "r0-f1",
        "r1-f0",
        "r1-f1",
        "mean",
        "std",
        "ci95_low",
        "ci95_high",
        "ensemble",
    ]
    assert float(table["r1-f1"]["test/auroc"]) == pytest.approx(metrics["r1-f1"]["test"]["auroc"])
    assert float(table["mean"]["val/auroc"]) == pytest.approx(summary["val"]["auroc"]["mean"])
    assert float(table["ensemble"]["test/auroc"]) == pytest.approx(ens["test"]["auroc"])
    assert table["ensemble"]["val/auroc"] == "" and table["mean"]["status"] == "n=4"


def test_changed_setup_under_existing_dir_is_refused(fake_cv) -> None:
    assert fake_cv(["--folds", "2"], FakeFit()) == 0
    folds_before = (fake_cv.cv_dir / "folds.csv").read_text()
    with pytest.raises(ValueError, match=r"model.lr: 0.001 -> 0.002"):
        fake_cv(["--folds", "2"], FakeFit(), **{"model.lr": 0.002})
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        fake_cv(["--folds", "2", "--seed", "1"], FakeFit())
    with pytest.raises(ValueError, match=r"folds: 2 -> 3"):
        fake_cv(["--folds", "3"], FakeFit())
    assert (fake_cv.cv_dir / "folds.csv").read_text() == folds_before
    # folds.csv edited by hand: refused; deleted: rewritten identically.
    (fake_cv.cv_dir / "folds.csv").write_text(folds_before.replace(",0,0,", ",0,1,", 1))
    with pytest.raises(ValueError, match="folds.csv was modified"):
        fake_cv(["--folds", "2"], FakeFit())
    (fake_cv.cv_dir / "folds.csv").unlink()
    assert fake_cv(["--folds", "2"], FakeFit()) == 0
    assert (fake_cv.cv_dir / "folds.csv").read_text() == folds_before
    # Where files live or how progress shows may change: nothing to rerun, summary rewritten.
    fit = FakeFit()
    assert fake_cv(["--folds", "2"], fit, **{"data.num_workers": 3}) == 0 and fit.calls == []


def test_main_exit_codes(fake_cv, monkeypatch, capsys) -> None:
    root = fake_cv.root
    monkeypatch.setattr(runner, "resolve_fit_config", lambda args: _config(root))
    monkeypatch.setattr(runner, "launch", FakeFit(fail={"r0-f0": False}))
    with pytest.raises(SystemExit) as failed:
        cv.main(["--cv-dir", str(fake_cv.cv_dir), "--folds", "2"])
    assert failed.value.code == 1
    with pytest.raises(SystemExit) as refused:
        cv.main(["--cv-dir", str(fake_cv.cv_dir), "--folds", "4"])
    assert refused.value.code == 2
    assert "already holds a CV run with another setup" in capsys.readouterr().err


def test_group_by_keeps_groups_in_one_fold(fake_cv, tmp_path) -> None:
    # Three "images per patient" within each split; groups file also lists test rows (ignored).
    path = tmp_path / "patients.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "index", "group"])
        for split, n in (("train", 40), ("val", 12), ("test", 16)):
            writer.writerows([split, i, f"{split}-p{i // 3}"] for i in range(n))
    assert fake_cv(["--folds", "3", "--group-by", str(path)], FakeFit()) == 0
    with open(fake_cv.cv_dir / "folds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 52 and set(rows[0]) == {
        "split",
        "index",
        "repeat",
        "fold",
        "label",
        "group",
    }
    fold_of_group: dict[str, set[str]] = {}
    for row in rows:
        assert row["group"] == f"{row['split']}-p{int(row['index']) // 3}"
        fold_of_group.setdefault(row["group"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values())
    assert {f for s in fold_of_group.values() for f in s} == {"0", "1", "2"}
    config = json.loads((fake_cv.cv_dir / "cv_config.json").read_text())
    assert config["group_by"] == str(path) and len(config["group_by_sha256"]) == 64


def test_load_groups_npy_and_errors(tmp_path) -> None:
    split = np.array(["train"] * 4 + ["val"] * 2)
    pool = cv.Pool(
        split,
        np.array([0, 1, 2, 3, 0, 1]),
        np.zeros((6, 1), int),
        "binary",
        ["a", "b"],
        {"train": 4, "val": 2},
    )
    np.save(tmp_path / "g.npy", np.array([7, 7, 8, 8, 9, 9]))
    assert cv.load_groups(tmp_path / "g.npy", pool).tolist() == ["7", "7", "8", "8", "9", "9"]
    # --pool train with an array covering train+val: cut to train.
    train_pool = cv.Pool(
        split[:4], np.arange(4), np.zeros((4, 1), int), "binary", ["a", "b"], {"train": 4, "val": 2}
    )
    assert cv.load_groups(tmp_path / "g.npy", train_pool).tolist() == ["7", "7", "8", "8"]
    np.save(tmp_path / "short.npy", np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"expected one group id per pool sample \(6,\)"):
        cv.load_groups(tmp_path / "short.npy", pool)
    (tmp_path / "g.csv").write_text("split,index,group\ntrain,0,a\ntrain,1,a\n")
    with pytest.raises(ValueError, match="no group for 4 pool sample"):
        cv.load_groups(tmp_path / "g.csv", pool)
    (tmp_path / "bad.csv").write_text("split,idx,patient\n")
    with pytest.raises(ValueError, match="needs the columns"):
        cv.load_groups(tmp_path / "bad.csv", pool)


HEAVY = ("torch", "lightning", "timm", "monai", "albumentations")


def test_cv_help_imports_no_training_stack() -> None:
    code = (
        "import sys\n"
        "from medvit.cv import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: medvit cv" in proc.stdout and "--group-by FILE" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.mark.slow  # one `medvit fit --print_config` process: ~20 s on 2 cores
def test_fit_config_is_resolved_in_process_as_print_config_prints_it(tmp_path) -> None:
    args = ["-c", str(REPO / "configs" / "experiment" / "breastmnist.yaml")]
    args += ["--trainer.max_epochs", "3", f"--data.root={tmp_path}", "--run.name=x"]
    printed = subprocess.run(
        [sys.executable, "-m", "medvit", "fit", *args, "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    expected = yaml.safe_load(printed.stdout)
    config = runner.resolve_fit_config(args)
    assert config == expected
    # What cv records and compares: the fingerprint and the experiment name.
    assert runner.config_fingerprint(config) == runner.config_fingerprint(expected)
    assert config["trainer"]["max_epochs"] == 3 and runner.experiment_of(config) == "x"


def test_fit_arguments_that_do_not_parse_are_one_line(fake_cv, capsys) -> None:
    base = ["-c", str(REPO / "configs" / "experiment" / "breastmnist.yaml")]
    for bad, named in (
        (["--trainer.max_epochs", "many"], "trainer.max_epochs"),
        (["--no_such.option", "1"], "--no_such.option"),
    ):
        with pytest.raises(ValueError) as err:
            runner.resolve_fit_config([*base, *bad])
        assert named in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        cv.main(["--cv-dir", str(fake_cv.cv_dir), *base, "--trainer.max_epochs", "many"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("medvit cv: error: `medvit fit ") and "trainer.max_epochs" in last


# ------------------------------------------------------------------------------- slow tests
def _wandb_records(path: Path) -> list[Any]:
    """Records of an offline ``run-*.wandb`` file (LevelDB log format, protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wandb_run(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The run record and the final summary values of the one offline run under ``folder``."""
    files = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    run, summary = None, {}
    for record in _wandb_records(Path(files[0])):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run, summary


BASE_ARGS = [
    "-c",
    str(REPO / "configs" / "experiment" / "breastmnist.yaml"),
    *short_trainer_args(
        2, train_batches=2, val_batches=2, batch_size=None, patch_size=None, verify_md5=True
    ),
]
FIT_ARGS = [*BASE_ARGS, "-c", str(REPO / "configs" / "tracking" / "wandb.yaml")]


@pytest.fixture(scope="module")
def resumed_cv(real_data: Path, tmp_path_factory) -> dict[str, Any]:
    """A 2-fold CV on BreastMNIST killed (SIGTERM to its process group) during fold 2, rerun.

    Fold 2 pauses at the start of its second epoch, after its first ``last.ckpt``; the test
    kills the CV there, records fold 1's files, and reruns the same command to completion.
    """
    work = tmp_path_factory.mktemp("cv")
    marker = work / "paused"
    pause = {"class_path": "test_cv.PauseOnce", "init_args": {"marker": str(marker)}}
    cv_dir = work / "cv"
    args = [*FIT_ARGS, "--trainer.callbacks", json.dumps([pause]), "--folds", "2"]
    cmd = [sys.executable, "-m", "medvit", "cv", *args, "--cv-dir", str(cv_dir)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "MEDVIT_DATA_DIR": str(real_data),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }
    first_log = work / "first.out"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + 900
            while not marker.exists():
                assert proc.poll() is None, (
                    f"cv ended before fold 2 paused:\n{first_log.read_text()}"
                )
                assert time.time() < deadline, "fold 2 never reached its second epoch"
                time.sleep(1)
            os.killpg(proc.pid, signal.SIGTERM)
            first_code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    fold_pid = int(marker.read_text())
    for _ in range(60):  # the fold process must not outlive the CV
        try:
            os.kill(fold_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(1)
    else:
        os.kill(fold_pid, signal.SIGKILL)
        pytest.fail(f"fold process {fold_pid} survived the interrupted CV")
    f0 = cv_dir / "runs" / "r0-f0"
    before = {
        "first_code": first_code,
        "first_output": first_log.read_text(),
        "f0_files": {
            str(p.relative_to(f0)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in f0.rglob("*")
            if p.is_file() and "wandb" not in p.parts
        },
        "f1_after_kill": json.loads((cv_dir / "runs" / "r0-f1" / "metrics.json").read_text()),
        "f1_ckpt": (cv_dir / "runs" / "r0-f1" / "checkpoints" / "last.ckpt").is_file(),
    }
    rerun = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    return {"cv_dir": cv_dir, "work": work, "cmd": cmd, "env": env, "rerun": rerun, **before}


@pytest.mark.slow
def test_interrupted_cv_resumes_without_retraining(resumed_cv: dict[str, Any]) -> None:
    cv_dir, rerun = resumed_cv["cv_dir"], resumed_cv["rerun"]
    assert resumed_cv["first_code"] != 0
    assert "[r0-f1: fold 2/2, repeat 1/1] training" in resumed_cv["first_output"]
    assert resumed_cv["f1_ckpt"] and "test" not in resumed_cv["f1_after_kill"]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[r0-f0: fold 1/2, repeat 1/1] finished earlier, skipped" in rerun.stdout
    assert "[r0-f1: fold 2/2, repeat 1/1] resuming from checkpoints/last.ckpt" in rerun.stdout
    # Fold 1 was not retrained: every file of its run folder is untouched.
    f0 = cv_dir / "runs" / "r0-f0"
    assert {"metrics.json", "test_predictions.npz", "checkpoints/best.ckpt"} <= set(
        resumed_cv["f0_files"]
    )
    for name, (mtime, content) in resumed_cv["f0_files"].items():
        path = f0 / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, name
    # Fold 2 continued in place: its history spans both epochs; the log holds both attempts.
    f1 = cv_dir / "runs" / "r0-f1"
    metrics = json.loads((f1 / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and set(metrics["test"]) >= {"auroc", "acc", "ece"}
    with open(f1 / "metrics.csv", newline="") as fh:
        epochs = {row["epoch"] for row in csv.DictReader(fh) if row.get("val/auroc")}
    assert epochs == {"0", "1"}
    log = (cv_dir / "logs" / "r0-f1.log").read_text()
    attempts = [line for line in log.splitlines() if line.startswith("===== ")]
    assert len(attempts) == 2 and "--ckpt_path" not in attempts[0]
    assert f"--ckpt_path {f1 / 'checkpoints' / 'last.ckpt'}" in attempts[1]
    config = yaml.safe_load((f1 / "config.yaml").read_text())
    assert config["data"]["fold"] == 1 and config["data"]["folds_file"] == str(cv_dir / "folds.csv")


@pytest.mark.slow
def test_real_cv_summary_matches_fold_metrics(resumed_cv: dict[str, Any], real_data: Path) -> None:
    cv_dir, rerun = resumed_cv["cv_dir"], resumed_cv["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # folds.csv: the official train+val pool, split in two stratified halves.
    with np.load(real_data / "breastmnist.npz") as npz:
        official = {s: npz[f"{s}_labels"][:, 0] for s in ("train", "val", "test")}
    with open(cv_dir / "folds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 546 + 78
    assert sorted((r["split"], int(r["index"])) for r in rows) == sorted(
        [("train", i) for i in range(546)] + [("val", i) for i in range(78)]
    )
    labels = np.array([official[r["split"]][int(r["index"])] for r in rows])
    assert [int(r["label"]) for r in rows] == labels.tolist()
    folds = np.array([int(r["fold"]) for r in rows])
    for c in (0, 1):
        assert abs((folds[labels == c] == 0).sum() - (folds[labels == c] == 1).sum()) <= 1

    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["complete"] and summary["runs_completed"] == 2 and summary["missing"] == []
    per_fold = [
        json.loads((cv_dir / "runs" / n / "metrics.json").read_text()) for n in ("r0-f0", "r0-f1")
    ]
    for stage in ("val", "test"):
        assert set(summary[stage]) == set(per_fold[0][stage])
        for metric, agg in summary[stage].items():
            values = [m[stage][metric] for m in per_fold]
            assert agg["mean"] == pytest.approx(np.mean(values))
            assert agg["std"] == pytest.approx(np.std(values, ddof=1))
            sem = np.std(values, ddof=1) / np.sqrt(2)
            if sem > 0:  # a constant metric (e.g. acc of a model predicting one class) has no t
                low, high = stats.t.interval(0.95, 1, loc=np.mean(values), scale=sem)
                # ... clipped to the metric's range (with 2 folds t(0.975, 1) = 12.7).
                lo, hi = cv.METRIC_RANGES.get(metric, (-np.inf, np.inf))
                assert (agg["ci95_low"], agg["ci95_high"]) == (
                    pytest.approx(max(low, lo)),
                    pytest.approx(min(high, hi)),
                )
    assert [r["test"] for r in summary["runs"]] == [m["test"] for m in per_fold]
    # Ensemble over the two fold models, on the whole official test set.
    probs = []
    for name in ("r0-f0", "r0-f1"):
        with np.load(cv_dir / "runs" / name / "test_predictions.npz") as npz:
            assert npz["index"].tolist() == list(range(156))
            probs.append(npz["probs"])
    with np.load(cv_dir / "ensemble_test_predictions.npz") as npz:
        np.testing.assert_allclose(npz["probs"], np.mean(probs, axis=0), rtol=1e-6)
        np.testing.assert_array_equal(npz["target"].reshape(-1), official["test"])
    ens = summary["ensemble"]
    assert ens["n_models"] == 2
    auroc = roc_auc_score(official["test"], np.mean(probs, axis=0)[:, 1])
    assert ens["test"]["auroc"] == pytest.approx(auroc, abs=1e-5)
    with open(cv_dir / "cv_summary.csv", newline="") as fh:
        table = {row["run"]: row for row in csv.DictReader(fh)}
    assert float(table["r0-f1"]["val/auroc"]) == pytest.approx(per_fold[1]["val"]["auroc"])
    assert float(table["ensemble"]["test/auroc"]) == pytest.approx(ens["test"]["auroc"])
    # The printed table.
    line = next(x for x in rerun.stdout.splitlines() if x.startswith("test/auroc"))
    assert f"{summary['test']['auroc']['mean']:.4f} ± {summary['test']['auroc']['std']:.4f}" in line
    assert f"{ens['test']['auroc']:.4f}" in line


@pytest.mark.slow
def test_real_cv_wandb_runs_are_grouped_offline(resumed_cv: dict[str, Any]) -> None:
    cv_dir = resumed_cv["cv_dir"]
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    run, logged = _wandb_run(cv_dir)
    assert (run.run_group, run.job_type, run.display_name) == (
        "breastmnist",
        "cv-summary",
        "cv-summary",
    )
    assert logged["test/auroc_mean"] == pytest.approx(summary["test"]["auroc"]["mean"])
    assert logged["val/auroc_ci95_high"] == pytest.approx(summary["val"]["auroc"]["ci95_high"])
    assert logged["ensemble/test/auroc"] == pytest.approx(summary["ensemble"]["test"]["auroc"])
    assert logged["runs_completed"] == 2 and logged["folds/nrows"] == 2
    table_file = glob.glob(str(cv_dir / "wandb" / "offline-run-*" / "files" / logged["folds/path"]))
    table = json.loads(Path(table_file[0]).read_text())
    col = table["columns"].index("test/auroc")
    assert [row[col] for row in table["data"]] == pytest.approx(
        [r["test"]["auroc"] for r in summary["runs"]]
    )
    fold_run, _ = _wandb_run(cv_dir / "runs" / "r0-f0")
    assert (fold_run.run_group, fold_run.job_type, fold_run.display_name) == (
        "breastmnist",
        "fold",
        "fold-0",
    )
    # (medvit fit starts a new wandb run when it resumes, hence one per attempt of fold 2.)
    attempts = glob.glob(str(cv_dir / "runs" / "r0-f1" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert attempts
    for path in attempts:
        run = next(
            r.run for r in _wandb_records(Path(path)) if r.WhichOneof("record_type") == "run"
        )
        assert (run.run_group, run.job_type, run.display_name) == ("breastmnist", "fold", "fold-1")


@pytest.mark.slow
def test_real_cv_refuses_a_changed_config(resumed_cv: dict[str, Any]) -> None:
    cv_dir, cmd = resumed_cv["cv_dir"], list(resumed_cv["cmd"])
    cmd[cmd.index("--trainer.max_epochs=2")] = "--trainer.max_epochs=3"
    folds_before = (cv_dir / "folds.csv").read_bytes()
    proc = subprocess.run(
        cmd,
        cwd=resumed_cv["work"],
        env=resumed_cv["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "already holds a CV run with another setup" in proc.stderr
    assert "trainer.max_epochs: 2 -> 3" in proc.stderr
    assert sorted(p.name for p in (cv_dir / "runs").iterdir()) == ["r0-f0", "r0-f1"]
    assert (cv_dir / "folds.csv").read_bytes() == folds_before


@pytest.mark.slow
@pytest.mark.ddp
def test_each_fold_gets_its_own_ddp_group(real_data: Path, tmp_path: Path) -> None:
    """Two folds in a row, each a 2-process DDP fit (gloo on CPU) started by Lightning."""
    cv_dir = tmp_path / "cv"
    args = list(BASE_ARGS)
    args[args.index("--trainer.max_epochs=2")] = "--trainer.max_epochs=1"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    cmd = [
        sys.executable,
        "-m",
        "medvit",
        "cv",
        "--folds",
        "2",
        *args,
        *ddp,
        "--cv-dir",
        str(cv_dir),
    ]
    env = {**os.environ, "MEDVIT_DATA_DIR": str(real_data), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["complete"] and summary["runs_completed"] == 2
    for name in ("r0-f0", "r0-f1"):
        run_dir = cv_dir / "runs" / name
        meta = json.loads((run_dir / "meta.json").read_text())
        assert (meta["world_size"], meta["strategy"]) == (2, "DDPStrategy"), name
        # Test predictions gathered over both ranks: every test sample exactly once.
        with np.load(run_dir / "test_predictions.npz") as npz:
            assert npz["index"].tolist() == list(range(156))


# ----------------------------------------------------------------- own data (ImageDataModule)
def _patient_pngs(tmp: Path, patients: int = 20, per_patient: int = 3, size: int = 16) -> Path:
    """``labels.csv`` of tiny PNGs, ``per_patient`` per patient, one label per patient, no split
    column (medvit makes the split) and a ``site`` column."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    with open(tmp / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id", "site"])
        for p in range(patients):
            label = p % 2
            for j in range(per_patient):
                image = rng.integers(0, 60, (size, size), dtype=np.uint8)
                image[: size // 2, label * size // 2 : (label + 1) * size // 2] = 255
                name = f"img/p{p:02d}_{j}.png"
                Image.fromarray(image).save(tmp / name)
                writer.writerow([name, ["normal", "tumour"][label], f"P{p}", f"S{p % 3}"])
    return tmp / "labels.csv"


def _image_data_config(csv_path: Path, cache: Path) -> dict[str, Any]:
    """``data`` of a resolved fit config with ``--data ImageDataModule`` (subclass mode)."""
    return {
        "class_path": "medvit.data.images.ImageDataModule",
        "init_args": {
            "path": str(csv_path),
            "size": 16,
            "num_workers": 0,
            "decode_workers": 0,
            "global_batch_size": 4,
            "cache_dir": str(cache),
            "folds_file": None,
            "fold": None,
            "repeat": 0,
        },
    }


def _fold_sets(folds_csv: Path, column: str = "group") -> dict[tuple[str, str], set[str]]:
    """(repeat, group) -> the validation folds that group's rows are in."""
    with open(folds_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        out.setdefault((row["repeat"], row[column]), set()).add(row["fold"])
    return out


def test_group_by_patient_column_of_image_data_keeps_patients_in_one_fold(tmp_path) -> None:
    from medvit.data.files import release_caches
    from medvit.data.images import ImageDataModule

    csv_path = _patient_pngs(tmp_path)
    data = _image_data_config(csv_path, tmp_path / "cache")
    try:
        pool = cv.load_pool(data, "train+val")
        dm = ImageDataModule(**{**data["init_args"], "folds_file": None, "fold": None})
        dm.prepare_data()
        # The group of each pool sample is the patient of the file at that split index.
        patient_of = {}
        for split in ("train", "val", "test"):
            files, patients = dm.split_samples(split)
            patient_of.update({(split, i): p for i, p in enumerate(patients)})
            assert all(f"p{p[1:].zfill(2)}_" in f for f, p in zip(files, patients, strict=True))
    finally:
        release_caches()
    groups = cv.load_groups("patient_id", pool)
    assert groups.tolist() == [
        patient_of[(s, i)] for s, i in zip(pool.split.tolist(), pool.index.tolist(), strict=True)
    ]
    test_patients = {p for (s, _), p in patient_of.items() if s == "test"}
    assert test_patients and not test_patients & set(groups.tolist())  # the split is grouped too
    # Another CSV column groups as well; a name that is neither a column nor a file is refused.
    assert len(set(cv.load_groups("site", pool).tolist())) == 3
    with pytest.raises(ValueError, match=r"not a column of the data \(its columns: patient_id"):
        cv.load_groups("hospital", pool)
    for seed in range(5):
        plan = cv.plan_folds(pool, 3, seed, 2, groups)
        path = tmp_path / f"folds-{seed}.csv"
        path.write_text(plan.csv_text())
        fold_sets = _fold_sets(path)
        assert all(len(folds) == 1 for folds in fold_sets.values()), seed
        assert {f for folds in fold_sets.values() for f in folds} == {"0", "1", "2"}
        assert {p for _, p in fold_sets} == set(groups.tolist())


def test_group_by_a_column_of_medmnist_data_is_refused_in_one_line(tmp_path) -> None:
    pool = cv.Pool(
        np.array(["train"] * 4), np.arange(4), np.zeros((4, 1), int), "binary", ["a", "b"],
        {"train": 4, "val": 0},
    )  # fmt: skip
    with pytest.raises(ValueError, match="not a column of the data") as err:
        cv.load_groups("patient_id", pool)
    assert "MedMNIST has no patient ids" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--group-by file .*groups.csv does not exist"):
        cv.load_groups(str(tmp_path / "groups.csv"), pool)


def test_cv_of_image_data_runs_folds_with_the_data_class_and_patient_groups(
    tmp_path, monkeypatch
) -> None:
    from medvit.data.files import release_caches

    csv_path = _patient_pngs(tmp_path)
    config = _config(tmp_path)
    config["data"] = _image_data_config(csv_path, tmp_path / "cache")
    monkeypatch.setattr(runner, "resolve_fit_config", lambda args: config)
    fit = FakeFit(n_test=12)
    fit_args = ["--data", "ImageDataModule", "--data.path", str(csv_path)]
    try:
        argv = ["--cv-dir", str(tmp_path / "cv"), "--folds", "3", "--group-by", "patient_id"]
        monkeypatch.setattr(runner, "launch", fit)
        assert runner.run_cv([*argv, *fit_args]) == 0
    finally:
        release_caches()
    assert runner.experiment_of(config) == "labels_16"  # as medvit fit names it
    cmd = fit.calls[0]["cmd"]
    assert cmd[cmd.index("fit") + 1 : cmd.index("fit") + 5] == fit_args
    assert cmd[cmd.index("--data.folds_file") + 1] == str(tmp_path / "cv" / "folds.csv")
    with open(tmp_path / "cv" / "folds.csv", newline="") as fh:
        header = csv.DictReader(fh).fieldnames
    assert header == ["split", "index", "repeat", "fold", "label", "group"]
    fold_sets = _fold_sets(tmp_path / "cv" / "folds.csv")
    assert all(len(folds) == 1 for folds in fold_sets.values())
    assert all(p.startswith("P") for _, p in fold_sets)
    cv_config = json.loads((tmp_path / "cv" / "cv_config.json").read_text())
    assert cv_config["group_by"] == "patient_id" and len(cv_config["group_by_sha256"]) == 64
    assert "data.class_path" in cv_config["fit_config"]
    assert "data.init_args.decode_workers" not in cv_config["fit_config"]  # volatile


@pytest.mark.slow  # three processes (the CV and two folds) on tiny PNGs: ~60 s on 2 cores
def test_real_cv_of_a_csv_of_pngs_grouped_by_patient(tmp_path: Path) -> None:
    csv_path = _patient_pngs(tmp_path, patients=16, per_patient=3, size=28)
    cv_dir = tmp_path / "cv"
    cmd = [sys.executable, "-m", "medvit", "cv", "--folds", "2", "--group-by", "patient_id"]
    cmd += ["-c", str(REPO / "configs" / "experiment" / "breastmnist.yaml")]
    cmd += ["--data", "ImageDataModule", "--data.path", str(csv_path)]
    cmd += ["--data.decode_workers=0", f"--data.cache_dir={tmp_path / 'cache'}"]
    cmd += [*short_trainer_args(1, verify_md5=True), "--cv-dir", str(cv_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["complete"] and summary["runs_completed"] == 2
    assert summary["ensemble"]["n_models"] == 2 and "auroc" in summary["test"]
    fold_sets = _fold_sets(cv_dir / "folds.csv")
    assert len(fold_sets) > 4 and all(len(folds) == 1 for folds in fold_sets.values())
    for name in ("r0-f0", "r0-f1"):  # each fold trained on the CSV's images, split as in the CV
        run_dir = cv_dir / "runs" / name
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["data"]["class_path"] == "medvit.data.images.ImageDataModule"
        assert config["data"]["init_args"]["fold"] == int(name[-1])
        with open(run_dir / "splits.csv", newline="") as fh:
            test_patients = {r["patient_id"] for r in csv.DictReader(fh) if r["split"] == "test"}
        assert test_patients and not test_patients & {p for _, p in fold_sets}


def test_fold_options_of_a_selected_data_class_are_refused_too(tmp_path) -> None:
    with pytest.raises(SystemExit):
        cv.parse_args(["--data", "ImageDataModule", "--data.init_args.fold=1"])
    config = _config(tmp_path)
    config["data"] = _image_data_config(tmp_path / "labels.csv", tmp_path / "cache")
    config["data"]["init_args"]["folds_file"] = "folds.csv"
    with pytest.raises(ValueError, match="sets data.folds_file='folds.csv'; medvit cv sets it"):
        runner._check_fit_config(config)


@pytest.mark.slow  # the CV and two 3D folds of a few batches each: ~90 s on 2 cores
def test_real_cv_of_adrenalmnist3d_volumes(real_data: Path, tmp_path: Path) -> None:
    """``medvit cv`` on the 3D recipe: folds of the official train+val volumes, 3D fold models,
    and an ensemble over the whole 3D test split."""
    with np.load(real_data / "adrenalmnist3d.npz") as npz:
        official = {s: npz[f"{s}_labels"][:, 0] for s in ("train", "val", "test")}
    cv_dir = tmp_path / "cv"
    cmd = [sys.executable, "-m", "medvit", "cv", "--folds", "2", "--cv-dir", str(cv_dir)]
    cmd += ["-c", str(REPO / "configs" / "experiment" / "adrenalmnist3d.yaml")]
    cmd += [f"--data.root={real_data}", f"--data.cache_dir={tmp_path / 'cache'}"]
    cmd += short_trainer_args(1, train_batches=2, val_batches=2, patch_size=None, verify_md5=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(cv_dir / "folds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_train, n_val = len(official["train"]), len(official["val"])
    assert sorted((r["split"], int(r["index"])) for r in rows) == sorted(
        [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]
    )
    assert [int(r["label"]) for r in rows] == [
        int(official[r["split"]][int(r["index"])]) for r in rows
    ]
    probs = []
    for name in ("r0-f0", "r0-f1"):
        hparams = yaml.safe_load((cv_dir / "runs" / name / "hparams.yaml").read_text())
        assert hparams["spatial_dims"] == 3 and hparams["img_size"] == 28
        with np.load(cv_dir / "runs" / name / "test_predictions.npz") as npz:
            assert npz["index"].tolist() == list(range(len(official["test"])))
            probs.append(npz["probs"])
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["complete"] and summary["runs_completed"] == 2
    with np.load(cv_dir / "ensemble_test_predictions.npz") as npz:
        np.testing.assert_allclose(npz["probs"], np.mean(probs, axis=0), rtol=1e-6)
        np.testing.assert_array_equal(npz["target"].reshape(-1), official["test"])
    auroc = roc_auc_score(official["test"], np.mean(probs, axis=0)[:, 1])
    assert summary["ensemble"]["test"]["auroc"] == pytest.approx(auroc, abs=1e-5)
