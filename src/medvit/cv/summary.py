"""What a CV reports: statistics over folds, the ensemble, the summary files, table and wandb.

The summary's schema and its files (``cv_summary.json``, ``cv_summary.csv``) belong to
:mod:`medvit.runs` (:func:`~medvit.runs.write_cv_summary`); this module fills them in.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from medvit import runs
from medvit.cv.plan import FoldRun

# The range each metric can take; confidence intervals are clipped to it.
_UNIT = (0.0, 1.0)
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("auroc", "acc", "bal_acc", "f1", "sens", "spec", "ece", "threshold"), _UNIT),
    **dict.fromkeys(("op_acc", "op_sens", "op_spec", "op_ppv", "op_npv", "op_f1"), _UNIT),
    "qwk": (-1.0, 1.0),
    "mae": (0.0, math.inf),
    "loss": (0.0, math.inf),
}
CI_METHOD = (
    "95% Student-t interval of the mean over runs (t(0.975, n-1) * std / sqrt(n), std with "
    "ddof=1), clipped to the metric's range (e.g. [0, 1] for AUROC, accuracy and ECE)"
)


# ------------------------------------------------------------------------------- statistics
def aggregate(values: list[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and 95% Student-t confidence interval of the mean.

    Args:
        values: one value per run.
        bounds: the metric's range; the interval is clipped to it (see ``METRIC_RANGES``).
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else None
    if n < 2:
        return {"mean": mean, "std": None, "ci95_low": None, "ci95_high": None, "n": n}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    low, high = bounds or (-math.inf, math.inf)
    ci_low, ci_high = max(mean - half, low), min(mean + half, high)
    return {"mean": mean, "std": std, "ci95_low": ci_low, "ci95_high": ci_high, "n": n}


# --------------------------------------------------------------------------------- ensemble
def ensemble_predictions(paths: list[Path]) -> runs.Predictions:
    """Average ``probs`` of several ``test_predictions.npz`` files, aligned by ``index``.

    Raises:
        ValueError: no file, an unreadable file (named), or files of other test samples.
    """
    first: runs.Predictions | None = None
    total = None
    for path in paths:
        preds = runs.read_predictions(path)
        if preds is None:
            raise ValueError(f"{path} does not exist.")
        order = np.argsort(preds.index, kind="stable")
        index, probs, target = preds.index[order], preds.probs[order], preds.target[order]
        if first is None:
            first, total = preds, probs.copy()
            first_index, first_target = index, target
            continue
        if not np.array_equal(index, first_index) or not np.array_equal(target, first_target):
            raise ValueError(
                f"{path} covers other test samples (or targets) than {paths[0]}; the fold "
                "models were not tested on the same test set."
            )
        total += probs
    if first is None:
        raise ValueError("no test predictions to ensemble")
    return runs.Predictions(
        # Stored (and scored) as float32, like each fold's own predictions.
        probs=(total / len(paths)).astype(np.float32),
        target=first_target,
        class_names=first.class_names,
        task=first.task,
        index=first_index,
        positive=first.positive,
    )


def ensemble_metrics(preds: runs.Predictions) -> dict[str, float]:
    """Test metrics of averaged probabilities, with the metrics every fold run reports."""
    from medvit.models.metrics import build_metrics

    metrics = build_metrics(preds.task, preds.num_classes, prefix="test/")
    # Binary: about the positive class, as each fold's own metrics.
    probs, target = preds.positive_tensors() if preds.task == "binary" else preds.tensors()
    metrics.update(probs, target)
    return {k.removeprefix("test/"): float(v) for k, v in sorted(metrics.compute().items())}


# ---------------------------------------------------------------------------------- summary
def _finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``metrics.json`` when it has test metrics; None when missing or unreadable."""
    try:
        metrics = runs.read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("test") else None


def summarize(
    cv_dir: Path,
    fold_runs: list[FoldRun],
    failures: dict[str, str] | None = None,
    info: dict[str, Any] | None = None,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Collect fold metrics, aggregate them, build the ensemble and write the summary files.

    Args:
        cv_dir: the CV directory.
        fold_runs: every run the CV should have, finished or not.
        failures: run name -> why it is missing (e.g. ``exit code 1``), for this invocation.
        info: extra top-level fields (experiment, folds, seed, ...).
        sizes: run name -> (training samples, validation samples), recorded per run.

    Returns:
        The content of ``cv_summary.json``.
    """
    failures = failures or {}
    done, missing = [], []
    for run in fold_runs:
        run_dir = runs.fold_run_dir(cv_dir, run.name)
        metrics = _finished_metrics(run_dir)
        if metrics:
            done.append((run, run_dir, metrics))
        else:
            missing.append(
                {
                    "run": run.name,
                    "repeat": run.repeat,
                    "fold": run.fold,
                    "reason": failures.get(run.name, "not finished"),
                    "log": str(runs.fold_log(cv_dir, run.name)),
                }
            )
    per_run = [
        {
            "run": run.name,
            "repeat": run.repeat,
            "fold": run.fold,
            "run_dir": os.path.relpath(run_dir, cv_dir),
            "n_train": (sizes or {}).get(run.name, (None, None))[0],
            "n_val": (sizes or {}).get(run.name, (None, None))[1],
            "best_epoch": metrics.get("best_epoch"),
            "val": metrics.get("val", {}),
            "test": metrics.get("test", {}),
        }
        for run, run_dir, metrics in done
    ]
    summary: dict[str, Any] = dict(info or {})
    summary.update(
        {
            "runs_expected": len(fold_runs),
            "runs_completed": len(done),
            "complete": not missing,
            "missing": missing,
            "runs": per_run,
        }
    )
    for stage in ("val", "test"):
        names = sorted({m for r in per_run for m in r[stage]})
        summary[stage] = {
            m: aggregate([r[stage][m] for r in per_run if m in r[stage]], METRIC_RANGES.get(m))
            for m in names
        }
    summary["ci_method"] = CI_METHOD
    summary["ensemble"] = None
    pred_paths = [run_dir / runs.PREDICTIONS_FILE for _, run_dir, _ in done]
    pred_paths = [p for p in pred_paths if p.is_file()]
    if pred_paths:
        preds = ensemble_predictions(pred_paths)
        runs.write_predictions(
            cv_dir / runs.ENSEMBLE_FILE,
            probs=preds.probs.astype(np.float32),
            target=preds.target,
            index=preds.index,
            class_names=preds.class_names,
            task=preds.task,
            positive_class=preds.positive,
        )
        summary["ensemble"] = {
            "n_models": len(pred_paths),
            "models": [os.path.relpath(p.parent, cv_dir) for p in pred_paths],
            "predictions": runs.ENSEMBLE_FILE,
            "test": ensemble_metrics(preds),
        }
    runs.write_cv_summary(cv_dir, summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: metric, mean ± std, 95% CI, per-run values, ensemble."""

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    names = [r["run"] for r in summary["runs"]]
    lines = [
        f"Cross-validation {summary.get('experiment', '')}: {summary['runs_completed']}/"
        f"{summary['runs_expected']} runs complete; per run: {' '.join(names) or '-'}",
        f"{'metric':<16}{'mean ± std':<22}{'95% CI':<22}{'ensemble':<10}per run",
    ]
    for col in runs.cv_summary_columns(summary):
        stage, metric = col.split("/", 1)
        agg = summary[stage].get(metric, {})
        spread = f"{num(agg.get('mean'))} ± {num(agg.get('std'))}"
        ci = f"[{num(agg.get('ci95_low'))}, {num(agg.get('ci95_high'))}]"
        ens = (
            summary["ensemble"]["test"].get(metric)
            if stage == "test" and summary["ensemble"]
            else None
        )
        values = " ".join(num(r[stage].get(metric)) for r in summary["runs"])
        lines.append(
            f"{col:<16}{spread:<22}{ci:<22}{num(ens) if ens is not None else '':<10}{values}"
        )
    for m in summary["missing"]:
        lines.append(f"MISSING {m['run']}: {m['reason']}; log: {m['log']}")
    lines.append(f"95% CI: {summary.get('ci_method', CI_METHOD)}.")
    n = len(summary["runs"])
    if 1 < n < 5:
        from scipy import stats

        lines.append(
            f"Only {n} runs: t(0.975, {n - 1}) = {stats.t.ppf(0.975, n - 1):.1f} makes the "
            "interval wide. --folds 5, or --repeats 3 for a steadier mean, gives a more useful "
            "estimate."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ wandb
def wandb_sync_command(cv_dir: Path, wandb_config: dict[str, Any]) -> str | None:
    """The ``wandb sync`` command for this CV's offline runs (folds and summary), if any."""
    from medvit.train.tracking import resolve_wandb_mode

    if not wandb_config.get("enabled"):
        return None
    if resolve_wandb_mode(wandb_config.get("mode", "auto")) != "offline":
        return None
    offline = sorted(cv_dir.glob("**/wandb/offline-run-*"))
    if not offline:
        return None
    return "wandb sync " + " ".join(shlex.quote(str(r)) for r in offline)


def log_wandb_summary(
    summary: dict[str, Any], wandb_config: dict[str, Any], group: str, cv_dir: Path
) -> str | None:
    """Log the aggregated metrics and the per-run table to a ``cv-summary`` wandb run.

    Returns:
        The wandb run's local directory, or None when wandb is off or disabled.
    """
    from medvit.train.tracking import resolve_wandb_mode

    if not wandb_config.get("enabled"):
        return None
    mode = resolve_wandb_mode(wandb_config.get("mode", "auto"))
    if mode == "disabled":
        return None
    import wandb

    info_keys = ("experiment", "folds", "repeats", "seed", "pool", "group_by")
    run = wandb.init(
        project=wandb_config.get("project"),
        entity=wandb_config.get("entity"),
        group=group,
        job_type="cv-summary",
        name="cv-summary",
        tags=list(wandb_config.get("tags") or []) or None,
        mode=mode,
        dir=str(cv_dir),
        config={k: summary.get(k) for k in info_keys},
    )
    try:
        values: dict[str, Any] = {
            "runs_completed": summary["runs_completed"],
            "runs_expected": summary["runs_expected"],
        }
        for stage in ("val", "test"):
            for metric, agg in summary[stage].items():
                for stat in ("mean", "std", "ci95_low", "ci95_high"):
                    if agg[stat] is not None:
                        values[f"{stage}/{metric}_{stat}"] = agg[stat]
        if summary["ensemble"]:
            for metric, value in summary["ensemble"]["test"].items():
                values[f"ensemble/test/{metric}"] = value
        columns = ["run", "repeat", "fold", *runs.cv_summary_columns(summary)]
        table = wandb.Table(
            columns=columns,
            data=[
                [r["run"], r["repeat"], r["fold"]]
                + [r[c.split("/", 1)[0]].get(c.split("/", 1)[1]) for c in columns[3:]]
                for r in summary["runs"]
            ],
        )
        run.log({"folds": table})
        run.summary.update(values)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
