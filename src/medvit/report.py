"""``medvit report``: one self-contained HTML file for run folders and CV folders.

The report reads only the files in the folders (``config.yaml``, ``meta.json``, ``metrics.json``,
``metrics.csv``, ``test_predictions.npz``; for CV ``cv_summary.json``, ``cv_config.json``, the
fold runs and ``ensemble_test_predictions.npz``), so it works for runs made on another machine.
Figures are embedded as PNG data URIs and the page loads nothing from the network.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from torchmetrics.functional import classification as tmf
from tqdm.auto import tqdm

from medvit.evaluate import plots
from medvit.fileio import atomic_write_text

CV_SUMMARY = "cv_summary.json"
CV_CONFIG = "cv_config.json"
ENSEMBLE_PREDICTIONS = "ensemble_test_predictions.npz"
RUN_MARKERS = ("metrics.json", "config.yaml")
PREDICTIONS = "test_predictions.npz"
DEFAULT_OUTPUT = "report.html"
# Metrics first in this order, then any others alphabetically.
METRIC_ORDER = (
    "auroc",
    "acc",
    "bal_acc",
    "f1",
    "sens",
    "spec",
    "threshold",
    "op_acc",
    "op_sens",
    "op_spec",
    "op_ppv",
    "op_npv",
    "op_f1",
    "qwk",
    "mae",
    "ece",
    "ece_uncalibrated",
    "ece_calibrated",
    "temperature",
    "loss",
)
METRIC_NAMES = {
    "auroc": "AUROC (macro)",
    "acc": "accuracy",
    "bal_acc": "balanced accuracy",
    "f1": "F1 (macro)",
    "sens": "sensitivity",
    "spec": "specificity",
    "qwk": "quadratic weighted kappa",
    "mae": "mean absolute error (grades)",
    "ece": "expected calibration error",
    "ece_calibrated": "ECE after temperature scaling",
    "ece_uncalibrated": "ECE before temperature scaling",
    "temperature": "temperature fitted on validation",
    "loss": "loss",
}
# Binary runs: what each metric is about, with the positive class's name in place of {pos}.
BINARY_METRIC_NAMES = {
    "auroc": "AUROC",
    "f1": "F1 of {pos}, at argmax",
    "sens": "sensitivity: {pos} found, at argmax",
    "spec": "specificity: not-{pos} cleared, at argmax",
    "threshold": "threshold on P({pos}), chosen on validation",
    "op_acc": "accuracy at the threshold",
    "op_sens": "sensitivity at the threshold",
    "op_spec": "specificity at the threshold",
    "op_ppv": "positive predictive value at the threshold",
    "op_npv": "negative predictive value at the threshold",
    "op_f1": "F1 of {pos} at the threshold",
}
DIGITS = 4


def metric_name(key: str, positive_class: str | None = None) -> str:
    """What a metric key means; for binary runs, named after the positive class."""
    if positive_class is not None and key in BINARY_METRIC_NAMES:
        return BINARY_METRIC_NAMES[key].format(pos=positive_class)
    return METRIC_NAMES.get(key, "")


# ----------------------------------------------------------------------------- reading
def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {_one_line(err)}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object.")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid YAML: {_one_line(err)}") from err
    return data if isinstance(data, dict) else {}


def _read_predictions(path: Path) -> plots.Predictions | None:
    """A predictions ``.npz`` (None when absent); any defect is a ValueError naming the file."""
    if not path.is_file():
        return None
    try:
        return plots.Predictions.load(path)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {_one_line(err)}") from err
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a readable predictions .npz ({type(err).__name__}: {_one_line(err)})."
        ) from err


@dataclass
class Run:
    """What a run folder holds (missing files are empty)."""

    path: Path
    label: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    metrics_csv: Path | None = None
    predictions: plots.Predictions | None = None

    @classmethod
    def load(cls, path: Path, label: str = "") -> Run:
        """Read a run folder."""
        csv_path = path / "metrics.csv"
        preds_path = path / PREDICTIONS
        return cls(
            path=path,
            label=label or path.name,
            metrics=_read_json(path / "metrics.json"),
            config=_read_yaml(path / "config.yaml"),
            hparams=_read_yaml(path / "hparams.yaml"),
            meta=_read_json(path / "meta.json"),
            metrics_csv=csv_path if csv_path.is_file() and csv_path.stat().st_size else None,
            predictions=_read_predictions(preds_path),
        )

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A resolved config value (``model.lr``), else the flat hparams value (``lr``)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is None:
            node = self.hparams.get(dotted.split(".")[-1])
        return default if node is None else node


@dataclass
class CVRun:
    """What a CV folder holds."""

    path: Path
    label: str
    summary: dict[str, Any]
    config: dict[str, Any]
    folds: list[tuple[str, Run | None]]
    ensemble: plots.Predictions | None

    @classmethod
    def load(cls, path: Path, label: str = "") -> CVRun:
        """Read a CV folder and the run folders of its completed folds."""
        summary = normalize_summary(_read_json(path / CV_SUMMARY))
        folds = []
        for entry in summary["per_fold"]:
            name = _fold_name(entry)
            run_dir = _find_fold_dir(path, entry, name)
            folds.append((name, Run.load(run_dir, name) if run_dir is not None else None))
        ens = path / ENSEMBLE_PREDICTIONS
        return cls(
            path=path,
            label=label or path.name,
            summary=summary,
            config=_read_json(path / CV_CONFIG),
            folds=folds,
            ensemble=_read_predictions(ens),
        )

    def first_run(self) -> Run | None:
        """The first fold whose folder was found (all folds share data and model settings)."""
        return next((run for _, run in self.folds if run is not None), None)


def _fold_name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("run") or f"r{entry.get('repeat', 0)}-f{entry.get('fold', 0)}")


def normalize_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``cv_summary.json`` in one shape: ``per_fold``, ``aggregate``, ``ensemble``, ``completed``, ``missing``.

    Accepts per-fold entries under ``per_fold`` or ``runs``, aggregates under ``aggregate.<stage>``
    or top-level ``val``/``test``, missing folds as names or as dicts with a ``reason``, and a
    ``null`` ensemble.
    """
    out = dict(summary)
    per_fold = list(summary.get("per_fold") or summary.get("runs") or [])
    aggregate = summary.get("aggregate")
    if not isinstance(aggregate, Mapping):
        aggregate = {
            st: summary[st] for st in ("val", "test") if isinstance(summary.get(st), Mapping)
        }
    missing = []
    for entry in summary.get("missing") or []:
        if isinstance(entry, Mapping):
            reason = f" ({entry['reason']})" if entry.get("reason") else ""
            missing.append(f"{_fold_name(entry)}{reason}")
        else:
            missing.append(str(entry))
    out.update(
        {
            "per_fold": per_fold,
            "aggregate": {st: dict(v) for st, v in aggregate.items()},
            "ensemble": dict(summary.get("ensemble") or {}),
            "completed": [
                str(c) for c in summary.get("completed") or [_fold_name(e) for e in per_fold]
            ],
            "missing": missing,
        }
    )
    return out


def _find_fold_dir(cv_dir: Path, entry: Mapping[str, Any], name: str) -> Path | None:
    """A fold's run folder: as recorded (relative to the CV folder, or absolute), else runs/<name>."""
    candidates = []
    if entry.get("run_dir"):
        recorded = Path(entry["run_dir"])
        candidates += [recorded] if recorded.is_absolute() else [cv_dir / recorded, recorded]
    # Absolute paths from another machine do not exist here: fall back to the standard layout.
    candidates.append(cv_dir / "runs" / name)
    return next((c for c in candidates if c.is_dir()), None)


def detect(path: str | Path) -> str:
    """``"cv"`` for a CV folder, ``"run"`` for a run folder; a ValueError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory.")
    if (path / CV_SUMMARY).is_file():
        return "cv"
    if any((path / name).is_file() for name in RUN_MARKERS):
        return "run"
    raise ValueError(
        f"{path} is neither a run folder (no {' or '.join(RUN_MARKERS)}) nor a CV folder "
        f"(no {CV_SUMMARY})."
    )


def _labels(paths: Sequence[Path]) -> list[str]:
    """Shortest distinct trailing path parts, e.g. ``breastmnist/20250101-120000``."""
    resolved = [p.resolve() for p in paths]
    for depth in range(2, 12):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


# ----------------------------------------------------------------------------- HTML helpers
def esc(value: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A metric value with fixed precision; ``—`` when missing or not finite."""
    if value is None or isinstance(value, bool):
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return esc(value)
    return f"{number:.{DIGITS}f}" if math.isfinite(number) else "—"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "x"


def _ordered(keys: Iterable[str]) -> list[str]:
    keys = list(dict.fromkeys(keys))
    known = [k for k in METRIC_ORDER if k in keys]
    return known + sorted(k for k in keys if k not in METRIC_ORDER)


def _figure(fig: Figure, name: str, alt: str, caption: str = "") -> str:
    png = plots.figure_to_png(fig, dpi=100)
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="plot" data-plot="{esc(name)}">'
        f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'
    )


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", caption: str = ""
) -> str:
    """A table from pre-escaped cell HTML (``<td>`` or ``<th>`` included)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="{esc(cls)}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num_cell(value: Any, **data: Any) -> str:
    attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in data.items())
    return f'<td class="num"{attrs}>{fmt(value)}</td>'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _duration(seconds: Any) -> str:
    try:
        s = int(round(float(seconds)))
    except (TypeError, ValueError):
        return "—"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _date(value: Any) -> str:
    if not value:
        return "—"
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return stamp.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _scalar(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "—" if value is None else str(value)


def _filename(value: Any) -> str:
    """A path's last part (a local weights file or checkpoint), not its folders."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name
    return _scalar(value)


# ----------------------------------------------------------------------------- run sections
def run_header(run: Run) -> str:
    """Dataset, model, key hyper-parameters, git SHA, date, device, duration."""
    flag = run.setting("data.flag", "?")
    size = run.setting("data.size", "")
    preds = run.predictions
    classes = run.setting("model.class_names") or (preds.class_names if preds else [])
    task = run.setting("model.task") or (preds.task if preds else "?")
    meta = run.meta
    sha = str(meta.get("git_sha", "unknown"))
    dirty = " (uncommitted changes)" if meta.get("git_dirty") else ""
    device = meta.get("device") or meta.get("accelerator") or "—"
    if meta.get("num_devices"):
        device = f"{device} × {meta['num_devices']} ({meta.get('accelerator', '?')}, {meta.get('strategy', '?')})"
    rows = [
        (
            "Dataset",
            f"{flag} ({size} px), {task}, {len(classes)} classes: {', '.join(map(str, classes))}",
        ),
        (
            "Model",
            f"{run.setting('model.model_name', '?')}, patch {run.setting('model.patch_size', '—')}, "
            f"input {run.setting('model.img_size', size)} px, pretrained: "
            f"{_filename(run.setting('model.pretrained', False))}",
        ),
        (
            "Optimisation",
            f"lr {_scalar(run.setting('model.lr'))}, weight decay {_scalar(run.setting('model.weight_decay'))}, "
            f"layer decay {_scalar(run.setting('model.layer_decay'))}, warm-up "
            f"{_scalar(run.setting('model.warmup_epochs'))} epochs, batch "
            f"{_scalar(run.setting('data.global_batch_size'))} (global)",
        ),
        (
            "Regularisation",
            f"label smoothing {_scalar(run.setting('model.label_smoothing'))}, drop path "
            f"{_scalar(run.setting('model.drop_path_rate'))}, class weights "
            f"{_scalar(run.setting('model.class_weights'))}, augmentation "
            f"{_scalar(run.setting('data.augmentation', 'dataset default'))}",
        ),
        (
            "Training",
            f"{_scalar(run.metrics.get('epochs_trained', '—'))} of "
            f"{_scalar(run.setting('trainer.max_epochs'))} epochs, best epoch "
            f"{_scalar(run.metrics.get('best_epoch', '—'))} by {_scalar(run.metrics.get('monitor', '—'))}, "
            f"precision {_scalar(meta.get('precision') or run.setting('trainer.precision'))}, seed "
            f"{_scalar(run.setting('seed_everything'))}",
        ),
        ("Tested checkpoint", _filename(run.metrics.get("test_checkpoint", "—"))),
        ("Git SHA", f"{sha[:12]}{dirty}"),
        ("Date", f"{_date(meta.get('started'))} → {_date(meta.get('finished'))}"),
        ("Device", str(device)),
        ("Duration", _duration(meta.get("duration_s"))),
    ]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="header">{body}</table>'


def metrics_table(run: Run) -> str:
    """Validation (best epoch) and test metrics, as in ``metrics.json``."""
    val, test = run.metrics.get("val", {}), run.metrics.get("test", {})
    if not val and not test:
        return _note(f"{run.path / 'metrics.json'} has no metrics yet.")
    rows = []
    positive = run.metrics.get("positive_class")
    for key in _ordered([*val, *test]):
        rows.append(
            [
                f"<th>{esc(key)}</th>",
                f"<td>{esc(metric_name(key, positive))}</td>",
                _num_cell(val.get(key), stage="val", metric=key),
                _num_cell(test.get(key), stage="test", metric=key),
            ]
        )
    best = run.metrics.get("best_epoch")
    head = [
        "metric",
        "",
        f"validation (best epoch {best})" if best is not None else "validation",
        "test",
    ]
    return _table(head, rows, cls="metrics", caption="Metrics (metrics.json)")


def per_class_table(preds: plots.Predictions) -> str:
    """Support, precision, recall, specificity, F1, AUROC and AP of every class (threshold 0.5 / argmax)."""
    probs, target = preds.tensors()
    c = preds.num_classes
    if preds.task == "multilabel":
        kw: dict[str, Any] = {"num_labels": c, "average": None}
        fns = (
            tmf.multilabel_precision,
            tmf.multilabel_recall,
            tmf.multilabel_specificity,
            tmf.multilabel_f1_score,
            tmf.multilabel_auroc,
            tmf.multilabel_average_precision,
        )
        support = preds.target.sum(axis=0)
    else:
        kw = {"num_classes": c, "average": None}
        fns = (
            tmf.multiclass_precision,
            tmf.multiclass_recall,
            tmf.multiclass_specificity,
            tmf.multiclass_f1_score,
            tmf.multiclass_auroc,
            tmf.multiclass_average_precision,
        )
        support = np.bincount(preds.target, minlength=c)
    columns = [fn(probs, target, **kw).tolist() for fn in fns]
    names = ("precision", "recall", "specificity", "f1", "auroc", "ap")
    rows = []
    for i, name in enumerate(preds.class_names):
        cells = [f"<th>{esc(name)}</th>", f'<td class="num">{int(support[i])}</td>']
        cells += [_num_cell(col[i], metric=n) for col, n in zip(columns, names, strict=True)]
        rows.append(cells)
    head = [
        "class",
        "support" if preds.task != "multilabel" else "positives",
        "precision (PPV)",
        "recall (sensitivity)",
        "specificity",
        "F1",
        "AUROC",
        "average precision",
    ]
    rule = "label probability ≥ 0.5" if preds.task == "multilabel" else "most probable class"
    return _table(head, rows, cls="per-class", caption=f"Per-class metrics (prediction: {rule})")


def prediction_plots(preds: plots.Predictions, what: str) -> str:
    """ROC, PR, confusion (counts and normalised), reliability and the per-class table."""
    parts = [
        _figure(plots.roc_figure(preds, title=f"ROC curve — {what}"), "roc", f"ROC curve, {what}"),
        _figure(
            plots.pr_figure(preds, title=f"Precision–recall — {what}"),
            "pr",
            f"Precision-recall curve, {what}",
        ),
        _figure(
            plots.confusion_figure(preds), "confusion_counts", f"Confusion matrix (counts), {what}"
        ),
        _figure(
            plots.confusion_figure(preds, normalize="true"),
            "confusion_normalized",
            f"Confusion matrix (normalized by true class), {what}",
        ),
        _figure(
            plots.reliability_figure(preds),
            "reliability",
            f"Reliability diagram, {what}",
            f"ECE {plots.calibration_bins(preds)['ece']:.4f} (the ece metric: {plots.N_BINS} "
            "equal-width bins). Bars: observed frequency per bin; black lines: mean predicted "
            "probability; hatched: the gap between them.",
        ),
    ]
    return f'<div class="grid">{"".join(parts)}</div>{per_class_table(preds)}'


def run_section(run: Run, anchor: str) -> str:
    """Everything about one run folder."""
    parts = [f'<section class="run" id="{esc(anchor)}" data-dir="{esc(run.label)}">']
    parts.append(f"<h2>Run {esc(run.label)}</h2>")
    parts.append(run_header(run))
    parts.append(metrics_table(run))
    parts.append("<h3>Learning curves</h3>")
    if run.metrics_csv is not None:
        fig = plots.learning_curves_figure(
            run.metrics_csv, best_epoch=run.metrics.get("best_epoch")
        )
        parts.append(_figure(fig, "learning_curves", f"Learning curves, {run.label}"))
    else:
        parts.append(_note(f"No metrics.csv in {run.path}."))
    parts.append("<h3>Test predictions</h3>")
    if run.predictions is not None:
        parts.append(prediction_plots(run.predictions, "test"))
    else:
        parts.append(
            _note(
                f"No {PREDICTIONS} in {run.path}: test the run (medvit test -c config.yaml "
                "--ckpt_path checkpoints/best.ckpt) to get ROC, PR, confusion and calibration plots."
            )
        )
    parts.append("</section>")
    return "".join(parts)


# ----------------------------------------------------------------------------- CV sections
def _cv_stage_table(cv: CVRun, stage: str) -> str:
    per_fold = cv.summary.get("per_fold", [])
    agg = cv.summary.get("aggregate", {}).get(stage, {})
    keys = _ordered([k for e in per_fold for k in e.get(stage, {})] + list(agg))
    if not keys:
        return _note(f"{CV_SUMMARY} has no {stage} metrics.")
    rows = []
    for entry in per_fold:
        name = _fold_name(entry)
        values = entry.get(stage) or {}
        rows.append(
            [f"<th>{esc(name)}</th>"]
            + [_num_cell(values.get(k), stage=stage, metric=k, fold=name) for k in keys]
        )
    rows.append(
        ['<th class="agg">mean ± std</th>']
        + [
            f'<td class="num agg" data-stage="{stage}" data-metric="{esc(k)}" data-stat="mean_std">'
            f"{fmt(agg.get(k, {}).get('mean'))} ± {fmt(agg.get(k, {}).get('std'))}</td>"
            for k in keys
        ]
    )
    rows.append(
        ['<th class="agg">95% CI</th>']
        + [
            f'<td class="num agg" data-stage="{stage}" data-metric="{esc(k)}" data-stat="ci95">'
            f"[{fmt(agg.get(k, {}).get('ci95_low'))}, {fmt(agg.get(k, {}).get('ci95_high'))}]</td>"
            for k in keys
        ]
    )
    rows.append(
        ['<th class="agg">n</th>']
        + [f'<td class="num agg">{esc(agg.get(k, {}).get("n", "—"))}</td>' for k in keys]
    )
    ens = cv.summary.get("ensemble", {}).get(stage)
    if ens:
        rows.append(
            ['<th class="ens">ensemble</th>']
            + [_num_cell(ens.get(k), stage=stage, metric=k, fold="ensemble") for k in keys]
        )
    title = (
        "Validation (each fold's held-out fold, best epoch)"
        if stage == "val"
        else "Test (official test split)"
    )
    method = cv.summary.get("ci_method")
    if method:
        title += f". 95% CI: {method}."
    return _table(["fold", *keys], rows, cls="folds", caption=title)


def _ensemble_comparison(cv: CVRun) -> str:
    ens = cv.summary.get("ensemble", {}).get("test", {})
    folds = [e.get("test", {}) for e in cv.summary.get("per_fold", [])]
    if not ens or not folds:
        return _note("No ensemble test metrics in cv_summary.json.")
    rows = []
    for key in _ordered(ens):
        values = np.array([f[key] for f in folds if f.get(key) is not None], dtype=np.float64)
        if not len(values):
            continue
        lower = key in plots.LOWER_IS_BETTER
        best = values.min() if lower else values.max()
        better = int(np.sum(values < ens[key])) if lower else int(np.sum(values > ens[key]))
        rows.append(
            [
                f"<th>{esc(key)}</th>",
                _num_cell(ens[key], stage="test", metric=key, fold="ensemble"),
                f'<td class="num">{fmt(values.mean())} ± {fmt(values.std(ddof=1) if len(values) > 1 else 0.0)}</td>',
                _num_cell(best),
                _num_cell(values.min() if not lower else values.max()),
                f'<td class="num">{better} of {len(values)}</td>',
            ]
        )
    head = [
        "metric",
        "ensemble",
        "single fold: mean ± std",
        "best fold",
        "worst fold",
        "folds better than the ensemble",
    ]
    return _table(
        head,
        rows,
        cls="ensemble",
        caption="Ensemble (mean of the folds' probabilities) vs single folds, test split",
    )


def cv_section(cv: CVRun, anchor: str) -> str:
    """Fold tables, fold ROC overlay, per-metric strip plots, ensemble vs folds."""
    s = cv.summary
    parts = [f'<section class="cv" id="{esc(anchor)}" data-dir="{esc(cv.label)}">']
    parts.append(f"<h2>Cross-validation {esc(cv.label)}</h2>")
    completed, missing = s.get("completed", []), s.get("missing", [])
    info = [
        ("Experiment", s.get("experiment", "—")),
        ("Design", f"{s.get('folds', '?')} folds × {s.get('repeats', '?')} repeats"),
        ("Completed folds", f"{len(completed)}: {', '.join(map(str, completed))}"),
    ]
    for key, value in cv.config.items():
        if not isinstance(value, (dict, list)) and key not in ("experiment", "folds", "repeats"):
            info.append((key, _scalar(value)))
    parts.append(
        '<table class="header">'
        + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in info)
        + "</table>"
    )
    if missing:
        parts.append(
            f'<p class="warn">Missing folds (not in the aggregates): {esc(", ".join(map(str, missing)))}</p>'
        )
    first = cv.first_run()
    if first is not None:
        parts.append(f"<h3>Settings (fold {esc(first.label)})</h3>{run_header(first)}")
    parts.append("<h3>Fold metrics</h3>")
    parts.append(_cv_stage_table(cv, "val"))
    parts.append(_cv_stage_table(cv, "test"))
    figs = []
    found = [
        (name, run) for name, run in cv.folds if run is not None and run.predictions is not None
    ]
    if found:
        figs.append(
            _figure(
                plots.fold_roc_overlay(
                    [run.predictions for _, run in found],
                    [name for name, _ in found],
                    cv.ensemble,
                    title="Test ROC of every fold",
                ),
                "fold_roc",
                f"ROC curves of every fold, {cv.label}",
            )
        )
    test_values = {
        k: [e["test"][k] for e in s.get("per_fold", []) if e.get("test", {}).get(k) is not None]
        for k in _ordered(k for e in s.get("per_fold", []) for k in e.get("test", {}))
    }
    if any(test_values.values()):
        figs.append(
            _figure(
                plots.metric_strip_plot(
                    test_values, s.get("ensemble", {}).get("test"), title="Test metrics per fold"
                ),
                "metric_strip",
                f"Test metrics per fold, {cv.label}",
            )
        )
    parts.append(f'<div class="grid">{"".join(figs)}</div>')
    parts.append("<h3>Ensemble vs single folds</h3>")
    parts.append(_ensemble_comparison(cv))
    if cv.ensemble is not None:
        parts.append("<h3>Ensemble test predictions</h3>")
        parts.append(prediction_plots(cv.ensemble, "ensemble, test"))
    parts.append("</section>")
    return "".join(parts)


# ----------------------------------------------------------------------------- comparison
def _summary_values(item: Run | CVRun, stage: str) -> dict[str, tuple[float, float | None]]:
    """metric -> (value, std or None): a run's metrics, or a CV's fold mean ± std."""
    if isinstance(item, Run):
        return {k: (v, None) for k, v in item.metrics.get(stage, {}).items() if v is not None}
    agg = item.summary.get("aggregate", {}).get(stage, {})
    return {k: (v.get("mean"), v.get("std")) for k, v in agg.items() if v.get("mean") is not None}


def comparison_section(items: Sequence[Run | CVRun], anchors: Sequence[str]) -> str:
    """Side-by-side tables (best value in bold) and overlaid curves."""
    parts = ['<section class="compare" id="comparison"><h2>Comparison</h2>']
    settings = []
    for item, anchor in zip(items, anchors, strict=True):
        run = item if isinstance(item, Run) else item.first_run()
        kind = (
            "run"
            if isinstance(item, Run)
            else f"CV ({len(item.summary.get('completed', []))} folds)"
        )

        def get(key: str, run: Run | None = run) -> str:
            return _filename(run.setting(key)) if run is not None else "—"

        settings.append(
            [
                f'<th><a href="#{esc(anchor)}">{esc(item.label)}</a></th>',
                f"<td>{esc(kind)}</td>",
                f"<td>{esc(get('data.flag'))}</td>",
                f"<td>{esc(get('model.model_name'))}</td>",
                f"<td>{esc(get('model.pretrained'))}</td>",
                f'<td class="num">{esc(get("model.lr"))}</td>',
                f'<td class="num">{esc(get("data.global_batch_size"))}</td>',
                f'<td class="num">{esc(get("trainer.max_epochs"))}</td>',
            ]
        )
    parts.append(
        _table(
            ["run", "kind", "dataset", "model", "pretrained", "lr", "batch", "max epochs"],
            settings,
            cls="compare",
            caption="Settings",
        )
    )
    for stage, title in (("val", "Validation (pick runs on this)"), ("test", "Test")):
        values = [_summary_values(item, stage) for item in items]
        keys = _ordered(k for v in values for k in v)
        if not keys:
            continue
        best = {}
        for key in keys:
            present = [v[key][0] for v in values if key in v]
            # Bold marks a winner only where the runs differ.
            if len({fmt(p) for p in present}) > 1:
                best[key] = (min if key in plots.LOWER_IS_BETTER else max)(present)
        rows = []
        for item, vals, anchor in zip(items, values, anchors, strict=True):
            cells = [f'<th><a href="#{esc(anchor)}">{esc(item.label)}</a></th>']
            for key in keys:
                if key not in vals:
                    cells.append('<td class="num">—</td>')
                    continue
                value, std = vals[key]
                text = fmt(value) + (f" ± {fmt(std)}" if std is not None else "")
                bold = ' best"' if value == best.get(key) else '"'
                cells.append(
                    f'<td class="num{bold} data-stage="{stage}" data-metric="{esc(key)}" data-dir="{esc(item.label)}">{text}</td>'
                )
            rows.append(cells)
        parts.append(
            _table(
                ["run", *keys],
                rows,
                cls="compare",
                caption=f"{title}: CV folders show mean ± std over folds; best in bold",
            )
        )
    figs = []
    with_preds = []
    for item in items:
        preds = item.predictions if isinstance(item, Run) else item.ensemble
        label = item.label if isinstance(item, Run) else f"{item.label} (ensemble)"
        if preds is not None:
            with_preds.append((label, preds))
    if with_preds:
        fig = plots.fold_roc_overlay(
            [p for _, p in with_preds], [lab for lab, _ in with_preds], title="Test ROC"
        )
        figs.append(_figure(fig, "compare_roc", "Test ROC curves of the compared runs"))
    curves = [
        (item.label, item.metrics_csv)
        for item in items
        if isinstance(item, Run) and item.metrics_csv
    ]
    if curves:
        fig = plots.compare_curves_figure([c for _, c in curves], [lab for lab, _ in curves])
        figs.append(_figure(fig, "compare_curves", "Validation curves of the compared runs"))
    parts.append(f'<div class="grid">{"".join(figs)}</div></section>')
    return "".join(parts)


# ----------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
 max-width:1400px;padding:1rem 2rem;color:#1b1f24;background:#fff;line-height:1.4}
h1{font-size:1.6rem;margin:.2rem 0}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2rem;margin-top:2.5rem}
h3{margin-top:1.6rem}nav ul{columns:2;padding-left:1.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .55rem;text-align:left;vertical-align:top}
thead th{background:#f3f5f7}caption{text-align:left;font-weight:600;padding:.3rem 0}
table.header th{background:#f6f8fa;white-space:nowrap;width:11rem}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{font-weight:700}th.agg,td.agg{background:#f6f8fa}th.ens{background:#fff3e0}
.grid{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure.plot{margin:0;border:1px solid #e4e8ec;padding:.4rem;background:#fff}
figure.plot img{display:block;max-width:100%;height:auto}
figcaption{font-size:.8rem;color:#57606a;max-width:34rem}
.note{color:#57606a;font-style:italic}.warn{background:#fff8c5;border:1px solid #d4a72c;padding:.4rem .6rem}
footer{margin-top:3rem;color:#57606a;font-size:.8rem}
"""

# Marks the page once every embedded image has decoded (browser tests read data-images-loaded).
SCRIPT = """
(function () {
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
    document.body.setAttribute("data-images-total", String(images.length));
    document.body.setAttribute("data-images-loaded", String(loaded.length));
    console.log("medvit report: " + loaded.length + "/" + images.length + " images rendered");
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
"""


def _json_script(data: Any) -> str:
    text = json.dumps(data, indent=None, sort_keys=True, default=str)
    # "</" would end the script element early; "<\/" is the same string to JSON.
    return text.replace("</", "<\\/")


def expand_parents(paths: Sequence[Path]) -> list[Path]:
    """Each path as given, except a folder of run/CV folders, which becomes its sub-folders.

    ``medvit report runs/breastmnist/`` then compares every run of that experiment (sorted by
    name, i.e. by start time). A folder that is neither, and holds none, stays as given, so that
    :func:`detect` names what is missing.
    """
    out: list[Path] = []
    for path in paths:
        try:
            detect(path)
            out.append(path)
            continue
        except ValueError:
            pass
        children = []
        for child in sorted(path.iterdir()) if path.is_dir() else []:
            try:
                detect(child)
                children.append(child)
            except ValueError:
                continue
        out += children or [path]
    return out


def build_report(dirs: Sequence[str | Path], progress: bool | None = None) -> str:
    """The HTML report of run folders and/or CV folders.

    Args:
        dirs: run folders (``metrics.json`` / ``config.yaml``), CV folders (``cv_summary.json``),
            or folders holding such folders (each is compared).
        progress: show a progress bar; default when there are more than two folders.

    Returns:
        A self-contained HTML document.
    """
    if not dirs:
        raise ValueError("No folders given.")
    paths = expand_parents([Path(d) for d in dirs])
    kinds = [detect(p) for p in paths]  # fail before any slow work
    labels = _labels(paths)
    show = len(paths) > 2 if progress is None else progress
    items: list[Run | CVRun] = []
    for path, kind, label in tqdm(
        list(zip(paths, kinds, labels, strict=True)),
        desc="reading",
        disable=not show,
        file=sys.stderr,
    ):
        items.append(CVRun.load(path, label) if kind == "cv" else Run.load(path, label))
    anchors = [
        f"{kind}-{i}-{_slug(item.label)}"
        for i, (kind, item) in enumerate(zip(kinds, items, strict=True))
    ]
    body = []
    if len(items) > 1:
        body.append(comparison_section(items, anchors))
    for item, anchor in tqdm(
        list(zip(items, anchors, strict=True)), desc="plotting", disable=not show, file=sys.stderr
    ):
        body.append(
            cv_section(item, anchor) if isinstance(item, CVRun) else run_section(item, anchor)
        )
    toc = "".join(
        f'<li><a href="#{esc(a)}">{esc("CV " if isinstance(it, CVRun) else "")}{esc(it.label)}</a></li>'
        for it, a in zip(items, anchors, strict=True)
    )
    if len(items) > 1:
        toc = '<li><a href="#comparison">Comparison</a></li>' + toc
    data = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dirs": [
            {
                "label": it.label,
                "kind": "cv" if isinstance(it, CVRun) else "run",
                **({"summary": it.summary} if isinstance(it, CVRun) else {"metrics": it.metrics}),
            }
            for it in items
        ],
    }
    title = (
        "medvit report — "
        + ", ".join(it.label for it in items[:3])
        + (" …" if len(items) > 3 else "")
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><p class="note">Generated {esc(data["generated"])} by '
        f"medvit report from {len(items)} folder(s).</p><nav><ul>{toc}</ul></nav></header>"
        + "".join(body)
        + "<footer>Self-contained report: images and data are embedded; no network access is needed.</footer>"
        + f'<script type="application/json" id="medvit-data">{_json_script(data)}</script>'
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def default_output(dirs: Sequence[str | Path]) -> Path:
    """``<dir>/report.html`` for one folder, ``./report.html`` for several."""
    return Path(dirs[0]) / DEFAULT_OUTPUT if len(dirs) == 1 else Path(DEFAULT_OUTPUT)


def write_report(
    dirs: Sequence[str | Path], output: str | Path | None = None, progress: bool | None = None
) -> Path:
    """Build the report and write it; returns the output path."""
    out = Path(output) if output is not None else default_output(dirs)
    text = build_report(dirs, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out


def main(argv: list[str] | None = None) -> None:
    """``medvit report DIR [DIR...] [-o report.html]``."""
    parser = argparse.ArgumentParser(
        prog="medvit report",
        description=(
            "Write one self-contained HTML report (plots and data embedded) for run folders and "
            "CV folders; several folders get a side-by-side comparison."
        ),
    )
    parser.add_argument("dirs", nargs="+", help="run folders or CV folders (with cv_summary.json)")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="HTML file (default: <dir>/report.html for one folder, ./report.html for several)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.dirs, args.output, progress=False if args.no_progress else None)
    except ValueError as err:  # a missing or malformed file: a user problem, not a bug
        print(f"medvit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    size = out.stat().st_size / 1024
    print(f"Wrote {out} ({size:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
