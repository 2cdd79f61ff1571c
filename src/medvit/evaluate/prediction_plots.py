"""Figures of one set of predictions: ROC, precision-recall, confusion and reliability, and
several sets' ROC curves overlaid (CV folds, compared runs).

Binary tasks show the positive class (``Predictions.positive``), multi-class and multi-label
tasks every class plus the macro average. The numbers come from :mod:`medvit.evaluate.curves`;
confusion matrices are drawn by scikit-learn's ``ConfusionMatrixDisplay``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay

from medvit.evaluate.curves import (
    N_BINS,
    Curve,
    calibration_bins,
    confusion_matrix,
    pr_curves,
    roc_curves,
)
from medvit.evaluate.figures import colors, figsize_for_legend, legend, new_figure, short, wrap
from medvit.runs import Predictions


# ----------------------------------------------------------------------------- ROC / PR
def _curve_figure(
    curves: list[Curve],
    score: str,
    xlabel: str,
    ylabel: str,
    title: str,
    diagonal: bool,
) -> Figure:
    fig = new_figure(figsize=figsize_for_legend(len(curves)), layout="constrained")
    ax = fig.add_subplot()
    palette = colors(len(curves))
    for (label, x, y, value), color in zip(curves, palette, strict=True):
        macro = label == "macro average"
        ax.plot(
            x,
            y,
            color="black" if macro else color,
            lw=2.4 if macro or len(curves) == 1 else 1.3,
            ls="--" if macro else "-",
            label=f"{short(label)} ({score} {value:.3f})",
            drawstyle="steps-post" if score == "AP" else "default",
        )
    if diagonal:
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    legend(ax, len(curves) + int(diagonal))
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
        legend(ax, 2)
    return fig


# ----------------------------------------------------------------------------- confusion
def _draw_matrix(
    ax: Any, cm: np.ndarray, labels: list[str], normalized: bool, fontsize: float
) -> Any:
    """scikit-learn's confusion-matrix drawing on a 0..1 (fractions) or 0..max (counts) scale."""
    vmax = 1.0 if normalized else max(1.0, float(cm.max()))
    rotate = len(labels) > 2
    display = ConfusionMatrixDisplay(cm, display_labels=labels).plot(
        ax=ax,
        cmap="Blues",
        colorbar=False,
        values_format=".2f" if normalized else "d",
        im_kw={"vmin": 0, "vmax": vmax},
        text_kw={"fontsize": fontsize},
        xticks_rotation=45 if rotate else "horizontal",
    )
    for label in ax.get_xticklabels():
        label.set(ha="right" if rotate else "center", rotation_mode="anchor")
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    return display.im_


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
        fig = new_figure(figsize=(2.6 * cols, 2.7 * rows + 0.5), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.set_axis_off()
                continue
            _draw_matrix(ax, cm[k], ["neg", "pos"], normalized, 9)
            ax.set_title(wrap(preds.class_names[k], 20), fontsize=9)
            ax.set_xlabel("Predicted", fontsize=8)
            ax.set_ylabel("True", fontsize=8)
        fig.suptitle(f"Confusion matrix per label ({what}, threshold 0.5)")
        return fig
    names = [wrap(x, 16) for x in preds.class_names]
    c = len(names)
    side = max(4.5, 0.6 * c + 2.5)
    fig = new_figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    fontsize = 11 if c <= 4 else (9 if c <= 8 else 7)
    im = _draw_matrix(ax, cm, names, normalized, fontsize)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction" if normalized else "samples")
    # A figure title (not the axes title) cannot collide with the colour bar.
    fig.suptitle(f"Confusion matrix ({what})")
    return fig


# ----------------------------------------------------------------------------- calibration
def reliability_figure(preds: Predictions, n_bins: int = N_BINS) -> Figure:
    """Reliability diagram (observed vs predicted per bin) with ECE in the title, and a histogram."""
    bins = calibration_bins(preds, n_bins)
    edges, width = bins["edges"], 1.0 / n_bins
    centers = edges[:-1] + width / 2
    fig = new_figure(figsize=(5.2, 6.0), layout="constrained")
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


# ----------------------------------------------------------------------------- several runs
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
    fig = new_figure(figsize=figsize_for_legend(len(items) + 1, 5.5), layout="constrained")
    ax = fig.add_subplot()
    palette = colors(len(items))
    for (label, preds), color in zip(items, palette, strict=True):
        curve = roc_curves(preds)[-1]  # the positive class, or the macro average
        is_ens = ensemble is not None and preds is ensemble
        ax.plot(
            curve[1],
            curve[2],
            color="black" if is_ens else color,
            lw=2.6 if is_ens else 1.2,
            alpha=1.0 if is_ens else 0.8,
            label=f"{short(label, 32)} (AUC {curve[3]:.3f})",
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
    legend(ax, len(items) + 1)
    return fig
