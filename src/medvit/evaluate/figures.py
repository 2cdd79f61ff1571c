"""What every medvit figure shares: an Agg canvas outside pyplot, PNG bytes, colours, legends
and shortened class names."""

from __future__ import annotations

import io
import textwrap
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(**kwargs: Any) -> Figure:
    """A figure on an Agg canvas, outside pyplot's registry (nothing to close, no leaks)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def wrap(name: str, width: int = 18) -> str:
    """A class name over several lines."""
    return textwrap.fill(str(name), width=width) or str(name)


def short(name: str, width: int = 28) -> str:
    """A class or run name cut to ``width`` characters at a word boundary."""
    return textwrap.shorten(str(name), width=width, placeholder="…")


def colors(n: int) -> list:
    """``n`` distinct colours (tab10, or tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def legend(ax: Any, n_entries: int) -> None:
    """Inside the axes for a few entries; outside on the right for many (never over curves)."""
    if n_entries <= 4:
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def figsize_for_legend(n_entries: int, base: float = 5.0) -> tuple[float, float]:
    """A square plot, widened when the legend goes outside (:func:`legend`)."""
    return (base + (3.2 if n_entries > 4 else 0.0), base)
