"""``medvit report`` and the shared plots: content equals the run files, renders in Chromium."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import short_trainer_args
from matplotlib.text import Text
from medmnist import INFO
from PIL import Image
from torchmetrics.functional import classification as tmf

from medvit import cv, report, runs
from medvit.cli import main
from medvit.evaluate import plots
from medvit.report.tables import duration

ROOT = Path(__file__).resolve().parents[1]
RUN_PLOTS = {
    "learning_curves",
    "roc",
    "pr",
    "confusion_counts",
    "confusion_normalized",
    "reliability",
}
QUICK = short_trainer_args(
    2, train_batches=3, val_batches=2, batch_size=None, patch_size=None, verify_md5=True
)


# ----------------------------------------------------------------------------- HTML reading
class Page(HTMLParser):
    """Tables cells with data-* attributes, figures and their images, sections, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cells: list[dict] = []  # attrs + text of every <td>/<th>
        self.figures: list[dict] = []  # data-plot, alt, src, section
        self.sections: list[dict] = []
        self.scripts: list[dict] = []
        self.links: list[tuple[str, str]] = []  # (attribute, value) of src/href
        self._cell: dict | None = None
        self._figure: dict | None = None
        self._section: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.links.append((key, a[key]))
        if tag == "section":
            self._section = {**a, "text": "", "data-dir": a.get("data-dir") or a.get("id")}
            self.sections.append(self._section)
        elif tag in ("td", "th"):
            self._cell = {
                **a,
                "tag": tag,
                "text": "",
                "section": (self._section or {}).get("data-dir"),
            }
            self.cells.append(self._cell)
        elif tag == "figure":
            self._figure = {**a, "section": (self._section or {}).get("data-dir"), "caption": ""}
            self.figures.append(self._figure)
        elif tag == "img" and self._figure is not None:
            self._figure.update(src=a.get("src", ""), alt=a.get("alt", ""))
        elif tag == "script":
            self.scripts.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._figure is not None:
            self._figure["caption"] += data
        if self._section is not None:
            self._section["text"] += data

    def value(self, section: str | None = None, **attrs: str) -> str:
        """Text of the one cell with these data-* attributes."""
        found = [
            c
            for c in self.cells
            if all(c.get(f"data-{k}") == v for k, v in attrs.items())
            and (section is None or c["section"] == section)
        ]
        assert len(found) == 1, (attrs, section, len(found))
        return found[0]["text"].strip()


def png_of(figure: dict) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert figure["src"].startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(figure["src"][len(prefix) :])))
    image.load()
    return image


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_runs(real_data, tmp_path_factory):
    """Two short BreastMNIST runs (different seeds) on the official files."""
    tmp = tmp_path_factory.mktemp("report-runs")
    runs = []
    for seed in (1, 2):
        run_dir = tmp / f"seed{seed}"
        main(
            [
                "fit",
                "-c",
                str(ROOT / "configs" / "experiment" / "breastmnist.yaml"),
                f"--data.root={real_data}",
                f"--run.dir={run_dir}",
                f"--seed_everything={seed}",
                *QUICK,
            ]
        )
        runs.append(run_dir)
    return runs


@pytest.fixture(scope="module")
def cv_dir(real_runs, tmp_path_factory):
    """A CV folder in ``medvit cv``'s layout: the two runs as folds 0 and 1; fold 2 missing."""
    path = tmp_path_factory.mktemp("cv") / "breastmnist-cv"
    for k, run in enumerate(real_runs):
        shutil.copytree(
            run, path / "runs" / f"r0-f{k}", ignore=shutil.ignore_patterns("checkpoints")
        )
    (path / "logs").mkdir()
    (path / "cv_config.json").write_text(
        json.dumps(
            {"experiment": "breastmnist", "folds": 3, "repeats": 1, "seed": 0, "pool": "train+val"}
        )
    )
    (path / "folds.csv").write_text("split,index,repeat,fold\n")
    runs = [cv.FoldRun(0, k) for k in range(3)]
    cv.summarize(path, runs, info={"experiment": "breastmnist", "folds": 3, "repeats": 1})
    return path


# ----------------------------------------------------------------------------- single run
@pytest.mark.slow
def test_run_report_numbers_and_plots_match_the_run_files(real_runs):
    run_dir = real_runs[0]
    text = report.build_report([run_dir])
    page = Page(text)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (section,) = page.sections
    label = section["data-dir"]

    # Every number of metrics.json, printed with 4 decimals.
    for stage in ("val", "test"):
        assert metrics[stage]
        for name, value in metrics[stage].items():
            assert page.value(label, stage=stage, metric=name) == f"{value:.4f}", (stage, name)

    # Every plot, as a decodable PNG of a sensible size.
    assert {f["data-plot"] for f in page.figures} == RUN_PLOTS
    for figure in page.figures:
        image = png_of(figure)
        assert image.width >= 400 and image.height >= 350, figure["data-plot"]
        assert len(image.getcolors(1 << 20) or []) > 20, f"{figure['data-plot']} looks blank"
    # The reliability diagram's ECE is the ece metric of metrics.json.
    (reliability,) = [f for f in page.figures if f["data-plot"] == "reliability"]
    assert f"ECE {metrics['test']['ece']:.4f}" in reliability["caption"]

    # Header: dataset, model, hyper-parameters, git SHA, date, device, duration.
    meta = json.loads((run_dir / "meta.json").read_text())
    header = section["text"]
    for expected in (
        "breastmnist (28 px)",
        "malignant",
        "normal, benign",
        "vit_tiny_patch16_224",
        f"lr {yaml.safe_load((run_dir / 'config.yaml').read_text())['model']['lr']}",
        str(meta["git_sha"])[:12],
        meta["started"][:10],
        meta["device"],
        duration(meta["duration_s"]),
    ):
        assert expected in header, expected

    # Per-class table: torchmetrics per-class recall of the saved predictions.
    preds = plots.Predictions.load(run_dir / "test_predictions.npz")
    recall = tmf.multiclass_recall(*preds.tensors(), num_classes=2, average=None)
    cells = [c for c in page.cells if c.get("data-metric") == "recall"]
    assert [c["text"] for c in cells] == [f"{v:.4f}" for v in recall.tolist()]
    # Sensitivity is the recall of BreastMNIST's positive class, malignant (class 0).
    assert recall[0].item() == pytest.approx(metrics["test"]["sens"], abs=1e-6)

    # Self-contained: only data: URIs and in-page anchors; inline scripts only.
    assert page.links and all(v.startswith(("data:", "#")) for _, v in page.links), page.links
    assert all("src" not in s for s in page.scripts)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    data = json.loads(re.search(r'id="medvit-data">(.*?)</script>', text, re.S).group(1))
    assert data["dirs"][0]["metrics"]["test"] == metrics["test"]


@pytest.mark.slow
def test_report_cli_default_output_and_errors(real_runs, tmp_path, monkeypatch, capsys):
    main(["report", str(real_runs[0]), "--no-progress"])
    assert (real_runs[0] / "report.html").stat().st_size > 50_000
    monkeypatch.chdir(tmp_path)
    main(["report", *map(str, real_runs), "--no-progress"])
    assert Page((tmp_path / "report.html").read_text()).sections
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(real_runs[0]), str(empty)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "metrics.json" in err and "cv_summary.json" in err


# ----------------------------------------------------------------------------- CV and comparison
@pytest.mark.slow
def test_cv_and_comparison_report(cv_dir, real_runs, tmp_path):
    out = tmp_path / "compare.html"
    report.main([str(cv_dir), str(real_runs[0]), "-o", str(out), "--no-progress"])
    page = Page(out.read_text())
    kinds = [s["class"] for s in page.sections]
    assert kinds == ["compare", "cv", "run"]
    cv_label = page.sections[1]["data-dir"]
    run_label = page.sections[2]["data-dir"]

    # Fold table: every fold's metrics, mean ± std, CI and the ensemble, from cv_summary.json.
    agg = runs.read_cv_summary(cv_dir)
    assert len(agg["runs"]) == 2 and len(agg["missing"]) == 1
    for entry in agg["runs"]:
        name = f"r{entry['repeat']}-f{entry['fold']}"
        fold_metrics = json.loads((cv_dir / entry["run_dir"] / "metrics.json").read_text())
        for stage in ("val", "test"):
            for metric, value in fold_metrics[stage].items():
                cell = page.value(cv_label, stage=stage, metric=metric, fold=name)
                assert cell == f"{value:.4f}"
    for metric, stats in agg["test"].items():
        cell = page.value(cv_label, stage="test", metric=metric, stat="mean_std")
        assert cell == f"{stats['mean']:.4f} ± {stats['std']:.4f}"
        cell = page.value(cv_label, stage="test", metric=metric, stat="ci95")
        assert cell == f"[{stats['ci95_low']:.4f}, {stats['ci95_high']:.4f}]"
    ensemble = agg["ensemble"]["test"]
    for metric, value in ensemble.items():
        cells = [
            c["text"]
            for c in page.cells
            if c["section"] == cv_label
            and c.get("data-fold") == "ensemble"
            and c.get("data-metric") == metric
        ]
        assert cells and set(cells) == {f"{value:.4f}"}, metric
    assert "r0-f2" in page.sections[1]["text"]  # the missing fold is named

    # CV plots: fold ROC overlay, strip plot, and the ensemble's own plots.
    cv_plots = {f["data-plot"] for f in page.figures if f["section"] == cv_label}
    assert {"fold_roc", "metric_strip", "roc", "pr", "confusion_counts", "reliability"} <= cv_plots

    # Comparison: both folders side by side (CV as mean ± std), overlaid curves.
    for metric, value in json.loads((real_runs[0] / "metrics.json").read_text())["val"].items():
        cell = page.value("comparison", stage="val", metric=metric, dir=run_label)
        assert cell == f"{value:.4f}"
    cell = page.value("comparison", stage="test", metric="auroc", dir=cv_label)
    assert cell.startswith(f"{agg['test']['auroc']['mean']:.4f} ± ")
    compare_plots = {f["data-plot"] for f in page.figures if f["section"] == "comparison"}
    assert compare_plots == {"compare_roc", "compare_curves"}


def test_cv_summary_schema_is_read_and_shown(tmp_path):
    """The one CV-summary schema (``medvit cv`` writes it): runs, missing with reasons, val/test
    aggregates, a null ensemble; the report names completed and missing runs from it."""
    entry = {
        "run": "r0-f0",
        "repeat": 0,
        "fold": 0,
        "run_dir": "runs/r0-f0",
        "val": {"auroc": 0.9},
        "test": {"auroc": 0.8},
    }
    summary = {
        "experiment": "x",
        "folds": 2,
        "repeats": 1,
        "runs": [entry],
        "val": {"auroc": {"mean": 0.9}},
        "ensemble": None,
        "missing": [{"run": "r0-f1", "repeat": 0, "fold": 1, "reason": "failed (exit code 1)"}],
    }
    cv_folder = tmp_path / "cv"
    cv_folder.mkdir()
    (cv_folder / "cv_summary.json").write_text(json.dumps(summary))
    out = runs.read_cv_summary(cv_folder)
    assert out["runs"] == [entry] and out["ensemble"] is None
    assert out["missing"][0]["reason"] == "failed (exit code 1)"
    assert out["val"]["auroc"]["mean"] == 0.9
    page = Page(report.build_report([cv_folder], progress=False))
    (section,) = page.sections
    assert "Completed folds1: r0-f0" in section["text"]
    assert "r0-f1 (failed (exit code 1))" in section["text"]
    assert page.value(stage="val", metric="auroc", stat="mean_std") == "0.9000 ± —"


def test_report_of_an_unfinished_run(tmp_path):
    """A run that crashed or is still training: header and curves, notes for what is missing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "data:\n  flag: breastmnist\n  size: 28\nmodel:\n  model_name: vit_tiny_patch16_224\n"
        "  lr: 0.001\ntrainer:\n  max_epochs: 30\n"
    )
    (run / "metrics.csv").write_text(
        "epoch,step,train/loss_epoch,val/auroc,val/loss\n0,7,0.7,,\n0,7,,0.6,0.65\n"
    )
    page = Page(report.build_report([run]))
    (section,) = page.sections
    assert "vit_tiny_patch16_224" in section["text"] and "of 30 epochs" in section["text"]
    assert "has no metrics yet" in section["text"]
    assert "No test_predictions.npz" in section["text"]
    assert [f["data-plot"] for f in page.figures] == ["learning_curves"]


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        ValueError, match=r"neither a run folder \(no metrics.json or config.yaml\)"
    ):
        report.build_report([tmp_path])
    with pytest.raises(ValueError, match="is not a directory"):
        report.build_report([tmp_path / "missing"])


# ----------------------------------------------------------------------------- browser
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must install Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(real_runs, tmp_path):
    exe = _chromium()
    out = tmp_path / "report.html"
    report.write_report([real_runs[0]], out, progress=False)
    n_images = out.read_text().count("<img ")
    n_cases = sum(len(entries) for entries in runs.read_gallery(real_runs[0]).values())
    assert n_images == len(RUN_PLOTS) + n_cases  # the plots and the test-case pictures

    dom = _run_chromium(exe, tmp_path / "profile", "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'(data-[\w-]+)="([^"]*)"', body.group(1)))
    assert attrs == {"data-images-total": str(n_images), "data-images-loaded": str(n_images)}
    # Console: only the report's own message (no errors, warnings or uncaught exceptions).
    console = re.findall(r':CONSOLE[^\]]*\] "(.*)", source:', dom.stderr)
    assert console == [f"medvit report: {n_images}/{n_images} images rendered"], console

    shot = tmp_path / "shot.png"
    res = _run_chromium(
        exe, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,3000", out.as_uri()
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 3000)
        gray = np.asarray(im.convert("L"))
        rgb = im.convert("RGB")
        assert (gray < 200).mean() > 0.03, "screenshot is (almost) blank"
        assert len(rgb.getcolors(1 << 24)) > 200  # plots in colour, not just text


# ----------------------------------------------------------------------------- plots
def _fake(flag: str, n: int = 240, seed: int = 0) -> plots.Predictions:
    info = INFO[flag]
    names = list(info["label"].values())
    rng = np.random.default_rng(seed)
    c = len(names)
    if info["task"].startswith("multi-label"):
        target = (rng.random((n, c)) < 0.25).astype(int)
        probs = np.clip(0.45 * target + 0.55 * rng.random((n, c)), 0, 1)
        return plots.Predictions(probs, target, names, "multilabel")
    target = np.arange(n) % c
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), target] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return plots.Predictions(probs, target, names, "binary" if c == 2 else "multiclass")


def _drawn_texts(fig) -> list[Text]:
    """Titles, axis labels, legend entries and the tick labels matplotlib actually draws."""
    texts = [*fig.texts, *(t for lg in fig.legends for t in lg.get_texts())]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        texts += [ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lo, hi), max(lo, hi)
            for tick in axis.get_major_ticks():
                # Ticks outside the view limits exist but are not drawn.
                if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    texts += [tick.label1, tick.label2]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _assert_no_text_overlap(fig) -> None:
    """No two titles, labels, tick labels or legend entries overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [
        (t.get_text(), t.get_window_extent(renderer).shrunk(0.97, 0.9)) for t in _drawn_texts(fig)
    ]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"'{a}' overlaps '{b}'"


@pytest.mark.parametrize("flag", ["breastmnist", "organamnist", "chestmnist"])
def test_plots_have_labels_class_names_and_no_overlapping_text(flag):
    preds = _fake(flag)
    figures = {
        "roc": plots.roc_figure(preds),
        "pr": plots.pr_figure(preds),
        "confusion": plots.confusion_figure(preds),
        "confusion_normalized": plots.confusion_figure(preds, normalize="true"),
        "reliability": plots.reliability_figure(preds),
    }
    for name, fig in figures.items():
        _assert_no_text_overlap(fig)
        texts = " ".join(t.get_text() for t in fig.findobj(Text))
        shown = preds.class_names if name.startswith("confusion") else []
        if name in ("roc", "pr"):  # binary: the positive class; otherwise every class
            shown = preds.class_names[1:] if preds.task == "binary" else preds.class_names
        for class_name in shown:
            # Long names are wrapped or shortened, never dropped.
            first_word = class_name.split()[0].rstrip(",")
            assert first_word in texts, (name, class_name)
        for ax in fig.axes:
            if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>":
                assert ax.get_xlabel() or ax.get_title(), name
    # The legend's AUROC is torchmetrics' macro AUROC (the auroc metric).
    probs, target = preds.tensors()
    if preds.task == "binary":
        expected = tmf.binary_auroc(probs[:, 1], target)
    elif preds.task == "multilabel":
        expected = tmf.multilabel_auroc(probs, target, num_labels=preds.num_classes)
    else:
        expected = tmf.multiclass_auroc(probs, target, num_classes=preds.num_classes)
    assert plots.roc_curves(preds)[-1][3] == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("flag", ["breastmnist", "organamnist", "chestmnist"])
def test_reliability_bins_give_torchmetrics_ece(flag):
    preds = _fake(flag, seed=3)
    bins = plots.calibration_bins(preds)
    filled = bins["count"] > 0
    weight = bins["count"][filled] / bins["count"].sum()
    ece = np.sum(weight * np.abs(bins["accuracy"][filled] - bins["confidence"][filled]))
    assert ece == pytest.approx(bins["ece"], abs=1e-5)
    assert len(bins["edges"]) == plots.N_BINS + 1


def test_learning_curves_read_lightning_metrics_csv(tmp_path):
    # As RunCSVLogger writes it: LR rows (epoch start) have a step but no epoch.
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,lr-AdamW/pg1,lr-AdamW/pg2,step,test/auroc,train/loss_epoch,train/loss_step,val/acc,val/auroc,val/loss\n"
        ",0.0001,0.0001,0,,,,,,\n"
        "0,,,4,,,0.7,,,\n"
        "0,,,7,,,,0.6,0.55,0.69\n"
        "0,,,7,,0.68,,,,\n"
        ",0.0005,0.0005,8,,,,,,\n"
        "1,,,15,,,,0.7,0.65,0.6\n"
        "1,,,15,,0.6,,,,\n"
        "2,,,16,0.7,,,,,\n"
    )
    series = plots.epoch_series(csv)
    assert series["lr-AdamW/pg1"][0].tolist() == [0, 1]
    assert series["lr-AdamW/pg1"][1].tolist() == [0.0001, 0.0005]
    assert series["val/auroc"][1].tolist() == [0.55, 0.65]
    assert "test/auroc" not in series and "train/loss_step" not in series
    fig = plots.learning_curves_figure(csv, best_epoch=1)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "AUROC", "Accuracy", "Learning rate"]
    lr_axes = fig.axes[3]
    assert [line.get_label() for line in lr_axes.get_lines()] == ["lr-AdamW/pg1", "best epoch (1)"]
    _assert_no_text_overlap(fig)


def test_cv_plots():
    folds = [_fake("breastmnist", seed=s) for s in range(5)]
    fig = plots.fold_roc_overlay(folds, [f"r0-f{k}" for k in range(5)], ensemble=folds[0])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert len(labels) == 7 and labels[5].startswith("ensemble") and labels[6] == "chance"
    _assert_no_text_overlap(fig)
    values = {"auroc": [0.8, 0.85, 0.9], "acc": [0.7, 0.75, 0.8], "ece": [0.05, 0.04, 0.06]}
    fig = plots.metric_strip_plot(values, {"auroc": 0.91})
    assert [ax.get_title() for ax in fig.axes] == ["auroc", "acc", "ece"]
    _assert_no_text_overlap(fig)


def test_predictions_validation(tmp_path):
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        plots.Predictions(np.full((4, 2), 0.5), np.zeros(4), ["a", "b", "c"])
    path = tmp_path / "p.npz"
    np.savez(path, probs=np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match=r"lacks \['target'\]"):
        plots.Predictions.load(path)
    assert torch.is_tensor(_fake("breastmnist").tensors()[0])


def _with_absent_class(flag: str) -> plots.Predictions:
    """A prediction set where one class (label) never occurs in the targets."""
    preds = _fake(flag, seed=5)
    target = preds.target.copy()
    if preds.task == "multilabel":
        target[:, 2] = 0
    else:
        target[target == 2] = 0
    return plots.Predictions(preds.probs, target, preds.class_names, preds.task)


@pytest.mark.parametrize("flag", ["breastmnist", "organamnist", "chestmnist"])
@pytest.mark.parametrize("absent", [False, True])
def test_torch_free_numbers_equal_torchmetrics(flag, absent):
    """Per-class scores, curves' AUC/AP, confusion matrices and ECE, without torch, equal
    torchmetrics' (the library behind metrics.json) on the same predictions."""
    preds = _with_absent_class(flag) if absent else _fake(flag, seed=4)
    probs, target = preds.tensors()
    c = preds.num_classes
    # torchmetrics' per-class function of each name in plots.PER_CLASS.
    names = ("precision", "recall", "specificity", "f1_score", "auroc", "average_precision")
    if preds.task == "multilabel":
        kw = {"num_labels": c}
        fns = [getattr(tmf, f"multilabel_{name}") for name in names]
        cm = tmf.multilabel_confusion_matrix(probs, target, **kw)
        ece = tmf.binary_calibration_error(probs.reshape(-1), target.reshape(-1), n_bins=15)
    else:
        kw = {"num_classes": c}
        fns = [getattr(tmf, f"multiclass_{name}") for name in names]
        if preds.task == "binary":
            cm = tmf.binary_confusion_matrix(probs[:, 1], target)
            ece = tmf.binary_calibration_error(*preds.positive_tensors(), n_bins=15)
        else:
            cm = tmf.multiclass_confusion_matrix(probs, target, **kw)
            ece = tmf.multiclass_calibration_error(probs, target, n_bins=15, **kw)
    scores = plots.per_class_metrics(preds)
    for name, fn in zip(plots.PER_CLASS, fns, strict=True):
        expected = fn(probs, target, average=None, **kw).numpy()
        if name in ("auroc", "ap"):
            np.testing.assert_allclose(scores[name], expected, atol=1e-6, err_msg=name)
        else:  # the same float32 divisions: the same digits
            np.testing.assert_array_equal(scores[name], expected, err_msg=name)
    assert (
        scores["support"].tolist()
        == (
            preds.target.sum(0)
            if preds.task == "multilabel"
            else np.bincount(preds.target, minlength=c)
        ).tolist()
    )
    assert plots.confusion_matrix(preds).tolist() == cm.tolist()
    assert plots.calibration_bins(preds)["ece"] == pytest.approx(float(ece), abs=1e-6)
    if preds.task == "multiclass":
        macro = tmf.multiclass_average_precision(probs, target, num_classes=c, average="macro")
        assert plots.pr_curves(preds)[-1][3] == pytest.approx(float(macro), abs=1e-6)
        macro = tmf.multiclass_auroc(probs, target, num_classes=c, average="macro")
        assert plots.roc_curves(preds)[-1][3] == pytest.approx(float(macro), abs=1e-6)


HEAVY = ("torch", "lightning", "timm", "monai", "albumentations")


def test_report_command_does_not_import_torch(tmp_path):
    """``medvit report`` on a run folder and a CV folder imports none of the training stack."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "data:\n  flag: breastmnist\n  size: 28\nmodel:\n  model_name: vit_tiny_patch16_224\n"
    )
    (run / "metrics.csv").write_text("epoch,step,val/auroc,val/loss\n0,7,0.6,0.65\n1,15,0.7,0.6\n")
    preds = _fake("breastmnist", n=60)
    runs.write_predictions(
        run / "test_predictions.npz",
        probs=preds.probs,
        target=preds.target,
        index=preds.index,
        class_names=preds.class_names,
        task="binary",
    )
    runs.write_metrics(run, {"val": {"auroc": 0.7}, "test": {"auroc": 0.65}, "best_epoch": 1})
    cv_folder = tmp_path / "cv"
    shutil.copytree(run, cv_folder / "runs" / "r0-f0")
    entry = {"run": "r0-f0", "repeat": 0, "fold": 0, "run_dir": "runs/r0-f0"}
    summary = {
        "runs": [{**entry, "val": {"auroc": 0.7}, "test": {"auroc": 0.65}}],
        "missing": [],
        "val": {},
        "test": {},
        "ensemble": None,
    }
    (cv_folder / "cv_summary.json").write_text(json.dumps(summary))
    out = tmp_path / "report.html"
    code = (
        "import sys, json\n"
        "from medvit.report import main\n"
        f"main([{str(run)!r}, {str(cv_folder)!r}, '-o', {str(out)!r}, '--no-progress'])\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
    page = Page(out.read_text())
    assert [s["class"] for s in page.sections] == ["compare", "run", "cv"]
    assert {f["data-plot"] for f in page.figures} >= RUN_PLOTS


# ----------------------------------------------------------------------------- test-case gallery
class Cases(HTMLParser):
    """The gallery's pictures: ``(section, group heading, img src, alt, caption)`` in page order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cases: list[dict] = []
        self.headings: list[tuple[str, str]] = []  # (tag, text) of h3/h4/h5
        self._section = self._group = ""
        self._heading: list | None = None
        self._caption: dict | None = None
        self._in_case = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "data-gallery" in a:
            self._section, self._group = a["data-gallery"], ""
        elif tag == "div" and a.get("class") == "case":
            self._in_case = True
        elif tag in ("h3", "h4", "h5"):
            self._heading = [tag, ""]
        elif tag == "img" and self._in_case:
            self._in_case = False
            self.cases.append(
                {"section": self._section, "group": self._group, "src": a["src"], "alt": a["alt"]}
            )
        elif tag == "p" and a.get("class") == "case-caption":
            self._caption = self.cases[-1]
            self._caption["caption"] = ""

    def handle_endtag(self, tag):
        if tag in ("h3", "h4", "h5") and self._heading:
            self.headings.append((self._heading[0], self._heading[1].strip()))
            if tag == "h5":
                self._group = self._heading[1].strip()
            self._heading = None
        elif tag == "p":
            self._caption = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading[1] += data
        if self._caption is not None:
            self._caption["caption"] += data


def _fake_3d_run(path: Path) -> Path:
    """A finished AdrenalMNIST3D-like run folder, written with the runs writers, with a gallery:
    three misclassified volumes (slice triptychs) and an ``explained`` section (two classes,
    correct and wrong, overlays)."""
    from medvit.evaluate import case_plots

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        "data:\n  flag: adrenalmnist3d\n  size: 28\nmodel:\n  model_name: vit3d_tiny\n"
    )
    names = list(INFO["adrenalmnist3d"]["label"].values())
    rng = np.random.default_rng(3)
    probs = rng.dirichlet([1, 1], size=20)
    target = np.arange(20) % 2
    runs.write_predictions(
        path / runs.PREDICTIONS_FILE,
        probs=probs,
        target=target,
        index=np.arange(20),
        class_names=names,
        task="binary",
    )
    runs.write_metrics(path, {"val": {"auroc": 0.7}, "test": {"auroc": 0.6}, "best_epoch": 1})
    misclassified = []
    for k, index in enumerate((7, 2, 11)):
        volume = np.full((1, 28, 28, 28), 0.2, np.float32)
        volume[0, 14, 5 + k, 5 + k] = 1.0
        image = runs.gallery_image_path(path, "misclassified", f"test_{index:05d}.png")
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(case_plots.case_png(volume, f"case {index}"))
        misclassified.append(
            {
                "image": image.relative_to(path).as_posix(),
                "index": index,
                "true": names[0],
                "predicted": names[1],
                "probability": 0.9 - 0.1 * k,
            }
        )
    runs.write_gallery(path, "misclassified", misclassified)
    explained = []
    for index, true, kind in (
        (4, 1, "wrong"),
        (3, 0, "correct"),
        (5, 1, "correct"),
        (8, 0, "wrong"),
    ):
        overlay = rng.random((3, 28, 28)).astype(np.float32)
        image = runs.gallery_image_path(path, "explained", f"rollout_{index:05d}.png")
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(case_plots.case_png(overlay))
        predicted = true if kind == "correct" else 1 - true
        explained.append(
            {
                "image": image.relative_to(path).as_posix(),
                "index": index,
                "true": names[true],
                "predicted": names[predicted],
                "probability": 0.8,
                "method": "rollout",
                "kind": kind,
                **({"caption": "most confident wrong of class normal"} if index == 8 else {}),
            }
        )
    runs.write_gallery(path, "explained", explained)
    return path


def test_report_shows_the_gallery_of_a_3d_run_with_misclassified_and_explained_cases(tmp_path):
    run = _fake_3d_run(tmp_path / "adrenal")
    names = list(INFO["adrenalmnist3d"]["label"].values())
    html = report.build_report([run], progress=False)
    page = Cases(html)
    gallery = runs.read_gallery(run)
    # Every picture is embedded (the file's bytes as a data URI), in the gallery's order.
    for section in ("misclassified", "explained"):
        shown = [c for c in page.cases if c["section"] == section]
        assert len(shown) == len(gallery[section]), section
        for case in shown:
            data = base64.b64decode(case["src"].split(",", 1)[1])
            (entry,) = [e for e in gallery[section] if (run / e["image"]).read_bytes() == data]
            assert f"#{entry['index']} · true: {entry['true']}" in case["caption"]
            assert f"predicted: {entry['predicted']}" in case["caption"]
            assert f"(p = {entry['probability']:.3f})" in case["caption"]
    wrong = [c for c in page.cases if c["section"] == "misclassified"]
    assert [c["caption"].split(" ")[0] for c in wrong] == ["#7", "#2", "#11"]
    for case in wrong:  # the slice triptychs, whole
        image = png_of({"src": case["src"]})
        assert image.width > 2 * image.height
    # Explained: grouped by true class (in order of appearance), correct before wrong.
    groups = [
        (c["group"], c["caption"].split(" ")[0]) for c in page.cases if c["section"] == "explained"
    ]
    assert groups == [
        (f"true {names[1]} · correct", "#5"),
        (f"true {names[1]} · wrong", "#4"),
        (f"true {names[0]} · correct", "#3"),
        (f"true {names[0]} · wrong", "#8"),
    ]
    assert all("rollout" in c["caption"] for c in page.cases if c["section"] == "explained")
    (own,) = [c["caption"] for c in page.cases if c["caption"].startswith("#8 ")]
    assert own == (
        f"#8 · true: {names[0]} · predicted: {names[1]} (p = 0.800) · most confident wrong of "
        "class normal · rollout"
    )
    assert ("h3", "Test cases") in page.headings
    # Gallery pictures are not plots: the figures stay the report's own.
    assert {f.get("data-plot") for f in Page(html).figures} == RUN_PLOTS - {"learning_curves"}


def test_report_of_a_cv_folder_shows_its_first_folds_gallery_without_torch(tmp_path):
    """The CV section shows fold r0-f0's pictures; run and CV reports stay torch-free."""
    run = _fake_3d_run(tmp_path / "cv" / "runs" / "r0-f0")
    entry = {"run": "r0-f0", "repeat": 0, "fold": 0, "run_dir": "runs/r0-f0"}
    summary = {
        "runs": [{**entry, "val": {"auroc": 0.7}, "test": {"auroc": 0.6}}],
        "missing": [],
        "val": {},
        "test": {},
        "ensemble": None,
    }
    (tmp_path / "cv" / "cv_summary.json").write_text(json.dumps(summary))
    empty = tmp_path / "perfect"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("gallery"))
    runs.write_gallery(empty, "misclassified", [])
    out = tmp_path / "report.html"
    code = (
        "import sys, json\n"
        "from medvit.report import main\n"
        f"main([{str(tmp_path / 'cv')!r}, {str(empty)!r}, '-o', {str(out)!r}, '--no-progress'])\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
    html = out.read_text()
    page = Cases(html)
    assert ("h3", "Test cases (fold r0-f0)") in page.headings
    gallery = runs.read_gallery(run)
    assert len(page.cases) == len(gallery["misclassified"]) + len(gallery["explained"])
    assert "None: every test case was classified correctly." in html
