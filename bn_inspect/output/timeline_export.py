"""A watched run's timeline as JSON (timeline-output.schema.json) and as Markdown for a job summary."""

from __future__ import annotations

import json
import math

from bn_inspect.output.export import _cell, _code, _text, format_number
from bn_inspect.output.render_timeline import TREND_LEGEND, event_place, last_departure, peak_step, series_label, trend
from bn_inspect.output.words import counted
from bn_inspect.report.timeline import Timeline


def timeline_to_json(timeline: Timeline) -> str:
    """The timeline's events, per-layer series and verdict as a JSON document of kind "timeline"."""
    return json.dumps(timeline.to_dict(), indent=2, allow_nan=False) + "\n"


def timeline_to_markdown(timeline: Timeline) -> str:
    """A job summary: the verdict, the first bad step, the events, then one row per layer call."""
    verdict = "✅ passed" if timeline.passed else "❌ failed"
    counts = {s: sum(e.severity.value == s for e in timeline.events) for s in ("error", "warning", "info")}
    ranks = f" · {counted(len(timeline.ranks), 'rank')} of {timeline.world_size}" if timeline.world_size > 1 else ""
    gate = "never fails" if timeline.fail_on.value == "never" else f"fails on {timeline.fail_on.value}"
    lines = [
        f"## bn-inspect timeline: {verdict}",
        "",
        f"**Timeline** {', '.join(_code(name) for name in timeline.files)} · **model** {_code(timeline.model)}{ranks} · "
        f"sampled every {counted(timeline.every, 'step')} · last step {timeline.last_step:,} · "
        f"{counted(counts['error'], 'error')}, {counted(counts['warning'], 'warning')}, {counts['info']} info · {gate}",
        "",
    ]
    first = timeline.first_bad
    if first is not None:
        lines += [f"**First bad step:** {_text(event_place(first, timeline))} ({first.code}).", ""]
    if timeline.events:
        lines += ["| step | rank | severity | code | layer | event |", "|---:|---:|---|---|---|---|"]
        for event in timeline.events:
            layer = _cell(_code(event.layer)) if event.layer is not None else "(model)"
            lines.append(
                f"| {event.step:,} | {event.rank} | {event.severity.value} | {event.code} | {layer} | "
                f"{_cell(_text(event.message))} |"
            )
    else:
        lines.append("No events.")
    if timeline.series:
        lines += [
            "",
            "| layer | first | last | max | at step | trend |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for series in timeline.series:
            peak = series.peak
            lines.append(
                f"| {_cell(_code(series_label(series, timeline)))} | {format_number(series.first, 3)} | "
                f"{format_number(last_departure(series), 3)} | {format_number(None if peak is None else peak[1], 3)} | "
                f"{peak_step(series)} | {trend(series)} |"
            )
        lines += ["", f"_{TREND_LEGEND}._"]
    if timeline.validations:
        lines += [
            "",
            "| validation at step | rank | first departs at | departure | largest gap at | departure |",
            "|---:|---:|---|---:|---|---:|",
        ]
        for gap in timeline.validations:
            cells = [
                f"{_cell(_code(entry[0]))} | {format_number(math.nan if entry[1] is None else entry[1], 3)}"
                if entry
                else "— | —"
                for entry in (gap.first_departing, gap.largest)
            ]
            lines.append(f"| {gap.step:,} | {gap.rank} | {' | '.join(cells)} |")
    lines += [""] + [f"- {_text(note)}" for note in timeline.notes]
    return "\n".join(lines) + "\n"
