"""The page of a watched run's timeline: a layer × step heatmap of the departure, one layer's running statistics, the events.

Every name and message comes from the timeline file: it is escaped (``escaped``) before it goes
into the HTML or into a figure's hover text, ticks and selector labels (Plotly reads a few tags in those).
"""

from __future__ import annotations

from typing import Any

from bn_inspect.output.html.blocks import Cell, Column, Row, escaped, facts, layer_table, number, section
from bn_inspect.output.html.document import Page
from bn_inspect.output.html.figures import BLUE, FONT, GREEN, RED, _axis, _layout, finite_or_none
from bn_inspect.output.render_timeline import event_place, last_departure, peak_step, sample_count, series_label
from bn_inspect.output.words import counted
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.findings import MODEL_LABEL
from bn_inspect.report.timeline import LayerSeries, Timeline, TimelineEvent
from bn_inspect.text import Untrusted

# White below the info tier, then the tiers' colours: the heatmap reads as check's departure column.
_COLOURSCALE_STOPS = ("#ffffff", "#fde7c8", "#e08e0b", "#d1495b")
_EVENT_SYMBOL = {"error": "x", "warning": "diamond", "info": "circle-open"}
# A non-finite departure is an error: the error tier's colour, told apart from a finite one by its "nan".
NONFINITE_COLOUR = _COLOURSCALE_STOPS[3]


def _shown(value: float | None) -> float | None:
    """A value to draw: four significant digits (a 2,000-step run of 53 layers stays a few MB), None for none."""
    drawn = finite_or_none(value)
    return None if drawn is None else float(f"{drawn:.4g}")


def _heading(timeline: Timeline) -> str:
    rows = [
        ("timeline", ", ".join(escaped(name) for name in timeline.files)),
        ("model", escaped(timeline.model)),
        ("written by", f"bn-inspect {escaped(timeline.bn_inspect_version)}"),
        ("ranks", f"{len(timeline.ranks)} of {timeline.world_size}"),
        ("sampled", f"every {counted(timeline.every, 'step')}; {sample_count(timeline)}"),
        ("last step", f"{timeline.last_step:,}" + ("" if timeline.is_complete else " (no end record)")),
    ]
    first = timeline.first_bad
    if first is not None:
        rows.append(("first bad step", escaped(f"{event_place(first, timeline)} ({first.code})")))
    tally = {s: sum(e.severity.value == s for e in timeline.events) for s in ("error", "warning", "info")}
    counts = f"{counted(tally['error'], 'error')}, {counted(tally['warning'], 'warning')}, {tally['info']} info"
    gate = "never fails" if timeline.fail_on.value == "never" else f"at or above {timeline.fail_on.value}"
    verdict = f"Passed: no event {gate} ({counts})." if timeline.passed else f"Failed: events {gate} ({counts})."
    outcome = "passed" if timeline.passed else "failed"
    return (
        f'<header><h1>bn-inspect <span class="kind">timeline</span></h1>{facts(rows)}'
        f'<p class="verdict verdict-{outcome}">{escaped(verdict)}</p></header>'
    )


def _steps(timeline: Timeline) -> list[int]:
    return sorted({step for series in timeline.series for step in series.steps})


def heatmap(timeline: Timeline) -> dict[str, Any]:
    """Departure score per layer call (rows, in the file's order) and sampled step (columns), events marked."""
    steps = _steps(timeline)
    column = {step: i for i, step in enumerate(steps)}
    labels = [escaped(series_label(series, timeline)) for series in timeline.series]
    rows = []
    # 1 where a departure was not finite: a second trace draws those cells, else they would be left
    # blank and read as departure 0 (white) though NaN is an error.
    nonfinite_rows = []
    for series in timeline.series:
        row: list[float | None] = [None] * len(steps)
        marks: list[int | None] = [None] * len(steps)
        counts = series.nonfinite or (0,) * len(series.steps)
        for step, score, count in zip(series.steps, series.departures, counts, strict=True):
            row[column[step]] = _shown(score)
            marks[column[step]] = 1 if score is None and count > 0 else None
        rows.append(row)
        nonfinite_rows.append(marks)
    t = Thresholds()
    top = max([t.error * 1.5, *(v for row in rows for v in row if v is not None)])
    scale = [[0.0, _COLOURSCALE_STOPS[0]], [t.info / top, _COLOURSCALE_STOPS[1]]]
    scale += [[t.warning / top, _COLOURSCALE_STOPS[2]], [t.error / top, _COLOURSCALE_STOPS[3]], [1.0, "#7a1020"]]
    data: list[dict[str, Any]] = [
        {
            "type": "heatmap",
            "x": steps,
            "y": labels,
            "z": rows,
            "zmin": 0,
            "zmax": top,
            "colorscale": scale,
            "colorbar": {"title": {"text": "departure"}},
            "hovertemplate": "<b>%{y}</b><br>step %{x}<br>departure %{z:.3g}<extra></extra>",
        }
    ]
    if any(mark for marks in nonfinite_rows for mark in marks):
        data.append(_nonfinite_cells(steps, labels, nonfinite_rows))
    # An event names a layer, not a call: it is marked on the layer's first call's row.
    index: dict[tuple[Untrusted, int], int] = {}
    for i, series in enumerate(timeline.series):
        index.setdefault((series.layer, series.rank), i)
    marked = [(e, index.get((e.layer, e.rank))) for e in timeline.events if e.layer is not None]
    placed = [(e, row) for e, row in marked if row is not None]
    if placed:
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "x": [e.step for e, _ in placed],
                "y": [labels[row] for _, row in placed],
                "marker": {
                    "symbol": [_EVENT_SYMBOL[e.severity.value] for e, _ in placed],
                    "size": 11,
                    "color": "#111",
                    "line": {"width": 2},
                },
                "hovertext": [f"<b>{escaped(e.code)}</b> step {e.step:,}<br>{escaped(e.message)}" for e, _ in placed],
                "hoverinfo": "text",
            }
        )
    layout = _layout(
        max(260, 28 + 18 * len(labels) + 60),
        xaxis=_axis("step"),
        yaxis=_axis("", type="category", autorange="reversed"),
    )
    return {"data": data, "layout": layout}


def _nonfinite_cells(steps: list[int], labels: list[str], marks: list[list[int | None]]) -> dict[str, Any]:
    """The cells whose departure was not finite, in the error colour with "nan" written in them."""
    return {
        "type": "heatmap",
        "name": "not finite",
        "x": steps,
        "y": labels,
        "z": marks,
        "zmin": 0,
        "zmax": 1,
        "colorscale": [[0.0, NONFINITE_COLOUR], [1.0, NONFINITE_COLOUR]],
        "showscale": False,
        "text": [["nan" if mark else "" for mark in row] for row in marks],
        "texttemplate": "%{text}",
        "textfont": {"color": "#ffffff", "size": 10},
        "hovertemplate": "<b>%{y}</b><br>step %{x}<br>departure not finite (an error)<extra></extra>",
    }


def _event_lines(events: list[TimelineEvent]) -> list[dict[str, Any]]:
    colours = {"error": RED, "warning": "#e08e0b", "info": "#8a8f98"}
    return [
        {
            "type": "line",
            "xref": "x",
            "yref": "paper",
            "x0": e.step,
            "x1": e.step,
            "y0": 0,
            "y1": 1,
            "line": {"color": colours[e.severity.value], "width": 1.5, "dash": "dot"},
        }
        for e in events
    ]


def _events_of(timeline: Timeline, series: LayerSeries) -> list[TimelineEvent]:
    """The events of ``series``'s layer on its rank, and those of the whole model."""
    return [e for e in timeline.events if e.rank == series.rank and e.layer in (None, series.layer)]


def running_statistics(timeline: Timeline) -> dict[str, Any]:
    """Running mean norm and mean running variance over the steps for one layer call, chosen in a selector.

    Two traces per layer call, only the chosen call's visible; each selector entry also draws that
    layer's events (and the whole model's) as dotted vertical lines.
    """
    data: list[dict[str, Any]] = []
    buttons = []
    count = len(timeline.series)
    for i, series in enumerate(timeline.series):
        label = escaped(series_label(series, timeline))
        hover = f"<b>{label}</b><br>step %{{x}}<br>%{{y:.4g}}<extra></extra>"
        common = {"type": "scatter", "mode": "lines+markers", "x": list(series.steps), "visible": i == 0}
        data.append(
            {
                **common,
                "y": [_shown(v) for v in series.running_mean_norms],
                "name": "‖running mean‖",
                "line": {"color": BLUE},
                "hovertemplate": hover,
            }
        )
        data.append(
            {
                **common,
                "y": [_shown(v) for v in series.running_var_means],
                "name": "mean running var",
                "yaxis": "y2",
                "line": {"color": GREEN},
                "hovertemplate": hover,
            }
        )
        visible = [j // 2 == i for j in range(2 * count)]
        buttons.append(
            {
                "label": label,
                "method": "update",
                "args": [{"visible": visible}, {"shapes": _event_lines(_events_of(timeline, series))}],
            }
        )
    layout = _layout(
        340,
        xaxis=_axis("step"),
        yaxis=_axis("‖running mean‖ (L2 norm)", color=BLUE),
        yaxis2=_axis("mean running var", overlaying="y", side="right", color=GREEN),
        shapes=_event_lines(_events_of(timeline, timeline.series[0])) if timeline.series else [],
        showlegend=True,
        # The selector on the left and the legend on the right of the band above the plot, below the modebar.
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
        updatemenus=[
            {
                "buttons": buttons,
                "x": 0,
                "xanchor": "left",
                "y": 1.04,
                "yanchor": "bottom",
                "font": {"family": FONT, "size": 12},
                "active": 0,
            }
        ],
    )
    layout["margin"] = {**layout["margin"], "t": 72, "r": 72}
    return {"data": data, "layout": layout}


def _event_row(event: TimelineEvent, timeline: Timeline) -> Row:
    label = event.layer or MODEL_LABEL
    cells = (
        Cell(f"{event.step:,}", event.step),
        Cell(str(event.rank), event.rank),
        Cell(
            f'<span class="severity severity-{event.severity.value}">{event.severity.value}</span>',
            -event.severity.rank,
        ),
        Cell(escaped(event.code), event.code),
        Cell(escaped(label), label),
        Cell(escaped(event.message), event.message),
    )
    return Row(label, label, cells)


def _series_rows(timeline: Timeline) -> list[Row]:
    rows = []
    for series in timeline.series:
        peak = series.peak
        label = series_label(series, timeline)
        cells = (
            Cell(escaped(label), label),
            Cell(number(series.first, 3), series.first),
            Cell(number(last_departure(series), 3), last_departure(series)),
            Cell(number(None if peak is None else peak[1], 3), None if peak is None else peak[1]),
            Cell(peak_step(series), None if peak is None else peak[0]),
        )
        rows.append(Row(series.layer, label, cells))
    return rows


def _gap_place(entry: tuple[Untrusted, float | None] | None, what: str) -> str:
    if entry is None:
        return "no layer departs" if what.startswith("first") else f"{what} —"
    score = "not finite" if entry[1] is None else number(entry[1], 3)
    return f"{what} {escaped(entry[0])}, departure {score}"


def timeline_page(timeline: Timeline, model_output: str = "") -> Page:
    """The timeline as a page: the verdict, the heatmap, one layer's running statistics, the events, the layers."""
    numeric = {"step", "rank", "first", "last", "max", "at step"}
    event_columns = tuple(Column(t, t in numeric) for t in ("step", "rank", "severity", "code", "layer", "event"))
    series_columns = tuple(Column(t, t in numeric) for t in ("layer", "first", "last", "max", "at step"))
    events = [_event_row(e, timeline) for e in timeline.events]
    body = [_heading(timeline)]
    figures: dict[str, Any] = {}
    if timeline.series:
        figures = {"fig-heatmap": heatmap(timeline), "fig-running": running_statistics(timeline)}
        body += [
            section("Departure per layer and step", '<div class="plot" id="fig-heatmap"></div>', "heatmap"),
            section("Running statistics of one layer", '<div class="plot" id="fig-running"></div>', "running"),
        ]
    body.append(
        section(
            "Events",
            layer_table("events-table", event_columns, events, noun="events") if events else "<p>No events.</p>",
            "events",
        )
    )
    if timeline.series:
        body.append(section("Layers", layer_table("layers-table", series_columns, _series_rows(timeline)), "layers"))
    if timeline.validations:
        items = "".join(
            f"<li>step {gap.step:,} (rank {gap.rank}): {_gap_place(gap.first_departing, 'first departs at')}; "
            f"{_gap_place(gap.largest, 'largest gap at')}</li>"
            for gap in timeline.validations
        )
        body.append(section("Train/eval gap at each validation", f'<ul class="plain">{items}</ul>', "validations"))
    if timeline.notes:
        notes = "".join(f"<li>{escaped(note)}</li>" for note in timeline.notes)
        body.append(section("Notes", f'<ul class="plain">{notes}</ul>'))
    title = f"bn-inspect timeline · {timeline.files[0].inert() if timeline.files else ''}"
    return Page("timeline", title, "\n".join(body), figures, needs_plotly=bool(figures))
