"""Results at a Python prompt: a repr of a few lines, and ``.table()``, the text a terminal shows.

Registered as report/display.py's text renderers. A repr is what a notebook prints for a cell's
value and what a debugger or a log shows for a variable; the dataclass default printed every
per-channel list (698 KB for a ResNet-18). This one says the verdict and names the worst few
layers, each name cut to a bounded length, so that it stays under 2 KB for any model.
"""

from __future__ import annotations

import math

from bn_inspect.output.verdict import inspection_verdict
from bn_inspect.output.words import counted
from bn_inspect.report.comparisons import ModeComparison, RecalibrationResult
from bn_inspect.report.diff import DiffReport
from bn_inspect.report.display import register_text_renderers
from bn_inspect.report.findings import CheckReport
from bn_inspect.report.records import ModelInfo, Report
from bn_inspect.text import Untrusted, inert

# How many layers or findings a repr names, and how long a name or a message may be in it.
NUM_SHOWN = 5
NAME_LIMIT = 60
MESSAGE_LIMIT = 120
_HINT = " .table() gives the whole table, .to_dict() the data>"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _name(text: Untrusted) -> str:
    return _cut(text.inert(), NAME_LIMIT)


def _model(model: ModelInfo | None) -> str:
    if model is None:
        return "model ?"
    shown = f"model {_name(model.source)}"
    return shown if model.is_in_memory else f"{shown} ({_name(model.format)})"


def _largest_first(value: float) -> float:
    """A sort key: larger values first, NaN (a layer that broke) before all."""
    return -math.inf if math.isnan(value) else -value


def _more(total: int) -> str:
    return f" and {total - NUM_SHOWN:,} more" if total > NUM_SHOWN else ""


def _report(report: Report) -> list[str]:
    said = inspection_verdict(report, _name)
    scored = [(layer, found) for layer in report.layers if (found := layer.departure) is not None]
    scored.sort(key=lambda pair: _largest_first(pair[1].score))
    worst = ", ".join(f"{_name(layer.label)} {found.score:.3g} ({found.tier})" for layer, found in scored[:NUM_SHOWN])
    data = report.input
    return [
        said.summary,
        f"{_model(report.model)}; {counted(len(report.layers), 'layer call')}; {_name(data.source)}: "
        f"{counted(data.num_samples, 'sample')} in {counted(data.num_batches, 'batch')}; mode {_name(report.mode)}",
        *([f"largest departures: {worst}{_more(len(scored))}"] if scored else []),
    ]


def _check(check: CheckReport) -> list[str]:
    counts = {s: sum(f.severity.value == s for f in check.findings) for s in ("error", "warning", "info")}
    findings = sorted(check.findings, key=lambda f: -f.severity.rank)
    return [
        f"{'PASSED' if check.passed else 'FAILED'} (fails on {check.fail_on.value}): {counted(counts['error'], 'error')}, "
        f"{counted(counts['warning'], 'warning')}, {counts['info']} info",
        f"{_model(check.model)}; {counted(len(check.layers), 'layer')}",
        *(
            f"{f.code} {f.severity.value} {_name(f.label)}: {_cut(inert(f.message), MESSAGE_LIMIT)}"
            for f in findings[:NUM_SHOWN]
        ),
        *([f"and {len(findings) - NUM_SHOWN:,} more findings"] if len(findings) > NUM_SHOWN else []),
    ]


def _comparison(comparison: ModeComparison) -> list[str]:
    output = comparison.output
    gap = "no output with a batch dim" if output is None else f"output differs by {output.rel_diff:.3g} (relative)"
    opens = comparison.gap_opens_at
    ranked = sorted(comparison.layers, key=lambda layer: _largest_first(layer.output_rel_diff))
    largest = ", ".join(f"{_name(layer.label)} {layer.output_rel_diff:.3g}" for layer in ranked[:NUM_SHOWN])
    return [
        f"train against eval mode: {gap}; "
        + (f"the gap opens at {_name(opens)}" if opens is not None else "no departing layer opens a gap"),
        f"{_model(comparison.model)}; {counted(comparison.num_samples, 'sample')} in "
        f"{counted(comparison.num_batches, 'batch')}",
        *([f"largest output differences: {largest}{_more(len(ranked))}"] if ranked else []),
    ]


def _diff(diff: DiffReport) -> list[str]:
    changes = ", ".join(f"{_name(layer.label)} {layer.status} {layer.size:.3g}" for layer in diff.beyond[:NUM_SHOWN])
    first = f"; first changed: {_name(diff.first_changed)}" if diff.first_changed is not None else ""
    return [
        f"{'PASSED' if diff.passed else 'FAILED'}: {_cut(inert(diff.headline), MESSAGE_LIMIT)}{first}",
        f"old {_model(diff.old_model)}; new {_model(diff.new_model)}",
        *([f"largest changes: {changes}{_more(len(diff.beyond))}"] if changes else []),
    ]


def _recalibration(result: RecalibrationResult) -> list[str]:
    ranked = sorted(result.layers, key=lambda layer: _largest_first(layer.max_abs_shift_z_before))
    largest = ", ".join(
        f"{_name(layer.name)} |z| {layer.max_abs_shift_z_before:.3g} → {layer.max_abs_shift_z_after:.3g}"
        if layer.max_abs_shift_z_after is not None
        else f"{_name(layer.name)} |z| {layer.max_abs_shift_z_before:.3g}"
        for layer in ranked[:NUM_SHOWN]
    )
    return [
        f"{result.method}: {counted(len(result.layers), 'layer')} recalibrated, {len(result.skipped):,} skipped, from "
        f"{counted(result.num_samples, 'sample')} in {counted(result.num_batches, 'batch')}",
        *([f"largest shifts before: {largest}{_more(len(ranked))}"] if ranked else []),
    ]


def compact_repr(result: object) -> str:
    """``<Kind: verdict`` and a few lines: what it found and the worst few layers, under 2 KB."""
    if isinstance(result, Report):
        lines = _report(result)
    elif isinstance(result, CheckReport):
        lines = _check(result)
    elif isinstance(result, ModeComparison):
        lines = _comparison(result)
    elif isinstance(result, DiffReport):
        lines = _diff(result)
    elif isinstance(result, RecalibrationResult):
        lines = _recalibration(result)
    else:
        return f"<{type(result).__name__}>"
    return f"<{type(result).__name__}: " + "\n ".join(lines) + "\n" + _HINT


def table_text(result: object, width: int) -> str:
    """The result as ``--format table`` prints it into a file, laid out for ``width`` columns."""
    from bn_inspect.output.formats import Rendering, Result, TableFormatter

    if not isinstance(result, Report | CheckReport | ModeComparison | DiffReport | RecalibrationResult):
        raise TypeError(f"no table for {type(result).__name__}")
    shown: Result = result
    return TableFormatter().text(shown, Rendering(width=width))


def register() -> None:
    """Give results their compact repr and ``.table()``."""
    register_text_renderers(compact_repr, table_text)
