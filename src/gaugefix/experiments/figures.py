"""What every figure of the report shares: figures drawn on their own Agg canvas (no pyplot, so
matplotlib's global state, its backend included, is left as it is), a color per method, plain
tick labels on log axes, and how numbers are written."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from gaugefix.experiments.engine import METHODS
from gaugefix.files import write_bytes

DEFAULT_COLORS = 10  # matplotlib's default color cycle, C0..C9

__all__ = [
    "fmt",
    "label",
    "method_color",
    "methods_in_order",
    "plain_log_ticks",
    "save",
    "subplots",
    "LEGEND_COLUMNS",
    "LEGEND_FONTSIZE",
    "legend_below",
    "task_color",
    "task_style",
]


def fmt(v: float | None, digits: int = 3) -> str:
    """A number to ``digits`` significant digits; ``n/a`` for ``None`` or non-finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}"


def methods_in_order(names: Any) -> list[str]:
    """``names`` in the order of :data:`~gaugefix.experiments.engine.METHODS` (others last)."""
    order = list(METHODS)
    return sorted(names, key=lambda m: (order.index(m) if m in order else len(order), m))


def method_color(method: str) -> str:
    """The same color for a method in every panel and figure, a different one for each method:
    matplotlib's ten default colors, then the light shades of ``tab20`` (black for a name that
    is no method)."""
    if method not in METHODS:
        return "k"
    i = list(METHODS).index(method)
    if i < DEFAULT_COLORS:
        return f"C{i}"
    return to_hex(colormaps["tab20"](2 * (i - DEFAULT_COLORS) + 1))


# Where one panel shows several tasks: the i-th task's marker and line style (a method keeps its
# color).
TASK_MARKERS = ("o", "s", "^", "D", "v")
TASK_LINESTYLES = ("-", "--", ":", "-.")


def task_style(i: int) -> tuple[str, str]:
    """The marker and the line style of the ``i``-th task of a panel."""
    return TASK_MARKERS[i % len(TASK_MARKERS)], TASK_LINESTYLES[i % len(TASK_LINESTYLES)]


# Where a figure's series are tasks, not methods: the i-th task's color, a gray that no method
# has (a default color would be read as the method it is in every other figure).
TASK_COLORS = ("k", "0.55", "0.3", "0.75")


def task_color(i: int) -> str:
    """The color of the ``i``-th task of a figure whose series are tasks."""
    return TASK_COLORS[i % len(TASK_COLORS)]


def plain_log_ticks(*axes: Any) -> None:
    """Tick labels of log axes as plain numbers (``4.1``, not ``4.1 x 10^0``); over more than
    a decade, minor ticks are labelled at 2, 3 and 5 times a power of ten only (2 and 5 over
    more than two, none over more than three)."""

    def minor(axis: Any) -> FuncFormatter:
        def label(v: float, _: Any) -> str:
            low, high = axis.get_view_interval()
            keep = (2, 3, 5) if high <= 100 * low else (2, 5) if high <= 1000 * low else ()
            mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
            return "" if high > 10 * low and mantissa not in keep else f"{v:g}"

        return FuncFormatter(label)

    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(minor(axis))


def label(ax: Any, x: str, y: str, legend: int | None = 7) -> None:
    """Finish a panel: axis labels ``x`` and ``y``, a legend in ``legend``-point type (none
    when ``None``), and log axes' tick labels as plain numbers (:func:`plain_log_ticks`)."""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if legend is not None:
        ax.legend(fontsize=legend)
    plain_log_ticks(ax)


def subplots(
    rows: int, cols: int, *, figsize: tuple[float, float], layout: str | None = None, **kwargs: Any
) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas and its ``rows x cols`` axes (``kwargs`` as for
    :meth:`matplotlib.figure.Figure.subplots`)."""
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, **kwargs)


# A figure's one legend below its panels: at most this many columns, in this font size.
LEGEND_COLUMNS = 8
LEGEND_FONTSIZE = 8


def legend_below(fig: Figure, handles: list[Any], labels: list[str]) -> None:
    """The figure's one legend, below its panels, in the most columns (at most
    :data:`LEGEND_COLUMNS`) whose rows fit the figure's width, measured by its renderer."""
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(labels), LEGEND_COLUMNS), 0, -1):
        legend = fig.legend(
            handles, labels, loc="outside lower center", ncol=ncol, fontsize=LEGEND_FONTSIZE
        )
        if ncol == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            return
        legend.remove()


def save(fig: Figure, out: Path, name: str) -> str:
    """Draw ``fig`` as a PNG and write it to ``out / name``, whole or not at all
    (:func:`gaugefix.files.write_bytes`); returns ``name``. A figure with a layout engine
    fits its canvas; others are cropped to their artists. Either way matplotlib lays the
    figure out in a pass that renders nothing before the pass that draws it."""
    png = io.BytesIO()
    tight = "tight" if fig.get_layout_engine() is None else None
    fig.savefig(png, format="png", dpi=110, bbox_inches=tight)
    write_bytes(out / name, png.getvalue())
    return name
