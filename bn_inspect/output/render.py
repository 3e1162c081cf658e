"""Report -> rich renderables for people (never prints, never imports torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.text import Text

from bn_inspect.options import Explain
from bn_inspect.output.explained import explanation_groups, explanation_sentence
from bn_inspect.output.export import format_number
from bn_inspect.output.grouped import group_sentence, grouped_findings
from bn_inspect.output.layout import Column, Layout, fitted
from bn_inspect.output.verdict import inspection_verdict
from bn_inspect.output.words import counted, image_details, no_channel_statistics
from bn_inspect.report.departure import ERROR, INFO, WARNING, WITHIN, Departure, departure
from bn_inspect.report.findings import CheckReport
from bn_inspect.report.records import LayerReport, ModelInfo, Report, matching_layers
from bn_inspect.text import Untrusted, inert

_BAR_CELLS = 6
_BAR_TOP = 100.0
_EIGHTHS = " ▏▎▍▌▋▊▉█"
_VERDICT_STYLE = {"departs": "bold red", "within": "green", "random": "yellow", "nothing to compare": "dim"}


def _inert(text: str | Untrusted, style: str = "") -> Text:
    """A name or path from the model file, the data or the command line: never read as markup,
    its control characters shown as escapes."""
    return Text(text.inert() if isinstance(text, Untrusted) else inert(text), style=style)


def _mean(values: Sequence[float] | None) -> float | None:
    if not values:
        return None
    return math.fsum(values) / len(values)


def _geometric_mean(values: Sequence[float] | None) -> float | None:
    if not values:
        return None
    if any(math.isnan(v) or v <= 0 or math.isinf(v) for v in values):
        return math.nan
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


_TIER_STYLE = {ERROR: "bold red", WARNING: "yellow", INFO: "", WITHIN: "green"}


def departure_style(found: Departure | None) -> str:
    """Colour for a layer's departure: its tier's (report/departure.py)."""
    return "dim" if found is None else _TIER_STYLE[found.tier]


def departure_bar(score: float, style: str = "") -> Text:
    """A 6-cell bar of a departure score on a log scale (0.83 -> ~0.8 cell, 1.7 -> ~1.3, 100 -> full)."""
    if math.isnan(score):
        return Text("?" * _BAR_CELLS, style=style)
    fill = _BAR_CELLS * min(1.0, math.log10(1 + score) / math.log10(1 + _BAR_TOP))
    eighths = round(fill * 8)
    full, rest = divmod(eighths, 8)
    bar = "█" * full + (_EIGHTHS[rest] if rest else "")
    return Text(bar.ljust(_BAR_CELLS, "·"), style=style)


def _shape(shape: Sequence[int] | None) -> str:
    return "×".join(str(s) for s in shape) if shape else "—"


def _reduced(layer: LayerReport) -> str:
    if not layer.axis_names or layer.reduced_axes is None:
        return "—"
    return ",".join(layer.axis_names[d] for d in layer.reduced_axes)


def _pair(batch: float | None, running: float | None) -> str:
    return f"{format_number(batch)} | {format_number(running)}"


def _short(value: float | None) -> str:
    return format_number(value, 3)


def _model_line(model: ModelInfo) -> Text:
    """``model <source> (<format>[, --arch <spec>])``, the first line of every command's output but
    inspect's; a model handed over in memory is its class name alone ("ResNet (in memory)")."""
    text = Text()
    text.append("model ", style="bold")
    details = [] if model.is_in_memory else [model.format.inert()]
    details += [f"--arch {model.arch.inert()}"] if model.arch else []
    text.append(model.source.inert() + (f" ({', '.join(details)})" if details else ""))
    return text


def _two_lines(top: str | Text, bottom: str | Text, bottom_style: str = "dim") -> Text:
    text = top.copy() if isinstance(top, Text) else Text(top)
    text.append("\n")
    text.append(bottom if isinstance(bottom, Text) else Text(bottom, style=bottom_style))
    return text


def _layer_cells(layer: LayerReport) -> dict[str, Text]:
    """Each cell of a layer call's row, by the column it belongs to."""
    worst, ratio = layer.max_abs_shift_z, layer.var_ratio
    found = departure(layer)
    shift_cell = Text("—", style="dim")
    if found is not None:
        score = Text(f" {_short(found.score)}", style=departure_style(found))
        shift_cell = _two_lines(departure_bar(found.score, departure_style(found)) + score, _short(worst))
    ratio_cell = Text("—", style="dim")
    if ratio is not None:
        ratio_cell = _two_lines(_short(_geometric_mean(ratio)), f"({_short(layer.worst_var_ratio)})")
    values = layer.values_per_channel
    channels = f"{layer.num_channels:,}" if layer.num_channels is not None else "—"
    flags = Text(" ".join(layer.flags), style="magenta")
    name_style = "bold red" if found is not None and found.tier == ERROR else "bold"
    name = _two_lines(_inert(layer.label, name_style), _inert(layer.type, "dim"))
    return {
        "name": name,
        "named": _two_lines(name, flags) if layer.flags else name,
        "input": _two_lines(
            _shape(layer.input_shape), _reduced(layer) + (f": {values:,}" if values is not None else "")
        ),
        "input (C)": _two_lines(
            f"{_shape(layer.input_shape)} ({channels})",
            _reduced(layer) + (f": {values:,}" if values is not None else ""),
        ),
        "C": Text(channels),
        "mean": _two_lines(_short(_mean(layer.batch_mean)), _short(_mean(layer.running_mean))),
        "var": _two_lines(_short(_mean(layer.batch_var)), _short(_mean(layer.running_var))),
        "shift": shift_cell,
        "ratio": ratio_cell,
        "uses": _two_lines(layer.normalizes_with, flags, "magenta"),
    }


_LAYER_COLUMNS = {
    "name": Column("layer\ntype"),
    "named": Column("layer\ntype\nflags"),
    "input": Column("input\nreduced: n/ch", "right"),
    "input (C)": Column("input (C)\nreduced: n/ch", "right"),
    "C": Column("C", "right"),
    "mean": Column("mean\nbatch/run", "right"),
    "var": Column("var\nbatch/run", "right"),
    "shift": Column("departure /\nmax |z|", wraps=True),
    "ratio": Column("var ratio\n(worst)", "right"),
    "uses": Column("uses\nflags", wraps=True),
}


def layer_table(report: Report, width: int = 160) -> RenderableType:
    """One row per layer call: shapes and axes, batch over running statistics, shift.

    Below the full width the channel count joins the input column and the flags go under the
    layer's type; below that each layer call is a block of lines.
    """
    cells = [_layer_cells(layer) for layer in report.layers]
    columns = dict(_LAYER_COLUMNS)
    if not any(layer.flags for layer in report.layers):
        columns["named"] = columns["name"]
    layouts = [
        Layout(
            tuple(columns[key] for key in keys),
            tuple(tuple(row[key] for key in keys) for row in cells),
        )
        for keys in (
            ("name", "input", "C", "mean", "var", "shift", "ratio", "uses"),
            ("named", "input (C)", "mean", "var", "shift", "ratio"),
        )
    ]
    return fitted(layouts, width)


def header(report: Report) -> Text:
    """Model, input, mode and device in two lines."""
    data = report.input
    text = _model_line(report.model)
    text.append("\ninput ", style="bold")
    text.append(
        f"{data.source.inert()}: {counted(data.num_samples, 'sample')} in {counted(data.num_batches, 'batch')} of "
        f"{_shape(data.shape)} {data.dtype.inert()} · mode {report.mode.inert()} · device {report.device.inert()}"
    )
    for detail in image_details(data.preprocessing, data.num_skipped_files, data.skipped_files):
        text.append(f"\n{inert(detail)}")
    if data.num_nonfinite_values:
        count = data.num_nonfinite_values
        text.append(
            f"\n{counted(count, 'input value')} {'is' if count == 1 else 'are'} NaN or infinite", style="bold red"
        )
    return text


def verdict(report: Report) -> Text:
    """Which layer's batch statistics depart first from its running statistics, as check judges it."""
    said = inspection_verdict(report, Untrusted.inert)
    return Text(said.sentence, style=_VERDICT_STYLE[said.outcome])


def explanations(report: Report, explain: Explain = Explain.GROUPED) -> Text:
    """Which axes each layer call reduced, over how many values: one sentence per pattern that
    layers share (output/explained.py), or with ``Explain.ALL`` one per layer call."""
    text = Text()
    text.append("How each layer's statistics were computed\n", style="bold")
    groups = [] if explain is Explain.ALL else explanation_groups(report.layers)
    if explain is Explain.ALL:
        sentences = [layer.explanation.inert() for layer in report.layers]
    else:
        sentences = [explanation_sentence(group, Untrusted.inert) for group in groups]
    for sentence in sentences:
        text.append(f"• {sentence}\n")
    if any(group.is_shortened for group in groups):
        text.append("--explain all names every layer call in a sentence of its own.\n", style="dim")
    if report.not_executed:
        names = ", ".join(name.inert() for name in report.not_executed)
        text.append(f"Not executed on this input: {names}\n", style="yellow")
    return text


def channel_table(layer: LayerReport, width: int = 160) -> RenderableType:
    """Per-channel batch and running statistics of one layer call.

    Narrower, batch and running values share a column (one above the other); narrower still,
    weight and bias are left out (the JSON and CSV reports have them); then one block per channel.
    A layer without per-channel statistics (GroupNorm, LayerNorm) is one line that says so.
    """
    missing = no_channel_statistics(layer, Untrusted.inert)
    if missing is not None:
        return _inert(missing, "dim")
    shifts, ratios = layer.mean_shift_z, layer.var_ratio
    found = departure(layer)
    departing = set() if found is None else {*found.channels, *found.nonfinite}

    def at(values: Sequence[float] | None, index: int) -> Text:
        return Text(format_number(values[index] if values is not None else None))

    rows = []
    for c in range(len(layer.batch_mean or layer.running_mean or ())):
        z = shifts[c] if shifts is not None else None
        rows.append(
            {
                "ch": Text(f"{c:,}"),
                "batch mean": at(layer.batch_mean, c),
                "running mean": at(layer.running_mean, c),
                "batch var": at(layer.batch_var, c),
                "running var": at(layer.running_var, c),
                "shift z": Text(format_number(z), style="bold red" if c in departing else ""),
                "var ratio": at(ratios, c),
                "weight": at(layer.weight, c),
                "bias": at(layer.bias, c),
            }
        )
    for row in rows:
        row["mean\nbatch/run"] = _two_lines(row["batch mean"], row["running mean"], "")
        row["var\nbatch/run"] = _two_lines(row["batch var"], row["running var"], "")
        row["weight\nbias"] = _two_lines(row["weight"], row["bias"], "")
    layouts = [
        Layout(
            tuple(Column(key, "right") for key in keys),
            tuple(tuple(row[key] for key in keys) for row in rows),
        )
        for keys in (
            ("ch", "batch mean", "running mean", "batch var", "running var", "shift z", "var ratio", "weight", "bias"),
            ("ch", "mean\nbatch/run", "var\nbatch/run", "shift z", "var ratio", "weight\nbias"),
            ("ch", "mean\nbatch/run", "var\nbatch/run", "shift z", "var ratio"),
        )
    ]
    title = _inert(f"{layer.label} ({layer.type}), per channel", "bold")
    title.no_wrap, title.overflow = True, "ignore"
    return Group(title, fitted(layouts, width))


def render_report(
    report: Report, channel_patterns: Sequence[str] = (), width: int = 120, explain: Explain = Explain.GROUPED
) -> RenderableType:
    """The whole inspection as one renderable: the verdict in one line, header, layer table,
    explanations, channels, and the whole verdict last, where the eye lands after the output.

    ``width`` is the console width the table is laid out for.
    """
    said = inspection_verdict(report, Untrusted.inert)
    parts: list[RenderableType] = [Text(said.summary, style=_VERDICT_STYLE[said.outcome]), header(report), Text("")]
    parts += [layer_table(report, width), Text(""), explanations(report, explain)]
    for layer in matching_layers(report, channel_patterns):
        parts += [channel_table(layer, width), Text("")]
    if report.distributed is not None:
        from bn_inspect.output.ranks import distributed_lines

        parts += [Text("\n".join(inert(line) for line in distributed_lines(report.distributed))), Text("")]
    parts.append(
        Text(
            "var = biased batch variance (what BatchNorm normalizes with); running var tracks the unbiased one. "
            "z = (batch mean − running mean) / √(running var + eps); var ratio = batch var / running var "
            "(geometric mean over channels, worst in brackets).",
            style="dim",
        )
    )
    parts += [Text(""), verdict(report)]
    return Group(*parts)


_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render_check(check: CheckReport, width: int = 160) -> RenderableType:
    """Findings sorted by severity, then the verdict and what the gate was measured against."""
    parts: list[RenderableType] = []
    model = check.model
    head = _model_line(model)
    if check.input is not None:
        head.append("\ninput ", style="bold")
        head.append(
            f"{check.input.source.inert()}: {counted(check.input.num_samples, 'sample')} · mode {check.mode.inert()}"
        )
        data = check.input
        for detail in image_details(data.preprocessing, data.num_skipped_files, data.skipped_files):
            head.append(f"\n{inert(detail)}")
    parts += [head, Text("")]
    if check.findings:
        # A terminal is short of space: a group's layer list takes about one line of the table.
        rows = tuple(
            (
                _inert(group.first.label) if len(group.findings) == 1 else Text(counted(len(group.findings), "layer")),
                Text(group.severity.value, style=_SEVERITY_STYLE[group.severity.value]),
                Text(f"{group.first.code}\n{group.first.rule}"),
                _inert(group_sentence(group, Untrusted.inert, inert, budget=width)),
            )
            for group in grouped_findings(check.findings)
        )
        columns = (Column("layer"), Column("severity"), Column("code"), Column("finding", wraps=True, ratio=1))
        parts += [fitted([Layout(columns, rows)], width), Text("")]
    else:
        parts += [Text("No findings.", style="green"), Text("")]
    if check.first_divergent:
        parts.append(
            Text(
                f"First layer whose batch statistics depart from its running statistics: {check.first_divergent.inert()}",
                style="bold",
            )
        )
    for note in check.notes:
        parts.append(_inert(f"Note: {note}.", "dim"))
    counts = {s: sum(f.severity.value == s for f in check.findings) for s in ("error", "warning", "info")}
    # "info", not "notes": the "Note:" lines above are remarks on the run, not findings.
    summary = f"{counted(counts['error'], 'error')}, {counted(counts['warning'], 'warning')}, {counts['info']} info"
    verdict_text = "PASSED" if check.passed else "FAILED"
    parts.append(
        Text(
            f"{summary}: {verdict_text} (fails on {check.fail_on.value} or worse)",
            style="bold green" if check.passed else "bold red",
        )
    )
    return Group(*parts)
