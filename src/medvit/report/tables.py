"""The report's building blocks: tables, cells and figures as plain data (the template draws
them), metric names and order, and how values are printed."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from medvit.evaluate import plots

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


def ordered(keys: Iterable[str]) -> list[str]:
    """Metric keys in :data:`METRIC_ORDER`, then the others alphabetically."""
    keys = list(dict.fromkeys(keys))
    known = [k for k in METRIC_ORDER if k in keys]
    return known + sorted(k for k in keys if k not in METRIC_ORDER)


# ----------------------------------------------------------------------------- printing
def fmt(value: Any) -> str:
    """A metric value with fixed precision; ``—`` when missing or not finite."""
    if value is None or isinstance(value, bool):
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.{DIGITS}f}" if math.isfinite(number) else "—"


def duration(seconds: Any) -> str:
    """``h:mm:ss``; ``—`` when unknown."""
    try:
        s = int(round(float(seconds)))
    except (TypeError, ValueError):
        return "—"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def date(value: Any) -> str:
    """An ISO time stamp as ``YYYY-MM-DD HH:MM:SS TZ``."""
    if not value:
        return "—"
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return stamp.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def scalar(value: Any) -> str:
    """A config value as text (lists joined by commas)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "—" if value is None else str(value)


def filename(value: Any) -> str:
    """A path's last part (a local weights file or checkpoint), not its folders."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name
    return scalar(value)


def slug(text: str) -> str:
    """An HTML id fragment."""
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "x"


# ----------------------------------------------------------------------------- page data
@dataclass
class Cell:
    """One ``<td>`` (or ``<th>`` when ``header``); ``data`` become ``data-*`` attributes."""

    text: str
    header: bool = False
    cls: str = ""
    data: dict[str, str] = field(default_factory=dict)
    href: str = ""  # an in-page anchor the text links to

    @property
    def tag(self) -> str:
        return "th" if self.header else "td"


@dataclass
class Table:
    """A table: column titles (none for a key-value table), rows of cells, class, caption."""

    rows: list[list[Cell]]
    header: Sequence[str] = ()
    cls: str = ""
    caption: str = ""
    kind: str = "table"


@dataclass
class Note:
    """A sentence in place of something missing."""

    text: str
    kind: str = "note"


@dataclass
class Plot:
    """An embedded PNG figure; ``name`` is its ``data-plot`` attribute."""

    name: str
    alt: str
    src: str
    caption: str = ""
    kind: str = "plot"


def th(text: Any, cls: str = "", href: str = "") -> Cell:
    """A row-title cell."""
    return Cell(str(text), header=True, cls=cls, href=href)


def num(value: Any, cls: str = "", **data: Any) -> Cell:
    """A right-aligned number cell printed by :func:`fmt`."""
    return Cell(fmt(value), cls=f"num {cls}".strip(), data={k: str(v) for k, v in data.items()})


def key_values(rows: Sequence[tuple[str, Any]]) -> Table:
    """A two-column header table: a title per row and its value."""
    return Table([[th(k), Cell(str(v))] for k, v in rows], cls="header")


def plot(fig: Figure, name: str, alt: str, caption: str = "") -> Plot:
    """A figure as a PNG data URI."""
    png = plots.figure_to_png(fig, dpi=100)
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return Plot(name=name, alt=alt, src=src, caption=caption)
