"""The pages of check (findings linked to their layers), compare-modes (the gap profile) and recalibrate (before/after)."""

from __future__ import annotations

import html

from bn_inspect.output.grouped import group_sentence, grouped_findings
from bn_inspect.output.html.blocks import Cell, Column, Row, escaped, facts, layer_table, number, section
from bn_inspect.output.html.document import Page
from bn_inspect.output.html.figures import BLUE, GREEN, GREY, ORANGE, RED, Series, profile, stacked_bars
from bn_inspect.output.html.inspect_page import model_facts
from bn_inspect.output.words import batch_noise_sentence, counted, departing_after_sentence
from bn_inspect.report.comparisons import LayerModeGap, ModeComparison, RecalibratedLayer, RecalibrationResult
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.findings import MODEL_LABEL, CheckReport, Finding, Severity
from bn_inspect.text import Untrusted

_SEVERITY_COLOURS = {Severity.ERROR: RED, Severity.WARNING: ORANGE, Severity.INFO: GREY}


def _heading(kind: str, rows: list[tuple[str, str]], verdict: str, outcome: str) -> str:
    return (
        f'<header><h1>bn-inspect <span class="kind">{html.escape(kind)}</span></h1>{facts(rows)}'
        f'<p class="verdict verdict-{outcome}">{escaped(verdict)}</p></header>'
    )


def _check_verdict(check: CheckReport) -> str:
    tally = {s: sum(f.severity is s for f in check.findings) for s in Severity}
    counts = (
        f"{counted(tally[Severity.ERROR], 'error')}, {counted(tally[Severity.WARNING], 'warning')}, "
        f"{tally[Severity.INFO]} info"
    )
    failing = counted(len(check.failed), "finding")
    if check.passed:
        return f"Passed: no finding at or above {check.fail_on.value} ({counts})."
    return f"Failed: {failing} at or above {check.fail_on.value} ({counts})."


def check_page(check: CheckReport, model_output: str = "") -> Page:
    """The check as a page: the verdict, findings per layer in execution order, the findings table, the layers."""
    index = {label: i for i, label in enumerate(check.layers)}
    rows = [*model_facts(check.model)]
    data = check.input
    rows.append(
        ("input", escaped(f"{data.source}: {counted(data.num_samples, 'sample')}") if data else "none (--no-data)")
    )
    rows += [("mode", escaped(check.mode)), ("thresholds", escaped(check.thresholds.departure_limits()))]
    if check.ignored:
        rows.append(("ignored", escaped(", ".join(check.ignored))))
    if check.first_divergent:
        target = index.get(check.first_divergent)
        link = escaped(check.first_divergent)
        rows.append(
            ("first departure", f'<a class="jump" href="#layer-{target}">{link}</a>' if target is not None else link)
        )
    hover = [f"<b>{escaped(label)}</b>" for label in check.layers]
    counts = [
        (
            severity.value,
            [sum(f.severity is severity and f.label == label for f in check.findings) for label in check.layers],
            _SEVERITY_COLOURS[severity],
        )
        for severity in reversed(Severity)
    ]
    names = [label.inert() for label in check.layers]
    figures = {"fig-findings": stacked_bars(names, hover, counts, "findings")}
    columns = (
        Column("severity"),
        Column("code"),
        Column("rule"),
        Column("layer"),
        Column("channels", is_numeric=True),
        Column("message"),
        Column("cause", hint="the likely cause (README: Causes)"),
    )
    findings = [_finding_row(f, index) for f in sorted(check.findings, key=lambda f: -f.severity.rank)]
    body = [
        _heading("check", rows, _check_verdict(check), "passed" if check.passed else "failed"),
        section(
            "Findings per layer", '<div class="plot" id="fig-findings" data-target-prefix="layer-"></div>', "profile"
        ),
        section("Findings", _grouped(check, index, columns, findings), "findings"),
        section("Layers checked, in execution order", _checked_layers(check), "layers"),
    ]
    if check.notes:
        body.append(
            section("Notes", '<ul class="plain">' + "".join(f"<li>{escaped(n)}</li>" for n in check.notes) + "</ul>")
        )
    return Page(
        "check", f"bn-inspect check · {check.model.source}", "\n".join(body), figures, needs_plotly=bool(check.layers)
    )


def _finding_row(finding: Finding, index: dict[Untrusted, int]) -> Row:
    target = index.get(finding.label)
    cells = (
        Cell(
            f'<span class="severity severity-{finding.severity.value}">{finding.severity.value}</span>',
            -finding.severity.rank,
        ),
        Cell(escaped(finding.code), finding.code),
        Cell(escaped(finding.rule), finding.rule),
        Cell(escaped(finding.label), finding.label, target=f"layer-{target}" if target is not None else ""),
        _channels_cell(finding),
        Cell(escaped(finding.message), finding.message),
        Cell(escaped(finding.cause or "—"), finding.cause or ""),
    )
    return Row(finding.layer or MODEL_LABEL, finding.label, cells)


def _grouped(check: CheckReport, index: dict[Untrusted, int], columns: tuple[Column, ...], rows: list[Row]) -> str:
    """One paragraph per rule and severity with every layer it names, then each finding's row, folded."""
    if not rows:
        return "<p>No findings.</p>"

    def linked(label: Untrusted) -> str:
        target = index.get(label)
        return f'<a class="jump" href="#layer-{target}">{escaped(label)}</a>' if target is not None else escaped(label)

    paragraphs = []
    for group in grouped_findings(check.findings):
        first = group.first
        count = (
            f" · {counted(len(group.findings), 'layer')}" if len(group.findings) > 1 else f" · {linked(first.label)}"
        )
        paragraphs.append(
            f'<p class="finding"><span class="severity severity-{first.severity.value}">{first.severity.value}</span> '
            f"<b>{escaped(first.code)}</b> {escaped(first.rule)}{count}: {group_sentence(group, linked, escaped)}</p>"
        )
    table = layer_table("findings-table", columns, rows, noun="findings")
    return (
        "\n".join(paragraphs)
        + f"\n<details><summary>Each finding, one row per layer ({len(rows):,})</summary>\n{table}\n</details>"
    )


def _channels_cell(finding: Finding) -> Cell:
    """How many channels, and the first few, where the rule names channels; a dash where it does not (BN303)."""
    if not finding.channels:
        return Cell("—", None)
    shown = ", ".join(str(c) for c in finding.channels[:8]) + (" …" if len(finding.channels) > 8 else "")
    return Cell(f"{len(finding.channels):,}: {shown}", len(finding.channels))


def _checked_layers(check: CheckReport) -> str:
    items = []
    for i, label in enumerate(check.layers):
        codes = sorted({f.code for f in check.findings if f.label == label})
        mark = ' <span class="severity severity-error">first departure</span>' if label == check.first_divergent else ""
        found = f' <span class="hint">{escaped(" ".join(codes))}</span>' if codes else ""
        items.append(f'<li id="layer-{i}"><span class="name">{escaped(label)}</span>{mark}{found}</li>')
    return f'<ol class="plain" start="0">{"".join(items)}</ol>' if items else "<p>No normalization layers.</p>"


def comparison_page(comparison: ModeComparison, model_output: str = "") -> Page:
    """compare-modes as a page: where the train/eval gap opens, the gap profile, the table."""
    layers = comparison.layers
    labels = [layer.label for layer in layers]
    rows = _comparison_facts(comparison)
    opens = comparison.gap_opens_at
    verdict = (
        f"The train/eval gap opens at {opens}."
        if opens
        else batch_noise_sentence(comparison, lambda label: label.inert())
        if comparison.batch_noise_from is not None
        else f"Every layer's output stays within {comparison.threshold:g} between the modes."
    )
    marked = (labels.index(opens), f"gap opens: {escaped(opens)}") if opens in labels else None
    series = [
        Series("output rel. diff", [layer.output_rel_diff for layer in layers], RED),
        Series("input rel. diff", [layer.input_rel_diff for layer in layers], BLUE, dash="dash"),
        Series("own rel. diff", [layer.own_rel_diff for layer in layers], GREEN, dash="dot"),
        Series("departure (eval)", [layer.departure for layer in layers], ORANGE, axis="y2"),
    ]
    hover = [f"<b>{escaped(layer.label)}</b> ({escaped(layer.type)})" for layer in layers]
    figure = profile(
        [layer.label.inert() for layer in layers],
        hover,
        series,
        ("train vs eval rel. diff (log)", "departure (log)"),
        ([comparison.threshold], []),
        marked,
    )
    table_rows = [_gap_row(i, layer, opens) for i, layer in enumerate(layers)]
    body = [
        _heading("compare-modes", rows, verdict, "departs" if opens else "within"),
        section(
            "Train/eval gap profile",
            '<div class="plot" id="fig-gap" data-target-prefix="row-"></div><p class="hint">Per layer call: how far its output (and its input, and its own share on the same input) differs between train and eval mode. Dotted line: the threshold.</p>',
            "profile",
        ),
        section("Layers", layer_table("layers-table", _GAP_COLUMNS, table_rows), "layers"),
    ]
    title = f"bn-inspect compare-modes · {comparison.model.source if comparison.model else 'model'}"
    return Page("compare-modes", title, "\n".join(body), {"fig-gap": figure})


def _comparison_facts(comparison: ModeComparison) -> list[tuple[str, str]]:
    data = f"{counted(comparison.num_samples, 'sample')} in {counted(comparison.num_batches, 'batch')}"
    rows = [*model_facts(comparison.model), ("data", escaped(data))]
    rows.append(("threshold", escaped(f"relative output difference above {comparison.threshold:g}")))
    if comparison.output is not None:
        change = comparison.output.argmax_change_fraction
        described = f"relative difference {number(comparison.output.rel_diff)}"
        if change is not None:
            described += f"; argmax changes for {change:.1%} of samples"
        rows.append(("model output", escaped(described)))
    if comparison.not_executed:
        rows.append(("never ran", escaped(", ".join(name.inert() for name in comparison.not_executed))))
    return rows


_GAP_COLUMNS = (
    Column("#", is_numeric=True),
    Column("layer"),
    Column("type"),
    Column("eval uses"),
    Column("input diff", is_numeric=True, hint="||x_train - x_eval|| / ||x_eval||"),
    Column("output diff", is_numeric=True, hint="||y_train - y_eval|| / ||y_eval||"),
    Column("own diff", is_numeric=True, hint="this layer's own share, on the eval input"),
    Column("values / channel", is_numeric=True),
    Column("departure", is_numeric=True, hint="the eval input's departure score from the running statistics"),
    Column("max |shift z|", is_numeric=True),
    Column("worst var ratio", is_numeric=True),
)


def _gap_row(i: int, layer: LayerModeGap, opens: Untrusted | None) -> Row:
    cells = (
        Cell(str(i), i),
        Cell(escaped(layer.label), layer.label),
        Cell(escaped(layer.type), layer.type),
        Cell(escaped(layer.eval_uses), layer.eval_uses),
        Cell(number(layer.input_rel_diff), layer.input_rel_diff),
        Cell(number(layer.output_rel_diff), layer.output_rel_diff),
        Cell(number(layer.own_rel_diff), layer.own_rel_diff),
        Cell(number(layer.values_per_channel), layer.values_per_channel),
        Cell(number(layer.departure), layer.departure),
        Cell(number(layer.max_abs_shift_z), layer.max_abs_shift_z),
        Cell(number(layer.worst_var_ratio), layer.worst_var_ratio),
    )
    return Row(layer.name, layer.label, cells, "departs" if layer.label == opens else "", f"row-{i}")


def _recalibration_facts(result: RecalibrationResult, model_output: str) -> list[tuple[str, str]]:
    """The method, the source model and data it came from, the passes, and the new model."""
    rows = [("method", escaped(result.method))]
    if result.provenance is not None:
        rows += [
            ("source model", escaped(result.provenance.source_model)),
            ("data from", escaped(result.provenance.data.describe())),
        ]
    batches = f"{counted(result.num_samples, 'sample')} in {counted(result.num_batches, 'batch')} per pass"
    rows.append(
        ("data", escaped(f"{batches}; {counted(result.num_passes, 'pass')}, {counted(result.num_waves, 'wave')}"))
    )
    if model_output:
        rows.append(("new model", escaped(model_output)))
    return rows


def recalibration_page(result: RecalibrationResult, model_output: str = "") -> Page:
    """recalibrate as a page: before and after profiles side by side, the table of old and new statistics."""
    layers = result.layers
    rows = _recalibration_facts(result, model_output)
    verdict = (
        f"Recalibrated {counted(len(layers), 'layer')}; {counted(len(result.skipped), 'layer')} left as they were."
    )
    past = result.departing_after(Thresholds().warning)
    if past:
        verdict += f" {departing_after_sentence(past, result.method)}"
    hover = [f"<b>{escaped(layer.name)}</b> ({escaped(layer.type)})" for layer in layers]
    names = [layer.name.inert() for layer in layers]
    limits = Thresholds()
    shifts = profile(
        names,
        hover,
        [
            Series("before", [entry.departure_before for entry in layers], RED),
            Series("after", [entry.departure_after for entry in layers], GREEN),
        ],
        ("departure (log)", None),
        ([limits.warning, limits.error], []),
    )
    ratios = profile(
        names,
        hover,
        [
            Series("before", [entry.worst_var_ratio_before for entry in layers], RED),
            Series("after", [entry.worst_var_ratio_after for entry in layers], GREEN),
        ],
        ("worst var ratio (log)", None),
        ([], []),
    )
    body = [
        _heading("recalibrate", rows, verdict, "departs" if past else "within"),
        section(
            "Before and after",
            '<div class="side-by-side"><div class="plot" id="fig-shift" data-target-prefix="row-"></div><div class="plot" id="fig-ratio" data-target-prefix="row-"></div></div><p class="hint">Before: the layer inputs against the old running statistics. After: an eval pass of the recalibrated model against the new ones. Dotted: check&#39;s warning and error levels of the departure score.</p>',
            "profile",
        ),
        section(
            "Layers",
            layer_table(
                "layers-table", _RECALIBRATION_COLUMNS, [_recalibrated_row(i, entry) for i, entry in enumerate(layers)]
            ),
            "layers",
        ),
    ]
    if result.skipped:
        body.append(
            section(
                "Left as they were",
                '<ul class="plain">'
                + "".join(
                    f'<li><span class="name">{escaped(s.name)}</span> ({escaped(s.type)}): {escaped(s.reason)}</li>'
                    for s in result.skipped
                )
                + "</ul>",
            )
        )
    if result.notes:
        body.append(
            section("Notes", '<ul class="plain">' + "".join(f"<li>{escaped(n)}</li>" for n in result.notes) + "</ul>")
        )
    return Page(
        "recalibrate",
        f"bn-inspect recalibrate · {model_output or result.method}",
        "\n".join(body),
        {"fig-shift": shifts, "fig-ratio": ratios},
    )


_RECALIBRATION_COLUMNS = (
    Column("#", is_numeric=True),
    Column("layer"),
    Column("type"),
    Column("C", is_numeric=True),
    Column("values / channel", is_numeric=True),
    Column("wave", is_numeric=True),
    Column("max |z| before", is_numeric=True),
    Column("max |z| after", is_numeric=True),
    Column("worst ratio before", is_numeric=True),
    Column("worst ratio after", is_numeric=True),
    Column("batches tracked"),
)


def _recalibrated_row(i: int, layer: RecalibratedLayer) -> Row:
    tracked = f"{number(layer.old_num_batches_tracked)} → {number(layer.new_num_batches_tracked)}"
    cells = (
        Cell(str(i), i),
        Cell(escaped(layer.name), layer.name),
        Cell(escaped(layer.type), layer.type),
        Cell(number(layer.num_channels), layer.num_channels),
        Cell(number(layer.values_per_channel), layer.values_per_channel),
        Cell(str(layer.wave), layer.wave),
        Cell(number(layer.max_abs_shift_z_before), layer.max_abs_shift_z_before),
        Cell(number(layer.max_abs_shift_z_after), layer.max_abs_shift_z_after),
        Cell(number(layer.worst_var_ratio_before), layer.worst_var_ratio_before),
        Cell(number(layer.worst_var_ratio_after), layer.worst_var_ratio_after),
        Cell(escaped(tracked), layer.new_num_batches_tracked),
    )
    return Row(layer.name, layer.name, cells, element_id=f"row-{i}")
