"""What the report says about one CV folder: the runs' metrics with mean, std and 95% CI, the
folds' ROC curves, the metrics per fold, and the ensemble against single folds.

These functions return plain data that ``templates/report.html.j2`` lays out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medvit import runs
from medvit.evaluate import plots
from medvit.report.gallery import Gallery, gallery_block
from medvit.report.run import PredictionPlots, prediction_plots, run_header
from medvit.report.tables import (
    Cell,
    Note,
    Plot,
    Table,
    fmt,
    key_values,
    num,
    ordered,
    plot,
    scalar,
    th,
)
from medvit.runs import CVRun


@dataclass
class CVSection:
    """One CV folder."""

    anchor: str
    label: str
    info: Table
    missing: str
    first_label: str
    first_header: Table | None
    stages: list[Table | Note]
    plots: list[Plot]
    ensemble: Table | Note
    ensemble_predictions: PredictionPlots | None
    gallery: Gallery | Note | None = None
    kind: str = "cv"


def _cv_stage_table(summary: Mapping[str, Any], stage: str) -> Table | Note:
    """Each run's metrics of one stage, mean ± std, 95% CI, n and the ensemble."""
    entries, agg = summary["runs"], summary[stage]
    keys = ordered([k for e in entries for k in e.get(stage, {})] + list(agg))
    if not keys:
        return Note(f"{runs.SUMMARY_JSON} has no {stage} metrics.")
    rows = []
    for entry in entries:
        name, values = str(entry["run"]), entry.get(stage) or {}
        rows.append(
            [th(name)] + [num(values.get(k), stage=stage, metric=k, fold=name) for k in keys]
        )

    # Rows of statistics: title, data-stat, and how a metric's aggregate is printed.
    stats = (
        ("mean ± std", "mean_std", lambda a: f"{fmt(a.get('mean'))} ± {fmt(a.get('std'))}"),
        ("95% CI", "ci95", lambda a: f"[{fmt(a.get('ci95_low'))}, {fmt(a.get('ci95_high'))}]"),
    )
    for title, stat, text in stats:
        rows.append(
            [th(title, cls="agg")]
            + [
                Cell(
                    text(agg.get(k, {})),
                    cls="num agg",
                    data={"stage": stage, "metric": k, "stat": stat},
                )
                for k in keys
            ]
        )
    rows.append(
        [th("n", cls="agg")]
        + [Cell(str(agg.get(k, {}).get("n", "—")), cls="num agg") for k in keys]
    )
    ens = (summary["ensemble"] or {}).get(stage)
    if ens:
        rows.append(
            [th("ensemble", cls="ens")]
            + [num(ens.get(k), stage=stage, metric=k, fold="ensemble") for k in keys]
        )
    title = (
        "Validation (each fold's held-out fold, best epoch)"
        if stage == "val"
        else "Test (official test split)"
    )
    if summary.get("ci_method"):
        title += f". 95% CI: {summary['ci_method']}."
    return Table(rows, ["fold", *keys], cls="folds", caption=title)


def _ensemble_comparison(summary: Mapping[str, Any]) -> Table | Note:
    """The ensemble's test metrics against the single folds' (mean, best, worst, how many beat it)."""
    ens = (summary["ensemble"] or {}).get("test", {})
    folds = [e.get("test", {}) for e in summary["runs"]]
    if not ens or not folds:
        return Note(f"No ensemble test metrics in {runs.SUMMARY_JSON}.")
    rows = []
    for key in ordered(ens):
        values = np.array([f[key] for f in folds if f.get(key) is not None], dtype=np.float64)
        if not len(values):
            continue
        lower = key in plots.LOWER_IS_BETTER
        best = values.min() if lower else values.max()
        better = int(np.sum(values < ens[key])) if lower else int(np.sum(values > ens[key]))
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        rows.append(
            [
                th(key),
                num(ens[key], stage="test", metric=key, fold="ensemble"),
                Cell(f"{fmt(values.mean())} ± {fmt(spread)}", cls="num"),
                num(best),
                num(values.min() if not lower else values.max()),
                Cell(f"{better} of {len(values)}", cls="num"),
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
    return Table(
        rows,
        head,
        cls="ensemble",
        caption="Ensemble (mean of the folds' probabilities) vs single folds, test split",
    )


def _missing(summary: Mapping[str, Any]) -> str:
    """The runs left out of the aggregates, each with why (``r0-f2 (exit code 1)``)."""
    return ", ".join(
        f"{m['run']} ({m['reason']})" if m.get("reason") else str(m["run"])
        for m in summary["missing"]
    )


def cv_section(cv: CVRun, anchor: str) -> CVSection:
    """Fold tables, fold ROC overlay, per-metric strip plots, ensemble vs folds."""
    s = cv.summary
    completed = [str(r["run"]) for r in s["runs"]]
    info: list[tuple[str, Any]] = [
        ("Experiment", s.get("experiment", "—")),
        ("Design", f"{s.get('folds', '?')} folds × {s.get('repeats', '?')} repeats"),
        ("Completed folds", f"{len(completed)}: {', '.join(completed)}"),
    ]
    for key, value in cv.config.items():
        if not isinstance(value, (dict, list)) and key not in ("experiment", "folds", "repeats"):
            info.append((key, scalar(value)))
    first = cv.first_run()
    figs = []
    found = [(name, run.predictions()) for name, run in cv.folds if run is not None]
    found = [(name, preds) for name, preds in found if preds is not None]
    if found:
        fig = plots.fold_roc_overlay(
            [preds for _, preds in found],
            [name for name, _ in found],
            cv.ensemble,
            title="Test ROC of every fold",
        )
        figs.append(plot(fig, "fold_roc", f"ROC curves of every fold, {cv.label}"))
    test_values = {
        k: [e["test"][k] for e in s["runs"] if e.get("test", {}).get(k) is not None]
        for k in ordered(k for e in s["runs"] for k in e.get("test", {}))
    }
    if any(test_values.values()):
        fig = plots.metric_strip_plot(
            test_values, (s["ensemble"] or {}).get("test"), title="Test metrics per fold"
        )
        figs.append(plot(fig, "metric_strip", f"Test metrics per fold, {cv.label}"))
    ensemble = cv.ensemble
    gallery = None
    if first is not None:
        # One fold's pictures: each fold model errs on different cases, and every fold's
        # gallery would multiply the page's size.
        gallery = gallery_block(first.path, f"The test cases of fold {first.label}'s model.")
    return CVSection(
        anchor=anchor,
        label=cv.label,
        info=key_values(info),
        missing=_missing(s),
        first_label=first.label if first is not None else "",
        first_header=run_header(first) if first is not None else None,
        stages=[_cv_stage_table(s, "val"), _cv_stage_table(s, "test")],
        plots=figs,
        ensemble=_ensemble_comparison(s),
        ensemble_predictions=(
            prediction_plots(ensemble, "ensemble, test") if ensemble is not None else None
        ),
        gallery=gallery,
    )
