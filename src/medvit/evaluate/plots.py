"""Matplotlib figures shared by ``medvit report``, the wandb callback and the notebook.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global
figure registry, so a report of many runs does not leak memory) and renders with Agg. In a
notebook, a returned figure displays inline. Curves come from torchmetrics' functional API;
binary tasks show the positive class (``Predictions.positive``), multi-class and multi-label
tasks show every class plus the macro average.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchmetrics.functional import classification as tmf

from medvit.runs import Predictions

N_BINS = 15  # reliability bins; the same as the ``ece`` metric (torchmetrics, 15 bins)
# Metrics where a lower value is better (for "best" markers in tables and plots).
LOWER_IS_BETTER = frozenset({"ece", "mae", "loss"})


# ----------------------------------------------------------------------------- metrics.csv
def read_metrics_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a Lightning ``metrics.csv`` as float arrays (empty cells are NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = list(rows[0]) if rows else []

    def num(value: str | None) -> float:
        try:
            return float(value) if value not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {k: np.array([num(r.get(k)) for r in rows], dtype=np.float64) for k in keys}


def epoch_series(frame: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-epoch ``(epochs, values)`` of every logged column except test metrics and steps.

    Lightning writes step-level and epoch-level values in separate rows; for each column this
    keeps the last value logged in each epoch.

    Args:
        frame: path of a ``metrics.csv``, a mapping of column -> values, or a pandas DataFrame.
    """
    if isinstance(frame, (str, Path)):
        columns = read_metrics_csv(frame)
    elif hasattr(frame, "columns"):
        columns = {str(c): np.asarray(frame[c], dtype=np.float64) for c in frame.columns}
    else:
        columns = {str(k): np.asarray(v, dtype=np.float64) for k, v in dict(frame).items()}
    if "epoch" not in columns:
        raise ValueError(f"metrics have no 'epoch' column (columns: {sorted(columns)}).")
    epoch = columns["epoch"].copy()
    # LearningRateMonitor's epoch-start rows carry a step but no epoch: they belong to the epoch
    # of the next row that has one.
    for i in range(len(epoch) - 2, -1, -1):
        if np.isnan(epoch[i]):
            epoch[i] = epoch[i + 1]
    out = {}
    for key, values in columns.items():
        if key in ("epoch", "step") or key.startswith("test/") or key.endswith("_step"):
            continue
        ok = ~np.isnan(values) & ~np.isnan(epoch)
        if not ok.any():
            continue
        last: dict[int, float] = {}
        for e, v in zip(epoch[ok].astype(int), values[ok], strict=True):
            last[int(e)] = float(v)
        epochs = np.array(sorted(last))
        out[key] = (epochs, np.array([last[e] for e in epochs]))
    return out


# ----------------------------------------------------------------------------- helpers
def _new_figure(**kwargs: Any) -> Figure:
    """A figure on an Agg canvas, outside pyplot's registry (nothing to close, no leaks)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _wrap(name: str, width: int = 18) -> str:
    return textwrap.fill(str(name), width=width) or str(name)


def _short(name: str, width: int = 28) -> str:
    return textwrap.shorten(str(name), width=width, placeholder="…")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax: Any, n_entries: int) -> None:
    """Inside the axes for a few entries; outside on the right for many (never over curves)."""
    if n_entries <= 4:
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _figsize_for_legend(n_entries: int, base: float = 5.0) -> tuple[float, float]:
    return (base + (3.2 if n_entries > 4 else 0.0), base)


def _per_class(values: torch.Tensor | Sequence[float]) -> list[float]:
    return [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def _has_both(target: np.ndarray) -> bool:
    return bool(target.min() != target.max()) if target.size else False


# ----------------------------------------------------------------------------- ROC / PR
def roc_curves(preds: Predictions) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(label, fpr, tpr, auc)`` per curve: the positive class (binary) or each class + macro.

    Classes without both positives and negatives in the targets have no curve.
    """
    probs, target = preds.tensors()
    names, c = preds.class_names, preds.num_classes
    out = []
    if preds.task == "binary":
        pos_probs, pos_target = preds.positive_tensors()
        fpr, tpr, _ = tmf.binary_roc(pos_probs, pos_target)
        auc = float(tmf.binary_auroc(pos_probs, pos_target))
        return [(names[preds.positive], fpr.numpy(), tpr.numpy(), auc)]
    if preds.task == "multilabel":
        fprs, tprs, _ = tmf.multilabel_roc(probs, target, num_labels=c)
        aucs = _per_class(tmf.multilabel_auroc(probs, target, num_labels=c, average=None))
        valid = [i for i in range(c) if _has_both(preds.target[:, i])]
        for i in valid:
            out.append((names[i], fprs[i].numpy(), tprs[i].numpy(), aucs[i]))
        if len(valid) > 1:
            # torchmetrics has no multi-label macro curve: average TPR on a common FPR grid,
            # as its multi-class ``average="macro"`` does.
            grid = np.unique(np.concatenate([fprs[i].numpy() for i in valid]))
            mean_tpr = np.mean(
                [np.interp(grid, fprs[i].numpy(), tprs[i].numpy()) for i in valid], 0
            )
            macro = float(tmf.multilabel_auroc(probs, target, num_labels=c, average="macro"))
            out.append(("macro average", grid, mean_tpr, macro))
        return out
    fprs, tprs, _ = tmf.multiclass_roc(probs, target, num_classes=c)
    aucs = _per_class(tmf.multiclass_auroc(probs, target, num_classes=c, average=None))
    for i in range(c):
        if _has_both(preds.target == i):
            out.append((names[i], fprs[i].numpy(), tprs[i].numpy(), aucs[i]))
    fpr, tpr, _ = tmf.multiclass_roc(probs, target, num_classes=c, average="macro")
    macro = float(tmf.multiclass_auroc(probs, target, num_classes=c, average="macro"))
    out.append(("macro average", fpr.numpy(), tpr.numpy(), macro))
    return out


def pr_curves(preds: Predictions) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(label, recall, precision, average_precision)`` per curve, as :func:`roc_curves`."""
    probs, target = preds.tensors()
    names, c = preds.class_names, preds.num_classes
    if preds.task == "binary":
        pos_probs, pos_target = preds.positive_tensors()
        p, r, _ = tmf.binary_precision_recall_curve(pos_probs, pos_target)
        ap = float(tmf.binary_average_precision(pos_probs, pos_target))
        return [(names[preds.positive], r.numpy(), p.numpy(), ap)]
    if preds.task == "multilabel":
        ps, rs, _ = tmf.multilabel_precision_recall_curve(probs, target, num_labels=c)
        aps = _per_class(
            tmf.multilabel_average_precision(probs, target, num_labels=c, average=None)
        )
        valid = [i for i in range(c) if preds.target[:, i].any()]
        out = [(names[i], rs[i].numpy(), ps[i].numpy(), aps[i]) for i in valid]
        if len(valid) > 1:
            grid = np.unique(np.concatenate([rs[i].numpy() for i in valid]))
            # np.interp needs increasing x; torchmetrics returns recall in decreasing order.
            mean_p = np.mean(
                [np.interp(grid, rs[i].numpy()[::-1], ps[i].numpy()[::-1]) for i in valid], 0
            )
            macro = float(np.mean([aps[i] for i in valid]))
            out.append(("macro average", grid, mean_p, macro))
        return out
    ps, rs, _ = tmf.multiclass_precision_recall_curve(probs, target, num_classes=c)
    aps = _per_class(tmf.multiclass_average_precision(probs, target, num_classes=c, average=None))
    out = [
        (names[i], rs[i].numpy(), ps[i].numpy(), aps[i])
        for i in range(c)
        if (preds.target == i).any()
    ]
    p, r, _ = tmf.multiclass_precision_recall_curve(probs, target, num_classes=c, average="macro")
    macro = float(tmf.multiclass_average_precision(probs, target, num_classes=c, average="macro"))
    out.append(("macro average", r.numpy(), p.numpy(), macro))
    return out


def _curve_figure(
    curves: list[tuple[str, np.ndarray, np.ndarray, float]],
    score: str,
    xlabel: str,
    ylabel: str,
    title: str,
    diagonal: bool,
) -> Figure:
    fig = _new_figure(figsize=_figsize_for_legend(len(curves)), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(len(curves))
    for (label, x, y, value), color in zip(curves, colors, strict=True):
        macro = label == "macro average"
        ax.plot(
            x,
            y,
            color="black" if macro else color,
            lw=2.4 if macro or len(curves) == 1 else 1.3,
            ls="--" if macro else "-",
            label=f"{_short(label)} ({score} {value:.3f})",
            drawstyle="steps-post" if score == "AP" else "default",
        )
    if diagonal:
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _legend(ax, len(curves) + int(diagonal))
    return fig


def roc_figure(preds: Predictions, title: str = "ROC curve") -> Figure:
    """ROC curve(s) with AUROC in the legend."""
    return _curve_figure(
        roc_curves(preds),
        "AUC",
        "False positive rate (1 − specificity)",
        "True positive rate (sensitivity)",
        title,
        diagonal=True,
    )


def pr_figure(preds: Predictions, title: str = "Precision–recall curve") -> Figure:
    """Precision-recall curve(s) with average precision in the legend."""
    fig = _curve_figure(
        pr_curves(preds), "AP", "Recall (sensitivity)", "Precision (PPV)", title, diagonal=False
    )
    if preds.task == "binary":
        ax = fig.axes[0]
        prevalence = float(np.mean(preds.target == preds.positive))
        ax.axhline(prevalence, color="0.6", lw=1, ls=":", label=f"prevalence {prevalence:.3f}")
        _legend(ax, 2)
    return fig


# ----------------------------------------------------------------------------- confusion
def confusion_matrix(preds: Predictions, normalize: str | None = None) -> np.ndarray:
    """(C, C) matrix (rows true, columns predicted), or (L, 2, 2) for multi-label.

    Args:
        preds: predictions.
        normalize: ``None`` (counts), ``"true"`` (rows sum to 1), ``"pred"`` or ``"all"``.
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got '{normalize}'.")
    probs, target = preds.tensors()
    norm = normalize or "none"
    if preds.task == "binary":
        cm = tmf.binary_confusion_matrix(probs[:, 1], target, normalize=norm)
    elif preds.task == "multilabel":
        cm = tmf.multilabel_confusion_matrix(
            probs, target, num_labels=preds.num_classes, normalize=norm
        )
    else:
        cm = tmf.multiclass_confusion_matrix(
            probs, target, num_classes=preds.num_classes, normalize=norm
        )
    return cm.numpy()


def _draw_matrix(
    ax: Any, cm: np.ndarray, labels: list[str], normalized: bool, fontsize: float
) -> Any:
    vmax = 1.0 if normalized else max(1.0, float(cm.max()))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=vmax)
    for (i, j), value in np.ndenumerate(cm):
        text = f"{value:.2f}" if normalized else f"{int(value)}"
        color = "white" if value > 0.6 * vmax else "black"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    ticks = range(len(labels))
    ax.set_xticks(
        ticks,
        labels,
        rotation=45 if len(labels) > 2 else 0,
        ha="right" if len(labels) > 2 else "center",
        rotation_mode="anchor",
    )
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    return im


def confusion_figure(preds: Predictions, normalize: str | None = None) -> Figure:
    """Confusion matrix with counts (``normalize=None``) or fractions (``"true"``: recall per row).

    Multi-label tasks get one 2x2 matrix per label (threshold 0.5).
    """
    cm = confusion_matrix(preds, normalize)
    normalized = normalize is not None
    what = {
        None: "counts",
        "true": "normalized by true class",
        "pred": "normalized by prediction",
        "all": "normalized by total",
    }[normalize]
    if preds.task == "multilabel":
        n = len(preds.class_names)
        cols = min(5, n)
        rows = math.ceil(n / cols)
        fig = _new_figure(figsize=(2.6 * cols, 2.7 * rows + 0.5), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.set_axis_off()
                continue
            _draw_matrix(ax, cm[k], ["neg", "pos"], normalized, 9)
            ax.set_title(_wrap(preds.class_names[k], 20), fontsize=9)
            ax.set_xlabel("Predicted", fontsize=8)
            ax.set_ylabel("True", fontsize=8)
        fig.suptitle(f"Confusion matrix per label ({what}, threshold 0.5)")
        return fig
    names = [_wrap(x, 16) for x in preds.class_names]
    c = len(names)
    side = max(4.5, 0.6 * c + 2.5)
    fig = _new_figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    fontsize = 11 if c <= 4 else (9 if c <= 8 else 7)
    im = _draw_matrix(ax, cm, names, normalized, fontsize)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction" if normalized else "samples")
    # A figure title (not the axes title) cannot collide with the colour bar.
    fig.suptitle(f"Confusion matrix ({what})")
    return fig


# ----------------------------------------------------------------------------- calibration
def calibration_bins(
    preds: Predictions, n_bins: int = N_BINS
) -> dict[str, np.ndarray | float | str]:
    """Reliability-diagram bins, defined as torchmetrics' calibration error (``ece`` metric).

    Binary: confidence = probability of the positive class, outcome = it is the true class.
    Multi-class: confidence = top probability, outcome = top prediction correct. Multi-label:
    every (sample, label) pair as a binary prediction. Bins split [0, 1] into ``n_bins`` equal
    widths.

    Returns:
        dict with ``edges`` (n_bins + 1), ``confidence``, ``accuracy`` and ``count`` per bin
        (NaN where empty), ``ece`` (torchmetrics' value) and ``xlabel``.
    """
    probs, target = preds.tensors()
    if preds.task == "binary":
        pos = preds.positive
        conf, outcome = preds.probs[:, pos], (preds.target == pos).astype(np.float64)
        ece = float(tmf.binary_calibration_error(*preds.positive_tensors(), n_bins=n_bins))
        xlabel = f"Predicted probability of '{_short(preds.class_names[pos], 24)}'"
        ylabel = "Observed frequency"
    elif preds.task == "multilabel":
        conf, outcome = preds.probs.reshape(-1), preds.target.reshape(-1).astype(np.float64)
        ece = float(
            tmf.binary_calibration_error(probs.reshape(-1), target.reshape(-1), n_bins=n_bins)
        )
        xlabel, ylabel = "Predicted probability (all labels)", "Observed frequency"
    else:
        conf = preds.probs.max(axis=1)
        outcome = (preds.probs.argmax(axis=1) == preds.target).astype(np.float64)
        ece = float(
            tmf.multiclass_calibration_error(
                probs, target, num_classes=preds.num_classes, n_bins=n_bins
            )
        )
        xlabel, ylabel = "Confidence (top predicted probability)", "Accuracy"
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # torch.bucketize(right=True) - 1, as torchmetrics; a confidence of exactly 1.0 joins the top bin.
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=outcome, minlength=n_bins) / count
    return {
        "edges": edges,
        "confidence": confidence,
        "accuracy": accuracy,
        "count": count,
        "ece": ece,
        "xlabel": xlabel,
        "ylabel": ylabel,
    }


def reliability_figure(preds: Predictions, n_bins: int = N_BINS) -> Figure:
    """Reliability diagram (observed vs predicted per bin) with ECE in the title, and a histogram."""
    bins = calibration_bins(preds, n_bins)
    edges, width = bins["edges"], 1.0 / n_bins
    centers = edges[:-1] + width / 2
    fig = _new_figure(figsize=(5.2, 6.0), layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = bins["count"] > 0
    ax.bar(
        centers[filled],
        bins["accuracy"][filled],
        width=width,
        color="tab:blue",
        alpha=0.75,
        edgecolor="white",
        label="observed",
    )
    gap_bottom = np.minimum(bins["accuracy"], bins["confidence"])[filled]
    gap = np.abs(bins["accuracy"] - bins["confidence"])[filled]
    ax.bar(
        centers[filled],
        gap,
        bottom=gap_bottom,
        width=width,
        facecolor="none",
        edgecolor="tab:red",
        hatch="///",
        lw=0.8,
        label="gap (ECE contribution)",
    )
    ax.hlines(
        bins["confidence"][filled],
        centers[filled] - width / 2,
        centers[filled] + width / 2,
        color="black",
        lw=2,
        label="mean predicted",
    )
    ax.plot([0, 1], [0, 1], color="0.4", ls=":", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel=bins["ylabel"])
    ax.set_title(f"Reliability diagram — ECE {bins['ece']:.4f} ({n_bins} bins)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    hist.bar(centers, bins["count"], width=width, color="0.5", edgecolor="white")
    hist.set(xlabel=bins["xlabel"], ylabel="samples", xlim=(0, 1))
    hist.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    hist.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- learning curves
_PANELS = (
    ("Loss", ("train/loss_epoch", "val/loss"), "loss"),
    ("AUROC", ("train/auroc", "val/auroc"), "AUROC"),
    ("Accuracy", ("train/acc", "val/acc", "val/bal_acc"), "accuracy"),
)


def learning_curves_figure(metrics_csv_frame: Any, best_epoch: int | None = None) -> Figure:
    """Loss, AUROC, accuracy and learning rate per epoch.

    Args:
        metrics_csv_frame: a run's ``metrics.csv`` (path, column mapping or pandas DataFrame).
        best_epoch: draw a marker line at this epoch (``metrics.json``'s ``best_epoch``).
    """
    series = epoch_series(metrics_csv_frame)
    lr_keys = []
    for key in sorted(k for k in series if k.startswith("lr-")):
        # Parameter groups on the same schedule (decay / no decay) would draw one line twice.
        if not any(np.array_equal(series[key][1], series[k][1]) for k in lr_keys):
            lr_keys.append(key)
    fig = _new_figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).flat
    panels = [*_PANELS, ("Learning rate", tuple(lr_keys), "learning rate")]
    for ax, (title, keys, ylabel) in zip(axes, panels, strict=True):
        drawn = 0
        for key in keys:
            if key in series:
                x, y = series[key]
                ax.plot(x, y, marker="o", ms=3, lw=1.5, label=key.replace("_epoch", ""))
                drawn += 1
        if best_epoch is not None and drawn:
            ax.axvline(best_epoch, color="0.5", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "not logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.5",
            )
        ax.set(title=title, ylabel=ylabel)
        if title == "Learning rate" and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best")
    for ax in fig.axes[2:]:
        ax.set_xlabel("epoch")
    return fig


def compare_curves_figure(
    frames: Sequence[Any], labels: Sequence[str], keys: Sequence[str] = ("val/auroc", "val/loss")
) -> Figure:
    """Several runs' per-epoch curves overlaid, one panel per metric key."""
    fig = _new_figure(
        figsize=(5.5 * len(keys) + (3 if len(labels) > 4 else 0), 4.2), layout="constrained"
    )
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    series = [epoch_series(f) for f in frames]
    colors = _colors(len(labels))
    for ax, key in zip(axes, keys, strict=True):
        for s, label, color in zip(series, labels, colors, strict=True):
            if key in s:
                ax.plot(*s[key], marker="o", ms=3, color=color, label=_short(label, 40))
        ax.set(title=key, xlabel="epoch", ylabel=key.split("/")[-1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if len(labels) > 4:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    else:
        axes[0].legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- CV / comparison
def fold_roc_overlay(
    predictions: Sequence[Predictions],
    labels: Sequence[str],
    ensemble: Predictions | None = None,
    title: str = "ROC curves of every fold",
) -> Figure:
    """ROC curves of several prediction sets overlaid (CV folds or runs being compared).

    Binary tasks show the positive class; others the macro-average curve.

    Args:
        predictions: one :class:`Predictions` per fold or run.
        labels: legend label of each.
        ensemble: drawn bold on top, e.g. the CV ensemble's test predictions.
        title: axes title.
    """
    items = list(zip(labels, predictions, strict=True))
    if ensemble is not None:
        items.append(("ensemble", ensemble))
    fig = _new_figure(figsize=_figsize_for_legend(len(items) + 1, 5.5), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(len(items))
    for (label, preds), color in zip(items, colors, strict=True):
        curve = roc_curves(preds)[-1]  # the positive class, or the macro average
        is_ens = ensemble is not None and preds is ensemble
        ax.plot(
            curve[1],
            curve[2],
            color="black" if is_ens else color,
            lw=2.6 if is_ens else 1.2,
            alpha=1.0 if is_ens else 0.8,
            label=f"{_short(label, 32)} (AUC {curve[3]:.3f})",
        )
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="chance")
    what = "" if not items or items[0][1].task == "binary" else " (macro average)"
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.02),
        xlabel="False positive rate (1 − specificity)",
        ylabel="True positive rate (sensitivity)",
        title=title + what,
    )
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _legend(ax, len(items) + 1)
    return fig


def metric_strip_plot(
    values: Mapping[str, Sequence[float]],
    ensemble: Mapping[str, float] | None = None,
    title: str = "Test metrics per fold",
) -> Figure:
    """One panel per metric: a box plot with each fold's value as a point, mean ± std, ensemble.

    Args:
        values: metric -> one value per fold.
        ensemble: metric -> the ensemble's value (drawn as a red star).
        title: figure title.
    """
    names = [k for k, v in values.items() if len(v)]
    n = max(1, len(names))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(figsize=(2.6 * cols + 0.4, 3.0 * rows + 0.4), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    rng = np.random.default_rng(0)  # fixed jitter: the same report for the same data
    for ax, name in zip(axes, names, strict=False):
        v = np.asarray(values[name], dtype=np.float64)
        ax.boxplot(v, widths=0.5, showfliers=False, medianprops={"color": "tab:blue"})
        ax.scatter(
            1 + rng.uniform(-0.12, 0.12, len(v)),
            v,
            s=22,
            color="tab:blue",
            alpha=0.8,
            zorder=3,
            label="fold",
        )
        mean, std = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        ax.errorbar(
            1.38, mean, yerr=std, fmt="D", color="black", ms=5, capsize=4, label="mean ± std"
        )
        if ensemble and name in ensemble:
            ax.scatter(
                [1.6],
                [ensemble[name]],
                marker="*",
                s=140,
                color="tab:red",
                zorder=4,
                label="ensemble",
            )
        ax.set_xticks([])
        ax.set_xlim(0.6, 1.8)
        ax.margins(y=0.12)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    first = fig.axes[0]
    handles, labels = first.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=len(handles),
            fontsize=9,
            frameon=False,
        )
    fig.suptitle(title)
    return fig
