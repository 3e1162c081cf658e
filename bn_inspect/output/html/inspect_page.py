"""The page of an inspection: header and verdict, depth profile, layer table, per-layer channels and reduction."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from bn_inspect.output.html.blocks import Cell, Column, Row, escaped, facts, layer_table, number, section, shape_text
from bn_inspect.output.html.document import Page
from bn_inspect.output.html.figures import (
    BLUE,
    GREEN,
    RED,
    ChannelPanel,
    Figure,
    Series,
    channel_layouts,
    channel_scatter,
    channel_values,
)
from bn_inspect.output.html.figures import profile as profile_figure
from bn_inspect.output.html.reduction import Reduction, family_reductions, reduction_svg
from bn_inspect.output.verdict import inspection_verdict
from bn_inspect.output.words import counted, image_details
from bn_inspect.report import shift
from bn_inspect.report.departure import Thresholds, departure
from bn_inspect.report.records import LayerReport, ModelInfo, Report
from bn_inspect.version import __version__

COLUMNS = (
    Column("#", is_numeric=True, hint="execution order"),
    Column("layer"),
    Column("type"),
    Column("input"),
    Column("C", is_numeric=True, hint="channels"),
    Column("values / channel", is_numeric=True),
    Column(
        "departure", is_numeric=True, hint="mean W2 distance over channels / allowance: 0.83 warns, 1.7 is an error"
    ),
    Column("max |shift z|", is_numeric=True, hint="(batch mean - running mean) / sqrt(running var + eps)"),
    Column("mean |shift z|", is_numeric=True),
    Column("worst var ratio", is_numeric=True, hint="batch var / running var, farthest from 1"),
    Column("uses"),
    Column("flags"),
)


def inspect_page(report: Report, model_output: str = "") -> Page:
    """The inspection ``report`` as a page; ``model_output`` is unused (it is recalibrate's)."""
    thresholds = Thresholds()
    first = report.first_divergent(thresholds)
    figures: dict[str, Figure] = {"fig-profile": depth_profile(report, first)}
    details = []
    for index, layer in enumerate(report.layers):
        details.append(layer_detail(index, layer, figures, thresholds, is_open=layer is first))
    body = [
        header(report),
        section(
            "Depth profile",
            '<div class="plot" id="fig-profile" data-target-prefix="layer-"></div><p class="hint">Every layer call in execution order; '
            "hover for its numbers, click to open its detail below. Dotted lines: check's thresholds.</p>",
            "profile",
        ),
        section(
            "Layers",
            layer_table("layers-table", COLUMNS, [_row(i, layer) for i, layer in enumerate(report.layers)]),
            "layers",
        ),
        section("Each layer's channels and reduction", "\n".join(details), "details"),
        families(report.layers),
    ]
    title = f"bn-inspect inspect · {report.model.source}"
    return Page("inspect", title, "\n".join(part for part in body if part), figures, layouts=channel_layouts())


def model_facts(model: ModelInfo | None) -> list[tuple[str, str]]:
    """The model's source, format and --arch as fact rows."""
    if model is None:
        return []
    described = f"{escaped(model.source)} ({escaped(model.format)})"
    rows = [("model", described)]
    if model.arch:
        rows.append(("arch", escaped(model.arch)))
    return rows


def header(report: Report) -> str:
    """Title, what ran, and the verdict."""
    data = report.input
    batches = f"{counted(data.num_samples, 'sample')} in {counted(data.num_batches, 'batch')} of {shape_text(data.shape)} {data.dtype}"
    rows = [
        *model_facts(report.model),
        ("input", f"{escaped(data.source)}: {escaped(batches)}"),
        *(
            ("images", escaped(said))
            for said in image_details(data.preprocessing, data.num_skipped_files, data.skipped_files)
        ),
        ("mode", escaped(report.mode)),
        ("device", escaped(report.device)),
        (
            "versions",
            escaped(
                f"bn-inspect {report.bn_inspect_version or __version__} · torch {report.torch_version or 'unknown'}"
            ),
        ),
    ]
    if report.not_executed:
        rows.append(("never ran", escaped(", ".join(name.inert() for name in report.not_executed))))
    verdict = inspection_verdict(report, str, text=str)
    outcome = html.escape(verdict.outcome.replace(" ", "-"))
    return (
        '<header><h1>bn-inspect <span class="kind">inspect</span></h1>'
        f'{facts(rows)}<p class="verdict verdict-{outcome}">{escaped(verdict.sentence)}</p></header>'
    )


def hover_text(layer: LayerReport) -> str:
    """A layer's name, type and input shape for a Plotly hover label (escaped: Plotly reads some tags)."""
    return f"<b>{escaped(layer.label)}</b> ({escaped(layer.type)})<br>input {shape_text(layer.input_shape)}"


def depth_profile(report: Report, first: LayerReport | None) -> Figure:
    """max and mean |shift z| (upper panel) and the worst var ratio (lower), per layer call."""
    layers = report.layers
    thresholds = Thresholds()
    series = [
        Series("departure", [_score(layer) for layer in layers], RED),
        Series("mean |shift z|", [shift.mean_abs(layer.mean_shift_z) for layer in layers], BLUE, dash="dash"),
        Series("worst var ratio", [layer.worst_var_ratio for layer in layers], GREEN, axis="y2"),
    ]
    marked = None
    if first is not None:
        marked = (layers.index(first), f"first departure: {escaped(first.label)}")
    limits: tuple[list[float], list[float]] = ([thresholds.warning, thresholds.error], [])
    return profile_figure(
        [hover_text(layer) for layer in layers],
        series,
        ("departure, |shift z| (log)", "var ratio (log)"),
        limits,
        marked,
    )


def _score(layer: LayerReport) -> float | None:
    found = departure(layer)
    return None if found is None else found.score


def _row(index: int, layer: LayerReport) -> Row:
    max_z, mean_z, ratio = layer.max_abs_shift_z, shift.mean_abs(layer.mean_shift_z), layer.worst_var_ratio
    found = departure(layer)
    score = None if found is None else found.score
    cells = (
        Cell(str(index), index),
        Cell(escaped(layer.label), layer.label, target=f"layer-{index}"),
        Cell(escaped(layer.type), layer.type),
        Cell(shape_text(layer.input_shape), None if layer.input_shape is None else math.prod(layer.input_shape)),
        Cell(number(layer.num_channels), layer.num_channels),
        Cell(number(layer.values_per_channel), layer.values_per_channel),
        Cell(number(score), score),
        Cell(number(max_z), max_z),
        Cell(number(mean_z), mean_z),
        Cell(number(ratio), _ratio_distance(ratio)),
        Cell(escaped(layer.normalizes_with), layer.normalizes_with),
        Cell(escaped(" ".join(layer.flags)), " ".join(layer.flags)),
    )
    css = "departs" if found is not None and found.departs else ""
    return Row(layer.name, layer.label, cells, css)


def _ratio_distance(ratio: float | None) -> float | None:
    """How far a var ratio lies from 1 on a log scale, so that sorting puts the worst first (0 and inf farthest)."""
    if ratio is None or math.isnan(ratio):
        return None
    return abs(math.log(ratio)) if 0 < ratio < math.inf else math.inf


def beyond_thresholds(layer: LayerReport, thresholds: Thresholds) -> list[bool]:
    """Per channel: its own distance reaches the warning level of the allowance, or is not finite."""
    found = departure(layer, thresholds)
    if found is None:
        return [False] * len(layer.batch_mean or ())
    marked = {*found.channels, *found.nonfinite}
    return [c in marked for c in range(found.num_channels)]


def channel_figures(index: int, layer: LayerReport, thresholds: Thresholds) -> dict[str, Figure]:
    """The layer's per-channel plots by element id: batch against running mean and variance, or batch values alone."""
    mean_id, var_id = f"fig-{index}-mean", f"fig-{index}-var"
    if layer.batch_mean is None or layer.batch_var is None:
        return {}
    if layer.running_mean is None or layer.running_var is None:
        return {mean_id: channel_values("mean", layer.batch_mean), var_id: channel_values("var", layer.batch_var)}
    beyond = beyond_thresholds(layer, thresholds)
    means = ChannelPanel("mean", layer.batch_mean, layer.running_mean)
    variances = ChannelPanel("var", layer.batch_var, layer.running_var)
    return {mean_id: channel_scatter(means, beyond), var_id: channel_scatter(variances, beyond)}


def layer_detail(
    index: int, layer: LayerReport, figures: dict[str, Figure], thresholds: Thresholds, is_open: bool
) -> str:
    """One layer call's collapsible detail: its reduction drawn and explained, its facts, its channel plots."""
    plots = channel_figures(index, layer, thresholds)
    figures.update(plots)
    summary = (
        f'<summary><span class="name">{escaped(layer.label)}</span> <span class="type">{escaped(layer.type)}</span>'
        f' <span class="shape">{shape_text(layer.input_shape)}</span>'
        f' <span class="metric">departure {number(_score(layer))} · max |shift z| {number(layer.max_abs_shift_z)}'
        f" · worst var ratio {number(layer.worst_var_ratio)}</span></summary>"
    )
    picture = ""
    if layer.input_shape and layer.axis_names and layer.reduced_axes is not None:
        reduction = Reduction(layer.input_shape, layer.axis_names, layer.reduced_axes, layer.family)
        picture = reduction_svg(reduction, f"reduction-{index}")
    rows = [
        ("eps", number(layer.eps)),
        ("momentum", _momentum(layer)),
        ("affine", "yes" if layer.affine else "no"),
        ("running statistics", "tracked" if layer.track_running_stats else "not tracked"),
        ("batches tracked", number(layer.num_batches_tracked)),
        ("normalizes with", escaped(layer.normalizes_with)),
    ]
    if layer.flags:
        rows.append(("flags", escaped(" ".join(layer.flags))))
    charts = "".join(f'<div class="plot lazy" id="{html.escape(key)}"></div>' for key in plots)
    found = departure(layer, thresholds)
    if plots and found is not None:
        charts += (
            '<p class="hint">One dot per channel; red: a channel whose own distance from the running statistics '
            f"reaches {thresholds.warning:g} allowances ({thresholds.warning * found.allowance:.3g} running std "
            f"for {found.samples:,} samples). Grey: batch = running.</p>"
        )
    return (
        f'<details class="layer" id="layer-{index}"{" open" if is_open else ""}>{summary}'
        f'<div class="reduction-row">{picture}<div><p class="sentence">{escaped(layer.explanation)}</p>{facts(rows)}</div></div>'
        f'<div class="plots">{charts}</div></details>'
    )


def _momentum(layer: LayerReport) -> str:
    # momentum None means a cumulative average only for a layer that tracks running statistics.
    if not layer.track_running_stats:
        return "—"
    return "None (cumulative average)" if layer.momentum is None else number(layer.momentum)


def families(layers: Sequence[LayerReport]) -> str:
    """The key to the pictures: how each family would reduce the first multi-dim input of the run."""
    shape = next((layer.input_shape for layer in layers if layer.input_shape and len(layer.input_shape) >= 3), None)
    if shape is None:
        return ""
    items = "".join(
        f"<figure>{reduction_svg(reduction, f'family-{i}')}<figcaption>{html.escape(words)}</figcaption></figure>"
        for i, (words, reduction) in enumerate(family_reductions(shape))
    )
    return section(
        "How the normalization families reduce this input",
        f'<p class="hint">The same input, {shape_text(shape)}; shaded: the values behind one statistic.</p>'
        f'<div class="families">{items}</div>',
        "families",
    )
