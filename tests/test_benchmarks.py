"""The benchmark scripts run on CPU with their tiniest configs and report sane numbers."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def load(name: str) -> ModuleType:
    """Import ``benchmarks/{name}.py`` as its sibling scripts do (benchmarks/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts set their own


# ----------------------------------------------------------------------------- throughput
def test_throughput_reports_fit_and_bare_rates(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    md = tmp_path / "rows.md"
    args = ["--model", "test_vit", "--img-size", "32", "--patch-size", "16", "--batch-size", "4"]
    args += ["--steps", "2", "--warmup", "1", "--repeats", "2", "--threads", "1"]
    args += ["--progress-bar", "false", "--out", str(out), "--markdown", str(md)]
    args += ["--pipeline-workers", "0", "--pipeline-batches", "2", "--pipeline-samples", "16"]
    args += ["--pipeline-augment-on", "device"]
    report = load("throughput").main(args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    r = report["result"]
    assert report["device"] == "cpu" and report["machine"]["cpu_count"] >= 1
    for path in ("fit", "bare"):
        assert r[path]["images_per_s"] > 0 and len(r[path]["images_per_s_all"]) == 2
        assert r[path]["step_ms"] == pytest.approx(1000 * 4 / r[path]["images_per_s"])
        assert "mfu" not in r[path]  # no bf16 peak for a CPU
    assert "peak_flops" not in r
    assert r["ratio_fit_over_bare"] > 0 and len(r["ratios"]) == 2
    assert r["ratio_cpu_time"] > 0 and r["ratio_min_step"] > 0  # the CPU-only steadier ratios
    for path in ("fit", "bare"):
        assert (
            0 < r[path]["min_step_ms"] <= r[path]["step_ms"] * 2 and r[path]["cpu_s_per_step"] > 0
        )
    assert r["peak_rss_mb"] > 100
    assert r["fused_attention"] is True and r["fused_adamw"] is False
    # The FLOP counter (with the CPU attention kernels registered) agrees with the formula.
    assert r["flops_counted_over_analytic"] == pytest.approx(1.0, abs=0.05)
    pipe = r["pipeline"]
    assert pipe["images_per_s"] > 0 and pipe["batch_shape"] == [4, 3, 32, 32]
    assert pipe["over_model_rate"] == pytest.approx(pipe["images_per_s"] / r["fit"]["images_per_s"])
    # Augmenting on the training device takes that time from the model's steps.
    assert pipe["augment_on"] == "device" and pipe["device"] == "cpu"
    step_ms = 1000 * 4 / r["fit"]["images_per_s"]
    assert pipe["on_device_share_of_step"] == pytest.approx(
        pipe["on_device_ms_per_batch"] / step_ms
    )
    row = md.read_text().strip()
    header = load("throughput").MARKDOWN_HEADER.splitlines()[0]
    assert row.count("|") == header.count("|") and "| test_vit | 32 | 16 | 4 |" in row


def test_analytic_flops_of_vit_base_match_the_literature() -> None:
    tp = load("throughput")
    from medvit.models.vit import create_vit

    with torch.device("meta"):
        net = create_vit("vit_base_patch16_224", num_classes=1000, in_chans=3, img_size=224)
    # ViT-B/16 at 224 px: 17.6 GMACs per image forward (DeiT table 1), i.e. 35.1 GFLOPs.
    assert sum(tp.analytic_forward_flops(net, 224).values()) == pytest.approx(35.1e9, rel=0.01)
    # Backward = 2x forward, except that the input image needs no gradient.
    parts = tp.analytic_forward_flops(net, 224)
    expected = 3 * sum(parts.values()) - parts["patch_embed"]
    assert tp.analytic_train_flops(net, 224, batch=2) == 2 * expected


def test_counted_flops_include_cpu_attention() -> None:
    tp = load("throughput")
    from medvit.models.vit import create_vit

    net = create_vit("test_vit", num_classes=3, in_chans=1, img_size=64, patch_size=8)
    counted = tp.counted_train_flops(net, torch.randn(2, 1, 64, 64))
    analytic = tp.analytic_train_flops(net, 64, batch=2)
    # The counter also sees the backward of flash attention recompute the scores (Q K^T):
    # 2 N^2 d FLOPs per layer and image, hardware work that MFU leaves out.
    tokens, dim, depth = 65, 64, 6
    recompute = 2 * depth * 2 * tokens**2 * dim
    # Attention is ~10% of this model's FLOPs: leaving the CPU kernels uncounted would fail.
    assert counted == analytic + recompute


def test_peak_flops() -> None:
    tp = load("throughput")
    assert tp.peak_flops(torch.device("cpu"), None) is None
    assert tp.peak_flops(torch.device("cpu"), 100.0) == 100e12
    assert tp.PEAK_BF16_FLOPS["H100"] == tp.PEAK_BF16_FLOPS["H200"] == 989.4e12


# ------------------------------------------------------------------------------- pipeline
def test_synthetic_file_is_in_the_medmnist_format(tmp_path: Path) -> None:
    pipeline = load("pipeline")
    path = pipeline.write_synthetic_npz(tmp_path / "chestmnist.npz", "chestmnist", 28, (5, 3, 2))
    with np.load(path) as data:
        assert sorted(data.files) == sorted(
            f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")
        )
        assert data["train_images"].shape == (5, 28, 28) and data["train_images"].dtype == np.uint8
        assert data["test_labels"].shape == (2, 14)  # multi-label: one column per label
        assert set(np.unique(data["train_labels"])) <= {0, 1}
    dm = pipeline.make_datamodule(tmp_path, "chestmnist", 28, batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.data_train) == 5 and len(dm.data_val) == 3


def test_pipeline_reports_images_per_second(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    args = ["--flag", "breastmnist", "--size", "28", "--batch-size", "8", "--num-workers", "0", "1"]
    args += ["--batches", "3", "--warmup-batches", "1", "--n-train", "48", "--out", str(out)]
    args += ["--augment-on", "workers", "device"]
    report = load("pipeline").main(args)

    assert json.loads(out.read_text()) == report
    runs = [(r["augment_on"], r["num_workers"]) for r in report["results"]]
    assert runs == [("workers", 0), ("workers", 1), ("device", 0), ("device", 1)]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["batches_timed"] == 3 and r["device"] == "cpu"
        # Both paths deliver what the model eats: normalised float batches at the model's size.
        assert r["batch_shape"] == [8, 1, 28, 28]
        assert r["augmentation"] == "ultrasound"  # the flag's preset, as in training
        assert r["on_device_ms_per_batch"] > 0
    assert report["data"].startswith("synthetic")


# ------------------------------------------------------------------------------- own data
def test_own_data_compares_pngs_in_a_csv_with_the_npz(tmp_path: Path) -> None:
    out = tmp_path / "own_data.json"
    args = ["--n-train", "32", "--repeats", "2", "--epochs", "2", "--decode-repeats", "1"]
    args += ["--patch-size", "7", "--num-workers", "0", "--batch-size", "8"]
    args += ["--workdir", str(tmp_path), "--out", str(out)]
    report = load("own_data").main(args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    r = report["result"]
    assert r["images"] == {"train": 32, "val": 8, "test": 8}
    assert [d["decode_workers"] for d in r["decode"]] == [1, 2]
    for d in r["decode"]:
        assert d["images"] == 48 and d["images_per_s"] > 0
        assert d["processes"] == 1  # 48 files: decoded in the process, even when 2 are allowed
        assert d["images_per_s_per_core"] == pytest.approx(d["images_per_s"])
    for source in ("npz", "png"):
        runs = r["train"][source]["runs"]
        assert len(runs) == 2 and all(len(run["epochs"]) == 2 for run in runs)
        assert all(e["images"] == 32 for run in runs for e in run["epochs"])  # 4 batches of 8
    png, npz = r["train"]["png"]["runs"], r["train"]["npz"]["runs"]
    assert r["ratios"] == pytest.approx(
        [p["images_per_s"] / n["images_per_s"] for p, n in zip(png, npz, strict=True)]
    )
    assert r["ratio_png_over_npz"] == pytest.approx(float(np.median(r["ratios"])))
    # The same bytes in the same order with the same seed: the same weights.
    assert r["max_abs_weight_diff"] == [0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # PNGs, caches and runs deleted


# -------------------------------------------------------------------------------- bigdata
@pytest.mark.slow
def test_bigdata_measures_the_whole_process_tree(tmp_path: Path) -> None:
    out = tmp_path / "bigdata.json"
    args = ["--size", "28", "--samples", "48", "--workers", "1", "--steps", "2"]
    args += ["--batch-size", "4", "--model", "test_vit", "--patch-size", "4", "--interval", "0.05"]
    args += ["--workdir", str(tmp_path / "work"), "--out", str(out)]
    report = load("bigdata").main(args)

    (row,) = report["results"]
    assert row["n_train"] == 48 and row["num_workers"] == 1 and row["train_steps"] == 2
    assert row["processes"] >= 2  # the trainer and its DataLoader worker were both sampled
    assert 0 < row["peak_uss_mb"] <= row["peak_pss_mb"] <= row["peak_rss_mb"]
    assert row["peak_root_rss_mb"] < row["peak_rss_mb"]
    assert row["unpack_s"] >= 0 and row["file_gb"] > 0
    assert json.loads(out.read_text()) == report
    assert list((tmp_path / "work").iterdir()) == []  # data and runs deleted


def test_bigdata_refuses_a_too_small_disk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GB free"):
        load("bigdata").main(["--samples", "10000000000", "--workdir", str(tmp_path)])


# ------------------------------------------------------------------------------ gpu check
@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "out" / "throughput_test_vit_compile-no.json").read_text())
    assert report["config"]["precision"] == "bf16-mixed"
    assert report["result"]["fit"]["images_per_s"] > 0 and "mfu" not in report["result"]["fit"]
    pipe = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    runs = [(r["augment_on"], r["num_workers"]) for r in pipe["results"]]
    assert runs == [("workers", 0), ("workers", 2), ("device", 0), ("device", 2)]
    # The default bar, the bar refreshed every step, and no bar: the progress bar's cost.
    for bar in ("every 10", "every 1", "off"):
        assert f"| test_vit | 32 | 16 | 8 | bf16-mixed | no | {bar} | cpu |" in proc.stdout
    # The profiled run lists its top operators for both paths.
    profile = report["result"]["profile"]
    assert profile["fit"]["steps"] == 2 and profile["bare"]["top_cpu_ops"]
    assert "profile fit:" in proc.stdout and "profile bare:" in proc.stdout


# ------------------------------------------------------------------------- medmnist table
@pytest.mark.slow
def test_medmnist_table_runs_seeds_side_by_side_and_reuses_finished_runs(
    synthetic_root, short_trainer, tmp_path: Path
) -> None:
    root = synthetic_root("breastmnist", n=(32, 16, 16))
    out = tmp_path / "table"
    tiny = [
        f"--data.root={root}",
        f"--data.cache_dir={tmp_path / 'mmap'}",
        *short_trainer(1, train_batches=1, batch_size=None, patch_size=None),
    ]
    table = load("medmnist_table")
    args = ["--flags", "breastmnist", "--seeds", "0", "1", "--jobs", "2", "--out", str(out)]
    table.main([*args, *tiny])

    runs = [
        json.loads((out / "runs" / f"breastmnist-seed{s}" / "metrics.json").read_text())
        for s in (0, 1)
    ]
    summary = json.loads((out / "results.json").read_text())
    assert summary["extra_args"] == tiny
    assert [r["seed"] for r in summary["results"]["breastmnist"]] == [0, 1]
    for row, run in zip(summary["results"]["breastmnist"], runs, strict=True):
        assert row["test"] == run["test"]
    markdown = (out / "table.md").read_text()
    aucs = [r["test"]["auroc"] for r in runs]
    mean = f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"
    assert f"| breastmnist | **medvit default (ViT-Tiny/4, scratch)** | {mean} |" in markdown
    assert "| breastmnist | ResNet-18 (28) | 0.901 | 0.863 | |" in markdown
    assert "| breastmnist | goal (ResNet-18 (28)) |" in markdown
    assert "on 2 seed(s); the goal is a mean over 3 |" in markdown
    # A finished run is read back, not trained again.
    logs = {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    table.main([*args, *tiny])
    assert {p: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs


def test_medmnist_table_compares_adrenalmnist3d_with_the_resnet18_3d_row() -> None:
    table = load("medmnist_table")
    runs = [{"test": {"auroc": a, "acc": c}} for a, c in ((0.84, 0.80), (0.82, 0.78), (0.83, 0.79))]
    markdown = table.table({"adrenalmnist3d": runs})
    assert (
        "| adrenalmnist3d | **medvit 3D default (3D ViT test_vit, conv stem to 7^3, scratch)** |"
        in markdown
    )
    assert "| adrenalmnist3d | ResNet-18 + 3D (28) | 0.827 | 0.721 | |" in markdown
    assert "| adrenalmnist3d | goal (ResNet-18 + 3D (28)) | met | | |" in markdown
