"""The comparison of several run and CV folders: settings and metrics side by side (CV folders
as mean ± std over folds, the best value in bold) and overlaid curves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from medvit.evaluate import plots
from medvit.report.tables import Cell, Plot, Table, filename, fmt, ordered, plot, th
from medvit.runs import CVRun, Run


@dataclass
class Comparison:
    """Several folders side by side."""

    settings: Table
    stages: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    kind: str = "compare"


def _summary_values(item: Run | CVRun, stage: str) -> dict[str, tuple[float, float | None]]:
    """metric -> (value, std or None): a run's metrics, or a CV's fold mean ± std."""
    if isinstance(item, Run):
        return {k: (v, None) for k, v in item.metrics.get(stage, {}).items() if v is not None}
    agg = item.summary[stage]
    return {k: (v.get("mean"), v.get("std")) for k, v in agg.items() if v.get("mean") is not None}


def _settings_row(item: Run | CVRun, anchor: str) -> list[Cell]:
    run = item if isinstance(item, Run) else item.first_run()
    kind = "run" if isinstance(item, Run) else f"CV ({len(item.summary['runs'])} folds)"

    def get(key: str) -> str:
        return filename(run.setting(key)) if run is not None else "—"

    return [
        th(item.label, href=anchor),
        Cell(kind),
        Cell(get("data.flag") if run is None or run.setting("data.flag") else run.data_name),
        Cell(get("model.model_name")),
        Cell(get("model.pretrained")),
        Cell(get("model.lr"), cls="num"),
        Cell(get("data.global_batch_size"), cls="num"),
        Cell(get("trainer.max_epochs"), cls="num"),
    ]


def _stage_table(
    items: Sequence[Run | CVRun], anchors: Sequence[str], stage: str, title: str
) -> Table | None:
    """One row per folder, one column per metric; the best value in bold where they differ."""
    values = [_summary_values(item, stage) for item in items]
    keys = ordered(k for v in values for k in v)
    if not keys:
        return None
    best = {}
    for key in keys:
        present = [v[key][0] for v in values if key in v]
        # Bold marks a winner only where the runs differ.
        if len({fmt(p) for p in present}) > 1:
            best[key] = (min if key in plots.LOWER_IS_BETTER else max)(present)
    rows = []
    for item, vals, anchor in zip(items, values, anchors, strict=True):
        cells = [th(item.label, href=anchor)]
        for key in keys:
            if key not in vals:
                cells.append(Cell("—", cls="num"))
                continue
            value, std = vals[key]
            text = fmt(value) + (f" ± {fmt(std)}" if std is not None else "")
            cells.append(
                Cell(
                    text,
                    cls="num best" if value == best.get(key) else "num",
                    data={"stage": stage, "metric": key, "dir": item.label},
                )
            )
        rows.append(cells)
    return Table(
        rows,
        ["run", *keys],
        cls="compare",
        caption=f"{title}: CV folders show mean ± std over folds; best in bold",
    )


def comparison_section(items: Sequence[Run | CVRun], anchors: Sequence[str]) -> Comparison:
    """Side-by-side tables (best value in bold) and overlaid curves."""
    settings = Table(
        [_settings_row(item, anchor) for item, anchor in zip(items, anchors, strict=True)],
        ["run", "kind", "dataset", "model", "pretrained", "lr", "batch", "max epochs"],
        cls="compare",
        caption="Settings",
    )
    out = Comparison(settings)
    for stage, title in (("val", "Validation (pick runs on this)"), ("test", "Test")):
        table = _stage_table(items, anchors, stage, title)
        if table is not None:
            out.stages.append(table)
    with_preds = []
    for item in items:
        preds = item.predictions() if isinstance(item, Run) else item.ensemble
        label = item.label if isinstance(item, Run) else f"{item.label} (ensemble)"
        if preds is not None:
            with_preds.append((label, preds))
    if with_preds:
        fig = plots.fold_roc_overlay(
            [p for _, p in with_preds], [lab for lab, _ in with_preds], title="Test ROC"
        )
        out.plots.append(plot(fig, "compare_roc", "Test ROC curves of the compared runs"))
    curves = [
        (item.label, item.metrics_csv)
        for item in items
        if isinstance(item, Run) and item.metrics_csv
    ]
    if curves:
        fig = plots.compare_curves_figure([c for _, c in curves], [lab for lab, _ in curves])
        out.plots.append(plot(fig, "compare_curves", "Validation curves of the compared runs"))
    return out
