"""Report -> rich renderables for people (never prints, never imports torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bn_inspect.output.export import format_number
from bn_inspect.output.verdict import inspection_verdict
from bn_inspect.report.findings import CheckReport
from bn_inspect.report.records import LayerListing, LayerReport, Report, matching_layers
from bn_inspect.text import inert

if TYPE_CHECKING:
    from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult

# |z| beyond which the batch mean sits far outside the running distribution.
SHIFT_WARN = 1.0
SHIFT_ALARM = 3.0
_BAR_CELLS = 6
_BAR_TOP = 100.0
_EIGHTHS = " ▏▎▍▌▋▊▉█"
_VERDICT_STYLE = {"departs": "bold red", "within": "green", "random": "yellow", "nothing to compare": "dim"}


def _inert(text: str, style: str = "") -> Text:
    """A name or path from the model file, the data or the command line: never read as markup,
    its control characters shown as escapes."""
    return Text(inert(text), style=style)


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


def shift_style(max_abs_z: float | None) -> str:
    """Colour for a layer's worst |shift z|."""
    if max_abs_z is None:
        return "dim"
    if math.isnan(max_abs_z) or max_abs_z > SHIFT_ALARM:
        return "bold red"
    if max_abs_z > SHIFT_WARN:
        return "yellow"
    return "green"


def shift_bar(max_abs_z: float | None) -> Text:
    """A 6-cell bar of max |z| on a log scale (1 -> ~0.9 cell, 3 -> ~1.8, 100 -> full)."""
    if max_abs_z is None:
        return Text("")
    if math.isnan(max_abs_z):
        return Text("?" * _BAR_CELLS, style="bold red")
    fill = _BAR_CELLS * min(1.0, math.log10(1 + max_abs_z) / math.log10(1 + _BAR_TOP))
    eighths = round(fill * 8)
    full, rest = divmod(eighths, 8)
    bar = "█" * full + (_EIGHTHS[rest] if rest else "")
    return Text(bar.ljust(_BAR_CELLS, "·"), style=shift_style(max_abs_z))


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


def _two_lines(top: str | Text, bottom: str | Text, bottom_style: str = "dim") -> Text:
    text = top.copy() if isinstance(top, Text) else Text(top)
    text.append("\n")
    text.append(bottom if isinstance(bottom, Text) else Text(bottom, style=bottom_style))
    return text


def layer_table(report: Report, compact: bool = False) -> Table:
    """One two-line row per layer call: shapes and axes, batch over running statistics, shift.

    ``compact`` (for terminals under about 110 columns) moves the channel count into the input
    column and leaves out the statistics used and the flags (the JSON report has them).
    """
    table = Table(header_style="bold", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD, collapse_padding=True)
    longest = max((max(len(inert(layer.label)), len(inert(layer.type))) for layer in report.layers), default=5)
    table.add_column("layer\ntype", overflow="fold", min_width=min(longest, 24))
    table.add_column("input" + (" (C)" if compact else "") + "\nreduced: n/ch", justify="right", no_wrap=True)
    if not compact:
        table.add_column("C", justify="right")
    table.add_column("mean\nbatch/run", justify="right", no_wrap=True)
    table.add_column("var\nbatch/run", justify="right", no_wrap=True)
    table.add_column("shift |z|\nmax", no_wrap=True)
    table.add_column("var ratio\n(worst)", justify="right", no_wrap=True)
    if not compact:
        table.add_column("uses\nflags")
    for layer in report.layers:
        shifts = layer.mean_shift_z
        worst = layer.max_abs_shift_z
        shift_cell = Text("—", style="dim")
        if shifts is not None and worst is not None:
            shift_cell = _two_lines(
                shift_bar(worst) + Text(f" {_short(worst)}"), f"avg {_short(_mean([abs(z) for z in shifts]))}"
            )
        ratio = layer.var_ratio
        ratio_cell = Text("—", style="dim")
        if ratio is not None:
            ratio_cell = _two_lines(_short(_geometric_mean(ratio)), f"({_short(layer.worst_var_ratio)})")
        values = layer.values_per_channel
        reduced = _reduced(layer) + (f": {values:,}" if values is not None else "")
        channels = str(layer.num_channels) if layer.num_channels is not None else "—"
        flags = " ".join(layer.flags)
        name_cell = _two_lines(_inert(layer.label, "bold"), _inert(layer.type, "dim"))
        cells: list[RenderableType] = [
            name_cell,
            _two_lines(_shape(layer.input_shape) + (f" ({channels})" if compact else ""), reduced),
        ]
        if not compact:
            cells.append(channels)
        cells += [
            _two_lines(_short(_mean(layer.batch_mean)), _short(_mean(layer.running_mean))),
            _two_lines(_short(_mean(layer.batch_var)), _short(_mean(layer.running_var))),
            shift_cell,
            ratio_cell,
        ]
        if not compact:
            cells.append(_two_lines(layer.normalizes_with, flags, "magenta"))
        table.add_row(*cells)
    return table


def header(report: Report) -> Text:
    """Model, input, mode and device in two lines."""
    model = report.model
    source = f"{inert(model.source)} ({model.format}" + (f", --arch {inert(model.arch)})" if model.arch else ")")
    data = report.input
    batches = "batch" if data.num_batches == 1 else "batches"
    text = Text()
    text.append("model ", style="bold")
    text.append(source + "\n")
    text.append("input ", style="bold")
    text.append(
        f"{inert(data.source)}: {data.num_samples:,} samples in {data.num_batches} {batches} of "
        f"{_shape(data.shape)} {data.dtype} · mode {report.mode} · device {report.device}"
    )
    if data.num_nonfinite_values:
        text.append(f"\n{data.num_nonfinite_values:,} input values are NaN or infinite", style="bold red")
    return text


def verdict(report: Report) -> Text:
    """Which layer's batch statistics depart first from its running statistics, as check judges it."""
    said = inspection_verdict(report, inert)
    return Text(said.sentence, style=_VERDICT_STYLE[said.outcome])


def explanations(report: Report) -> Text:
    """One sentence per layer call: which axes were reduced, over how many values."""
    text = Text()
    text.append("How each layer's statistics were computed\n", style="bold")
    for layer in report.layers:
        text.append(f"• {inert(layer.explanation)}\n")
    if report.not_executed:
        names = ", ".join(inert(name) for name in report.not_executed)
        text.append(f"Not executed on this input: {names}\n", style="yellow")
    return text


def channel_table(layer: LayerReport) -> Table:
    """Per-channel batch and running statistics of one layer call."""
    table = Table(
        title=_inert(f"{layer.label} ({layer.type}), per channel"),
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    for name in (
        "ch",
        "batch mean",
        "running mean",
        "batch var",
        "running var",
        "shift z",
        "var ratio",
        "weight",
        "bias",
    ):
        table.add_column(name, justify="right")
    num_channels = len(layer.batch_mean or layer.running_mean or ())
    shifts, ratios = layer.mean_shift_z, layer.var_ratio

    def at(values: Sequence[float] | None, index: int) -> float | None:
        return values[index] if values is not None else None

    for c in range(num_channels):
        z = at(shifts, c)
        table.add_row(
            str(c),
            format_number(at(layer.batch_mean, c)),
            format_number(at(layer.running_mean, c)),
            format_number(at(layer.batch_var, c)),
            format_number(at(layer.running_var, c)),
            Text(format_number(z), style=shift_style(abs(z) if z is not None else None)),
            format_number(at(ratios, c)),
            format_number(at(layer.weight, c)),
            format_number(at(layer.bias, c)),
        )
    return table


def render_report(report: Report, channel_patterns: Sequence[str] = (), width: int = 120) -> RenderableType:
    """The whole inspection as one renderable: header, layer table, verdict, explanations, channels.

    ``width`` is the console width the table is laid out for.
    """
    table = layer_table(report, compact=width < 110)
    parts: list[RenderableType] = [header(report), Text(""), table, Text(""), verdict(report)]
    parts += [Text(""), explanations(report)]
    for layer in matching_layers(report, channel_patterns):
        parts += [channel_table(layer), Text("")]
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
    return Group(*parts)


_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render_check(check: CheckReport) -> RenderableType:
    """Findings sorted by severity, then the verdict and what the gate was measured against."""
    parts: list[RenderableType] = []
    model = check.model
    head = Text()
    head.append("model ", style="bold")
    head.append(f"{inert(model.source)} ({model.format})")
    if check.input is not None:
        head.append("\ninput ", style="bold")
        head.append(f"{inert(check.input.source)}: {check.input.num_samples:,} samples · mode {check.mode}")
    parts += [head, Text("")]
    if check.findings:
        table = Table(header_style="bold", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
        table.add_column("severity")
        table.add_column("code")
        table.add_column("layer", overflow="fold")
        table.add_column("finding", ratio=1)
        ordered = sorted(check.findings, key=lambda f: -f.severity.rank)
        for finding in ordered:
            table.add_row(
                Text(finding.severity.value, style=_SEVERITY_STYLE[finding.severity.value]),
                Text(f"{finding.code}\n{finding.rule}"),
                _inert(finding.label),
                _inert(finding.message + "."),
            )
        parts += [table, Text("")]
    else:
        parts += [Text("No findings.", style="green"), Text("")]
    if check.first_divergent:
        parts.append(
            Text(
                f"First layer whose batch statistics depart from its running statistics: {inert(check.first_divergent)}",
                style="bold",
            )
        )
    for note in check.notes:
        parts.append(_inert(f"Note: {note}.", "dim"))
    counts = {s: sum(f.severity.value == s for f in check.findings) for s in ("error", "warning", "info")}
    nouns = {"error": "error", "warning": "warning", "info": "note"}
    summary = ", ".join(f"{n} {nouns[s]}{'s' if n != 1 else ''}" for s, n in counts.items())
    verdict_text = "PASSED" if check.passed else "FAILED"
    parts.append(
        Text(
            f"{summary}: {verdict_text} (fails on {check.fail_on.value} or worse)",
            style="bold green" if check.passed else "bold red",
        )
    )
    return Group(*parts)


def _spread(values: Sequence[float] | None) -> str:
    if not values:
        return "—"
    finite = [v for v in values if math.isfinite(v)]
    bad = len(values) - len(finite)
    if not finite:
        return "all non-finite"
    text = f"{_short(_mean(finite))} [{_short(min(finite))}, {_short(max(finite))}]"
    return text + (f" +{bad} non-finite" if bad else "")


def render_listing(listing: LayerListing) -> RenderableType:
    """The static listing: one row per normalization layer, its settings and its running statistics."""
    table = Table(header_style="bold", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    for name, justify in (
        ("layer", "left"),
        ("type", "left"),
        ("C", "right"),
        ("eps", "right"),
        ("momentum", "right"),
        ("affine", "left"),
        ("tracks", "left"),
        ("batches", "right"),
        ("running mean avg [min, max]", "right"),
        ("running var avg [min, max]", "right"),
        ("eval uses", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for layer in listing.layers:
        momentum = "None (cumulative)" if layer.is_cumulative_average else _short(layer.momentum)
        flags = [
            f
            for f, on in (("train mode", layer.is_training), ("lazy", layer.is_lazy), ("frozen", layer.is_frozen))
            if on
        ]
        table.add_row(
            _inert(layer.name),
            _inert(layer.type + (f" ({', '.join(flags)})" if flags else "")),
            str(layer.num_channels) if layer.num_channels is not None else "—",
            _short(layer.eps),
            momentum,
            "yes" if layer.affine else "no",
            "yes" if layer.track_running_stats else "no",
            str(layer.num_batches_tracked) if layer.num_batches_tracked is not None else "—",
            _spread(layer.running_mean),
            _spread(layer.running_var),
            Text(layer.eval_uses, style="yellow" if layer.eval_uses == "batch" else ""),
        )
    head = Text()
    head.append("model ", style="bold")
    head.append(f"{inert(listing.model.source)} ({listing.model.format})")
    parts: list[RenderableType] = [head, Text(""), table]
    if listing.types_inferred:
        parts.append(
            Text(
                "Layer types are inferred from the state_dict's *.running_mean / *.running_var keys "
                "(eps and momentum are not saved); pass --arch for the real classes.",
                style="dim",
            )
        )
    if not listing.layers:
        parts.append(Text("No normalization layer found.", style="yellow"))
    return Group(*parts)


def _ratio_bar(value: float, top: float = 1.0) -> Text:
    """A 10-cell bar of a relative difference on a log scale from 1e-4 to ``top``."""
    if math.isnan(value):
        return Text("?" * 10, style="bold red")
    fill = 0.0 if value <= 1e-4 else min(1.0, (math.log10(value) + 4) / (math.log10(top) + 4))
    cells = round(fill * 10)
    style = "green" if value < 0.01 else "yellow" if value < 0.05 else "bold red"
    return Text("█" * cells + "·" * (10 - cells), style=style)


def render_mode_comparison(comparison: ModeComparison) -> RenderableType:
    """The train/eval gap as a profile over depth: one row per layer call, bars for the output difference."""
    table = Table(header_style="bold", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    table.add_column("layer", overflow="fold")
    table.add_column("type")
    table.add_column("output Δ train vs eval", no_wrap=True)
    table.add_column("input Δ", justify="right")
    table.add_column("own Δ", justify="right")
    table.add_column("max |z|", justify="right")
    table.add_column("worst var ratio", justify="right")
    for gap in comparison.layers:
        style = "bold" if gap.label == comparison.gap_opens_at else ""
        table.add_row(
            _inert(gap.label, style),
            _inert(gap.type),
            _ratio_bar(gap.output_rel_diff) + Text(f" {gap.output_rel_diff:.2%}"),
            f"{gap.input_rel_diff:.2%}",
            f"{gap.own_rel_diff:.2%}",
            _short(gap.max_abs_shift_z),
            _short(gap.worst_var_ratio),
        )
    parts: list[RenderableType] = [
        Text(
            f"{comparison.num_samples:,} samples in {comparison.num_batches} batches, each run in eval and in "
            "train mode (dropout off in both); Δ = ‖train − eval‖ / ‖eval‖.",
            style="dim",
        ),
        Text(""),
        table,
        Text(""),
    ]
    if comparison.gap_opens_at is not None:
        opening = comparison.layer(comparison.gap_opens_at)
        parts.append(
            Text(
                f"The gap opens at {inert(opening.label)}: its output differs by {opening.output_rel_diff:.1%} between "
                f"modes, its input by {opening.input_rel_diff:.1%}; its own share is {opening.own_rel_diff:.1%}.",
                style="bold red",
            )
        )
    else:
        parts.append(
            Text(f"No layer's output differs by more than {comparison.threshold:.0%} between modes.", style="green")
        )
    if comparison.output is not None:
        output = comparison.output
        line = f"Model output: differs by {output.rel_diff:.2%}"
        if output.argmax_change_fraction is not None:
            line += f"; the predicted class changes for {output.argmax_change_fraction:.1%} of samples"
        parts.append(Text(line + "."))
    if comparison.not_executed:
        parts.append(_inert(f"Not executed: {', '.join(comparison.not_executed)}", "yellow"))
    return Group(*parts)


def render_recalibration(result: RecalibrationResult, output: str) -> RenderableType:
    """Before/after per layer: how far the data sat from the old statistics, and from the new."""
    table = Table(header_style="bold", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    for name, justify in (
        ("layer", "left"),
        ("values/ch", "right"),
        ("max |z| before → after", "right"),
        ("worst var ratio before → after", "right"),
        ("mean old → new", "right"),
        ("var old → new", "right"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for layer in result.layers:
        table.add_row(
            _inert(layer.name),
            f"{layer.values_per_channel:,}",
            f"{_short(layer.max_abs_shift_z_before)} → {_short(layer.max_abs_shift_z_after)}",
            f"{_short(layer.worst_var_ratio_before)} → {_short(layer.worst_var_ratio_after)}",
            f"{_short(_mean(layer.old_running_mean))} → {_short(_mean(layer.new_running_mean))}",
            f"{_short(_mean(layer.old_running_var))} → {_short(_mean(layer.new_running_var))}",
        )
    method = (
        "precise: one pass with normalization layers in train mode (as PreciseBN / update_bn)"
        if result.method == "precise"
        else "sequential: layer by layer in eval mode, each after the layers before it (exact for the deployed model)"
    )
    parts: list[RenderableType] = [
        Text(
            f"Recalibrated {len(result.layers)} layers over {result.num_samples:,} samples in "
            f"{result.num_batches} batches ({result.num_passes} passes), method {method}.",
            style="bold",
        ),
        Text(""),
        table,
    ]
    for skipped in result.skipped:
        parts.append(_inert(f"Skipped {skipped.name} ({skipped.type}): {skipped.reason}", "yellow"))
    for note in result.notes:
        parts.append(_inert(f"Note: {note}", "dim"))
    parts.append(_inert(f"Wrote {output}", "green"))
    return Group(*parts)
