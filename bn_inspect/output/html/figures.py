"""Plotly figures as plain dicts (the plotly Python package is never imported), drawn by Plotly.js in the page.

Per-channel arrays travel as base64 typed arrays (``{"dtype": "f4", "bdata": ...}``, which
Plotly.js reads natively): float32 is ample for a dot on a plot and keeps a ResNet-50 page small.
Hover texts hold names from the model file; Plotly reads a few HTML tags in them, so every name
is HTML-escaped before it goes in.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
BLUE, RED, ORANGE, GREY, GREEN = "#3b6ea5", "#d1495b", "#e08e0b", "#8a8f98", "#2e8b57"
CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud", "lasso2d"]}
Figure = dict[str, Any]


def typed_floats(values: Sequence[float]) -> dict[str, str]:
    """``values`` as a Plotly typed array of float32, non-finite values as NaN (not drawn)."""
    packed = array("f", [v if math.isfinite(v) else math.nan for v in values])
    if sys.byteorder == "big":
        packed.byteswap()  # typed arrays in browsers are little-endian
    return {"dtype": "f4", "bdata": base64.b64encode(packed.tobytes()).decode("ascii")}


def typed_flags(values: Sequence[bool]) -> dict[str, str]:
    """``values`` as a Plotly typed array of uint8 (0 or 1)."""
    return {"dtype": "u1", "bdata": base64.b64encode(bytes(int(v) for v in values)).decode("ascii")}


def finite_or_none(value: float | None) -> float | None:
    """A value Plotly can draw: None (a gap) for none, NaN or infinity."""
    return value if value is not None and math.isfinite(value) else None


def _layout(height: int, **axes: Any) -> dict[str, Any]:
    return {
        "height": height,
        "margin": {"l": 64, "r": 16, "t": 28, "b": 48},
        "font": {"family": FONT, "size": 12},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#fbfbfd",
        "hovermode": "closest",
        "showlegend": False,
        **axes,
    }


def _axis(title: str, *, is_log: bool = False, values: Sequence[float | None] = (), **extra: Any) -> dict[str, Any]:
    axis = {"title": {"text": title}, "gridcolor": "#e3e5ea", "zeroline": False, "automargin": True, **extra}
    if is_log:
        axis.update(type="log", exponentformat="e")
        ticks = log_ticks(values)
        if ticks:
            axis.update(tickmode="array", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    return axis


def log_ticks(values: Sequence[float | None]) -> list[float]:
    """Ticks for a log axis over ``values``: 1, 2 and 5 per decade over a short range, powers of ten over a long one.

    Plotly's own ticks label every digit (2, 3, 4, ... 9) of a short log range, which crowds a small panel.
    """
    usable = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not usable:
        return []
    low, high = math.floor(math.log10(min(usable))), math.ceil(math.log10(max(usable)))
    steps = (1.0, 2.0, 5.0) if high - low <= 3 else (1.0,)
    stride = max(1, math.ceil((high - low) / 8))
    return [step * 10.0**power for power in range(low, high + 1, stride) for step in steps]


def _hline(y: float, axis: str, color: str = RED) -> dict[str, Any]:
    return {
        "type": "line",
        "xref": "paper",
        "x0": 0,
        "x1": 1,
        "yref": axis,
        "y0": y,
        "y1": y,
        "line": {"color": color, "width": 1, "dash": "dot"},
    }


@dataclass(frozen=True)
class Series:
    """One line of a profile: a name, a value per layer call, its colour and axis."""

    name: str
    values: Sequence[float | None]
    color: str
    axis: str = "y"
    dash: str = "solid"


def profile(
    hover: Sequence[str],
    series: Sequence[Series],
    axis_titles: tuple[str, str | None],
    limits: tuple[Sequence[float], Sequence[float]] = ((), ()),
    marked: tuple[int, str] | None = None,
    upper_is_log: bool = True,
) -> Figure:
    """A depth profile: layer calls in execution order on x, one or two log-scale panels of values.

    Args:
        hover: per layer call, its escaped hover text (name, type, shape).
        series: the lines; ``axis`` "y" is the upper panel, "y2" the lower.
        axis_titles: the titles of the upper and (None for one panel) lower panel.
        limits: thresholds drawn as dotted lines in the upper and lower panel.
        marked: (index, escaped text) of a layer call to mark with a vertical line.
        upper_is_log: False for a linear upper panel (a diff's mean changes, where 0 is the usual value).
    """
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": line.name,
            "x": list(range(len(hover))),
            "y": [finite_or_none(v) for v in line.values],
            "text": list(hover),
            "yaxis": line.axis,
            "line": {"color": line.color, "width": 1.5, "dash": line.dash},
            "marker": {"size": 6},
            "hovertemplate": f"%{{text}}<br>{line.name}: %{{y:.4g}}<extra></extra>",
        }
        for line in series
    ]
    upper, lower = axis_titles
    # Layer calls are counted: integer ticks, about twenty at most.
    step = max(1, math.ceil(len(hover) / 20))
    axes: dict[str, Any] = {"xaxis": _axis("layer call, in execution order", anchor="y2" if lower else "y", dtick=step)}
    upper_values = [v for line in series if line.axis == "y" for v in line.values] + list(limits[0])
    axes["yaxis"] = _axis(upper, is_log=upper_is_log, values=upper_values, domain=[0.55, 1] if lower else [0, 1])
    if lower:
        lower_values = [v for line in series if line.axis == "y2" for v in line.values] + list(limits[1])
        axes["yaxis2"] = _axis(lower, is_log=True, values=lower_values, domain=[0, 0.45])
    shapes = [_hline(y, "y") for y in limits[0]] + [_hline(y, "y2") for y in limits[1]]
    annotations = []
    if marked is not None:
        index, text = marked
        line = {"color": ORANGE, "width": 2}
        shapes.append(
            {"type": "line", "xref": "x", "x0": index, "x1": index, "yref": "paper", "y0": 0, "y1": 1, "line": line}
        )
        annotations.append(
            {"x": index, "xref": "x", "y": 1, "yref": "paper", "yanchor": "bottom", "text": text, "showarrow": False}
        )
    layout = _layout(460 if lower else 320, **axes, shapes=shapes, annotations=annotations, showlegend=True)
    layout["legend"] = {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}
    layout["margin"] = {**layout["margin"], "t": 48}
    return {"data": traces, "layout": layout}


@dataclass(frozen=True)
class ChannelPanel:
    """One per-channel scatter: batch against running values of one statistic ("mean" or "var"), a dot per channel."""

    statistic: str
    batch: Sequence[float]
    running: Sequence[float]

    @property
    def is_log(self) -> bool:
        """Variances are drawn on log axes."""
        return self.statistic == "var"


def channel_layouts() -> dict[str, dict[str, Any]]:
    """The layouts every layer's channel plots share, by name: sent once per page, not once per plot.

    Shared layouts cannot fit their ticks to one layer's values: log axes label the decades and
    draw a light grid at 2 and 5 between them.
    """
    decades: dict[str, Any] = {"dtick": 1, "minor": {"dtick": "D2", "showgrid": True, "gridcolor": "#eef0f4"}}
    return {
        "channel-mean": _layout(340, xaxis=_axis("running mean"), yaxis=_axis("batch mean")),
        "channel-var": _layout(
            340, xaxis=_axis("running var", is_log=True, **decades), yaxis=_axis("batch var", is_log=True, **decades)
        ),
        "values-mean": _layout(300, xaxis=_axis("channel"), yaxis=_axis("batch mean")),
        "values-var": _layout(300, xaxis=_axis("channel"), yaxis=_axis("batch var", is_log=True, **decades)),
    }


def channel_scatter(panel: ChannelPanel, beyond: Sequence[bool]) -> Figure:
    """Batch against running statistic per channel, the diagonal drawn, channels that depart on their own in red.

    The hover gives the channel index and both values; the layout is named (``channel_layouts``).
    """
    dots = {
        "type": "scatter",
        "mode": "markers",
        "x": typed_floats(panel.running),
        "y": typed_floats(panel.batch),
        "marker": {
            "size": 6,
            "opacity": 0.8,
            "color": typed_flags(beyond),
            "cmin": 0,
            "cmax": 1,
            "colorscale": [[0, BLUE], [1, RED]],
        },
        "hovertemplate": (
            f"channel %{{pointNumber}}<br>running {panel.statistic} %{{x:.4g}}<br>batch {panel.statistic} %{{y:.4g}}<extra></extra>"
        ),
    }
    traces: list[dict[str, Any]] = [dots]
    span = _span([*panel.batch, *panel.running], positive=panel.is_log)
    if span is not None:
        low, high = span
        guides = [(1.0, GREY, "solid")]
        traces = [
            {
                "type": "scatter",
                "mode": "lines",
                "x": [low, high],
                "y": [low * factor, high * factor],
                "line": {"color": color, "width": 1, "dash": dash},
                "hoverinfo": "skip",
            }
            for factor, color, dash in guides
        ] + traces
    return {"data": traces, "layout": f"channel-{panel.statistic}"}


def channel_values(statistic: str, values: Sequence[float]) -> Figure:
    """A batch statistic per channel index, for layers that keep no running statistics to compare with."""
    dots = {
        "type": "scatter",
        "mode": "markers",
        "y": typed_floats(values),
        "marker": {"size": 6, "color": BLUE},
        "hovertemplate": f"channel %{{x}}<br>batch {statistic} %{{y:.4g}}<extra></extra>",
    }
    return {"data": [dots], "layout": f"values-{statistic}"}


def _span(values: Sequence[float], positive: bool) -> tuple[float, float] | None:
    usable = [v for v in values if math.isfinite(v) and (v > 0 or not positive)]
    if not usable:
        return None
    low, high = min(usable), max(usable)
    return (low, high) if low < high else (low - 1 if not positive else low / 2, high + 1 if not positive else high * 2)


def stacked_bars(hover: Sequence[str], counts: Sequence[tuple[str, Sequence[int], str]], axis_title: str) -> Figure:
    """Counts per layer call in execution order, stacked (findings by severity); ``counts``: (name, per layer, colour)."""
    traces = [
        {
            "type": "bar",
            "name": name,
            "x": list(range(len(hover))),
            "y": list(values),
            "text": list(hover),
            "textposition": "none",
            "marker": {"color": color},
            "hovertemplate": f"%{{text}}<br>{name}: %{{y}}<extra></extra>",
        }
        for name, values, color in counts
    ]
    step = max(1, math.ceil(len(hover) / 20))
    axes = {
        "xaxis": _axis("layer, in execution order", dtick=step),
        "yaxis": _axis(axis_title, dtick=1, rangemode="tozero"),
    }
    layout = _layout(260, **axes, barmode="stack", showlegend=True)
    layout["legend"] = {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}
    return {"data": traces, "layout": layout}


def channel_changes(statistic: str, running: Sequence[float] | None, batch: Sequence[float] | None) -> Figure:
    """A diff's change per channel index: the running and the batch statistic's, as two series of dots.

    ``statistic`` is "mean" (change in OLD std) or "var" (ratio new / old, log axis); the layout is
    named (``diff_layouts``), and the tolerance is drawn by it.
    """
    traces = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": f"{kind} {statistic}",
            "y": typed_floats(values),
            "marker": {"size": 6, "color": color, "symbol": symbol, "opacity": 0.85},
            "hovertemplate": f"channel %{{x}}<br>{kind} {statistic} {'change' if statistic == 'mean' else 'ratio'} %{{y:.4g}}<extra></extra>",
        }
        for kind, values, color, symbol in (("running", running, RED, "circle"), ("batch", batch, BLUE, "diamond"))
        if values is not None
    ]
    return {"data": traces, "layout": f"diff-{statistic}"}


def diff_layouts(max_mean_change: float, max_var_ratio: float) -> dict[str, dict[str, Any]]:
    """The layouts every layer's change plots share, with the tolerance as dotted lines."""
    decades: dict[str, Any] = {"minor": {"dtick": "D2", "showgrid": True, "gridcolor": "#eef0f4"}}
    legend = {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}
    mean = _layout(
        300,
        xaxis=_axis("channel"),
        yaxis=_axis("mean change (old std)"),
        shapes=[_hline(max_mean_change, "y"), _hline(-max_mean_change, "y")],
        showlegend=True,
        legend=legend,
    )
    var = _layout(
        300,
        xaxis=_axis("channel"),
        yaxis=_axis("var ratio new / old", is_log=True, dtick=1, **decades),
        shapes=[_hline(max_var_ratio, "y"), _hline(1 / max_var_ratio, "y")],
        showlegend=True,
        legend=legend,
    )
    return {"diff-mean": mean, "diff-var": var}
