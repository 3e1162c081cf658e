"""A diff of two reports -> rich renderable: one row per layer call, largest change first (never imports torch)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from bn_inspect.output.layout import Column, Layout, fitted
from bn_inspect.output.render import _inert, _short, _two_lines
from bn_inspect.output.words import change_legend, change_word, counted
from bn_inspect.report.diff import UNCHANGED, WITHIN, DiffReport, LayerChange, StatChange
from bn_inspect.report.records import InputInfo, ModelInfo
from bn_inspect.text import Untrusted

_STATUS_STYLE = {UNCHANGED: "green", WITHIN: "green", "changed": "bold red"}


def _channels(layer: LayerChange) -> str:
    old, new = layer.old_channels, layer.new_channels
    if old is None or new is None or old == new:
        value = new if new is not None else old
        return f"{value:,}" if value is not None else "—"
    return f"{old:,} → {new:,}"


def _verdicts(layer: LayerChange) -> str:
    old, new = layer.old_verdict or "—", layer.new_verdict or "—"
    return old if old == new else f"{old} → {new}"


def _change_cells(change: StatChange | None) -> tuple[Text, Text]:
    if change is None:
        return Text("—", style="dim"), Text("—", style="dim")
    return Text(_short(change.max_abs_mean_change)), Text(_short(change.worst_var_ratio))


def diff_rows(layers: tuple[LayerChange, ...]) -> list[dict[str, Text]]:
    """Each layer call's cells, by the column they belong to (every layout picks from them)."""
    rows = []
    for layer in layers:
        running_mean, running_var = _change_cells(layer.running)
        batch_mean, batch_var = _change_cells(layer.batch)
        status = Text(change_word(layer), style=_STATUS_STYLE.get(layer.status, "bold yellow"))
        row = {
            "#": Text(str(layer.position)),
            "layer": _inert(layer.label, "bold" if layer.is_beyond else ""),
            "type": _inert(layer.type),
            "change": status,
            "C": Text(_channels(layer)),
            "running mean\nmax |Δ|": running_mean,
            "running var\nworst ratio": running_var,
            "batch mean\nmax |Δ|": batch_mean,
            "batch var\nworst ratio": batch_var,
            "verdict": Text(_verdicts(layer)),
        }
        row["layer\ntype"] = _two_lines(row["layer"], _inert(layer.type))
        row["change\nC"] = _two_lines(status, row["C"], "")
        row["running\nmax |Δ| · ratio"] = _two_lines(running_mean, running_var, "")
        row["batch\nmax |Δ| · ratio"] = _two_lines(batch_mean, batch_var, "")
        rows.append(row)
    return rows


# The layer first: where a table does not fit, it names each row's block.
_WIDE = (
    "layer",
    "type",
    "#",
    "change",
    "C",
    "running mean\nmax |Δ|",
    "running var\nworst ratio",
    "batch mean\nmax |Δ|",
    "batch var\nworst ratio",
    "verdict",
)
_NARROW = ("layer\ntype", "#", "change\nC", "running\nmax |Δ| · ratio", "batch\nmax |Δ| · ratio", "verdict")
_LEFT = {"layer", "type", "change", "layer\ntype", "change\nC", "verdict"}


def _side(name: str, model: ModelInfo, data: InputInfo, mode: Untrusted) -> Text:
    text = Text()
    text.append(f"{name} ", style="bold")
    text.append(model.source.inert() + ("" if model.is_in_memory else f" ({model.format.inert()})") + " · ")
    text.append(f"{data.source.inert()}: {counted(data.num_samples, 'sample')} · mode {mode.inert()}")
    return text


def render_diff(diff: DiffReport, width: int = 160) -> RenderableType:
    """OLD and NEW, a row per layer call sorted by size of change, the first changed layer and the verdict."""
    rows = diff_rows(diff.layers)
    layouts = [
        Layout(
            tuple(Column(key, "left" if key in _LEFT else "right", wraps=key == "verdict") for key in keys),
            tuple(tuple(row[key] for key in keys) for row in rows),
        )
        for keys in (_WIDE, _NARROW)
    ]
    parts: list[RenderableType] = [
        _side("OLD", diff.old_model, diff.old_input, diff.old_mode),
        _side("NEW", diff.new_model, diff.new_input, diff.new_mode),
        Text(""),
        fitted(layouts, width),
        Text(""),
        Text("Mean changes are in units of the OLD standard deviation; var ratios are new / old.", style="dim"),
    ]
    legend = change_legend(diff.layers)
    if legend:
        parts.append(Text(f"In the change column, {legend}.", style="dim"))
    if diff.first_changed is not None:
        parts.append(_inert(f"First changed layer in execution order: {diff.first_changed.inert()}", "bold"))
    parts += [_inert(f"Note: {note}.", "dim") for note in diff.notes]
    beyond = len(diff.beyond)
    parts.append(Text(diff.headline + ".", style="bold"))
    parts.append(
        Text(
            f"{beyond} of {counted(len(diff.layers), 'layer call')} beyond the tolerance "
            f"({diff.tolerance.describe()}): {'PASSED' if diff.passed else 'FAILED'}",
            style="bold green" if diff.passed else "bold red",
        )
    )
    return Group(*parts)
