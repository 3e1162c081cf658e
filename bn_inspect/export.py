"""Report -> JSON, CSV and Markdown text for machines and CI summaries (pandas lives here)."""

from __future__ import annotations

import json
import math

from bn_inspect.render import format_number, matching_layers
from bn_inspect.report import Report


def to_json(report: Report) -> str:
    """The report as a JSON document of schema version 1 (see report.schema.json)."""
    return json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"


CSV_COLUMNS = (
    "layer",
    "call",
    "type",
    "channel",
    "values_per_channel",
    "normalizes_with",
    "batch_mean",
    "running_mean",
    "batch_var",
    "batch_var_unbiased",
    "running_var",
    "mean_shift_z",
    "var_ratio",
    "weight",
    "bias",
)


def to_csv(report: Report) -> str:
    """One row per layer call and channel; layers without per-channel statistics get one row."""
    import pandas as pd

    rows = []
    for layer in report.layers:
        num_channels = len(layer.batch_mean or layer.running_mean or ())
        per_channel = {
            "batch_mean": layer.batch_mean,
            "running_mean": layer.running_mean,
            "batch_var": layer.batch_var,
            "batch_var_unbiased": layer.batch_var_unbiased,
            "running_var": layer.running_var,
            "mean_shift_z": layer.mean_shift_z,
            "var_ratio": layer.var_ratio,
            "weight": layer.weight,
            "bias": layer.bias,
        }
        common = {
            "layer": layer.name,
            "call": layer.call,
            "type": layer.type,
            "values_per_channel": layer.values_per_channel,
            "normalizes_with": layer.normalizes_with,
        }
        if num_channels == 0:
            rows.append({**common, "channel": None})
        for c in range(num_channels):
            row = {**common, "channel": c}
            for key, values in per_channel.items():
                row[key] = values[c] if values is not None and c < len(values) else None
            rows.append(row)
    frame = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    frame["channel"] = frame["channel"].astype("Int64")
    frame["values_per_channel"] = frame["values_per_channel"].astype("Int64")
    return str(frame.to_csv(index=False, float_format="%.17g"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _avg(values: tuple[float, ...] | None) -> float | None:
    return math.fsum(values) / len(values) if values else None


def to_markdown(report: Report, channel_patterns: tuple[str, ...] = ()) -> str:
    """A GitHub-flavoured summary: one table row per layer call, then the explanations."""
    data = report.input
    lines = [
        "## bn-inspect",
        "",
        f"**Model** `{report.model.source}` ({report.model.format}) · **input** `{data.source}`: "
        f"{data.num_samples:,} samples, {data.num_batches} batch(es) of {tuple(data.shape)} · "
        f"**mode** {report.mode} · **device** {report.device}",
        "",
        "| # | layer | type | input | C | values/ch | batch mean | running mean | batch var | running var "
        "| max \\|z\\| | worst var ratio | uses | flags |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for index, layer in enumerate(report.layers):
        cells = [
            str(index),
            f"`{layer.label}`",
            layer.type,
            "×".join(str(s) for s in layer.input_shape or ()),
            str(layer.num_channels) if layer.num_channels is not None else "—",
            f"{layer.values_per_channel:,}" if layer.values_per_channel is not None else "—",
            format_number(_avg(layer.batch_mean)),
            format_number(_avg(layer.running_mean)),
            format_number(_avg(layer.batch_var)),
            format_number(_avg(layer.running_var)),
            format_number(layer.max_abs_shift_z),
            format_number(layer.worst_var_ratio),
            layer.normalizes_with,
            " ".join(layer.flags),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    first = report.first_divergent()
    lines.append("")
    if first is not None:
        lines.append(
            f"**First departure from the running statistics:** `{first.label}` (max |z| = {format_number(first.max_abs_shift_z)})."
        )
    else:
        lines.append("No layer's batch mean lies more than 3 running standard deviations from its running mean.")
    if report.not_executed:
        lines.append(f"Not executed: {', '.join(f'`{n}`' for n in report.not_executed)}.")
    lines += ["", "<details><summary>How each layer's statistics were computed</summary>", ""]
    lines += [f"- {layer.explanation}" for layer in report.layers]
    lines += ["", "</details>", ""]
    for layer in matching_layers(report, channel_patterns):
        lines += [
            f"### `{layer.label}` per channel",
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
