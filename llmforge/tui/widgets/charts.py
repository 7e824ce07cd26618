"""A metric chart for the Monitor: a terminal line plot (textual-plotext) titled with the latest value.

The widget keeps the points it was last given in `data` (what tests and the Runs screen can read),
thinned to a few points per terminal column before plotting: the history is already bounded by
`follow.Series`, but drawing 2000 points into a 40-column plot costs time and shows nothing more.
Without textual-plotext installed it falls back to textual's Sparkline.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from llmforge.tui.widgets.text import fmt_number

POINTS_PER_COLUMN = 1


def thin(xs: list[float], ys: list[float], limit: int) -> tuple[list[float], list[float]]:
    """At most about `limit` evenly spaced points, always keeping the last one."""
    n = len(xs)
    if n <= limit or limit <= 0:
        return xs, ys
    step = n / limit
    idx = sorted({int(i * step) for i in range(limit)} | {n - 1})
    return [xs[i] for i in idx], [ys[i] for i in idx]


class MetricChart(Vertical):
    DEFAULT_CSS = """
    MetricChart { height: 1fr; min-height: 5; border: round $primary-darken-2; padding: 0; }
    MetricChart > .chart-plot { height: 1fr; }
    MetricChart > .chart-empty { height: 1fr; color: $text-muted; content-align: center middle; }
    """

    def __init__(self, metric: str, title: str, **kw) -> None:
        super().__init__(**kw)
        self.metric = metric
        self.title = title
        self.data: tuple[list[float], list[float]] = ([], [])
        self.plotted = False  # whether the plot holds data (else the "waiting" text shows)
        # a PlotextPlot, or a Sparkline without the plot extra: duck-typed below (hasattr "plt")
        self._plot: Any = None

    def compose(self) -> ComposeResult:
        self.border_title = self.title
        try:
            from textual_plotext import PlotextPlot

            self._plot = PlotextPlot(classes="chart-plot")
        except ImportError:
            from textual.widgets import Sparkline

            self._plot = Sparkline([], classes="chart-plot")
        self._plot.display = False
        yield self._plot
        yield Static("no data", classes="chart-empty")

    def set_points(self, xs: list[float], ys: list[float]) -> None:
        """Replace what the chart shows (the full downsampled history of its metric)."""
        self.data = (list(xs), list(ys))
        self.border_title = f"{self.title} {fmt_number(ys[-1])}" if ys else self.title
        if self._plot is None:
            return
        has = bool(xs)
        if has != self.plotted:
            self._plot.display = has
            self.query_one(".chart-empty").display = not has
            self.plotted = has
        if not has:
            return
        width = max(10, self.size.width - 8)  # the y-axis labels take some columns
        txs, tys = thin(xs, ys, width * POINTS_PER_COLUMN)
        if hasattr(self._plot, "plt"):
            plt = self._plot.plt
            plt.clear_data()
            plt.plot(txs, tys, marker="braille")
            # Learning rates and losses at 1e-4 scale need scientific tick labels, plotext picks them.
            self._plot.refresh()
        else:  # Sparkline fallback
            self._plot.data = tys
