"""The page of a diff: OLD and NEW with their fingerprints, the change profile, the table, structural changes, each layer's channels."""

from __future__ import annotations

import html
import math

from bn_inspect.output.html.blocks import Cell, Column, Row, escaped, facts, layer_table, number, section
from bn_inspect.output.html.document import Page
from bn_inspect.output.html.figures import (
    BLUE,
    GREEN,
    ORANGE,
    RED,
    Figure,
    Series,
    channel_changes,
    diff_layouts,
    profile,
)
from bn_inspect.output.words import change_legend, change_word, counted
from bn_inspect.report.diff import (
    ADDED,
    REMOVED,
    RENAMED,
    STRUCTURAL,
    DiffReport,
    LayerChange,
    StatChange,
    what_changed,
)
from bn_inspect.report.records import InputInfo, ModelInfo
from bn_inspect.text import Untrusted

_COLUMNS = (
    Column("#", is_numeric=True, hint="execution order (NEW's; OLD's for a removed layer)"),
    Column("layer"),
    Column("type"),
    Column(
        "change",
        hint="stored: its running statistics moved; input: only its input on the data; downstream: only its input, "
        "after a stored or structural change earlier",
    ),
    Column("C"),
    Column("running mean max |Δ|", is_numeric=True, hint="(new - old running mean) / sqrt(old running var + eps)"),
    Column("running var worst ratio", is_numeric=True, hint="new / old running var, farthest from 1"),
    Column("batch mean max |Δ|", is_numeric=True, hint="(new - old batch mean) / sqrt(old batch var + eps)"),
    Column("batch var worst ratio", is_numeric=True, hint="new / old batch var, farthest from 1"),
    Column("past tolerance", is_numeric=True, hint="1 at the tolerance; structural changes are infinite"),
    Column("verdict", hint="departs or matches its running statistics on the data, OLD → NEW"),
)


def in_execution_order(diff: DiffReport) -> list[LayerChange]:
    """Every layer call in execution order: NEW's, with each removed call after the NEW one at its index."""
    return sorted(diff.layers, key=lambda layer: (layer.position, layer.status == REMOVED))


def diff_page(diff: DiffReport, model_output: str = "") -> Page:
    """The diff as a page; ``model_output`` is unused (it is recalibrate's)."""
    ordered = in_execution_order(diff)
    index = {id(layer): i for i, layer in enumerate(ordered)}
    figures: dict[str, Figure] = {"fig-profile": _change_profile(diff, ordered)}
    details = [_layer_detail(i, layer, figures, diff.first_changed) for i, layer in enumerate(ordered)]
    rows = [_row(index[id(layer)], layer, diff.first_changed) for layer in diff.layers]
    body = [
        _header(diff, ordered),
        section(
            "Change per layer call",
            '<div class="plot" id="fig-profile" data-target-prefix="layer-"></div><p class="hint">Every layer call in '
            "NEW's execution order (a removed one after the call at its index): hover for its numbers, click to open "
            "its detail below. Mean changes are in OLD standard deviations; dotted lines: the tolerance.</p>",
            "profile",
        ),
        section("Layers, largest change first", layer_table("layers-table", _COLUMNS, rows) + _legend(diff), "layers"),
        _structural(ordered),
        section("Each layer's channels", "\n".join(details), "details"),
    ]
    title = f"bn-inspect diff · {diff.old_model.source} → {diff.new_model.source}"
    layouts = diff_layouts(diff.tolerance.max_mean_change, diff.tolerance.max_var_ratio)
    return Page("diff", title, "\n".join(part for part in body if part), figures, layouts=layouts)


def _side(model: ModelInfo, data: InputInfo, mode: Untrusted) -> str:
    model_print = f" · sha256 <code>{escaped(model.sha256)}</code>" if model.sha256 else " · no file fingerprint"
    data_print = (
        f" · first batch sha256 <code>{escaped(data.first_batch_sha256)}</code>"
        if data.first_batch_sha256
        else " · no data fingerprint"
    )
    arch = f" · arch {escaped(model.arch)}" if model.arch else ""
    batches = (
        f"{counted(data.num_samples, 'sample')} in {counted(data.num_batches, 'batch')}, {data.dtype}, mode {mode}"
    )
    shown_format = "" if model.is_in_memory else f" ({escaped(model.format)})"
    return (
        f'<span class="name">{escaped(model.source)}</span>{shown_format}{arch}{model_print}<br>'
        f"{escaped(data.source)}: {escaped(batches)}{data_print}"
    )


def _header(diff: DiffReport, ordered: list[LayerChange]) -> str:
    rows = [
        ("OLD", _side(diff.old_model, diff.old_input, diff.old_mode)),
        ("NEW", _side(diff.new_model, diff.new_input, diff.new_mode)),
        ("tolerance", escaped(diff.tolerance.describe())),
    ]
    if diff.first_changed is not None:
        target = next(i for i, layer in enumerate(ordered) if layer.label == diff.first_changed)
        rows.append(("first changed", f'<a class="jump" href="#layer-{target}">{escaped(diff.first_changed)}</a>'))
    beyond = len(diff.beyond)
    verdict = (
        f"{'Passed' if diff.passed else 'Failed'}: {what_changed(diff.layers)} ({beyond} of "
        f"{counted(len(diff.layers), 'layer call')} beyond the tolerance)."
    )
    notes = "".join(f'<p class="verdict verdict-random">Note: {escaped(note)}.</p>' for note in diff.notes)
    return (
        f'<header><h1>bn-inspect <span class="kind">diff</span></h1>{facts(rows)}{notes}'
        f'<p class="verdict verdict-{"passed" if diff.passed else "failed"}">{escaped(verdict)}</p></header>'
    )


def _legend(diff: DiffReport) -> str:
    legend = change_legend(diff.layers)
    return f'<p class="hint">In the change column, {escaped(legend)}.</p>' if legend else ""


def _hover(layer: LayerChange) -> str:
    return f"<b>{escaped(layer.label)}</b> ({escaped(layer.type)})<br>{escaped(change_word(layer))}"


def _change_profile(diff: DiffReport, ordered: list[LayerChange]) -> Figure:
    """max |Δ mean| (upper, linear) and the worst var ratio (lower, log) of running and batch statistics per call."""

    def values(kind: str, statistic: str) -> list[float | None]:
        changes: list[StatChange | None] = [getattr(layer, kind) for layer in ordered]
        return [_largest(c) if statistic == "mean" else _worst(c) for c in changes]

    series = [
        Series("running mean max |Δ|", values("running", "mean"), RED),
        Series("batch mean max |Δ|", values("batch", "mean"), BLUE, dash="dash"),
        Series("running var worst ratio", values("running", "var"), GREEN, axis="y2"),
        Series("batch var worst ratio", values("batch", "var"), ORANGE, axis="y2", dash="dash"),
    ]
    tolerance = diff.tolerance
    marked = None
    first = next((i for i, layer in enumerate(ordered) if layer.label == diff.first_changed), None)
    if first is not None and diff.first_changed is not None:
        marked = (first, f"first changed: {escaped(diff.first_changed)}")
    return profile(
        [layer.label.inert() for layer in ordered],
        [_hover(layer) for layer in ordered],
        series,
        ("|Δ mean| (old std)", "var ratio new / old (log)"),
        ([tolerance.max_mean_change], [tolerance.max_var_ratio, 1 / tolerance.max_var_ratio]),
        marked,
        upper_is_log=False,
    )


def _channels(layer: LayerChange) -> str:
    old, new = layer.old_channels, layer.new_channels
    if old is None or new is None or old == new:
        return number(new if new is not None else old)
    return f"{old:,} → {new:,}"


def _verdicts(layer: LayerChange) -> str:
    old, new = layer.old_verdict or "—", layer.new_verdict or "—"
    return old if old == new else f"{old} → {new}"


def _row(index: int, layer: LayerChange, first_changed: Untrusted | None) -> Row:
    running, batch = layer.running, layer.batch
    mark = ' <span class="severity severity-error">first changed</span>' if layer.label == first_changed else ""
    status = (
        f'<span class="severity severity-{"error" if layer.is_beyond else "info"}">{escaped(change_word(layer))}</span>'
    )
    cells = (
        Cell(str(layer.position), layer.position),
        Cell(escaped(layer.label) + mark, layer.label, target=f"layer-{index}"),
        Cell(escaped(layer.type), layer.type),
        Cell(status, layer.status),
        Cell(_channels(layer), layer.new_channels if layer.new_channels is not None else layer.old_channels),
        Cell(number(_largest(running)), _largest(running)),
        Cell(number(_worst(running)), _log_distance(running)),
        Cell(number(_largest(batch)), _largest(batch)),
        Cell(number(_worst(batch)), _log_distance(batch)),
        Cell(number(layer.size), layer.size),
        Cell(escaped(_verdicts(layer)), _verdicts(layer)),
    )
    return Row(
        layer.new or layer.old or Untrusted(""),
        layer.label,
        cells,
        "departs" if layer.is_beyond else "",
        f"row-{index}",
    )


def _largest(change: StatChange | None) -> float | None:
    return None if change is None else change.max_abs_mean_change


def _worst(change: StatChange | None) -> float | None:
    return None if change is None else change.worst_var_ratio


def _log_distance(change: StatChange | None) -> float | None:
    """How far the worst var ratio lies from 1 on a log scale, so that sorting puts the worst first."""
    ratio = _worst(change)
    if ratio is None or math.isnan(ratio):
        return None
    return abs(math.log(ratio)) if 0 < ratio < math.inf else math.inf


def _structural(ordered: list[LayerChange]) -> str:
    """Added, removed, renamed layers and channel counts that changed, each linked to its detail."""
    items = []
    for i, layer in enumerate(ordered):
        if layer.status not in STRUCTURAL:
            continue
        what = {ADDED: "added in NEW", REMOVED: "removed from OLD", RENAMED: "renamed"}.get(
            layer.status, f"channels {_channels(layer)}"
        )
        items.append(
            f'<li><a class="jump" href="#layer-{i}">{escaped(layer.label)}</a> ({escaped(layer.type)}): '
            f"{escaped(what)}</li>"
        )
    body = f'<ul class="plain">{"".join(items)}</ul>' if items else "<p>No layer was added, removed or renamed.</p>"
    return section("Added, removed and renamed layers", body, "structure")


def _layer_detail(i: int, layer: LayerChange, figures: dict[str, Figure], first_changed: Untrusted | None) -> str:
    """One layer call's collapsible detail: its facts and, where both sides have statistics, the change per channel."""
    running, batch = layer.running, layer.batch
    plots: dict[str, Figure] = {}
    if running is not None or batch is not None:
        plots[f"fig-{i}-mean"] = channel_changes(
            "mean", None if running is None else running.mean_change, None if batch is None else batch.mean_change
        )
        plots[f"fig-{i}-var"] = channel_changes(
            "var", None if running is None else running.var_ratio, None if batch is None else batch.var_ratio
        )
    figures.update(plots)
    summary = (
        f'<summary><span class="name">{escaped(layer.label)}</span> <span class="type">{escaped(layer.type)}</span>'
        f' <span class="metric">{escaped(change_word(layer))} · past tolerance {number(layer.size)}</span></summary>'
    )
    rows = [
        ("OLD", escaped(layer.old) if layer.old is not None else "—"),
        ("NEW", escaped(layer.new) if layer.new is not None else "—"),
        ("channels", _channels(layer)),
        ("verdict", escaped(_verdicts(layer))),
    ]
    for kind, change in (("running", running), ("batch", batch)):
        if change is not None:
            rows.append(
                (
                    f"{kind} statistics",
                    f"max |Δ mean| {number(change.max_abs_mean_change)} old std · worst var ratio "
                    f"{number(change.worst_var_ratio)}",
                )
            )
    if plots:
        charts = "".join(f'<div class="plot lazy" id="{html.escape(key)}"></div>' for key in plots)
        charts += (
            '<p class="hint">One dot per channel; red: running statistics, blue: batch statistics on the data. '
            "Dotted lines: the tolerance.</p>"
        )
    else:
        charts = '<p class="hint">No statistics to compare channel by channel for this layer call.</p>'
    is_open = layer.label == first_changed
    return (
        f'<details class="layer" id="layer-{i}"{" open" if is_open else ""}>{summary}'
        f'<div class="reduction-row"><div>{facts(rows)}</div></div><div class="plots">{charts}</div></details>'
    )
