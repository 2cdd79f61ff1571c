"""Matplotlib figures shared by ``medvit report``, the wandb callback and the notebook.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global
figure registry, so a report of many runs does not leak memory) and renders with Agg. In a
notebook, a returned figure displays inline. Nothing here imports torch: ``medvit report``
stays light. This module gathers, by job:

- :mod:`~medvit.evaluate.curves`: the numbers (ROC/PR curves, confusion matrices, calibration
  bins, per-class scores), computed as torchmetrics computes the run's metrics;
- :mod:`~medvit.evaluate.prediction_plots`: ROC, PR, confusion, reliability, fold ROC overlay;
- :mod:`~medvit.evaluate.history_plots`: learning curves (``metrics.csv``), compared runs'
  curves, CV metrics per fold;
- :mod:`~medvit.evaluate.figures`: the canvas, PNG bytes, colours and legends.
"""

from medvit.evaluate.curves import (
    LOWER_IS_BETTER,
    N_BINS,
    PER_CLASS,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    per_class_metrics,
    pr_curves,
    roc_curves,
)
from medvit.evaluate.figures import figure_to_png
from medvit.evaluate.history_plots import (
    compare_curves_figure,
    epoch_series,
    learning_curves_figure,
    metric_strip_plot,
    read_metrics_csv,
)
from medvit.evaluate.prediction_plots import (
    confusion_figure,
    fold_roc_overlay,
    pr_figure,
    reliability_figure,
    roc_figure,
)
from medvit.runs import Predictions

__all__ = [
    "LOWER_IS_BETTER",
    "N_BINS",
    "PER_CLASS",
    "Predictions",
    "calibration_bins",
    "compare_curves_figure",
    "confusion_figure",
    "confusion_matrix",
    "epoch_series",
    "expected_calibration_error",
    "figure_to_png",
    "fold_roc_overlay",
    "learning_curves_figure",
    "metric_strip_plot",
    "per_class_metrics",
    "pr_curves",
    "pr_figure",
    "read_metrics_csv",
    "reliability_figure",
    "roc_curves",
    "roc_figure",
]
