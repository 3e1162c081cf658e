"""Layer listings, mode comparisons and recalibrations -> rich renderables (never prints, never imports torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.text import Text

from bn_inspect.output.layout import Column, Layout, fitted
from bn_inspect.output.render import _inert, _mean, _model_line, _short, _two_lines
from bn_inspect.output.words import batch_noise_sentence, counted, departing_after_sentence
from bn_inspect.report.departure import Thresholds
from bn_inspect.report.records import LayerListing, LayerState

if TYPE_CHECKING:
    from bn_inspect.report.comparisons import ModeComparison, RecalibratedLayer, RecalibrationResult
    from bn_inspect.report.provenance import RecalibrationProvenance


def _spread(values: Sequence[float] | None) -> str:
    if not values:
        return "—"
    finite = [v for v in values if math.isfinite(v)]
    bad = len(values) - len(finite)
    if not finite:
        return "all non-finite"
    text = f"{_short(_mean(finite))} [{_short(min(finite))}, {_short(max(finite))}]"
    return text + (f" +{bad} non-finite" if bad else "")


def _listing_row(layer: LayerState) -> dict[str, Text]:
    momentum = "None (cumulative)" if layer.is_cumulative_average else _short(layer.momentum)
    flags = [
        f for f, on in (("train mode", layer.is_training), ("lazy", layer.is_lazy), ("frozen", layer.is_frozen)) if on
    ]
    row = {
        "layer": _inert(layer.name),
        "type": _inert(layer.type.inert() + (f" ({', '.join(flags)})" if flags else "")),
        # Stacked, the flags get a line of their own so that the type never has to wrap.
        "layer\ntype": _two_lines(_two_lines(_inert(layer.name), _inert(layer.type)), ", ".join(flags), "magenta")
        if flags
        else _two_lines(_inert(layer.name), _inert(layer.type)),
        "C": Text(f"{layer.num_channels:,}" if layer.num_channels is not None else "—"),
        "eps": Text(_short(layer.eps)),
        "momentum": Text(momentum),
        "affine": Text("yes" if layer.affine else "no"),
        "tracks": Text("yes" if layer.track_running_stats else "no"),
        "batches": Text(f"{layer.num_batches_tracked:,}" if layer.num_batches_tracked is not None else "—"),
        "running mean\navg [min, max]": Text(_spread(layer.running_mean)),
        "running var\navg [min, max]": Text(_spread(layer.running_var)),
        "eval uses": Text(layer.eval_uses, style="yellow" if layer.eval_uses == "batch" else ""),
    }
    row["eps\nmomentum"] = _two_lines(row["eps"], row["momentum"], "")
    row["affine\ntracks"] = _two_lines(row["affine"], row["tracks"], "")
    return row


_LISTING_COLUMNS = {
    "type": Column("type", wraps=True),
    "momentum": Column("momentum", "right", wraps=True),
    "eps\nmomentum": Column("eps\nmomentum", "right", wraps=True),
    "running mean\navg [min, max]": Column("running mean\navg [min, max]", "right", wraps=True),
    "running var\navg [min, max]": Column("running var\navg [min, max]", "right", wraps=True),
    "layer": Column("layer"),
    "layer\ntype": Column("layer\ntype"),
    "affine": Column("affine"),
    "tracks": Column("tracks"),
    "affine\ntracks": Column("affine\ntracks"),
    "eval uses": Column("eval uses", wraps=True),
}


_STATISTICS = ("running mean\navg [min, max]", "running var\navg [min, max]", "eval uses")


def render_listing(listing: LayerListing, width: int = 160) -> RenderableType:
    """The static listing: one row per normalization layer, its settings and its running statistics."""
    rows = [_listing_row(layer) for layer in listing.layers]
    layouts = [
        Layout(
            tuple(_LISTING_COLUMNS.get(key, Column(key, "right")) for key in keys),
            tuple(tuple(row[key] for key in keys) for row in rows),
        )
        for keys in (
            ("layer", "type", "C", "eps", "momentum", "affine", "tracks", "batches", *_STATISTICS),
            ("layer\ntype", "C", "eps\nmomentum", "affine\ntracks", "batches", *_STATISTICS),
        )
    ]
    table = fitted(layouts, width)
    parts: list[RenderableType] = [_model_line(listing.model), Text(""), table]
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


# The colours of inspect's departure column (output/render.py), by tier.
_TIER_STYLE = {"error": "bold red", "warning": "yellow", "info": "", "within": "green"}


def _ratio_bar(value: float, top: float = 1.0) -> Text:
    """A 10-cell bar of a relative difference on a log scale from 1e-4 to ``top``."""
    if math.isnan(value):
        return Text("?" * 10, style="bold red")
    fill = 0.0 if value <= 1e-4 else min(1.0, (math.log10(value) + 4) / (math.log10(top) + 4))
    cells = round(fill * 10)
    style = "green" if value < 0.01 else "yellow" if value < 0.05 else "bold red"
    return Text("█" * cells + "·" * (10 - cells), style=style)


def render_mode_comparison(comparison: ModeComparison, width: int = 160) -> RenderableType:
    """The train/eval gap as a profile over depth: one row per layer call, bars for the output difference."""
    rows = [
        {
            "layer": _inert(gap.label, "bold" if gap.label == comparison.gap_opens_at else ""),
            "type": _inert(gap.type),
            "output Δ train vs eval": _ratio_bar(gap.output_rel_diff) + Text(f" {gap.output_rel_diff:.2%}"),
            "input Δ": Text(f"{gap.input_rel_diff:.2%}"),
            "own Δ": Text(f"{gap.own_rel_diff:.2%}"),
            "departure": Text(_short(gap.departure), style=_TIER_STYLE.get(gap.departure_tier or "", "dim")),
            "worst var ratio": Text(_short(gap.worst_var_ratio)),
        }
        for gap in comparison.layers
    ]
    for row in rows:
        row["layer\ntype"] = _two_lines(row["layer"], row["type"])
    columns = {
        "layer": Column("layer"),
        "type": Column("type"),
        "layer\ntype": Column("layer\ntype"),
        "output Δ train vs eval": Column("output Δ train vs eval", wraps=True),
        "worst var ratio": Column("worst var ratio", "right", wraps=True),
    }
    layouts = [
        Layout(
            tuple(columns.get(key, Column(key, "right")) for key in keys),
            tuple(tuple(row[key] for key in keys) for row in rows),
        )
        for keys in (
            ("layer", "type", "output Δ train vs eval", "input Δ", "own Δ", "departure", "worst var ratio"),
            ("layer\ntype", "output Δ train vs eval", "input Δ", "own Δ", "departure", "worst var ratio"),
        )
    ]
    table = fitted(layouts, width)
    parts: list[RenderableType] = [
        *([_model_line(comparison.model)] if comparison.model is not None else []),
        Text(
            f"{counted(comparison.num_samples, 'sample')} in {counted(comparison.num_batches, 'batch')}, each run in eval and in "
            "train mode (dropout off in both); Δ = ‖train − eval‖ / ‖eval‖.",
            style="dim",
        ),
        Text(""),
        table,
        Text(""),
    ]
    if comparison.gap_opens_at is not None:
        opening = comparison.layer(comparison.gap_opens_at.raw)
        parts.append(
            Text(
                f"The gap opens at {opening.label.inert()}: its output differs by {opening.output_rel_diff:.1%} between "
                f"modes, its input by {opening.input_rel_diff:.1%}; its own share is {opening.own_rel_diff:.1%}.",
                style="bold red",
            )
        )
    elif comparison.batch_noise_from is not None:
        parts.append(Text(batch_noise_sentence(comparison, lambda label: label.inert()), style="yellow"))
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
        parts.append(_inert(f"Not executed: {', '.join(name.inert() for name in comparison.not_executed)}", "yellow"))
    return Group(*parts)


def _before_after(layer: RecalibratedLayer) -> dict[str, tuple[float | None, float | None]]:
    """Each before/after pair of a recalibrated layer, by its stacked column header."""
    return {
        "departure\nbefore/after": (layer.departure_before, layer.departure_after),
        "max |z|\nbefore/after": (layer.max_abs_shift_z_before, layer.max_abs_shift_z_after),
        "worst var ratio\nbefore/after": (layer.worst_var_ratio_before, layer.worst_var_ratio_after),
        "mean\nold/new": (_mean(layer.old_running_mean), _mean(layer.new_running_mean)),
        "var\nold/new": (_mean(layer.old_running_var), _mean(layer.new_running_var)),
    }


def render_recalibration(result: RecalibrationResult, output: str, width: int = 160) -> RenderableType:
    """Before/after per layer: how far the data sat from the old statistics, and from the new."""
    firsts = (Column("layer"), Column("values/ch", "right"))
    pairs = [
        (_inert(layer.name), Text(f"{layer.values_per_channel:,}"), _before_after(layer)) for layer in result.layers
    ]
    headers = list(pairs[0][2]) if pairs else []
    # Side by side with an arrow while that fits; narrower, the value after goes under the one before.
    layouts = [
        Layout(
            (*firsts, *(Column(header.replace("/", " → ").replace("\n", " "), "right") for header in headers)),
            tuple(
                (name, count, *(Text(" → ".join(map(_short, pair))) for pair in cells.values()))
                for name, count, cells in pairs
            ),
        ),
        Layout(
            (*firsts, *(Column(header, "right") for header in headers)),
            tuple(
                (name, count, *(Text("\n".join(map(_short, pair))) for pair in cells.values()))
                for name, count, cells in pairs
            ),
        ),
    ]
    table = fitted(layouts, width)
    method = (
        "precise: one pass with normalization layers in train mode (as PreciseBN / update_bn)"
        if result.method == "precise"
        else "sequential: layer by layer in eval mode, each after the layers before it (exact for the deployed model)"
    )
    parts: list[RenderableType] = [
        Text(
            f"Recalibrated {counted(len(result.layers), 'layer')} over {counted(result.num_samples, 'sample')} in "
            f"{counted(result.num_batches, 'batch')} ({counted(result.num_passes, 'pass')}), method {method}.",
            style="bold",
        ),
        *_provenance_lines(result.provenance),
        Text(""),
        table,
    ]
    past = result.departing_after(Thresholds().warning)
    if past:
        parts.append(_inert(departing_after_sentence(past, result.method), "bold red"))
    for skipped in result.skipped:
        parts.append(_inert(f"Skipped {skipped.name.inert()} ({skipped.type.inert()}): {skipped.reason}", "yellow"))
    for note in result.notes:
        parts.append(_inert(f"Note: {note}", "dim"))
    parts.append(_inert(f"Wrote {output}", "green"))
    return Group(*parts)


def _provenance_lines(provenance: RecalibrationProvenance | None) -> list[RenderableType]:
    """Which model and which data the new statistics came from (the record the new file holds)."""
    if provenance is None:
        return []
    digest = f" (sha256 {provenance.source_sha256.inert()[:12]}…)" if provenance.source_sha256 else ""
    return [
        _inert(f"Source model: {provenance.source_model.inert()}{digest}"),
        _inert(f"Data: {provenance.data.describe()}"),
    ]
