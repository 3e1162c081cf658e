"""A watched run's timeline -> rich renderables: its events, the first bad step, each layer's departure over the steps."""

from __future__ import annotations

import itertools
import math

from rich.console import Group, RenderableType
from rich.text import Text

from bn_inspect.output.layout import Column, Layout, fitted
from bn_inspect.output.render import _inert, _short
from bn_inspect.output.words import counted
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.timeline import LayerSeries, Timeline, TimelineEvent
from bn_inspect.text import Untrusted

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_TIER_STYLE = {"error": "bold red", "warning": "yellow", "info": "", "within": "green"}
_SPARKS = "▁▂▃▄▅▆▇█"
# The trend column's cells: the largest departure in each of this many stretches of the run.
TREND_CELLS = 12


def trend(series: LayerSeries, cells: int = TREND_CELLS) -> str:
    """A sparkline of the series' departures: the largest in each of ``cells`` equal stretches, on one
    scale for every layer (``▁`` 0 to ``█`` the error tier or above, TREND_LEGEND); ``!`` for a stretch
    where a departure was not finite, ``·`` for one with nothing measured."""
    departures = series.departures
    if not departures:
        return ""
    nonfinite = series.nonfinite or (0,) * len(departures)
    top = Thresholds().error
    count = min(cells, len(departures))
    bounds = [round(i * len(departures) / count) for i in range(count + 1)]
    marks = []
    for start, end in itertools.pairwise(bounds):
        if any(d is None and n > 0 for d, n in zip(departures[start:end], nonfinite[start:end], strict=True)):
            marks.append("!")
            continue
        measured = [d for d in departures[start:end] if d is not None]
        if not measured:
            marks.append("·")
            continue
        marks.append(_SPARKS[round(min(max(measured), top) / top * (len(_SPARKS) - 1))])
    return "".join(marks)


TREND_LEGEND = (
    f"trend: one scale for every layer, ▁ 0 to █ the error tier ({Thresholds().error:g}) or above; "
    "! not finite; · not measured"
)


def last_departure(series: LayerSeries) -> float | None:
    """The departure at the layer's last sample: NaN when it ended non-finite, None when not measured."""
    return math.nan if series.ends_nonfinite else series.last


def peak_step(series: LayerSeries) -> str:
    """The step of the largest departure, ``all`` when every measured departure reads the same as shown
    (three digits): a flat series has no step of its largest."""
    peak = series.peak
    if peak is None:
        return "—"
    measured = [d for d in series.departures if d is not None]
    return "all" if len(measured) > 1 and len({_short(d) for d in measured}) == 1 else f"{peak[0]:,}"


def sample_count(timeline: Timeline) -> str:
    """``10 samples, 6 validations``: the training samples (as the end record counts them), then the validation runs'."""
    validations = timeline.num_validation_samples
    return counted(timeline.num_samples, "sample") + (f", {counted(validations, 'validation')}" if validations else "")


def series_label(series: LayerSeries, timeline: Timeline) -> Untrusted:
    """The layer call's label, with its rank when the run had several."""
    if len(timeline.ranks) < 2:
        return series.label
    return Untrusted(f"{series.label.raw} @rank{series.rank}")


def event_place(event: TimelineEvent, timeline: Timeline) -> str:
    """``step 350, layer1.0.bn1`` (inert), with the rank when the run had several."""
    where = f"step {event.step:,}"
    if len(timeline.ranks) > 1:
        where += f" on rank {event.rank}"
    return where + (f", {event.layer.inert()}" if event.layer is not None else ", the whole model")


def _events_table(timeline: Timeline, width: int) -> RenderableType:
    rows = tuple(
        (
            Text(f"{event.step:,}" + (f"\nrank {event.rank}" if len(timeline.ranks) > 1 else "")),
            Text(event.severity.value, style=_SEVERITY_STYLE[event.severity.value]),
            Text(event.code),
            _inert(event.layer if event.layer is not None else "(model)"),
            _inert(event.message),
        )
        for event in timeline.events
    )
    columns = (
        Column("step", "right"),
        Column("severity"),
        Column("code"),
        Column("layer"),
        Column("event", wraps=True, ratio=1),
    )
    return fitted([Layout(columns, rows)], width)


def _departure_cell(value: float | None, thresholds: Thresholds) -> Text:
    if value is None:
        return Text("—")
    return Text(_short(value), style=_TIER_STYLE[thresholds.tier(value)])


def _series_table(timeline: Timeline, width: int) -> RenderableType:
    thresholds = Thresholds()
    cells = []
    for series in timeline.series:
        peak = series.peak
        cells.append(
            {
                "layer": _inert(series_label(series, timeline)),
                "first": _departure_cell(series.first, thresholds),
                "last": _departure_cell(last_departure(series), thresholds),
                "max": _departure_cell(None if peak is None else peak[1], thresholds),
                "at step": Text(peak_step(series)),
                "trend": Text(trend(series)),
            }
        )
    layouts = [
        Layout(
            tuple(Column(key) if key in ("layer", "trend") else Column(key, "right") for key in keys),
            tuple(tuple(row[key] for key in keys) for row in cells),
        )
        for keys in (
            ("layer", "first", "last", "max", "at step", "trend"),
            ("layer", "first", "last", "max", "at step"),
        )
    ]
    return fitted(layouts, width)


def _validations_table(timeline: Timeline, width: int) -> RenderableType:
    thresholds = Thresholds()

    def named(entry: tuple[Untrusted, float | None] | None) -> tuple[Text, Text]:
        if entry is None:
            return Text("—"), Text("—")
        return _inert(entry[0]), _departure_cell(math.nan if entry[1] is None else entry[1], thresholds)

    rows = tuple(
        (
            Text(f"{gap.step:,}" + (f"\nrank {gap.rank}" if len(timeline.ranks) > 1 else "")),
            *named(gap.first_departing),
            *named(gap.largest),
        )
        for gap in timeline.validations
    )
    columns = (
        Column("step", "right"),
        Column("first departs at"),
        Column("departure", "right"),
        Column("largest gap at"),
        Column("departure", "right"),
    )
    # Narrower: each layer over its departure, in one cell.
    stacked = tuple((step, Text("\n").join([a, b]), Text("\n").join([c, d])) for step, a, b, c, d in rows)
    narrow = (Column("step", "right"), Column("first departs at"), Column("largest gap at"))
    return fitted([Layout(columns, rows), Layout(narrow, stacked)], width)


def _heading(timeline: Timeline) -> Text:
    head = Text()
    head.append("timeline ", style="bold")
    head.append(", ".join(name.inert() for name in timeline.files))
    head.append("\nmodel ", style="bold")
    ranks = f" · {counted(len(timeline.ranks), 'rank')} of {timeline.world_size}" if timeline.world_size > 1 else ""
    head.append(
        f"{timeline.model.inert()}{ranks} · sampled every {counted(timeline.every, 'step')} · "
        f"last step {timeline.last_step:,} · {sample_count(timeline)}"
    )
    return head


def render_timeline(timeline: Timeline, width: int = 160) -> RenderableType:
    """The run's events, its first bad step, each layer's departure over the steps, the validation gaps, the verdict."""
    parts: list[RenderableType] = [_heading(timeline), Text("")]
    if timeline.events:
        parts += [Text("Events", style="bold"), _events_table(timeline, width), Text("")]
    else:
        parts += [Text("No events.", style="green"), Text("")]
    first = timeline.first_bad
    if first is not None:
        parts += [Text(f"First bad step: {event_place(first, timeline)} ({first.code}).", style="bold"), Text("")]
    if timeline.series:
        parts += [
            Text("Departure from the running statistics over the training samples", style="bold"),
            _series_table(timeline, width),
            Text(TREND_LEGEND, style="dim"),
            Text(""),
        ]
    if timeline.validations:
        parts += [Text("Train/eval gap at each validation", style="bold"), _validations_table(timeline, width)]
        parts.append(Text(""))
    for note in timeline.notes:
        parts.append(_inert(f"Note: {note}.", "dim"))
    counts = {s: sum(e.severity.value == s for e in timeline.events) for s in ("error", "warning", "info")}
    summary = f"{counted(counts['error'], 'error')}, {counted(counts['warning'], 'warning')}, {counts['info']} info"
    gate = "never fails" if timeline.fail_on.value == "never" else f"fails on {timeline.fail_on.value} or worse"
    parts.append(
        Text(
            f"{summary}: {'PASSED' if timeline.passed else 'FAILED'} ({gate})",
            style="bold green" if timeline.passed else "bold red",
        )
    )
    return Group(*parts)
