"""Report -> JSON, CSV and Markdown text for machines and CI summaries (pandas lives here)."""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from bn_inspect.output.grouped import group_sentence, grouped_findings
from bn_inspect.output.verdict import inspection_verdict
from bn_inspect.output.words import (
    batch_noise_sentence,
    change_legend,
    change_word,
    counted,
    image_details,
    no_channel_statistics,
)
from bn_inspect.report.departure import departure
from bn_inspect.report.findings import MODEL_LABEL, CheckReport, Finding
from bn_inspect.report.frame import report_frame
from bn_inspect.report.records import LayerListing, LayerReport, ModelInfo, Report, matching_layers
from bn_inspect.text import Untrusted, inert

if TYPE_CHECKING:
    from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
    from bn_inspect.report.diff import DiffReport, StatChange


def format_number(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits, thousands separated, '—' for missing values."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 10 ** (digits - 1) <= magnitude < 1e7:
        return f"{round(value):,}"
    if 1e-3 <= magnitude < 1e7:
        return f"{value:.{digits}g}"
    return f"{value:.{digits - 1}e}"


def to_json(report: Report) -> str:
    """The report as a JSON document of schema version 1 (see report.schema.json)."""
    return json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"


def to_csv(report: Report) -> str:
    """The rows of ``report_frame`` as CSV, floats written to full precision, names as ``csv_text``."""
    frame = report_frame(report)
    for column in ("layer", "type"):
        frame[column] = frame[column].map(csv_text)
    return str(frame.to_csv(index=False, float_format="%.17g"))


# How a cell a spreadsheet reads as a formula starts (tabs and line breaks are escaped by ``inert``).
_FORMULA_STARTS = ("=", "+", "-", "@")


def csv_text(text: str) -> str:
    """A name from a file as a CSV cell: ``inert``, and led by ``'`` where a spreadsheet would run
    it as a formula (``=HYPERLINK(...)``), which spreadsheets then show as the text it is."""
    shown = inert(text)
    return f"'{shown}" if shown.startswith(_FORMULA_STARTS) else shown


# What Markdown reads as structure in text from a file: a table cell's end, a code span, HTML or an
# autolink, a link or image, an entity (``&#x202e;`` would become a bidi override), math (``$``),
# strikethrough, and the backslash that escapes them all.
_MARKDOWN_SPECIAL = frozenset("\\`|<>[]&$~")


def _shown(text: str | Untrusted) -> str:
    """Text as a terminal or plain text may show it: Untrusted made inert, the tool's own text (which
    quotes names only in their inert form) made inert too."""
    return text.inert() if isinstance(text, Untrusted) else inert(text)


def _text(text: str | Untrusted) -> str:
    """Text from a file as Markdown that shows it as it is: ``inert``, each special character escaped."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in _shown(text))


def _format(model: ModelInfo) -> str:
    """`` (state_dict)`` after the model's source; nothing for a model in memory, whose source names its class."""
    return "" if model.is_in_memory else f" ({_text(model.format)})"


def _code(text: str | Untrusted) -> str:
    """A name or path as a Markdown code span that shows it as it is (``inert``), backticks included.

    In a code span only a run of backticks as long as the fence is special, so the fence is one
    longer than the name's longest run; the spaces that then pad it are stripped when rendered.
    """
    shown = _shown(text)
    longest = max((len(run) for run in re.findall("`+", shown)), default=0)
    pad = " " if longest or (shown.startswith(" ") and shown.endswith(" ")) else ""
    fence = "`" * (longest + 1)
    return f"{fence}{pad}{shown}{pad}{fence}"


def _cell(text: str) -> str:
    """Markdown made a table cell: GitHub ends a cell at every ``|`` not escaped, inside code spans too."""
    return text.replace("|", "\\|")


def _avg(values: tuple[float, ...] | None) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _departure_cell(layer: LayerReport) -> str:
    found = departure(layer)
    if found is None:
        return "—"
    score = format_number(found.score, 3)
    return f"**{score}** ({found.tier})" if found.departs else score


def to_markdown(report: Report, channel_patterns: tuple[str, ...] = ()) -> str:
    """A GitHub-flavoured summary: one table row per layer call, then the explanations."""
    data = report.input
    lines = [
        "## bn-inspect",
        "",
        f"**Model** {_code(report.model.source)}{_format(report.model)} · **input** {_code(data.source)}: "
        f"{counted(data.num_samples, 'sample')}, {counted(data.num_batches, 'batch')} of {tuple(data.shape)} · "
        f"**mode** {_text(report.mode)} · **device** {_text(report.device)}"
        + "".join(
            f" · {_code(said)}"
            for said in image_details(data.preprocessing, data.num_skipped_files, data.skipped_files)
        ),
        "",
        "| # | layer | type | input | C | values/ch | batch mean | running mean | batch var | running var "
        "| departure | max \\|z\\| | worst var ratio | uses | flags |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for index, layer in enumerate(report.layers):
        cells = [
            str(index),
            _code(layer.label),
            _text(layer.type),
            "×".join(str(s) for s in layer.input_shape or ()),
            str(layer.num_channels) if layer.num_channels is not None else "—",
            f"{layer.values_per_channel:,}" if layer.values_per_channel is not None else "—",
            format_number(_avg(layer.batch_mean)),
            format_number(_avg(layer.running_mean)),
            format_number(_avg(layer.batch_var)),
            format_number(_avg(layer.running_var)),
            _departure_cell(layer),
            format_number(layer.max_abs_shift_z),
            format_number(layer.worst_var_ratio),
            layer.normalizes_with,
            " ".join(layer.flags),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    said = inspection_verdict(report, _code, text=_text)
    lines += ["", f"**{said.sentence}**" if said.outcome == "departs" else said.sentence]
    if report.not_executed:
        lines.append(f"Not executed: {', '.join(_code(n) for n in report.not_executed)}.")
    lines += ["", "<details><summary>How each layer's statistics were computed</summary>", ""]
    lines += [f"- {_text(layer.explanation)}" for layer in report.layers]
    lines += ["", "</details>", ""]
    if report.distributed is not None:
        from bn_inspect.output.ranks import distributed_lines

        lines += ["### Ranks", "", *(f"- {_text(line)}" for line in distributed_lines(report.distributed)), ""]
    for layer in matching_layers(report, channel_patterns):
        missing = no_channel_statistics(layer, _code)
        if missing is not None:
            lines += [f"### {_code(layer.label)} per channel", "", missing, ""]
            continue
        lines += [
            f"### {_code(layer.label)} per channel",
            "",
            "| ch | batch mean | running mean | batch var | running var | shift z | var ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        shifts, ratios = layer.mean_shift_z, layer.var_ratio
        for c in range(len(layer.batch_mean or ())):
            values = [
                layer.batch_mean[c] if layer.batch_mean else None,
                layer.running_mean[c] if layer.running_mean else None,
                layer.batch_var[c] if layer.batch_var else None,
                layer.running_var[c] if layer.running_var else None,
                shifts[c] if shifts else None,
                ratios[c] if ratios else None,
            ]
            lines.append(f"| {c} | " + " | ".join(format_number(v) for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def check_to_json(check: CheckReport) -> str:
    """The findings, thresholds and verdict as JSON (same schema_version as the inspect report)."""
    return json.dumps(check.to_dict(), indent=2, allow_nan=False) + "\n"


def check_to_markdown(check: CheckReport) -> str:
    """A job-summary / pull-request comment: verdict first, then one row per finding."""
    verdict = "✅ passed" if check.passed else "❌ failed"
    counts = {s: sum(f.severity.value == s for f in check.findings) for s in ("error", "warning", "info")}
    lines = [
        f"## bn-inspect check: {verdict}",
        "",
        f"**Model** {_code(check.model.source)}{_format(check.model)} · "
        + (f"**input** {_code(check.input.source)} · " if check.input else "**no data** · ")
        + f"{counted(counts['error'], 'error')}, {counted(counts['warning'], 'warning')}, "
        f"{counts['info']} info · "
        f"fails on {check.fail_on.value}",
        "",
    ]
    if check.findings:
        # A summary page has room: a group of findings names every one of its layers.
        lines += ["| severity | code | layer | finding |", "|---|---|---|---|"]
        for group in grouped_findings(check.findings):
            f = group.first
            layer = _cell(_code(f.label)) if len(group.findings) == 1 else counted(len(group.findings), "layer")
            finding = group_sentence(group, lambda label: _cell(_code(label)), _text)
            lines.append(f"| {f.severity.value} | {f.code} {f.rule} | {layer} | {finding} |")
    else:
        lines.append("No findings.")
    if check.first_divergent:
        lines += [
            "",
            f"First layer whose batch statistics depart from its running statistics: {_code(check.first_divergent)}.",
        ]
    lines += [f"- {_text(note)}" for note in check.notes]
    t = check.thresholds
    lines += [
        "",
        f"<sub>departure warning {t.warning:g} · departure error {t.error:g} · "
        f"min values {t.min_values} · untrained statistics (BN104) {'an error' if t.strict else 'a warning'}</sub>",
        "",
    ]
    return "\n".join(lines)


def _cause_text(finding: Finding) -> str:
    if not (finding.cause and finding.cause_sentence):
        return ""
    return f" (likely cause, {finding.cause}: {inert(finding.cause_sentence)})"


def check_to_junit(check: CheckReport) -> str:
    """JUnit XML: one test case per layer (and one for the model), failed where a finding reaches --fail-on."""
    from xml.etree import ElementTree as ET

    failing = set(check.failed)
    by_layer: dict[Untrusted, list[Finding]] = {}
    for finding in check.findings:
        by_layer.setdefault(finding.label, []).append(finding)
    cases = [MODEL_LABEL, *check.layers]
    suite = ET.Element(
        "testsuite",
        name="bn-inspect check",
        tests=str(len(cases)),
        failures=str(sum(any(f in failing for f in by_layer.get(case, ())) for case in cases)),
        errors="0",
    )
    for case in cases:
        element = ET.SubElement(
            suite, "testcase", classname=f"bn-inspect.{check.model.source.inert()}", name=case.inert()
        )
        findings = by_layer.get(case, [])
        failed = [f for f in findings if f in failing]
        if failed:
            failure = ET.SubElement(
                element,
                "failure",
                type=failed[0].code,
                message=f"{failed[0].code} {failed[0].rule}: {inert(failed[0].message)}",
            )
            failure.text = "\n".join(
                f"[{f.severity.value}] {f.code} {f.rule}: {inert(f.message)}" + _cause_text(f) for f in failed
            )
        others = [f for f in findings if f not in failing]
        if others:
            ET.SubElement(element, "system-out").text = "\n".join(
                f"[{f.severity.value}] {f.code} {f.rule}: {inert(f.message)}" for f in others
            )
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def listing_to_json(listing: LayerListing) -> str:
    """The static layer listing as JSON."""
    return json.dumps(listing.to_dict(), indent=2, allow_nan=False) + "\n"


def listing_to_markdown(listing: LayerListing) -> str:
    """The static layer listing as a Markdown table."""
    lines = [
        "## bn-inspect layers",
        "",
        f"**Model** {_code(listing.model.source)}{_format(listing.model)}"
        + (" · layer types inferred from the state_dict keys" if listing.types_inferred else ""),
        "",
        "| layer | type | C | eps | momentum | affine | batches | running mean (avg) | running var (avg) | eval uses |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for layer in listing.layers:
        momentum = "None" if layer.is_cumulative_average else format_number(layer.momentum)
        lines.append(
            f"| {_cell(_code(layer.name))} | {_text(layer.type)} | {layer.num_channels if layer.num_channels is not None else '—'} | "
            f"{format_number(layer.eps)} | {momentum} | {'yes' if layer.affine else 'no'} | "
            f"{f'{layer.num_batches_tracked:,}' if layer.num_batches_tracked is not None else '—'} | "
            f"{format_number(_avg(layer.running_mean))} | {format_number(_avg(layer.running_var))} | {layer.eval_uses} |"
        )
    return "\n".join(lines) + "\n"


def dataclass_to_json(value: object, kind: str) -> str:
    """A frozen result dataclass (recalibration, mode comparison) as a versioned JSON document."""
    from dataclasses import asdict, is_dataclass

    from bn_inspect.report.records import SCHEMA_VERSION, json_ready

    if not is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"expected a dataclass instance, not {type(value).__name__}")
    document = {"schema_version": SCHEMA_VERSION, "kind": kind, **asdict(value)}
    return json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n"


def comparison_to_markdown(comparison: ModeComparison) -> str:
    """The train/eval gap per layer call as a Markdown table."""
    lines = [
        "## bn-inspect compare-modes",
        "",
        f"{counted(comparison.num_samples, 'sample')} in {counted(comparison.num_batches, 'batch')}; Δ = ‖train − eval‖ / ‖eval‖.",
        "",
        "| layer | type | output Δ | input Δ | own Δ | departure | max \\|z\\| | worst var ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for gap in comparison.layers:
        lines.append(
            f"| {_cell(_code(gap.label))} | {_text(gap.type)} | {gap.output_rel_diff:.2%} | {gap.input_rel_diff:.2%} | "
            f"{gap.own_rel_diff:.2%} | {format_number(gap.departure, 3)} | {format_number(gap.max_abs_shift_z)} | "
            f"{format_number(gap.worst_var_ratio)} |"
        )
    lines.append("")
    if comparison.gap_opens_at:
        lines.append(f"**The gap opens at {_code(comparison.gap_opens_at)}.**")
    elif comparison.batch_noise_from is not None:
        lines.append(batch_noise_sentence(comparison, _code))
    else:
        lines.append(f"No layer's output differs by more than {comparison.threshold:.0%} between modes.")
    if comparison.output is not None:
        change = comparison.output.argmax_change_fraction
        lines.append(
            f"Model output differs by {comparison.output.rel_diff:.2%}"
            + (f"; predicted class changes for {change:.1%} of samples." if change is not None else ".")
        )
    return "\n".join(lines) + "\n"


def recalibration_to_markdown(result: RecalibrationResult, output: str) -> str:
    """Before/after shift per recalibrated layer as a Markdown table."""
    lines = [
        f"## bn-inspect recalibrate ({result.method})",
        "",
        f"{counted(result.num_samples, 'sample')} in {counted(result.num_batches, 'batch')}; wrote {_code(output)}.",
        *_provenance_markdown(result),
        "",
        "| layer | values/ch | departure before | departure after | max \\|z\\| before | max \\|z\\| after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for layer in result.layers:
        lines.append(
            f"| {_cell(_code(layer.name))} | {layer.values_per_channel:,} | {format_number(layer.departure_before, 3)} | "
            f"{format_number(layer.departure_after, 3)} | {format_number(layer.max_abs_shift_z_before)} | "
            f"{format_number(layer.max_abs_shift_z_after)} |"
        )
    lines += [f"- skipped {_code(s.name)}: {_text(s.reason)}" for s in result.skipped]
    return "\n".join(lines) + "\n"


def _provenance_markdown(result: RecalibrationResult) -> list[str]:
    provenance = result.provenance
    if provenance is None:
        return []
    return [
        "",
        f"- source model: {_code(provenance.source_model)}",
        f"- data: {_text(provenance.data.describe())}",
        f"- method: {_text(provenance.method)}",
    ]


def diff_to_json(diff: DiffReport) -> str:
    """The comparison as a JSON document of kind "diff" (see diff.schema.json)."""
    return json.dumps(diff.to_dict(), indent=2, allow_nan=False) + "\n"


def diff_to_markdown(diff: DiffReport) -> str:
    """A job-summary / pull-request comment: the verdict, then one row per layer call, largest change first."""

    def change(value: StatChange | None) -> tuple[str, str]:
        if value is None:
            return "—", "—"
        return format_number(value.max_abs_mean_change), format_number(value.worst_var_ratio)

    verdict = "✅ within tolerance" if diff.passed else "❌ beyond tolerance"
    lines = [f"## bn-inspect diff: {verdict}", "", f"**{_text(diff.headline)}.**", ""]
    for name, model, data, mode in (
        ("OLD", diff.old_model, diff.old_input, diff.old_mode),
        ("NEW", diff.new_model, diff.new_input, diff.new_mode),
    ):
        lines.append(
            f"**{name}** {_code(model.source)}{_format(model)} · {_code(data.source)}: "
            f"{counted(data.num_samples, 'sample')} · mode {_text(mode)}  "
        )
    lines += [
        "",
        "| # | layer | type | change | C | running mean max \\|Δ\\| | running var worst ratio "
        "| batch mean max \\|Δ\\| | batch var worst ratio | verdict |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for layer in diff.layers:
        label = " → ".join(_code(n) for n in (layer.old, layer.new) if n) if layer.status == "renamed" else None
        channels = [layer.old_channels, layer.new_channels]
        cells = [
            str(layer.position),
            label or _code(layer.label),
            _text(layer.type),
            f"**{change_word(layer)}**" if layer.is_beyond else change_word(layer),
            " → ".join(dict.fromkeys(f"{c:,}" for c in channels if c is not None)) or "—",
            *change(layer.running),
            *change(layer.batch),
            " → ".join(dict.fromkeys(v or "—" for v in (layer.old_verdict, layer.new_verdict))),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Mean changes are in units of the OLD standard deviation; var ratios are new / old."]
    legend = change_legend(diff.layers)
    if legend:
        lines.append(f"In the change column, {_text(legend)}.")
    if diff.first_changed is not None:
        lines.append(f"First changed layer in execution order: {_code(diff.first_changed)}.")
    lines += [f"- {_text(note)}." for note in diff.notes]
    lines += ["", f"<sub>tolerance: {_text(diff.tolerance.describe())}</sub>", ""]
    return "\n".join(lines)
