"""Figures of training history and of several runs: learning curves from ``metrics.csv``,
validation curves of runs side by side, and CV metrics per fold."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medvit.evaluate.figures import colors, new_figure, short


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
    fig = new_figure(figsize=(11, 7), layout="constrained")
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
    fig = new_figure(
        figsize=(5.5 * len(keys) + (3 if len(labels) > 4 else 0), 4.2), layout="constrained"
    )
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    series = [epoch_series(f) for f in frames]
    palette = colors(len(labels))
    for ax, key in zip(axes, keys, strict=True):
        for s, label, color in zip(series, labels, palette, strict=True):
            if key in s:
                ax.plot(*s[key], marker="o", ms=3, color=color, label=short(label, 40))
        ax.set(title=key, xlabel="epoch", ylabel=key.split("/")[-1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if len(labels) > 4:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    else:
        axes[0].legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- CV / comparison


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
    fig = new_figure(figsize=(2.6 * cols + 0.4, 3.0 * rows + 0.4), layout="constrained")
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
