"""What the report says about one run folder: settings, metrics, learning curves and the test
predictions' figures and per-class table (also used for a CV ensemble's predictions).

These functions return plain data (tables, figures, notes) that ``templates/report.html.j2``
lays out; nothing here writes HTML.
"""

from __future__ import annotations

from dataclasses import dataclass

from medvit import runs
from medvit.evaluate import plots
from medvit.report.gallery import Gallery, gallery_block
from medvit.report.tables import (
    Cell,
    Note,
    Plot,
    Table,
    date,
    duration,
    filename,
    key_values,
    metric_name,
    num,
    ordered,
    plot,
    scalar,
    th,
)
from medvit.runs import Predictions, Run


@dataclass
class PredictionPlots:
    """ROC, PR, confusion and reliability figures and the per-class table of one prediction set."""

    plots: list[Plot]
    per_class: Table
    kind: str = "predictions"


@dataclass
class RunSection:
    """One run folder."""

    anchor: str
    label: str
    header: Table
    metrics: Table | Note
    curves: Plot | Note
    predictions: PredictionPlots | Note
    gallery: Gallery | Note | None = None
    kind: str = "run"


def run_header(run: Run) -> Table:
    """Dataset, model, key hyper-parameters, git SHA, date, device, duration."""
    flag = run.setting("data.flag") or run.data_name
    size = run.setting("data.size", "")
    preds = run.predictions()
    classes = run.setting("model.class_names") or (preds.class_names if preds else [])
    task = run.setting("model.task") or (preds.task if preds else "?")
    meta = run.meta
    sha = str(meta.get("git_sha", "unknown"))
    dirty = " (uncommitted changes)" if meta.get("git_dirty") else ""
    device = meta.get("device") or meta.get("accelerator") or "—"
    if meta.get("num_devices"):
        device = f"{device} × {meta['num_devices']} ({meta.get('accelerator', '?')}, {meta.get('strategy', '?')})"
    setting = run.setting
    return key_values(
        [
            (
                "Dataset",
                f"{flag} ({size} px), {task}, {len(classes)} classes: {', '.join(map(str, classes))}",
            ),
            (
                "Model",
                f"{setting('model.model_name', '?')}, patch {setting('model.patch_size', '—')}, "
                f"input {setting('model.img_size', size)} px, pretrained: "
                f"{filename(setting('model.pretrained', False))}",
            ),
            (
                "Optimisation",
                f"lr {scalar(setting('model.lr'))}, weight decay {scalar(setting('model.weight_decay'))}, "
                f"layer decay {scalar(setting('model.layer_decay'))}, warm-up "
                f"{scalar(setting('model.warmup_epochs'))} epochs, batch "
                f"{scalar(setting('data.global_batch_size'))} (global)",
            ),
            (
                "Regularisation",
                f"label smoothing {scalar(setting('model.label_smoothing'))}, drop path "
                f"{scalar(setting('model.drop_path_rate'))}, class weights "
                f"{scalar(setting('model.class_weights'))}, augmentation "
                f"{scalar(setting('data.augmentation', 'dataset default'))}",
            ),
            (
                "Training",
                f"{scalar(run.metrics.get('epochs_trained', '—'))} of "
                f"{scalar(setting('trainer.max_epochs'))} epochs, best epoch "
                f"{scalar(run.metrics.get('best_epoch', '—'))} by {scalar(run.metrics.get('monitor', '—'))}, "
                f"precision {scalar(meta.get('precision') or setting('trainer.precision'))}, seed "
                f"{scalar(setting('seed_everything'))}",
            ),
            ("Tested checkpoint", filename(run.metrics.get("test_checkpoint", "—"))),
            ("Git SHA", f"{sha[:12]}{dirty}"),
            ("Date", f"{date(meta.get('started'))} → {date(meta.get('finished'))}"),
            ("Device", str(device)),
            ("Duration", duration(meta.get("duration_s"))),
        ]
    )


def metrics_table(run: Run) -> Table | Note:
    """Validation (best epoch) and test metrics, as in ``metrics.json``."""
    val, test = run.metrics.get("val", {}), run.metrics.get("test", {})
    if not val and not test:
        return Note(f"{run.path / runs.METRICS_FILE} has no metrics yet.")
    positive = run.metrics.get("positive_class")
    rows = [
        [
            th(key),
            Cell(metric_name(key, positive)),
            num(val.get(key), stage="val", metric=key),
            num(test.get(key), stage="test", metric=key),
        ]
        for key in ordered([*val, *test])
    ]
    best = run.metrics.get("best_epoch")
    head = [
        "metric",
        "",
        f"validation (best epoch {best})" if best is not None else "validation",
        "test",
    ]
    return Table(rows, head, cls="metrics", caption="Metrics (metrics.json)")


def per_class_table(preds: Predictions) -> Table:
    """Support, precision, recall, specificity, F1, AUROC and AP of every class (threshold 0.5 / argmax)."""
    scores = plots.per_class_metrics(preds)
    rows = []
    for i, name in enumerate(preds.class_names):
        cells = [th(name), Cell(str(int(scores["support"][i])), cls="num")]
        cells += [num(scores[n][i].item(), metric=n) for n in plots.PER_CLASS]
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
    rule = "label probability > 0.5" if preds.task == "multilabel" else "most probable class"
    return Table(rows, head, cls="per-class", caption=f"Per-class metrics (prediction: {rule})")


def prediction_plots(preds: Predictions, what: str) -> PredictionPlots:
    """ROC, PR, confusion (counts and normalised), reliability and the per-class table."""
    figures = [
        plot(plots.roc_figure(preds, title=f"ROC curve — {what}"), "roc", f"ROC curve, {what}"),
        plot(
            plots.pr_figure(preds, title=f"Precision–recall — {what}"),
            "pr",
            f"Precision-recall curve, {what}",
        ),
        plot(
            plots.confusion_figure(preds), "confusion_counts", f"Confusion matrix (counts), {what}"
        ),
        plot(
            plots.confusion_figure(preds, normalize="true"),
            "confusion_normalized",
            f"Confusion matrix (normalized by true class), {what}",
        ),
        plot(
            plots.reliability_figure(preds),
            "reliability",
            f"Reliability diagram, {what}",
            f"ECE {plots.calibration_bins(preds)['ece']:.4f} (the ece metric: {plots.N_BINS} "
            "equal-width bins). Bars: observed frequency per bin; black lines: mean predicted "
            "probability; hatched: the gap between them.",
        ),
    ]
    return PredictionPlots(figures, per_class_table(preds))


def run_section(run: Run, anchor: str) -> RunSection:
    """Everything about one run folder."""
    if run.metrics_csv is not None:
        fig = plots.learning_curves_figure(
            run.metrics_csv, best_epoch=run.metrics.get("best_epoch")
        )
        curves: Plot | Note = plot(fig, "learning_curves", f"Learning curves, {run.label}")
    else:
        curves = Note(f"No {runs.METRICS_CSV} in {run.path}.")
    preds = run.predictions()
    if preds is not None:
        predictions: PredictionPlots | Note = prediction_plots(preds, "test")
    else:
        predictions = Note(
            f"No {runs.PREDICTIONS_FILE} in {run.path}: test the run (medvit test -c config.yaml "
            "--ckpt_path checkpoints/best.ckpt) to get ROC, PR, confusion and calibration plots."
        )
    return RunSection(
        anchor=anchor,
        label=run.label,
        header=run_header(run),
        metrics=metrics_table(run),
        curves=curves,
        predictions=predictions,
        gallery=gallery_block(run.path),
    )
